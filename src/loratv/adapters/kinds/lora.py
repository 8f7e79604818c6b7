"""LoRA (peft_type LORA): ΔW = s·B@A, the kind every variant hangs off (docs/peft-format.md §1–§3, PEFT's LoraConfig
in src/peft/tuners/lora/config.py).

LoRA is the one kind whose modules are `LoraModule`s merged from their factors row block by row block
(`delta_rows`) and certified from the factors (compare's Factors), so it is `factored`. This module is LoRA's home:
its config (`parse_settings`), its key mapping (`map_keys`, `build_module`: PEFT's `lora_A/lora_B/lora_embedding_*`,
`lora_magnitude_vector`, `lora_B.bias`, trainable tokens, target_parameters), its binding (`resolve_target` for
MultiheadAttention, `bind_module`: orientation and each variant's checks), its ΔW (`delta_rows`) and its `describe`.
Its variants (DoRA, rsLoRA, trainable tokens, target_parameters/experts, ConvNd, lora_bias) are the `LoraVariant`s of
`loratv/adapters/kinds/lora_variants/`, chosen per module when `build_module` builds it (`LoraModule.variants`).
"""


import math
import re

import torch

from loratv.adapters.kind import AdapterKind
from loratv.adapters.kinds.lora_variants import choose_variants
from loratv.adapters.kinds.lora_variants.base import lora_factors
from loratv.adapters.kinds.lora_variants.target_parameters import _param_fit
from loratv.adapters.kinds.lora_variants.trainable_tokens import record_token_rows
from loratv.adapters.layouts import per_expert_example, piece_rows
from loratv.adapters.settings import (
    LoraSettings,
    check_bias,
    check_refused_fields,
    modules_to_save,
    number,
)
from loratv.adapters.structures import (
    CONFIG_NAME,
    CONV1D_MODEL_TYPES,
    CONV1D_MODULES,
    NOT_LORA_MARKERS,
    PREFIX,
    Adapter,
    LoraModule,
)
from loratv.errors import LoratvError, UnsupportedAdapterError
from loratv.io.checkpoint import Checkpoint

# Fields of PEFT's LoraConfig (0.21)
LORA_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens",
    "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication", "lora_bias", "target_parameters",
    "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying", "runtime_config",
})
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# (config field, value that is harmless, why a merge from the file alone is impossible or not yet supported)
REFUSED_FIELDS = [
    ("use_bdlora", None, "block-diagonal LoRA (BD-LoRA, use_bdlora) is not merged by loratv: its lora_A or lora_B "
                         "stores only the diagonal blocks, which PEFT's BdLoraLinearVariant expands with block_diag "
                         "and whose delta it rounds to the base dtype before adding; loratv does not rebuild either"),
    ("alora_invocation_tokens", None, "aLoRA adapters cannot be merged (PEFT refuses too)"),
    ("arrow_config", None, "Arrow routing adapters cannot be merged"),
    ("kasa_config", None, "KaSA truncates the base weight by SVD, so the merge needs more than the adapter file"),
    ("megatron_config", None, "Megatron tensor-parallel adapters are sharded; gather them first"),
    ("layer_replication", None, "layer_replication changes the model's structure; PEFT refuses to merge it too"),
    ("use_qalora", False, "QALoRA adapters belong to GPTQ-quantized bases, which cannot be merged exactly"),
]
NEUTRAL: tuple[object, ...] = (None, False, {}, [], "", 0)


def _targeted_module(raw: dict, name: str) -> bool:
    """Whether `target_modules` names module `name` (PEFT's check_target_module_exists: a string is a full-match
    regex, a list matches the name or a dotted suffix of it)."""

    targets = raw.get("target_modules")
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, name) is not None
        except re.error:
            return False
    return any(name == t or name.endswith("." + t) for t in targets or ())


