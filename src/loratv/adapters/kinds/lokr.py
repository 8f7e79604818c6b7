"""LoKr (peft_type LOKR): ΔW = s·kron(w1, w2), each factor stored whole or as a low-rank product
(docs/peft-format.md §4, PEFT's src/peft/tuners/lokr/layer.py)."""

import math

import torch

from loratv.adapters.kind import ROUTED_KEY, AdapterKind, TunerModule, module_tensors, rank_and_scale, tensor_shape
from loratv.adapters.kinds.lycoris import LYCORIS_FIELDS, reshape_problem
from loratv.errors import LoratvError


class LokrKind(AdapterKind):
    """LoKr: a Kronecker product of two factors, times alpha / r."""

    peft_type = "LOKR"
    display_name = "LoKr"
    config_fields = LYCORIS_FIELDS | {"decompose_both", "decompose_factor", "rank_dropout_scale"}
    stored_tensor_roles = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    supports_conv = True
    fixed_orientation = True
    update = "additive: ΔW = s·kron(w1, w2)"

    def routed(self, adapter) -> str | None:
        """Effective-conv (Tucker) factors are merged by PEFT's own code (kinds/peft_backed.py).

        Args:
            adapter: the adapter, before its keys are mapped.

        Returns:
            "LOKR+PEFT" when the file holds a Tucker factor, else None.
        """
        tucker = ("lokr_t2",)
        if any(k.rsplit(".", 1)[-1] in tucker for k in adapter.tensors.names()):
            return ROUTED_KEY.format("LOKR")
        return None

    def build_module(self, adapter, module: str, keys: dict) -> TunerModule:
        if "lokr_t2" in keys:
            raise LoratvError(f"{adapter.tensors.path}: LoKr module '{module}' uses effective-conv (Tucker) factor "
                              "lokr_t2, which loratv does not merge.")
        sides = {}
        found_rank = None
        for side in ("w1", "w2"):
            full, a, b = f"lokr_{side}", f"lokr_{side}_a", f"lokr_{side}_b"
            if full in keys:
                sides[side] = tensor_shape(adapter, keys[full])
            elif a in keys and b in keys:
                sa, sb = tensor_shape(adapter, keys[a]), tensor_shape(adapter, keys[b])
                if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0]:
                    raise LoratvError(f"{adapter.tensors.path}: LoKr module '{module}': {a} {list(sa)} and {b} "
                                      f"{list(sb)} do not chain.")
                sides[side] = (sa[0], sb[1])
                found_rank = sa[1]
            else:
                raise LoratvError(f"{adapter.tensors.path}: LoKr module '{module}' has neither {full} nor {a}/{b}.")
            if len(sides[side]) not in ((2,) if side == "w1" else (2, 3, 4)):
                raise LoratvError(f"{adapter.tensors.path}: LoKr module '{module}' has a {len(sides[side])}-D {side}.")
        r, alpha, scale = rank_and_scale(adapter, module, found_rank)
        # kron(w1, w2) holds every product of their elements; PEFT reshapes it to the base weight
        elements = math.prod(sides["w1"]) * math.prod(sides["w2"])
        return TunerModule(module, module + ".weight", "LOKR", keys, r, alpha, scale, {"delta_shape": (elements,)})

    def fit_problem(self, adapter, module: TunerModule, shape: tuple) -> str | None:
        return reshape_problem(module, shape)

    def additive_delta(self, adapter, module, shape, dtype, device, absolute=False, exact_scale=False):
        """ΔW as PEFT's make_kron computes it (the scale a Python float)."""
        t = module_tensors(adapter, module, dtype, device, absolute)
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:  # PEFT's make_kron
            w1 = w1.unsqueeze(2).unsqueeze(2)
        delta = torch.kron(w1, w2.contiguous()) * (abs(module.scale) if absolute else module.scale)
        return delta.reshape(shape)

    def depth(self, module, shape) -> int:
        # each Kronecker factor stored whole (exact) or as a length-r product; kron, scale, its rounding
        products = sum(f"lokr_{side}" not in module.keys for side in ("w1", "w2"))
        return products * module.r + 3


KIND = LokrKind()
