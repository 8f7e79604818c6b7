"""Task vectors: T = finetuned − base, exact, rounded once to the storage dtype, streamed tensor by tensor.

For inputs of at most 32 bits stored in float32 (the default), the difference is computed error-free as a float32
pair: s = fl32(f − b), the correctly rounded value that is stored, and its exact rounding error from Knuth's
TwoSum, which counts the elements storage rounds. Otherwise (a float64 input, or `storage_dtype="fp64"`) it is
subtracted in float64 and TwoSum counts the elements where even that rounds. A nonzero difference of fp32/fp16/bf16
values is at least 2^-149 in magnitude, so storing it in float32 never turns a change into zero.
"""

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratv.common import dtypes
from loratv.common.prefetch import prefetched
from loratv.common.progress import progress_bar
from loratv.common.streaming import row_chunks
from loratv.errors import BadInputError, LoratvError, param
from loratv.exec.executor import ExecutorSpec, byte_groups, parse_executor, run_tasks
from loratv.exec.parts import PARTS_FOLDER, PartWriter
from loratv.io import storage
from loratv.io.checkpoint import Checkpoint
from loratv.io.integrity import checkpoint_record, write_manifest
from loratv.io.outputs import atomic_output_dir, output_path, remove_task_files, task_file, task_folder
from loratv.io.safetensors_format import SafetensorsWriter, tensor_to_bytes
from loratv.io.state_dict import open_checkpoint, source_name
from loratv.io.writer import finished
from loratv.version import __version__

SCHEMA = "loratv.task_vector"
SCHEMA_VERSION = 1
STORAGE_DTYPES = ("auto", "fp32", "fp64")
TENSOR_FILE = "task_vector.safetensors"
SUBTRACTION = "exact, rounded once to the storage dtype (float32 TwoSum pair; float64 for float64 inputs or storage)"
REPORT_FILE = "task_vector.json"


@dataclass
class TensorStats:
    name: str
    shape: tuple
    base_dtype: str
    finetuned_dtype: str
    stored_dtype: str
    changed: bool = False
    l2_norm: float = 0.0
    max_abs: float = 0.0
    nonzero: int = 0
    rounded_elements: int = 0
    max_rounding_error: float = 0.0
    inexact_subtractions: int = 0
    stored: bool = False
    sumsq: float = 0.0

    @property
    def numel_bytes(self) -> int:
        """The tensor's size in bytes in its storage dtype."""
        return self.parameters * dtypes.itemsize(self.stored_dtype)

    @property
    def parameters(self) -> int:
        """The tensor's element count."""
        return math.prod(self.shape)

    def record(self) -> dict:
        """The tensor's entry in task_vector.json (what compare reads back to know dtypes and storage rounding).

        Returns:
            name, shape, dtypes, whether it changed and was stored, whether it was stored exactly, the rounding and
            inexact-subtraction counts, the largest rounding error, and the L2 norm, max |T| and nonzero count of T.
        """
        return {
            "name": self.name,
            "shape": list(self.shape),
            "parameters": self.parameters,
            "base_dtype": self.base_dtype,
            "finetuned_dtype": self.finetuned_dtype,
            "changed": self.changed,
            "stored": self.stored,
            "stored_dtype": self.stored_dtype if self.stored else None,
            "stored_exactly": self.rounded_elements == 0 and self.inexact_subtractions == 0,
            "inexact_subtractions": self.inexact_subtractions,
            "rounded_elements": self.rounded_elements,
            "max_rounding_error": self.max_rounding_error,
            "l2_norm": self.l2_norm,
            "max_abs": self.max_abs,
            "nonzero": self.nonzero,
        }


@dataclass
class ExtractResult:
    output: Path
    tensors: list = field(default_factory=list)

    @property
    def changed(self) -> list:
        """The TensorStats of the tensors that differ from the base (at least one nonzero element)."""
        return [t for t in self.tensors if t.changed]

    def summary(self) -> str:
        """One line for the terminal: how many tensors and parameters changed, of how many.

        Returns:
            The line, without a newline.
        """
        changed = self.changed
        return (
            f"{len(changed)} of {len(self.tensors)} tensors changed "
            f"({human_count(sum(t.parameters for t in changed))} of {human_count(sum(t.parameters for t in self.tensors))} parameters)"
        )


