"""A PEFT adapter on disk: loading it (`load_adapter`, `named_adapter`) and binding it to a base (`bind`, `MergePlan`).

The flow is generic: the adapter's kind (loratv/adapters/registry.py) maps the file's keys (`AdapterKind.map_keys`),
says where a module lands (`resolve_target`) and binds it (`bind_module`); this module applies the config's layer
and exclude rules, the saved base layers, tied embeddings and replacements. Key mapping follows PEFT (reference
§2.3): strip `base_model.model.`, the base parameter is the module's `.weight`; other tensors (saved biases,
`modules_to_save`, saved embeddings) replace base tensors. LoRA's own mapping, binding and ΔW (`delta_rows`) live in
loratv/adapters/kinds/lora.py and its variants in loratv/adapters/kinds/lora_variants/; their names are re-exported
here for the code and tests that import them from this module.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from loratv.adapters.config import parse_config
from loratv.adapters.kinds.lora import (  # noqa: F401  (re-exported: LoRA's key mapping, binding and ΔW)
    TRAINING_ONLY_TENSORS,
    _multihead_attention_target,
    _orientation,
    _register_param_owner,
    _resolve_target_parameters,
    _targeted_module,
    _training_only,
    delta_rows,
)
from loratv.adapters.kinds.lora_variants.base import check_shape as _check_shape
from loratv.adapters.kinds.lora_variants.base import lora_factors as _factors  # noqa: F401
from loratv.adapters.kinds.lora_variants.conv import conv_delta  # noqa: F401
from loratv.adapters.kinds.lora_variants.dora import _check_magnitude, dora_merge, refuse_dora  # noqa: F401
from loratv.adapters.kinds.lora_variants.lora_bias import bias_delta  # noqa: F401
from loratv.adapters.kinds.lora_variants.target_parameters import (  # noqa: F401
    TRANSPOSED_EXPERT_MODELS,
    _param_fit,
    expert_delta,
)
from loratv.adapters.kinds.lora_variants.trainable_tokens import (  # noqa: F401
    _token_indices,
    bind_token_rows,
    token_replacement,
)
from loratv.adapters.kohya import load_single_file
from loratv.adapters.layouts import layout_for
from loratv.adapters.registry import kind_for, kind_for_adapter
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
)
from loratv.errors import LoratvError, param
from loratv.io import safe_json
from loratv.io.checkpoint import Checkpoint, resolve_path


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
    subfolders named after them.

    Args:
        source: the adapter folder, a file in it, or a hub id (see resolve_path); None when none was given.
        name: the adapter's name ('default' for the top folder).

    Returns:
        The folder holding that adapter's adapter_config.json.

    Raises:
        LoratvError: `source` is None, `name` is empty, '.', '..' or holds a path separator, or the folder holds no
            adapter of that name (naming the ones it holds); or resolve_path's errors.
    """

    if source is None:
        raise LoratvError(f"{param('adapter_name', name)}: give the adapter folder too ({param('adapter')}, or the "
                          "inspected path).")
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise LoratvError(f"{param('adapter_name', name, flag_value=repr(name))}: an adapter name, not a path.")
    path = resolve_path(source)
    folder = path.parent if path.is_file() else path
    candidate = folder if name == "default" else folder / name
    if not (candidate / CONFIG_NAME).is_file():
        found = (["default"] if (folder / CONFIG_NAME).is_file() else []) + sorted(
            p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
        raise LoratvError(f"{folder}: holds no adapter named '{name}' (found: {', '.join(found) or 'none'}).")
    return candidate


def load_adapter(source) -> Adapter:
    """Read a PEFT adapter folder (or its adapter_config.json) and map its keys; no tensor data is read.

    A .safetensors file with no adapter_config.json beside it is read as a kohya / diffusers file (load_single_file).

    Args:
        source: the adapter folder, a file in it, or a hub id (see resolve_path).

    Returns:
        The Adapter, its modules keyed by the file's module names (a SingleFileAdapter for a single file).

    Raises:
        LoratvError: naming the folder when it has no adapter_config.json (or holds only named adapters in
            subfolders) or no adapter weights file; or the config, the file's keys or the layer / exclude rules are
            refused (from parse_config, the kind's map_keys and the checks here).
    """

    path = resolve_path(source)
    folder = path.parent if path.is_file() else path
    config_path = folder / CONFIG_NAME
    if path.is_file() and path.suffix == ".safetensors" and not config_path.is_file():

        return load_single_file(path)
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}"))
        if nested:
            raise LoratvError(
                f"{folder}: holds several named adapters ({', '.join(nested)}); choose one with {param('adapter_name')}."
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
    kind_for_adapter(adapter).map_keys(adapter)
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
        """Every base or output tensor name the plan changes or adds.

        Returns:
            The union of the names in deltas, replacements, bias_additions and new_tensors.
        """
        return set(self.deltas) | set(self.replacements) | set(self.bias_additions) | set(self.new_tensors)


def bind(adapter: Adapter, base: Checkpoint) -> MergePlan:
    """Map every adapter tensor onto the base, resolve orientation and tied embeddings, check every shape.

    Args:
        adapter: the loaded adapter (its module names may be resolved against the base here).
        base: the base checkpoint the adapter is merged into.

    Returns:
        The MergePlan: per base tensor its deltas, replacements and bias additions, tensors the base does not store,
        whether a tied pair is untied, and notes for the user.

    Raises:
        LoratvError: the base is quantized (quantization_config), a module's target or a replaced tensor is not in
            the base, or a shape does not fit (naming the adapter file and the tensor); or the kind's own refusals.
    """
    config = base.config or {}
    quantized = config.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "unknown") if isinstance(quantized, dict) else "unknown"
        raise LoratvError(f"{base.path}: the base is quantized (quant_method {method}); an adapter trained on it saw "
                          "dequantized weights, so no merge from the file is exact: give the unquantized base.")
    routed = kind_for(adapter.settings.peft_type, adapter.config_path).routed_on_base(adapter, base)
    if routed is not None:  # a case only the base reveals (AdaLoRA on a convolution): map the keys again
        adapter.settings = kind_for(routed, adapter.config_path).parse_settings(adapter.settings.raw,
                                                                               adapter.config_path)
        adapter.modules.clear()
        adapter.replacements.clear()
        adapter.saved_layers.clear()
        _map_keys(adapter)
    if adapter.resolve_names in (None, _resolve_target_parameters):  # names final: the base's layout may differ

        layout = layout_for(adapter, base)
        if layout is not None:  # transformers-5 in-memory names on an on-disk checkpoint
            return layout.bind(adapter, bind)
    if adapter.resolve_names is not None:
        adapter.resolve_names(adapter, base)
    tied = config.get("tie_word_embeddings", True)
    model_type = config.get("model_type")
    input_embedding = next((n for n in base.names() if n.endswith(INPUT_EMBEDDING_SUFFIXES)), None)
    kind = kind_for(adapter.settings.peft_type, adapter.config_path)
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
        if target not in base:  # the kind may know where it lands (LoRA on a MultiheadAttention)
            target, copies = kind.resolve_target(adapter, module, base, target)
        if target not in base:
            raise LoratvError(
                f"{adapter.tensors.path}: module '{module.module}' targets '{module.target}', which the base model {base.path} lacks."
            )
        kind.bind_module(adapter, module, base, target, model_type, deltas, copies)

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
    bind_token_rows(adapter, base, deltas, replacements)  # trainable tokens: whole rows replaced
    return MergePlan(deltas, replacements, adapter.bias_additions(), new_tensors, untied, notes)


def refuse_non_lora(adapter: "Adapter", command: str) -> None:
    """Commands that work on LoRA factors (B, A) cannot take other tuners.

    Args:
        adapter: the loaded adapter.
        command: the loratv command asking, for the message.

    Raises:
        LoratvError: naming the config file, when the adapter's kind has no LoRA factors (not `factored`).
    """
    kind = kind_for(adapter.settings.peft_type, adapter.config_path)
    if not kind.factored:
        takes = "merge, compare, validate and inspect take" if kind.compared else "merge and inspect take"
        raise LoratvError(f"{adapter.config_path}: {adapter.settings.tuner_name} adapters have no LoRA factors; "
                          f"loratv {command} takes LoRA adapters only ({takes} {adapter.settings.tuner_name}).")


