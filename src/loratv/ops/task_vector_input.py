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
        """The folder written by extract (or the file itself when it has another name), as a string."""
        return str(self.path.parent if self.path.name == TENSOR_FILE else self.path)

    def check_against(self, base: Checkpoint) -> None:
        """Require the task vector to belong to `base`: stored tensors in it with its shapes, and (when there is a
        task_vector.json) the recorded tensors exactly the base's, each changed one stored.

        Args:
            base: the base model.

        Raises:
            LoratvError: naming the task-vector file, for a tensor the base lacks or shapes differently, a record
                that lacks a base tensor or has one the base lacks, or a changed tensor that is not stored.
        """
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
        """The fine-tuned tensor's dtype code, as task_vector.json records it.

        Args:
            name: the tensor.

        Returns:
            The code, or None when there is no record of it.
        """
        record = (self.records or {}).get(name)
        return record.get("finetuned_dtype") if record else None

    def storage_rounding(self, name: str) -> torch.dtype | None:
        """The dtype T was rounded to when stored, or None when it is stored exactly (unknown counts as rounded).

        Args:
            name: the tensor.

        Returns:
            The stored tensor's dtype, or None when it is not stored (T = 0) or recorded as stored exactly.
        """
        if name not in self.tensors:
            return None
        record = (self.records or {}).get(name)
        if record is not None and record.get("stored_exactly", False):
            return None
        return self.tensors.entry(name).torch_dtype

    def needs_read(self, name: str) -> bool:
        """Whether T of `name` must be read: it is stored (an unstored tensor has T = 0).

        Args:
            name: the tensor.

        Returns:
            True when the file stores it.
        """
        return name in self.tensors

    def read_raw(self, name, start, stop, into=None) -> torch.Tensor | None:
        """Rows of T as stored, or None when the tensor is not stored (T = 0).

        Args:
            name: the tensor.
            start: the first row.
            stop: the row after the last.
            into: an optional buffer to read into (as Checkpoint.read_rows).

        Returns:
            The rows in the stored dtype, or None.
        """
        if name not in self.tensors:
            return None
        return self.tensors.read_rows(name, start, stop, into)

    def difference(self, raw, w, w64=None) -> torch.Tensor | None:
        """T in float64 (None: T = 0); `w64` is the base rows in float64 when the caller has them.

        Args:
            raw: what read_raw returned.
            w: the base rows (unused here: T is stored).
            w64: the base rows in float64 (unused here).

        Returns:
            `raw` in float64, or None when it is None.
        """
        return None if raw is None else raw.to(torch.float64)

    def cast_matches(self, raw, w, dtype: torch.dtype) -> bool:
        """Whether base + T is the base cast to `dtype` (T, a difference of two nearby floats, is stored exactly).

        Args:
            raw: rows of T as stored (not None).
            w: the base rows.
            dtype: the dtype the base would be cast to.

        Returns:
            True when T equals cast(w, dtype) − w exactly, element by element.
        """
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
        """The fine-tuned model's source (path or hub id), as a string."""
        return str(self.finetuned.source)

    def check_against(self, base: Checkpoint) -> None:
        """Nothing to do: the constructor already checked the fine-tuned model against the base.

        Args:
            base: the base model (unused).
        """
        pass  # done on construction

    def finetuned_dtype(self, name: str) -> str:
        """The fine-tuned tensor's dtype code.

        Args:
            name: the tensor.

        Returns:
            The code, from the fine-tuned model's header.
        """
        return self.finetuned.entry(name).dtype

    def storage_rounding(self, name: str) -> torch.dtype | None:
        """Always float64: T is computed in float64, which the bound counts as one possible rounding.

        Args:
            name: the tensor (unused).

        Returns:
            torch.float64.
        """
        return torch.float64

    def needs_read(self, name: str) -> bool:
        """Always True: every tensor's T is only known once the fine-tuned rows are read.

        Args:
            name: the tensor (unused).

        Returns:
            True.
        """
        return True

    def read_raw(self, name, start, stop, into=None) -> torch.Tensor:
        """Rows of the fine-tuned tensor.

        Args:
            name: the tensor.
            start: the first row.
            stop: the row after the last.
            into: an optional buffer to read into (as Checkpoint.read_rows).

        Returns:
            The rows in the fine-tuned dtype.
        """
        return self.finetuned.read_rows(name, start, stop, into)

    def difference(self, raw, w, w64=None) -> torch.Tensor | None:
        """T = fine-tuned − base for some rows, in float64.

        Args:
            raw: the fine-tuned rows (read_raw).
            w: the base rows.
            w64: the base rows in float64 when the caller has them (else computed from `w`).

        Returns:
            The float64 difference, or None when the rows are bit for bit equal (T = 0).
        """
        if bits_equal(raw, w):  # the common case (the base itself is checked finite by the caller)
            return None
        # copy=True: a float64 input must not be overwritten (callers still read it)
        return raw.to(torch.float64, copy=True).sub_(w64 if w64 is not None else w.to(torch.float64))

    def cast_matches(self, raw, w, dtype: torch.dtype) -> bool:
        """Whether the fine-tuned rows are the base rows cast to `dtype`.

        Args:
            raw: the fine-tuned rows.
            w: the base rows.
            dtype: the dtype of the cast.

        Returns:
            True when `raw` is in `dtype` and equals cast(w) (equals_cast); False otherwise.
        """
        return equals_cast(raw, w) if raw.dtype == dtype else False


