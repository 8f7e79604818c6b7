"""IA³ (peft_type IA3): W' = W ⊙ l, and b' = b ⊙ l outside feedforward modules (docs/peft-format.md §4, PEFT's
src/peft/tuners/ia3/layer.py)."""

import re

import torch

from loratv.adapters.kind import AdapterKind, TunerModule, tensor_shape
from loratv.errors import LoratvError


def _matches(spec, module: str) -> bool:
    """PEFT's target matching for feedforward_modules: a regex string is full-matched, a list matched by suffix."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == k or module.endswith("." + k) for k in spec)


def ia3_vector(adapter, module: TunerModule, dtype, device, absolute: bool = False) -> torch.Tensor:
    """l shaped to broadcast against the stored weight (or bias) as PEFT's IA3Layer.merge does.

    Args:
        adapter: the adapter.
        module: an IA³ module (or its bias module).
        dtype: the dtype.
        device: the device.
        absolute: take |l|.

    Returns:
        The vector, shaped to broadcast.
    """
    l_vec = adapter.factor(module.keys["ia3_l"]).to(device=device, dtype=dtype)
    l_vec = l_vec.abs() if absolute else l_vec
    if module.is_bias:
        return l_vec.reshape(-1)
    if module.kind == "conv":  # _get_ia3_scaling_for_weight: (1, out, 1, …) → (out, 1, 1, …); feedforward as stored
        return l_vec if module.options["feedforward"] else l_vec.transpose(0, 1)
    return l_vec.T if module.kind != "linear" else l_vec


class Ia3Kind(AdapterKind):
    """IA³: a learned vector scales the weight's inputs (feedforward) or outputs (and then the bias too)."""

    peft_type = "IA3"
    display_name = "IA³"
    config_fields = frozenset({"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out",
                               "modules_to_save", "init_ia3_weights"})
    stored_tensor_roles = ("ia3_l",)
    multiplicative = True
    supports_conv = True
    update = "multiplicative: W' = W ⊙ l (and b' = b ⊙ l outside feedforward modules)"

    def build_module(self, adapter, module: str, keys: dict) -> TunerModule:
        shape = tensor_shape(adapter, keys["ia3_l"])
        feedforward = _matches(adapter.settings.raw.get("feedforward_modules"), module)
        # Linear/Conv1D: (1, in) feedforward, (out, 1) otherwise; ConvNd: (1, in or out, 1, …); check_fits: sizes
        linear_ok = len(shape) == 2 and (shape[0] == 1 if feedforward else shape[1] == 1)
        conv_ok = len(shape) > 2 and shape[0] == 1 and all(k == 1 for k in shape[2:])
        if not (linear_ok or conv_ok):
            raise LoratvError(f"{adapter.tensors.path}: IA³ vector of '{module}' has shape {list(shape)}; a "
                              f"{'feedforward' if feedforward else 'non-feedforward'} module stores "
                              f"{'(1, in)' if feedforward else '(out, 1)'} (a convolution (1, channels, 1, …)).")
        return TunerModule(module, module + ".weight", "IA3", keys, None, None, 1.0, {"feedforward": feedforward})

    def fit_problem(self, adapter, module: TunerModule, shape: tuple) -> str | None:
        if len(shape) > 2:  # PEFT's Conv IA³: (1, out, 1, …), or (1, in, 1, …) for feedforward (groups = 1 only)
            ones = [1] * (len(shape) - 2)
            want = (1, shape[1], *ones) if module.options["feedforward"] else (1, shape[0], *ones)
        else:
            out, inp = shape if module.kind == "linear" else shape[::-1]
            want = (1, inp) if module.options["feedforward"] else (out, 1)
        if tensor_shape(adapter, module.keys["ia3_l"]) != want:
            return f"needs an IA³ vector of shape {list(want)}"
        return None

    def bias_module(self, module: TunerModule) -> TunerModule | None:
        """IA³ scales a non-feedforward module's bias by the same vector (PEFT's IA3Layer.merge)."""
        if module.options["feedforward"]:
            return None
        return ia3_bias_module(module)

    def merged_value(self, adapter, module, w):
        return torch.mul(w, ia3_vector(adapter, module, w.dtype, w.device))

    def apply_rows(self, adapter, module, x, start, stop, absolute=False, cache=None):
        """x ⊙ l for rows [start, stop) (one factor per stored row where l runs along the rows)."""
        cache = {} if cache is None else cache
        key = ("abs" if absolute else "value", module.peft_type)
        if key not in cache:
            cache[key] = ia3_vector(adapter, module, torch.float64, x.device, absolute)
        l_vec = cache[key]
        if module.is_bias or (module.kind in ("linear", "conv") and not module.options["feedforward"]) or (
                module.kind == "conv1d" and module.options["feedforward"]):
            l_vec = l_vec[start:stop]  # one factor per stored row
        return x * l_vec

    def depth(self, module, shape) -> int:
        return 1


def ia3_bias_module(module: TunerModule) -> TunerModule:
    """The bias module of an IA³ module: the same vector applied to `<module>.bias`.

    Args:
        module: a bound IA³ weight module.

    Returns:
        The bias module.
    """
    return TunerModule(module.module, module.module + ".bias", "IA3", module.keys, None, None, 1.0,
                       {**module.options, "bias": True}, module.kind, multiplicative=True)


KIND = Ia3Kind()
