"""AdaLoRA (peft_type ADALORA): ΔW = B@(A ⊙ E)·α/(init_r + 1e-5), the SVD-shaped LoRA with pruned triplets
(docs/peft-format.md §4, PEFT's src/peft/tuners/adalora/layer.py)."""

import torch

from loratv.adapters.kind import PREFIX, ROUTED_KEY, AdapterKind, TunerModule, module_tensors, require, tensor_shape
from loratv.adapters.kinds.lora import LORA_FIELDS, REFUSED_FIELDS
from loratv.adapters.settings import check_refused_fields
from loratv.errors import LoratvError


class AdaloraKind(AdapterKind):
    """AdaLoRA: LoRA's fields plus its rank schedule; the stored rank is what the schedule kept."""

    peft_type = "ADALORA"
    display_name = "AdaLoRA"
    config_fields = LORA_FIELDS | {"target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                                   "orth_reg_weight", "total_step"}
    refused_fields = tuple(REFUSED_FIELDS)
    stored_tensor_roles = ("lora_A", "lora_B", "lora_E")
    rank_field = "init_r"
    alpha_field = "lora_alpha"
    update = "additive: ΔW = B@(A ⊙ E)·α/(init_r + 1e-5)"

    def check_config(self, config: dict, path) -> None:
        check_refused_fields(config, path, self.refused_fields)
        if config.get("use_dora") or config.get("lora_bias") or config.get("use_rslora"):
            raise LoratvError(f"{path}: AdaLoRA with use_dora, lora_bias or use_rslora is not a PEFT configuration.")

    def routed_on_base(self, adapter, base) -> str | None:
        """AdaLoRA on a convolution (PEFT's SVDConv2d: A flattened to (r, in·k·k)) is merged by PEFT's own code;
        only the base's shapes tell it from a Linear.

        Args:
            adapter: the adapter, its keys mapped.
            base: the base checkpoint.

        Returns:
            "ADALORA+PEFT" when a module's weight in the base has more than two dimensions, else None.
        """
        for module in adapter.modules.values():
            if module.target in base and len(base.entry(module.target).shape) > 2:
                return ROUTED_KEY.format("ADALORA")
        return None

    def build_module(self, adapter, module: str, keys: dict) -> TunerModule:
        require(adapter, module, keys, "lora_A", "lora_B", "lora_E")
        a, b, e = (tensor_shape(adapter, keys[k]) for k in ("lora_A", "lora_B", "lora_E"))
        r = a[0] if len(a) == 2 else None
        if len(a) != 2 or len(b) != 2 or b[1] != r or e != (r, 1):
            raise LoratvError(f"{adapter.tensors.path}: AdaLoRA module '{module}' has inconsistent shapes (lora_A "
                              f"{list(a)}, lora_B {list(b)}, lora_E {list(e)}).")
        init_r = adapter.settings.r
        mask = next((v for k, v in adapter.settings.rank_pattern.items()
                     if k.removeprefix(PREFIX).removesuffix(".lora_E") == module), None)
        if mask is not None and sum(bool(x) for x in mask) != r:
            raise LoratvError(f"{adapter.config_path}: rank_pattern keeps {sum(bool(x) for x in mask)} triplets of "
                              f"'{module}' but {adapter.tensors.path.name} stores {r}.")
        if r > init_r:
            raise LoratvError(f"{adapter.tensors.path}: AdaLoRA module '{module}' stores rank {r} above init_r = "
                              f"{init_r}.")
        alpha = adapter.settings.lora_alpha
        scaling = alpha if alpha > 0 else float(init_r)  # PEFT's AdaLoraLayer.update_layer
        return TunerModule(module, module + ".weight", "ADALORA", keys, r, alpha, scaling / (init_r + 1e-5),
                           {"scaling": scaling, "ranknum": float(init_r), "delta_shape": (b[0], a[1])})

    def fit_problem(self, adapter, module: TunerModule, shape: tuple) -> str | None:
        out_in = module.options["delta_shape"]
        if tuple(shape) != (out_in if module.kind == "linear" else out_in[::-1]):
            return f"does not fit lora_B @ lora_A {list(out_in)}"
        return None

    def additive_delta(self, adapter, module, shape, dtype, device, absolute=False, exact_scale=False):
        """ΔW as PEFT computes it (÷ a one-element float32 tensor; float64 with `exact_scale`)."""
        t = module_tensors(adapter, module, dtype, device, absolute)
        o = module.options
        delta = t["lora_B"] @ (t["lora_A"] * t["lora_E"])
        if module.kind != "linear":
            delta = delta.T
        scaling = abs(o["scaling"]) if absolute else o["scaling"]
        if exact_scale:
            return delta * scaling / (o["ranknum"] + 1e-5)
        # PEFT divides by ranknum + 1e-5 held in a one-element float32 tensor
        return delta * scaling / (torch.tensor([o["ranknum"]], device=device) + 1e-5)

    def depth(self, module, shape) -> int:
        return module.r + 5  # A⊙E, the dot, ×scaling (rounded), ÷(ranknum + 1e-5) (rounded)


KIND = AdaloraKind()