def _register_param_owner(adapter: Adapter, module: str) -> None:
    """For target_parameters: record the module path with its ParamWrapper nesting (`.base_layer` per extra
    parameter) when it is a ParamWrapper: nested, or not a target_modules LoRA and its owner can hold a target.

    PEFT's _inject_parameters matches `<owner>.<param>` against each target exactly or by a dotted suffix, so a
    bare target (`gate_up_proj`, as PEFT's all-linear conversion writes for transformers-5 MoE models) fits any
    owner; which modules are plain LoRA modules then follows from target_modules, as PEFT injected those first."""
    owner = module
    while owner.endswith(".base_layer"):
        owner = owner[: -len(".base_layer")]
    if owner == module and _targeted_module(adapter.settings.raw, module):
        return  # a LoRA on the module's weight (target_modules), not on a raw parameter
    for target in adapter.settings.raw["target_parameters"]:
        target_module = target.rpartition(".")[0]
        if owner == target_module or owner.endswith("." + target_module) or not target_module:
            adapter.param_groups.setdefault(module, None)
            adapter.resolve_names = _resolve_target_parameters
            return


def _resolve_target_parameters(adapter: Adapter, base: Checkpoint) -> None:
    """Give each ParamWrapper LoRA its parameter: PEFT nests one wrapper per targeted parameter of a module, so the
    key names the depth, not the parameter. The shapes decide; between parameters of equal shape, PEFT's order
    (sorted target names: the first is outermost, reference §3.3)."""
    owners: dict[str, list] = {}
    for nested in adapter.param_groups:
        owner, depth = nested, 0
        while owner.endswith(".base_layer"):
            owner, depth = owner[: -len(".base_layer")], depth + 1
        owners.setdefault(owner, []).append((depth, nested))
    targets = adapter.settings.raw["target_parameters"]
    for owner, nests in owners.items():
        candidates = sorted(n for n in base.names() if n.rpartition(".")[0] == owner and any(
            n == t or n.endswith("." + t) for t in targets))
        if not candidates:

            example = per_expert_example(base, owner)
            one_by_one = (f" (it stores the experts one by one, '{example}': not the fused layout the adapter was "
                          "trained on)") if example else ""
            raise LoratvError(f"{base.path}: stores no parameter of '{owner}' named by target_parameters "
                              f"{targets}{one_by_one}.")
        for _depth, nested in sorted(nests):
            a_key, b_key = adapter.param_groups[nested]
            a, b = adapter.tensors.entry(a_key).shape, adapter.tensors.entry(b_key).shape
            kinds = {c: _param_fit(a, b, base.entry(c).shape, base.config) for c in candidates}
            fitting = [c for c in candidates if kinds[c] is not None]
            if not fitting:
                raise LoratvError(f"{adapter.tensors.path}: the target_parameters LoRA '{nested}' (A {list(a)}, B "
                                  f"{list(b)}) fits no parameter of '{owner}' in {base.path}.")
            name = fitting[0]
            candidates.remove(name)
            shape = base.entry(name).shape
            experts = shape[0] if len(shape) == 3 else 1
            r = a[0] // experts
            configured = adapter.settings.rank_for(name)
            if configured != r:
                raise LoratvError(f"{adapter.config_path}: parameter '{name}' has rank {r} in the file but "
                                  f"{configured} by the config's r/rank_pattern.")
            alpha = adapter.settings.alpha_for(name)
            built = LoraModule(name, name, kinds[name], a_key, b_key, r, alpha, adapter.settings.scale(r, alpha))
            built.variants = choose_variants(adapter, built)
            adapter.modules[name] = built
    adapter.resolve_names = None


# LoRA variants whose saved extra tensors only shape training: (config field, key infix). PEFT's merge_unsafe of
# VeloraLinearVariant and MontecloraLinearVariant (peft/tuners/lora/variants.py) adds the plain Linear get_delta_weight,
# s·B@A; VeLoRA's `lora_velora_embed` (its activation-compression projection) and MonteCLoRA's
# `lora_monteclora_sampler.*` (its Monte Carlo perturbation of A during training) are never read by the merge.
TRAINING_ONLY_TENSORS = (("velora_config", ".lora_velora_embed"), ("monteclora_config", ".lora_monteclora_sampler."))


