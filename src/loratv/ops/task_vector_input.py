"""The task vector compare reads: a folder (or file) written by `loratv extract`, or fine-tuned − base on the fly.

Both give, per base tensor, rows of T and the facts the rounding bound needs: the fine-tuned dtype and whether the
stored T was itself rounded.
"""

import torch

from loratv.common.dtypes import all_finite, torch_dtype_of
from loratv.common.streaming import row_chunks
from loratv.errors import LoratvError, param
from loratv.io import safe_json
from loratv.io.checkpoint import Checkpoint, resolve_path
from loratv.io.state_dict import open_checkpoint, source_name
from loratv.numerics.precision import bits_equal, cast_difference, equals_cast
from loratv.ops.extract import REPORT_FILE, SCHEMA, TENSOR_FILE, check_same_tensors


class StoredTaskVector:
    """`task_vector.safetensors` (+ `task_vector.json` beside it, which records dtypes and storage rounding)."""

    live = False

    def __init__(self, source):
        path = resolve_path(source)
        file = path / TENSOR_FILE if path.is_dir() else path
        if not file.is_file():
            raise LoratvError(f"{path}: no {TENSOR_FILE} here; pass the folder written by `loratv extract`.")
        self.path = file
        self.tensors = Checkpoint(file, label=f"task vector {source}")
        self.records = None
        self.recorded_base = None
        report = file.parent / REPORT_FILE
        if report.is_file():

            data = safe_json.read(report)
            if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("tensors"), list):
                raise LoratvError(f"{report}: not a loratv task-vector record (schema '{SCHEMA}').")
            if data.get("file", TENSOR_FILE) == file.name:
                try:
                    self.records = {t["name"]: t for t in data["tensors"]}
                except (TypeError, KeyError):
                    raise LoratvError(f"{report}: a tensor record lacks its name.") from None
                self.recorded_base = data.get("base")

    @property
    def source(self) -> str:
        return str(self.path.parent if self.path.name == TENSOR_FILE else self.path)

    def check_against(self, base: Checkpoint) -> None:
        for name in self.tensors.names():
            if name not in base:
                raise LoratvError(
                    f"{self.path}: tensor '{name}' is not in the base {base.path}; the task vector belongs to another model."
                )
            if self.tensors.entry(name).shape != base.entry(name).shape:
                raise LoratvError(
                    f"{self.path}: tensor '{name}' has shape {list(self.tensors.entry(name).shape)} but "
                    f"{list(base.entry(name).shape)} in the base {base.path}."
                )
        if self.records is None:
            return
        missing = [n for n in base.names() if n not in self.records]
        extra = [n for n in self.records if n not in base]
        if missing or extra:
            which = f"lacks '{missing[0]}'" if missing else f"has '{extra[0]}', which the base lacks"
            raise LoratvError(f"{self.path.parent / REPORT_FILE}: was extracted from another model: it {which}.")
        for name, record in self.records.items():
            if record.get("changed") and name not in self.tensors:
                raise LoratvError(f"{self.path}: tensor '{name}' changed (by {REPORT_FILE}) but is not stored in the file.")

    def finetuned_dtype(self, name: str) -> str | None:
        record = (self.records or {}).get(name)
        return record.get("finetuned_dtype") if record else None

    def storage_rounding(self, name: str) -> torch.dtype | None:
        """The dtype T was rounded to when stored, or None when it is stored exactly (unknown counts as rounded)."""
        if name not in self.tensors:
            return None
        record = (self.records or {}).get(name)
        if record is not None and record.get("stored_exactly", False):
            return None
        return self.tensors.entry(name).torch_dtype

    def needs_read(self, name: str) -> bool:
        return name in self.tensors

    def read_raw(self, name, start, stop, into=None) -> torch.Tensor | None:
        """Rows of T as stored, or None when the tensor is not stored (T = 0)."""
        if name not in self.tensors:
            return None
        return self.tensors.read_rows(name, start, stop, into)

    def difference(self, raw, w, w64=None) -> torch.Tensor | None:
        """T in float64 (None: T = 0); `w64` is the base rows in float64 when the caller has them."""
        return None if raw is None else raw.to(torch.float64)

    def cast_matches(self, raw, w, dtype: torch.dtype) -> bool:
        """Whether base + T is the base cast to `dtype` (T, a difference of two nearby floats, is stored exactly)."""
        return torch.equal(raw.to(torch.float64), cast_difference(w, dtype))


