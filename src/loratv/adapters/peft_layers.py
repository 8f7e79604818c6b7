"""The PyTorch layer a base module is, for PEFT's layer code to wrap (adapters/peft_backed.py).

The base architecture decides: transformers builds the model from config.json on the meta device (no weights, no
download, no remote code) and the module at the adapter's name is taken as it is — a Linear, transformers' Conv1D,
an Embedding, a ConvNd with its groups, a LayerNorm or an RMSNorm class. Where transformers cannot build the base
(no config.json, a custom architecture) or its layer does not have the stored shapes, the layer is told from the
stored tensors: 1-D → LayerNorm; 2-D → transformers' Conv1D for GPT-2-style models' c_attn/c_proj/c_fc, an
Embedding where the module's name says so (contains "emb"), else a Linear; 3-, 4- and 5-D → Conv1d/2d/3d with one
group.
"""

import torch
from torch import nn

from loratv.adapters.structures import CONV1D_MODEL_TYPES, CONV1D_MODULES
from loratv.errors import LoratvError
from loratv.models.meta_model import build_meta_model

CONVOLUTIONS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


def _architecture(state: dict, base):
    """The base's model on the meta device (built once per adapter), or None where transformers cannot build it."""
    if "architecture" not in state:
        state["architecture"] = None
        try:
            config = base.config
            if config:
                state["architecture"] = build_meta_model(config, str(base.root / "config.json"))[0]
        except (LoratvError, OSError):
            pass  # no architecture: the layer is told from the stored tensors
    return state["architecture"]


def _fits(layer: nn.Module, base, module: str) -> bool:
    """Whether every parameter of the layer the base stores has the stored shape (and the weight is stored)."""
    own = dict(layer.named_parameters(recurse=False))
    if "weight" not in own:
        return False
    return all(tuple(base.entry(f"{module}.{name}").shape) == tuple(param.shape)
               for name, param in own.items() if f"{module}.{name}" in base)


def _from_architecture(state: dict, base, module: str) -> nn.Module | None:
    model = _architecture(state, base)
    if model is None:
        return None
    prefix = getattr(model, "base_model_prefix", "")
    for name in (module, f"{prefix}.{module}", module.removeprefix(f"{prefix}.")):
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue
        if _fits(layer, base, module):
            return layer
    return None


def _from_shapes(base, module: str, model_type) -> nn.Module:
    shape = tuple(base.entry(f"{module}.weight").shape)
    has_bias = f"{module}.bias" in base
    leaf = module.rsplit(".", 1)[-1]
    with torch.device("meta"):
        if len(shape) == 1:
            return nn.LayerNorm(shape[0], bias=has_bias)
        if len(shape) == 2:
            if model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_MODULES:
                from transformers.pytorch_utils import Conv1D
                return Conv1D(shape[1], shape[0])
            if "emb" in leaf.lower():
                return nn.Embedding(shape[0], shape[1])
            return nn.Linear(shape[1], shape[0], bias=has_bias)
        if len(shape) in CONVOLUTIONS:
            kernel: tuple = tuple(shape[2:])
            return CONVOLUTIONS[len(shape)](shape[1], shape[0], kernel, bias=has_bias)  # type: ignore[arg-type]
    raise LoratvError(f"{base.path}: '{module}.weight' has {len(shape)} dimensions; no PyTorch layer stores such a "
                      "weight for PEFT to merge into.")


def layer_template(state: dict, base, module: str, model_type) -> nn.Module:
    """The module's layer on the meta device: the base architecture's own, else the one its stored tensors describe.

    Args:
        state: the adapter's shared state (caches the architecture under "architecture").
        base: the base checkpoint.
        module: the module's name in the model.
        model_type: the base's config model_type, or None.

    Returns:
        The layer, with the stored tensors' shapes.

    Raises:
        LoratvError: a weight of more than five dimensions.
    """
    return _from_architecture(state, base, module) or _from_shapes(base, module, model_type)
