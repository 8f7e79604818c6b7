"""`loratv combine`: a weighted sum of LoRA adapters written as one PEFT LoRA adapter, with no base model.

For adapters i = 1…K with weights wᵢ (negative ones subtract), each module's update is Σᵢ wᵢ·sᵢ·Bᵢ@Aᵢ, sᵢ the
adapter's own scaling for that module (alpha/r, or alpha/√r with rsLoRA; rank_pattern and alpha_pattern applied).
A module some adapters lack gets only the others' terms (the union of the target sets).

- **Exact (the default).** The ranks are concatenated: A = [c₁A₁; …; c_KA_K] with cᵢ = wᵢsᵢ folded in (the product
  taken in float64, rounded once to the output dtype: one rounding per element of A; B = [B₁ … B_K] is exact when
  the output dtype holds the inputs' B), r = Σ rᵢ and lora_alpha = r through rank_pattern/alpha_pattern, so PEFT's
  scaling is 1 and ΔW = B@A = Σ cᵢBᵢAᵢ up to those roundings. PEFT's `add_weighted_adapter(…, "cat")` folds the
  same way in two roundings, and keeps adapter 0's use_rslora, so with rsLoRA its scaling is √r, not 1.
- **Recompressed** (`max_rank`, `max_error`): the same sum through thin QRs of the stacked B's and Aᵀ's and an SVD of
  the small core (numerics/spectrum.lora_spectrum), truncated to at most `max_rank` triplets or to the fewest whose
  relative Frobenius error is at most `max_error`, as balanced factors B = U√S, A = √S Vᵀ. The error of what was
  dropped is exact: ‖σ_{k+1:}‖ (Eckart–Young).
- **lora_bias**: the combined lora_B bias is Σ cᵢbᵢ (zero for an adapter without one).
- **Tensors saved whole** (`modules_to_save`, saved biases): adapter i's copy Mᵢ replaces the base's, so the combined
  model holds base + Σ_{i∈S} wᵢ(Mᵢ − base) over the adapters S that save it. Without a base that is Σ wᵢMᵢ only when
  Σ_{i∈S} wᵢ = 1; otherwise it is refused, naming the tensor.
- **Refused by name**: DoRA (its merge rescales W + ΔW, not additive), other tuners (their update is not B@A),
  trainable tokens and target_parameters (their tensors replace or index base values), kohya single files (convert
  them first), modules whose factors disagree in shape across adapters.

combine_fidelity.json records per module the ranks, ‖ΔW‖_F of the exact sum, the dropped error, the error of the
stored factors against the exact sum (computed from factors, never densely) and, for the exact mode, a bound on every
element's error from the factors' rounding.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from loratv.adapters.adapter import CONFIG_NAME, PREFIX, Adapter, LoraModule, load_adapter
from loratv.adapters.kohya import SingleFileAdapter
from loratv.adapters.lora_writer import WEIGHTS_NAME, write_adapter
from loratv.common.dtypes import PRECISION_NAMES
from loratv.common.progress import progress_bar
from loratv.errors import BadInputError, LoratvError, param
from loratv.io.outputs import atomic_output_dir
from loratv.numerics.lowrank import Factors, norm_sq
from loratv.numerics.spectrum import lora_spectrum
from loratv.version import __version__

SCHEMA = "loratv.combine"
SCHEMA_VERSION = 1
FIDELITY_FILE = "combine_fidelity.json"
ADDITIVE_VARIANTS = ("rslora", "lora_bias", "conv")  # the LoRA variants whose update is s·B@A (+ s·b)
DTYPES = ("fp32", "fp16", "bf16", "fp64")


@dataclass(frozen=True)
class Recompression:
    """How a combined module is truncated: at most `max_rank` triplets, or the fewest with relative Frobenius error at
    most `max_error` (both: the fewer). None of them: no truncation (the exact sum)."""

    max_rank: int | None = None
    max_error: float | None = None

    @property
    def active(self) -> bool:
        """Whether any truncation is asked for.

        Returns:
            True when max_rank or max_error is set.
        """
        return self.max_rank is not None or self.max_error is not None

    def check(self) -> "Recompression":
        """Validate the limits.

        Returns:
            This Recompression.

        Raises:
            BadInputError: max_rank below 1, or max_error outside [0, 1).
        """
        if self.max_rank is not None and self.max_rank < 1:
            raise BadInputError(f"{param('max_rank', self.max_rank)}: must be at least 1.")
        if self.max_error is not None and not 0.0 <= self.max_error < 1.0:
            raise BadInputError(f"{param('max_error', self.max_error)}: must lie in [0, 1) (a relative Frobenius "
                                "error).")
        return self

    def rank(self, s: torch.Tensor) -> int:
        """The number of singular values kept.

        Args:
            s: all singular values, descending.

        Returns:
            The smallest k meeting max_error (all nonzero ones without it), capped at max_rank.
        """
        nonzero = int((s > 0).sum())
        k = nonzero
        if self.max_error is not None:
            total = float(torch.linalg.vector_norm(s))
            tails = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s**2, [0]), 0), [0]))
            tails = torch.cat([tails, torch.zeros(1, dtype=s.dtype)])
            k = next(j for j in range(nonzero + 1) if total == 0 or float(tails[j]) <= self.max_error * total)
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return k


def refuse_non_additive(adapter: Adapter, command: str = "combine") -> None:
    """combine and similarity take PEFT LoRA adapters whose every module's update is s·B@A (+ s·b).

    Args:
        adapter: the loaded adapter.
        command: the loratv command asking, for the message.

    Raises:
        LoratvError: naming the file and the reason, for a kohya/diffusers single file, another tuner,
            target_parameters, trainable tokens, DoRA or another non-additive LoRA variant.
    """
    where = adapter.config_path
    if isinstance(adapter, SingleFileAdapter):
        raise LoratvError(f"{adapter.path}: a kohya/diffusers single-file LoRA names its modules only against a base; "
                          "convert it to PEFT's format first (loratv convert --to peft --base BASE).")
    if adapter.settings.peft_type_name != "LORA":
        raise LoratvError(f"{where}: a {adapter.settings.tuner_name} adapter; loratv {command} works on LoRA factors "
                          f"(s·B@A), which a {adapter.settings.tuner_name} update is not.")
    if adapter.param_groups:
        raise LoratvError(f"{where}: target_parameters LoRAs are indexed by the base's expert parameters; loratv "
                          f"{command} takes module LoRAs only.")
    if adapter.token_rows:
        raise LoratvError(f"{where}: trainable tokens replace embedding rows; a weighted sum of replaced rows needs "
                          f"the base, which loratv {command} does not take.")
    for module in adapter.modules.values():
        if module.has_variant("dora"):
            raise LoratvError(f"{where}: module {module.module} uses DoRA, whose merge rescales W + ΔW per output "
                              f"feature; it is not additive, so loratv {command} refuses it.")
        for variant in module.variants:
            if variant.name not in ADDITIVE_VARIANTS:
                raise LoratvError(f"{where}: module {module.module} uses {variant.display_name}, which loratv "
                                  f"{command} does not take.")


def _kind(module: LoraModule) -> str:
    return "embedding" if module.kind == "embedding" else "conv" if module.has_variant("conv") else module.kind


@dataclass
class _Term:
    """One adapter's share of a combined module: A (r, n), B (m, r) as 2-D float64 views, the coefficient w·s."""

    index: int
    a: torch.Tensor
    b: torch.Tensor
    coefficient: float
    bias: torch.Tensor | None