class LiveTaskVector:
    """T = fine-tuned − base, computed while streaming (exact in float64 for inputs of at most 24 significant bits
    unless their exponents differ by more than 29; the bound allows ½ ulp of float64 for that)."""

    live = True

    def __init__(self, finetuned_source, base: Checkpoint):
        self.finetuned = open_checkpoint(finetuned_source, label=f"fine-tuned model {source_name(finetuned_source)}")
        self.path = self.finetuned.path
        self.recorded_base = None
        check_same_tensors(base, self.finetuned)

    @property
    def source(self) -> str:
        return str(self.finetuned.source)

    def check_against(self, base: Checkpoint) -> None:
        pass  # done on construction

    def finetuned_dtype(self, name: str) -> str:
        return self.finetuned.entry(name).dtype

    def storage_rounding(self, name: str) -> torch.dtype | None:
        return torch.float64

    def needs_read(self, name: str) -> bool:
        return True

    def read_raw(self, name, start, stop, into=None) -> torch.Tensor:
        """Rows of the fine-tuned tensor."""
        return self.finetuned.read_rows(name, start, stop, into)

    def difference(self, raw, w, w64=None) -> torch.Tensor | None:
        if bits_equal(raw, w):  # the common case (the base itself is checked finite by the caller)
            return None
        # copy=True: a float64 input must not be overwritten (callers still read it)
        return raw.to(torch.float64, copy=True).sub_(w64 if w64 is not None else w.to(torch.float64))

    def cast_matches(self, raw, w, dtype: torch.dtype) -> bool:
        return equals_cast(raw, w) if raw.dtype == dtype else False


def open_task_vector(base_source=None, *, task_vector=None, finetuned=None):
    """(base Checkpoint or None, task vector) for commands that read T whole, tensor by tensor: a stored task vector
    (the base optional) or fine-tuned − base computed on the fly (both models needed)."""
    if (task_vector is None) == (finetuned is None):
        raise LoratvError("give either a task vector or a fine-tuned model (with its base), not both and not neither.")
    if finetuned is not None:
        if base_source is None:
            raise LoratvError(f"{finetuned}: a fine-tuned model needs its base ({param('base')}) to give a task vector.")
        base = Checkpoint(base_source, label=f"base {base_source}")
        return base, LiveTaskVector(finetuned, base)
    tv = StoredTaskVector(task_vector)
    base = None
    if base_source is not None:
        base = Checkpoint(base_source, label=f"base {base_source}")
        tv.check_against(base)
    return base, tv


def tensor_names(base, tv) -> list:
    """Every tensor the task vector covers: the base's, else the extract record's, else the stored ones."""
    if base is not None:
        return base.names()
    if getattr(tv, "records", None):
        return list(tv.records)
    return tv.tensors.names()


def read_difference(tv, base, name: str, chunk_bytes: int = 64 << 20) -> torch.Tensor | None:
    """T for one tensor, whole, in float64 (None when it is zero or not stored); inputs are checked finite."""

    if not tv.needs_read(name):
        return None
    entry = base.entry(name) if base is not None else tv.tensors.entry(name)
    out = None  # allocated at the first nonzero block: an unchanged tensor never costs a float64 copy of itself
    for start, stop in row_chunks(entry.shape, 8, chunk_bytes):
        raw = tv.read_raw(name, start, stop)
        if raw is None:
            return None
        if not all_finite(raw):
            raise LoratvError(f"{tv.path}: tensor '{name}' contains NaN or Inf.")
        w = base.read_rows(name, start, stop) if tv.live else None
        if w is not None and not all_finite(w):
            raise LoratvError(f"{base.entry(name).file}: tensor '{name}' contains NaN or Inf.")
        t = tv.difference(raw, w)
        if t is None or not bool(t.any()):
            continue
        if out is None:
            out = torch.zeros(tuple(entry.shape), dtype=torch.float64)
        if out.dim() == 0:
            out.copy_(t.reshape(()))
        else:
            out[start:stop] = t
    return out


def finetuned_value(tv, base, name: str, t: torch.Tensor) -> torch.Tensor:
    """The fine-tuned tensor itself: read (live) or base + T rounded once to the fine-tuned dtype (stored)."""
    if tv.live:
        return tv.finetuned.read(name)
    if base is None:
        raise LoratvError(f"{tv.path}: tensor '{name}' must be written as a full value, which needs the base ({param('base')}).")
    code = tv.finetuned_dtype(name) or base.entry(name).dtype

    return (base.read(name).to(torch.float64) + t).to(torch_dtype_of(code))
