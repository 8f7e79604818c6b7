"""The Python API's file commands: each calls the same operation as the `loratv` command and returns a typed result.

Paths may be given as str or os.PathLike; `base` (and `finetuned`, where a model is read) may also be an
already-loaded state dict, `dict[str, torch.Tensor]`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Union

import torch

from loratv.adapters.adapter import named_adapter
from loratv.api.results import (
    Analysis,
    CombineResult,
    Comparison,
    ConvertResult,
    Inspection,
    MergeResult,
    MergeVerification,
    ModelMergeResult,
    PrecisionStudy,
    SimilarityResult,
    TaskVectorResult,
    ToLoraResult,
    VerifyResult,
)
from loratv.errors import BadInputError, param
from loratv.io import safe_json
from loratv.io.outputs import atomic_output_dir, guarded_inputs, output_path
from loratv.io.writer import parse_size
from loratv.ops import analyze as _analyze
from loratv.ops import combine as _combine
from loratv.ops import compare as _compare
from loratv.ops import convert as _convert
from loratv.ops import extract as _extract
from loratv.ops import inspect as _inspect
from loratv.ops import merge as _merge
from loratv.ops import merge_models as _merge_models
from loratv.ops import precision_study as _precision
from loratv.ops import similarity as _similarity
from loratv.ops import to_lora as _to_lora
from loratv.ops import validate as _validate
from loratv.ops import verify as _verify
from loratv.ops import verify_merge as _verify_merge

PathLike = Union[str, "os.PathLike[str]"]
StateDict = Mapping[str, torch.Tensor]
ModelSource = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]


def _source(source: ModelSource) -> str | Mapping[str, torch.Tensor]:
    return source if isinstance(source, Mapping) else os.fspath(source)


def merge(
    base: ModelSource,
    adapter: PathLike,
    output: PathLike,
    *,
    precision: str = "auto",
    compute_dtype: str = "fp32",
    device: str = "cpu",
    adapter_name: str | None = None,
    cast_base_first: bool = False,
    autocast_adapter_dtype: bool = True,
    peft_arithmetic: bool = False,
    max_shard_size: int | str | None = None,
    base_config: Mapping[str, object] | None = None,
    force: bool = False,
    progress: bool = False,
    executor: str = "local",
) -> MergeResult:
    """Merge a LoRA (or other PEFT) adapter into its base and write the merged model folder.

    The result equals PEFT's `merge_and_unload` bit for bit (with `cast_base_first=True`, on a model loaded in the
    output dtype); untouched tensors are copied byte for byte. Memory: one tensor at a time.

    Args:
        base: base model folder, weights file, hub id `org/name[@revision]`, or a state dict.
        adapter: PEFT adapter folder (or its adapter_config.json), or a single LoRA file (kohya, diffusers).
        output: the folder to write; it appears only once complete.
        precision: "auto" (keep each tensor's dtype), "fp32", "fp16" or "bf16".
        compute_dtype: "fp32" or "fp64": the dtype of base + ΔW before the one rounding to the output dtype.
        device: "cpu", "cuda" or "cuda:N".
        adapter_name: one of several named adapters saved in one folder (PEFT's subfolders).
        cast_base_first: reproduce PEFT on a model loaded in the output dtype (docs/math.md §6).
        autocast_adapter_dtype: PEFT's parameter of that name, with `cast_base_first`.
        peft_arithmetic: for HRA, PEFT's own merge (its n×n product and an n³ matmul per module) instead of loratv's
            compact WY evaluation in float64: PEFT's bits at PEFT's cost (docs/adapter-kinds.md).
        max_shard_size: split the output into shards of at most this many bytes, or a size such as "5GB"
            (None: the base's layout).
        base_config: for a state-dict base, its config.json as a dict (optional; it tells e.g. Conv1D layouts).
        force: replace an existing output.
        progress: show a progress bar on stderr.
        executor: "local" (this process), or "ray" / "ray=ADDRESS": Ray tasks that open their inputs themselves and
            write their own output files (one per output shard; the base cannot be a state dict); the output must be
            reachable from every worker, and the files are the local run's bit for bit (docs/scaling.md). A Ray session
            this process started already is used.

    Returns:
        MergeResult: what was merged, replaced, added, copied and cast.

    Raises:
        BadInputError: a parameter out of range, or an input that is unreadable, mismatched or non-finite.
        UnsupportedAdapterError: an adapter kind or feature the merge is not defined for.
        OutputExistsError: `output` exists and `force` is False.
        LoratvError: any other refusal (the base class of all three).
    """
    adapter_path = _named(adapter, adapter_name)
    if isinstance(max_shard_size, str):
        try:
            max_shard_size = parse_size(max_shard_size)
        except ValueError as exc:
            raise BadInputError(f"{param('max_shard_size', max_shard_size)}: {exc}.") from None
    result = _merge.merge(_source(base), adapter_path, os.fspath(output), precision=precision,
                          compute_dtype=compute_dtype, device=device, max_shard_size=max_shard_size,
                          cast_base_first=cast_base_first, autocast_adapter_dtype=autocast_adapter_dtype,
                          peft_arithmetic=peft_arithmetic,
                          base_config=dict(base_config) if base_config is not None else None, force=force,
                          progress=progress, executor=executor)
    return _merge_result(result, output_path(output))


def merge_models(
    config: PathLike,
    output: PathLike,
    *,
    compute_dtype: str = "fp32",
    device: str = "cpu",
    max_shard_size: int | str | None = None,
    seed: int = 0,
    dtype_like_mergekit: bool = False,
    force: bool = False,
    progress: bool = False,
    executor: str = "local",
) -> ModelMergeResult:
    """Merge several models of one architecture by a mergekit YAML recipe and write the merged model folder.

    The recipe is mergekit's (`models`, `merge_method`, `base_model`, `parameters` with layer gradients and `filter:`
    rules, `dtype`, `out_dtype`); the arithmetic is mergekit's, in `compute_dtype`, rounded once to the output dtype
    (docs/merging.md). Memory: one tensor of every input at a time.

    Args:
        config: the YAML configuration file.
        output: the folder to write; it appears only once complete.
        compute_dtype: "fp32" or "fp64".
        device: "cpu", "cuda" or "cuda:N".
        max_shard_size: split output shards at this many bytes, or a size such as "5GB" (None: the reference
            model's layout).
        seed: keys DARE's and DELLA's masks with the tensor name, the input's position and the element index: the
            same masks whatever the processing order, thread count or device.
        dtype_like_mergekit: compute in the dtype mergekit does (the config's `dtype`, else the inputs' own)
            instead of `compute_dtype`: mergekit's bits and roundings.
        force: replace an existing output.
        progress: show a progress bar on stderr.
        executor: "local" (this process), or "ray" / "ray=ADDRESS": Ray tasks that open their inputs themselves and
            write their own output files (one per output shard); the output must be reachable from every worker, and the
            files are the local run's bit for bit (docs/scaling.md). A Ray session this process started already is used.

    Returns:
        ModelMergeResult: what was merged and copied.

    Raises:
        BadInputError: a bad recipe, parameter or input (models of different shapes or architectures, NaN/Inf).
        UnsupportedAdapterError: a method, key or layout loratv refuses by name.
        OutputExistsError: `output` exists and `force` is False.
        LoratvError: any other refusal.
    """
    if isinstance(max_shard_size, str):
        try:
            max_shard_size = parse_size(max_shard_size)
        except ValueError as exc:
            raise BadInputError(f"{param('max_shard_size', max_shard_size)}: {exc}.") from None
    result = _merge_models.merge_models(os.fspath(config), os.fspath(output), compute_dtype=compute_dtype,
                                        device=device, max_shard_size=max_shard_size, seed=seed,
                                        dtype_like_mergekit=dtype_like_mergekit, force=force, progress=progress,
                                        executor=executor)
    return ModelMergeResult(output=output_path(output), method=result.method, inputs=tuple(result.inputs),
                            merged=tuple(result.merged), copied=tuple(result.copied))


def verify_merge(config: PathLike, merged: PathLike, output: PathLike | None = None, *,
                 dtype_like_mergekit: bool = False, force: bool = False) -> MergeVerification:
    """Check a merged model (loratv's, mergekit's or anyone's) against its mergekit recipe applied to the inputs.

    Every method is held to the rounding bound of the recipe's float32 arithmetic (certified) — slerp, nuslerp,
    model_stock and rescaled task vectors with their coefficients in the interval any order of summation allows —
    or, where no finite bound follows, to a stated tolerance; DARE/DELLA masks that loratv did not draw to what any
    mask allows (docs/merging.md).

    Args:
        config: the YAML recipe.
        merged: the merged model (folder, file or hub id).
        output: a folder for verify_merge.json (None: nothing is written).
        dtype_like_mergekit: hold the model to the arithmetic mergekit uses without `dtype: float32` (the config's
            dtype, else the inputs' own) instead of float32.
        force: replace an existing output.

    Returns:
        MergeVerification: the verdict, the failing tensors and the whole record.

    Raises:
        BadInputError: a bad recipe, input or merged model.
        UnsupportedAdapterError: a method, key or layout loratv refuses by name.
        LoratvError: any other refusal.
    """
    record = _verify_merge.verify_merge(os.fspath(config), os.fspath(merged),
                                        os.fspath(output) if output is not None else None,
                                        dtype_like_mergekit=dtype_like_mergekit, force=force)
    summary = record["summary"]
    return MergeVerification(verdict=summary["verdict"], certified=summary["certified"],
                             failing_tensors=tuple(summary["failing_tensors"]), record=record)


def _task_bytes(value: int | str | None, default: int) -> int:
    if value is None:
        return default
    try:
        size = parse_size(value) if isinstance(value, str) else int(value)
    except ValueError as exc:
        raise BadInputError(f"{param('task_bytes', value)}: {exc}.") from None
    if size <= 0:
        raise BadInputError(f"{param('task_bytes', value)}: give a positive size.")
    return size


def _merge_result(result: _merge.MergeResult, output: Path | None) -> MergeResult:
    return MergeResult(output=output, total_tensors=result.total_tensors, merged=tuple(result.merged),
                       replaced=tuple(result.replaced), added=tuple(result.added), copied=result.copied,
                       cast=result.cast, notes=tuple(result.notes))


def _named(adapter: PathLike, adapter_name: str | None) -> str:
    if adapter_name is None:
        return os.fspath(adapter)
    return str(named_adapter(os.fspath(adapter), adapter_name))


def extract(
    base: ModelSource,
    finetuned: ModelSource,
    output: PathLike,
    *,
    dense: bool = False,
    storage_dtype: str = "auto",
    force: bool = False,
    progress: bool = False,
    executor: str = "local",
    task_bytes: int | str | None = None,
) -> TaskVectorResult:
    """Write the task vector T = finetuned − base (exact, rounded once to the storage dtype) to a folder.

    Args:
        base: base model (folder, file, hub id or state dict).
        finetuned: fine-tuned model with the same tensors (folder, file, hub id or state dict).
        output: the folder to write (task_vector.safetensors, task_vector.json, loratv_manifest.json).
        dense: store unchanged tensors too (as zeros).
        storage_dtype: "auto" (float32, float64 for float64 inputs), "fp32" or "fp64".
        force: replace an existing output.
        progress: show a progress bar on stderr.
        executor: "local" (this process), or "ray" / "ray=ADDRESS": Ray tasks that open their inputs themselves and
            write their own output files (one per group of tensors; the models cannot be state dicts); the output must
            be reachable from every worker, and the files are the local run's bit for bit (docs/scaling.md). A Ray
            session this process started already is used.
        task_bytes: with Ray, the input bytes one task reads at most, or a size such as "1GB" (None: 2 GiB).

    Returns:
        TaskVectorResult: the record of task_vector.json.

    Raises:
        BadInputError: a parameter out of range, or models that differ in tensors, shapes or kinds.
        OutputExistsError: `output` exists and `force` is False.
        LoratvError: any other refusal (e.g. a NaN in an input).
    """
    _extract.extract(_source(base), _source(finetuned), os.fspath(output), dense=dense, storage_dtype=storage_dtype,
                     force=force, progress=progress, executor=executor,
                     task_bytes=_task_bytes(task_bytes, _extract.TASK_BYTES))
    record = safe_json.read(output_path(output) / _extract.REPORT_FILE)
    return TaskVectorResult(output=output_path(output), record=record)


def compare(
    base: ModelSource,
    adapter: PathLike,
    *,
    task_vector: PathLike | None = None,
    finetuned: ModelSource | None = None,
    output: PathLike | None = None,
    tolerance: float = _compare.DEFAULT_TOLERANCE,
    device: str = "cpu",
    adapter_name: str | None = None,
    plots: bool = True,
    force: bool = False,
    progress: bool = False,
    executor: str = "local",
    task_bytes: int | str | None = None,
) -> Comparison:
    """Compare an adapter's ΔW with a task vector, tensor by tensor, and certify their equivalence.

    Args:
        base: base model (folder, file, hub id or state dict).
        adapter: the adapter (as for `merge`).
        task_vector: a folder written by `extract` (give this or `finetuned`).
        finetuned: a fine-tuned model; T = finetuned − base is computed while streaming.
        output: a folder to write comparison_results.json, the text report, ΔW and (with `plots`) the plots into;
            None writes nothing and still returns the full result.
        tolerance: the max |T − ΔW| below which an uncertified comparison is "EQUIVALENT within tolerance".
        device: "cpu", "cuda" or "cuda:N".
        adapter_name: one of several named adapters in one folder.
        plots: with `output`, also write the PNG plots and report.html.
        force: replace an existing output.
        progress: show a progress bar on stderr.
        executor: "local" (this process), or "ray" / "ray=ADDRESS": Ray tasks that open their inputs themselves (one
            per group of tensors; the models cannot be state dicts); `output` must be reachable from every worker,
            and the record and files are the local run's bit for bit (docs/scaling.md).
        task_bytes: with Ray, the input bytes one task reads at most, or a size such as "1GB" (None: 2 GiB).

    Returns:
        Comparison: `.verdict`, `.counts`, `.tensors`, `.worst(n)` and `.to_dict()` (the JSON record).

    Raises:
        BadInputError: neither or both of `task_vector` and `finetuned`, a bad tolerance, or mismatched inputs.
        UnsupportedAdapterError: an adapter the comparison is not defined for.
        OutputExistsError: `output` exists and `force` is False.
        LoratvError: any other refusal. A comparison that is not equivalent is a result, not an error.
    """
    adapter_path = _named(adapter, adapter_name)
    tv = os.fspath(task_vector) if task_vector is not None else None
    ft = _source(finetuned) if finetuned is not None else None
    kwargs = dict(task_vector=tv, finetuned=ft, tolerance=tolerance, device=device, progress=progress,
                  executor=executor, task_bytes=_task_bytes(task_bytes, _compare.TASK_BYTES))
    if output is None:
        record = _compare.compare(_source(base), adapter_path, **kwargs)  # type: ignore[arg-type]
        return Comparison(record=record, output=None)
    inputs = guarded_inputs([base, adapter_path, tv, ft])
    with atomic_output_dir(os.fspath(output), inputs, force=force) as tmp:
        record = _compare.compare(_source(base), adapter_path, deltas_path=tmp / _compare.DELTAS_FILE,
                                  **kwargs)  # type: ignore[arg-type]
        _compare.write_comparison_files(record, tmp, plots=plots)
    return Comparison(record=record, output=output_path(output))


def validate(
    base: PathLike,
    adapter: PathLike,
    output: PathLike,
    *,
    precision: str = "fp32",
    tolerance: float = _compare.DEFAULT_TOLERANCE,
    device: str = "cpu",
    plots: bool = True,
    force: bool = False,
    progress: bool = False,
    executor: str = "local",
    task_bytes: int | str | None = None,
) -> Comparison:
    """Merge, extract and compare in one output folder (the seed's final_validation.py).

    Args:
        base: base model (folder, file or hub id).
        adapter: the adapter.
        output: the folder to write (merged model, task vector, comparison files).
        precision: the merge's output precision ("fp32", "fp16", "bf16" or "auto").
        tolerance: as for `compare`.
        device: "cpu", "cuda" or "cuda:N".
        plots: also write the plots and report.html.
        force: replace an existing output.
        progress: show progress bars on stderr.

    Returns:
        Comparison: the comparison of the adapter with the task vector of its own merge.

    Raises:
        LoratvError: bad parameters or inputs (see `merge` and `compare` for the subclasses).
    """
    record = _validate.validate(os.fspath(base), os.fspath(adapter), os.fspath(output), precision=precision,
                                tolerance=tolerance, device=device, plots=plots, force=force, progress=progress)
    return Comparison(record=record, output=output_path(output))


def precision_study(
    base: PathLike,
    adapter: PathLike,
    output: PathLike,
    *,
    paths: Sequence[str] | None = None,
    keep_merged: bool = False,
    tolerance: float = _compare.DEFAULT_TOLERANCE,
    device: str = "cpu",
    plots: bool = True,
    force: bool = False,
    progress: bool = False,
) -> PrecisionStudy:
    """Merge along several precision paths, extract and compare each (`loratv precision`).

    Args:
        base: base model (folder, file or hub id).
        adapter: the adapter.
        output: the folder to write.
        paths: the paths to run (names of loratv.ops.precision_study.PATHS; None: the defaults).
        keep_merged: keep each path's merged model.
        tolerance: as for `compare`.
        device: "cpu", "cuda" or "cuda:N".
        plots: also write the plots.
        force: replace an existing output.
        progress: show progress bars on stderr.

    Returns:
        PrecisionStudy: the study's record.

    Raises:
        BadInputError: an unknown path name.
        UnsupportedAdapterError: cast-first paths for an adapter that is not an additive LoRA.
        LoratvError: any other refusal.
    """
    if paths is not None:
        unknown = [p for p in paths if p not in _precision.PATHS]
        if unknown:
            raise BadInputError(f"{param('paths', list(paths), flag_value=unknown[0])}: choose from "
                                f"{', '.join(_precision.PATHS)}.")
    record = _precision.precision_study(os.fspath(base), os.fspath(adapter), os.fspath(output),
                                        paths=list(paths) if paths is not None else None, keep_merged=keep_merged,
                                        tolerance=tolerance, device=device, plots=plots, force=force,
                                        progress=progress)
    return PrecisionStudy(record=record, output=output_path(output))


def analyze(
    *,
    base: PathLike | None = None,
    adapter: PathLike | None = None,
    lora_deltas: PathLike | None = None,
    task_vector: PathLike | None = None,
    finetuned: PathLike | None = None,
    output: PathLike | None = None,
    spectrum: bool = False,
    exact_svd: bool = False,
    device: str = "cpu",
    plots: bool = True,
    force: bool = False,
    progress: bool = False,
) -> Analysis:
    """Statistics of a LoRA's ΔW against a task vector, per tensor, kind and layer (`loratv analyze`).

    Args:
        base: base model (needed with `adapter` and `finetuned`).
        adapter: the adapter (or give `lora_deltas`).
        lora_deltas: a lora_deltas.safetensors written by `compare`.
        task_vector: a folder written by `extract` (or give `finetuned`).
        finetuned: a fine-tuned model.
        output: a folder to write the report into; None writes nothing.
        spectrum: also compute singular-value spectra.
        exact_svd: full SVDs instead of randomized ones.
        device: "cpu", "cuda" or "cuda:N".
        plots: with `output`, also write the plots.
        force: replace an existing output.
        progress: show a progress bar on stderr.

    Returns:
        Analysis: the record of analysis_results.json.

    Raises:
        BadInputError: a missing input pair.
        LoratvError: any other refusal.
    """
    kwargs = dict(base=_opt(base), adapter=_opt(adapter), lora_deltas=_opt(lora_deltas),
                  task_vector=_opt(task_vector), finetuned=_opt(finetuned), spectrum=spectrum, exact_svd=exact_svd,
                  device=device, progress=progress)
    if output is None:
        return Analysis(record=_analyze.analyze(**kwargs))  # type: ignore[arg-type]
    record = _analyze.run_analysis(os.fspath(output), plots=plots, force=force, **kwargs)
    return Analysis(record=record, output=output_path(output))


def _opt(path: PathLike | None) -> str | None:
    return os.fspath(path) if path is not None else None


def to_lora(
    output: PathLike,
    *,
    base: PathLike | None = None,
    finetuned: PathLike | None = None,
    task_vector: PathLike | None = None,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    max_rank: int | None = None,
    include: str | None = None,
    exclude: str | None = None,
    skip_cast_artifacts: bool = False,
    dtype: str = "fp32",
    device: str = "cpu",
    force: bool = False,
    progress: bool = False,
    executor: str = "local",
    task_bytes: int | str | None = None,
) -> ToLoraResult:
    """Compress a task vector into a PEFT LoRA adapter by truncated SVD (`loratv to-lora`).

    Args:
        output: the adapter folder to write.
        base: base model (with `finetuned`, or to tell layouts).
        finetuned: a fine-tuned model (or give `task_vector`).
        task_vector: a folder written by `extract`.
        rank: one rank for every matrix (the default criterion, 16, when none is given).
        energy: the smallest rank keeping this fraction of each matrix's energy.
        max_error: the smallest rank with at most this relative Frobenius error.
        max_rank: a cap on the rank the criterion picks.
        include: a regular expression; only matching tensors.
        exclude: a regular expression; leave out matching tensors.
        skip_cast_artifacts: leave out tensors that are only the base cast to another dtype.
        dtype: the factors' dtype: "fp32", "fp16" or "bf16".
        device: "cpu", "cuda" or "cuda:N".
        force: replace an existing output.
        progress: show a progress bar on stderr.
        executor: "local" (this process), or "ray" / "ray=ADDRESS": Ray tasks that open their inputs themselves and
            compute the SVDs of a group of tensors each; `output` must be reachable from every worker, and the files
            are the local run's bit for bit (docs/scaling.md).
        task_bytes: with Ray, the task-vector bytes one task reads at most, or a size such as "1GB" (None: 1 GiB).

    Returns:
        ToLoraResult: the fidelity record.

    Raises:
        BadInputError: conflicting or out-of-range criteria, a bad pattern or dtype.
        LoratvError: any other refusal.
    """
    criterion = _to_lora.Criterion(rank=rank, energy=energy, max_error=max_error, max_rank=max_rank)
    record = _to_lora.to_lora(os.fspath(output), base=_opt(base), finetuned=_opt(finetuned),
                              task_vector=_opt(task_vector), criterion=criterion, include=include, exclude=exclude,
                              skip_cast_artifacts=skip_cast_artifacts, dtype=dtype, device=device, force=force,
                              progress=progress, executor=executor,
                              task_bytes=_task_bytes(task_bytes, _to_lora.TASK_BYTES))
    return ToLoraResult(record=record, output=output_path(output))


def combine(
    adapters: Sequence[PathLike],
    output: PathLike,
    *,
    weights: Sequence[float] | None = None,
    max_rank: int | None = None,
    max_error: float | None = None,
    dtype: str | None = None,
    force: bool = False,
    progress: bool = False,
) -> CombineResult:
    """Write a weighted sum of LoRA adapters as one PEFT LoRA adapter, with no base model (`loratv combine`).

    Exact by default (ranks concatenated, each weight and scaling folded into lora_A with one rounding); with
    `max_rank` or `max_error`, each module is recompressed by QR and SVD of its factors and the Frobenius error of what
    was dropped is stated (docs/combine.md).

    Args:
        adapters: the PEFT LoRA adapters (folders, files in them or hub ids).
        output: the adapter folder to write.
        weights: one weight per adapter, negative ones subtract (None: all 1).
        max_rank: recompress every module to at most this rank.
        max_error: recompress every module to the fewest triplets with at most this relative Frobenius error.
        dtype: the factors' dtype, "fp32", "fp16", "bf16" or "fp64" (None: the inputs' when they share one, else
            fp32).
        force: replace an existing output.
        progress: show a progress bar on stderr.

    Returns:
        CombineResult: the fidelity record.

    Raises:
        BadInputError: weights that do not match the adapters, a bad limit or dtype.
        LoratvError: an adapter combine refuses (DoRA, another tuner, …), factors that do not fit one another, a
            tensor saved whole whose adapters' weights do not sum to 1.
    """
    record = _combine.combine([os.fspath(a) for a in adapters], os.fspath(output),
                              weights=None if weights is None else list(weights),
                              recompression=_combine.Recompression(max_rank=max_rank, max_error=max_error),
                              dtype=dtype, force=force, progress=progress)
    return CombineResult(record=record, output=output_path(output))


def similarity(
    adapters: Sequence[PathLike],
    output: PathLike,
    *,
    task_vectors: Sequence[PathLike] | None = None,
    base: PathLike | None = None,
    duplicate_cosine: float = 0.99,
    sign_conflicts: bool = False,
    density: float = 0.2,
    plots: bool = True,
    force: bool = False,
    progress: bool = False,
    executor: str = "local",
    task_bytes: int | str | None = None,
) -> SimilarityResult:
    """Map how alike many adapters (and task vectors) on one base are (`loratv similarity`).

    The K×K global, per-layer and per-module-kind cosines and the subspace overlaps come from the factors, never a
    dense ΔW; the matrix is clustered, near-duplicates and outliers listed (docs/similarity.md).

    Args:
        adapters: PEFT LoRA adapters (folders, files in them or hub ids).
        output: the folder to write similarity.json and the plots into.
        task_vectors: folders written by `loratv extract`, compared too (needs `base`).
        base: the base model; adapters are bound to it (shapes checked).
        duplicate_cosine: pairs at or above this global cosine are listed as near-duplicates.
        sign_conflicts: also compute the pairwise sign-conflict rates and TIES's sign-agreement ratio on each
            tensor's top-k support (dense, O(K²·m·n) per tensor).
        density: the fraction of each tensor in an input's support, with sign_conflicts.
        plots: draw similarity_heatmap.png and similarity_per_layer.png.
        force: replace an existing output.
        progress: show a progress bar on stderr.
        executor: "local" (this process), or "ray" / "ray=ADDRESS": Ray tasks that open their inputs themselves and
            write their own output files (one per group of tensors, returning partial sums added in the local order);
            the output must be reachable from every worker, and the files are the local run's bit for bit
            (docs/scaling.md). A Ray session this process started already is used.
        task_bytes: with Ray, the input bytes one task reads at most, or a size such as "1GB" (None: 256 MiB of factors).

    Returns:
        SimilarityResult: the record.

    Raises:
        BadInputError: fewer than two inputs, task vectors without a base, a threshold outside [−1, 1], a density
            outside (0, 1].
        LoratvError: an adapter that is not additive LoRA, inputs of different bases or shapes.
    """
    record = _similarity.similarity([os.fspath(a) for a in adapters], os.fspath(output),
                                    task_vectors=[os.fspath(t) for t in task_vectors or []],
                                    base=_opt(base), duplicate_cosine=duplicate_cosine,
                                    sign_conflicts=sign_conflicts, density=density, plots=plots, force=force,
                                    progress=progress, executor=executor,
                                    task_bytes=_task_bytes(task_bytes, _similarity.TASK_BYTES))
    return SimilarityResult(record=record, output=output_path(output))


def convert(
    adapter: PathLike,
    output: PathLike,
    *,
    to: str,
    base: PathLike | None = None,
    force: bool = False,
) -> ConvertResult:
    """Convert an adapter between PEFT and kohya formats, factors copied bit for bit (`loratv convert`).

    Args:
        adapter: the adapter to convert (PEFT folder, kohya or diffusers file).
        output: the PEFT folder or kohya .safetensors file to write.
        to: "peft" or "kohya".
        base: the base model, to map flattened kohya names back (needed for kohya → PEFT).
        force: replace an existing output.

    Returns:
        ConvertResult: the record `loratv convert --json` prints.

    Raises:
        BadInputError: an unknown `to`.
        LoratvError: an adapter that cannot be converted without loss, or without `base`.
    """
    record = _convert.convert(os.fspath(adapter), os.fspath(output), to=to, base=_opt(base), force=force)
    return ConvertResult(record=record, output=output_path(output))


def inspect(
    source: PathLike,
    *,
    base: PathLike | None = None,
    config_only: bool = False,
    lora_targets: Sequence[str] | None = None,
    lora_ranks: Sequence[int] | None = None,
) -> Inspection:
    """Describe a model, an adapter or a config.json (`loratv inspect --json`).

    Args:
        source: model folder or file, adapter, config.json or hub id.
        base: for an adapter, its base (resolves Conv1D layouts and target parameters).
        config_only: describe a model from its config alone (no weights read).
        lora_targets: module names a LoRA would target, for its parameter count.
        lora_ranks: ranks to count a LoRA's parameters for.

    Returns:
        Inspection: the record.

    Raises:
        LoratvError: an unreadable source.
    """
    record = _inspect.describe(os.fspath(source), base=_opt(base), config_only=config_only,
                               lora_targets=list(lora_targets) if lora_targets is not None else None,
                               lora_ranks=list(lora_ranks) if lora_ranks is not None else None)
    return Inspection(record=record)


def verify(folder: PathLike) -> VerifyResult:
    """Re-check a folder written by `merge` or `extract` against its loratv_manifest.json (`loratv verify`).

    Args:
        folder: the output folder.

    Returns:
        VerifyResult: `.ok`, `.problems` and the record.

    Raises:
        LoratvError: never for a mismatch (that is in `.problems`); only for an unusable argument.
    """
    report = _verify.verify(os.fspath(folder))
    return VerifyResult(record=report.record(), output=Path(folder))
