"""A PEFT LoRA adapter on disk: its tensors mapped to base tensor names, and the delta each one adds.

Key mapping follows PEFT (reference §2.3): strip `base_model.model.`, split at `.lora_`, the base parameter is the
module's `.weight`; other tensors (saved biases, `modules_to_save`, saved embeddings) replace base tensors.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from loratv.adapters.config import parse_config
from loratv.adapters.kohya import load_single_file
from loratv.adapters.structures import (  # noqa: F401  (re-exported: the loading API names them)
    CONFIG_NAME,
    CONV1D_MODEL_TYPES,
    CONV1D_MODULES,
    INPUT_EMBEDDING_SUFFIXES,
    NOT_LORA_MARKERS,
    OUTPUT_EMBEDDING_NAMES,
    PREFIX,
    TOKEN_ROWS,
    WEIGHT_NAMES,
    Adapter,
    LoraModule,
    conv_delta,
    expert_delta,
)
from loratv.adapters.tuners import check_fits, ia3_bias_module, map_tuner_keys
from loratv.errors import LoratvError
from loratv.io import safe_json
from loratv.io.checkpoint import Checkpoint, resolve_path
from loratv.models.layouts import layout_for, per_expert_example, piece_rows


def _token_indices(adapter: Adapter, module: str, key: str) -> list:
    """The rows `trainable_token_indices` names for this module: a list (the input embedding) or {module: list}."""
    spec = adapter.settings.raw.get("trainable_token_indices")
    if isinstance(spec, dict):
        spec = next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    try:
        indices = [int(i) for i in spec]
    except (TypeError, ValueError):
        raise LoratvError(f"{adapter.config_path}: trainable_token_indices gives no row list for '{module}', which "
                          f"{adapter.tensors.path.name} trains.") from None
    rows = adapter.tensors.entry(key).shape
    if len(rows) != 2 or rows[0] != len(indices) or len(set(indices)) != len(indices):
        raise LoratvError(f"{adapter.tensors.path}: '{key}' holds {list(rows)} values for {len(indices)} token indices "
                          f"({'repeated' if len(set(indices)) != len(indices) else 'different counts'}).")
    return indices


def token_replacement(adapter: Adapter, base: Checkpoint, name: str) -> torch.Tensor:
    """The tensor with its trained token rows copied in, as PEFT's TrainableTokensLayer.merge does (index_copy of
    the trained rows cast to the base dtype): a whole-tensor replacement in the base dtype."""
    key, indices = adapter.token_rows[name]
    w = base.read(name)
    return w.index_copy(0, torch.tensor(indices), adapter.factor(key).to(w.dtype))


def _check_layer_and_exclude_rules(adapter: Adapter) -> None:
    """The file's modules must obey the config's layers_to_transform / layers_pattern and exclude_modules: a module
    outside them means the file and the config disagree, and merging it would apply what PEFT would not."""

    raw = adapter.settings.raw
    layers = raw.get("layers_to_transform")
    if layers is not None:
        try:
            wanted = {int(layers)} if isinstance(layers, int) else {int(x) for x in layers}
        except (TypeError, ValueError):
            raise LoratvError(f"{adapter.config_path}: layers_to_transform = {layers!r} is not a layer index or a list "
                              "of them.") from None
        patterns = raw.get("layers_pattern") or None
        patterns = [patterns] if isinstance(patterns, str) else patterns
        for module in adapter.modules:
            regexes = [rf".*\.{p}\.(\d+)\." for p in patterns] if patterns else [r".*\.[^.]*\.(\d+)\."]
            found = next(filter(None, (re.match(r, module) for r in regexes)), None)  # PEFT's own layer regexes
            if found is None or int(found.group(1)) not in wanted:
                where = f"layer {found.group(1)}" if found else "no layer"
                raise LoratvError(f"{adapter.tensors.path}: module '{module}' is in {where}, but {CONFIG_NAME} limits "
                                  f"the adapter to layers_to_transform = {sorted(wanted)}.")
    exclude = raw.get("exclude_modules")
    if exclude:
        for module in adapter.modules:
            if isinstance(exclude, str):
                hit = re.fullmatch(exclude, module) is not None
            else:
                hit = any(module == e or module.endswith("." + e) for e in exclude)
            if hit:
                raise LoratvError(f"{adapter.tensors.path}: module '{module}' carries a LoRA, but {CONFIG_NAME} "
                                  f"excludes it (exclude_modules = {exclude!r}).")


def named_adapter(source, name: str) -> Path:
    """The folder of adapter `name` inside an adapter folder: PEFT saves 'default' at the top and the others in
    subfolders named after them."""

    if source is None:
        raise LoratvError(f"--adapter-name {name}: give the adapter folder too (--adapter, or the inspected path).")
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise LoratvError(f"--adapter-name {name!r}: an adapter name, not a path.")
    path = resolve_path(source)
    folder = path.parent if path.is_file() else path
    candidate = folder if name == "default" else folder / name
    if not (candidate / CONFIG_NAME).is_file():
        found = (["default"] if (folder / CONFIG_NAME).is_file() else []) + sorted(
            p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
        raise LoratvError(f"{folder}: holds no adapter named '{name}' (found: {', '.join(found) or 'none'}).")
    return candidate


def load_adapter(source) -> Adapter:
    """Read a PEFT adapter folder (or its adapter_config.json) and map its keys; no tensor data is read."""

    path = resolve_path(source)
    folder = path.parent if path.is_file() else path
    config_path = folder / CONFIG_NAME
    if path.is_file() and path.suffix == ".safetensors" and not config_path.is_file():

        return load_single_file(path)
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
        if nested:
            raise LoratvError(
                f"{folder}: holds several named adapters ({', '.join(nested)}); choose one with --adapter-name."
            )
        raise LoratvError(f"{folder}: not a PEFT adapter (no {CONFIG_NAME}).")

    config = safe_json.read(config_path)
    settings = parse_config(config, config_path)
    weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise LoratvError(f"{folder}: adapter has no {WEIGHT_NAMES[0]} (or {WEIGHT_NAMES[1]}).")
    tensors = Checkpoint(weights)
    adapter = Adapter(path=folder, config_path=config_path, settings=settings, tensors=tensors)
    _map_keys(adapter)
    return adapter


def _map_keys(adapter: Adapter) -> None:
    if adapter.settings.peft_type == "LORA":
        _map_lora_keys(adapter)
    else:

        map_tuner_keys(adapter)
    _check_layer_and_exclude_rules(adapter)
    file = adapter.tensors.path
    # `<targeted module>.base_layer.<param>` is the module's own parameter (saved bias or saved embedding)
    for name in list(adapter.replacements):
        if ".base_layer." in name:
            module, _, param = name.rpartition(".base_layer.")
            if module not in adapter.modules:
                raise LoratvError(f"{file}: tensor '{PREFIX}{name}' has a base_layer infix but its module carries no adapter.")
            adapter.replacements[f"{module}.{param}"] = adapter.replacements.pop(name)
            adapter.saved_layers.add(f"{module}.{param}")


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
            adapter.modules[name] = LoraModule(name, name, kinds[name], a_key, b_key, r,
                                               alpha, adapter.settings.scale(r, alpha))
    adapter.resolve_names = None


TRANSPOSED_EXPERT_MODELS = {"gpt_oss", "openai_privacy_filter", "aria"}  # MoE stacks stored (E, in, out)


def _param_fit(a, b, shape, config):
    """The kind of a ParamWrapper LoRA (A (r·E, in), B (out, r·E)) on a raw parameter of `shape`, or None."""
    if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
        return None
    if len(shape) == 2:
        return "linear" if tuple(shape) == (b[0], a[1]) else None
    if len(shape) != 3 or a[0] % shape[0]:
        return None
    swapped, transposed = (shape[0], b[0], a[1]), (shape[0], a[1], b[0])
    if swapped == transposed == tuple(shape):  # square experts: the model class decides (is_transposed)
        return "experts_t" if (config or {}).get("model_type") in TRANSPOSED_EXPERT_MODELS else "experts"
    return {swapped: "experts", transposed: "experts_t"}.get(tuple(shape))


# LoRA variants whose saved extra tensors only shape training: (config field, key infix). PEFT's merge_unsafe of
# VeloraLinearVariant and MontecloraLinearVariant (peft/tuners/lora/variants.py) adds the plain Linear get_delta_weight,
# s·B@A; VeLoRA's `lora_velora_embed` (its activation-compression projection) and MonteCLoRA's
# `lora_monteclora_sampler.*` (its Monte Carlo perturbation of A during training) are never read by the merge.
TRAINING_ONLY_TENSORS = (("velora_config", ".lora_velora_embed"), ("monteclora_config", ".lora_monteclora_sampler."))


def _training_only(adapter: Adapter, name: str) -> bool:
    """Whether adapter tensor `name` is a training-time tensor of a LoRA variant the config enables."""
    raw = adapter.settings.raw
    return any(raw.get(field) and infix in name for field, infix in TRAINING_ONLY_TENSORS)


def _map_lora_keys(adapter: Adapter) -> None:
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
        if name.endswith(".token_adapter.trainable_tokens_delta"):
            module = name[: -len(".token_adapter.trainable_tokens_delta")]
            adapter.token_rows[module + ".weight"] = (key, _token_indices(adapter, module, key))
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
        if module in adapter.param_groups:
            adapter.param_groups[module] = (a_key, b_key)
            continue
        configured = adapter.settings.rank_for(module)
        if configured != r:
            raise LoratvError(
                f"{adapter.config_path}: module '{module}' has rank {r} in the file but {configured} by the config's r/rank_pattern."
            )
        alpha = adapter.settings.alpha_for(module)
        adapter.modules[module] = LoraModule(
            module=module,
            target=module + ".weight",
            kind="embedding" if embedding else "linear",
            a_key=a_key,
            b_key=b_key,
            r=r,
            alpha=alpha,
            scale=adapter.settings.scale(r, alpha),
            bias_key=parts.get("bias"),
            magnitude_key=magnitude,
        )


@dataclass
class MergePlan:
    """What the adapter does to each base tensor, checked against the base's names and shapes."""

    deltas: dict  # base tensor name -> list of LoraModule
    replacements: dict  # base tensor name -> adapter key
    bias_additions: dict  # base bias name -> LoraModule
    new_tensors: dict  # output name -> (source: "base"|"adapter", key) for tensors the base does not store
    untied: bool
    notes: list

    def touched(self) -> set:
        return set(self.deltas) | set(self.replacements) | set(self.bias_additions) | set(self.new_tensors)


