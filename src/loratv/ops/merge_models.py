"""`merge-models`: several models of one architecture merged by a mergekit recipe, streamed tensor by tensor.

For each tensor of the reference model (the base model, or the first input without one), every input's tensor is
read, cast to the compute dtype (float32, or float64 on request), merged by the recipe's method with the parameters
resolved for that tensor (merging/recipe.py, merging/methods.py), and rounded once to the output dtype: the config's
`out_dtype`, else its `dtype`, else the tensor's stored dtype. Tensors that are not floating point are copied from the
reference. Memory (docs/merging.md): elementwise methods run on row blocks of every input after each input's trim is
found on its whole task vector; slerp, nuslerp and model_stock hold one tensor of every input. The output is sharded
like the reference (or by `max_shard_size`), atomic, with a manifest, the recipe in every shard's metadata, and a
model card (README.md) listing the recipe and the inputs' file hashes.
"""

import json
import math
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratv.common import dtypes
from loratv.common.devices import resolve_device
from loratv.common.prefetch import prefetched
from loratv.common.progress import progress_bar
from loratv.errors import BadInputError, LoratvError, param
from loratv.exec.executor import ExecutorSpec, parse_executor, run_tasks
from loratv.io.checkpoint import Checkpoint
from loratv.io.integrity import adapter_record, checkpoint_record, write_manifest
from loratv.io.outputs import atomic_output_dir, output_path, task_folder, task_output
from loratv.io.safetensors_format import tensor_to_bytes
from loratv.io.state_dict import open_checkpoint
from loratv.io.writer import OutTensor, ShardedWriter, finished, layout_by_size, layout_like, write_index
from loratv.merging import sparsify
from loratv.merging.methods import rounding_bound
from loratv.merging.recipe import Recipe, check_densities, layer_fraction, load_recipe, split_lora
from loratv.merging.verification import CERTIFIED
from loratv.numerics.precision import unit_roundoff
from loratv.ops.merge import merged_tensor, prepare_merge
from loratv.version import __version__

COMPUTE_DTYPES = ("fp32", "fp64")
BLOCK_ELEMENTS = 1 << 23  # elements of each input per row block of an elementwise merge (32 MiB in float32)
# elements per input of one step of an elementwise merge on the CPU: a step's temporaries (K task vectors, their sum)
# stay in the core's cache instead of making ~10 passes over 32 MiB blocks (3.5× less time, the same bits)
CACHE_ELEMENTS = 1 << 16
RECORD_FILE = "merge_models.json"
SCHEMA = "loratv.merge_models"
SCHEMA_VERSION = 1


@dataclass
class ModelMergeResult:
    """What `merge_models` wrote.

    Attributes:
        output: the output folder.
        method: the merge method.
        inputs: the input models, in the method's order.
        merged: names of the tensors merged.
        copied: names of the non-floating tensors copied from the reference.
    """

    output: Path
    method: str
    inputs: list
    merged: list = field(default_factory=list)
    copied: list = field(default_factory=list)

    def summary(self) -> str:
        """One line: what was merged and where it was written.

        Returns:
            The line.
        """
        return (f"merged {len(self.merged)} tensors of {len(self.inputs)} models with {self.method} "
                f"({len(self.copied)} non-floating tensors copied) -> {self.output}")


