"""Singular values and ranks of one changed matrix of a task vector (`loratv summarize --spectrum`).

The numerical rank counts singular values above a stated threshold: the rounding-noise floor of the fine-tuned
weights when the base is known (as `loratv analyze` for an untargeted tensor, docs/math.md §8), else numpy's
matrix_rank default tolerance with eps of the fine-tuned dtype. Every record says which rule it used and why.
"""

import torch

from loratv.numerics.spectrum import effective_rank, exact_spectrum, numerical_rank, randomized_spectrum, stable_rank

SINGULAR_VALUES = 16  # leading singular values kept in the record
EXACT_SVD_MAX_DIM = 1024  # full SVD up to this min(m, n): every singular value, so the rank is exact
RANDOMIZED_K = 64  # above it, this many leading singular values by randomized SVD
RANK_RULES = {
    "rounding-floor": "numerical rank = #{σ_i > φ}, φ = ‖b‖_F with b the per-element bound on rounding the "
                      "fine-tuned weight to its dtype (docs/math.md §6 with no delta: ½ ulp of F, plus the cast-first "
                      "term when F is narrower than the base) plus the task vector's own storage rounding u·|T|; by "
                      "Weyl's inequality no singular value of that rounding noise exceeds φ, so each σ above it is a "
                      "direction the rounding of F cannot explain (analyze's floor for an untargeted tensor)",
    "matrix_rank-default": "numerical rank = #{σ_i > σ_1·max(m, n)·eps}, numpy.linalg.matrix_rank's default "
                           "tolerance, with eps of the fine-tuned dtype (of the storage dtype when that is not "
                           "recorded): without the base the weights' own rounding floor is unknown, and eps of the "
                           "dtype F was rounded to is the scale of that rounding relative to T",
}


def matrix_spectrum(t: torch.Tensor, *, floor: float | None, eps_dtype: torch.dtype,
                    keep: int = SINGULAR_VALUES) -> dict:
    """Leading singular values and ranks of one matrix, with the threshold its numerical rank counts above.

    Args:
        t: the matrix (converted to float64).
        floor: the rounding-noise floor φ (`RANK_RULES["rounding-floor"]`); None to use numpy.linalg.matrix_rank's
            default tolerance σ₁·max(m, n)·eps instead.
        eps_dtype: the dtype whose machine epsilon that default tolerance uses (the fine-tuned dtype).
        keep: how many leading singular values to record.

    Returns:
        A spectrum record: `method` (exact or randomized), `singular_values`, `numerical_rank` (and whether it is
        only a lower bound), `rank_threshold`, `rank_rule`, `stable_rank`, `effective_rank` (and over what).
    """
    m, n = t.shape
    full = min(m, n)
    exact = full <= EXACT_SVD_MAX_DIM
    spec = exact_spectrum(t) if exact else randomized_spectrum(t, min(full, max(keep, RANDOMIZED_K)))
    s = spec.s
    sigma1 = float(s[0]) if s.numel() else 0.0
    if floor is not None:
        rule, threshold = "rounding-floor", floor
    else:
        rule, threshold = "matrix_rank-default", sigma1 * max(m, n) * torch.finfo(eps_dtype).eps
    rank = numerical_rank(s, threshold)
    return {
        "method": "exact" if exact else "randomized",
        "computed": int(s.numel()),
        "singular_values": [float(v) for v in s[:keep]],
        "residual_norm": spec.residual,  # ‖T‖_F not in the computed values (exact: the tail beyond them, here 0)
        "numerical_rank": rank,
        "numerical_rank_is_lower_bound": (not exact) and rank == s.numel() and s.numel() < full,
        "rank_threshold": threshold,
        "rank_rule": rule,
        "eps_dtype": None if floor is not None else str(eps_dtype).removeprefix("torch."),
        "stable_rank": stable_rank(s, spec.frobenius),
        "effective_rank": effective_rank(s),
        "effective_rank_of": "all singular values" if exact else "the computed singular values",
        "max_rank": full,
    }
