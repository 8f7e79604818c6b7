"""`loratv structure`: the model's tensors as a layers × module-kinds grid, each cell marked by what touches it.

The grid comes from headers alone: an adapter's targets from bind() (the same plan merge applies), a stored task
vector's changed set from task_vector.json (or, without it, from the stored tensors themselves). Tensors are read
only where headers cannot decide: a fine-tuned model (every tensor compared with the base, streamed in row chunks),
and the cast-artifact test of a changed, untargeted tensor whose fine-tuned dtype differs from the base's (bit for
bit, as compare does).
"""

import math
import re

import torch

from loratv.adapters.adapter import TOKEN_ROWS, bind, load_adapter
from loratv.common.dtypes import all_finite, code_of, torch_dtype_of
from loratv.common.names import LAYER, module_kind
from loratv.common.progress import progress_bar
from loratv.common.streaming import row_chunks
from loratv.errors import LoratvError
from loratv.io.checkpoint import Checkpoint
from loratv.io.outputs import atomic_output_dir, check_output, guarded_inputs
from loratv.ops.task_vector_input import LiveTaskVector, StoredTaskVector
from loratv.report.records import finite, write_json
from loratv.report.structure_html import render_structure_page
from loratv.report.structure_plot import structure_plot
from loratv.version import __version__

SCHEMA = "loratv.structure"
SCHEMA_VERSION = 1
JSON_FILE = "model_structure.json"
PNG_FILE = "model_structure.png"
HTML_FILE = "model_structure.html"
# legend order; every cell holds exactly one of these
STATES = ("both", "adapter-only", "task-vector-only", "cast-artifact", "neither", "no-tensor")
MEANING = {
    "both": "targeted by the adapter and changed in the task vector",
    "adapter-only": "targeted by the adapter, unchanged in the task vector",
    "task-vector-only": "changed in the task vector, not targeted by the adapter",
    "cast-artifact": "not targeted; changed only because the base was rounded to the fine-tuned dtype, bit for bit",
    "neither": "not targeted and unchanged",
    "no-tensor": "the model has no tensor of this kind in this layer",
}
# the order of column groups (a block reads norm → attention → norm → mlp; grouping keeps q/k/v/o together)
KIND_ORDER = ("attention", "mlp", "norm", "embedding", "head", "other")
CHUNK_BYTES = 32 << 20  # per input and read: the task-vector reads stay small next to the model


def _split(name: str):
    """(layer, column, section) of a tensor: layered tensors by their name without the layer prefix; global ones in
    an `embeddings` section (above the layers) or a `global` one (below)."""
    m = LAYER.search(name)
    if m is None:
        return None, None, "embeddings" if module_kind(name) == "embedding" else "global"
    return int(m.group(1)), name[m.end():], "layer"


def _states_used(has_adapter: bool, has_tv: bool) -> list:
    """The states a grid with these inputs can show (the legend lists these, with counts)."""
    if has_adapter and has_tv:
        used = ["both", "adapter-only", "task-vector-only", "cast-artifact", "neither"]
    elif has_adapter:
        used = ["adapter-only", "neither"]
    elif has_tv:
        used = ["task-vector-only", "cast-artifact", "neither"]
    else:
        used = ["neither"]
    return used + ["no-tensor"]


def _meanings(has_adapter: bool, has_tv: bool) -> dict:
    """MEANING, without naming an input that was not given (an adapter alone says nothing about changes)."""
    meaning = dict(MEANING)
    if not has_tv:
        meaning.update({"adapter-only": "targeted by the adapter", "neither": "not targeted by the adapter"})
    if not has_adapter:
        meaning.update({"task-vector-only": "changed in the task vector", "neither": "unchanged in the task vector",
                        "cast-artifact": "changed only because the base was rounded to the fine-tuned dtype, bit "
                                         "for bit"})
    if not has_adapter and not has_tv:
        meaning["neither"] = "a tensor of the model (no adapter or task vector given)"
    return meaning


def _state(targeted: bool, changed: bool, cast: bool) -> str:
    if targeted:
        return "both" if changed else "adapter-only"
    if changed:
        return "cast-artifact" if cast else "task-vector-only"
    return "neither"


def _adapter_targets(adapter_source, base: Checkpoint):
    """(base tensor name -> what of the adapter touches it, notes) from bind(): LoRA deltas, replacements, lora_B
    biases; tensors the base does not store (an untied head) go to the notes."""

    adapter = load_adapter(adapter_source)
    plan = bind(adapter, base)
    touched: dict[str, list] = {}
    for name, modules in plan.deltas.items():
        touched.setdefault(name, []).extend(f"{m.module} ({m.kind})" for m in modules)
    for name, key in plan.replacements.items():
        what = "trainable token rows" if key == TOKEN_ROWS else f"replaced by {key}"
        touched.setdefault(name, []).append(what)
    for name, m in plan.bias_additions.items():
        touched.setdefault(name, []).append(f"lora_B.bias of {m.module}")
    notes = list(plan.notes)
    for name, (source, key) in plan.new_tensors.items():
        if name not in base:
            notes.append(f"the adapter adds {name} ({'a copy of ' + key if source == 'base' else key}), which the "
                         "base does not store: it has no cell.")
    return adapter, {n: v for n, v in touched.items() if n in base}, notes