class LoraModel:
    """A `model+lora` input: the model with the adapter merged in, one tensor at a time when read (loratv merge's
    arithmetic in float32, row block by row block from the factors; no merged model is ever held or written)."""

    def __init__(self, model: str, lora: str):
        self.prepared = prepare_merge(model, lora, precision="fp32")
        self.base = self.prepared.base
        self.adapter = self.prepared.adapter
        self.path = self.base.path
        self.files = self.base.files
        self._names = {s.name for s in self.prepared.specs}
        self._held: tuple | None = None  # (name, merged tensor) whose rows are being read

    @property
    def config(self) -> dict | None:
        """The model's config.json."""
        return self.base.config

    def __contains__(self, name) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        """The merged model's tensor names.

        Returns:
            The model's names, and any the adapter adds (an untied head).
        """
        return [s.name for s in self.prepared.specs]

    def entry(self, name: str):
        """The model's own header entry of a tensor (its shape is the merged tensor's).

        Args:
            name: the tensor's name.

        Returns:
            The model's TensorEntry.
        """
        return self.base.entry(name)

    def shard_of(self, name: str) -> Path:
        """The model's file that holds a tensor.

        Args:
            name: the tensor's name.

        Returns:
            The file's path.
        """
        return self.base.shard_of(name)

    def read_rows(self, name: str, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of one merged tensor (merged whole once, kept while its rows are read).

        Args:
            name: the tensor's name.
            start: first row.
            stop: one past the last row.
            into: unused (the rows are a view of the merged tensor).

        Returns:
            The rows, in float32.

        Raises:
            LoratvError: the merged value holds a NaN or Inf.
        """
        if self._held is None or self._held[0] != name:
            self._held = None
            self._held = (name, self.read(name))
        return self._held[1][start:stop]

    def read(self, name: str) -> torch.Tensor:
        """One merged tensor, computed now from the model's tensor and the adapter's factors.

        Args:
            name: the tensor's name.

        Returns:
            The merged tensor in float32 (the merge's one rounding), on the CPU.

        Raises:
            LoratvError: the merged value holds a NaN or Inf.
        """
        return merged_tensor(self.prepared, name)

    def aux_files(self) -> list[Path]:
        """The model's tokenizer and other files.

        Returns:
            Their paths.
        """
        return self.base.aux_files()


def _open(ref: str):
    model, lora = split_lora(ref)
    return LoraModel(model, lora) if lora is not None else open_checkpoint(ref, label=f"model {ref}")


def _record(opened) -> dict:
    if isinstance(opened, LoraModel):
        return {"model": checkpoint_record(opened.base), "adapter": adapter_record(opened.adapter)}
    return checkpoint_record(opened)


def _open_inputs(recipe: Recipe) -> dict:
    opened = {ref: _open(ref) for ref in recipe.inputs()}
    kinds = {ref: (c.config or {}).get("model_type") for ref, c in opened.items()}
    if len({k for k in kinds.values() if k is not None}) > 1:
        listed = ", ".join(f"{ref} ({kind})" for ref, kind in kinds.items())
        raise BadInputError(f"{recipe.path}: the models are of different architectures: {listed}.")
    return opened


def _check_tensors(recipe: Recipe, reference_ref: str, reference: Checkpoint, opened: dict) -> None:
    for ref, ckpt in opened.items():
        for name in reference.names():
            if name not in ckpt:
                raise BadInputError(f"{ckpt.path}: model '{ref}' has no tensor {name}, which '{reference_ref}' has; "
                                    "the models of a merge must share every tensor.")
            want, got = reference.entry(name).shape, ckpt.entry(name).shape
            if tuple(want) != tuple(got):
                raise BadInputError(f"{ckpt.path}: tensor {name} of model '{ref}' has shape {list(got)}, not "
                                    f"{list(want)} as in '{reference_ref}'.")


def _num_layers(config: dict | None) -> int | None:
    config = config or {}
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _out_dtype(recipe: Recipe, stored: torch.dtype) -> torch.dtype:
    name = recipe.out_dtype or recipe.dtype
    return dtypes.PRECISION_NAMES[name] if name else stored


def _arithmetic_like_mergekit(recipe: Recipe, name: str, opened: dict) -> torch.dtype:
    """The dtype mergekit computes a tensor in: the config's `dtype` (every input cast to it as it is loaded), else
    the promotion of the inputs' stored dtypes (bf16 for bf16 inputs)."""
    if recipe.dtype is not None:
        return dtypes.PRECISION_NAMES[recipe.dtype]
    stored = [opened[ref].entry(name).torch_dtype for ref in recipe.inputs()]
    promoted = stored[0]
    for dtype in stored[1:]:
        promoted = torch.promote_types(promoted, dtype)
    return promoted


def held_buffers(buffers: dict | None) -> dict:
    """The merge's buffer pool, or a fresh one for a single call.

    Args:
        buffers: the pool kept for the whole merge, or None.

    Returns:
        A dict to hold the buffers in.
    """
    return {} if buffers is None else buffers


def _max_abs(tensor: torch.Tensor) -> float:
    """max |tensor| in one pass (aminmax: no temporary of the tensor's size), 0 for an empty one."""
    if not tensor.numel():
        return 0.0
    low, high = torch.aminmax(tensor)
    return max(-float(low), float(high))


def _buffer(buffers: dict, slot: int, reader: int, nbytes: int) -> torch.Tensor:
    """A uint8 read buffer for (prefetch slot, input), reused across blocks and tensors: no allocation churn."""
    held = buffers.get((slot, reader))
    if held is None or held.numel() < nbytes:
        held = buffers[(slot, reader)] = torch.empty(nbytes, dtype=torch.uint8)
    return held


@contextmanager
def _one_thread():
    """Run the enclosed torch operations on one intra-op thread: cache-sized steps gain nothing from a second
    thread, whose start-up per operation costs more than it saves and competes with the reader thread (measured in
    docs/benchmarks.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _in_cache_steps(method, base, inputs: list, per_model: dict, shared: dict, extra: dict, trims: list | None,
                    store: torch.dtype) -> torch.Tensor:
    """An elementwise merge of one row block, CACHE_ELEMENTS rows' worth at a time, each step rounded into a block of
    the output dtype (the operations are elementwise, so the bits are those of one call on the whole block)."""
    rows = inputs[0].shape[0]
    step = max(1, CACHE_ELEMENTS // max(1, inputs[0][0].numel()))
    out = torch.empty(inputs[0].shape, dtype=store)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        part = [x[start:stop] for x in inputs]
        if trims is None:
            out[start:stop] = method.merge(None if base is None else base[start:stop], part, per_model, shared,
                                           **extra)
        else:
            out[start:stop] = method.merge(base[start:stop], part, per_model, shared,
                                           trims=[None if t is None else t.rows(start, stop) for t in trims], **extra)
    return out


def _merged_blocks(recipe: Recipe, name: str, opened: dict, compute, dev, num_layers, seed: int,
                   buffers: dict | None = None, bounds: list | None = None, store: torch.dtype | None = None):
    """One tensor merged in the compute dtype, yielded as row blocks (with `store`, an elementwise merge on the CPU
    yields them already rounded to that dtype, computed a cache-sized step at a time).

    Elementwise methods (linear and the task-vector family) run on blocks of BLOCK_ELEMENTS per input, after their
    whole-tensor trims (kept sets, rescale factors) are computed one input at a time; memory is then the base and
    one input in full for a trim, else a block of each input. slerp, nuslerp and model_stock need whole-tensor norms
    and run on the whole tensor (the inputs in full, in the compute dtype)."""
    method, base_ref = recipe.method, recipe.base_model
    t = layer_fraction(name, num_layers)
    shared = recipe.shared_values(name, t)
    refs = recipe.inputs()
    weighted = refs if method.base_weighted or base_ref is None else [r for r in refs if r != base_ref]
    values = [recipe.model_values(ref, name, t) for ref in weighted]
    check_densities(recipe, name, weighted, values)
    per_model = {p.name: [v[p.name] for v in values] for p in method.parameters if p.per_model}
    uses_base = base_ref is not None and (method.needs_base or method.uses_base)
    extra: dict = {"key": (seed, name)} if method.randomised else {}
    bounded = bounds is not None and method.name in CERTIFIED and not shared.get("rescale")
    weights = per_model.get("weight", [])

    def bound(base, inputs, maxima=None):
        """Append the block's rounding bound, from the largest magnitudes (given by the reader, or found here)."""
        if not bounded or bounds is None:
            return
        if maxima is None:
            maxima = [_max_abs(t) for t in inputs] + ([_max_abs(base)] if base is not None else [])
        base_max = maxima[len(inputs)] if base is not None else 0.0
        bounds.append(rounding_bound(method.name, weights, shared, base_max, maxima[:len(inputs)], compute))

    def checked(ref, tensor):
        if not dtypes.all_finite(tensor):
            raise BadInputError(f"{opened[ref].shard_of(name)}: tensor {name} of model '{ref}' holds a NaN or Inf.")
        return tensor.to(device=dev, dtype=compute)

    def read(ref):
        return checked(ref, opened[ref].read(name))

    shape = tuple(opened[refs[0]].entry(name).shape)
    if not method.elementwise or not shape:
        base = read(base_ref) if uses_base else None
        inputs = [read(ref) for ref in weighted]
        bound(base, inputs)
        yield method.merge(base, inputs, per_model, shared, **extra)
        return
    trims: list | None = None
    rows = shape[0]
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(shape[1:])))
    if method.sparsification is not None:
        trims = []
        base_rows = _buffer(held_buffers(buffers), 2, 0, opened[base_ref].entry(name).nbytes // rows * step)
        for i, ref in enumerate(weighted):
            if per_model["density"][i] >= 1:
                trims.append(None)
                continue
            magnitude = read(ref)  # a fresh tensor read from the file (inputs are folders, files or hub ids)
            for r in range(0, rows, step):  # |δ| in place, the base read a block at a time (never whole)
                block = opened[base_ref].read_rows(name, r, min(rows, r + step), into=base_rows)
                magnitude[r:r + step].sub_(checked(base_ref, block))
            magnitude.abs_()
            trims.append(sparsify.trim_of(magnitude, method.sparsification, per_model["density"][i],
                                          gamma=per_model.get("gamma", [0.0] * len(weighted))[i],
                                          epsilon=per_model.get("epsilon", [0.0] * len(weighted))[i],
                                          rescale=shared["rescale"], key=(seed, name), position=i))
            del magnitude

    readers = weighted + ([base_ref] if uses_base else [])
    row_bytes = max(opened[ref].entry(name).nbytes // rows for ref in readers)
    held = held_buffers(buffers)
    slots = [[_buffer(held, slot, i, row_bytes * step) for i in range(len(readers))] for slot in (0, 1)]

    def read_block(span, slot):
        """The block of every input (and the base), and their largest magnitudes, found here on the reader thread
        (which mostly waits for the disk) when the block's bound is wanted."""
        start, stop = span
        read = [checked(ref, opened[ref].read_rows(name, start, stop, into=slots[slot][i]))
                for i, ref in enumerate(readers)]
        maxima = [_max_abs(t) for t in read] if bounded else None
        return read[:len(weighted)], read[len(weighted)] if uses_base else None, maxima

    stepped = store is not None and dev.type == "cpu"
    for (start, stop), (inputs, base, maxima) in prefetched([(r, min(rows, r + step)) for r in range(0, rows, step)],
                                                            read_block):
        bound(base, inputs, maxima)
        block_trims = None if method.sparsification is None else \
            [None if trim is None else trim.rows(start, stop) for trim in trims or []]
        if stepped:
            assert store is not None
            with _one_thread():
                merged = _in_cache_steps(method, base, inputs, per_model, shared, extra, block_trims, store)
            yield merged
        elif block_trims is None:
            yield method.merge(base, inputs, per_model, shared, **extra)
        else:
            yield method.merge(base, inputs, per_model, shared, trims=block_trims, **extra)


def _model_card(recipe: Recipe, records: dict) -> str:
    lines = [f"# Merged model ({recipe.method.name})", "",
             f"Made by loratv {__version__} `merge-models` from the recipe below, one rounding per element.", "",
             "## Recipe", "", "```yaml", recipe.text.rstrip("\n"), "```", "", "## Inputs", ""]
    for ref, record in records.items():
        lines.append(f"- `{ref}`")
        parts = [record] if "files" in record else [record["model"], record["adapter"]]
        for part in parts:
            for file, info in sorted(part.get("files", {}).items()):
                digest = info.get("header_sha256") or info.get("sha256") or info.get("head_sha256")
                lines.append(f"  - `{file}`: {info.get('size')} bytes, sha256 {digest}")
    return "\n".join(lines) + "\n"


def merge_models(config_path, out, *, compute_dtype: str = "fp32", device: str = "cpu",
                 max_shard_size: int | None = None, seed: int = 0, dtype_like_mergekit: bool = False,
                 force: bool = False, progress: bool = False,
                 executor: "str | ExecutorSpec" = "local") -> ModelMergeResult:
    """Merge the models of a mergekit recipe into one model folder.

    Args:
        config_path: the mergekit YAML configuration.
        out: the output folder (written beside its final path, renamed into place when complete).
        compute_dtype: "fp32" or "fp64": the dtype the method computes in before the one rounding.
        device: where the arithmetic runs ("cpu", "cuda", "cuda:N").
        max_shard_size: split shards at this many bytes (None: the reference model's layout).
        seed: keys DARE's and DELLA's masks (with the tensor name, the input's position and the element index), so
            they do not depend on processing order, threads or device.
        dtype_like_mergekit: compute each tensor in the dtype mergekit does — the config's `dtype`, else the
            inputs' own (bf16 arithmetic for bf16 inputs; linear and slerp work in float32 and round back) — instead
            of `compute_dtype`: mergekit's bits, with its roundings (docs/merging.md).
        force: replace an existing output.
        progress: show a progress bar.
        executor: "local", or "ray" / "ray=ADDRESS": one Ray task per output shard, each reading the recipe and
            opening the inputs itself (the output folder must be reachable from every worker); the files are the
            local run's, bit for bit.

    Returns:
        What was merged and copied.

    Raises:
        LoratvError: a bad recipe or input (one sentence naming the file), or an output that exists.
    """
    run_on = parse_executor(executor, device)
    prepared = _prepare(config_path, compute_dtype, device, seed, dtype_like_mergekit, max_shard_size)
    recipe, opened, reference = prepared.recipe, prepared.opened, prepared.reference
    metadata = {"format": "pt", "loratv_version": __version__, "loratv_operation": "merge-models",
                "merge_method": recipe.method.name, "recipe": recipe.text,
                "compute_dtype": "like mergekit" if dtype_like_mergekit else compute_dtype}
    if recipe.method.randomised:
        metadata["seed"] = str(seed)
    result = ModelMergeResult(output=output_path(out), method=recipe.method.name, inputs=recipe.inputs())
    records = {ref: _record(ckpt) for ref, ckpt in opened.items()}
    paths = [Path(recipe.path)] + [ckpt.path for ckpt in opened.values() if ckpt.path.exists()]
    paths += [ckpt.adapter.path for ckpt in opened.values() if isinstance(ckpt, LoraModel)]
    rows: list = []  # per merged tensor: its arithmetic and the largest rounding bound of what was computed
    elsewhere: dict = {}  # shards Ray tasks wrote straight to an object-store output
    with atomic_output_dir(out, paths, force=force) as tmp:
        if run_on.kind == "local":
            digests = _write_shards(prepared, prepared.shards, tmp, metadata, result, rows, progress)
        else:
            options = {"config_path": str(config_path), "compute_dtype": compute_dtype, "device": device,
                       "seed": seed, "dtype_like_mergekit": dtype_like_mergekit, "max_shard_size": max_shard_size}
            outcomes = run_tasks(run_on, merge_models_shard_task,
                                 [(options, file, task_folder(tmp), metadata) for file, _ in prepared.shards])
            for outcome in outcomes:
                result.merged += outcome["merged"]
                result.copied += outcome["copied"]
                rows += outcome["rows"]
            write_index(tmp, prepared.shards)
            digests = {file: outcome["sha256"] for (file, _), outcome in zip(prepared.shards, outcomes)}
            elsewhere = {file: {"size": outcome["size"], "sha256": outcome["sha256"]}
                         for (file, _), outcome in zip(prepared.shards, outcomes)}
        _write_aux(recipe, reference, tmp)
        (tmp / "README.md").write_text(_model_card(recipe, records), encoding="utf-8")
        record = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "loratv_version": __version__,
                  "merge_method": recipe.method.name, "inputs": recipe.inputs(),
                  "compute_dtype": "like mergekit" if dtype_like_mergekit else compute_dtype,
                  "seed": seed if recipe.method.randomised else None,
                  "base_model": recipe.base_model, "merged": result.merged, "copied": result.copied,
                  "tensors": rows}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        write_manifest(tmp, "merge-models", records, digests, elsewhere)
    return result


@dataclass
class _Prepared:
    """What the merge and each of its shard tasks share: the recipe, the opened inputs and the output layout."""

    recipe: Recipe
    opened: dict
    reference: Checkpoint
    shards: list
    compute: torch.dtype
    dev: torch.device
    num_layers: int | None
    seed: int
    dtype_like_mergekit: bool


def _prepare(config_path, compute_dtype: str, device: str, seed: int, dtype_like_mergekit: bool,
             max_shard_size: int | None) -> _Prepared:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadInputError(f"{param('seed', seed)}: give a non-negative integer.")
    if compute_dtype not in COMPUTE_DTYPES:
        raise BadInputError(f"{param('compute_dtype', compute_dtype)}: choose one of {', '.join(COMPUTE_DTYPES)}.")
    recipe = load_recipe(config_path)
    dev = resolve_device(device)
    compute = dtypes.PRECISION_NAMES[compute_dtype]
    opened = _open_inputs(recipe)
    reference_ref = recipe.base_model or recipe.inputs()[0]
    reference = opened[reference_ref]
    if isinstance(reference, LoraModel):  # the layout, config and tokenizer of the model under the adapter
        reference = reference.base
    _check_tensors(recipe, reference_ref, reference, opened)
    specs, shard_of = [], {}
    for name in reference.names():
        entry = reference.entry(name)
        stored = entry.torch_dtype
        dtype = _out_dtype(recipe, stored) if stored.is_floating_point else stored
        specs.append(OutTensor(name, dtypes.code_of(dtype), tuple(entry.shape)))
        shard_of[name] = entry.file
    shards = layout_by_size(specs, max_shard_size) if max_shard_size else layout_like(specs, shard_of, reference.files)
    return _Prepared(recipe, opened, reference, shards, compute, dev, _num_layers(reference.config), seed,
                     dtype_like_mergekit)


def _write_shards(prepared: _Prepared, shards: list, folder: Path, metadata: dict, result: ModelMergeResult,
                  rows: list, progress: bool = False) -> dict:
    """Write the given shards into `folder` (the index too when they are all of several), appending each merged
    tensor's record to `rows`; returns {shard file: sha256}."""
    recipe, opened, reference = prepared.recipe, prepared.opened, prepared.reference
    buffers: dict = {}  # read buffers of the row blocks, kept for the whole merge
    writer = ShardedWriter(folder, shards, metadata)
    with progress_bar(sum(s.nbytes for _, group in shards for s in group), "merge-models", enabled=progress) as bar, \
            finished(writer):
        for _file, group in shards:
            for spec in group:
                writer.begin(spec.name)
                if reference.entry(spec.name).torch_dtype.is_floating_point:
                    arithmetic = _arithmetic_like_mergekit(recipe, spec.name, opened) \
                        if prepared.dtype_like_mergekit else prepared.compute
                    bounds: list = []
                    for block in _merged_blocks(recipe, spec.name, opened, arithmetic, prepared.dev,
                                                prepared.num_layers, prepared.seed, buffers, bounds,
                                                store=dtypes.torch_dtype_of(spec.dtype)):
                        value = block.to(dtypes.torch_dtype_of(spec.dtype)).cpu()
                        if not dtypes.all_finite(value):
                            raise LoratvError(f"{recipe.path}: the merge of tensor {spec.name} overflows "
                                              f"{spec.dtype} (a NaN or Inf).")
                        writer.write(tensor_to_bytes(value.contiguous()))
                    result.merged.append(spec.name)
                    out_dtype = dtypes.torch_dtype_of(spec.dtype)
                    rows.append({"name": spec.name, "arithmetic": str(arithmetic).replace("torch.", ""),
                                 "max_rounding_bound": max(bounds) if bounds and None not in bounds else None,
                                 "plus_half_ulp_of_output": bool(bounds) and
                                 unit_roundoff(out_dtype) > unit_roundoff(arithmetic)})
                else:  # not floating point: the reference's bytes, kernel-copied from a safetensors file
                    entry = reference.entry(spec.name)
                    if reference.format == "safetensors" and entry.dtype == spec.dtype:
                        writer.copy_from(entry.file, entry.start, entry.nbytes)
                    else:
                        writer.write(tensor_to_bytes(reference.read(spec.name).contiguous()))
                    result.copied.append(spec.name)
                writer.end()
                bar.update(spec.nbytes)
    return writer.digests


def merge_models_shard_task(options: dict, file: str, folder: str, metadata: dict) -> dict:
    """One output shard of a model merge, as a unit of work for an executor: reads the recipe and opens the inputs
    itself, writes folder/file exactly as `merge_models` does, and returns only metadata.

    Args:
        options: `merge_models`'s arguments that define the output (config_path, compute_dtype, device, seed,
            dtype_like_mergekit, max_shard_size).
        file: the shard's file name (one of the layout's).
        folder: where the shard goes (outputs.task_folder: the output's temporary folder, or its temporary prefix
            in an object store).
        metadata: the shard header's metadata.

    Returns:
        {"sha256", "size", "merged", "copied", "rows"} for this shard ("rows": merge_models.json's tensor records).

    Raises:
        LoratvError: as `merge_models`, for the tensors of this shard.
    """
    prepared = _prepare(**options)
    group = dict(prepared.shards)[file]
    result = ModelMergeResult(output=Path(), method=prepared.recipe.method.name, inputs=prepared.recipe.inputs())
    rows: list = []
    with task_output(folder) as local:
        digests = _write_shards(prepared, [(file, group)], local, metadata, result, rows)
        size = (local / file).stat().st_size
    return {"sha256": digests[file], "size": size, "merged": result.merged, "copied": result.copied, "rows": rows}


def _write_aux(recipe: Recipe, reference: Checkpoint, folder: Path) -> None:
    """The reference's tokenizer and other files, and its config.json with the output dtype."""
    for path in reference.aux_files():
        if path.name not in ("config.json", "README.md"):
            shutil.copy2(path, folder / path.name)
    config = reference.config
    if config is None:
        return
    name = recipe.out_dtype or recipe.dtype
    if name:
        config["torch_dtype"] = dtypes.CONFIG_NAMES[dtypes.PRECISION_NAMES[name]]
        if "dtype" in config:
            config["dtype"] = config["torch_dtype"]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
