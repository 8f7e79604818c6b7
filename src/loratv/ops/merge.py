"""Merge a LoRA adapter into a base model, streaming: M = cast_out(compute(W) + ΔW), one rounding per element.

Untouched tensors are copied byte for byte (or cast, when --precision changes their dtype) one chunk at a time; a
targeted tensor is merged by row chunks against its module's s·B@A, which is formed whole as PEFT forms it (so that
the result is PEFT's bit for bit; adapter.delta_rows): memory is one targeted tensor's delta plus two chunks.
"""

import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from loratv.adapters.adapter import (
    INPUT_EMBEDDING_SUFFIXES,
    TOKEN_ROWS,
    MergePlan,
    bias_delta,
    bind,
    delta_rows,
    load_adapter,
    token_replacement,
)
from loratv.adapters.structures import Adapter
from loratv.adapters.tuners import TunerModule, merged_value
from loratv.common import dtypes
from loratv.common.devices import resolve_device
from loratv.common.progress import progress_bar
from loratv.common.streaming import row_chunks, rows_of
from loratv.errors import BadInputError, LoratvError, UnsupportedAdapterError, param
from loratv.exec.executor import ExecutorSpec, parse_executor, run_tasks
from loratv.io import storage
from loratv.io.checkpoint import Checkpoint
from loratv.io.integrity import adapter_record, checkpoint_record, write_manifest
from loratv.io.outputs import atomic_output_dir, output_path, task_folder, task_output
from loratv.io.safetensors_format import tensor_to_bytes
from loratv.io.state_dict import open_checkpoint, source_name
from loratv.io.writer import OutTensor, ShardedWriter, finished, layout_by_size, layout_like, write_index
from loratv.version import __version__

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
COMPUTE_DTYPES = ("fp32", "fp64")


@dataclass
class MergeResult:
    output: Path
    total_tensors: int
    merged: list = field(default_factory=list)
    replaced: list = field(default_factory=list)
    added: list = field(default_factory=list)
    copied: int = 0
    cast: int = 0
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        """One line for the terminal: how many tensors were merged, replaced, copied and cast, and where.

        Returns:
            The line, without a newline.
        """
        return (
            f"merged {len(self.merged)} of {self.total_tensors} tensors, replaced {len(self.replaced)}, "
            f"copied {self.copied} unchanged, cast {self.cast}; wrote {self.output}"
        )


def output_code(base_code: str, precision: str) -> str:
    """The dtype code a tensor is written in: the base's, or `precision`'s for a floating-point tensor.

    Args:
        base_code: the tensor's dtype code in the base (e.g. "F32", "BF16", "I64").
        precision: one of PRECISIONS; "auto" keeps every dtype, and non-float tensors always keep theirs.

    Returns:
        The output dtype code.
    """
    if precision == "auto" or not dtypes.is_float(base_code):
        return base_code
    return dtypes.code_of(dtypes.PRECISION_NAMES[precision])