def _cast_candidates(base_dtype: torch.dtype, finetuned_code):
    """The casts that could explain a change: the recorded fine-tuned dtype, or (unrecorded) those compare tries."""

    if finetuned_code is not None:
        dtype = torch_dtype_of(finetuned_code)
        return [dtype] if dtype != base_dtype and dtype.is_floating_point else []
    if base_dtype in (torch.float32, torch.float64):
        return [d for d in (torch.float32, torch.float16, torch.bfloat16) if d != base_dtype]
    return []


def _scan(tv, base: Checkpoint, name: str, *, need_changed: bool, candidates: list):
    """Stream one tensor of the task vector against the base: (changed, cast dtype or None). Stops as soon as
    nothing more can be learned (changed known and no cast left to test)."""

    entry = base.entry(name)
    changed = False
    width = max(entry.element_size, 8)  # the float64 difference a chunk may need
    for start, stop in row_chunks(entry.shape, width, CHUNK_BYTES):
        raw = tv.read_raw(name, start, stop)
        if raw is None:
            return False, None
        if not all_finite(raw):
            raise LoratvError(f"{tv.path}: tensor '{name}' contains NaN or Inf.")
        w = base.read_rows(name, start, stop)
        if not all_finite(w):
            raise LoratvError(f"{entry.file}: tensor '{name}' contains NaN or Inf.")
        t = tv.difference(raw, w)
        changed = changed or (t is not None and bool(t.any()))
        # every chunk, changed or not, must be the cast of its base rows for the tensor to be a cast artifact
        candidates = [d for d in candidates if tv.cast_matches(raw, w, d)]
        if (changed or not need_changed) and not candidates:
            break
    cast = candidates[0] if changed and candidates else None
    return changed, cast


def _task_vector_changes(tv, base: Checkpoint, targeted, progress: bool):
    """(changed names, {name: cast dtype code}, tensors read): headers and task_vector.json where they decide,
    streamed reads where they do not."""

    names = base.names()
    records = getattr(tv, "records", None)
    known = None
    if not tv.live:
        known = ({n for n, r in records.items() if r.get("changed")} if records is not None else None)
    work = []
    for name in names:
        entry = base.entry(name)
        need_changed = known is None and tv.needs_read(name)
        may_change = need_changed or (known is not None and name in known)
        candidates = []
        if may_change and name not in targeted and entry.torch_dtype.is_floating_point:
            candidates = _cast_candidates(entry.torch_dtype, tv.finetuned_dtype(name))
        if need_changed or candidates:
            work.append((name, need_changed, candidates))
    changed = set(known or ())
    casts = {}
    total = sum(base.entry(name).nbytes for name, _, _ in work)
    with progress_bar(total, "structure", enabled=progress and bool(work)) as bar:
        for name, need_changed, candidates in work:
            is_changed, cast = _scan(tv, base, name, need_changed=need_changed, candidates=candidates)
            if need_changed and is_changed:
                changed.add(name)
            if cast is not None and name in changed:
                casts[name] = code_of(cast)
            bar.update(base.entry(name).nbytes)
    return changed, casts, len(work)


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _column_order(columns: dict) -> list:
    """Columns grouped by module kind (attention, mlp, norm, …); within a group in file order, or in natural order
    (expert 2 before expert 10) when the file merely sorts names as strings."""
    rank = {kind: i for i, kind in enumerate(KIND_ORDER)}
    groups: dict[int, list] = {}
    for name, kind in columns.items():
        groups.setdefault(rank.get(kind, len(KIND_ORDER)), []).append(name)
    ordered = []
    for _, names in sorted(groups.items()):
        ordered += sorted(names, key=_natural) if names == sorted(names) else names
    return ordered


