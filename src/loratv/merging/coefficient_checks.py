"""Certified checks of the merges whose coefficients come from reductions over a whole tensor (or row): slerp,
nuslerp and model_stock.

Each of them is, element by element, a fixed linear form of its inputs — slerp c_a·a + c_b·b, nuslerp
base + c₀·v₀ + c₁·v₁, model_stock t·mean(xᵢ) + (1 − t)·base — whose coefficients are functions of a few sums over
the tensor (norms, dot products, cosines). The proof has two parts (docs/merging.md, "Proof of a merge"):

1. The coefficients an evaluation of the recipe in the arithmetic dtype can produce lie in an interval: each sum of n
   terms within γ_{n+c}(u) of its exact value whatever its order of summation (Higham, §3.1), arc-cosine and sine
   within ELEMENTARY_ULPS ulp, and every other operation one rounding; the interval is pushed through the
   coefficient's formula, which is monotone on it.
2. The merged tensor's own coefficients are found by least squares (per coefficient group: the tensor, or a row),
   rounded to the arithmetic dtype where the recipe computes them there, and clamped into that interval; every
   element must then be within the rounding bound of the linear form with those coefficients.

Passing exhibits admissible coefficients and the elementwise bound holds for them: `certified`. Where no finite
interval follows (a sum so long that n·u ≥ 1, a norm at a clamp threshold, a pole of model_stock's formula, a t
outside [0, 1]) the check returns None and the caller holds the tensor to the measured tolerance. Each group also
admits the other branch of the method (linear interpolation, the base) when the interval reaches its threshold.
"""

import math
from collections.abc import Callable

import torch

from loratv.merging.methods import NUSLERP_EPS, NUSLERP_NORM_EPS, SLERP_DOT_THRESHOLD, SLERP_EPS
from loratv.numerics.precision import gamma, ulp, unit_roundoff

ELEMENTARY_ULPS = 2  # assumed accuracy of acos and sin in the arithmetic dtype (CUDA's documented maximum for acosf,
# sinf; glibc's and SLEEF's are within 1)
MODEL_STOCK_POLE = 1e-6  # mergekit's |1 + (k − 1)·cos| threshold