def _terms(adapters: list, weights: list, name: str) -> tuple[list, tuple, tuple, str]:
    """Every adapter's factors of module `name`, checked to agree in shape; (terms, A's trailing shape, B's shape
    without the rank, kind)."""
    terms, a_shape, b_shape, kind = [], None, None, None
    for i, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        module = adapter.modules.get(name)
        if module is None:
            continue
        a, b = adapter.factor(module.a_key), adapter.factor(module.b_key)
        rank = a.shape[0]
        this_a, this_b = tuple(a.shape[1:]), (b.shape[0], *b.shape[2:])
        if a_shape is None:
            a_shape, b_shape, kind = this_a, this_b, _kind(module)
        elif (this_a, this_b, _kind(module)) != (a_shape, b_shape, kind):
            raise LoratvError(f"{adapter.tensors.path}: module {name} has lora_A {tuple(a.shape)} and lora_B "
                              f"{tuple(b.shape)} ({_kind(module)}), which do not fit the other adapters' "
                              f"({a_shape}, {b_shape}, {kind}): are they adapters of one base?")
        bias = adapter.factor(module.bias_key).to(torch.float64) if module.bias_key else None
        terms.append(_Term(i, a.to(torch.float64).reshape(rank, -1), b.to(torch.float64).reshape(b.shape[0], rank),
                           weight * module.scale, bias))
    assert a_shape is not None and b_shape is not None and kind is not None
    return terms, a_shape, b_shape, kind


