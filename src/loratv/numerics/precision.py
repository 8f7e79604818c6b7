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

    Args:
        x: values of any float dtype and shape (read as float64).
        dtype: one of FLOAT_DTYPES, whose spacing is wanted.

    Returns:
        The spacing per element, float64, shaped like x (positive; never below dtype's subnormal spacing).
    """
    bits, emin = FORMATS[dtype]
    power = (x.to(torch.float64).contiguous().view(torch.int64) & EXPONENT_BITS).view(torch.float64)
    return power.mul_(2.0 ** (1 - bits)).clamp_(min=2.0 ** (emin + 1 - bits))


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand: the largest relative error of one rounding to nearest.

    Args:
        dtype: a float dtype.

    Returns:
        u, half of torch.finfo(dtype).eps.
    """
    return torch.finfo(dtype).eps / 2


def gamma(k: int, dtype: torch.dtype) -> float:
    """γ_k = k·u / (1 − k·u): bounds the relative error of k successive roundings (Higham, Lemma 3.1).

    Args:
        k: the number of roundings.
        dtype: the float dtype they round to (u = unit_roundoff(dtype)).

    Returns:
        γ_k, or inf when k·u ≥ 1 (the bound says nothing).
    """
    ku = k * unit_roundoff(dtype)
    if ku >= 1:
        return float("inf")
    return ku / (1 - ku)


def compute_dtype_for(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype loratv computes a merge in: float64 when an input or the output is float64, else float32.

    Args:
        *dtypes: the dtypes of the inputs and the output.

    Returns:
        torch.float64 or torch.float32.
    """
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

    Paths, with c the compute dtype and d the output dtype: "direct" (ΔW and the sum in c, one cast to d: loratv, and
    PEFT on an fp32 model); and, when d is narrower than c, PEFT's merge_and_unload on a model loaded in d with
    the base rounded to d first, either "autocast" (PEFT's default autocast_adapter_dtype=True: ΔW in fp32, each
    `W_d += ΔW` summed in fp32 and rounded to d, ΔW rounded to d first for an Embedding or ParamWrapper) or
    "cast all" (autocast_adapter_dtype=False: factors rounded to d, ΔW rounded to d, the sum rounded in d). The bound
    is the largest of them, so it certifies a merge made by any.

    Args:
        w: the base value the deltas are added to (float64).
        m: the merged value as stored (exact in out_dtype, float64).
        g: Σ |s|·(|L|@|R|) over the LoRA modules (plus |s·bias|): the scale of ΔW's evaluation error.
        additions: how many deltas are added one after another (0: a plain cast).
        k: the longest dot product plus the multiply by s plus one (the largest r + 2).
        base_dtype: the base tensor's dtype b.
        out_dtype: the merged tensor's dtype d.
        ulp_m: ulp(m, out_dtype), if the caller has it.

    Returns:
        The bound per element, float64, shaped like m.
    """
    c = compute_dtype_for(base_dtype, out_dtype)
    d = out_dtype
    f32 = torch.float32
    if ulp_m is None:
        ulp_m = ulp(m, d)
    sum_roundings = additions - (1 if c == d else 0)
    narrow = unit_roundoff(d) > unit_roundoff(c)  # loading the model in d first makes a different merge
    cast_all_path = narrow and not math.isinf(gamma(k + 2, d))
    upper: torch.Tensor | None = None  # set whenever a branch below rounds a partial sum
    if sum_roundings > 0 or (narrow and additions > 0):
        # ≥ |every partial sum|
        upper = torch.maximum(m.abs().add_(ulp_m), w.abs().mul_(1 + 2 * unit_roundoff(d)).add_(g, alpha=2))
    direct = torch.add(ulp_m, g, alpha=gamma(k, c) / 0.5).mul_(0.5)
    if sum_roundings > 0:
        assert upper is not None
        direct.add_(ulp(upper, c), alpha=0.5 * sum_roundings)
    if not narrow:
        return direct
    cast_w = ulp(w, d).mul_(0.5) if base_dtype != d else torch.zeros_like(ulp_m)
    # autocast: [b≠d]·½ulp_d(W') + ½ulp_d(M) + (n−1)·½ulp_d(U) + n·½ulp_32(U) + γ_k(u_32)·G + n·½ulp_d((1+γ_k)·G)
    g32 = gamma(k, f32)
    autocast = torch.add(ulp_m, g, alpha=g32 / 0.5).mul_(0.5).add_(cast_w)
    if additions > 0:
        assert upper is not None  # narrow and additions > 0
        autocast.add_(ulp(upper, f32), alpha=0.5 * additions)
        # the rounding of ΔW to d that Embedding and ParamWrapper do; taken for every addition (≤ u_d·G each)
        autocast.add_(ulp(g * (1 + g32), d), alpha=0.5 * additions)
    if additions > 1:
        assert upper is not None
        autocast.add_(ulp(upper, d), alpha=0.5 * (additions - 1))
    bound = torch.maximum(direct, autocast)
    if not cast_all_path:
        return bound  # a rank so large the cast-all worst case bounds nothing: that path cannot certify
    cast_all = torch.add(ulp_m, g, alpha=gamma(k + 2, d) / 0.5).mul_(0.5).add_(cast_w)
    if additions > 1:
        assert upper is not None
        cast_all.add_(ulp(upper, d), alpha=0.5 * (additions - 1))
    return torch.maximum(bound, cast_all)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same bits (as integers: faster than a float compare, and NaN/−0 compare by their bits).

    Args:
        a: a tensor.
        b: another tensor, same device.

    Returns:
        True when the dtypes, shapes and every bit agree.
    """
    return a.dtype == b.dtype and torch.equal(a.view(_int_view(a.dtype)), b.view(_int_view(b.dtype)))


def equals_cast(finetuned: torch.Tensor, base: torch.Tensor) -> bool:
    """True when the fine-tuned tensor is the base cast to the fine-tuned dtype, bit for bit.

    Args:
        finetuned: the fine-tuned tensor.
        base: the base tensor, same shape, any float dtype.

    Returns:
        Whether base.to(finetuned.dtype) has exactly finetuned's bits (True also when the two are identical).
    """
    return bits_equal(base.to(finetuned.dtype), finetuned)


def is_cast_artifact(finetuned: torch.Tensor, base: torch.Tensor) -> bool:
    """True when the fine-tuned tensor is the base cast to the fine-tuned dtype, bit for bit (and not equal to base).

    Args:
        finetuned: the fine-tuned tensor.
        base: the base tensor, same shape.

    Returns:
        Whether the only change is the cast: equals_cast holds and casting back to base's dtype does not give base.
    """
    return equals_cast(finetuned, base) and not torch.equal(finetuned.to(base.dtype), base)


def cast_difference(base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cast_dtype(base) − base, exactly, in float64: the task vector a pure cast leaves.

    Args:
        base: the base tensor, any float dtype.
        dtype: the dtype it is cast to.

    Returns:
        A float64 tensor shaped like base.
    """
    return base.to(dtype).to(torch.float64) - base.to(torch.float64)


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.empty((), dtype=dtype).element_size()]