def _training_only(adapter: Adapter, name: str) -> bool:
    """Whether adapter tensor `name` is a training-time tensor of a LoRA variant the config enables."""
    raw = adapter.settings.raw
    return any(raw.get(field) and infix in name for field, infix in TRAINING_ONLY_TENSORS)


def _checked_factors(adapter: Adapter, module: str, parts: dict) -> tuple:
    """(A key, B key, rank, whether it is an embedding LoRA, magnitude key) of one module's tensors, checked: both
    factors, DoRA magnitude iff use_dora, Linear/Conv1D/Embedding or ConvNd shapes, no grouped conv, equal ranks."""
    file = adapter.tensors.path
    embedding = "embA" in parts or "embB" in parts
    a_key, b_key = (parts.get("embA"), parts.get("embB")) if embedding else (parts.get("A"), parts.get("B"))
    if a_key is None or b_key is None:
        raise LoratvError(f"{file}: module '{module}' has only one of its two LoRA factors.")
    magnitude = parts.get("magnitude")
    if magnitude is not None and not adapter.settings.use_dora:
        raise LoratvError(f"{file}: tensor '{magnitude}' is a DoRA magnitude but {CONFIG_NAME} does not set use_dora.")
    if magnitude is None and adapter.settings.use_dora:
        raise LoratvError(f"{adapter.config_path}: use_dora is set (DoRA) but module '{module}' has no "
                          f"lora_magnitude_vector in {file.name}.")
    a_shape = adapter.tensors.entry(a_key).shape
    b_shape = adapter.tensors.entry(b_key).shape
    # ConvNd: A is a conv with the base kernel (r, in, *k), B a 1×…×1 conv (out, r, 1, …)
    conv = len(a_shape) > 2 and len(b_shape) == len(a_shape) and all(k == 1 for k in b_shape[2:])
    if not conv and (len(a_shape) != 2 or len(b_shape) != 2):
        raise LoratvError(f"{file}: module '{module}' has LoRA factors of shapes {list(a_shape)} and "
                          f"{list(b_shape)}, which are neither a Linear/Conv1D/Embedding nor a ConvNd LoRA.")
    r = a_shape[0]
    if conv and b_shape[1] != r and b_shape[1] and r % b_shape[1] == 0:
        # PEFT builds lora_B with the base's groups, (out, r/groups, 1, …), and its _ConvNd.merge raises
        # NotImplementedError for groups > 1: say so before any rank check would blame the ranks
        raise LoratvError(f"{file}: module '{module}' is a LoRA on a grouped convolution (groups = "
                          f"{r // b_shape[1]}: lora_B stores {b_shape[1]} of rank {r} per group); PEFT refuses to "
                          "merge LoRA on groups > 1 convolutions, and so does loratv.")
    if b_shape[1] != r:
        raise LoratvError(f"{file}: module '{module}': lora_A has rank {r} but lora_B has {b_shape[1]} columns.")
    return a_key, b_key, r, embedding, magnitude


def _multihead_attention_target(adapter: Adapter, module: LoraModule, base: Checkpoint, target: str):
    """Where a LoRA on an `nn.MultiheadAttention` lands, as PEFT's lora.MultiheadAttention merges it.

    PEFT (peft/tuners/lora/layer.py, MultiheadAttention) adapts the fused `in_proj_weight` with the module's own
    factors (`<mha>.lora_A/B`, B of 3·embed rows) and `out_proj` with a nested Linear LoRA saved as
    `<mha>.base_layer.out_proj.lora_A/B`. Its `merge` adds the out_proj delta to the weight and then calls
    `out_proj.merge`, which adds it again; its forward merges the same way, so the model PEFT trains and serves holds
    W_out + ΔW + ΔW, and merge_and_unload writes exactly that. loratv adds the out_proj delta twice, in that order.

    Args:
        adapter: the adapter.
        module: a LoRA module whose `<module>.weight` the base lacks.
        base: the base checkpoint.
        target: the base tensor name tried so far.

    Returns:
        (base tensor name, how many times the delta is added): the input `target` and 1 when the module is not on a
        MultiheadAttention.

    Raises:
        LoratvError: DoRA or lora_bias on a MultiheadAttention (PEFT builds neither there).
    """
    name = module.module
    if name.endswith(".base_layer.out_proj"):
        owner = name[: -len(".base_layer.out_proj")]
        found, copies = owner + ".out_proj.weight", 2
    else:
        owner, found, copies = name, name + ".in_proj_weight", 1
    if owner + ".in_proj_weight" not in base or found not in base:
        return target, 1
    if module.has_variant("dora") or module.has_variant("lora_bias"):
        raise LoratvError(f"{adapter.tensors.path}: module '{name}' is on the MultiheadAttention '{owner}' with DoRA or "
                          "lora_bias, which PEFT's MultiheadAttention LoRA does not build; loratv does not merge it.")
    return found, copies


