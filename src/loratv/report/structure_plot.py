"""model_structure.png: the structure record's grid, layers × module kinds, one colour and letter per state.

Reads the record alone (schema `loratv.structure`), so a test can check the picture's data against the JSON.
Colours are the comparison plots' (Okabe–Ito): `both` is compare's `shared`, `task-vector-only` its `unexplained`.
"""

import math
from pathlib import Path

import numpy as np

from loratv.report.plots import COLOURS, _render, subplots

STATE_COLOURS = {"both": COLOURS["shared"], "adapter-only": COLOURS["adapter-only"],
                 "task-vector-only": COLOURS["unexplained"], "cast-artifact": COLOURS["cast-artifact"],
                 "neither": COLOURS["unchanged"], "no-tensor": "#FFFFFF"}
LETTERS = {"both": "B", "adapter-only": "A", "task-vector-only": "T", "cast-artifact": "C", "neither": "",
           "no-tensor": ""}
LABELS = {"both": "both: targeted and changed", "adapter-only": "adapter only: targeted, unchanged",
          "task-vector-only": "task vector only: changed, not targeted",
          "cast-artifact": "cast artifact: only rounded to the fine-tuned dtype",
          "neither": "neither: not targeted, unchanged", "no-tensor": "no tensor in this layer"}
DARK = {"both", "task-vector-only"}  # white letters on these
CELL_W, CELL_H = 0.30, 0.20  # inches per cell while the grid is small enough
MAX_GRID_W, MAX_GRID_H = 22.0, 26.0  # inches: a huge model gets smaller cells, not an unbounded image


def _ticks(ax, axis: str, labels, cell: float, keep=()) -> None:
    """Ticks at cell centres, every k-th when the cells (`cell` inches) are too small for one label each; the
    indices in `keep` (rows outside the layers) are always labelled."""
    size = 8 if cell >= 0.18 else 7 if cell >= 0.13 else 6
    step = max(1, math.ceil(size * 1.3 / 72 / cell))
    # count positions among the thinned rows only, so that layer 0 (not the embeddings row) starts the pattern
    shown = [i for i in range(len(labels)) if i in keep or (i - sum(k < i for k in keep)) % step == 0]
    positions = np.array(shown) + 0.5
    text = [labels[i] for i in shown]
    if axis == "x":
        ax.set_xticks(positions, text, rotation=60, ha="right", rotation_mode="anchor", fontsize=size)
    else:
        ax.set_yticks(positions, text, fontsize=size)
    ax.tick_params(axis=axis, length=0)


def _short(path) -> str:
    """The last two parts of a path (a folder named `base` alone says little), a hub id as given."""
    parts = Path(str(path)).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else str(path)


def _title(record) -> str:
    inputs = record["inputs"]
    parts = [f"model {_short(inputs['model'])}"]
    if inputs["adapter"]:
        parts.append(f"adapter {_short(inputs['adapter'])}")
    if inputs["task_vector"]:
        parts.append(f"task vector {_short(inputs['task_vector'])}")
    if inputs["finetuned"]:
        parts.append(f"fine-tuned {_short(inputs['finetuned'])}")
    return " · ".join(parts)


def legend_labels(record) -> dict:
    """LABELS, without naming an input the record was made without.

    Args:
        record: the structure record; its "inputs" say which of adapter, task vector and fine-tuned were given.

    Returns:
        A new dict, state -> legend label.
    """
    labels = dict(LABELS)
    inputs = record["inputs"]
    if not (inputs["task_vector"] or inputs["finetuned"]):
        labels.update({"adapter-only": "targeted by the adapter", "neither": "not targeted"})
    if not inputs["adapter"]:
        labels.update({"task-vector-only": "changed", "neither": "unchanged"})
        if not (inputs["task_vector"] or inputs["finetuned"]):
            labels["neither"] = "tensor"
    return labels


def _groups(columns):
    """(kind, first column, last column + 1) runs of the column groups."""
    runs = []
    for j, c in enumerate(columns):
        if runs and runs[-1][0] == c["kind"]:
            runs[-1][2] = j + 1
        else:
            runs.append([c["kind"], j, j + 1])
    return runs


