"""lora_bias: PEFT's lora_B carries a bias, and the merge adds s·lora_B.bias to the module's bias."""

import torch

from loratv.adapters.kinds.lora_variants.base import LoraVariant, check_shape
from loratv.adapters.structures import Adapter, LoraModule
from loratv.errors import LoratvError


def bias_delta(adapter: Adapter, module: LoraModule, dtype, device) -> torch.Tensor:
    """s·lora_B.bias, the lora_bias variant's addition to `<module>.bias`.

    Args:
        adapter: the adapter.
        module: a LoraModule with a bias key.
        dtype: the compute dtype.
        device: the compute device.

    Returns:
        The scaled bias.

    Raises:
        LoratvError: the bias holds NaN or Inf.
    """
    if module.bias_key is None:
        raise LoratvError(f"{adapter.tensors.path}: module '{module.module}' stores no lora_B.bias.")
    return adapter.factor(module.bias_key).to(device=device, dtype=dtype) * module.scale


class LoraBiasVariant(LoraVariant):
    """lora_bias: the module stores lora_B.bias (`bias_key`), added times the scale to `<module>.bias`."""

    name = "lora_bias"
    display_name = "lora_bias"
    config_field = "lora_bias"

    def applies(self, adapter, module) -> bool:
        """A module that stores lora_B.bias.

        Args:
            adapter: the adapter.
            module: the LoraModule.

        Returns:
            Whether the module has a bias key.
        """
        return bool(module.bias_key)

    def check_bound(self, adapter, module, base, target: str) -> None:
        """The base stores `<module>.bias`, of lora_B.bias's shape.

        Raises:
            LoratvError: the base has no such bias, or its shape differs.
        """
        bias = module.module + ".bias"
        if bias not in base:
            raise LoratvError(
                f"{adapter.tensors.path}: lora_bias on '{module.module}' but the base has no '{bias}' to add it to."
            )
        check_shape(adapter, module.bias_key, base.entry(bias).shape, bias)


LORA_BIAS = LoraBiasVariant()