def _combine_module(terms: list, recompression: Recompression, dtype: torch.dtype) -> tuple:
    """(A, B) to store (2-D, in `dtype`) and the module's fidelity entries."""
    used = [t for t in terms if t.coefficient != 0]
    input_rank = sum(t.a.shape[0] for t in terms)
    if not recompression.active:
        a_exact = torch.cat([t.a * t.coefficient for t in used])
        b_exact = torch.cat([t.b for t in used], dim=1)
        a_stored, b_stored = a_exact.to(dtype).double(), b_exact.to(dtype).double()
        da, db = a_exact - a_stored, b_exact - b_stored
        gram_b = b_exact.T @ b_exact  # one r×r Gram of B serves the norm and the error
        norm = math.sqrt(max(float((gram_b * (a_exact @ a_exact.T)).sum()), 0.0))
        # B_st@A_st − B@A = −(B@δA + δB@A_st): from the factors, no cancellation against the sum itself
        error_sq = float((gram_b * (da @ da.T)).sum())
        if bool(db.any()):
            error_sq = norm_sq([Factors(b_exact, da, 1.0), Factors(db, a_stored, 1.0)])
        # every element of that difference is Σ_k B_ik·δA_kj + δB_ik·A_st,kj: bounded by its row's largest terms
        bound = float(((b_exact.abs() @ da.abs().amax(1, keepdim=True)) +
                       (db.abs() @ a_stored.abs().amax(1, keepdim=True))).max()) if a_exact.numel() else 0.0
        entry = {"input_rank": input_rank, "rank": a_exact.shape[0], "norm": norm, "dropped_error": 0.0,
                 "stored_error": math.sqrt(max(error_sq, 0.0)), "max_element_error_bound": bound}
        return a_stored.to(dtype), b_stored.to(dtype), entry
    spectrum = lora_spectrum([Factors(t.b, t.a, t.coefficient) for t in used])
    norm = spectrum.frobenius
    k = recompression.rank(spectrum.s)
    root = torch.sqrt(spectrum.s[:k])
    b_kept, a_kept = spectrum.u[:, :k] * root, (spectrum.v[:, :k] * root).T
    dropped = float(torch.linalg.vector_norm(spectrum.s[k:]))
    b_stored, a_stored = b_kept.to(dtype), a_kept.to(dtype)
    # Σ cᵢBᵢAᵢ − B_st@A_st = (what was dropped) + (B − B_st)@A + B_st@(A − A_st): factors, no cancellation
    dropped_part = Factors(spectrum.u[:, k:] * spectrum.s[k:], spectrum.v[:, k:].T, 1.0)
    error = math.sqrt(norm_sq([dropped_part, Factors(b_kept - b_stored.double(), a_kept, 1.0),
                               Factors(b_stored.double(), a_kept - a_stored.double(), 1.0)]))
    entry = {"input_rank": input_rank, "rank": k, "norm": norm, "dropped_error": dropped, "stored_error": error,
             "max_element_error_bound": None}
    return a_stored, b_stored, entry