def build_grid(tensors: list, max_global_columns: int = 16) -> dict:
    """Rows, columns and cells of the grid for tensor records (each with name, layer, column, section, state).

    Args:
        tensors: one dict per model tensor, in model order.
        max_global_columns: the most global tensors in one row when the model has no layered tensors.

    Returns:
        {"rows": [{"label", "layer", "section"}], "columns": [{"name", "kind"}],
         "cells": rows × columns of {"state", "tensor"} (and "number" for a global tensor)}; global tensors fill
        rows of their own, left to right, their spare cells of state None; each tensor record gets its "row" and
        "col" (and "number").

    Raises:
        LoratvError: naming the tensor, when two layered tensors share a layer and a column (the grid has one cell
            for both).
    """
    layered = [t for t in tensors if t["section"] == "layer"]
    columns: dict[str, str] = {}
    for t in layered:
        columns.setdefault(t["column"], module_kind(t["column"]))
    names = _column_order(columns)
    col = {c: j for j, c in enumerate(names)}
    n_cols = len(names) or min(max_global_columns, max(1, len(tensors)))
    layers = sorted({t["layer"] for t in layered})
    rows, cells = [], []

    def add_rows(count, label, section, layer=None):
        # a layer's cell without a tensor is a gap in the architecture; a global row's spare cell is just padding
        state = "no-tensor" if section == "layer" else None
        for _ in range(count):
            rows.append({"label": label, "layer": layer, "section": section})
            cells.append([{"state": state, "tensor": None} for _ in range(n_cols)])

    def place_globals(section, label):
        members = [t for t in tensors if t["section"] == section]
        start = len(rows)
        add_rows(math.ceil(len(members) / n_cols), label, section)
        for j, t in enumerate(members):
            r, c = start + j // n_cols, j % n_cols
            cells[r][c] = {"state": t["state"], "tensor": t["name"]}
            t["row"], t["col"] = r, c

    place_globals("embeddings", "embeddings")
    row_of = {}
    for layer in layers:
        row_of[layer] = len(rows)
        add_rows(1, str(layer), "layer", layer)
    for t in layered:
        r, c = row_of[t["layer"]], col[t["column"]]
        if cells[r][c]["tensor"] is not None:  # two tensors with one (layer, kind): the names decide nothing better
            raise LoratvError(f"{t['name']}: shares layer {t['layer']} and kind '{t['column']}' with "
                              f"{cells[r][c]['tensor']}; the grid cannot place both.")
        cells[r][c] = {"state": t["state"], "tensor": t["name"]}
        t["row"], t["col"] = r, c
    place_globals("global", "global")
    # names do not fit a cell: global cells are numbered in reading order (the PNG and the page name them)
    number = 0
    for r, row in enumerate(rows):
        if row["section"] != "layer":
            for cell in cells[r]:
                if cell["tensor"] is not None:
                    number += 1
                    cell["number"] = number
    for t in tensors:
        if t["section"] != "layer":
            t["number"] = cells[t["row"]][t["col"]]["number"]
    return {"rows": rows, "columns": [{"name": c, "kind": columns[c]} for c in names], "cells": cells}


def _qualify_columns(tensors: list) -> None:
    """Layered tensors under two prefixes (a text and a vision tower) would share columns: keep the prefix then."""
    prefixes = {_layer_prefix(t["name"]) for t in tensors if t["section"] == "layer"}
    if len(prefixes) > 1:
        for t in tensors:
            if t["section"] == "layer":
                t["column"] = f"{_layer_prefix(t['name'])}.*.{t['column']}"


def _layer_prefix(name: str) -> str:
    """The part of a layered tensor's name before its layer index (`model.layers`)."""
    m = LAYER.search(name)
    assert m is not None  # section "layer" means LAYER matched (_split)
    return name[:m.start()]


