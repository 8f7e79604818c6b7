"""PNG plots of a comparison record (schema `loratv.comparison`) and of a precision record (`loratv.precision`).

Each function reads the record alone, writes one PNG, closes its figure and returns a small dict of what it drew,
so a test can check the picture's data against values computed independently from the record.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cycler import cycler

if TYPE_CHECKING:
    from matplotlib.colors import Colormap

# matplotlib itself is imported inside the functions that draw: it costs ~30 MB and ~0.3 s, and most commands (and
# library calls) draw nothing

CATEGORIES = ("shared", "adapter-only", "cast-artifact", "unexplained", "unchanged")
# Okabe–Ito: distinguishable with the common colour-vision deficiencies
COLOURS = {"shared": "#0072B2", "adapter-only": "#56B4E9", "cast-artifact": "#E69F00",
           "unexplained": "#D55E00", "unchanged": "#BBBBBB", "real": "#0072B2", "lora": "#000000",
           "vanished": "#CC79A7", "ulps": "#009E73"}
CYCLE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = "osD^v<>p"  # with CYCLE: 64 kinds told apart before repeating
FLOOR = 1e-17  # 1 − cosine below this (often exactly 0) is drawn here: a log axis cannot show 0
DPI = 110
# rc_context takes keys typed as matplotlib.typing.RcKeyType (a Literal of every rc key), which older matplotlib
# releases do not define, so the keys are typed Any here
STYLE: dict[Any, Any] = {
    "font.size": 9, "axes.titlesize": 11, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.prop_cycle": cycler(color=CYCLE),
    "axes.spines.top": False, "axes.spines.right": False, "figure.facecolor": "white",
}
FILES = {"cosine": "cosine_similarity_analysis.png", "norm": "norm_distribution_comparison.png",
         "coverage": "model_architecture_coverage.png", "heatmap": "parameter_modification_heatmap.png"}
MAX_TICKS = 40  # beyond this many rows/columns, label every k-th so labels never overlap


def _render(build, record: dict, path) -> dict:
    """Run `build(record) -> (figure, info)` in the shared style, save it to `path`, close it, return info."""
    import matplotlib

    with matplotlib.rc_context(STYLE):  # ticks are made while saving, so the style must cover savefig too
        fig, info = build(record)
        fig.savefig(Path(path), dpi=DPI, bbox_inches="tight")
    return info


def subplots(*grid, figsize, **options):
    """A figure and its axes, made without pyplot: no global figure registry and no backend is chosen for the
    process (a Figure renders its PNG through Agg by itself).

    Args:
        *grid: nrows, ncols, as for Figure.subplots (none: one axes).
        figsize: (width, height) in inches.
        **options: passed on to Figure.subplots (sharex, squeeze, gridspec_kw, ...).

    Returns:
        (figure, axes): one Axes or an array of them, as Figure.subplots gives.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **options)


def colormap(name: str) -> Colormap:
    """A copy of a registered colormap (safe to modify).

    Args:
        name: a name in matplotlib.colormaps, e.g. "viridis".

    Returns:
        The copy.
    """
    import matplotlib

    return matplotlib.colormaps[name].copy()


def _label_ticks(ax, axis: str, labels) -> None:
    """Ticks at cell centres, thinned to at most MAX_TICKS, smaller font as the count grows."""
    n = len(labels)
    step = max(1, math.ceil(n / MAX_TICKS))
    size = 8 if n <= 20 else 7 if n <= 40 else 6
    positions = np.arange(0, n, step) + 0.5
    shown = [labels[i] for i in range(0, n, step)]
    if axis == "x":
        ax.set_xticks(positions, shown, rotation=60, ha="right", rotation_mode="anchor", fontsize=size)
    else:
        ax.set_yticks(positions, shown, fontsize=size)


# mantissas of log-axis ticks, finest first: the finest set that needs at most LOG_TICKS ticks is used
LOG_MANTISSAS = ((1, 1.2, 1.4, 1.6, 1.8, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 9), (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8),
                 (1, 2, 3, 4, 5, 6, 8), (1, 2, 5), (1, 3), (1,))
LOG_TICKS = 8


