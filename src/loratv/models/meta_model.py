"""The tensors a checkpoint holds, from its config.json alone, for every architecture transformers knows.

transformers builds the model on the meta device (shapes and dtypes, no storage, no weights read, nothing
downloaded, no remote code), and the inventory is then taken the way `PreTrainedModel.save_pretrained` takes it:
the state dict (persistent buffers included), less `_keys_to_ignore_on_save`, less the tied copies
(`remove_tied_weights_from_state_dict`: a tied weight is saved once), renamed back to the on-disk layout
(`revert_weight_conversion`: transformers 5 fuses or renames some modules in memory, e.g. MoE experts, and splits
them again on save). Dtypes follow `from_pretrained`: the config's dtype, except the modules the model keeps in
float32 (`_get_dtype_plan`) and tensors created with a fixed dtype (integer buffers).

transformers is an optional dependency (`pip install 'loratv[transformers]'`); without it `loratv inspect
--config-only` falls back to the hand-written families of architectures.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from loratv.common.dtypes import TORCH_TO_CODE
from loratv.errors import BadInputError, LoratvError
from loratv.models.architectures import FAMILIES, config_dtype, config_tensors

EXTRA = "loratv[transformers]"



class TransformersMissing(LoratvError):
    """transformers (the `loratv[transformers]` extra) is not installed, or is older than 5.

    Attributes:
        need: what is missing, e.g. "transformers, which is not installed".
        command: the pip command that installs it.
    """

    def __init__(self, where: str, need: str, command: str, known: str = ""):
        self.where, self.need, self.command = where, need, command
        without = f" (without it, loratv knows only {known})" if known else ""
        super().__init__(f"{where}: shapes from config.json alone need {need}: {command}{without}.")


@dataclass
class Inventory:
    """What `save_pretrained` writes for a config: tensors in state-dict order, and how they were found.

    Attributes:
        tensors: (name, shape, dtype) per saved tensor; dtype is a safetensors name ("BF16", "I64"), or None for a
            floating-point tensor when config.json states no dtype.
        tied: tied copy (its name in memory) -> the saved name of the tensor it shares storage with (saved once).
        head: saved names of the output embedding's weight (the LM head), when the model has one and saves it.
        linear: saved names of the weights of nn.Linear / Conv1D modules other than the output embedding: what
            PEFT's `all-linear` targets (None when unknown: the hand-written families).
        memory_names: saved name -> the name the tensor has in the model transformers builds, where they differ
            (PEFT matches LoRA targets against these; e.g. ViT saves `attention.attention.query`, builds `q_proj`).
        model_class: the transformers class built, e.g. "LlamaForCausalLM".
        notes: sentences about choices made (the class used when config.json names none transformers defines).
    """

    tensors: list = field(default_factory=list)
    tied: dict = field(default_factory=dict)
    head: list = field(default_factory=list)
    linear: list | None = None
    memory_names: dict = field(default_factory=dict)
    model_class: str = ""
    notes: list = field(default_factory=list)


def import_transformers(where: str):
    """transformers, or TransformersMissing naming the extra.

    Args:
        where: the config file, named in the error.

    Returns:
        The transformers module.

    Raises:
        TransformersMissing: transformers cannot be imported.
    """
    try:
        import transformers
    except ImportError:
        raise TransformersMissing(where, "transformers, which is not installed", f"pip install '{EXTRA}'") from None
    try:  # the save-time conversions read below arrived with transformers 5
        from transformers.core_model_loading import revert_weight_conversion  # noqa: F401
    except ImportError:
        raise TransformersMissing(where, f"transformers 5 or later (found {transformers.__version__})",
                                  f"pip install -U '{EXTRA}'") from None
    return transformers


def saved_inventory(config: dict, where: str) -> Inventory:
    """The tensors `save_pretrained` writes for the model a config.json describes, built on the meta device.

    Args:
        config: config.json as a dict (model_type required; architectures chooses the class).
        where: the config file, named in errors.

    Returns:
        The Inventory: names as saved on disk, shapes, dtypes, tied copies and the head.

    Raises:
        TransformersMissing: transformers is not installed.
        LoratvError: an unknown model_type, or a config transformers cannot build (one sentence, naming `where`).
    """
    model, notes, dtype = build_meta_model(config, where)
    try:
        state, tied, memory = _saved_state_dict(model, dtype)
    except Exception as exc:  # a save-time conversion this model's meta tensors do not support
        raise BadInputError(f"{where}: transformers cannot write {type(model).__name__}'s state dict in its saved "
                          f"layout ({_reason(exc)}).") from None
    head = _head_names(model, state)
    linear_memory = _linear_weights(model)
    linear = [name for name in state if memory.get(name) in linear_memory]
    tensors = []
    for name, tensor in state.items():
        floating = tensor.dtype.is_floating_point
        # a floating-point tensor's dtype is the config's (or the fp32 plan's); unstated, the checkpoint decides
        known = dtype is not None or not floating
        tensors.append((name, tuple(tensor.shape), safetensors_dtype(tensor.dtype) if known else None))
    renamed = {saved: in_memory for saved, in_memory in memory.items() if in_memory and in_memory != saved}
    return Inventory(tensors=tensors, tied=tied, head=head, linear=linear, memory_names=renamed,
                     model_class=type(model).__name__, notes=notes)


def build_meta_model(config: dict, where: str):
    """The model transformers builds from a config.json, on the meta device: its module tree, names, shapes and
    dtypes, with no storage, no download and no remote code.

    Args:
        config: the parsed config.json.
        where: the config file, named in errors.

    Returns:
        (model, notes about the class chosen, the dtype config.json states or None).

    Raises:
        TransformersMissing: transformers (5 or later) is not installed.
        LoratvError: an unknown model_type, or a config transformers cannot build (one sentence, naming `where`).
    """
    transformers = import_transformers(where)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        what = f"model_type {model_type!r}" if model_type else "no model_type"
        raise BadInputError(f"{where}: {what} is not an architecture transformers {transformers.__version__} knows "
                          "(custom code is never run; inspect the weights instead).")
    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(dict(config))
    except Exception as exc:  # a config class rejecting its values: one sentence, not a traceback
        raise BadInputError(f"{where}: transformers rejects this {model_type} config ({_reason(exc)}).") from None
    _no_downloads(hf_config)
    try:
        cls, notes = _model_class(transformers, hf_config, config)
    except LoratvError as exc:
        raise BadInputError(f"{where}: {exc}") from None
    except Exception as exc:  # a modeling module whose own dependency (timm, ...) is missing fails on import
        raise BadInputError(f"{where}: transformers cannot load the {model_type} model class ({_reason(exc)}).") from None
    dtype = stated_dtype(config)
    try:
        with torch.device("meta"):  # shapes and dtypes only: no storage is allocated, whatever the model's size
            model = cls._from_config(hf_config, dtype=getattr(torch, dtype) if dtype else None)
    except Exception as exc:
        raise BadInputError(f"{where}: transformers cannot build {cls.__name__} from this config "
                          f"({_reason(exc)}).") from None
    return model, notes, dtype


def stated_dtype(config: dict):
    """The torch dtype name config.json states (`dtype`, or `torch_dtype` before transformers 5), or None.

    Args:
        config: config.json as a dict.

    Returns:
        "float32", "float16", "bfloat16", "float64", or None when absent, "auto" or unknown.
    """
    name = config.get("dtype", config.get("torch_dtype"))
    return name if name in ("float32", "float16", "bfloat16", "float64") else None


def safetensors_dtype(dtype: torch.dtype) -> str:
    """The safetensors header name of a torch dtype ("BF16" for torch.bfloat16).

    Args:
        dtype: a torch dtype.

    Returns:
        Its safetensors code, or for a dtype safetensors has no code loratv knows, the upper-cased torch name
        (e.g. "COMPLEX64").
    """

    return TORCH_TO_CODE.get(dtype, str(dtype).removeprefix("torch.").upper())


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _no_downloads(hf_config) -> None:
    """Backbones that would fetch pretrained weights at construction build empty instead (the shapes are the same)."""
    seen = set()
    stack = [hf_config]
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        if getattr(c, "use_pretrained_backbone", False):
            c.use_pretrained_backbone = False
        for key in getattr(c, "sub_configs", {}) or {}:
            sub = getattr(c, key, None)
            if sub is not None and hasattr(sub, "to_dict"):
                stack.append(sub)


def _model_class(transformers, hf_config, config: dict):
    """The class save_pretrained would have been called on: config.json's `architectures[0]` when transformers
    defines it; else the causal LM of the model type (what the hand-written families assume); else the base model;
    else the first task class transformers maps the type to.

    Returns:
        (class, notes)
    """
    from transformers import PreTrainedModel
    from transformers.models.auto import modeling_auto

    notes: list[str] = []
    names = config.get("architectures") or []
    if isinstance(names, list) and names:
        # only classes transformers itself exports: a name from auto_map (remote code) is never imported
        cls = getattr(transformers, str(names[0]), None) if str(names[0]).isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls, notes
        notes.append(f"architectures names {names[0]}, which transformers does not define; read as ")
    model_type = hf_config.model_type
    # then any task's class (segmentation-only or pose-only types have no base model in MODEL_MAPPING_NAMES)
    others = sorted(k for k in vars(modeling_auto) if k.startswith("MODEL_FOR_") and k.endswith("_MAPPING_NAMES"))
    for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_MAPPING_NAMES", *others):
        name = getattr(modeling_auto, mapping).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        cls = getattr(transformers, name, None) if name else None
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            if notes:
                notes[-1] += f"{cls.__name__}."
            elif not names:
                notes.append(f"config.json names no architectures; read as {cls.__name__}.")
            return cls, notes
    raise BadInputError(f"model_type {model_type!r}: transformers has no model class for it to build.")


def _saved_state_dict(model, dtype):
    """save_pretrained's state dict for a meta model: ({name: meta tensor} in save order, {tied copy: kept},
    {saved name: its name in memory, or None for a tensor a conversion made, e.g. one expert split off})."""
    from transformers.core_model_loading import build_glob_alternation, revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in model._keys_to_ignore_on_save or []:
        state.pop(key, None)
    before = dict(state)
    state = remove_tied_weights_from_state_dict(state, model)
    tied = {}
    for name in before.keys() - state.keys():
        param = model.get_parameter_or_buffer(name)
        tied[name] = next((k for k in state if model.get_parameter_or_buffer(k) is param), None)
    if dtype is not None:
        # from_pretrained loads these modules in float32 whatever the config's dtype says (fp16 / bf16)
        plan = model._get_dtype_plan(getattr(torch, dtype))
        if plan:
            pattern, group_to_glob, _ = build_glob_alternation(list(plan))
            for name, tensor in state.items():
                match = pattern.search(name)
                if match and tensor.dtype.is_floating_point:
                    state[name] = torch.empty(tensor.shape, dtype=plan[group_to_glob[match.lastgroup]], device="meta")
    # a renaming passes the tensor object through, a converter makes new ones: identity gives the memory name back
    origin = {id(tensor): name for name, tensor in state.items()}
    state = revert_weight_conversion(model, state)
    memory = {name: origin.get(id(tensor)) for name, tensor in state.items()}
    saved_as = {kept: name for name, kept in memory.items() if kept is not None}
    return state, {copy: saved_as.get(kept, kept) for copy, kept in tied.items()}, memory


def _linear_weights(model) -> set:
    """In-memory names of the nn.Linear / Conv1D weights but the output embedding's (PEFT's `all-linear` rule)."""
    from transformers.pytorch_utils import Conv1D

    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head}


def _head_names(model, state) -> list:
    """Saved names of the output embedding's weight, when it is its own tensor (not tied to the input embedding)."""
    try:
        head = model.get_output_embeddings()
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return []
    weight = getattr(head, "weight", None)
    if weight is None or weight is getattr(embedding, "weight", None):
        return []
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    return [n for n in names if n in state]


