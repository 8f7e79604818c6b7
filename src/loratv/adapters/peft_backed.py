"""PEFT's own layer code as a merge engine, one base module at a time.

For a tuner loratv has no formula for, the merged parameters of one module are what PEFT's layer computes. A
holder nn.Module carries the module under its dotted name, as a layer of the base's own class (a Linear, transformers'
Conv1D, an Embedding, a ConvNd, a LayerNorm …) holding its real base tensors; PEFT's model is built around it from
the adapter's config, the adapter tensors are loaded with PEFT's `set_peft_model_state_dict`, and PEFT's `merge()`
runs in the dtype of the given tensors, exactly as `merge_and_unload` does on a model loaded in that dtype.

Two ways to build, both PEFT's result bit for bit:
- one module per build (most tuners): the holder has only that module, so the tuner's own initialisation sees the
  real base tensors (PSOFT, SuperTuning and DeFT derive state from them);
- one build per adapter (`whole_model`, for tuners whose shared state PEFT sizes from every targeted layer: RandLoRA
  and PVeRA bases, TinyLoRA's tied vectors): every targeted layer holds one zero element broadcast to its shape
  (stride 0, no memory), the whole adapter is loaded once, and each module's real tensors are swapped in for its
  merge and out again.
Memory: one module's base tensors plus the adapter's own parameters.

PEFT is an optional dependency (`pip install 'loratv[peft]'`); without it the refusal says which extra to install.
"""

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from loratv.errors import BadInputError, UnsupportedAdapterError

EXTRA = "pip install 'loratv[peft]'"
MODEL_PREFIX = "base_model.model."
TensorLoader = Callable[[str | None], dict]  # module (None: every module) -> adapter key -> tensor