def merge(
    base_source,
    adapter_source,
    out,
    *,
    precision: str = "auto",
    compute_dtype: str = "fp32",
    device: str = "cpu",
    max_shard_size: int | None = None,
    cast_base_first: bool = False,
    autocast_adapter_dtype: bool = True,
    peft_arithmetic: bool = False,
    force: bool = False,
    progress: bool = False,
    base_config: dict | None = None,
    executor: "str | ExecutorSpec" = "local",
) -> MergeResult:
    """Merge an adapter into a base model, streaming, one rounding per element (or PEFT's roundings, see below).

    Args:
        base_source: base model (folder, file or hub id).
        adapter_source: PEFT adapter folder or single LoRA file.
        out: output folder (written beside its final path, renamed into place when complete).
        precision: dtype of floating-point outputs ("auto" keeps each tensor's).
        compute_dtype: dtype of base + ΔW before the one cast to the output dtype.
        device: where ΔW and the sums are computed.
        max_shard_size: split shards at this many bytes (None: the base's layout).
        cast_base_first: reproduce PEFT's merge_and_unload on a model loaded in the output dtype d (docs/math.md
            §6): the base rounded to d first, then each module's ΔW added into the d weight in place.
        autocast_adapter_dtype: with cast_base_first, PEFT's parameter of that name. True (PEFT's default): the
            factors stay fp32, ΔW is computed in `compute_dtype` and added by `W_d += ΔW` (the sum in fp32, rounded to
            d; an Embedding's or ParamWrapper's ΔW is rounded to d before the add, as PEFT does). False: the factors
            are rounded to d, ΔW computed from them in fp32 and rounded to d, the sum rounded in d (PEFT's CPU path).
        peft_arithmetic: where loratv evaluates a tuner's product faster than PEFT (HRA, through its compact WY form
            in float64), run PEFT's own merge instead: PEFT's bits, at PEFT's cost (n³ per module).
        force: replace an existing output folder.
        progress: show a progress bar.
        base_config: for a state-dict base, its config.json as a dict (optional).
        executor: "local", or "ray" / "ray=ADDRESS": one Ray task per output shard, each opening the inputs itself
            (the output folder must be reachable from every worker); the files are the local run's, bit for bit.

    Returns:
        What was merged, replaced, added, copied and cast.

    Raises:
        LoratvError: bad flags or input (unreadable, mismatched, non-finite), or autocast_adapter_dtype=False
            without cast_base_first.
    """
    run_on = parse_executor(executor, device)
    prepared = _prepare(base_source, adapter_source, precision, compute_dtype, device, cast_base_first,
                        autocast_adapter_dtype, base_config, peft_arithmetic)
    base, adapter, plan, specs = prepared.base, prepared.adapter, prepared.plan, prepared.specs
    shards = _layout(prepared, max_shard_size)
    metadata = {
        "format": "pt",
        "loratv_version": __version__,
        "loratv_operation": "merge",
        "base": str(base.source),
        "adapter": str(adapter.source),
        "precision": precision,
        "compute_dtype": compute_dtype,
        "cast_base_first": str(cast_base_first).lower(),
    }
    if cast_base_first:
        metadata["autocast_adapter_dtype"] = str(autocast_adapter_dtype).lower()
    if peft_arithmetic:
        metadata["peft_arithmetic"] = "true"
    result = MergeResult(output=output_path(out), total_tensors=len(specs), notes=list(plan.notes))
    options = {"base_source": base_source, "adapter_source": adapter_source, "precision": precision,
               "compute_dtype": compute_dtype, "device": device, "cast_base_first": cast_base_first,
               "autocast_adapter_dtype": autocast_adapter_dtype, "base_config": base_config,
               "peft_arithmetic": peft_arithmetic}
    with atomic_output_dir(out, [base.path, adapter.path], force=force) as tmp:
        elsewhere: dict = {}
        if run_on.kind == "local":
            digests = _write_shards(prepared, shards, tmp, metadata, result, progress)
        else:
            digests, elsewhere = _write_shards_as_tasks(run_on, options, max_shard_size, shards, tmp, metadata, result)
        _write_aux(base, tmp, precision, plan.untied)
        write_manifest(tmp, "merge", {"base": checkpoint_record(base), "adapter": adapter_record(adapter)}, digests,
                       elsewhere)
    result.output = output_path(out)
    return result


def _write_shards(prepared: "_Prepared", shards: list, folder: Path, metadata: dict, result: MergeResult,
                  progress: bool = False) -> dict:
    """Write the given shards of a prepared merge into `folder` (the index too when they are all of several);
    returns {shard file: sha256}."""
    writer = ShardedWriter(folder, shards, metadata)
    with progress_bar(sum(s.nbytes for _, group in shards for s in group), "merge", enabled=progress) as bar, \
            finished(writer):
        for _file, group in shards:
            for spec in group:
                writer.begin(spec.name)
                _write_one(spec, prepared.base, prepared.adapter, prepared.plan, writer, prepared.compute,
                           prepared.dev, result, prepared.cast_first)
                writer.end()
                bar.update(spec.nbytes)
    return writer.digests


