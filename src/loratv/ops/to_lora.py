"""`loratv to-lora`: a task vector turned back into a PEFT LoRA adapter, with the error it makes stated per tensor.

What PEFT can hold, and how each changed tensor is written:
- a 2-D `.weight` of a Linear, Conv1D or Embedding module: a truncated SVD (spectrum.truncate) as lora_A/lora_B (or
  lora_embedding_A/B); every module gets its own rank through `rank_pattern` and `lora_alpha` equal to that rank
  through `alpha_pattern`, so PEFT's scaling alpha/r is exactly 1 and ΔW = lora_B @ lora_A is the truncation itself.
  Pattern keys are the full module names with their dots escaped: PEFT (≥ 0.15) matches them as regular
  expressions anchored at a dot;
- the bias of a module that carries a LoRA: its fine-tuned value as `<module>.base_layer.bias` with `bias =
  "lora_only"`, which PEFT loads into the base layer's own bias (exact);
- any other changed tensor (norm weights, biases of modules without a LoRA, tensors of other shapes): its whole
  module in `modules_to_save`, every parameter at its fine-tuned value (exact);
- nothing else: a changed tensor left out by --include/--exclude is listed as excluded, and its norm counts in the
  overall error.
"""

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from loratv.adapters.adapter import (
    CONV1D_MODEL_TYPES,
    CONV1D_MODULES,
    INPUT_EMBEDDING_SUFFIXES,
    OUTPUT_EMBEDDING_NAMES,
)
from loratv.adapters.lora_writer import WEIGHTS_NAME, write_adapter
from loratv.common import dtypes
from loratv.common.devices import resolve_device
from loratv.common.dtypes import PRECISION_NAMES, torch_dtype_of
from loratv.common.progress import progress_bar
from loratv.errors import BadInputError, LoratvError, param
from loratv.exec.executor import ExecutorSpec, byte_groups, parse_executor, run_tasks
from loratv.exec.parts import PARTS_FOLDER, PartWriter, read_part
from loratv.io import storage
from loratv.io.outputs import (
    atomic_output_dir,
    guarded_inputs,
    output_path,
    remove_task_files,
    task_file,
    task_folder,
)
from loratv.io.safetensors_format import read_header, tensor_to_bytes
from loratv.numerics.precision import cast_difference
from loratv.numerics.spectrum import truncate
from loratv.ops.task_vector_input import finetuned_value, open_task_vector, read_difference, tensor_names
from loratv.version import __version__

SCHEMA = "loratv.to_lora"
SCHEMA_VERSION = 1
FIDELITY_FILE = "to_lora_fidelity.json"
DEFAULT_RANK = 16
POSITION_EMBEDDING_SUFFIXES = ("wpe.weight", "embed_positions.weight", "position_embeddings.weight",
                               "token_type_embeddings.weight")
LORA = "lora"
LORA_BIAS = "full value (lora_only bias)"
SAVED_MODULE = "full value (modules_to_save)"
EXCLUDED = "excluded"
CAST_SKIPPED = "cast artifact (skipped)"
TIED = "tied to the input embedding"
TASK_BYTES = 1 << 30  # with an executor: task-vector bytes per task (each task's SVDs cost far more than its reads)


@dataclass
class Criterion:
    """How each module's rank is chosen: exactly one of rank, energy, max_error; max_rank caps the last two."""

    rank: int | None = None
    energy: float | None = None
    max_error: float | None = None
    max_rank: int | None = None

    def check(self) -> "Criterion":
        """Validate the criterion, defaulting to rank DEFAULT_RANK when none of rank, energy, max_error is given.

        Returns:
            This Criterion (rank set in place when it defaulted).

        Raises:
            LoratvError: BadInputError, when more than one criterion is given, rank or max_rank is below 1, energy
                is outside (0, 1], or max_error outside [0, 1).
        """
        given = sum(c is not None for c in (self.rank, self.energy, self.max_error))
        if given > 1:
            raise BadInputError(f"give one of {param('rank')}, {param('energy')} or {param('max_error')}, not several.")
        if given == 0:
            self.rank = DEFAULT_RANK
        if self.rank is not None and self.rank < 1:
            raise BadInputError(f"{param('rank', self.rank)}: must be at least 1.")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise BadInputError(f"{param('energy', self.energy)}: must lie in (0, 1].")
        if self.max_error is not None and not 0.0 <= self.max_error < 1.0:
            raise BadInputError(f"{param('max_error', self.max_error)}: must lie in [0, 1) (a relative Frobenius error).")
        if self.max_rank is not None and self.max_rank < 1:
            raise BadInputError(f"{param('max_rank', self.max_rank)}: must be at least 1.")
        return self

    def record(self) -> dict:
        """The criterion as recorded in to_lora_fidelity.json.

        Returns:
            rank, energy, max_error and max_rank (None where not given).
        """
        return {"rank": self.rank, "energy": self.energy, "max_error": self.max_error, "max_rank": self.max_rank}