def _orientation(module: LoraModule, adapter: Adapter, shape, model_type) -> str:
    a = adapter.tensors.entry(module.a_key).shape
    b = adapter.tensors.entry(module.b_key).shape
    file = adapter.tensors.path
    if module.kind == "embedding":
        expected = (a[1], b[0])  # (num_embeddings, embedding_dim)
        if tuple(shape) != expected:
            raise LoratvError(
                f"{file}: embedding LoRA '{module.module}' gives a {list(expected)} delta but the base tensor has shape {list(shape)}."
            )
        return "embedding"
    if len(a) > 2:
        expected = (b[0], a[1], *a[2:])
        if tuple(shape) != expected:
            grouped = len(shape) == len(a) and shape[0] == b[0] and tuple(shape[2:]) == tuple(a[2:])
            groups = " (a grouped convolution: PEFT refuses LoRA on groups > 1)" if grouped else ""
            raise LoratvError(f"{file}: conv LoRA '{module.module}' gives a {list(expected)} delta but the base "
                              f"tensor '{module.target}' has shape {list(shape)}{groups}.")
        return "conv"
    out_in = (b[0], a[1])
    in_out = (a[1], b[0])
    if len(shape) != 2 or tuple(shape) not in (out_in, in_out):
        raise LoratvError(
            f"{file}: LoRA '{module.module}' (A {list(a)}, B {list(b)}) does not fit base tensor '{module.target}' of shape {list(shape)}."
        )
    if out_in != in_out:
        return "linear" if tuple(shape) == out_in else "conv1d"
    # square: the shapes cannot tell; PEFT decides by layer type (Conv1D forces fan_in_fan_out)
    if model_type is None:
        return "conv1d" if adapter.settings.fan_in_fan_out else "linear"
    leaf = module.module.rsplit(".", 1)[-1]
    return "conv1d" if model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_MODULES else "linear"