def _tick_text(value: float) -> str:
    """m×10^e in mathtext (10^e alone for a power of ten), as matplotlib's own log labels look."""
    exponent = math.floor(math.log10(value) + 1e-9)
    mantissa = round(value / 10.0 ** exponent, 6)
    if mantissa >= 10:
        mantissa, exponent = round(mantissa / 10, 6), exponent + 1
    power = f"10^{{{exponent}}}"
    return f"${power}$" if mantissa == 1 else f"${mantissa:g}\\times{power}$"


def log_ticks_covering(lo: float, hi: float) -> list[float]:
    """Ticks m·10^e for a log axis whose first is ≤ lo and last ≥ hi, so that the labels span the data.

    Matplotlib's default log axis labels only decades (plus minor ticks within about one decade), so data from
    6.9e-7 to 1.4e-6 show one label, 1e-6, and the reader cannot tell how far the points reach.

    Args:
        lo: the smallest value drawn (> 0).
        hi: the largest value drawn (≥ lo).

    Returns:
        Increasing tick values, at most LOG_TICKS of them where the range allows (whole decades beyond that).

    Raises:
        ValueError: lo is not positive and finite, or hi is not finite.
    """
    lo, hi = float(lo), float(hi)
    if not (lo > 0 and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"log ticks need positive finite bounds, not {lo}, {hi}")
    hi = max(hi, lo)
    first, last = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    for mantissas in LOG_MANTISSAS:
        values = sorted({round(m * 10.0 ** e, 12 - e) for e in range(first, last + 1) for m in mantissas})
        below = max(v for v in values if v <= lo * (1 + 1e-12))
        above = min(v for v in values if v >= hi * (1 - 1e-12))
        ticks = [v for v in values if below <= v <= above]
        if len(ticks) <= LOG_TICKS:
            return ticks if len(ticks) > 1 else [below / 10, above] if below == above else ticks
    # many decades: every step-th power of ten, the last one at or above hi
    e0, e1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    step = max(1, math.ceil((e1 - e0) / (LOG_TICKS - 1)))
    return [10.0 ** (e0 + k * step) for k in range(math.ceil((e1 - e0) / step) + 1)]