@dataclass
class TensorFidelity:
    name: str
    shape: tuple
    handling: str
    norm: float  # ‖T‖_F
    error: float  # ‖T − what the adapter adds‖_F, with the adapter's tensors as stored
    kind: str | None = None  # linear, conv1d or embedding for a LoRA
    rank: int | None = None
    method: str | None = None

    @property
    def module(self) -> str:
        """The tensor's module: its name without the last dotted part."""
        return self.name.rpartition(".")[0]

    def record(self) -> dict:
        """The tensor's entry in to_lora_fidelity.json.

        Returns:
            Name, module, shape, handling, LoRA kind, rank and SVD method, ‖T‖_F, the error norm, the relative error
            (0.0 for a zero T) and the energy retained (1 − relative error²).
        """
        relative = self.error / self.norm if self.norm > 0 else 0.0
        return {
            "name": self.name,
            "module": self.module,
            "shape": list(self.shape),
            "handling": self.handling,
            "kind": self.kind,
            "rank": self.rank,
            "svd": self.method,
            "task_vector_norm": self.norm,
            "error_norm": self.error,
            "relative_error": relative,
            "energy_retained": 1.0 - relative**2,
        }


def lora_kind(name: str, shape, model_type: str | None) -> str | None:
    """How PEFT would put a LoRA on this tensor's module (None: it cannot).

    Args:
        name: the tensor's name.
        shape: its shape.
        model_type: config.json's model_type (decides Conv1D), or None.

    Returns:
        "embedding" (an input or position embedding), "conv1d" (a Conv1D module of a Conv1D model type), "linear"
        for any other 2-D `.weight`, or None for anything else.
    """
    if len(shape) != 2 or not name.endswith(".weight"):
        return None
    if name.endswith(INPUT_EMBEDDING_SUFFIXES + POSITION_EMBEDDING_SUFFIXES):
        return "embedding"
    leaf = name[: -len(".weight")].rsplit(".", 1)[-1]
    if model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_MODULES:
        return "conv1d"
    return "linear"


def lora_factors(cut, kind: str, dtype: torch.dtype) -> tuple:
    """(A, B) as PEFT stores them for ΔW ≈ U S Vᵀ of the stored tensor: Linear ΔW = B @ A; Conv1D and Embedding
    store the transpose, ΔW = (B @ A)ᵀ.

    Args:
        cut: the Truncation of the tensor (spectrum.truncate), float64 factors a (k, n) and b (m, k).
        kind: "linear", "conv1d" or "embedding" (lora_kind).
        dtype: the dtype the factors are stored in.

    Returns:
        (A, B) in `dtype`, contiguous, on the CPU.
    """
    if kind == "linear":
        a, b = cut.a, cut.b
    else:
        a, b = cut.b.T, cut.a.T
    return a.to(dtype).contiguous().cpu(), b.to(dtype).contiguous().cpu()


def _pattern(text: str | None, flag: str):
    if text is None:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise BadInputError(f"{param(flag, text, flag_value=repr(text))}: not a valid regular expression ({exc}).") from None