def model_structure(model, *, adapter=None, task_vector=None, finetuned=None, progress: bool = False) -> dict:
    """The structure record: every tensor of `model` with its state, and the grid they form.

    Args:
        model: the base model (folder, .safetensors/.bin file or hub id).
        adapter: a PEFT (or kohya/diffusers) adapter for `model`; its targets come from bind().
        task_vector: a folder or file written by `loratv extract` (exclusive with `finetuned`).
        finetuned: a fine-tuned model; every tensor is compared with the base, streamed.
        progress: show a progress bar while tensors are read.

    Returns:
        A dict of schema `loratv.structure` (docs/structure.md): inputs, states with meanings, rows, columns,
        cells, counts, per-tensor records, how many tensors were read, notes.

    Raises:
        LoratvError: an input is missing or malformed, belongs to another model, or holds NaN/Inf.
    """

    if task_vector is not None and finetuned is not None:
        raise LoratvError(f"{finetuned}: give a task vector or a fine-tuned model, not both.")
    base = Checkpoint(model, label=f"model {model}")
    notes = []
    targets = {}
    if adapter is not None:
        _, targets, adapter_notes = _adapter_targets(adapter, base)
        notes += adapter_notes
    tv: StoredTaskVector | LiveTaskVector | None = None
    if task_vector is not None:
        tv = StoredTaskVector(task_vector)
        tv.check_against(base)
    elif finetuned is not None:
        tv = LiveTaskVector(finetuned, base)
    changed, casts, read = (set(), {}, 0) if tv is None else _task_vector_changes(tv, base, targets, progress)
    if isinstance(tv, StoredTaskVector) and tv.records is None:  # the one kind with live False
        notes.append(f"{tv.path}: no task_vector.json beside it; the changed tensors were found by reading the "
                     "stored ones, and casts to fp32, fp16 and bf16 were tried.")
    tensors = []
    for name, entry in base.entries.items():
        layer, column, section = _split(name)
        targeted, is_changed = name in targets, name in changed
        record = {
            "name": name, "layer": layer, "column": column, "section": section, "kind": module_kind(name),
            "shape": list(entry.shape), "parameters": entry.numel, "dtype": entry.dtype,
            "finetuned_dtype": tv.finetuned_dtype(name) if tv is not None else None,
            "targeted": targeted, "changed": is_changed, "cast_dtype": casts.get(name),
            "state": _state(targeted, is_changed, name in casts),
            "adapter": targets.get(name, []),
        }
        tensors.append(record)
    _qualify_columns(tensors)
    grid = build_grid(tensors)
    used = _states_used(adapter is not None, tv is not None)
    meaning = _meanings(adapter is not None, tv is not None)
    counts = {s: 0 for s in STATES}
    for row in grid["cells"]:
        for cell in row:
            if cell["state"] is not None:
                counts[cell["state"]] += 1
    if casts:
        dtypes = ", ".join(sorted(set(casts.values())))
        notes.append(f"{len(casts)} untargeted tensors changed only because the fine-tuned model stores them as "
                     f"{dtypes}: each equals the base cast to that dtype, bit for bit.")
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "inputs": {"model": str(model), "adapter": None if adapter is None else str(adapter),
                   "task_vector": None if task_vector is None else str(task_vector),
                   "finetuned": None if finetuned is None else str(finetuned)},
        "model_type": (base.config or {}).get("model_type"),
        "states": [{"state": s, "meaning": meaning[s], "count": counts[s]} for s in used],
        "counts": counts,
        "tensor_counts": {s: counts[s] for s in STATES if s != "no-tensor"},
        "total_tensors": len(tensors),
        "layers": len([r for r in grid["rows"] if r["section"] == "layer"]),
        "tensors_read": read,
        "rows": grid["rows"],
        "columns": grid["columns"],
        "cells": grid["cells"],
        "tensors": tensors,
        "notes": notes,
    }


def write_structure(out, model, *, adapter=None, task_vector=None, finetuned=None, force: bool = False,
                    progress: bool = False) -> dict:
    """Write OUT/model_structure.json, .png and .html (all or nothing) and return the record.

    Args:
        out: the output folder (refused if it exists, unless force; never inside an input).
        model, adapter, task_vector, finetuned, progress: as for model_structure().
        force: replace an existing output folder.

    Returns:
        The record written to model_structure.json.

    Raises:
        LoratvError: bad input (see model_structure) or an output that cannot be written.
    """

    inputs = guarded_inputs([model, adapter, task_vector, finetuned])
    check_output(out, inputs, force=force)  # refuse a bad output before reading a large model
    record = finite(model_structure(model, adapter=adapter, task_vector=task_vector, finetuned=finetuned,
                                    progress=progress))
    with atomic_output_dir(out, inputs, force=force) as tmp:
        write_json(record, tmp / JSON_FILE)
        structure_plot(record, tmp / PNG_FILE)
        page = render_structure_page(record, (tmp / PNG_FILE).read_bytes())
        (tmp / HTML_FILE).write_text(page, encoding="utf-8")
    return record


def render_summary(record: dict) -> str:
    """A few lines for the terminal: the grid's size and the count of each state.

    Args:
        record: a `loratv.structure` record (model_structure()).

    Returns:
        The summary text, without a trailing newline.
    """
    inputs = record["inputs"]
    words = {"adapter": "adapter", "task_vector": "task vector", "finetuned": "fine-tuned"}
    given = [f"{words[k]} {v}" for k, v in inputs.items() if v is not None and k != "model"]
    lines = [f"model {inputs['model']}: {record['total_tensors']} tensors, {record['layers']} layers x "
             f"{len(record['columns'])} module kinds" + (f"; {', '.join(given)}" if given else "")]
    width = max(len(s["state"]) for s in record["states"])
    for s in record["states"]:
        what = "cells" if s["state"] == "no-tensor" else "tensors"
        lines.append(f"  {s['state']:<{width}} {s['count']:>6} {what}: {s['meaning']}")
    read, total = record["tensors_read"], record["total_tensors"]
    source = f"headers{' and task_vector.json' if inputs['task_vector'] else ''}"
    rest = "" if read == total else f" (all decided from {source})" if read == 0 else \
        f" (the rest decided from {source})"
    lines.append(f"tensors read: {read} of {total}{rest}")
    for note in record["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