def bind(adapter: Adapter, base: Checkpoint) -> MergePlan:
    """Map every adapter tensor onto the base, resolve orientation and tied embeddings, check every shape."""
    config = base.config or {}
    quantized = config.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else "unknown"
        raise LoratvError(f"{base.path}: the base is quantized (quant_method {method}); an adapter trained on it saw "
                          "dequantized weights, so no merge from the file is exact: give the unquantized base.")
    if adapter.resolve_names in (None, _resolve_target_parameters):  # names final: the base's layout may differ

        layout = layout_for(adapter, base)
        if layout is not None:  # transformers-5 in-memory names on an on-disk checkpoint
            return layout.bind(adapter, bind)
    if adapter.resolve_names is not None:
        adapter.resolve_names(adapter, base)
    tied = config.get("tie_word_embeddings", True)
    model_type = config.get("model_type")
    input_embedding = next((n for n in base.names() if n.endswith(INPUT_EMBEDDING_SUFFIXES)), None)
    notes: list[str] = []
    deltas: dict[str, list] = {}
    replacements: dict[str, str] = {}
    new_tensors: dict[str, tuple] = {}
    untied = False

    def tied_partner(name):
        """The stored input embedding when `name` is an output embedding the base does not store (tied)."""
        if name not in base and name in OUTPUT_EMBEDDING_NAMES and tied and input_embedding is not None:
            return input_embedding
        return None

    for module in adapter.modules.values():
        target = module.target
        partner = tied_partner(target)
        if partner is not None:
            notes.append(f"{target} is tied to {partner}: its LoRA delta is merged into {partner}, which stays tied.")
            target = partner
        copies = 1
        if target not in base and adapter.settings.peft_type == "LORA":
            target, copies = _multihead_attention_target(adapter, module, base, target)
        if target not in base:
            raise LoratvError(
                f"{adapter.tensors.path}: module '{module.module}' targets '{module.target}', which the base model {base.path} lacks."
            )
        if adapter.settings.peft_type != "LORA":
            _bind_tuner(adapter, module, base, target, model_type, deltas)
            continue
        if module.kind in ("experts", "experts_t"):  # shapes checked when the parameter was resolved
            deltas.setdefault(target, []).append(module)
            continue
        module.kind = _orientation(module, adapter, base.entry(target).shape, model_type)
        deltas.setdefault(target, []).extend([module] * copies)
        if module.magnitude_key is not None:
            _check_magnitude(adapter, module, base.entry(target).shape)
        if module.bias_key:
            bias = module.module + ".bias"
            if bias not in base:
                raise LoratvError(
                    f"{adapter.tensors.path}: lora_bias on '{module.module}' but the base has no '{bias}' to add it to."
                )
            _check_shape(adapter, module.bias_key, base.entry(bias).shape, bias)

    for name, key in adapter.replacements.items():
        partner = tied_partner(name)
        if partner is not None and name in adapter.saved_layers:
            # the saved base layer of a LoRA-targeted tied head is the shared tensor: it replaces the stored partner
            _check_shape(adapter, key, base.entry(partner).shape, name)
            replacements[partner] = key
            continue
        if partner is not None:
            # a trained copy of a tied head replaces only the head: the pair is untied (as PEFT's unload does)
            _check_shape(adapter, key, base.entry(partner).shape, name)
            new_tensors[name] = ("adapter", key)
            untied = True
            notes.append(f"{name} is replaced by a trained copy, so it is no longer tied to {partner}.")
            continue
        if name not in base:
            raise LoratvError(f"{adapter.tensors.path}: tensor '{key}' replaces '{name}', which the base model {base.path} lacks.")
        _check_shape(adapter, key, base.entry(name).shape, name)
        replacements[name] = key
        if tied and name == input_embedding and name not in adapter.saved_layers and not any(
            n in base for n in OUTPUT_EMBEDDING_NAMES
        ):
            head = next(iter(OUTPUT_EMBEDDING_NAMES))
            new_tensors[head] = ("base", name)
            untied = True
            notes.append(f"{name} is replaced by a trained copy; the tied head keeps the base values as {head}.")
    for name, (key, indices) in adapter.token_rows.items():
        if name not in base or len(base.entry(name).shape) != 2:
            raise LoratvError(f"{adapter.tensors.path}: '{key}' trains rows of '{name}', which the base {base.path} "
                              "lacks or which is not a matrix.")
        rows, dim = base.entry(name).shape
        if adapter.tensors.entry(key).shape[1] != dim or max(indices) >= rows or min(indices) < 0:
            raise LoratvError(f"{adapter.tensors.path}: '{key}' does not fit '{name}' {[rows, dim]} (token indices "
                              f"{min(indices)}–{max(indices)}, rows of {adapter.tensors.entry(key).shape[1]}).")
        if name in deltas or name in replacements:
            raise LoratvError(f"{adapter.tensors.path}: '{name}' has trained token rows and another update; their "
                              "combined merge is not defined.")
        replacements[name] = TOKEN_ROWS  # the shared tensor itself: a tied head follows it, as in PEFT
    return MergePlan(deltas, replacements, adapter.bias_additions(), new_tensors, untied, notes)


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
    if module.magnitude_key is not None or module.bias_key is not None:
        raise LoratvError(f"{adapter.tensors.path}: module '{name}' is on the MultiheadAttention '{owner}' with DoRA or "
                          "lora_bias, which PEFT's MultiheadAttention LoRA does not build; loratv does not merge it.")
    return found, copies


