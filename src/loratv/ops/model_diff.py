"""`loratv diff`: base vs fine-tuned with no adapter — which tensors changed, which only changed dtype, and by how much.

Every tensor name of either model gets one category:
- `changed`: a real change of value;
- `cast-artifact`: the fine-tuned tensor is the base cast to the fine-tuned dtype, bit for bit (rounding, not
  training; precision.equals_cast, the test compare uses);
- `unchanged`: every value equal (a lossless dtype change included, flagged `dtype_changed`);
- `only-in-base`, `only-in-finetuned`, `shape-mismatch`: nothing to subtract.
Per tensor with a difference: max |Δ| and its element, ‖Δ‖_F / ‖W‖_F, the number of elements changed, the largest
change in ulps of the base weight. Streaming: one row chunk of one tensor of each model at a time, in float64.
"""

import math
from collections import Counter
from dataclasses import dataclass

import torch

from loratv.common.dtypes import all_finite
from loratv.common.streaming import row_chunks
from loratv.errors import BadInputError, LoratvError, param
from loratv.io.checkpoint import Checkpoint
from loratv.io.outputs import atomic_output_dir, guarded_inputs
from loratv.numerics.precision import FORMATS, bits_equal, equals_cast, ulp
from loratv.ops.tensor_groups import group_rows, place
from loratv.report.changes_text import render_diff_text
from loratv.report.records import finite, write_json
from loratv.version import __version__

SCHEMA = "loratv.parameter_changes"
SCHEMA_VERSION = 1
RESULTS_FILE = "parameter_changes.json"
REPORT_FILE = "parameter_changes.txt"
CATEGORIES = ("changed", "cast-artifact", "unchanged", "only-in-base", "only-in-finetuned", "shape-mismatch")
DEFAULT_TOP = 10
CHUNK_BYTES = 32 << 20  # of float64 work per row chunk


@dataclass
class TensorChange:
    """One tensor's comparison, accumulated one row chunk at a time."""

    name: str
    base_shape: tuple | None
    finetuned_shape: tuple | None
    base_dtype: str | None
    finetuned_dtype: str | None
    category: str = "unchanged"
    changed_elements: int = 0
    change_sumsq: float = 0.0
    base_sumsq: float = 0.0
    max_abs_change: float = 0.0
    worst_index: int | None = None  # flat index of the largest |Δ|
    worst_base: float | None = None
    worst_finetuned: float | None = None
    worst_change: float | None = None
    worst_ulps: float | None = None
    max_change_ulps: float | None = None
    cast_only: bool = True  # every chunk with a difference is the base cast to the fine-tuned dtype

    @property
    def parameters(self) -> int:
        """The tensor's element count (of the base's shape, else the fine-tuned one's)."""
        return math.prod(self._shape())

    def _shape(self) -> tuple:
        shape = self.base_shape if self.base_shape is not None else self.finetuned_shape
        assert shape is not None  # a tensor is in at least one of the models
        return shape

    def record(self) -> dict:
        """The tensor's entry in parameter_changes.json.

        Returns:
            Name, category, layer, kind and group, shapes, dtypes, and, for a compared tensor (changed,
            cast-artifact or unchanged), the changed elements, max |Δ|, norms, relative change, the largest change in
            ulps and the worst element (None otherwise).
        """
        layer, kind, group = place(self.name)
        compared = self.category in ("changed", "cast-artifact", "unchanged")
        base_norm = math.sqrt(self.base_sumsq) if compared else None
        change_norm = math.sqrt(self.change_sumsq) if compared else None
        worst = None
        if self.worst_index is not None:
            worst = {"index": list(_unravel(self.worst_index, self.base_shape)), "base": self.worst_base,
                     "finetuned": self.worst_finetuned, "change": self.worst_change,
                     "ulps": self.worst_ulps}
        return {
            "name": self.name,
            "category": self.category,
            "layer": layer,
            "kind": kind,
            "group": group,
            "shape": list(self._shape()),
            "base_shape": None if self.base_shape is None else list(self.base_shape),
            "finetuned_shape": None if self.finetuned_shape is None else list(self.finetuned_shape),
            "parameters": self.parameters,
            "base_dtype": self.base_dtype,
            "finetuned_dtype": self.finetuned_dtype,
            "dtype_changed": None if not compared else self.base_dtype != self.finetuned_dtype,
            "changed_elements": self.changed_elements if compared else None,
            "max_abs_change": self.max_abs_change if compared else None,
            "change_norm": change_norm,
            "base_norm": base_norm,
            "relative_change": change_norm / base_norm if change_norm is not None and base_norm else None,  # compared
            "max_change_ulps": self.max_change_ulps,
            "worst_element": worst,
        }


def _unravel(flat: int, shape) -> tuple:
    out = []
    for dim in reversed(shape):
        out.append(flat % dim)
        flat //= dim
    return tuple(reversed(out))


