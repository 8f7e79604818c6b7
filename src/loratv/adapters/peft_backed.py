"""PEFT's own layer code as a merge engine, one base module at a time (the start of issue 17).

For a tuner loratv has no formula for, the merged weight of one module is what PEFT's layer computes: the adapter's
config builds PEFT's model around a holder that has every targeted module, but only the module being merged holds
its real base tensors; the others hold one zero element broadcast to their shape (stride 0, no memory), so shared
state that PEFT sizes from all targeted layers (RandLoRA and PVeRA bases, VBLoRA's bank, FRoD, TinyLoRA, UniLoRA)
comes out as in the real model. The module's adapter tensors and the shared ones are loaded with PEFT's
`set_peft_model_state_dict`, and PEFT's `merge()` runs in the base dtype, exactly as `merge_and_unload` does on a
model loaded in that dtype. Memory: one module's base tensors plus the adapter's parameters.

PEFT is an optional dependency (`pip install 'loratv[peft]'`); without it the refusal says which extra to install.
"""

from collections.abc import Mapping

import torch
from torch import nn

from loratv.errors import BadInputError, UnsupportedAdapterError

EXTRA = "pip install 'loratv[peft]'"
MODEL_PREFIX = "base_model.model."


def _placeholder(tensor: torch.Tensor) -> nn.Parameter:
    """A parameter of `tensor`'s shape and dtype that stores one element (stride 0)."""
    return nn.Parameter(torch.zeros(1, dtype=tensor.dtype).expand(tensor.shape), requires_grad=False)


def _with_placeholders(layer: nn.Module) -> nn.Module:
    for name, param in list(layer.named_parameters(recurse=False)):
        setattr(layer, name, _placeholder(param))
    return layer


def _holder(layers: Mapping[str, nn.Module]) -> nn.Module:
    """An nn.Module tree with each layer at its dotted name, as in the real model."""
    root = nn.Module()
    for name, layer in layers.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, layer)
    return root


def _peft():
    """PEFT's functions this module calls, or the sentence that names the extra to install."""
    try:
        from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
    except ImportError:
        raise UnsupportedAdapterError(f"merging this adapter kind runs PEFT's own layer code; install it with `{EXTRA}`.") from None
    return PeftConfig, get_peft_model, set_peft_model_state_dict


def peft_merged_module(config: Mapping[str, object], layers: Mapping[str, nn.Module], module: str,
                       tensors: Mapping[str, torch.Tensor], *, source: str = "adapter") -> dict[str, torch.Tensor]:
    """The base parameters of one module after PEFT's `merge()` of the adapter into it.

    Args:
        config: the adapter_config.json dict (its peft_type picks PEFT's tuner).
        layers: every module the config targets, by its name in the model, as PyTorch layers of the base's types and
            shapes; the one named `module` must hold its real base tensors (in the dtype the merge runs in), the
            others only their shapes (their parameters are replaced by stride-0 placeholders).
        module: the module to merge.
        tensors: the adapter's tensors as saved (keys `base_model.model.<module>.…` and the shared ones); tensors
            of other modules may be left out.
        source: what messages call the adapter (its file).

    Returns:
        The merged layer's own parameters (e.g. weight, bias) by name, detached.

    Raises:
        UnsupportedAdapterError: PEFT is not installed, or cannot build this tuner on these layers.
        BadInputError: a stored tensor does not fit PEFT's layer (another base, or a damaged file).
    """
    peft_config_class, get_peft_model, set_peft_model_state_dict = _peft()
    if module not in layers:
        raise BadInputError(f"{source}: module '{module}' is not among the layers given.")
    holder = _holder({name: layer if name == module else _with_placeholders(layer) for name, layer in layers.items()})
    others = [name for name in layers if name != module]
    own = {k: v for k, v in tensors.items()
           if not any(k.removeprefix(MODEL_PREFIX).startswith(other + ".") for other in others)}
    try:
        peft_config = peft_config_class.from_peft_type(**dict(config))
        model = get_peft_model(holder, peft_config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
        raise UnsupportedAdapterError(f"{source}: PEFT cannot build {config.get('peft_type')} on '{module}': "
                                      f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.") from None
    try:
        with torch.no_grad():
            loaded = set_peft_model_state_dict(model, dict(own))
    except RuntimeError as exc:
        raise BadInputError(f"{source}: the tensors of '{module}' do not fit PEFT's layer for this base: "
                            f"{str(exc).splitlines()[-1].strip()}") from None
    unexpected = [k for k in getattr(loaded, "unexpected_keys", []) if k.removeprefix(MODEL_PREFIX).startswith(module + ".")]
    if unexpected:
        raise BadInputError(f"{source}: PEFT's layer for '{module}' has no place for '{unexpected[0]}'.")
    layer = model.base_model.model.get_submodule(module)
    with torch.no_grad():
        layer.merge()
    base_layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return {name: param.detach() for name, param in base_layer.named_parameters(recurse=False)}