def open_task_vector(base_source=None, *, task_vector=None, finetuned=None):
    """(base Checkpoint or None, task vector) for commands that read T whole, tensor by tensor: a stored task vector
    (the base optional) or fine-tuned − base computed on the fly (both models needed).

    Args:
        base_source: the base model; optional with `task_vector`, required with `finetuned`.
        task_vector: a folder or file written by `loratv extract` (exclusive with `finetuned`).
        finetuned: a fine-tuned model, whose difference to the base is the task vector (exclusive with
            `task_vector`).

    Returns:
        (base Checkpoint or None, StoredTaskVector or LiveTaskVector); a stored one is checked against the base.

    Raises:
        LoratvError: both or neither of `task_vector` and `finetuned` are given, `finetuned` is given without a
            base, or the task vector does not belong to the base.
    """
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
    """Every tensor the task vector covers: the base's, else the extract record's, else the stored ones.

    Args:
        base: the base Checkpoint, or None.
        tv: the task vector (open_task_vector).

    Returns:
        The tensor names, in base, record or file order.
    """
    if base is not None:
        return base.names()
    if getattr(tv, "records", None):
        return list(tv.records)
    return tv.tensors.names()


def read_difference(tv, base, name: str, chunk_bytes: int = 64 << 20) -> torch.Tensor | None:
    """T for one tensor, whole, in float64 (None when it is zero or not stored); inputs are checked finite.

    Args:
        tv: the task vector (open_task_vector).
        base: the base Checkpoint; needed for a live task vector, optional for a stored one.
        name: the tensor.
        chunk_bytes: the most bytes per read, counting 8 bytes (a float64) per element.

    Returns:
        T as a float64 tensor of the tensor's shape, or None when T = 0 everywhere or is not stored.

    Raises:
        LoratvError: naming the file, when the task vector (or fine-tuned) rows or the base rows hold a NaN or Inf.
    """

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
    """The fine-tuned tensor itself: read (live) or base + T rounded once to the fine-tuned dtype (stored).

    Args:
        tv: the task vector (open_task_vector).
        base: the base Checkpoint (needed for a stored task vector).
        name: the tensor.
        t: T for the tensor in float64 (read_difference); unused for a live task vector.

    Returns:
        The fine-tuned tensor in its dtype (for a stored T: the recorded fine-tuned dtype, else the base's).

    Raises:
        LoratvError: the task vector is stored and no base is given.
    """
    if tv.live:
        return tv.finetuned.read(name)
    if base is None:
        raise LoratvError(f"{tv.path}: tensor '{name}' must be written as a full value, which needs the base ({param('base')}).")
    code = tv.finetuned_dtype(name) or base.entry(name).dtype

    return (base.read(name).to(torch.float64) + t).to(torch_dtype_of(code))