def _placeholder(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `tensor`'s shape (floating ones in `dtype`) that stores one element (stride 0)."""
    keep = dtype if tensor.is_floating_point() else tensor.dtype
    return torch.zeros(1, dtype=keep).expand(tensor.shape)


def placeholder_layer(template: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `template` (any device, meta included) whose parameters and buffers store one element each.

    Args:
        template: the layer, e.g. built on the meta device.
        dtype: the dtype of its floating parameters and buffers.

    Returns:
        The copy.
    """
    layer = copy.deepcopy(template)
    for owner in layer.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            setattr(owner, name, nn.Parameter(_placeholder(param, dtype), requires_grad=False))
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer is not None:
                setattr(owner, name, _placeholder(buffer, dtype))
    return layer


def _set_real(layer: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Put the real base tensors into the layer's own parameters (copies: PEFT merges in place)."""
    for name, value in params.items():
        setattr(layer, name, nn.Parameter(value.detach().clone(), requires_grad=False))


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


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _is_placeholder(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 1 and all(step == 0 for step in tensor.stride())


def _adapter_to_float64(model: nn.Module) -> None:
    """Cast the adapter's floating parameters and buffers to float64 (the placeholders stay as they are)."""
    for owner in model.modules():
        for param in list(owner.parameters(recurse=False)):
            if param.is_floating_point() and not _is_placeholder(param) and param.dtype != torch.float64:
                param.data = param.data.to(torch.float64)
        for name, buffer in list(owner.named_buffers(recurse=False)):
            if buffer is not None and buffer.is_floating_point() and not _is_placeholder(buffer):
                owner._buffers[name] = buffer.to(torch.float64)


class PeftMerger:
    """PEFT's merge of one adapter's modules, one module at a time.

    Attributes:
        config: the adapter_config.json dict (its peft_type picks PEFT's tuner).
        templates: every module the config targets, by its name in the model, as a layer of the base's class and
            shapes (on the meta device is enough).
        load: the adapter tensors of a module and the shared ones, keyed as saved; `load(None)` gives all.
        whole_model: build PEFT's model once around every targeted layer (tuners with shared state sized from all
            layers) instead of once per module.
        source: what messages call the adapter (its file).
    """

    def __init__(self, config: Mapping[str, object], templates: Mapping[str, nn.Module], load: TensorLoader, *,
                 whole_model: bool = False, source: str = "adapter"):
        self.config, self.templates, self.load = dict(config), dict(templates), load
        self.whole_model, self.source = whole_model, source
        self._built: dict = {}  # (dtype, float64 adapter) -> PEFT model, whole_model only

    def _build(self, layers: Mapping[str, nn.Module], module: str):
        peft_config_class, get_peft_model, _ = _peft()
        try:
            peft_config = peft_config_class.from_peft_type(**self.config)
            return get_peft_model(_holder(layers), peft_config)
        except (ValueError, TypeError, KeyError, NotImplementedError, RuntimeError) as exc:
            raise UnsupportedAdapterError(f"{self.source}: PEFT cannot build {self.config.get('peft_type')} on "
                                          f"'{module}': {_first_line(exc)}.") from None

    def _load(self, model, tensors: Mapping[str, torch.Tensor], module: str) -> None:
        _, _, set_peft_model_state_dict = _peft()
        try:
            with torch.no_grad():
                loaded = set_peft_model_state_dict(model, dict(tensors))
        except RuntimeError as exc:
            raise BadInputError(f"{self.source}: the tensors of '{module}' do not fit PEFT's layer for this base: "
                                f"{str(exc).strip().splitlines()[-1].strip()}") from None
        unexpected = list(getattr(loaded, "unexpected_keys", []))
        if not self.whole_model:
            unexpected = [k for k in unexpected if k.removeprefix(MODEL_PREFIX).startswith(module + ".")]
        if unexpected:
            raise BadInputError(f"{self.source}: PEFT's layer has no place for '{unexpected[0]}'.")

    def _model_for(self, module: str, params: Mapping[str, torch.Tensor], dtype: torch.dtype, reference: bool):
        if not self.whole_model:
            layer = placeholder_layer(self.templates[module], dtype)
            _set_real(layer, params)
            model = self._build({module: layer}, module)
            self._load(model, self.load(module), module)
            if reference:
                _adapter_to_float64(model)
            return model
        key = (dtype, reference)
        if key not in self._built:
            self._built.clear()  # one build held at a time
            layers = {name: placeholder_layer(template, dtype) for name, template in self.templates.items()}
            _set_real(layers[module], params)  # the first module's initialisation sees its real tensors
            model = self._build(layers, module)
            self._load(model, self.load(None), module)
            if reference:
                _adapter_to_float64(model)
            self._built[key] = model
            return model  # the module's real tensors went in before the build
        model = self._built[key]
        layer = model.base_model.model.get_submodule(module)
        _set_real(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer, params)
        return model

    def merge(self, module: str, params: Mapping[str, torch.Tensor], *, reference: bool = False
              ) -> dict[str, torch.Tensor]:
        """The module's base parameters after PEFT's `merge()` of the adapter into them.

        Args:
            module: the module, by its name in the model.
            params: its real base tensors by parameter name (e.g. weight, bias), all in the dtype the merge runs in.
            reference: evaluate PEFT's program in float64 instead (compare's reference): PEFT builds the layer in
                the dtype of `params` (some tuners refuse float64 there), then the base and adapter tensors are
                cast to float64 and merged.

        Returns:
            The merged layer's own parameters by name, detached.

        Raises:
            UnsupportedAdapterError: PEFT is not installed, or cannot build this tuner on this layer.
            BadInputError: a stored tensor does not fit PEFT's layer (another base, or a damaged file).
        """
        if module not in self.templates:
            raise BadInputError(f"{self.source}: module '{module}' is not among the targeted layers.")
        dtypes = {p.dtype for p in params.values() if p.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        model = self._model_for(module, params, dtype, reference)
        layer = model.base_model.model.get_submodule(module)
        base_layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if reference:
            _set_real(base_layer, {name: value.to(torch.float64) for name, value in params.items()})
        try:
            with torch.no_grad():
                layer.merge()
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as exc:
            raise UnsupportedAdapterError(f"{self.source}: PEFT cannot merge {self.config.get('peft_type')} into "
                                          f"'{module}': {_first_line(exc)}.") from None
        base_layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer  # LN Tuning swaps it
        merged = {name: param.detach() for name, param in base_layer.named_parameters(recurse=False)
                  if name in params}
        if self.whole_model:  # swap the real tensors out again, and forget the merge
            for name in params:
                setattr(base_layer, name, nn.Parameter(_placeholder(merged[name], dtype), requires_grad=False))
            if hasattr(layer, "merged_adapters"):
                layer.merged_adapters = []
        return merged


def peft_merged_module(config: Mapping[str, object], layers: Mapping[str, nn.Module], module: str,
                       tensors: Mapping[str, torch.Tensor], *, source: str = "adapter") -> dict[str, torch.Tensor]:
    """The base parameters of one module after PEFT's `merge()`, with every targeted layer in PEFT's model.

    Args:
        config: the adapter_config.json dict (its peft_type picks PEFT's tuner).
        layers: every module the config targets, by its name in the model, as PyTorch layers of the base's types and
            shapes; the one named `module` must hold its real base tensors (in the dtype the merge runs in), the
            others only their shapes (their parameters are replaced by stride-0 placeholders).
        module: the module to merge.
        tensors: the adapter's tensors as saved (keys `base_model.model.<module>.…` and the shared ones).
        source: what messages call the adapter (its file).

    Returns:
        The merged layer's own parameters (e.g. weight, bias) by name, detached.

    Raises:
        UnsupportedAdapterError: PEFT is not installed, or cannot build this tuner on these layers.
        BadInputError: a stored tensor does not fit PEFT's layer (another base, or a damaged file).
    """
    if module not in layers:
        raise BadInputError(f"{source}: module '{module}' is not among the layers given.")
    own = {k: v for k, v in tensors.items()
           if not any(k.removeprefix(MODEL_PREFIX).startswith(other + ".") for other in layers if other != module)}
    merger = PeftMerger(config, layers, lambda _: own, whole_model=True, source=source)
    params = {name: p for name, p in layers[module].named_parameters(recurse=False)}
    return merger.merge(module, params)