class Interval:
    """A closed interval per coefficient group (float64 tensors `lo` ≤ `hi`)."""

    def __init__(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo, self.hi = lo, hi

    def finite(self) -> bool:
        """Whether every group's interval is finite.

        Returns:
            True when no end is infinite or NaN.
        """
        return bool(torch.isfinite(self.lo).all() and torch.isfinite(self.hi).all())

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """x moved into the interval.

        Args:
            x: one value per group.

        Returns:
            min(max(x, lo), hi).
        """
        return torch.minimum(torch.maximum(x, self.lo), self.hi)

    def width(self) -> float:
        """The largest half-width relative to the larger endpoint's magnitude.

        Returns:
            The largest over the groups (0 for points, or no groups).
        """
        scale = torch.maximum(self.lo.abs(), self.hi.abs()).clamp(min=torch.finfo(torch.float64).tiny)
        return float(((self.hi - self.lo) / 2 / scale).max()) if self.lo.numel() else 0.0


def _sum_error(n: int, dtype: torch.dtype, extra: int) -> float:
    """γ for a sum of n terms that each carry `extra` roundings, in any order."""
    return gamma(max(n, 1) + extra, dtype)


def normalized_dot(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, eps: float, floor: float,
                   eps_of_product: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The interval of Σ xᵢyᵢ / (‖x‖·‖y‖) per row as an evaluation in `dtype` can give it, with a norm at or below
    `eps` (each norm, or their product with eps_of_product) replaced by `floor`, as mergekit does.

    Args:
        x: float64 rows (groups, n): the exact values the recipe reduces.
        y: float64 rows, like x.
        dtype: the arithmetic dtype.
        eps: the threshold.
        floor: what a norm (product) at or below eps is replaced by (slerp: 1; nuslerp, model_stock: eps).
        eps_of_product: the clamp applies to the product of the norms (model_stock) rather than to each (slerp,
            nuslerp).

    Returns:
        (lo, hi) per row, clamped to [−1, 1], or None where a norm is within its own error of the clamp.
    """
    n = x.shape[-1]
    g = _sum_error(n, dtype, 2)  # each norm: n squares summed, a square root (and chunk norms combined: ≤ 2 more)
    if not math.isfinite(g) or g >= 0.5:
        return None
    nx, ny = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(y, dim=-1)
    absolute = (x.abs() * y.abs()).sum(-1)
    if eps_of_product:
        product = nx * ny
        low, high = product * (1 - g) ** 2 * (1 - 2 * g), product * (1 + g) ** 2 * (1 + 2 * g)
        if bool(((low <= eps) & (high > eps)).any()):
            return None
        divisor = torch.where(high <= eps, torch.full_like(product, floor), product)
        relative = torch.where(high <= eps, torch.zeros_like(product), torch.full_like(product, g))
        spread = 2 * relative + unit_roundoff(dtype)
    else:
        for norm in (nx, ny):
            if bool(((norm * (1 - g) <= eps) & (norm * (1 + g) > eps)).any()):
                return None
        rel_x = torch.where(nx * (1 + g) <= eps, 0.0, g)
        rel_y = torch.where(ny * (1 + g) <= eps, 0.0, g)
        divisor = torch.where(nx * (1 + g) <= eps, floor, nx) * torch.where(ny * (1 + g) <= eps, floor, ny)
        spread = rel_x + rel_y + rel_x * rel_y
    exact = (x * y).sum(-1) / divisor
    shrink = 1 / (1 - spread) ** 2 - 1  # the computed divisor(s) off by (1 ± spread)
    error = exact.abs() * shrink + _sum_error(n, dtype, 3) * absolute / divisor / (1 - spread) ** 2
    error += gamma(n + 3, torch.float64) * 2 * absolute / divisor  # the float64 evaluation of `exact` itself
    return (exact - error).clamp(-1, 1), (exact + error).clamp(-1, 1)


def _cosine(x: torch.Tensor, y: torch.Tensor, floor: float = 1e-300) -> torch.Tensor:
    """The exact (float64) cosine per row, the norms' product clamped below at `floor`, clamped to [−1, 1]."""
    norms = torch.linalg.vector_norm(x, dim=-1) * torch.linalg.vector_norm(y, dim=-1)
    return ((x * y).sum(-1) / norms.clamp(min=floor)).clamp(-1, 1)


def _sine_ratio(s: float, theta: torch.Tensor) -> torch.Tensor:
    """sin(s·θ)/sin θ, with its limit s at θ = 0."""
    small = theta < 1e-12
    return torch.where(small, torch.full_like(theta, s), torch.sin(s * theta) / torch.where(small, 1.0, torch.sin(theta)))


def sine_ratio_interval(s: float, cos_lo: torch.Tensor, cos_hi: torch.Tensor, dtype: torch.dtype) -> Interval | None:
    """The interval of the computed sin(s·θ)/sin θ with θ = acos(c) for c in [cos_lo, cos_hi], θ by acos, the product
    s·θ rounded (with s itself rounded: 2 roundings), sine and quotient in `dtype`.

    sin(sθ)/sin θ increases with θ on (0, π) for 0 ≤ s ≤ 1, so the exact values span its values at the ends; the
    evaluation's own errors (acos, sin within ELEMENTARY_ULPS ulp; the argument's two roundings, the quotient's one)
    widen it.

    Args:
        s: the interpolation weight, in [0, 1].
        cos_lo: lower ends of the cosine per group.
        cos_hi: upper ends.
        dtype: the arithmetic dtype.

    Returns:
        The interval, or None (s outside [0, 1]; θ reaching π, where sin θ vanishes).
    """
    if not 0 <= s <= 1:
        return None
    u = unit_roundoff(dtype)
    fu = 2 * ELEMENTARY_ULPS * u  # one ulp is at most 2u relative
    theta_lo = torch.acos(cos_hi) * (1 - fu)
    theta_hi = torch.acos(cos_lo) * (1 + fu)
    if bool((theta_hi >= math.pi * (1 - 1e-6)).any()):
        return None
    lo, hi = _sine_ratio(s, theta_lo), _sine_ratio(s, theta_hi)
    # |sin(sθ(1+γ₂)) − sin(sθ)| ≤ sθγ₂; sin within fu; sin θ within fu; the quotient one rounding
    sin_hi = torch.sin(theta_hi).clamp(min=1e-300)
    argument = torch.where(theta_hi < 1e-12, s * (gamma(2, dtype) + fu) * (1 + 1e-6),
                           (s * theta_hi * gamma(2, dtype) + fu * torch.sin(s * theta_hi).abs()) / sin_hi)
    argument = torch.maximum(argument, (s * theta_lo * gamma(2, dtype) + fu * torch.sin(s * theta_lo).abs())
                             / torch.sin(theta_lo).clamp(min=1e-300))
    relative = gamma(1, dtype) + fu / (1 - fu)
    slack = (argument + hi.abs() * relative) * (1 + relative)
    return Interval(lo - slack, hi + slack)


Candidate = tuple[torch.Tensor, torch.Tensor]  # (reference, limit) over the groups' rows


def best_of(merged: torch.Tensor | None, candidates: list[Candidate], out_dtype: torch.dtype,
            arithmetic: torch.dtype, ratio: Callable) -> Candidate:
    """Per group (row), the candidate under whose limit the merged row fits best.

    Args:
        merged: the merged rows (groups, n), float64, or None (the first candidate).
        candidates: (reference, limit) pairs shaped like the rows.
        out_dtype: the merged tensor's dtype.
        arithmetic: the arithmetic dtype.
        ratio: (merged, reference, limit, out_dtype, arithmetic) -> per-element ratios.

    Returns:
        The chosen (reference, limit) rows.
    """
    if merged is None or len(candidates) == 1:
        return candidates[0]
    worst = torch.stack([ratio(merged, ref, lim, out_dtype, arithmetic).amax(-1) for ref, lim in candidates])
    pick = worst.argmin(0)
    reference = torch.stack([c[0] for c in candidates])[pick, torch.arange(pick.numel())]
    limit = torch.stack([c[1] for c in candidates])[pick, torch.arange(pick.numel())]
    return reference, limit


def least_squares(target: torch.Tensor, columns: list, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the coefficients minimising ‖(target − Σ cⱼ·columnⱼ)/scale‖₂ (rows where the columns are dependent:
    NaN). Scaling each element by its allowed difference weighs the elements whose bound is tight most.

    Args:
        target: float64 rows (groups, n).
        columns: float64 tensors shaped like target.
        scale: per element, positive (None: ones).

    Returns:
        (groups, len(columns)) coefficients.
    """
    if scale is not None:
        target, columns = target / scale, [c / scale for c in columns]
    k = len(columns)
    gram = torch.empty(target.shape[0], k, k, dtype=torch.float64)
    rhs = torch.empty(target.shape[0], k, dtype=torch.float64)
    for i in range(k):
        rhs[:, i] = (columns[i] * target).sum(-1)
        for j in range(i, k):
            gram[:, i, j] = gram[:, j, i] = (columns[i] * columns[j]).sum(-1)
    solution, info = torch.linalg.solve_ex(gram, rhs)
    dependent = (info != 0) | ~torch.isfinite(solution).all(-1)
    return torch.where(dependent.unsqueeze(-1), torch.nan, solution)


def _fitted(fit: torch.Tensor, interval: Interval, center: torch.Tensor, round_to: torch.dtype | None) -> torch.Tensor:
    """The fitted coefficient rounded to the dtype the recipe holds it in, clamped into its interval (the interval's
    own estimate where the fit is undefined)."""
    if round_to is not None:
        fit = fit.to(round_to).to(torch.float64)
    return interval.clamp(torch.where(torch.isnan(fit), center, fit))


def slerp_candidates(a: torch.Tensor, b: torch.Tensor, t: float, work: torch.dtype,
                     merged: torch.Tensor | None) -> tuple[list[Candidate], float] | None:
    """slerp's admissible (reference, limit) for one tensor flattened to one row: the spherical branch with
    coefficients in their interval, and the linear branch (exact coefficients 1 − t, t) where |cos| can exceed
    SLERP_DOT_THRESHOLD.

    Args:
        a: the base, float64 (1, n).
        b: the other model, float64 (1, n).
        t: the interpolation weight as the recipe holds it (float32, widened).
        work: slerp's working dtype (float32, or float64 for float64 inputs).
        merged: the merged tensor as float64 (1, n), or None.

    Returns:
        (candidates, the largest relative half-width of a coefficient interval), or None where no finite interval
        follows.
    """
    dot = normalized_dot(a, b, work, SLERP_EPS, 1.0)
    if dot is None:
        return None
    lo, hi = dot
    t_work = torch.tensor(t, dtype=torch.float32).to(work)
    linear = (float(1 - t_work), float(t_work))
    threshold_hi, threshold_lo = SLERP_DOT_THRESHOLD * (1 + 1e-6), SLERP_DOT_THRESHOLD * (1 - 1e-6)
    max_abs = torch.maximum(lo.abs(), hi.abs())
    min_abs = torch.where((lo <= 0) & (hi >= 0), 0.0, torch.minimum(lo.abs(), hi.abs()))
    candidates, width = [], 0.0
    if bool((max_abs > threshold_lo).all()):
        candidates.append(_linear_form([a, b], linear, 2, work))
    if bool((min_abs <= threshold_hi).any()):
        c_lo, c_hi = lo.clamp(-threshold_hi, threshold_hi), hi.clamp(-threshold_hi, threshold_hi)
        first, second = sine_ratio_interval(linear[0], c_lo, c_hi, work), sine_ratio_interval(t, c_lo, c_hi, work)
        if first is None or second is None or not first.finite() or not second.finite():
            return None
        width = max(first.width(), second.width())
        exact = torch.acos(_cosine(a, b))
        centers = [first.clamp(_sine_ratio(linear[0], exact)), second.clamp(_sine_ratio(t, exact))]
        candidates.append(_linear_form([a, b], centers, 2, work))
        if merged is not None:
            fit = least_squares(merged, [a, b])
            coefficients = [_fitted(fit[:, 0], first, centers[0], work), _fitted(fit[:, 1], second, centers[1], work)]
            candidates.append(_linear_form([a, b], coefficients, 2, work))
    if not candidates:
        return None
    return candidates, width


def _linear_form(columns: list, coefficients, roundings: int, dtype: torch.dtype,
                 offset: torch.Tensor | None = None) -> Candidate:
    """offset + Σ cⱼ·columnⱼ and its bound γ_roundings·(|offset| + Σ|cⱼ·columnⱼ|), per row; coefficients are floats
    or per-row tensors."""
    terms = [(c if isinstance(c, float) else c.unsqueeze(-1)) * x for c, x in zip(coefficients, columns, strict=True)]
    reference = sum(terms) if offset is None else offset + sum(terms)
    magnitude = sum(x.abs() for x in terms) if offset is None else offset.abs() + sum(x.abs() for x in terms)
    return reference, gamma(roundings, dtype) * magnitude * (1 + 2.0 ** -40)  # the float64 evaluation covered


def nuslerp_candidates(v0: torch.Tensor, v1: torch.Tensor, base: torch.Tensor | None, t: float,
                       dtype: torch.dtype, merged: torch.Tensor | None) -> tuple[list[Candidate], float] | None:
    """nuslerp's admissible (reference, limit) per row: spherical with coefficients sin((1 − t)θ)/sin θ and
    sin(tθ)/sin θ in their intervals, and linear ((1 − t), t, each one rounding off) where the row can be colinear.

    Args:
        v0: the first task vector (or model), float64 rows (groups, n), as the arithmetic dtype computes it.
        v1: the second, like v0.
        base: the base rows (added back), or None.
        t: w₂/(w₁ + w₂) (0.5 when the weights cancel).
        dtype: the arithmetic dtype.
        merged: the merged rows, float64, or None.

    Returns:
        (candidates, the largest relative half-width of a coefficient interval), or None.
    """
    dot = normalized_dot(v0, v1, dtype, NUSLERP_NORM_EPS, NUSLERP_NORM_EPS)
    if dot is None:
        return None
    lo, hi = dot
    u = unit_roundoff(dtype)
    extra = 0 if base is None else 1
    max_abs = torch.maximum(lo.abs(), hi.abs())
    min_abs = torch.where((lo <= 0) & (hi >= 0), 0.0, torch.minimum(lo.abs(), hi.abs()))
    colinear_bound = math.sqrt(max(0.0, 1 - NUSLERP_EPS ** 2)) - 8 * u  # |cos| past which 1 − cos² may round ≤ eps²
    candidates, width = [], 0.0
    ones = torch.ones_like(lo)
    center = [(1 - t) * ones, t * ones]
    if bool((max_abs >= colinear_bound).any()):
        # each coefficient may be rounded to the arithmetic dtype before its product: one more rounding
        boxes = [Interval((c - abs(c) * u) * ones, (c + abs(c) * u) * ones) for c in (1 - t, t)]
        candidates.append(_linear_form([v0, v1], center, 3 + extra, dtype, base))
        if merged is not None:
            target = merged if base is None else merged - base
            fit = least_squares(target, [v0, v1])
            candidates.append(_linear_form([v0, v1], [_fitted(fit[:, i], boxes[i], center[i], None) for i in (0, 1)],
                                           2 + extra, dtype, base))
    if bool((min_abs < 1).any()):
        first, second = sine_ratio_interval(1 - t, lo, hi, dtype), sine_ratio_interval(t, lo, hi, dtype)
        if first is None or second is None or not first.finite() or not second.finite():
            return None
        width = max(first.width(), second.width())
        exact = torch.acos(_cosine(v0, v1))
        centers = [first.clamp(_sine_ratio(1 - t, exact)), second.clamp(_sine_ratio(t, exact))]
        # the quotient is taken after the sum: (fl(S₀v₀) + fl(S₁v₁))/sin θ, 3 roundings, + base one more
        candidates.append(_linear_form([v0, v1], centers, 3 + extra, dtype, base))
        if merged is not None:
            target = merged if base is None else merged - base
            fit = least_squares(target, [v0, v1])
            coefficients = [_fitted(fit[:, 0], first, centers[0], None), _fitted(fit[:, 1], second, centers[1], None)]
            candidates.append(_linear_form([v0, v1], coefficients, 3 + extra, dtype, base))
    if not candidates:
        return None
    return candidates, width


def model_stock_candidates(w0: torch.Tensor, offsets: list, models: list, dtype: torch.dtype,
                           merged: torch.Tensor | None,
                           out_dtype: torch.dtype | None = None) -> tuple[list[Candidate], float] | None:
    """Model Stock's admissible (reference, limit) per row: t·mean(xᵢ) + (1 − t)·w0 with t = k·c/(1 + (k − 1)·c) in
    its interval (c the mean pairwise cosine of the offsets), and the base itself where the denominator can be
    within MODEL_STOCK_POLE of zero.

    Args:
        w0: the base rows, float64 (groups, n).
        offsets: each model's offset from the base as the arithmetic dtype computes it, float64 rows.
        models: the models' rows, float64.
        dtype: the arithmetic dtype.
        merged: the merged rows, float64, or None.
        out_dtype: the merged tensor's dtype (its rounding is allowed where narrower than the arithmetic).

    Returns:
        (candidates, the relative half-width of t's interval), or None (a norm at its clamp, t's interval
        unbounded).
    """
    k = len(models)

    def out_rounding(values: torch.Tensor) -> torch.Tensor:
        if out_dtype is None or unit_roundoff(out_dtype) <= unit_roundoff(dtype):
            return torch.zeros_like(values)
        return 0.5 * ulp(values, out_dtype)

    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    lows, highs = [], []
    for i, j in pairs:
        found = normalized_dot(offsets[i], offsets[j], dtype, MODEL_STOCK_POLE, MODEL_STOCK_POLE, eps_of_product=True)
        if found is None:
            return None
        lows.append(found[0])
        highs.append(found[1])
    u = unit_roundoff(dtype)
    mean_error = gamma(len(pairs) + 1, dtype)  # the mean: P − 1 additions, a division (|cos| ≤ 1)
    c_lo = torch.stack(lows).mean(0) - mean_error
    c_hi = torch.stack(highs).mean(0) + mean_error
    # the denominator 1 + (k − 1)·c, its product and sum rounded
    den_lo = (1 + (k - 1) * c_lo - (k - 1) * c_lo.abs() * u) * (1 - u) - u
    den_hi = (1 + (k - 1) * c_hi + (k - 1) * c_hi.abs() * u) * (1 + u) + u
    pole = MODEL_STOCK_POLE * (1 + 4 * u)
    if bool(((den_lo < -pole) & (den_hi > pole)).any()):
        return None  # t's interval would contain both signs' unbounded branches
    singular = (den_lo.abs() < pole) | (den_hi.abs() < pole) | ((den_lo <= 0) & (den_hi >= 0))
    regular = ~((den_lo.abs() < pole) & (den_hi.abs() < pole))
    mean = sum(models) / k
    total = sum(x.abs() for x in models) / k
    candidates, width = [], 0.0

    def form(t: torch.Tensor) -> Candidate:
        tc = t.unsqueeze(-1)
        reference = tc * mean + (1 - tc) * w0
        limit = gamma(k + 3, dtype) * (tc.abs() * total + (1 - tc).abs() * w0.abs()) * (1 + 2.0 ** -40)
        return reference, limit

    if bool(singular.any()):
        candidates.append((w0.clone(), torch.zeros_like(w0)))
    if bool(regular.any()):
        # t(c) increases with c on each side of the pole; the interval's ends (an end within the pole's threshold:
        # the threshold on the regular side), each widened by t's own roundings
        side = torch.where(den_lo.abs() >= pole, den_lo.sign(), den_hi.sign())

        def t_of(c: torch.Tensor) -> torch.Tensor:
            den = 1 + (k - 1) * c
            return k * c / torch.where((den.abs() < MODEL_STOCK_POLE) | (den.sign() != side),
                                       side * MODEL_STOCK_POLE, den)

        t_lo, t_hi = t_of(c_lo), t_of(c_hi)
        spread = torch.maximum(t_lo.abs(), t_hi.abs()) * (gamma(4, dtype) + 2 * (k - 1) * u *
                                                           torch.maximum(c_lo.abs(), c_hi.abs()) /
                                                           torch.minimum(den_lo.abs(), den_hi.abs()).clamp(min=pole))
        interval = Interval(torch.minimum(t_lo, t_hi) - spread, torch.maximum(t_lo, t_hi) + spread)
        if not interval.finite():
            return None
        width = interval.width()
        exact_c = torch.stack([_cosine(offsets[i], offsets[j], MODEL_STOCK_POLE) for i, j in pairs]).mean(0)
        center = interval.clamp(t_of(exact_c))
        candidates.append(form(center))
        if merged is not None:
            direction, moved = mean - w0, merged - w0
            scale = candidates[-1][1] + out_rounding(merged)
            fit = _fitted(least_squares(moved, [direction], scale.clamp(min=1e-300))[:, 0], interval, center, dtype)
            candidates.append(form(fit))
            # every element's bound confines t to an interval; any t in all of them (and in t's own) passes
            lo, hi = feasible_scalar(moved, direction, form(fit)[1] + out_rounding(merged))
            lo, hi = torch.maximum(lo, interval.lo), torch.minimum(hi, interval.hi)
            if bool((lo <= hi).any()):
                middle = torch.where(lo <= hi, (lo + hi) / 2, fit)
                rounded = middle.to(dtype).to(torch.float64)
                candidates.append(form(torch.where((rounded >= lo) & (rounded <= hi), rounded, middle)))
    return candidates, width


def feasible_scalar(y: torch.Tensor, x: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the interval of t with |y − t·x| ≤ allowed at every element (empty: lo > hi).

    Args:
        y: float64 rows.
        x: float64 rows, like y.
        allowed: nonnegative, like y.

    Returns:
        (lo, hi) per row.
    """
    safe = torch.where(x == 0, 1.0, x)
    ends = torch.stack([(y - allowed) / safe, (y + allowed) / safe])
    low, high = ends.amin(0), ends.amax(0)
    free = x == 0
    low = torch.where(free, torch.where(y.abs() <= allowed, -torch.inf, torch.inf), low)
    high = torch.where(free, torch.where(y.abs() <= allowed, torch.inf, -torch.inf), high)
    return low.amax(-1), high.amin(-1)