def _bind_tuner(adapter, module, base, target, model_type, deltas) -> None:
    """A LoHa/LoKr/AdaLoRA/VeRA/IA³/OFT module: orientation from fan_in_fan_out (PEFT forces it for Conv1D), shapes
    checked; IA³ also scales the bias of a non-feedforward module."""

    shape = tuple(base.entry(target).shape)
    if len(shape) > 2:
        module.kind = "conv"
    elif module.peft_type in ("LOHA", "LOKR"):
        module.kind = "linear"  # PEFT reshapes their delta to the stored weight whatever its layout
    else:
        module.kind = _tuner_orientation(adapter, module, shape, model_type)
    check_fits(adapter, module, shape)
    deltas.setdefault(target, []).append(module)
    bias = module.module + ".bias"
    if module.peft_type == "IA3" and not module.options["feedforward"] and bias in base:
        deltas.setdefault(bias, []).append(ia3_bias_module(module))


def _tuner_orientation(adapter, module, shape, model_type) -> str:
    """"linear" (out, in) or "conv1d" (in, out) for an AdaLoRA/VeRA/IA³/OFT module on a 2-D weight, layer by layer.

    The saved `fan_in_fan_out` cannot decide: PEFT switches it per layer while it builds the model (ia3/model.py
    `_create_new_module`: True for a Conv1D, False for a Linear) and saves the value the last layer left, so a model
    mixing Conv1D and Linear layers (GPT-2's `c_attn` and its `lm_head`/`score` head) saves one flag for both kinds.
    So: GPT-2-family Conv1D modules are Conv1D; otherwise the orientation the adapter's shapes fit; only when both fit
    (a square weight) does the flag decide, outside the GPT-2 family.
    """

    leaf = module.module.rsplit(".", 1)[-1]
    if model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_MODULES:
        return "conv1d"
    fitting = []
    for kind in ("linear", "conv1d"):
        # OFT refuses Conv1D outright; its fit is that of the transposed weight, so a refusal stays a refusal
        oft_conv1d = kind == "conv1d" and module.peft_type == "OFT"
        module.kind = "linear" if oft_conv1d else kind
        try:
            check_fits(adapter, module, shape[::-1] if oft_conv1d else shape)
            fitting.append(kind)
        except LoratvError:
            pass
    if len(fitting) == 1:
        return fitting[0]
    if model_type in CONV1D_MODEL_TYPES:
        return "linear"
    return "conv1d" if adapter.settings.fan_in_fan_out else "linear"  # none fits: check_fits says why