def _difference(b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """f − b in float64 (integers subtracted as int64 first, so that large ids stay exact)."""
    if not (b.is_floating_point() or f.is_floating_point()):
        return (f.to(torch.int64) - b.to(torch.int64)).to(torch.float64)
    return f.to(torch.float64) - b.to(torch.float64)


def _compare_tensor(base: Checkpoint, ft: Checkpoint, stats: TensorChange) -> None:
    """Stream one tensor present in both models with the same shape; fills `stats` and sets its category."""
    name = stats.name
    shape = stats.base_shape
    assert shape is not None  # in both models
    row_len = math.prod(shape[1:]) if len(shape) > 1 else 1
    base_format = base.entry(name).torch_dtype
    ulp_dtype = base_format if base_format in FORMATS else None
    if ulp_dtype is not None:
        stats.max_change_ulps = 0.0
    for start, stop in row_chunks(shape, 8, CHUNK_BYTES):
        b, f = base.read_rows(name, start, stop), ft.read_rows(name, start, stop)
        if not all_finite(b):
            raise LoratvError(f"{base.entry(name).file}: tensor '{name}' contains NaN or Inf.")
        if not all_finite(f):
            raise LoratvError(f"{ft.entry(name).file}: tensor '{name}' contains NaN or Inf.")
        b64 = b.to(torch.float64).reshape(-1)
        stats.base_sumsq += float(torch.dot(b64, b64))
        if bits_equal(b, f):  # the common case, at memcmp speed
            continue
        d = _difference(b, f).reshape(-1)
        nonzero = int(torch.count_nonzero(d))
        if nonzero == 0:  # −0 vs +0, or a lossless dtype change
            continue
        stats.changed_elements += nonzero
        stats.change_sumsq += float(torch.dot(d, d))
        # the cast test on the chunk itself (casts are elementwise, so all chunks pass iff the tensor does)
        stats.cast_only = stats.cast_only and f.dtype != b.dtype and equals_cast(f, b)
        magnitude = d.abs()
        i = int(torch.argmax(magnitude))
        ulps = None
        if ulp_dtype is not None:
            # ulps of the base weight: its own spacing in its own dtype, per element
            in_ulps = magnitude / ulp(b64, ulp_dtype)
            assert stats.max_change_ulps is not None  # set to 0.0 above
            stats.max_change_ulps = max(stats.max_change_ulps, float(in_ulps.max()))
            ulps = float(in_ulps[i])
        if float(magnitude[i]) > stats.max_abs_change:
            stats.max_abs_change = float(magnitude[i])
            stats.worst_index = start * row_len + i
            stats.worst_base = float(b64[i])
            stats.worst_finetuned = float(f.reshape(-1)[i].to(torch.float64))
            stats.worst_change = float(d[i])
            stats.worst_ulps = ulps
    if stats.changed_elements == 0:
        stats.category = "unchanged"
    elif stats.cast_only:
        stats.category = "cast-artifact"
    else:
        stats.category = "changed"


def _count_group(acc: dict, t: dict) -> None:
    acc["tensors"] += 1
    acc["parameters"] += t["parameters"]
    acc["by_category"][t["category"]] += 1


def _groups(tensors: list, key: str) -> list:
    out = group_rows(tensors, key, _count_group,
                     lambda: {"tensors": 0, "parameters": 0, "by_category": dict.fromkeys(CATEGORIES, 0)})
    return out


def _largest(tensors: list, key: str, top: int) -> list:
    fields = ("name", "shape", "base_dtype", "finetuned_dtype", "max_abs_change", "relative_change", "change_norm",
              "changed_elements", "parameters", "max_change_ulps")
    ranked = sorted((t for t in tensors if t["category"] == "changed" and t[key] is not None), key=lambda t: -t[key])
    return [{f: t[f] for f in fields} for t in ranked[:top]]


def diff_models(base_source, finetuned_source, *, top: int = DEFAULT_TOP, command: str | None = None) -> dict:
    """Compare two models tensor by tensor with no adapter.

    Args:
        base_source: the base model (folder, `.safetensors`/`.bin` file or hub id).
        finetuned_source: the fine-tuned model.
        top: how many of the largest changes to list.
        command: the command line, recorded for reproduction.

    Returns:
        The record (schema `loratv.parameter_changes`, docs/summarize-and-diff.md).

    Raises:
        LoratvError: a missing or unreadable model, NaN or Inf in a tensor, or top < 1.
    """
    if top < 1:
        raise BadInputError(f"{param('top', top)}: give a positive number of tensors to list.")
    base = Checkpoint(base_source, label=f"base {base_source}")
    ft = Checkpoint(finetuned_source, label=f"fine-tuned model {finetuned_source}")
    rows = []
    for name in base.names() + [n for n in ft.names() if n not in base]:
        be = base.entries.get(name)
        fe = ft.entries.get(name)
        stats = TensorChange(name, be.shape if be else None, fe.shape if fe else None, be.dtype if be else None,
                             fe.dtype if fe else None)
        if fe is None:
            stats.category = "only-in-base"
        elif be is None:
            stats.category = "only-in-finetuned"
        elif tuple(be.shape) != tuple(fe.shape):
            stats.category = "shape-mismatch"
        else:
            _compare_tensor(base, ft, stats)
        rows.append(stats)
    return _build_record(base, ft, [r.record() for r in rows], top=top, command=command)


def _notes(tensors: list, by: dict) -> list:
    notes = []
    casts = Counter(t["finetuned_dtype"] for t in tensors if t["category"] == "cast-artifact")
    if casts:
        which = ", ".join(f"{dtype} ({n})" for dtype, n in sorted(casts.items()))
        notes.append(f"{by['cast-artifact']} tensors changed only because the fine-tuned model stores them as "
                     f"{which}: each equals the base cast to that dtype, bit for bit (rounding, not training).")
    lossless = sum(1 for t in tensors if t["category"] == "unchanged" and t["dtype_changed"])
    if lossless:
        notes.append(f"{lossless} unchanged tensors are stored in another dtype whose values equal the base's exactly.")
    mismatched = by["only-in-base"] + by["only-in-finetuned"] + by["shape-mismatch"]
    if mismatched:
        notes.append(f"{mismatched} tensors could not be compared (present in one model only, or of another shape): "
                     "the two models may not share an architecture.")
    return notes


def _build_record(base, ft, tensors: list, *, top: int, command: str | None) -> dict:
    by = dict.fromkeys(CATEGORIES, 0)
    for t in tensors:
        by[t["category"]] += 1
    compared = [t for t in tensors if t["changed_elements"] is not None]
    real = [t for t in tensors if t["category"] == "changed"]
    ulps = [t["max_change_ulps"] for t in real if t["max_change_ulps"] is not None]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "command": command,
        "inputs": {"base": str(base.source), "finetuned": str(ft.source)},
        "categories": list(CATEGORIES),
        "summary": {
            "tensors": len(tensors),
            "by_category": by,
            "parameters": {
                "base": base.total_parameters(),
                "finetuned": ft.total_parameters(),
                "in_changed_tensors": sum(t["parameters"] for t in real),
                "changed_elements": sum(t["changed_elements"] for t in real),
                "cast_artifact_elements": sum(t["changed_elements"] for t in tensors if t["category"] == "cast-artifact"),
            },
            "dtypes": {
                "base": dict(Counter(t["base_dtype"] for t in tensors if t["base_dtype"])),
                "finetuned": dict(Counter(t["finetuned_dtype"] for t in tensors if t["finetuned_dtype"])),
            },
            "max_abs_change": max((t["max_abs_change"] for t in real), default=None),
            "max_change_ulps": max(ulps, default=None),
            "change_norm": math.sqrt(sum(t["change_norm"] ** 2 for t in real)),
            "relative_change": _relative(real, compared),
        },
        "layers": _groups(tensors, "layer"),
        "kinds": _groups(tensors, "kind"),
        "groups": _groups(tensors, "group"),
        "largest": {
            "top": top,
            "by_relative_change": _largest(tensors, "relative_change", top),
            "by_max_abs_change": _largest(tensors, "max_abs_change", top),
        },
        "notes": _notes(tensors, by),
        "tensors": tensors,
    }


def _relative(real: list, compared: list) -> float | None:
    """‖Δ‖_F of the real changes over ‖W‖_F of every compared tensor: how far training moved the model."""
    base_sq = sum(t["base_norm"] ** 2 for t in compared)
    return math.sqrt(sum(t["change_norm"] ** 2 for t in real) / base_sq) if base_sq > 0 else None


def write_diff(out, base_source, finetuned_source, *, force: bool = False, **kwargs) -> dict:
    """diff_models() written as OUT/parameter_changes.json and .txt, which appear only when complete.

    Args:
        out: the output folder.
        base_source: the base model.
        finetuned_source: the fine-tuned model.
        force: replace an existing output folder.
        **kwargs: passed to diff_models (top, command).

    Returns:
        The record.

    Raises:
        LoratvError: as diff_models, or an output that exists (without force) or overlaps an input.
    """

    inputs = guarded_inputs([base_source, finetuned_source])
    with atomic_output_dir(out, inputs, force=force) as tmp:
        record = finite(diff_models(base_source, finetuned_source, **kwargs))
        write_json(record, tmp / RESULTS_FILE)
        (tmp / REPORT_FILE).write_text(render_diff_text(record), encoding="utf-8")
    return record