def human_count(n: int) -> str:
    """A count for people: two decimals with K, M or B (10^3, 10^6, 10^9) from a thousand on.

    Args:
        n: the count.

    Returns:
        E.g. "1.23M", or `n` itself below 1000.
    """
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def storage_code(base_code: str, ft_code: str, storage_dtype: str) -> str:
    """The dtype code a tensor's task vector is stored in.

    Args:
        base_code: the base tensor's dtype code.
        ft_code: the fine-tuned tensor's dtype code.
        storage_dtype: one of STORAGE_DTYPES; "auto" stores float64 only when an input is float64.

    Returns:
        "I64" when either input is not floating-point, "F64" for storage_dtype "fp64" or ("auto" with a float64
        input), else "F32".
    """
    if not (dtypes.is_float(base_code) and dtypes.is_float(ft_code)):
        return "I64"
    if storage_dtype == "fp64" or (storage_dtype == "auto" and "F64" in (base_code, ft_code)):
        return "F64"
    return "F32"


READ_BYTES = 64 << 20  # per input and read: large sequential reads
COMPUTE_ELEMENTS = 1 << 18  # float64 temporaries of 2 MB stay in cache and are reused by malloc
TASK_BYTES = 2 << 30  # with an executor: input bytes per task (amortises each task's opening of both models)
KEEP_BYTES = 256 << 20  # a changed tensor up to this size is kept from the first pass instead of read again


