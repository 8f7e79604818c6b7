"""PNG plots of a similarity record (schema `loratv.similarity`): the cosine matrix in clustered order, and the
spread of pairwise cosines per layer. Each function reads the record alone and returns what it drew, for tests."""

from __future__ import annotations

import numpy as np

from loratv.report.plots import _label_ticks, _render, colormap, subplots


def _heatmap_figure(record):
    names, order = record["adapters"], record["clustering"]["order"]
    k = len(names)
    values = np.array([[np.nan if record["cosine"][i][j] is None else record["cosine"][i][j] for j in order]
                       for i in order], dtype=float).reshape(k, k)
    side = min(14.0, 2.5 + 0.22 * k)
    fig, ax = subplots(figsize=(side + 1.5, side))
    cmap = colormap("RdBu_r").with_extremes(bad="#DDDDDD")
    mesh = ax.pcolormesh(np.ma.masked_invalid(values), cmap=cmap, vmin=-1, vmax=1)
    fig.colorbar(mesh, ax=ax, label="cosine of the weight deltas (grey: a zero delta)")
    ax.set_xlim(0, k)
    ax.set_ylim(k, 0)
    labels = [names[i] for i in order]
    _label_ticks(ax, "x", labels)
    _label_ticks(ax, "y", labels)
    ax.tick_params(axis="x", labelrotation=90)
    ax.set_title(f"Global cosine of {k} inputs, ordered by average-linkage clustering")
    return fig, {"order": list(order), "values": [[None if np.isnan(v) else float(v) for v in row] for row in values]}


def _per_layer_figure(record):
    layers = record["per_layer"]["layers"]
    lows, mids, highs = [], [], []
    for matrix in record["per_layer"]["cosine"]:
        k = len(matrix)
        off = [matrix[i][j] for i in range(k) for j in range(i + 1, k) if matrix[i][j] is not None]
        lows.append(min(off) if off else np.nan)
        mids.append(float(np.median(off)) if off else np.nan)
        highs.append(max(off) if off else np.nan)
    fig, ax = subplots(figsize=(8, 4))
    if layers:
        ax.fill_between(layers, lows, highs, color="#56B4E9", alpha=0.35, label="range over pairs")
        ax.plot(layers, mids, color="#0072B2", marker="o", markersize=3, label="median over pairs")
    else:
        ax.text(0.5, 0.5, "no per-layer tensors", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="layer", ylabel="cosine between pairs of inputs", ylim=(-1.05, 1.05),
           title="Pairwise cosine per layer")
    ax.axhline(0, color="#BBBBBB", linewidth=0.8)
    if layers:
        ax.legend(loc="lower right")
    return fig, {"layers": list(layers), "min": lows, "median": mids, "max": highs}


def heatmap_plot(record: dict, path) -> dict:
    """The K×K global cosine matrix, rows and columns in the clustering's leaf order.

    Args:
        record: the similarity record.
        path: the PNG file to write.

    Returns:
        What was drawn: the order and the matrix as drawn.
    """
    return _render(_heatmap_figure, record, path)


def per_layer_plot(record: dict, path) -> dict:
    """Per layer, the median and the range of the pairwise cosines.

    Args:
        record: the similarity record.
        path: the PNG file to write.

    Returns:
        What was drawn: layers and the min, median and max per layer.
    """
    return _render(_per_layer_figure, record, path)
