"""LoHa (peft_type LOHA): ΔW = s·(w1a@w1b) ⊙ (w2a@w2b), reshaped to the stored weight (docs/peft-format.md §4,
PEFT's src/peft/tuners/loha/layer.py)."""


import torch

from loratv.adapters.kind import ROUTED_KEY, AdapterKind, TunerModule, module_tensors, rank_and_scale, require, tensor_shape
from loratv.adapters.kinds.lycoris import LYCORIS_FIELDS, reshape_problem
from loratv.errors import LoratvError


class LohaKind(AdapterKind):
    """LoHa: the Hadamard product of two low-rank products, times alpha / r."""

    peft_type = "LOHA"
    display_name = "LoHa"
    config_fields = LYCORIS_FIELDS
    stored_tensor_roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    supports_conv = True
    fixed_orientation = True
    update = "additive: ΔW = s·(w1a@w1b) ⊙ (w2a@w2b)"

    def routed(self, adapter) -> str | None:
        """Effective-conv (Tucker) factors are merged by PEFT's own code (kinds/peft_backed.py).

        Args:
            adapter: the adapter, before its keys are mapped.

        Returns:
            "LOHA+PEFT" when the file holds a Tucker factor, else None.
        """
        tucker = ("hada_t1", "hada_t2")
        if any(k.rsplit(".", 1)[-1] in tucker for k in adapter.tensors.names()):
            return ROUTED_KEY.format("LOHA")
        return None

    def build_module(self, adapter, module: str, keys: dict) -> TunerModule:
        if "hada_t1" in keys or "hada_t2" in keys:
            raise LoratvError(f"{adapter.tensors.path}: LoHa module '{module}' uses effective-conv (Tucker) factors "
                              "hada_t1/hada_t2, which loratv does not merge.")
        require(adapter, module, keys, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        w1a, w1b = tensor_shape(adapter, keys["hada_w1_a"]), tensor_shape(adapter, keys["hada_w1_b"])
        w2a, w2b = tensor_shape(adapter, keys["hada_w2_a"]), tensor_shape(adapter, keys["hada_w2_b"])
        if not (len(w1a) == len(w1b) == len(w2a) == len(w2b) == 2 and w1a[1] == w1b[0] and w2a[1] == w2b[0]
                and (w1a[0], w1b[1]) == (w2a[0], w2b[1])):
            raise LoratvError(f"{adapter.tensors.path}: LoHa module '{module}' has factors that do not chain "
                              f"(w1 {list(w1a)}@{list(w1b)}, w2 {list(w2a)}@{list(w2b)}).")
        r, alpha, scale = rank_and_scale(adapter, module, w1a[1])
        return TunerModule(module, module + ".weight", "LOHA", keys, r, alpha, scale,
                           {"delta_shape": (w1a[0], w1b[1])})

    def fit_problem(self, adapter, module: TunerModule, shape: tuple) -> str | None:
        return reshape_problem(module, shape)

    def additive_delta(self, adapter, module, shape, dtype, device, absolute=False, exact_scale=False):
        """ΔW as PEFT computes it (the scale a float32 tensor; float64 with `exact_scale`)."""
        t = module_tensors(adapter, module, dtype, device, absolute)
        scale = torch.tensor(module.scale, dtype=torch.float64 if exact_scale else torch.float32)
        scale = scale.abs() if absolute else scale
        delta = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])) * scale
        return delta.reshape(shape)

    def depth(self, module, shape) -> int:
        return 2 * module.r + 3  # two length-r dot products, their product, the scale and its rounding


KIND = LohaKind()