def delta_rows(adapter: Adapter, module: LoraModule, start: int, stop: int, dtype: torch.dtype, device,
               factor_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows [start, stop) of ΔW in the stored orientation of the base tensor, computed as PEFT does.

    PEFT's get_delta_weight (peft/tuners/lora/layer.py: Linear, Embedding, _ConvNd) evaluates `B @ A` whole and then
    transposes it for Conv1D (fan_in_fan_out) and Embedding. The BLAS picks its kernel, and with it the order in which
    each length-r dot product is summed, from the operands' shapes and layout: `Aᵀ @ Bᵀ`, or `B @ A` on a block of
    rows or columns, is not bit-identical to the whole `B @ A` (measured with MKL: narrow embeddings differ in up to
    half their elements, and row or column blocks whose size leaves a small remainder differ too). So the product is
    formed whole, in PEFT's operand order, once per module and dtype; row chunks are views of it, and it is dropped
    when its last row has been handed out (the merge reads every tensor to its end). Memory: one tensor the size of
    the base tensor, in `dtype`.

    Args:
        adapter: the adapter holding the factors.
        module: the LoRA module (its `kind` already resolved by `bind`).
        start: first stored row.
        stop: one past the last stored row.
        dtype: the dtype the product is computed in.
        device: the device it is computed on.
        factor_dtype: when given, the factors are first rounded to it, as loading the adapter into a model of that
            dtype does.

    Returns:
        The rows (a view of a cached tensor for Linear/Conv1D/Embedding: read it, do not modify it).
    """
    if getattr(module, "piece", None) is not None:  # one on-disk piece of a fused parameter (layouts.py)

        return piece_rows(adapter, module, start, stop, dtype, device, factor_dtype)
    for variant in module.variants:  # a variant computing its own rows (target_parameters' expert stacks)
        rows = variant.delta_rows(adapter, module, start, stop, dtype, device, factor_dtype)
        if rows is not None:
            return rows
    key = (module.module, module.a_key, module.kind, dtype, str(device), factor_dtype)
    product = adapter.products.get(key)
    if product is None:
        a, b = lora_factors(adapter, module, dtype, device, factor_dtype)
        # a variant with its own whole product (ConvNd: conv_delta), else s·B@A
        product = next((p for v in module.variants if (p := v.product(module, a, b)) is not None), None)
        if product is None:  # `* s` in place after the product: the same rounding as PEFT's `* scaling`, one allocation fewer
            product = (b @ a).mul_(module.scale)
            if module.kind != "linear":  # conv1d, stored (in, out), and embedding (V, D): ΔW = (s·B@A)ᵀ
                product = product.T
        adapter.products[key] = product
    if stop >= product.shape[0]:
        adapter.products.pop(key, None)
    return product[start:stop]


class LoraKind(AdapterKind):
    """LoRA and its variants: factored modules (LoraModule), merged by rows; see the module docstring."""

    peft_type = "LORA"
    display_name = "LoRA"
    config_fields = LORA_FIELDS
    refused_fields = tuple(REFUSED_FIELDS)
    stored_tensor_roles = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
                           "lora_magnitude_vector", "lora_magnitude_vector.weight",
                           "token_adapter.trainable_tokens_delta")
    supports_conv = True
    factored = True
    rank_field = "r"
    alpha_field = "lora_alpha"
    update = "additive: ΔW = s·B@A (DoRA: W' = m ⊙ (W + ΔW)/‖W + ΔW‖)"

    def parse_settings(self, config: dict, path) -> LoraSettings:
        """LoRA's adapter_config.json: every variant loratv cannot merge exactly is refused by name."""
        if "enable_lora" in config and config["enable_lora"] not in NEUTRAL:
            raise LoratvError(f"{path}: legacy fused-QKV LoRA (enable_lora, PEFT <= 0.2) is not supported.")
        check_refused_fields(config, path, self.refused_fields)
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
            raise UnsupportedAdapterError(
                f"{path}: init_lora_weights = '{init}' modified the base weights during training, so base + adapter is "
                "not the trained model; convert it with PEFT's path_initial_model_for_weight_conversion first."
            )
        unknown = {k: v for k, v in config.items() if k not in LORA_FIELDS and k != "enable_lora" and v not in NEUTRAL}
        if unknown:
            key = sorted(unknown)[0]
            raise UnsupportedAdapterError(
                f"{path}: unknown config field '{key}' = {unknown[key]!r} (written by a newer PEFT?); refusing to guess "
                "its effect."
            )
        if config.get("target_parameters") and (config.get("use_dora") or config.get("lora_bias")
                                                or config.get("fan_in_fan_out")):
            raise LoratvError(f"{path}: target_parameters with use_dora, lora_bias or fan_in_fan_out is not a valid "
                              "PEFT configuration (PEFT's ParamWrapper rejects them).")
        if config.get("use_dora") and config.get("lora_bias"):
            raise LoratvError(f"{path}: use_dora with lora_bias is not a valid PEFT configuration (PEFT refuses it "
                              "too).")
        bias = check_bias(config, path)
        try:
            r = int(config.get("r", 8))
            alpha = float(config.get("lora_alpha", 8))
            rank_pattern = dict(config.get("rank_pattern") or {})
            alpha_pattern = dict(config.get("alpha_pattern") or {})
        except (TypeError, ValueError):
            raise LoratvError(f"{path}: r, lora_alpha, rank_pattern or alpha_pattern has an invalid value.") from None
        if r <= 0 or not all(number(v) and v > 0 for v in rank_pattern.values()):
            raise LoratvError(f"{path}: a LoRA rank (r or a rank_pattern value) is not a positive number.")
        return LoraSettings(
            r=r,
            lora_alpha=alpha,
            use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
            bias=bias,
            lora_bias=bool(config.get("lora_bias", False)),
            use_dora=bool(config.get("use_dora", False)),
            modules_to_save=modules_to_save(config),
            peft_version=config.get("peft_version"),
            base_model_name_or_path=config.get("base_model_name_or_path"),
            raw=config,
        )

    def build_module(self, adapter, module: str, keys: dict) -> LoraModule:  # type: ignore[override]
        """One LoRA module from its tensors: factors checked, rank against the config, alpha and scale resolved,
        and its variants chosen (PEFT chooses a layer's LoraVariant from the config when it builds the layer).

        Args:
            adapter: the adapter.
            module: the module name (without PEFT's prefix).
            keys: LoRA role -> adapter key; roles "A", "B" (or "embA", "embB"), "bias", "magnitude".

        Returns:
            The LoraModule, targeting `<module>.weight`, `variants` set.

        Raises:
            LoratvError: a missing factor, shapes that do not chain, a DoRA magnitude without use_dora (or the
                reverse), or a rank that differs from the config's.
        """
        a_key, b_key, r, embedding, magnitude = _checked_factors(adapter, module, keys)
        configured = adapter.settings.rank_for(module)
        if configured != r:
            raise LoratvError(
                f"{adapter.config_path}: module '{module}' has rank {r} in the file but {configured} by the config's r/rank_pattern."
            )
        alpha = adapter.settings.alpha_for(module)
        built = LoraModule(
            module=module,
            target=module + ".weight",
            kind="embedding" if embedding else "linear",
            a_key=a_key,
            b_key=b_key,
            r=r,
            alpha=alpha,
            scale=adapter.settings.scale(r, alpha),
            bias_key=keys.get("bias"),
            magnitude_key=magnitude,
        )
        built.variants = choose_variants(adapter, built)
        return built

    def map_keys(self, adapter) -> None:
        """PEFT's LoRA keys: `<module>.lora_A/B.weight` (or `lora_embedding_A/B`), `lora_B.bias`, the DoRA magnitude
        and trainable-tokens rows; other tensors become replacements; target_parameters modules are kept in
        `adapter.param_groups` until the base resolves them (`_resolve_target_parameters`).

        Args:
            adapter: the adapter, with `settings` and `tensors` set.

        Raises:
            LoratvError: a tensor of another tuner, without PEFT's prefix or of an unknown LoRA role, or a module
                whose factors do not build.
        """
        file = adapter.tensors.path
        factors: dict[str, dict] = {}
        for key in adapter.tensors.names():
            for marker, what in NOT_LORA_MARKERS.items():
                if marker in key:
                    raise LoratvError(f"{file}: tensor '{key}' belongs to {what}, which loratv does not merge yet.")
            if not key.startswith(PREFIX):
                raise LoratvError(f"{file}: tensor '{key}' lacks PEFT's '{PREFIX}' prefix; is this a PEFT adapter?")
            name = key[len(PREFIX):]
            if ".modules_to_save." in name or ".original_module." in name:
                continue  # wrapper copies; the canonical `<module>.<param>` key carries the value
            if record_token_rows(adapter, name, key):  # trainable tokens: rows of a base matrix, no LoRA module
                continue
            if _training_only(adapter, name):
                continue
            if ".lora_" in name:
                module, _, part = name.rpartition(".lora_")
                role = {
                    "A.weight": "A", "B.weight": "B", "B.bias": "bias",
                    "embedding_A": "embA", "embedding_B": "embB",
                    "magnitude_vector": "magnitude", "magnitude_vector.weight": "magnitude",
                }.get(part)
                if role is None:
                    raise LoratvError(f"{file}: tensor '{key}' is not a LoRA tensor loratv knows (lora_{part}).")
                if adapter.settings.raw.get("target_parameters"):
                    _register_param_owner(adapter, module)  # `<owner>(.base_layer)*`: resolved against the base later
                factors.setdefault(module, {})[role] = key
            else:
                adapter.replacements[name] = key
        for module, parts in factors.items():
            if module in adapter.param_groups:
                a_key, b_key, *_ = _checked_factors(adapter, module, parts)
                adapter.param_groups[module] = (a_key, b_key)
                continue
            adapter.modules[module] = self.build_module(adapter, module, parts)

    def describe(self, adapter, module) -> dict:
        """inspect's entry for one LoRA module: rank, alpha, scale, stored parameters, DoRA, ΔW's shape."""
        a = adapter.tensors.entry(module.a_key).shape
        b = adapter.tensors.entry(module.b_key).shape
        stored = math.prod(a) + math.prod(b)
        if module.magnitude_key:  # DoRA's m: one value per output feature
            stored += adapter.tensors.entry(module.magnitude_key).numel
        m = module
        return {
            "module": m.module, "target": m.target, "kind": m.kind, "rank": m.r, "alpha": m.alpha,
            "scale": m.scale, "stored_parameters": stored, "dora": m.has_variant("dora"),
            "delta_shape": ([a[1], b[0]] if m.kind == "embedding" else
                            [a[0] // m.r, b[0], a[1]] if m.kind == "experts" else
                            [a[0] // m.r, a[1], b[0]] if m.kind == "experts_t" else [b[0], *a[1:]]),
        }

    def resolve_target(self, adapter, module: LoraModule, base: Checkpoint, target: str) -> tuple:  # type: ignore[override]
        """Where a module whose `<module>.weight` the base lacks lands: a LoRA on an nn.MultiheadAttention
        (`_multihead_attention_target`).

        Args:
            adapter: the adapter.
            module: the LoraModule.
            base: the base checkpoint.
            target: the base tensor name tried so far.

        Returns:
            (base tensor name, how many times ΔW is added).

        Raises:
            LoratvError: DoRA or lora_bias on a MultiheadAttention.
        """
        return _multihead_attention_target(adapter, module, base, target)

    def bind_module(self, adapter, module: LoraModule, base: Checkpoint, target: str, model_type, deltas: dict,  # type: ignore[override]
                    copies: int = 1) -> None:
        """Bind one LoRA module to its base tensor: its orientation from the shapes (`_orientation`), then each of its
        variants' checks (DoRA's magnitude, lora_bias's bias); expert stacks were checked when resolved.

        Args:
            adapter: the adapter.
            module: the LoraModule.
            base: the base checkpoint.
            target: the base tensor it merges into.
            model_type: the base's config model_type (Conv1D families), or None.
            deltas: the plan's base tensor -> modules (updated).
            copies: how many times ΔW is added (2 for MultiheadAttention's out_proj).

        Raises:
            LoratvError: the factors do not fit the base tensor, or a variant's tensor does not.
        """
        if module.kind in ("experts", "experts_t"):  # shapes checked when the parameter was resolved
            deltas.setdefault(target, []).append(module)
            return
        module.kind = _orientation(module, adapter, base.entry(target).shape, model_type)
        deltas.setdefault(target, []).extend([module] * copies)
        for variant in module.variants:
            variant.check_bound(adapter, module, base, target)

    def depth(self, module: LoraModule, shape: tuple) -> int:  # type: ignore[override]
        """N of γ_N for one module's ΔW = s·B@A: a length-r dot product and the scale (r + 2). compare takes the
        largest over the modules on a tensor from their factors (ExpectedDelta.k), as LoRA is certified from the
        factors rather than from `bound_terms`.

        Args:
            module: the LoraModule.
            shape: the base tensor's shape.

        Returns:
            r + 2.
        """
        return module.r + 2


KIND = LoraKind()