def _structure_figure(record):
    from matplotlib.colors import BoundaryNorm, ListedColormap  # heavy: imported only to draw (see plots.py)
    from matplotlib.patches import Patch, Rectangle

    states = [s["state"] for s in record["states"]]
    rows, cells = record["rows"], record["cells"]
    columns = record["columns"]
    n_rows, n_cols = len(rows), len(cells[0]) if cells else 1
    # a global row's spare cell (state None) is drawn like a missing tensor, without the outline
    codes = np.array([[list(STATE_COLOURS).index(c["state"] or "no-tensor") for c in row] for row in cells],
                     dtype=float)
    cell_w = min(CELL_W, MAX_GRID_W / max(n_cols, 1))
    cell_h = min(CELL_H, MAX_GRID_H / max(n_rows, 1))
    globals_ = sorted((c["number"], c) for row in cells for c in row if "number" in c)
    # the axes get exactly the grid's size; the legend may reach below them (bbox_inches="tight" keeps it whole)
    width = 1.2 + n_cols * cell_w + 4.2  # y labels, grid, legend
    height = 1.3 + n_rows * cell_h  # titles, grid
    fig, ax = subplots(figsize=(width, height))
    fig.subplots_adjust(left=1.2 / width, right=1 - 4.2 / width, top=1 - 1.0 / height, bottom=0.3 / height)
    cmap = ListedColormap(list(STATE_COLOURS.values()))
    norm = BoundaryNorm(np.arange(len(STATE_COLOURS) + 1) - 0.5, len(STATE_COLOURS))
    ax.pcolormesh(codes, cmap=cmap, norm=norm, edgecolors="#FFFFFF", linewidth=0.6)
    for i in range(n_rows):  # a layer's missing tensor: white, outlined faintly (global rows' spare cells stay bare)
        for j in range(n_cols):
            if cells[i][j]["state"] == "no-tensor":
                ax.add_patch(Rectangle((j + 0.06, i + 0.08), 0.88, 0.84, fill=False, edgecolor="#DDDDDD",
                                           linewidth=0.5))
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)  # embeddings at the top, then layer 0 downwards, like the model runs
    letter_size = min(7.0, 72 * min(cell_w, cell_h) * 0.6)
    if letter_size >= 4:
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                text = str(c["number"]) if "number" in c else LETTERS.get(c["state"], "")
                if text:
                    ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=letter_size,
                            color="white" if c["state"] in DARK else "black")
    # rows of other sections apart from the layers: a rule between them
    for i in range(1, n_rows):
        if rows[i]["section"] != rows[i - 1]["section"]:
            ax.axhline(i, color="#333333", linewidth=1.0)
    layer_rows = [i for i, r in enumerate(rows) if r["section"] == "layer"]
    groups = _groups(columns)
    for kind, first, last in groups:
        if first and layer_rows:  # between column groups, through the layers only
            ax.vlines(first, layer_rows[0], layer_rows[-1] + 1, color="#333333", linewidth=1.0)
        ax.annotate(kind, xy=((first + last) / 2, 1), xycoords=("data", "axes fraction"), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8, fontweight="bold",
                    annotation_clip=False)
    _ticks(ax, "x", [c["name"] for c in columns] + [""] * (n_cols - len(columns)), cell_w)
    _ticks(ax, "y", [r["label"] for r in rows], cell_h, keep={i for i, r in enumerate(rows) if r["section"] != "layer"})
    ax.xaxis.set_label_position("bottom")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("module kind (tensor name without its layer prefix), grouped by role")
    ax.set_ylabel("layer")
    labels = legend_labels(record)
    handles = [Patch(facecolor=STATE_COLOURS[s], edgecolor="#999999" if s == "no-tensor" else STATE_COLOURS[s],
                     label=f"{LETTERS[s] + '  ' if LETTERS[s] else ''}{labels[s]} ({record['counts'][s]:,})")
               for s in states]
    if globals_:  # names do not fit a cell: numbered there, named here
        handles.append(Patch(visible=False, label=""))
        handles.append(Patch(visible=False, label="numbered cells (outside the layers):"))
        handles += [Patch(visible=False, label=f"{n}: {c['tensor']} ({c['state']})") for n, c in globals_]
    ax.legend(handles=handles, title="what touches each tensor (count)", loc="upper left", bbox_to_anchor=(1.02, 1),
              frameon=False, fontsize=8, title_fontsize=9, alignment="left")
    n_layers = record["layers"]
    ax.set_title(f"Model structure: {n_layers} layers × {len(columns)} module kinds, {record['total_tensors']:,} "
                 f"tensors\n{_title(record)}", loc="left", fontsize=10, pad=16)
    info = {"rows": n_rows, "columns": n_cols, "row_labels": [r["label"] for r in rows],
            "column_labels": [c["name"] for c in columns],
            "cells": {s: sum(c["state"] == s for row in cells for c in row) for s in STATE_COLOURS}}
    return fig, info


def structure_plot(record: dict, path) -> dict:
    """Draw the record's grid to `path` (PNG) and return what was drawn (rows, columns, labels, cells per state).

    Args:
        record: a `loratv.structure` record (structure.model_structure).
        path: the PNG file to write.

    Returns:
        {"rows", "columns", "row_labels", "column_labels", "cells": {state: count}}.
    """
    return _render(_structure_figure, record, path)