def _model_config(base, tv) -> dict:
    if base is not None:
        return base.config or {}
    recorded = getattr(tv, "recorded_base", None)
    if recorded and (Path(recorded) / "config.json").is_file():
        try:
            return json.loads((Path(recorded) / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}
    return {}


def to_lora(out, *, base=None, finetuned=None, task_vector=None, criterion: Criterion | None = None,
            include: str | None = None, exclude: str | None = None, skip_cast_artifacts: bool = False,
            dtype: str = "fp32", device: str = "cpu",
            force: bool = False, progress: bool = False, command: str | None = None,
            executor: "str | ExecutorSpec" = "local", task_bytes: int = TASK_BYTES) -> dict:
    """Turn a task vector into a PEFT LoRA adapter in `out`, with to_lora_fidelity.json stating the error per tensor.

    Args:
        out: the output folder (written atomically): adapter_config.json, adapter_model.safetensors and
            to_lora_fidelity.json.
        base: the base model; required with `finetuned`, optional with `task_vector` (needed to prove cast
            artifacts, to save modules whole, and to find Conv1D modules from its config).
        finetuned: a fine-tuned model; T = fine-tuned − base (exactly one of this and `task_vector`).
        task_vector: a folder or file written by `loratv extract`.
        criterion: how each module's rank is chosen; None: Criterion() (rank DEFAULT_RANK).
        include: a regular expression; changed tensors whose name it does not match (re.search) are excluded.
        exclude: a regular expression; changed tensors whose name it matches are excluded.
        skip_cast_artifacts: leave out tensors whose T is exactly the base cast to the fine-tuned dtype.
        dtype: the dtype of the LoRA factors: "fp32", "fp16" or "bf16".
        device: where the SVDs are computed ("cpu", "cuda", ...).
        force: replace an existing output folder.
        progress: show a progress bar.
        command: the command line, recorded in the fidelity record.
        executor: "local", or "ray" / "ray=ADDRESS": one Ray task per group of tensors of at most `task_bytes`, each
            opening the inputs itself, computing its SVDs and returning the factors through a part file in the
            output's temporary folder (reachable from every worker); the adapter is the local run's, bit for bit.
        task_bytes: with Ray, the task-vector bytes one task reads at most.

    Returns:
        The fidelity record (schema loratv.to_lora), as written to to_lora_fidelity.json.

    Raises:
        LoratvError: a bad criterion, regular expression or dtype (BadInputError); the inputs' errors
            (open_task_vector, read_difference); a tied output head that changed otherwise than its embedding; a
            changed tensor in no module; or nothing left to write.
    """
    criterion = (criterion or Criterion()).check()
    for pattern, flag in ((include, "include"), (exclude, "exclude")):
        _pattern(pattern, flag)  # a bad expression is refused before any input is opened
    run_on = parse_executor(executor, device)
    if dtype not in ("fp32", "fp16", "bf16"):
        raise BadInputError(f"{param('dtype', dtype)}: choose fp32, fp16 or bf16.")
    storage = PRECISION_NAMES[dtype]
    dev = resolve_device(device)
    base_ckpt, tv = open_task_vector(base, task_vector=task_vector, finetuned=finetuned)
    config = _model_config(base_ckpt, tv)
    model_type = config.get("model_type")
    names = tensor_names(base_ckpt, tv)
    notes = []
    if not config:
        notes.append("no model config found: 2-D weights are taken as nn.Linear (pass --base for Conv1D models).")
    tied = config.get("tie_word_embeddings", True) and any(n.endswith(INPUT_EMBEDDING_SUFFIXES) for n in names)

    inputs = guarded_inputs([base, finetuned, task_vector])
    settings = _Settings(criterion, include, exclude, skip_cast_artifacts, storage, dev, tied, model_type)
    with atomic_output_dir(out, inputs, force=force) as tmp:
        factors, kinds, fidelity, full_needed, casts = {}, {}, {}, {}, []
        if run_on.kind == "local":
            outcomes = _convert(tv, base_ckpt, names, names, settings, None, progress)
        else:
            outcomes = _convert_as_tasks(run_on, (base, finetuned, task_vector), tv, base_ckpt, names, settings,
                                         device, task_bytes, tmp)
        for outcome in outcomes:
            if outcome.cast:
                casts.append(outcome.name)
            if outcome.fidelity is not None:
                fidelity[outcome.name] = outcome.fidelity
            if outcome.factors is not None:
                module = outcome.name[: -len(".weight")]
                factors[module] = outcome.factors
                kinds[module] = outcome.kind
            elif outcome.whole or outcome.tied:  # the driver's part (biases, norms; the tied head): T read again
                t = outcome.value if outcome.value is not None else read_difference(tv, base_ckpt, outcome.name)
                if outcome.tied:
                    fidelity[outcome.name] = _tied_head(tv, base_ckpt, names, outcome.name, t)
                else:
                    full_needed[outcome.name] = t
        if run_on.kind != "local":
            remove_task_files(task_folder(tmp), PARTS_FOLDER)
        if casts:
            dtype_name = tv.finetuned_dtype(casts[0])
            notes.append(
                f"{len(casts)} changed tensors are only the base rounded to {dtype_name} (cast artifacts, proven bit for "
                "bit); " + ("they are left out: loading the base in that dtype reproduces them exactly." if
                            skip_cast_artifacts else "pass --skip-cast-artifacts to leave them out (loading the base "
                            "in that dtype reproduces them)."))
        full_values, saved_modules = _full_values(tv, base_ckpt, names, full_needed, factors, kinds, fidelity)
        if not factors and not full_values:
            raise LoratvError(f"{tv.source}: no changed tensor is left to write (the task vector is zero or all of it was excluded).")
        bias_mode = "lora_only" if any(k.endswith(".base_layer.bias") for k in full_values) else "none"
        write_adapter(tmp, factors, base_model=str(base) if base else getattr(tv, "recorded_base", None), dtype=storage,
                      kinds=kinds, full_values=full_values, modules_to_save=saved_modules, bias=bias_mode,
                      operation="to-lora", metadata={"loratv_version": __version__})
        record = _record(tv, base, criterion, dtype, fidelity, notes, tmp, command, names)
        (tmp / FIDELITY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


@dataclass(frozen=True)
class _Settings:
    """What decides each tensor's handling: the rank criterion, the filters, the factor dtype and device."""

    criterion: Criterion
    include: str | None
    exclude: str | None
    skip_cast_artifacts: bool
    storage: torch.dtype
    dev: torch.device
    tied: bool
    model_type: str | None


@dataclass
class _Outcome:
    """One changed tensor's handling: its fidelity row, and its LoRA factors, or a flag that the driver keeps it
    whole or treats it as the tied head (both read again there: they are small, or need other tensors)."""

    name: str
    fidelity: TensorFidelity | None = None
    cast: bool = False
    kind: str | None = None
    factors: tuple | None = None  # (A, B), as stored
    whole: bool = False
    tied: bool = False
    value: torch.Tensor | None = None  # T of a whole or tied tensor, kept when converting in this process


def _convert(tv, base_ckpt, names: list, group: list, settings: _Settings, part: PartWriter | None,
             progress: bool = False) -> list:
    """The outcome of each changed tensor of `group` (names: all of the task vector's, for the tied-head test);
    with `part`, the factors go to the part file instead of the outcome."""
    include_re, exclude_re = _pattern(settings.include, "include"), _pattern(settings.exclude, "exclude")
    criterion = settings.criterion
    outcomes = []
    with progress_bar(len(group), "to-lora", enabled=progress) as bar:
        for name in group:
            bar.update(1)
            t = read_difference(tv, base_ckpt, name)
            if t is None:
                continue
            outcome = _Outcome(name)
            outcomes.append(outcome)
            if (include_re and not include_re.search(name)) or (exclude_re and exclude_re.search(name)):
                outcome.fidelity = TensorFidelity(name, tuple(t.shape), EXCLUDED, _norm(t), _norm(t))
                continue
            outcome.cast = _cast_dtype(tv, base_ckpt, name, t) is not None
            if outcome.cast and settings.skip_cast_artifacts:
                outcome.fidelity = TensorFidelity(name, tuple(t.shape), CAST_SKIPPED, _norm(t), _norm(t))
                continue
            if settings.tied and name in OUTPUT_EMBEDDING_NAMES:
                outcome.tied, outcome.value = True, t if part is None else None
                continue
            kind = lora_kind(name, t.shape, settings.model_type)
            if kind is None:
                outcome.whole, outcome.value = True, t if part is None else None
                continue
            cut = truncate(t.to(settings.dev), rank=criterion.rank, energy=criterion.energy,
                           max_error=criterion.max_error, max_rank=criterion.max_rank, storage_dtype=settings.storage)
            outcome.fidelity = TensorFidelity(name, tuple(t.shape), LORA, cut.frobenius, cut.stored_error, kind,
                                              cut.rank, cut.method)
            if cut.rank == 0:
                continue
            outcome.kind = kind
            a, b = lora_factors(cut, kind, settings.storage)
            if part is None:
                outcome.factors = (a, b)
            else:
                part.begin(name + ".A", dtypes.code_of(a.dtype), a.shape)
                part.write(tensor_to_bytes(a))
                part.end()
                part.begin(name + ".B", dtypes.code_of(b.dtype), b.shape)
                part.write(tensor_to_bytes(b))
                part.end()
    return outcomes


def to_lora_group_task(sources: tuple, group: list, settings: _Settings, part: str) -> tuple[list, dict]:
    """A group of tensors of a to-lora conversion, as a unit of work for an executor: opens the inputs itself,
    decides each changed tensor's handling as `to_lora` does and appends the LoRA factors to the file `part`.

    Args:
        sources: (base, finetuned, task_vector), as `to_lora` got them.
        group: the tensors of this group, in order.
        settings: the criterion, filters, factor dtype and device.
        part: the part file for the factors, a local path or a URL (rewritten from scratch).

    Returns:
        (the outcome of each changed tensor, with factors=None; {"NAME.A" / "NAME.B": ((offset, nbytes), dtype code,
        shape)} of the factors in the part file).

    Raises:
        LoratvError: as `to_lora`, for these tensors.
    """
    base, finetuned, task_vector = sources
    base_ckpt, tv = open_task_vector(base, task_vector=task_vector, finetuned=finetuned)
    with task_file(part) as local:
        writer = PartWriter(local)
        try:
            outcomes = _convert(tv, base_ckpt, tensor_names(base_ckpt, tv), group, settings, writer)
        finally:
            writer.close()
    return outcomes, {key: (span, writer.codes[key], writer.shapes[key]) for key, span in writer.spans.items()}


def _convert_as_tasks(run_on: ExecutorSpec, sources: tuple, tv, base_ckpt, names: list, settings: _Settings,
                      device: str, task_bytes: int, folder: Path) -> list:
    """One executor task per group of at most task_bytes of task vector; the driver reads the factors back from
    the tasks' part files, in order, so the adapter is the local run's bit for bit."""
    if any(isinstance(s, Mapping) for s in sources):
        raise BadInputError(f"{param('executor', str(run_on))} sends paths to its tasks, not tensors: give the models "
                            "as folders, files or hub ids, not state dicts.")
    stored = base_ckpt if base_ckpt is not None else tv.tensors
    groups = byte_groups([stored.entry(n).nbytes if n in stored else 0 for n in names], task_bytes)
    parts = storage.as_path(task_folder(folder)) / PARTS_FOLDER
    shipped = tuple(None if s is None else str(s) for s in sources)
    jobs = [(shipped, [names[i] for i in group], settings, str(parts / f"to-lora-{g:05d}.part"))
            for g, group in enumerate(groups)]
    results = run_tasks(run_on, to_lora_group_task, jobs)
    outcomes = []
    for job, (group_outcomes, spans) in zip(jobs, results):
        for outcome in group_outcomes:
            if outcome.kind is not None:
                outcome.factors = tuple(read_part(output_path(job[3]), *spans[outcome.name + suffix])
                                        for suffix in (".A", ".B"))
            outcomes.append(outcome)
    return outcomes


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.reshape(-1).double()))


