"""`loratv summarize`: what a task vector T = fine-tuned − base holds, with no adapter.

Counts of tensors and parameters (changed, stored, the model's total), dtypes and storage facts, Frobenius norms
and max |T| per tensor, layer, kind and module group, sparsity, the largest changes and (with `spectrum=True`) the
singular values and ranks of every changed matrix. T is a stored task vector (`loratv extract`) or computed on the
fly from two models (task_vector_input.py). Streaming: one row chunk at a time, norms in float64; only a matrix whose
spectrum is wanted is held whole (in float64), one at a time. The record (schema `loratv.task_vector_summary`,
docs/summarize-and-diff.md) is what the text report is rendered from.
"""

import math
from collections import Counter
from pathlib import Path

import torch

from loratv.common.dtypes import all_finite, torch_dtype_of
from loratv.common.streaming import row_chunks
from loratv.errors import BadInputError, LoratvError, param
from loratv.io import safe_json
from loratv.io.hub import available_locally
from loratv.io.outputs import atomic_output_dir, guarded_inputs
from loratv.numerics.precision import FORMATS, merge_error_bound, unit_roundoff
from loratv.ops.extract import REPORT_FILE as EXTRACT_REPORT
from loratv.ops.extract import SCHEMA as EXTRACT_SCHEMA
from loratv.ops.task_vector_input import StoredTaskVector, open_task_vector, tensor_names
from loratv.ops.task_vector_spectrum import EXACT_SVD_MAX_DIM, RANDOMIZED_K, RANK_RULES, matrix_spectrum
from loratv.ops.tensor_groups import group_rows, place
from loratv.report.changes_text import render_summary_text
from loratv.report.records import finite, write_json
from loratv.version import __version__

SCHEMA = "loratv.task_vector_summary"
SCHEMA_VERSION = 1
RESULTS_FILE = "task_vector_summary.json"
REPORT_FILE = "task_vector_summary.txt"
DEFAULT_TOP = 10
CHUNK_BYTES = 32 << 20  # of float64 work per row chunk
class _Tensor:
    """Per-tensor accumulators, filled one row chunk at a time."""

    def __init__(self, name, shape, base_dtype, finetuned_dtype, stored_dtype, stored, record) -> None:
        self.name = name
        self.shape = tuple(shape)
        self.base_dtype = base_dtype
        self.finetuned_dtype = finetuned_dtype
        self.stored_dtype = stored_dtype
        self.stored = stored
        self.record_entry = record  # the task_vector.json entry, or None
        self.nonzero = 0
        self.sumsq = 0.0
        self.max_abs = 0.0
        self.base_sumsq: float | None = None
        self.spectrum: dict | None = None

    @property
    def parameters(self) -> int:
        return math.prod(self.shape)

    def record(self) -> dict:
        layer, kind, group = place(self.name)
        norm = math.sqrt(self.sumsq)
        base_norm = None if self.base_sumsq is None else math.sqrt(self.base_sumsq)
        rec = self.record_entry or {}
        return {
            "name": self.name,
            "shape": list(self.shape),
            "parameters": self.parameters,
            "layer": layer,
            "kind": kind,
            "group": group,
            "base_dtype": self.base_dtype,
            "finetuned_dtype": self.finetuned_dtype,
            "stored": self.stored,
            "stored_dtype": self.stored_dtype,
            "rounded_elements": _int_or_none(rec.get("rounded_elements")),
            "stored_exactly": rec.get("stored_exactly") if isinstance(rec.get("stored_exactly"), bool) else None,
            "changed": self.nonzero > 0,
            "nonzero": self.nonzero,
            "zero_fraction": 1 - self.nonzero / self.parameters if self.parameters else None,
            "l2_norm": norm,
            "max_abs": self.max_abs,
            "base_norm": base_norm,
            "relative_change": norm / base_norm if base_norm else None,
            "spectrum": self.spectrum,
        }