def _layout(prepared: "_Prepared", max_shard_size: int | None) -> list:
    """The output's shards: the base's grouping, or cut at max_shard_size bytes."""
    if max_shard_size:
        return layout_by_size(prepared.specs, max_shard_size)
    return layout_like(prepared.specs, prepared.shard_of, prepared.base.files)


def merge_shard_task(options: dict, max_shard_size: int | None, file: str, folder: str, metadata: dict) -> dict:
    """One output shard of a merge, as a unit of work for an executor: opens the inputs itself, writes
    folder/file exactly as `merge` does, and returns only metadata.

    Args:
        options: `merge`'s arguments that define the output (sources, precision, compute dtype, device, PEFT modes).
        max_shard_size: as `merge`'s (the layout is recomputed, and must name `file`).
        file: the shard's file name.
        folder: where the shard goes (outputs.task_folder: the output's temporary folder, or its temporary prefix
            in an object store).
        metadata: the shard header's metadata.

    Returns:
        {"sha256", "size", "merged", "replaced", "added", "copied", "cast"} for this shard.

    Raises:
        LoratvError: as `merge`, for the tensors of this shard.
    """
    prepared = _prepare(**options)
    group = dict(_layout(prepared, max_shard_size))[file]
    result = MergeResult(output=Path(), total_tensors=len(prepared.specs))
    with task_output(folder) as local:
        digests = _write_shards(prepared, [(file, group)], local, metadata, result)
        size = (local / file).stat().st_size
    return {"sha256": digests[file], "size": size, "merged": result.merged, "replaced": result.replaced,
            "added": result.added, "copied": result.copied, "cast": result.cast}


def _write_shards_as_tasks(run_on: ExecutorSpec, options: dict, max_shard_size: int | None, shards: list,
                           folder: Path, metadata: dict, result: MergeResult) -> tuple[dict, dict]:
    """One executor task per shard; the driver sums their records in shard order and writes the index. Returns
    ({shard: sha256}, {shard: {"size", "sha256"}})."""
    if isinstance(options["base_source"], Mapping):
        raise BadInputError(f"{param('executor', str(run_on))} sends paths to its tasks, not tensors: give the base "
                            "as a folder, file or hub id, not a state dict.")
    records = run_tasks(run_on, merge_shard_task,
                        [(options, max_shard_size, file, task_folder(folder), metadata) for file, _ in shards])
    for record in records:
        result.merged += record["merged"]
        result.replaced += record["replaced"]
        result.added += record["added"]
        result.copied += record["copied"]
        result.cast += record["cast"]
    write_index(folder, shards)
    return ({file: record["sha256"] for (file, _), record in zip(shards, records)},
            {file: {"size": record["size"], "sha256": record["sha256"]} for (file, _), record in zip(shards, records)})