def _affine_values(adapters: list, weights: list, sources: list, notes: list) -> tuple[dict, set]:
    """The tensors saved whole: name -> Σ wᵢMᵢ where the holders' weights sum to 1 (a base layer saved identically by
    every holder: itself); refused otherwise."""
    holders: dict[str, list] = {}
    for i, adapter in enumerate(adapters):
        for name, key in adapter.replacements.items():
            holders.setdefault(name, []).append((i, key))
    values: dict[str, torch.Tensor] = {}
    saved_modules: set[str] = set()
    for name, held in sorted(holders.items()):
        copies = [adapters[i].factor(key) for i, key in held]
        if all(name in adapters[i].saved_layers for i, _ in held) and \
                all(c.dtype == copies[0].dtype and torch.equal(c, copies[0]) for c in copies):
            # a module's own base layer, saved by PEFT beside its LoRA (save_embedding_layers), the same in every
            # adapter saving it: part of the base they share, written once
            values[held[0][1][len(PREFIX):]] = copies[0]  # under its own key (`….base_layer.weight`)
            notes.append(f"{name}: the base layer PEFT saved beside its LoRA, identical in {len(held)} adapter(s), "
                         "written once (it is part of the base they share).")
            continue
        total = math.fsum(weights[i] for i, _ in held)
        if not math.isclose(total, 1.0, rel_tol=1e-12, abs_tol=1e-12):
            who = ", ".join(str(sources[i]) for i, _ in held)
            raise LoratvError(f"{adapters[held[0][0]].tensors.path}: tensor {name} is saved whole (modules_to_save or "
                              f"a saved bias) by {who}, whose weights sum to {total:g}, not 1: the combination is "
                              f"base + Σ wᵢ(Mᵢ − base), which needs the base; loratv combine does not read one.")
        first = adapters[held[0][0]].factor(held[0][1])
        value = torch.zeros(first.shape, dtype=torch.float64)
        for i, key in held:
            tensor = adapters[i].factor(key)
            if tuple(tensor.shape) != tuple(first.shape):
                raise LoratvError(f"{adapters[i].tensors.path}: tensor {name} has shape {tuple(tensor.shape)}, the "
                                  f"other adapters' {tuple(first.shape)}.")
            value += weights[i] * tensor.to(torch.float64)
        values[name] = value.to(first.dtype)
        for i, _ in held:
            saved_modules.update(m for m in adapters[i].settings.modules_to_save
                                 if name == m or name.startswith(m + "."))
    return values, saved_modules


