"""Dtype facts: the spacing of floats (ulp), unit roundoffs, the merge rounding bound, and the bit-exact cast test.

The bound is derived in docs/math.md §6; every function here works elementwise on float64 tensors.
"""

import math

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (distance from |x| rounded to dtype to the next float away from zero), float64.

    Subnormal inputs get the subnormal spacing; zero gets the smallest subnormal. Values beyond the dtype's range
    get the spacing at its largest finite value.
    """
    finfo = torch.finfo(dtype)
    mag = x.to(torch.float64).abs().clamp_(max=finfo.max).to(dtype)
    up = torch.nextafter(mag, torch.full_like(mag, float("inf")))
    spacing = up.to(torch.float64) - mag.to(torch.float64)
    top = mag == finfo.max  # nextafter(max) is inf: use the spacing just below it
    if bool(top.any()):
        spacing[top] = finfo.max - torch.nextafter(torch.tensor(finfo.max, dtype=dtype), torch.tensor(0.0, dtype=dtype)).item()
    return spacing


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: the largest relative error of one rounding to nearest."""
    return torch.finfo(dtype).eps / 2


def gamma(k: int, dtype: torch.dtype) -> float:
    """γ_k = k·u / (1 − k·u): bounds the relative error of k successive roundings (Higham, Lemma 3.1)."""
    ku = k * unit_roundoff(dtype)
    if ku >= 1:
        return float("inf")
    return ku / (1 - ku)


def compute_dtype_for(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype loratv computes a merge in: float64 when an input or the output is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def merge_error_bound(
    w: torch.Tensor,
    m: torch.Tensor,
    g: torch.Tensor,
    *,
    additions: int,
    k: int,
    base_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Per element, the largest |M − (W + ΔW)| any standard merge path can leave (docs/math.md §6), float64.

    w: the base value the delta is added to; m: the merged value as stored (exact in out_dtype); g: Σ |s|·(|L|@|R|)
    over the LoRA modules (plus |s·bias|), the scale of the delta's evaluation error; `additions` deltas are added
    one after another; k: the longest dot product plus the multiply by s plus one (the largest r + 2).
    Paths: "direct" (delta and sum in the compute dtype c, one cast to the output dtype d, as loratv and PEFT on an
    fp32 model do) and, when d is narrower than c, "cast first" (base cast to d, delta rounded to d, sum in d, as
    PEFT does on a model loaded in d). The bound is the larger of the two.
    """
    c = compute_dtype_for(base_dtype, out_dtype)
    d = out_dtype
    upper = torch.maximum(m.abs() + ulp(m, d), w.abs() * (1 + 2 * unit_roundoff(d)) + 2 * g)  # ≥ every partial sum
    half_ulp_m = ulp(m, d).mul_(0.5)
    sum_roundings = additions - (1 if c == d else 0)
    direct = half_ulp_m + gamma(k, c) * g
    if sum_roundings > 0:
        direct += sum_roundings * 0.5 * ulp(upper, c)
    if unit_roundoff(d) <= unit_roundoff(c) or math.isinf(gamma(k + 2, d)):
        return direct  # no cast-first path, or a rank so large its worst case bounds nothing
    cast_first = half_ulp_m + gamma(k + 2, d) * g
    if base_dtype != d:
        cast_first += 0.5 * ulp(w, d)
    if additions > 1:
        cast_first += (additions - 1) * 0.5 * ulp(upper, d)
    return torch.maximum(direct, cast_first)


def equals_cast(finetuned: torch.Tensor, base: torch.Tensor) -> bool:
    """True when the fine-tuned tensor is the base cast to the fine-tuned dtype, bit for bit."""
    cast = base.to(finetuned.dtype)
    return torch.equal(cast.view(_int_view(cast.dtype)), finetuned.view(_int_view(finetuned.dtype)))


def is_cast_artifact(finetuned: torch.Tensor, base: torch.Tensor) -> bool:
    """True when the fine-tuned tensor is the base cast to the fine-tuned dtype, bit for bit (and not equal to base)."""
    return equals_cast(finetuned, base) and not torch.equal(finetuned.to(base.dtype), base)


def cast_difference(base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cast_dtype(base) − base, exactly, in float64: the task vector a pure cast leaves."""
    return base.to(dtype).to(torch.float64) - base.to(torch.float64)


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