def iter_merged(
    base_source,
    adapter_source,
    *,
    precision: str = "auto",
    compute_dtype: str = "fp32",
    device: str = "cpu",
    cast_base_first: bool = False,
    autocast_adapter_dtype: bool = True,
    peft_arithmetic: bool = False,
    base_config: dict | None = None,
    result: MergeResult | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model as `merge` writes it, one (name, tensor) at a time, in output order, nothing written.

    Each tensor is computed by the same code that `merge` writes to its shards (so it equals the merged file's
    tensor bit for bit); untouched tensors are the base's (read, or cast when `precision` changes their dtype).
    Arguments as `merge`; `result`, when given, collects what was merged, copied and cast.

    Args:
        base_source: base model (folder, file or hub id).
        adapter_source: PEFT adapter folder or single LoRA file.
        precision: dtype of floating-point outputs, one of PRECISIONS ("auto" keeps each tensor's).
        compute_dtype: "fp32" or "fp64", the dtype of base + ΔW before the one cast to the output dtype.
        device: where ΔW and the sums are computed.
        cast_base_first: reproduce PEFT's merge_and_unload on a model loaded in the output dtype (as `merge`).
        autocast_adapter_dtype: with cast_base_first, PEFT's parameter of that name (as `merge`).
        peft_arithmetic: PEFT's own merge where loratv has a faster evaluation (as `merge`).
        base_config: for a state-dict base, its config.json as a dict (optional).
        result: filled in place (counts, lists and notes) when given; the output path is not set.

    Yields:
        (name, tensor) for every output tensor, in the dtype `merge` writes it.

    Raises:
        LoratvError: as `merge` (bad flags or input, raised at the first next() as this is a generator; a NaN or
            Inf in a merged tensor, raised when that tensor is reached).
    """
    prepared = _prepare(base_source, adapter_source, precision, compute_dtype, device, cast_base_first,
                        autocast_adapter_dtype, base_config, peft_arithmetic)
    if result is None:
        result = MergeResult(output=Path(), total_tensors=len(prepared.specs))
    result.total_tensors = len(prepared.specs)
    result.notes[:] = list(prepared.plan.notes)
    for spec in prepared.specs:
        sink = _TensorSink(spec)
        _write_one(spec, prepared.base, prepared.adapter, prepared.plan, sink, prepared.compute, prepared.dev, result,
                   prepared.cast_first)
        yield spec.name, sink.value()


def prepare_merge(base_source, adapter_source, *, precision: str = "auto", compute_dtype: str = "fp32",
                  device: str = "cpu", cast_base_first: bool = False, autocast_adapter_dtype: bool = True,
                  base_config: dict | None = None, peft_arithmetic: bool = False) -> "_Prepared":
    """The opened base and adapter, bound, with the output tensors in order: what `merged_tensor` computes from.

    Args:
        base_source: base model (folder, file or hub id).
        adapter_source: PEFT adapter folder or single LoRA file.
        precision: dtype of floating-point outputs, one of PRECISIONS ("auto" keeps each tensor's).
        compute_dtype: "fp32" or "fp64", the dtype of base + ΔW before the one cast to the output dtype.
        device: where ΔW and the sums are computed.
        cast_base_first: reproduce PEFT's merge_and_unload on a model loaded in the output dtype (as `merge`).
        autocast_adapter_dtype: with cast_base_first, PEFT's parameter of that name (as `merge`).
        base_config: for a state-dict base, its config.json as a dict (optional).
        peft_arithmetic: PEFT's own merge where loratv has a faster evaluation (as `merge`).

    Returns:
        The prepared merge (base, adapter, merge plan, output specs in order, compute dtype and device).

    Raises:
        LoratvError: as `merge`: a bad flag (BadInputError), or an input that cannot be read or bound.
    """
    return _prepare(base_source, adapter_source, precision, compute_dtype, device, cast_base_first,
                    autocast_adapter_dtype, base_config, peft_arithmetic)


def merged_tensor(prepared: "_Prepared", name: str, result: MergeResult | None = None) -> torch.Tensor:
    """One output tensor of a prepared merge, computed as `merge` writes it.

    Args:
        prepared: what prepare_merge returned.
        name: the output tensor's name (a base tensor, or one the adapter adds).
        result: collects whether the tensor was merged, copied, cast or replaced (a throwaway one when None).

    Returns:
        The tensor, in its output dtype, on the CPU.

    Raises:
        LoratvError: the merged model has no tensor `name`, or its merged value holds a NaN or Inf.
    """
    spec = next((s for s in prepared.specs if s.name == name), None)
    if spec is None:
        raise LoratvError(f"{prepared.base.label}: the merged model has no tensor '{name}'.")
    sink = _TensorSink(spec)
    _write_one(spec, prepared.base, prepared.adapter, prepared.plan, sink, prepared.compute, prepared.dev,
               result if result is not None else MergeResult(output=Path(), total_tensors=len(prepared.specs)),
               prepared.cast_first)
    return sink.value()


@dataclass
class _Prepared:
    """What merge and iter_merged share: the opened inputs, the binding, and the output tensors in order."""

    base: Checkpoint  # or its in-memory subclass, io.state_dict.StateDictCheckpoint
    adapter: Adapter
    plan: MergePlan
    specs: list
    shard_of: dict
    compute: torch.dtype
    dev: torch.device
    cast_first: str | None


class _TensorSink:
    """A writer for one output tensor that keeps it in memory (the bytes `_write_one` writes, in place)."""

    def __init__(self, spec: OutTensor):
        self._value = torch.empty(tuple(spec.shape), dtype=dtypes.torch_dtype_of(spec.dtype))
        self._bytes = self._value.reshape(-1).view(torch.uint8).numpy()
        self._at = 0

    def write(self, data) -> None:
        view = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        self._bytes[self._at:self._at + view.size] = view
        self._at += view.size

    def copy_from(self, file, start: int, nbytes: int) -> None:
        if storage.is_url(file):  # an object-store base: ranged requests of exactly these bytes
            for piece in storage.iter_range(file, start, nbytes, "a copied tensor"):
                self.write(piece)
            return
        with open(file, "rb") as f:
            f.seek(start)
            got = f.readinto(self._bytes[self._at:self._at + nbytes].data)
        if got != nbytes:
            raise LoratvError(f"{file}: truncated while reading (expected {nbytes} bytes, read {got}).")
        self._at += nbytes

    def value(self) -> torch.Tensor:
        return self._value


def _prepare(base_source, adapter_source, precision, compute_dtype, device, cast_base_first, autocast_adapter_dtype,
             base_config, peft_arithmetic=False) -> _Prepared:
    if precision not in PRECISIONS:
        raise BadInputError(f"{param('precision', precision)}: choose one of {', '.join(PRECISIONS)}.")
    if compute_dtype not in COMPUTE_DTYPES:
        raise BadInputError(f"{param('compute_dtype', compute_dtype)}: choose one of {', '.join(COMPUTE_DTYPES)}.")
    if not autocast_adapter_dtype and not cast_base_first:
        raise BadInputError(f"{param('autocast_adapter_dtype', False, flag='--no-autocast-adapter-dtype')} only applies "
                            f"with {param('cast_base_first', True)} (a direct merge never "
                          "rounds the adapter).")
    dev = resolve_device(device)
    compute = dtypes.PRECISION_NAMES[compute_dtype]
    base = open_checkpoint(base_source, label=f"base {source_name(base_source)}", config=base_config)
    adapter = load_adapter(adapter_source)
    adapter.peft_arithmetic = peft_arithmetic
    plan = bind(adapter, base)

    # output tensors in base order; a tensor the base does not store follows the one it was tied to
    specs: list[OutTensor] = []
    shard_of: dict[str, Path] = {}
    extra_after: dict[str, list[str]] = {}
    for new_name in plan.new_tensors:
        extra_after.setdefault(_tie_anchor(base, plan, new_name), []).append(new_name)
    for name in base.names():
        entry = base.entry(name)
        specs.append(OutTensor(name, output_code(entry.dtype, precision), entry.shape))
        shard_of[name] = entry.file
        for new_name in extra_after.get(name, []):
            specs.append(OutTensor(new_name, output_code(entry.dtype, precision), entry.shape))
            shard_of[new_name] = entry.file
    cast_first = ("autocast" if autocast_adapter_dtype else "cast-all") if cast_base_first else None
    return _Prepared(base, adapter, plan, specs, shard_of, compute, dev, cast_first)


def _tie_anchor(base, plan, new_name) -> str:
    """The stored tensor that a new (untied) tensor is written after: the input embedding it was tied to."""

    origin, key = plan.new_tensors[new_name]
    if origin == "base":
        return key
    return next(n for n in base.names() if n.endswith(INPUT_EMBEDDING_SUFFIXES))


def _write_one(spec, base, adapter, plan, writer, compute, dev, result, cast_first=None):
    """One output tensor; `cast_first` None (direct merge), "autocast" or "cast-all" (PEFT on a d model)."""
    cast_base_first = cast_first is not None
    name = spec.name
    out_dtype = dtypes.torch_dtype_of(spec.dtype)
    if name in plan.new_tensors:
        origin, key = plan.new_tensors[name]
        if origin == "adapter":
            tied_dtype = base.entry(_tie_anchor(base, plan, name)).torch_dtype
            value = adapter.factor(key).to(tied_dtype).to(out_dtype)
            _write_checked(writer, value, name, _Sources(None, None, adapter, [key]))
            result.added.append(name)
            return
        source_name = key
        result.added.append(name)
    else:
        source_name = name
    entry = base.entry(source_name)
    touched = name in plan.deltas or name in plan.replacements or name in plan.bias_additions
    if not touched and spec.dtype == entry.dtype:
        if base.format == "safetensors":
            writer.copy_from(entry.file, entry.start, entry.nbytes)
        else:
            for piece in base.iter_raw(source_name):
                writer.write(piece)
        result.copied += 1
        return
    if not touched:
        for start, stop in row_chunks(entry.shape, 4):
            _write_checked(writer, base.read_rows(source_name, start, stop).to(out_dtype), name,
                           _Sources(base, source_name, None, []))
        result.cast += 1
        return

    replacement = plan.replacements.get(name)
    modules = plan.deltas.get(name, [])
    bias_module = plan.bias_additions.get(name)
    if replacement == TOKEN_ROWS:
        replaced_full = token_replacement(adapter, base, name)
    else:
        replaced_full = adapter.factor(replacement) if replacement else None
    # where a non-finite merged value can come from: the base tensor (unless replaced whole) and the adapter keys
    sources = _Sources(base if replaced_full is None or replacement == TOKEN_ROWS else None, source_name, adapter,
                       _adapter_keys(modules, bias_module, replacement))
    if any(isinstance(m, TunerModule) for m in modules):
        _write_tuner(spec, entry, base, adapter, modules, replaced_full, writer, compute, dev, cast_base_first,
                     sources)
        result.merged.append(name)
        return
    if any(not m.additive for m in modules):  # a variant that is not W + ΔW (DoRA)
        _write_dora(spec, entry, base, adapter, modules, replaced_full, writer, compute, dev, cast_base_first,
                    sources)
        result.merged.append(name)
        if replacement:
            result.replaced.append(name)
        return
    for start, stop in row_chunks(entry.shape, 4 * (1 + len(modules))):
        if replaced_full is not None:
            # PEFT loads a saved tensor into the base parameter, i.e. in the base dtype
            w = rows_of(replaced_full, start, stop).to(entry.torch_dtype)
        else:
            w = base.read_rows(source_name, start, stop)
        if cast_base_first:
            w = w.to(device=dev, dtype=out_dtype)
            for module in modules:
                # in place, as PEFT's merge: a float32 ΔW into a 16-bit weight sums in float32, then rounds to it
                w += _cast_first_delta(adapter, module, start, stop, compute, dev, out_dtype, cast_first)
            if bias_module is not None:
                w += rows_of(_cast_first_bias(adapter, bias_module, compute, dev, out_dtype, cast_first), start, stop)
            _write_checked(writer, w.cpu(), name, sources)
            continue
        w = w.to(device=dev, dtype=compute)
        for module in modules:
            w += delta_rows(adapter, module, start, stop, compute, dev)
        if bias_module is not None:
            w += rows_of(bias_delta(adapter, bias_module, compute, dev), start, stop)
        _write_checked(writer, w.to(out_dtype).cpu(), name, sources)
    if modules or bias_module is not None:
        result.merged.append(name)
    if replacement:
        result.replaced.append(name)


def _rounds_delta_to_weight_dtype(module) -> bool:
    """Whether PEFT rounds this module's ΔW to the weight's dtype before adding it: Embedding.merge does
    (`get_delta_weight(...).to(orig_dtype)`), and so does ParamWrapper.get_delta_weight (target_parameters modules,
    named by the parameter itself); Linear, Conv1D and ConvNd add their ΔW as computed."""
    return module.kind in ("embedding", "experts", "experts_t") or module.module == module.target


def _cast_first_delta(adapter, module, start, stop, compute, dev, out_dtype, cast_first) -> torch.Tensor:
    """Rows of the ΔW that PEFT adds into a weight loaded in `out_dtype` (peft/tuners/lora/layer.py, merge and
    get_delta_weight)."""
    if cast_first == "cast-all":  # autocast_adapter_dtype=False: factors held in d, ΔW in fp32 on CPU, rounded to d
        return delta_rows(adapter, module, start, stop, compute, dev, factor_dtype=out_dtype).to(out_dtype)
    delta = delta_rows(adapter, module, start, stop, compute, dev)  # factors upcast to fp32: exact
    return delta.to(out_dtype) if _rounds_delta_to_weight_dtype(module) else delta


def _cast_first_bias(adapter, module, compute, dev, out_dtype, cast_first) -> torch.Tensor:
    """s·lora_B.bias as PEFT adds it to a bias loaded in `out_dtype`: `lora_B.bias * scaling`, in the adapter's
    dtype (fp32 under autocast; d, from the bias rounded to d, without it)."""
    if cast_first == "cast-all":
        return adapter.factor(module.bias_key).to(device=dev, dtype=out_dtype) * module.scale
    return bias_delta(adapter, module, compute, dev)


def _write_dora(spec, entry, base, adapter, modules, replaced_full, writer, compute, dev, cast_base_first, sources):
    """A DoRA module's tensor, whole (its norms run along the input axis, which for Conv1D and Embedding crosses rows),
    computed as PEFT does in the compute dtype and rounded once."""

    if len(modules) > 1:
        raise LoratvError(f"{adapter.tensors.path}: {len(modules)} LoRA modules land on '{spec.name}' and one is DoRA; "
                          "their combined merge is not defined.")
    if cast_base_first:
        raise UnsupportedAdapterError(f"{adapter.config_path}: {param('cast_base_first', True)} is defined for additive "
                                      "LoRA only, not DoRA.")
    module = modules[0]
    w = replaced_full.to(entry.torch_dtype) if replaced_full is not None else base.read(entry.name)
    w = w.to(device=dev, dtype=compute)
    delta = delta_rows(adapter, module, 0, entry.shape[0], compute, dev)
    merged = module.merge_variant.merge(adapter, module, w, delta)  # DoRA: adapters/kinds/lora_variants/dora.py
    _write_checked(writer, merged.to(dtypes.torch_dtype_of(spec.dtype)).cpu(), spec.name, sources)


def _write_tuner(spec, entry, base, adapter, modules, replaced_full, writer, compute, dev, cast_base_first, sources):
    """A LoHa/LoKr/AdaLoRA/VeRA/IA³/OFT module's tensor, whole, in PEFT's order of operations in the compute dtype,
    rounded once to the output dtype (PEFT's merge adds or multiplies in the promoted dtype, then stores)."""
    name = adapter.settings.tuner_name
    if len(modules) > 1 or replaced_full is not None:
        raise LoratvError(f"{adapter.tensors.path}: '{spec.name}' carries a {name} module and another update; their "
                          "combined merge is not defined.")
    if cast_base_first:
        raise UnsupportedAdapterError(f"{adapter.config_path}: {param('cast_base_first', True)} is defined for LoRA "
                                      f"only, not {name}.")
    w = base.read(entry.name).to(device=dev, dtype=compute)
    merged = merged_value(adapter, modules[0], w)
    _write_checked(writer, merged.to(dtypes.torch_dtype_of(spec.dtype)).cpu(), spec.name, sources)


@dataclass
class _Sources:
    """The inputs of one merged tensor, to name the one that holds a NaN or Inf (or to clear them all)."""

    base: Checkpoint | None  # None when the base tensor does not enter the value (replaced whole)
    base_name: str | None
    adapter: Adapter | None
    adapter_keys: list


def _adapter_keys(modules, bias_module, replacement) -> list:
    """Every adapter tensor a merged tensor reads: LoRA factors, bias, magnitude, tuner tensors, a saved copy."""
    keys: list[str] = []
    for m in modules:
        if isinstance(m, TunerModule):
            keys.extend(k for k in m.keys.values() if isinstance(k, str))
        else:
            keys.extend(k for k in (m.a_key, m.b_key, m.bias_key, m.magnitude_key) if k)
    if bias_module is not None and bias_module.bias_key:
        keys.append(bias_module.bias_key)
    if replacement and replacement != TOKEN_ROWS:
        keys.append(replacement)
    return keys


def _nonfinite_error(name: str, dtype: torch.dtype, sources: _Sources | None) -> LoratvError:
    """Why merged tensor `name` holds a NaN or Inf: the input file that holds one, or, when every input is finite,
    an overflow of the output dtype. Inputs are re-read only on this failure path."""
    if sources is not None and sources.base is not None and sources.base_name is not None \
            and sources.base_name in sources.base:
        entry = sources.base.entry(sources.base_name)
        for start, stop in row_chunks(entry.shape, entry.element_size):
            if not dtypes.all_finite(sources.base.read_rows(sources.base_name, start, stop)):
                return LoratvError(f"{entry.file}: base tensor '{sources.base_name}' contains NaN or Inf, so the "
                                   f"merged tensor '{name}' is undefined; nothing was written.")
    where = []
    if sources is not None and sources.adapter is not None:
        files = []
        for key in sources.adapter_keys:
            sources.adapter.factor(key)  # raises, naming the adapter file, for a non-finite factor
            file = str(sources.adapter.tensors.entry(key).file)
            if file not in files:
                files.append(file)
        where += files
    if sources is not None and sources.base is not None and sources.base_name is not None \
            and sources.base_name in sources.base:
        where.insert(0, str(sources.base.entry(sources.base_name).file))
    shown = str(dtype).removeprefix("torch.")
    inputs = f"its inputs ({', '.join(where)}) are finite" if where else "its inputs are finite"
    return LoratvError(f"merged tensor '{name}' overflows {shown} to Inf: {inputs}, but the merged value exceeds the largest "
                       f"{shown} number ({torch.finfo(dtype).max:.5g}); merge with {param('precision', 'fp32')} or bf16 (nothing "
                       "was written).")


def _write_checked(writer, tensor: torch.Tensor, name: str, sources: _Sources | None = None):
    """Write one merged chunk, refusing a NaN or Inf with the input that holds it (or the overflow) named."""
    if not dtypes.all_finite(tensor):
        raise _nonfinite_error(name, tensor.dtype, sources)

    writer.write(tensor_to_bytes(tensor))


def _write_aux(base: Checkpoint, folder: Path, precision: str, untied: bool):
    for path in base.aux_files():
        if path.name == "config.json":
            continue
        shutil.copy2(path, folder / path.name)
    config = base.config
    if config is None:
        return
    if precision != "auto":
        name = dtypes.CONFIG_NAMES[dtypes.PRECISION_NAMES[precision]]
        config["torch_dtype"] = name
        if "dtype" in config:
            config["dtype"] = name
    if untied:
        config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