def _cast_dtype(tv, base, name, t):
    """The fine-tuned dtype when T is exactly the base rounded to it (a cast artifact), else None."""
    code = tv.finetuned_dtype(name)
    if base is None or code is None or code == base.entry(name).dtype:
        return None

    target = torch_dtype_of(code)
    return target if torch.equal(t, cast_difference(base.read(name), target)) else None


def _tied_head(tv, base, names, name, t) -> TensorFidelity:
    """A stored output head tied to the input embedding changes with it; a LoRA on both would count it twice."""
    embedding = next(n for n in names if n.endswith(INPUT_EMBEDDING_SUFFIXES))
    partner = read_difference(tv, base, embedding)
    if partner is None or partner.shape != t.shape or not torch.equal(partner, t):
        raise LoratvError(f"{tv.source}: '{name}' is tied to '{embedding}' by the config but changed differently; "
                          "untie it in config.json or exclude one of them.")
    return TensorFidelity(name, tuple(t.shape), TIED, _norm(t), 0.0)


def _full_values(tv, base, names, full_needed, factors, kinds, fidelity):
    """Adapter keys -> fine-tuned values for tensors a LoRA cannot hold, and the modules saved whole."""
    full, saved = {}, set()
    for name, t in full_needed.items():
        module, _, leaf = name.rpartition(".")
        if not module:
            raise LoratvError(f"{tv.source}: tensor '{name}' changed but belongs to no module, so no PEFT adapter can hold it.")
        if leaf == "bias" and module in factors:
            value = finetuned_value(tv, base, name, t)
            full[f"{module}.base_layer.bias"] = value
            fidelity[name] = TensorFidelity(name, tuple(t.shape), LORA_BIAS, _norm(t), _value_error(base, name, value, t))
        else:
            saved.add(module)
    for module in sorted(saved):
        factors.pop(module, None)  # a module saved whole needs no LoRA: its weight is stored exactly
        kinds.pop(module, None)
        full.pop(f"{module}.base_layer.bias", None)  # its bias is saved with it, under its own name
        for name in (n for n in names if n.rpartition(".")[0] == module):
            t = full_needed.get(name)
            if t is None:
                t = read_difference(tv, base, name)
            if t is None:
                if base is None:
                    raise LoratvError(f"{tv.source}: module '{module}' must be saved whole, and its unchanged '{name}' "
                                      f"needs the base ({param('base')}).")
                full[name] = base.read(name)
                continue
            value = finetuned_value(tv, base, name, t)
            full[name] = value
            fidelity[name] = TensorFidelity(name, tuple(t.shape), SAVED_MODULE, _norm(t), _value_error(base, name, value, t))
    return full, sorted(saved)