def parameter_count(inventory: Inventory) -> int:
    """Scalars in the saved tensors (a tied weight once).

    Args:
        inventory: an Inventory.

    Returns:
        The sum of the saved tensors' element counts.
    """
    return sum(math.prod(shape) for _, shape, _ in inventory.tensors)


def peft_default_targets(model_type):
    """PEFT's default LoRA targets for a model type, or None where PEFT has none (or is not installed).

    Args:
        model_type: config.json's model_type.

    Returns:
        A list of module names (e.g. ["q", "v"] for t5), or None.
    """
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        return None
    targets = mapping.get(model_type)
    return list(targets) if targets else None


def config_inventory(config: dict, where: str) -> tuple:
    """The saved tensors of the model a config.json describes: transformers on the meta device when installed, else
    loratv's hand-written families (architectures.py).

    Args:
        config: config.json as a dict.
        where: the config file, named in errors.

    Returns:
        (Inventory, source): source says which path answered, "transformers X.Y (meta device)" or
        "architectures.py".

    Raises:
        TransformersMissing: transformers is not installed and the model type is not a hand-written family (the
            sentence names the extra and the families known without it).
        LoratvError: a config that is not an object, an unknown model type, or one transformers cannot build.
    """

    if not isinstance(config, dict):
        raise BadInputError(f"{where}: config.json is not a JSON object.")
    try:
        inventory = saved_inventory(config, where)
    except TransformersMissing as missing:
        if config.get("model_type") not in FAMILIES:
            raise TransformersMissing(where, missing.need, missing.command, ", ".join(sorted(FAMILIES))) from None
        return handwritten_inventory(config, where, missing), "architectures.py"
    import transformers

    return inventory, f"transformers {transformers.__version__} (meta device)"


def handwritten_inventory(config: dict, where: str, missing: TransformersMissing | None = None) -> Inventory:
    """The Inventory of a hand-written family (starcoder2, llama, mistral, qwen2, gpt2), without transformers.

    Args:
        config: config.json as a dict whose model_type is one of architectures.FAMILIES.
        where: the config file, named in errors.
        missing: why transformers was not used, for the report's note.

    Returns:
        The Inventory the formulas of architectures.py give (one dtype for every tensor, the config's).

    Raises:
        LoratvError: an unknown family or a missing / invalid shape key.
    """

    tensors, tied = config_tensors(config, where)
    dtype = config_dtype(config)
    need, command = (missing.need, missing.command) if missing else ("transformers", f"pip install '{EXTRA}'")
    embedding = tensors[0][0]  # every family starts with its token embedding
    head = "lm_head.weight"
    return Inventory(
        tensors=[(name, tuple(shape), dtype) for name, shape in tensors],
        tied={head: embedding} if tied else {},
        head=[] if tied else [head],
        model_class="",
        notes=[f"shapes from loratv's hand-written {config['model_type']} rules; every architecture needs "
               f"{need} ({command})."],
    )
