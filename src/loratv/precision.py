"""Dtype facts: the spacing of floats (ulp), unit roundoffs, the merge rounding bound, and the bit-exact cast test.

The bound is derived in docs/math.md §6; every function here works elementwise on float64 tensors.
"""

import math

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# significand bits (with the implicit one) and the smallest normal exponent of each float dtype
FORMATS = {torch.float64: (53, -1022), torch.float32: (24, -126), torch.float16: (11, -14), torch.bfloat16: (8, -126)}


EXPONENT_BITS = 0x7FF0000000000000  # of a float64


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` in the binade of |x| (for x representable in dtype: the distance from |x| to the next float
    away from zero, np.spacing), float64. Zero and subnormals get the subnormal spacing.

    For an x that dtype cannot represent this is the spacing of x's own binade, which bounds the error of rounding
    any value of magnitude ≤ |x| to dtype by half of it. Computed from the float64 exponent bits (2^⌊log2|x|⌋ is x with
    its sign and significand masked off): three passes, ~20× faster than nextafter.
    """
    bits, emin = FORMATS[dtype]
    power = (x.to(torch.float64).contiguous().view(torch.int64) & EXPONENT_BITS).view(torch.float64)
    return power.mul_(2.0 ** (1 - bits)).clamp_(min=2.0 ** (emin + 1 - bits))


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
    ulp_m: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per element, the largest |M − (W + ΔW)| any standard merge path can leave (docs/math.md §6), float64.

    w: the base value the delta is added to; m: the merged value as stored (exact in out_dtype); g: Σ |s|·(|L|@|R|)
    over the LoRA modules (plus |s·bias|), the scale of the delta's evaluation error; `additions` deltas are added
    one after another; k: the longest dot product plus the multiply by s plus one (the largest r + 2); ulp_m:
    ulp(m, out_dtype) if the caller has it.
    Paths: "direct" (delta and sum in the compute dtype c, one cast to the output dtype d, as loratv and PEFT on an
    fp32 model do) and, when d is narrower than c, "cast first" (base cast to d, delta rounded to d, sum in d, as
    PEFT does on a model loaded in d). The bound is the larger of the two.
    """
    c = compute_dtype_for(base_dtype, out_dtype)
    d = out_dtype
    if ulp_m is None:
        ulp_m = ulp(m, d)
    sum_roundings = additions - (1 if c == d else 0)
    cast_first_path = unit_roundoff(d) > unit_roundoff(c) and not math.isinf(gamma(k + 2, d))
    upper = None
    if sum_roundings > 0 or (cast_first_path and additions > 1):
        # ≥ |every partial sum|
        upper = torch.maximum(m.abs().add_(ulp_m), w.abs().mul_(1 + 2 * unit_roundoff(d)).add_(g, alpha=2))
    direct = torch.add(ulp_m, g, alpha=gamma(k, c) / 0.5).mul_(0.5)
    if sum_roundings > 0:
        direct.add_(ulp(upper, c), alpha=0.5 * sum_roundings)
    if not cast_first_path:
        return direct  # no cast-first path, or a rank so large its worst case bounds nothing
    cast_first = torch.add(ulp_m, g, alpha=gamma(k + 2, d) / 0.5).mul_(0.5)
    if base_dtype != d:
        cast_first.add_(ulp(w, d), alpha=0.5)
    if additions > 1:
        cast_first.add_(ulp(upper, d), alpha=0.5 * (additions - 1))
    return torch.maximum(direct, cast_first)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same bits (as integers: faster than a float compare, and NaN/−0 compare by their bits)."""
    return a.dtype == b.dtype and torch.equal(a.view(_int_view(a.dtype)), b.view(_int_view(b.dtype)))


def equals_cast(finetuned: torch.Tensor, base: torch.Tensor) -> bool:
    """True when the fine-tuned tensor is the base cast to the fine-tuned dtype, bit for bit."""
    return bits_equal(base.to(finetuned.dtype), finetuned)


def is_cast_artifact(finetuned: torch.Tensor, base: torch.Tensor) -> bool:
    """True when the fine-tuned tensor is the base cast to the fine-tuned dtype, bit for bit (and not equal to base)."""
    return equals_cast(finetuned, base) and not torch.equal(finetuned.to(base.dtype), base)


def cast_difference(base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cast_dtype(base) − base, exactly, in float64: the task vector a pure cast leaves."""
    return base.to(dtype).to(torch.float64) - base.to(torch.float64)


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