def _output_dtype(adapters: list, dtype: str | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in DTYPES:
            raise BadInputError(f"{param('dtype', dtype)}: choose one of {', '.join(DTYPES)}.")
        return PRECISION_NAMES[dtype]
    stored = {adapter.tensors.entry(m.a_key).torch_dtype for adapter in adapters for m in adapter.modules.values()}
    return stored.pop() if len(stored) == 1 else torch.float32


def combine(sources: list, out, *, weights: list | None = None, recompression: Recompression | None = None,
            dtype: str | None = None, force: bool = False, progress: bool = False,
            command: str | None = None) -> dict:
    """Write Σ wᵢ·(adapter i) as one PEFT LoRA adapter in `out`, with combine_fidelity.json.

    Args:
        sources: the adapters (folders, files in them, or hub ids), at least one.
        out: the output folder (written atomically): adapter_config.json, adapter_model.safetensors and
            combine_fidelity.json.
        weights: one weight per adapter (None: all 1).
        recompression: truncate each module (None or inactive: the exact concatenation).
        dtype: the output factors' dtype ("fp32", "fp16", "bf16", "fp64"; None: the inputs' factor dtype when they
            share one, else fp32).
        force: replace an existing output folder.
        progress: show a progress bar.
        command: the command line, recorded in the fidelity record.

    Returns:
        The fidelity record (schema loratv.combine), as written to combine_fidelity.json.

    Raises:
        LoratvError: no adapters, weights that do not match them or are not finite, a bad recompression or dtype
            (BadInputError); an adapter combine refuses (refuse_non_additive), factors of one module that disagree in shape,
            a tensor saved whole whose holders' weights do not sum to 1, or nothing to write.
    """
    if not sources:
        raise BadInputError("give at least one adapter to combine.")
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        raise BadInputError(f"{param('weights')}: {len(weights)} weights for {len(sources)} adapters; give one per "
                            "adapter.")
    if not all(math.isfinite(w) for w in weights):
        raise BadInputError(f"{param('weights')}: every weight must be a finite number.")
    recompression = (recompression or Recompression()).check()
    adapters = [load_adapter(source) for source in sources]
    for adapter in adapters:
        refuse_non_additive(adapter)
    storage = _output_dtype(adapters, dtype)
    fan = {a.settings.fan_in_fan_out for a in adapters if a.modules}
    fan_in_fan_out = fan == {True}
    if len(fan) > 1:
        raise LoratvError(f"{adapters[0].config_path}: the adapters disagree on fan_in_fan_out; they cannot be "
                          "adapters of one base.")
    bases = sorted({a.settings.base_model_name_or_path for a in adapters if a.settings.base_model_name_or_path})
    names = sorted(set().union(*(a.modules for a in adapters)))
    notes: list[str] = []
    full_values, saved_modules = _affine_values(adapters, weights, sources, notes)
    if len(bases) > 1:
        notes.append(f"the adapters name different bases ({', '.join(bases)}); their factors fit one another.")
    inputs = [a.path for a in adapters]
    with atomic_output_dir(out, inputs, force=force) as tmp:
        factors, kinds, biases, modules = {}, {}, {}, []
        with progress_bar(len(names), "combine", enabled=progress) as bar:
            for name in names:
                bar.update(1)
                terms, a_shape, b_shape, kind = _terms(adapters, weights, name)
                if all(t.coefficient == 0 for t in terms):
                    notes.append(f"module {name}: every adapter holding it has weight 0; it is left out.")
                    continue
                a, b, entry = _combine_module(terms, recompression, storage)
                held = [t.index for t in terms]
                scale = entry["norm"] or 1.0
                modules.append({"module": name, "kind": kind, "shape": [b_shape[0], *a_shape], "adapters": held, **entry,
                                "relative_dropped_error": entry["dropped_error"] / scale,
                                "relative_stored_error": entry["stored_error"] / scale})
                if entry["rank"] == 0:
                    continue
                factors[name] = (a.reshape(a.shape[0], *a_shape), b.reshape(b_shape[0], b.shape[1], *b_shape[1:]))
                kinds[name] = kind
                if any(t.bias is not None for t in terms):
                    biases[name] = sum((t.coefficient * t.bias for t in terms if t.bias is not None),
                                       torch.zeros(b_shape[0], dtype=torch.float64))
        if not factors and not full_values:
            raise LoratvError(f"{sources[0]}: nothing is left to combine (every module's weights are 0, or truncated "
                              "to rank 0).")
        bias_modes = {a.settings.bias for a in adapters}
        metadata = {"loratv_version": __version__, "loratv_combine_weights": json.dumps(weights),
                    "loratv_combine_adapters": json.dumps([str(s) for s in sources])}
        write_adapter(tmp, factors, base_model=bases[0] if len(bases) == 1 else None, dtype=storage, kinds=kinds,
                      full_values=full_values, modules_to_save=saved_modules,
                      bias=bias_modes.pop() if len(bias_modes) == 1 else "all", biases=biases, operation="combine",
                      fan_in_fan_out=fan_in_fan_out, metadata=metadata)
        record = _record(sources, weights, recompression, storage, modules, notes, full_values, command)
        (tmp / FIDELITY_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def _record(sources, weights, recompression, storage, modules, notes, full_values, command) -> dict:
    total = math.sqrt(math.fsum(m["norm"] ** 2 for m in modules))
    dropped = math.sqrt(math.fsum(m["dropped_error"] ** 2 for m in modules))
    stored = math.sqrt(math.fsum(m["stored_error"] ** 2 for m in modules))
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "command": command,
        "adapters": [str(s) for s in sources],
        "weights": weights,
        "mode": "recompressed" if recompression.active else "exact",
        "max_rank": recompression.max_rank,
        "max_error": recompression.max_error,
        "dtype": str(storage).replace("torch.", ""),
        "files": [CONFIG_NAME, WEIGHTS_NAME],
        "summary": {
            "modules": len(modules),
            "input_rank": sum(m["input_rank"] for m in modules),
            "rank": sum(m["rank"] for m in modules),
            "norm": total,
            "dropped_error": dropped,
            "relative_dropped_error": dropped / total if total else 0.0,
            "stored_error": stored,
            "relative_stored_error": stored / total if total else 0.0,
            "saved_whole": sorted(full_values),
        },
        "modules": modules,
        "notes": notes,
    }


def summary_text(record: dict, out: Path) -> str:
    """The lines `loratv combine` prints.

    Args:
        record: combine's record.
        out: the output folder.

    Returns:
        Text, one line per fact.
    """
    s = record["summary"]
    lines = [f"combine: {len(record['adapters'])} adapters (weights {', '.join(f'{w:g}' for w in record['weights'])}) "
             f"-> {out}",
             f"  {s['modules']} modules, rank {s['input_rank']} -> {s['rank']} ({record['mode']}, {record['dtype']})",
             f"  ‖ΔW‖_F of the exact sum: {s['norm']:.6g}; dropped: {s['dropped_error']:.3g} "
             f"({s['relative_dropped_error']:.3g} relative); stored factors' error: {s['stored_error']:.3g} "
             f"({s['relative_stored_error']:.3g} relative)"]
    if s["saved_whole"]:
        lines.append(f"  saved whole (Σ wᵢMᵢ, weights summing to 1): {', '.join(s['saved_whole'])}")
    lines += [f"  note: {n}" for n in record["notes"]]
    return "\n".join(lines)

