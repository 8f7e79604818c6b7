"""LoRA on ConvNd weights (PEFT's lora.Conv1d/Conv2d/Conv3d, `_ConvNd`): A is a conv with the base kernel
(r, in, *k), B a 1×…×1 conv (out, r, 1, …), and ΔW is `conv_delta`."""

import torch
import torch.nn.functional as F

from loratv.adapters.kinds.lora_variants.base import LoraVariant


def conv_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """PEFT's _ConvNd.get_delta_weight, whole: a matmul for 1×…×1 kernels, else the conv of Aᵀ with B (the same sums
    Σ_r B[o,r]·A[r,i,…], in the order torch's conv adds them).

    Args:
        a: lora_A (r, in, *k).
        b: lora_B (out, r, 1, …).
        scale: the LoRA scale s.

    Returns:
        ΔW (out, in, *k).
    """

    if all(k == 1 for k in a.shape[2:]):
        product = b.flatten(1) @ a.flatten(1)
        return product.view(b.shape[0], *a.shape[1:]) * scale
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[a.dim()]
    return conv(a.transpose(0, 1), b).transpose(0, 1) * scale


class ConvVariant(LoraVariant):
    """ConvNd: chosen for a module whose lora_A has a kernel (more than 2-D); its ΔW is `conv_delta`."""

    name = "conv"
    display_name = "ConvNd"

    def applies(self, adapter, module) -> bool:
        """A module whose lora_A is more than 2-D (map_keys checked that B is 1×…×1).

        Args:
            adapter: the adapter.
            module: the LoraModule.

        Returns:
            Whether the module is a ConvNd LoRA.
        """
        return len(adapter.tensors.entry(module.a_key).shape) > 2

    def product(self, module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The whole ΔW, `conv_delta(a, b, module.scale)`.

        Args:
            module: the bound LoraModule.
            a: lora_A (r, in, *k) in the compute dtype.
            b: lora_B (out, r, 1, …) in the compute dtype.

        Returns:
            ΔW (out, in, *k).
        """
        return conv_delta(a, b, module.scale)


CONV = ConvVariant()