def _value_error(base, name, value, t) -> float:
    """‖(stored value − W) − T‖: zero when the value is the fine-tuned tensor itself."""
    if base is None:
        return 0.0
    return _norm(value.to(torch.float64) - base.read(name).to(torch.float64) - t)


def _record(tv, base, criterion, dtype, fidelity, notes, folder: Path, command, names) -> dict:
    rows = [fidelity[n] for n in names if n in fidelity]
    norm = math.sqrt(sum(r.norm**2 for r in rows))
    error = math.sqrt(sum(r.error**2 for r in rows))
    ranks = [r.rank for r in rows if r.handling == LORA and r.rank]
    by_handling = Counter(r.handling for r in rows)
    weights = folder / WEIGHTS_NAME
    relative = error / norm if norm > 0 else 0.0
    changed_parameters = sum(math.prod(r.shape) for r in rows)

    stored = sum(e.numel for e in read_header(weights)[0]) if weights.is_file() else 0
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "command": command,
        "base": str(base) if base is not None else None,
        "task_vector": tv.source,
        "task_vector_kind": "fine-tuned minus base (computed)" if tv.live else "stored",
        "criterion": criterion.record(),
        "factor_dtype": dtype,
        "notes": notes,
        "summary": {
            "changed_tensors": len(rows),
            "lora_modules": len(ranks),
            "full_value_tensors": by_handling[LORA_BIAS] + by_handling[SAVED_MODULE],
            "excluded_tensors": by_handling[EXCLUDED],
            "skipped_cast_artifacts": by_handling[CAST_SKIPPED],
            "tied_tensors": by_handling[TIED],
            "rank_min": min(ranks) if ranks else None,
            "rank_max": max(ranks) if ranks else None,
            "rank_total": sum(ranks),
            "task_vector_norm": norm,
            "error_norm": error,
            "relative_error": relative,
            "energy_retained": 1.0 - relative**2,
            "changed_parameters": changed_parameters,
            "adapter_parameters": stored,
            "adapter_bytes": weights.stat().st_size if weights.is_file() else 0,
        },
        "tensors": [r.record() for r in rows],
    }
