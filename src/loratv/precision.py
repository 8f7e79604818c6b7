"""Dtype facts: the spacing of floats (ulp) and the bit-exact cast-artifact test."""

import torch


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (distance from |x| rounded to dtype to the next float away from zero), float64.

    Subnormal inputs get the subnormal spacing; zero gets the smallest subnormal.
    """
    mag = x.to(dtype).abs()
    up = torch.nextafter(mag, torch.full_like(mag, float("inf")))
    return (up.to(torch.float64) - mag.to(torch.float64))


def is_cast_artifact(finetuned: torch.Tensor, base: torch.Tensor) -> bool:
    """True when the fine-tuned tensor is the base cast to the fine-tuned dtype, bit for bit (and not equal to base)."""
    cast = base.to(finetuned.dtype)
    same_bits = torch.equal(cast.view(_int_view(cast.dtype)), finetuned.view(_int_view(finetuned.dtype)))
    return same_bits and not torch.equal(finetuned.to(base.dtype), base)


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