def _two_sum_error(a: torch.Tensor, nb: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Knuth's TwoSum: the exact error of total = fl(a + nb), itself exactly representable (a + nb = total + err)."""
    virtual_b = total - a
    return (a - (total - virtual_b)) + (nb - virtual_b)


def _stored_difference(b: torch.Tensor, f: torch.Tensor, code: str, stats: "TensorStats | None" = None) -> torch.Tensor:
    """f − b, rounded once to the storage dtype `code` (int64 for integer tensors), in cache-sized blocks.

    With `stats`, also accumulates the norm, max |T|, nonzeros, storage rounding and inexact subtractions.
    """
    out = torch.empty(b.shape, dtype=dtypes.torch_dtype_of(code))
    flat_b, flat_f, flat_out = b.reshape(-1), f.reshape(-1), out.view(-1)
    if not (b.is_floating_point() and f.is_floating_point()):
        block = _int_block
    elif code == "F32" and torch.float64 not in (b.dtype, f.dtype):
        block = _f32_block
    else:
        block = _f64_block
    for i in range(0, flat_b.numel(), COMPUTE_ELEMENTS):
        j = min(flat_b.numel(), i + COMPUTE_ELEMENTS)
        block(flat_b[i:j], flat_f[i:j], flat_out[i:j], stats)
    return out


def _int_block(b, f, out, stats):
    out.copy_(f.to(torch.int64) - b.to(torch.int64))
    if stats is not None:
        d = out.to(torch.float64)
        stats.sumsq += float(torch.dot(d, d))
        stats.nonzero += int(torch.count_nonzero(d))
        stats.max_abs = max(stats.max_abs, float(d.abs().max()))


def _f32_block(b, f, out, stats):
    """Inputs of at most 24 significant bits, stored in float32: the exact difference is the pair (s, err) with
    s = fl32(f − b), the correctly rounded value that is stored, and err its exact rounding error (TwoSum)."""
    f32 = f.to(torch.float32)
    nb = b.to(torch.float32).neg()  # not neg_(): .to() returns b itself when it is float32 already
    torch.add(f32, nb, out=out)
    if stats is None:
        return
    _extremes(stats, out, f32, b)
    err = _two_sum_error(f32, nb, out)
    value = out.to(torch.float64)
    rounded = int(torch.count_nonzero(err))
    if rounded:
        value += err.to(torch.float64)  # the exact difference, unless the exponents are > 29 apart
        stats.rounded_elements += rounded
        stats.max_rounding_error = max(stats.max_rounding_error, float(err.abs().max()))
    stats.sumsq += float(torch.dot(value, value))


def _f64_block(b, f, out, stats):
    """float64 inputs or storage: subtract in float64; TwoSum counts the (rare) elements where that rounds."""
    a = f.to(torch.float64)
    nb = b.to(torch.float64).neg()
    diff = a + nb
    out.copy_(diff)
    if stats is None:
        return
    _extremes(stats, diff, a, b)
    stats.sumsq += float(torch.dot(diff, diff))
    stats.inexact_subtractions += int(torch.count_nonzero(_two_sum_error(a, nb, diff)))
    if out.dtype != torch.float64:
        err = out.to(torch.float64).sub_(diff).abs_()
        stats.rounded_elements += int(torch.count_nonzero(err))
        stats.max_rounding_error = max(stats.max_rounding_error, float(err.max()))


def _extremes(stats, diff, finetuned, base):
    """max |T| and nonzero count; also the finiteness check, since aminmax propagates NaN."""
    low, high = torch.aminmax(diff)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise NonFinite(dtypes.all_finite(finetuned), dtypes.all_finite(base))
    stats.max_abs = max(stats.max_abs, float(-low), float(high))
    stats.nonzero += int(torch.count_nonzero(diff))


class NonFinite(Exception):
    def __init__(self, finetuned_finite: bool, base_finite: bool = False):
        self.finetuned_finite = finetuned_finite
        self.base_finite = base_finite


def _measure(base, ft, name, stats: "TensorStats", chunks, reader) -> list | None:
    """First pass: norms, counts and rounding; returns the stored pieces (None for an all-zero piece) when the
    tensor is small enough to keep, else None. `reader` yields the tensor's chunks, read ahead."""
    keep = stats.numel_bytes <= KEEP_BYTES
    pieces: list = []
    for start, _stop in chunks:
        (_, job_start, _), (b, f) = next(reader)
        assert job_start == start
        if b.dtype == f.dtype and torch.equal(b, f):  # the common case, decided at memcmp speed
            pieces.append(None)
            continue
        stored = _checked_difference(base, ft, name, b, f, stats)
        pieces.append(stored if keep else None)
    stats.l2_norm = math.sqrt(stats.sumsq)
    stats.changed = stats.nonzero > 0
    return pieces if keep else None


def _checked_difference(base, ft, name, b, f, stats: "TensorStats") -> torch.Tensor:
    """f − b rounded once to the stats' storage dtype, measured into `stats`; refuses a NaN, Inf or overflow."""
    try:
        return _stored_difference(b, f, stats.stored_dtype, stats)
    except NonFinite as exc:
        if exc.finetuned_finite and exc.base_finite:  # both finite: the difference overflows its storage dtype
            storage = str(dtypes.torch_dtype_of(stats.stored_dtype)).removeprefix("torch.")
            raise LoratvError(f"{ft.path}: tensor '{name}' differs from the base by more than {storage} can hold; "
                              f"use {param('storage_dtype', 'fp64')}.") from None
        where = base if exc.finetuned_finite else ft
        raise LoratvError(f"{where.path}: tensor '{name}' contains NaN or Inf, so the task vector is undefined.") from None


def _open_pair(base_source, finetuned_source):
    """The base and the fine-tuned model (paths, hub ids or state dicts), checked to hold the same tensors."""
    base = open_checkpoint(base_source, label=f"base {source_name(base_source)}")
    ft = open_checkpoint(finetuned_source, label=f"fine-tuned model {source_name(finetuned_source)}")
    check_same_tensors(base, ft)
    return base, ft


def iter_task_vector(
    base_source, finetuned_source, *, storage_dtype: str = "auto", dense: bool = True,
    stats: list | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The task vector fine-tuned − base, one (name, tensor) at a time in base order, nothing written.

    Each value is computed by the same code `extract` stores (exact difference, rounded once to the storage dtype:
    float32, or float64 for float64 inputs or `storage_dtype="fp64"`; int64 for integer tensors). With
    `dense=False` only the changed tensors are yielded (as `extract` stores them); `stats`, when given, collects a
    TensorStats per tensor.

    Args:
        base_source: the base model (path, hub id or state dict).
        finetuned_source: the fine-tuned model (path, hub id or state dict), with the base's tensor names and shapes.
        storage_dtype: one of STORAGE_DTYPES ("auto", "fp32", "fp64"), as `extract`.
        dense: yield every tensor (zeros for unchanged ones) rather than only the changed ones.
        stats: a list to append each tensor's TensorStats to (every tensor's, yielded or not).

    Yields:
        (name, T) per tensor, whole, in its storage dtype.

    Raises:
        LoratvError: `storage_dtype` is not one of STORAGE_DTYPES (BadInputError); the models do not hold the same
            tensors (check_same_tensors); or a tensor holds a NaN or Inf, or its difference overflows the storage
            dtype. All raised once the generator runs, not when it is created.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise BadInputError(f"{param('storage_dtype', storage_dtype)}: choose one of {', '.join(STORAGE_DTYPES)}.")
    base, ft = _open_pair(base_source, finetuned_source)
    for name in base.names():
        be, fe = base.entry(name), ft.entry(name)
        tensor_stats = TensorStats(name, be.shape, be.dtype, fe.dtype, storage_code(be.dtype, fe.dtype, storage_dtype))
        value = _checked_difference(base, ft, name, base.read(name), ft.read(name), tensor_stats)
        tensor_stats.l2_norm = math.sqrt(tensor_stats.sumsq)
        tensor_stats.changed = tensor_stats.nonzero > 0
        if stats is not None:
            stats.append(tensor_stats)
        if dense or tensor_stats.changed:
            tensor_stats.stored = True
            yield name, value


def _write_tensor(writer, base, ft, name, stats, chunks, pieces) -> None:
    shape = stats.shape
    writer.begin(name, stats.stored_dtype, shape)
    dtype = dtypes.torch_dtype_of(stats.stored_dtype)
    for (start, stop), piece in zip(chunks, pieces if pieces is not None else [None] * len(chunks)):
        if pieces is not None:
            if piece is None:  # an unchanged chunk
                piece = torch.zeros((stop - start, *shape[1:]) if shape else (), dtype=dtype)
        else:  # second pass over a large tensor, from the page cache (own buffers: the read-ahead owns the others)
            piece = _stored_difference(base.read_rows(name, start, stop), ft.read_rows(name, start, stop), stats.stored_dtype)
        writer.write(tensor_to_bytes(piece))
    writer.end()
    stats.stored = True


def extract(
    base_source,
    finetuned_source,
    out,
    *,
    dense: bool = False,
    storage_dtype: str = "auto",
    force: bool = False,
    progress: bool = False,
    executor: "str | ExecutorSpec" = "local",
    task_bytes: int = TASK_BYTES,
) -> ExtractResult:
    """Write the task vector fine-tuned − base to OUT/task_vector.safetensors, with task_vector.json and a manifest.

    Each tensor is streamed twice at most (measured, then written; a changed tensor up to KEEP_BYTES is kept from
    the first pass), its difference exact and rounded once to the storage dtype (see the module docstring).

    Args:
        base_source: the base model (path, hub id or state dict).
        finetuned_source: the fine-tuned (e.g. merged) model, holding the base's tensor names and shapes.
        out: the output folder, written atomically (to a temporary folder renamed into place).
        dense: store every tensor, zeros for the unchanged ones (default: only the changed ones).
        storage_dtype: one of STORAGE_DTYPES: "auto" (float32, float64 when an input is float64), "fp32" or
            "fp64"; integer tensors are stored as int64 whatever it is.
        force: replace an existing output folder.
        progress: show a progress bar.
        executor: "local", or "ray" / "ray=ADDRESS": one Ray task per group of tensors of at most `task_bytes` of
            input, each opening the models itself (the output folder must be reachable from every worker); the files
            are the local run's, bit for bit.
        task_bytes: with Ray, the input bytes (base + fine-tuned) one task reads at most (a bigger tensor is a task
            of its own).

    Returns:
        The output folder and a TensorStats per base tensor, in base order.

    Raises:
        LoratvError: `storage_dtype` is not one of STORAGE_DTYPES (BadInputError); the models do not hold the same
            tensors (check_same_tensors); a tensor holds a NaN or Inf, or a difference overflows the storage dtype
            (nothing is written then).
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise BadInputError(f"{param('storage_dtype', storage_dtype)}: choose one of {', '.join(STORAGE_DTYPES)}.")
    run_on = parse_executor(executor)
    base, ft = _open_pair(base_source, finetuned_source)

    result = ExtractResult(output=output_path(out))
    metadata = {
        "format": "pt",
        "loratv_version": __version__,
        "loratv_operation": "extract",
        "base": str(base.source),
        "finetuned": str(ft.source),
        "subtraction": SUBTRACTION,
    }
    names = base.names()
    with atomic_output_dir(out, [base.path, ft.path], force=force) as tmp:
        writer = SafetensorsWriter(tmp / TENSOR_FILE, [(n, base.entry(n).shape) for n in names], metadata)
        with finished(writer):
            if run_on.kind == "local":
                result.tensors = _extract_tensors(base, ft, names, storage_dtype, dense, writer, progress)
            else:
                result.tensors = _extract_as_tasks(run_on, base_source, finetuned_source, base, ft, storage_dtype,
                                                   dense, task_bytes, writer, tmp)
        if run_on.kind != "local":
            remove_task_files(task_folder(tmp), PARTS_FOLDER)  # the tasks' part files, copied in by close()
        report = build_report(result, base, ft, dense=dense, storage_dtype=storage_dtype)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(tmp, "extract", {"base": checkpoint_record(base), "finetuned": checkpoint_record(ft)},
                       {TENSOR_FILE: writer.sha256})
    return result


def _extract_tensors(base: Checkpoint, ft: Checkpoint, names: list, storage_dtype: str, dense: bool, writer,
                     progress: bool = False) -> list:
    """Measure each named tensor's difference and write the stored ones through `writer` (begin/write/end), in
    order, reading one chunk ahead; returns their TensorStats."""
    total = sum(base.entry(n).nbytes + ft.entry(n).nbytes for n in names)
    chunks_of = {
        n: list(row_chunks(base.entry(n).shape, max(base.entry(n).element_size, ft.entry(n).element_size), READ_BYTES))
        for n in names
    }
    buffers = [[torch.empty(READ_BYTES, dtype=torch.uint8) for _ in range(2)] for _ in range(2)]

    def read(job, slot):
        name, start, stop = job
        return base.read_rows(name, start, stop, buffers[slot][0]), ft.read_rows(name, start, stop, buffers[slot][1])

    measured = []
    reader = prefetched(((n, s, e) for n in names for s, e in chunks_of[n]), read)
    try:
        with progress_bar(total, "extract", enabled=progress) as bar:
            for name in names:
                be, fe = base.entry(name), ft.entry(name)
                stats = TensorStats(name, be.shape, be.dtype, fe.dtype, storage_code(be.dtype, fe.dtype, storage_dtype))
                chunks = chunks_of[name]
                pieces = _measure(base, ft, name, stats, chunks, reader)
                if stats.changed or dense:
                    _write_tensor(writer, base, ft, name, stats, chunks, pieces)
                measured.append(stats)
                bar.update(be.nbytes + fe.nbytes)
    finally:
        reader.close()
    return measured


def extract_group_task(base_source: str, finetuned_source: str, names: list, storage_dtype: str, dense: bool,
                       part: str) -> tuple[list, dict]:
    """A group of tensors of a task vector, as a unit of work for an executor: opens both models itself, measures
    each tensor as `extract` does and appends the stored ones' bytes to the file `part`.

    Args:
        base_source: the base model (path or hub id).
        finetuned_source: the fine-tuned model.
        names: the tensors of this group, in base order.
        storage_dtype: as `extract`'s.
        dense: as `extract`'s.
        part: the part file to write, a local path or a URL (rewritten from scratch, so a retried task is
            harmless).

    Returns:
        (the TensorStats of every named tensor, {stored tensor: (offset, nbytes) in the part file}).

    Raises:
        LoratvError: as `extract`, for the tensors of this group.
    """
    base, ft = _open_pair(base_source, finetuned_source)
    with task_file(part) as local:
        writer = PartWriter(local)
        try:
            measured = _extract_tensors(base, ft, names, storage_dtype, dense, writer)
        finally:
            writer.close()
    return measured, writer.spans


def _extract_as_tasks(run_on: ExecutorSpec, base_source, finetuned_source, base: Checkpoint, ft: Checkpoint,
                      storage_dtype: str, dense: bool, task_bytes: int, writer: SafetensorsWriter,
                      folder: Path) -> list:
    """One executor task per group of at most task_bytes of input; the driver copies the stored bytes from the
    tasks' part files into the task vector, in base order, so the file is the local run's bit for bit."""
    if isinstance(base_source, Mapping) or isinstance(finetuned_source, Mapping):
        raise BadInputError(f"{param('executor', str(run_on))} sends paths to its tasks, not tensors: give the models "
                            "as folders, files or hub ids, not state dicts.")
    names = base.names()
    groups = byte_groups([base.entry(n).nbytes + ft.entry(n).nbytes for n in names], task_bytes)
    parts = storage.as_path(task_folder(folder)) / PARTS_FOLDER
    jobs = [(str(base_source), str(finetuned_source), [names[i] for i in group], storage_dtype, dense,
             str(parts / f"{g:05d}.part")) for g, group in enumerate(groups)]
    outcomes = run_tasks(run_on, extract_group_task, jobs)
    measured = []
    for job, (group_stats, spans) in zip(jobs, outcomes):
        for stats in group_stats:
            if stats.name in spans:
                offset, nbytes = spans[stats.name]
                writer.begin(stats.name, stats.stored_dtype, stats.shape)
                writer.copy_from(output_path(job[5]), offset, nbytes)
                writer.end()
            measured.append(stats)
    return measured


def check_same_tensors(base: Checkpoint, ft: Checkpoint) -> None:
    """The fine-tuned model must hold exactly the base's tensor names, with the same shapes.

    Args:
        base: the base model.
        ft: the fine-tuned model.

    Raises:
        LoratvError: naming the model file, when a tensor is in one model only, has another shape, or is
            floating-point in one model and integer in the other.
    """
    for name in base.names():
        if name not in ft:
            raise LoratvError(f"{ft.path}: the fine-tuned model lacks tensor '{name}', which the base has.")
        if ft.entry(name).shape != base.entry(name).shape:
            raise LoratvError(
                f"{ft.path}: tensor '{name}' has shape {list(ft.entry(name).shape)} but {list(base.entry(name).shape)} in the base."
            )
        if dtypes.is_float(ft.entry(name).dtype) != dtypes.is_float(base.entry(name).dtype):
            raise LoratvError(f"{ft.path}: tensor '{name}' is {ft.entry(name).dtype} but {base.entry(name).dtype} in the "
                              "base; a difference between floating-point and integer values is not defined.")
    for name in ft.names():
        if name not in base:
            raise LoratvError(f"{base.path}: the base lacks tensor '{name}', which the fine-tuned model has.")


def build_report(result: ExtractResult, base: Checkpoint, ft: Checkpoint, *, dense: bool, storage_dtype: str) -> dict:
    """The record written as task_vector.json (schema loratv.task_vector): totals and one record per tensor.

    Args:
        result: what extract measured.
        base: the base model (its source is recorded).
        ft: the fine-tuned model (its source is recorded).
        dense: whether every tensor was stored.
        storage_dtype: the storage_dtype extract was given.

    Returns:
        The record as a JSON-ready dict.
    """
    tensors = result.tensors
    changed = result.changed
    rounded = [t.name for t in tensors if t.stored and t.rounded_elements]
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "base": str(base.source),
        "finetuned": str(ft.source),
        "subtraction": SUBTRACTION,
        "storage_dtype": storage_dtype,
        "dense": dense,
        "file": TENSOR_FILE,
        "total_tensors": len(tensors),
        "changed_tensors": len(changed),
        "stored_tensors": sum(t.stored for t in tensors),
        "total_parameters": sum(t.parameters for t in tensors),
        "changed_parameters": sum(t.parameters for t in changed),
        "changed_elements": sum(t.nonzero for t in tensors),
        "storage_rounded": bool(rounded),
        "storage_rounded_tensors": len(rounded),
        "inexact_subtractions": sum(t.inexact_subtractions for t in tensors),
        "l2_norm": math.sqrt(sum(t.l2_norm**2 for t in tensors)),
        "tensors": [t.record() for t in tensors],
    }