def refuse_non_lora(adapter: "Adapter", command: str) -> None:
    """Commands that work on LoRA factors (B, A) cannot take other tuners."""
    if adapter.settings.peft_type != "LORA":
        raise LoratvError(f"{adapter.config_path}: {adapter.settings.tuner_name} adapters have no LoRA factors; "
                          f"loratv {command} takes LoRA adapters only (merge, compare, validate and inspect take "
                          f"{adapter.settings.tuner_name}).")


def _check_magnitude(adapter, module: LoraModule, shape) -> None:
    """DoRA's m has one value per output feature: rows of a Linear weight, columns of Conv1D and Embedding weights."""
    want = shape[1] if module.kind in ("conv1d", "embedding") else shape[0]
    got = tuple(adapter.tensors.entry(module.magnitude_key).shape)
    if module.kind == "conv" and got == (1, want, *[1] * (len(shape) - 2)):
        return  # stored (1, out, 1, …), used per output channel
    if got != (want,):
        raise LoratvError(f"{adapter.tensors.path}: DoRA magnitude '{module.magnitude_key}' has shape {list(got)}, "
                          f"but module '{module.module}' has {want} output features.")


def refuse_dora(adapter: "Adapter", command: str) -> None:
    """Commands that treat the adapter as an additive ΔW cannot take DoRA (its merge rescales W + ΔW per feature)."""
    if adapter.settings.use_dora:
        raise LoratvError(f"{adapter.config_path}: DoRA adapters are not additive (W' = m ⊙ (W + ΔW)/‖W + ΔW‖); "
                          f"loratv {command} does not handle them yet, only merge does.")