def _int_or_none(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_extract_report(tv) -> dict | None:
    """The task_vector.json beside a stored task vector (already validated by StoredTaskVector), else None."""
    if tv.live or tv.records is None:
        return None
    data = safe_json.read(tv.path.parent / EXTRACT_REPORT)
    return data if isinstance(data, dict) and data.get("schema") == EXTRACT_SCHEMA else None


def _check_records(tv) -> None:
    """A tensor that task_vector.json says changed must be in the file (else T would silently read as zero)."""
    for name, rec in (tv.records or {}).items():
        if not isinstance(rec, dict):
            raise LoratvError(f"{tv.path.parent / EXTRACT_REPORT}: the record of tensor '{name}' is not an object.")
        if rec.get("changed") and name not in tv.tensors:
            raise LoratvError(f"{tv.path}: tensor '{name}' changed (by {EXTRACT_REPORT}) but is not stored in the file.")


def _describe(tv, base, name) -> _Tensor:
    """Shape and dtypes of one tensor from the base, the task vector file or its record, whichever is at hand."""
    rec = (getattr(tv, "records", None) or {}).get(name)
    stored = None if tv.live else name in tv.tensors
    if base is not None:
        shape, base_dtype = base.entry(name).shape, base.entry(name).dtype
    elif stored:
        shape, base_dtype = tv.tensors.entry(name).shape, (rec or {}).get("base_dtype")
    else:
        shape, base_dtype = (rec or {}).get("shape"), (rec or {}).get("base_dtype")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise LoratvError(f"{tv.path.parent / EXTRACT_REPORT}: tensor '{name}' has no valid shape.")
    stored_dtype = tv.tensors.entry(name).dtype if stored else None
    return _Tensor(name, shape, base_dtype if isinstance(base_dtype, str) else None, tv.finetuned_dtype(name),
                   stored_dtype, stored, rec)


def _float_format(code: str | None) -> torch.dtype | None:
    """The torch dtype of a float code that precision.py has a format for (ulps, roundoff), else None."""
    if not isinstance(code, str):
        return None
    try:
        dtype = torch_dtype_of(code)
    except KeyError:
        return None
    return dtype if dtype in FORMATS else None


def _measure(tv, base, row: _Tensor, want_spectrum: bool):
    """Stream one tensor: accumulate its counts and norms; returns (T whole in float64 or None, φ² or None) when its
    spectrum is wanted (a changed 2-D tensor), else (None, None)."""
    name = row.name
    read_t = tv.needs_read(name)
    if not read_t and base is None:
        return None, None  # not stored and no base: T = 0 and nothing to read
    keep = want_spectrum and len(row.shape) == 2 and read_t
    base_dtype = _float_format(row.base_dtype) if base is not None else None
    ft_dtype = _float_format(row.finetuned_dtype or row.base_dtype) if base is not None else None
    with_floor = keep and base_dtype is not None and ft_dtype is not None
    t_rounding = tv.storage_rounding(name) if with_floor else None
    full, floor_sq = None, 0.0
    if base is not None:
        row.base_sumsq = 0.0
    for start, stop in row_chunks(row.shape, 8, CHUNK_BYTES):
        raw = tv.read_raw(name, start, stop) if read_t else None
        if raw is not None and not all_finite(raw):
            where = tv.finetuned.entry(name).file if tv.live else tv.path
            raise LoratvError(f"{where}: tensor '{name}' contains NaN or Inf.")
        w = base.read_rows(name, start, stop) if base is not None else None
        w64 = None
        if w is not None:
            if not all_finite(w):
                raise LoratvError(f"{base.entry(name).file}: tensor '{name}' contains NaN or Inf.")
            w64 = w.to(torch.float64)
            assert row.base_sumsq is not None  # set to 0.0 above: there is a base
            row.base_sumsq += float(torch.dot(w64.reshape(-1), w64.reshape(-1)))
        t = tv.difference(raw, w, w64) if raw is not None else None
        if t is not None:
            flat = t.reshape(-1)
            nonzero = int(torch.count_nonzero(flat))
            if nonzero:
                row.nonzero += nonzero
                row.sumsq += float(torch.dot(flat, flat))
                row.max_abs = max(row.max_abs, float(flat.abs().max()))
        if keep:
            if full is None:
                full = torch.zeros(row.shape, dtype=torch.float64)
            if t is not None:
                full[start:stop] = t
        if with_floor:
            assert w64 is not None and base_dtype is not None and ft_dtype is not None  # a base, both formats known
            # F as stored: read (live), or W + T rounded once to the fine-tuned dtype (as analyze does)
            f = raw if tv.live else (w64 if t is None else w64 + t).to(ft_dtype)
            assert f is not None  # with_floor implies keep, which implies read_t
            bound = merge_error_bound(w64, f.to(torch.float64), torch.zeros_like(w64), additions=0, k=2,
                                      base_dtype=base_dtype, out_dtype=ft_dtype)
            if t_rounding is not None and t is not None:
                bound.add_(t.abs().mul_(unit_roundoff(t_rounding)))
            floor_sq += float((bound * bound).sum())
    if not keep or row.nonzero == 0:
        return None, None
    return full, (floor_sq if with_floor else None)


def summarize_task_vector(task_vector=None, *, base=None, finetuned=None, spectrum: bool = False,
                          top: int = DEFAULT_TOP, command: str | None = None) -> dict:
    """The summary record of a task vector, streamed tensor by tensor.

    Args:
        task_vector: a folder or `.safetensors` file written by `loratv extract` (or None with `finetuned`).
        base: the base model; optional with a stored task vector (then relative changes, the model's totals and the
            rounding floor become available), required with `finetuned`.
        finetuned: the fine-tuned model: T = finetuned − base computed on the fly.
        spectrum: also record singular values and ranks of every changed 2-D tensor.
        top: how many of the largest changes to list.
        command: the command line, recorded for reproduction.

    Returns:
        The record (schema `loratv.task_vector_summary`, docs/summarize-and-diff.md).

    Raises:
        LoratvError: missing or unreadable input, a task vector of another model (names or shapes), NaN or Inf,
            an inconsistent task_vector.json, or top < 1.
    """
    if top < 1:
        raise BadInputError(f"{param('top', top)}: give a positive number of tensors to list.")
    base_note = None
    if base is None and task_vector is not None and finetuned is None:
        # the base the task vector records, when it is still here (never a download): relative changes need it
        recorded = _recorded_base(task_vector)
        if available_locally(recorded):
            base, base_note = recorded, f"base taken from the task vector's record: {recorded}"
    base_ckpt, tv = open_task_vector(base, task_vector=task_vector, finetuned=finetuned)
    if not tv.live:
        _check_records(tv)
    rows = []
    for name in tensor_names(base_ckpt, tv):
        row = _describe(tv, base_ckpt, name)
        full, floor_sq = _measure(tv, base_ckpt, row, spectrum)
        if full is not None:
            eps_dtype = _float_format(row.finetuned_dtype) or _float_format(row.stored_dtype) or torch.float64
            row.spectrum = matrix_spectrum(full, floor=None if floor_sq is None else math.sqrt(floor_sq),
                                           eps_dtype=eps_dtype)
        rows.append(row)
    record = _build_record(base_ckpt, tv, rows, spectrum=spectrum, top=top, command=command)
    if base_note:
        record["notes"].insert(0, base_note)
    return record


def _recorded_base(task_vector) -> str | None:

    try:
        return StoredTaskVector(task_vector).recorded_base
    except LoratvError:
        return None


def _sum_group(acc: dict, t: dict) -> None:
    acc["tensors"] += 1
    acc["changed_tensors"] += t["changed"]
    acc["parameters"] += t["parameters"]
    acc["changed_elements"] += t["nonzero"]
    acc["sumsq"] += t["l2_norm"] ** 2
    acc["max_abs"] = max(acc["max_abs"], t["max_abs"])
    if t["base_norm"] is not None:
        acc["base_sumsq"] = (acc["base_sumsq"] or 0.0) + t["base_norm"] ** 2


def _groups(tensors: list, key: str) -> list:
    start = lambda: {"tensors": 0, "changed_tensors": 0, "parameters": 0, "changed_elements": 0,  # noqa: E731
                     "sumsq": 0.0, "max_abs": 0.0, "base_sumsq": None}
    out = []
    for g in group_rows(tensors, key, _sum_group, start):
        norm, base_sumsq = math.sqrt(g.pop("sumsq")), g.pop("base_sumsq")
        g["l2_norm"] = norm
        g["base_norm"] = None if base_sumsq is None else math.sqrt(base_sumsq)
        g["relative_change"] = norm / g["base_norm"] if g["base_norm"] else None
        g["zero_fraction"] = 1 - g["changed_elements"] / g["parameters"] if g["parameters"] else None
        out.append(g)
    return out


def _largest(tensors: list, key: str, top: int) -> list:
    fields = ("name", "shape", "layer", "kind", "l2_norm", "max_abs", "relative_change", "nonzero", "parameters")
    ranked = sorted((t for t in tensors if t["changed"] and t[key] is not None), key=lambda t: -t[key])
    return [{f: t[f] for f in fields} for t in ranked[:top]]


def _storage(tv, tensors: list, report: dict | None, total_tensors: int | None) -> dict:
    if tv.live:
        return {"layout": "computed", "file": None, "file_bytes": None, "tensor_bytes": None, "dtypes": {},
                "metadata": {}, "rounded_elements": 0, "rounded_tensors": 0, "inexact_subtractions": None,
                "recorded": None}
    entries = [tv.tensors.entry(n) for n in tv.tensors.names()]
    records = [t for t in (tv.records or {}).values() if isinstance(t, dict)]
    recorded_dense = report.get("dense") if report else None
    if isinstance(recorded_dense, bool):
        layout = "dense" if recorded_dense else "sparse"
    elif total_tensors is not None:
        layout = "dense" if len(entries) == total_tensors else "sparse"
    else:
        layout = "unknown"
    rounded = [_int_or_none(r.get("rounded_elements")) for r in records]
    inexact = [_int_or_none(r.get("inexact_subtractions")) for r in records]
    keys = ("base", "finetuned", "storage_dtype", "dense", "subtraction", "total_tensors", "changed_tensors",
            "stored_tensors", "total_parameters", "changed_parameters", "changed_elements", "storage_rounded_tensors",
            "loratv_version")
    metadata = tv.tensors.file_metadata.get(tv.path, {})
    return {
        "layout": layout,
        "file": str(tv.path),
        "file_bytes": tv.path.stat().st_size,
        "tensor_bytes": sum(e.nbytes for e in entries),
        "dtypes": dict(Counter(e.dtype for e in entries)),
        "metadata": {k: v for k, v in metadata.items() if isinstance(v, str)},
        "rounded_elements": sum(r for r in rounded if r) if records else None,
        "rounded_tensors": sum(1 for r in rounded if r) if records else None,
        "inexact_subtractions": sum(r for r in inexact if r) if records else None,
        "recorded": {k: report.get(k) for k in keys} if report else None,
    }


def _notes(base, tv, tensors, report) -> list:
    notes = []
    if base is None:
        notes.append("no base given: relative changes ‖T‖/‖W‖ and the rounding floor of --spectrum need --base "
                     "(ranks use numpy's matrix_rank default tolerance instead).")
    if tv.live:
        notes.append("computed on the fly as fine-tuned − base in float64 (exact for inputs of at most 24 "
                     "significant bits unless their exponents differ by more than 29).")
    mismatched = [t for t in tensors if t["stored"] and isinstance((tv.records or {}).get(t["name"]), dict)
                  and _int_or_none(tv.records[t["name"]].get("nonzero")) not in (None, t["nonzero"])]
    if mismatched:
        first = mismatched[0]
        notes.append(f"{len(mismatched)} stored tensors hold a different number of nonzero elements than "
                     f"{EXTRACT_REPORT} records (first: '{first['name']}', {first['nonzero']} in the file).")
    recorded_base = report.get("base") if report else None
    if base is not None and recorded_base and str(Path(str(recorded_base))) != str(Path(base.source)):
        notes.append(f"{EXTRACT_REPORT} names base {recorded_base}; --base {base.source} was given (names and "
                     "shapes match).")
    return notes


def _build_record(base, tv, rows, *, spectrum: bool, top: int, command: str | None) -> dict:
    tensors = [r.record() for r in rows]
    report = _read_extract_report(tv)
    known = base is not None or tv.live or bool(getattr(tv, "records", None))
    total_tensors = len(tensors) if known else None
    total_parameters = sum(t["parameters"] for t in tensors) if known else None
    changed = [t for t in tensors if t["changed"]]
    stored = None if tv.live else [t for t in tensors if t["stored"]]
    changed_elements = sum(t["nonzero"] for t in tensors)
    stored_parameters = None if stored is None else sum(t["parameters"] for t in stored)
    sumsq = sum(t["l2_norm"] ** 2 for t in tensors)
    base_sumsq = sum(t["base_norm"] ** 2 for t in tensors) if base is not None else None
    in_changed = sum(t["parameters"] for t in changed)
    spectra = [t["spectrum"] for t in tensors if t["spectrum"]]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "command": command,
        "inputs": {
            "task_vector": None if tv.live else tv.source,
            "base": None if base is None else str(base.source),
            "finetuned": str(tv.finetuned.source) if tv.live else None,
            "source": "computed" if tv.live else "stored",
        },
        "counts": {
            "tensors": {"total": total_tensors, "stored": None if stored is None else len(stored),
                        "changed": len(changed)},
            "parameters": {"total": total_parameters, "stored": stored_parameters, "in_changed_tensors": in_changed,
                           "changed_elements": changed_elements},
        },
        "dtypes": {
            "base": dict(Counter(t["base_dtype"] for t in tensors if t["base_dtype"])),
            "finetuned": dict(Counter(t["finetuned_dtype"] for t in tensors if t["finetuned_dtype"])),
            "stored": dict(Counter(t["stored_dtype"] for t in tensors if t["stored_dtype"])),
        },
        "storage": _storage(tv, tensors, report, total_tensors),
        "norms": {
            "l2_norm": math.sqrt(sumsq),
            "max_abs": max((t["max_abs"] for t in tensors), default=0.0),
            "base_norm": None if base_sumsq is None else math.sqrt(base_sumsq),
            "relative_change": math.sqrt(sumsq / base_sumsq) if base_sumsq else None,
        },
        "sparsity": {
            "zero_fraction_of_model": 1 - changed_elements / total_parameters if total_parameters else None,
            "zero_fraction_of_stored": (1 - sum(t["nonzero"] for t in stored) / stored_parameters
                                        if stored is not None and stored_parameters else None),
            "zero_fraction_of_changed_tensors": 1 - changed_elements / in_changed if in_changed else None,
        },
        "layers": _groups(tensors, "layer"),
        "kinds": _groups(tensors, "kind"),
        "groups": _groups(tensors, "group"),
        "largest": {
            "top": top,
            "by_norm": _largest(tensors, "l2_norm", top),
            "by_relative_change": _largest(tensors, "relative_change", top) if base is not None else None,
        },
        "spectrum": None if not spectrum else {
            "tensors": len(spectra),
            "rules": {rule: RANK_RULES[rule] for rule in sorted({s["rank_rule"] for s in spectra})},
            "svd": f"exact when min(m, n) ≤ {EXACT_SVD_MAX_DIM}, else randomized ({RANDOMIZED_K} leading values)",
        },
        "notes": _notes(base, tv, tensors, report),
        "tensors": tensors,
    }


def write_summary(out, *, force: bool = False, **kwargs) -> dict:
    """summarize_task_vector(**kwargs) written as OUT/task_vector_summary.json and .txt, which appear only complete.

    Args:
        out: the output folder (it must not overlap an input).
        force: replace an existing output folder.
        **kwargs: passed to summarize_task_vector.

    Returns:
        The record.

    Raises:
        LoratvError: as summarize_task_vector, or an output that exists (without force) or overlaps an input.
    """

    given = (kwargs.get(k) for k in ("task_vector", "base", "finetuned"))
    existing = guarded_inputs(given)
    with atomic_output_dir(out, existing, force=force) as tmp:
        record = finite(summarize_task_vector(**kwargs))
        write_json(record, tmp / RESULTS_FILE)
        (tmp / REPORT_FILE).write_text(render_summary_text(record), encoding="utf-8")
    return record