def cover_log_axis(ax, axis: str, values) -> list[float]:
    """Put a log axis's limits at ticks just outside the data, every tick labelled, no unlabelled minor ticks.

    Args:
        ax: the matplotlib axes.
        axis: "x" or "y".
        values: the values drawn along that axis (positive).

    Returns:
        The ticks set, first ≤ min(values) and last ≥ max(values).
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator


    values = np.asarray(values, dtype=float)
    ticks = log_ticks_covering(float(values.min()), float(values.max()))
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_major_locator(FixedLocator(ticks))
    target.set_major_formatter(FuncFormatter(lambda v, _pos: _tick_text(v) if v > 0 else ""))
    target.set_minor_locator(NullLocator())
    pad = (ticks[-1] / ticks[0]) ** 0.03  # a little room beyond the end ticks, so no marker is cut in half
    (ax.set_xlim if axis == "x" else ax.set_ylim)(ticks[0] / pad, ticks[-1] * pad)
    return ticks


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#555555")


def _log_bins(values, n: int = 40):
    lo, hi = min(values), max(values)
    if lo == hi:  # one value: a decade either side so the bar has width
        lo, hi = lo / 10, hi * 10
    edges = np.logspace(math.log10(lo), math.log10(hi), n + 1)
    edges[0], edges[-1] = lo, hi  # 10**log10(x) can round past x and drop the extreme values from the histogram
    return edges


def _grid(tensors):
    """Rows: the layers present, ascending; columns: the kinds of layered tensors, in first-seen order."""
    layered = [t for t in tensors if t["layer"] is not None]
    layers = sorted({t["layer"] for t in layered})
    kinds = list(dict.fromkeys(t["kind"] for t in layered))
    return layered, layers, kinds


def _grid_size(n_rows: int, n_cols: int):
    return max(6.0, 3.5 + 0.42 * n_cols), max(3.5, 2.0 + 0.15 * n_rows)


def _cosine_figure(record):
    points = [(i, t) for i, t in enumerate(record["tensors"]) if t["category"] == "shared" and t["cosine"] is not None]
    fig, (left, right) = subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 1]})
    gaps = np.array([1.0 - t["cosine"] for _, t in points])
    shown = np.maximum(gaps, FLOOR)
    kinds = list(dict.fromkeys(t["kind"] for _, t in points))
    for k, kind in enumerate(kinds):
        idx = [j for j, (_, t) in enumerate(points) if t["kind"] == kind]
        left.scatter([points[j][0] for j in idx], shown[idx], s=12, color=CYCLE[k % len(CYCLE)],
                     marker=MARKERS[(k // len(CYCLE)) % len(MARKERS)], label=kind)
    floor_label = f"1 − cosine (log; values ≤ {FLOOR:.0e} drawn at {FLOOR:.0e})"
    left.set(xlabel="tensor index in base order", ylabel=floor_label,
             title=f"Task vector vs LoRA delta: 1 − cosine per shared tensor ({len(points)})")
    right.set(xlabel=floor_label, ylabel="shared tensors (count)", title="Distribution of 1 − cosine")
    ticks = []
    if points:
        ticks = cover_log_axis(left, "y", shown)  # the labels must reach the data's min and max
        right.hist(shown, bins=_log_bins(shown), color=COLOURS["shared"])
        cover_log_axis(right, "x", shown)
        right.tick_params(axis="x", which="both", labelrotation=35)
        left.legend(title="module kind", loc="upper left", bbox_to_anchor=(0, -0.12),
                    ncol=min(4, len(kinds)), fontsize=7, frameon=False)
    else:
        _empty(left, "no shared tensors")
        _empty(right, "no shared tensors")
    fig.tight_layout()
    return fig, {"points": len(points), "kinds": kinds, "clipped": int((gaps <= FLOOR).sum()), "ticks": ticks}


def _norm_figure(record):
    tensors = record["tensors"]
    series = {c: [t["task_vector_norm"] for t in tensors if t["changed"] and t["category"] == c
                  and t["task_vector_norm"]] for c in ("shared", "cast-artifact", "unexplained")}
    series["lora_delta"] = [t["lora_delta_norm"] for t in tensors if t["targeted"] and t["lora_delta_norm"]]
    fig, ax = subplots(figsize=(10, 5.5))
    values = [v for vs in series.values() for v in vs]
    if values:
        bins = _log_bins(values, 50)
        for key, vs in series.items():  # ‖ΔW‖ ≈ ‖T‖ when they match: filled areas under a dashed outline
            if key == "lora_delta" and vs:
                ax.hist(vs, bins=bins, histtype="step", linestyle="--", linewidth=1.4, color=COLOURS["lora"],
                        label=f"‖ΔW‖ LoRA delta, targeted tensors ({len(vs)})")
            elif vs:
                ax.hist(vs, bins=bins, histtype="stepfilled", alpha=0.55, color=COLOURS[key],
                        label=f"‖T‖ task vector, {key} ({len(vs)})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    else:
        _empty(ax, "no changed or targeted tensors")
    ax.set(xlabel="Frobenius norm (log scale, weight units)", ylabel="tensors (count, log scale)",
           title="Norms of task vectors and LoRA deltas")
    return fig, {k: len(v) for k, v in series.items()}


def _coverage_figure(record):
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    layered, layers, kinds = _grid(record["tensors"])
    globals_ = [t for t in record["tensors"] if t["layer"] is None]
    # global tensors share no kind with layers: numbered left to right in rows of their own below the layers
    n_cols = len(kinds) or min(len(globals_), 16) or 1
    global_rows = math.ceil(len(globals_) / n_cols)
    row_labels = [str(layer) for layer in layers] + ["global"] * global_rows
    n_rows = len(row_labels)
    codes = np.full((n_rows, n_cols), np.nan)
    row = {layer: i for i, layer in enumerate(layers)}
    col = {kind: j for j, kind in enumerate(kinds)}
    for t in layered:
        codes[row[t["layer"]], col[t["kind"]]] = CATEGORIES.index(t["category"])
    for j, t in enumerate(globals_):
        codes[len(layers) + j // n_cols, j % n_cols] = CATEGORIES.index(t["category"])
    fig, ax = subplots(figsize=_grid_size(n_rows, n_cols))
    cmap = ListedColormap([COLOURS[c] for c in CATEGORIES]).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(len(CATEGORIES) + 1) - 0.5, len(CATEGORIES))
    ax.pcolormesh(np.ma.masked_invalid(codes), cmap=cmap, norm=norm, edgecolors="white", linewidth=0.4)
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)  # layer 0 at the top, like a model listing
    for j in range(len(globals_)):  # names do not fit a cell: number it, name it in a second legend
        ax.text(j % n_cols + 0.5, len(layers) + j // n_cols + 0.5, str(j + 1), ha="center", va="center", fontsize=6)
    _label_ticks(ax, "x", kinds + [""] * (n_cols - len(kinds)))
    _label_ticks(ax, "y", row_labels)
    cells = Counter(CATEGORIES[int(c)] for c in codes[~np.isnan(codes)])
    cells = {c: cells.get(c, 0) for c in CATEGORIES}
    handles = [Patch(color=COLOURS[c], label=f"{c} ({cells[c]})") for c in CATEGORIES]
    handles.append(Patch(facecolor="white", edgecolor="#999999", label="no tensor"))
    legend = ax.legend(handles=handles, title="category (tensors)", loc="upper left", bbox_to_anchor=(1.01, 1),
                       frameon=False)
    if globals_:
        ax.add_artist(legend)
        names = [Patch(visible=False, label=f"{j + 1}: {t['name']}") for j, t in enumerate(globals_)]
        ax.legend(handles=names, title="global row", loc="lower left", bbox_to_anchor=(1.01, 0), frameon=False,
                  handlelength=0, handletextpad=0, fontsize=7)
    ax.set(xlabel="module kind (name without layer prefix)", ylabel="layer",
           title="Where the task vector and the adapter change the model")
    return fig, {"rows": n_rows, "columns": n_cols, "row_labels": row_labels, "column_labels": kinds, "cells": cells}


def _heatmap_figure(record):
    from matplotlib.colors import LogNorm

    layered, layers, kinds = _grid(record["tensors"])
    values = np.full((len(layers), len(kinds)), np.nan)
    row = {layer: i for i, layer in enumerate(layers)}
    col = {kind: j for j, kind in enumerate(kinds)}
    for t in layered:
        tv, base = t["task_vector_norm"], t["base_norm"]
        if tv and base:  # zero change (or zero base: ratio undefined) stays blank
            values[row[t["layer"]], col[t["kind"]]] = tv / base
    masked = np.ma.masked_invalid(values)
    fig, ax = subplots(figsize=_grid_size(len(layers), len(kinds)))
    if masked.count():
        lo, hi = float(masked.min()), float(masked.max())
        if lo == hi:
            lo, hi = lo / 10, hi * 10
        cmap = colormap("viridis").with_extremes(bad="white")
        mesh = ax.pcolormesh(masked, cmap=cmap, norm=LogNorm(lo, hi), edgecolors="white", linewidth=0.4)
        fig.colorbar(mesh, ax=ax, label="relative change ‖T‖ / ‖W‖ (log scale; blank = unchanged)")
    else:
        _empty(ax, "no changed per-layer tensors")
    if layers:
        ax.set_xlim(0, len(kinds))
        ax.set_ylim(len(layers), 0)
        _label_ticks(ax, "x", kinds)
        _label_ticks(ax, "y", [str(layer) for layer in layers])
    ax.set(xlabel="module kind (name without layer prefix)", ylabel="layer",
           title="Relative change of each tensor (Frobenius norm ratio)")
    return fig, {"shape": values.shape,
                 "values": [[None if np.isnan(v) else float(v) for v in r] for r in values]}


def _precision_figure(record):
    paths = record["paths"]
    names = [p["name"] for p in paths]
    parts = {c: [p["counts"].get(c, 0) for p in paths] for c in ("real", "cast-artifact", "unexplained")}
    vanished = [p["vanished_elements"] for p in paths]
    ulps = [p["max_error_ulps"] or 0.0 for p in paths]
    fig, (left, right) = subplots(1, 2, figsize=(max(10, 2.2 * len(paths) + 4), 5))
    x = np.arange(len(paths))
    bottom = np.zeros(len(paths))
    for c, heights in parts.items():
        left.bar(x, heights, bottom=bottom, color=COLOURS[c], label=c, width=0.6)
        bottom += heights
    if paths:  # totals on top, with headroom so neither they nor the legend sit on the bars
        left.bar_label(left.containers[-1], labels=[f"{int(b):,}" for b in bottom], fontsize=7, padding=2)
        left.set_ylim(0, max(1.0, float(bottom.max())) * 1.18)
    left.set(ylabel="changed tensors (count)", title="Changed tensors per merge path")
    width = 0.38
    bars = [right.bar(x - width / 2, vanished, width, color=COLOURS["vanished"], label="vanished elements (count)"),
            right.bar(x + width / 2, ulps, width, color=COLOURS["ulps"], label="max error (ulps)")]
    right.bar_label(bars[0], labels=[f"{v:,}" for v in vanished], fontsize=7, padding=2)
    right.bar_label(bars[1], labels=[f"{u:.3g}" for u in ulps], fontsize=7, padding=2)
    right.set_yscale("symlog", linthresh=1)  # symlog: zero stays drawable, large counts stay readable
    right.set_ylim(0, max([1.0, *vanished, *ulps]) * 6)  # room for the bar labels above the tallest bar
    right.set(ylabel="elements (count) / error (ulps), symlog scale", title="Lost updates and worst error")
    for ax in (left, right):
        ax.set_xticks(x, names, rotation=20, ha="right", rotation_mode="anchor")
        ax.set_xlabel("merge path")
    # below the axes: the bars and their labels need the whole plot area
    left.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    right.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    if not paths:
        _empty(left, "no paths")
    fig.tight_layout()
    return fig, {"paths": names, **parts, "vanished_elements": vanished, "max_error_ulps": ulps}


def cosine_plot(record: dict, path) -> dict:
    """`1 − cosine` of every shared tensor, by base position and as a histogram, on log axes.

    Args:
        record: the comparison record.
        path: the PNG file to write.

    Returns:
        What was drawn, for tests: "points", "kinds", "clipped" (gaps at the floor) and "ticks".
    """
    return _render(_cosine_figure, record, path)


def norm_plot(record: dict, path) -> dict:
    """Histograms of ‖T‖ for changed tensors per category, and of ‖ΔW‖ for targeted tensors.

    Args:
        record: the comparison record.
        path: the PNG file to write.

    Returns:
        What was drawn, for tests: the number of values per histogram series.
    """
    return _render(_norm_figure, record, path)


def coverage_plot(record: dict, path) -> dict:
    """Layers × module kinds, each cell coloured by its tensor's category; global tensors in a last row.

    Args:
        record: the comparison record.
        path: the PNG file to write.

    Returns:
        What was drawn, for tests: "rows", "columns", "row_labels", "column_labels" and "cells".
    """
    return _render(_coverage_figure, record, path)


def heatmap_plot(record: dict, path) -> dict:
    """Layers × module kinds, coloured by the relative change ‖T‖/‖W‖ on a log scale; zero change is blank.

    Args:
        record: the comparison record.
        path: the PNG file to write.

    Returns:
        What was drawn, for tests: the grid's "shape" and its values.
    """
    return _render(_heatmap_figure, record, path)


def precision_plot(record: dict, path) -> dict:
    """Per merge path: changed tensors by kind of change, and the vanished elements and worst error in ulps.

    Args:
        record: the precision record (`loratv.precision`).
        path: the PNG file to write.

    Returns:
        What was drawn, for tests: "paths", the counts per kind of change, "vanished_elements" and "max_error_ulps".
    """
    return _render(_precision_figure, record, path)


def write_comparison_plots(record: dict, out_dir) -> list[Path]:
    """The four comparison plots, under their fixed file names, in `out_dir`.

    Args:
        record: the comparison record.
        out_dir: the folder to write into (created if missing); file names are FILES' values.

    Returns:
        The paths written: cosine, norm, coverage, heatmap.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"cosine": cosine_plot, "norm": norm_plot, "coverage": coverage_plot, "heatmap": heatmap_plot}
    written = []
    for key, plot in plots.items():
        plot(record, out_dir / FILES[key])
        written.append(out_dir / FILES[key])
    return written