def dora_merge(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, kind: str) -> torch.Tensor:
    """PEFT's DoRA merge of a whole tensor in the stored orientation, in the dtype of `w` and `delta` (the promoted one):
    V = W + ΔW, n = ‖V‖₂ along the input axis (rows of a Linear weight; columns of Conv1D/Embedding, computed on the
    transposed view as PEFT does), W' = (m / n) ⊙ V."""
    if kind == "conv":  # _DoraConvNdVariant: norms over everything but the output channel
        norm = (w + 1 * delta).norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)
        return (magnitude.view(norm.shape) / norm).view(-1, *[1] * (w.dim() - 1)) * (w + delta)
    if kind == "linear":
        norm = torch.linalg.norm(w + 1 * delta, dim=1)
        return (magnitude / norm).view(-1, 1) * (w + delta)
    norm = torch.linalg.norm(w.T + 1 * delta.T, dim=1)
    return (magnitude / norm).view(-1, 1).T * (w + delta)


def _check_shape(adapter, key, shape, target):
    got = adapter.tensors.entry(key).shape
    if tuple(got) != tuple(shape):
        raise LoratvError(
            f"{adapter.tensors.path}: tensor '{key}' has shape {list(got)} but base tensor '{target}' has {list(shape)}."
        )


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


def delta_rows(adapter: Adapter, module: LoraModule, start: int, stop: int, dtype, device, factor_dtype=None) -> torch.Tensor:
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
    if module.kind in ("experts", "experts_t"):  # rows are experts: one GEMM per expert, the same alone or batched
        a, b = _factors(adapter, module, dtype, device, factor_dtype)
        return expert_delta(a, b, module.r, module.scale, module.kind, start, stop)
    key = (module.module, module.a_key, module.kind, dtype, str(device), factor_dtype)
    product = adapter.products.get(key)
    if product is None:
        a, b = _factors(adapter, module, dtype, device, factor_dtype)
        if module.kind == "conv":
            product = conv_delta(a, b, module.scale)
        else:  # `* s` in place after the product: the same rounding as PEFT's `* scaling`, one allocation fewer
            product = (b @ a).mul_(module.scale)
            if module.kind != "linear":  # conv1d, stored (in, out), and embedding (V, D): ΔW = (s·B@A)ᵀ
                product = product.T
        adapter.products[key] = product
    if stop >= product.shape[0]:
        adapter.products.pop(key, None)
    return product[start:stop]


def _factors(adapter: Adapter, module: LoraModule, dtype, device, factor_dtype):
    """(A, B) in `dtype` on `device`, rounded to `factor_dtype` first when given."""
    a = adapter.factor(module.a_key)
    b = adapter.factor(module.b_key)
    if factor_dtype is not None:
        a, b = a.to(factor_dtype), b.to(factor_dtype)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)




def bias_delta(adapter: Adapter, module: LoraModule, dtype, device) -> torch.Tensor:
    return adapter.factor(module.bias_key).to(device=device, dtype=dtype) * module.scale
