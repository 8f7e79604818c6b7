"""A merged tensor checked against its recipe: a float64 reference, and what each element may differ from it.

The recipe's discrete choices — TIES's and breadcrumbs' kept sets, the elected sign — are made as the recipe's
arithmetic makes them: on the task vectors computed in float32 (float64 inputs: float64), δ = fl(x − base), which
is exactly what mergekit and loratv compute (a subtraction is correctly rounded, so every implementation gets these
bits). The continuous arithmetic is then redone in float64 with the YAML's own weights, and each element of the
merged model M is held to

    |M − reference| ≤ γ_N(u)·G + [output narrower than the arithmetic]·½·ulp_out(M)

with G the same program evaluated on absolute values and N the roundings along its longest path (docs/merging.md,
"Proof of a merge"): `certified`. An elected sign whose weighted sum is within its own rounding error of zero could be
elected either way by another order of summation; such an element passes against either choice.

slerp, nuslerp and model_stock are a linear form of their inputs whose coefficients come from sums over the whole
tensor (or row): coefficient_checks bounds those coefficients for any order of summation, finds the merged
tensor's own, and holds every element to the linear form's rounding bound: `certified`, with the coefficients'
interval width recorded. Where no finite interval follows, and for the L1 rescale (a sum over a whole tensor of the
masked task vector), the tensor is held, like PEFT-backed tuners, to a stated tolerance ½·ulp_out(M) + 4·E, E the
largest difference between the float32 evaluation and the float64 one on this tensor: `within tolerance`, never
certified. A randomised method (DARE, DELLA) can be recomputed only with its masks: given loratv's seed it is;
otherwise only what holds for any mask is checked (see `support_violations`).
"""

import itertools
from dataclasses import dataclass, field

import torch

from loratv.merging import coefficient_checks, sparsify
from loratv.merging.methods import MergeMethod
from loratv.numerics.precision import gamma, ulp, unit_roundoff

TOLERANCE_FACTOR = 4
MAX_TIED_INPUTS = 6  # inputs with a straddled cut whose kept/dropped combinations are all tried (2^6 at most)
CERTIFIED = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")
CONSENSUS = ("ties", "breadcrumbs_ties", "dare_ties", "della")
INTERPOLATIONS = ("slerp", "nuslerp", "model_stock")


@dataclass
class TensorCheck:
    """The reference of one tensor and what its elements may differ from it.

    Attributes:
        reference: the recipe evaluated in float64 (shaped like the tensor).
        limit: per element, the allowed |M − reference| before the output rounding (γ_N·G, or 4·E).
        alternatives: other admissible references (an ambiguous sign election elected the other way; equal
            magnitudes at a straddled cut all kept, or all dropped).
        certified: the limit is a derived bound (else a measured tolerance).
        kept: per input, the fraction of its task vector's nonzero elements that enter the merge (None: all).
        sign_conflicts: the fraction of elements where the inputs' nonzero weighted task vectors disagree in sign.
        arithmetic: the dtype the recipe's arithmetic runs in (the bound's unit roundoff).
        coefficient_width: for slerp, nuslerp and model_stock, the largest relative half-width of the interval their
            coefficients were certified in (None: not such a check).
    """

    reference: torch.Tensor
    limit: torch.Tensor
    alternatives: list = field(default_factory=list)
    certified: bool = True
    kept: list = field(default_factory=list)
    sign_conflicts: float = 0.0
    arithmetic: torch.dtype | None = None
    coefficient_width: float | None = None

    def ratio(self, merged: torch.Tensor, out_dtype: torch.dtype, arithmetic: torch.dtype) -> torch.Tensor:
        """|M − reference| over the allowed difference, per element (≤ 1 passes); against the closest of the
        admissible references.

        Args:
            merged: the merged model's tensor.
            out_dtype: its dtype.
            arithmetic: the recipe's arithmetic dtype.

        Returns:
            Float64 ratios shaped like the tensor.
        """
        return element_ratios(merged.to(torch.float64), self.reference, self.limit, out_dtype, arithmetic,
                              self.certified, self.alternatives)


def element_ratios(merged: torch.Tensor, reference: torch.Tensor, limit: torch.Tensor, out_dtype: torch.dtype,
                   arithmetic: torch.dtype, certified: bool = True, alternatives: list | None = None) -> torch.Tensor:
    """|M − reference| over the allowed difference, per element: the limit, plus half an ulp of the output where it is
    narrower than the arithmetic (or the limit is a tolerance); against the closest of the admissible references.

    Args:
        merged: the merged values, float64.
        reference: the float64 reference, shaped like merged.
        limit: the allowed difference before the output rounding.
        out_dtype: the merged tensor's dtype.
        arithmetic: the recipe's arithmetic dtype.
        certified: the limit is a derived bound.
        alternatives: other admissible references.

    Returns:
        Float64 ratios shaped like merged (≤ 1 passes).
    """
    allowed = limit.clone()
    if unit_roundoff(out_dtype) > unit_roundoff(arithmetic) or not certified:
        allowed += 0.5 * ulp(merged, out_dtype)
    diff = (merged - reference).abs()
    for other in alternatives or []:
        diff = torch.minimum(diff, (merged - other).abs())
    tiny = torch.finfo(torch.float64).tiny
    return torch.where(allowed > 0, diff / allowed.clamp(min=tiny), torch.where(diff > 0, torch.inf, 0.0))


def arithmetic_dtype(tensors: list) -> torch.dtype:
    """The dtype the recipe's arithmetic runs in: float64 for float64 inputs, else float32.

    Args:
        tensors: the inputs.

    Returns:
        The dtype.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _trims(method: MergeMethod, deltas: list, per_model: dict, key: tuple | None) -> list:
    trims = []
    for i, delta in enumerate(deltas):
        trim = None
        if method.sparsification is not None:
            trim = sparsify.trim_of(delta.abs(), method.sparsification, per_model["density"][i],
                                    gamma=per_model.get("gamma", [0.0] * len(deltas))[i],
                                    epsilon=per_model.get("epsilon", [0.0] * len(deltas))[i],
                                    key=key or (0, ""), position=i)
        trims.append(trim)
    return trims


def _linear_check(inputs: list, per_model: dict, shared: dict, arithmetic: torch.dtype) -> TensorCheck:
    weights = per_model["weight"]
    k = len(inputs)
    x = [t.to(torch.float64) for t in inputs]
    total = sum(w * xi for w, xi in zip(weights, x, strict=True))
    magnitude = sum(abs(w) * xi.abs() for w, xi in zip(weights, x, strict=True))
    if not shared["normalize"]:
        return TensorCheck(total, gamma(2 * k + 1, arithmetic) * magnitude)
    d = float(sum(weights))
    reference = total / d
    # weights rounded (1), fused multiply-adds (≤ 2 each), the division (1); the divisor's own K − 1 roundings
    limit = gamma(2 * k + 3, arithmetic) * magnitude / abs(d) + \
        reference.abs() * gamma(k, arithmetic) * sum(abs(w) for w in weights) / abs(d)
    return TensorCheck(reference, limit)


def _rescale_intervals(deltas: list, trims: list, arithmetic: torch.dtype) -> list | None:
    """Per input, the interval (lo, center, hi) of the L1 rescale ‖δ‖₁/‖kept‖₁ as the arithmetic dtype computes it
    (two sums of n non-negative terms, each within γ_n of its value in any order, and a quotient), or None where it
    is not applied; None overall where a sum is within its error of the threshold below which it is skipped, or
    where equal magnitudes straddle the cut (another choice changes the kept sum)."""
    intervals: list[tuple[float, float, float] | None] = []
    for delta, trim in zip(deltas, trims, strict=True):
        if trim is None:
            intervals.append(None)
            continue
        if trim.tied is not None:
            return None
        magnitude = delta.abs().to(torch.float64)
        g = gamma(magnitude.numel(), arithmetic) + gamma(magnitude.numel(), torch.float64)
        if g >= 0.5:
            return None
        before, after = float(magnitude.sum()), float((magnitude * trim.mask).sum())
        eps = sparsify.RESCALE_EPS
        if any(value * (1 - g) < eps <= value * (1 + g) for value in (before, after)):
            return None
        if before * (1 + g) < eps or after * (1 + g) < eps:
            intervals.append(None)
            continue
        center = before / after
        spread = (1 + g) / (1 - g) * (1 + unit_roundoff(arithmetic))
        intervals.append((center / spread, center, center * spread))
    return intervals


def _gta_check(method: MergeMethod, base: torch.Tensor, inputs: list, per_model: dict, shared: dict,
               arithmetic: torch.dtype, key: tuple | None = None, merged: torch.Tensor | None = None
               ) -> TensorCheck | None:
    weights = per_model["weight"]
    k = len(inputs)
    base_a = base.to(arithmetic)
    deltas_a = [t.to(arithmetic) - base_a for t in inputs]
    trims = _trims(method, deltas_a, per_model, key)
    masks = [None if t is None else t.mask for t in trims]
    rescale = bool(shared.get("rescale")) and method.sparsification is not None
    intervals = _rescale_intervals(deltas_a, trims, arithmetic) if rescale else [None] * k
    if intervals is None:
        return None
    base64 = base.to(torch.float64)
    deltas64 = [x.to(torch.float64) - base64 for x in inputs]
    w_a = torch.tensor(weights, dtype=arithmetic).tolist()
    lam = float(shared["lambda"])
    consensus = method.name in CONSENSUS
    wcol = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * base64.dim()))
    roundings = k + 8 + (1 if rescale else 0)  # the rescale's product: one more rounding per term

    def divisor(agree):
        """`normalize`'s D (the agreeing weights' sum, mergekit's guards against zero) and Σ|wᵢ| over the same
        inputs; 1 and 0 without `normalize`."""
        if not shared["normalize"]:
            return torch.ones_like(base64), torch.zeros_like(base64)
        if agree is None:
            d = torch.full_like(base64, float(sum(weights)))
            return torch.where(d.abs() < 1e-8, 1.0, d), torch.full_like(base64, float(sum(abs(w) for w in weights)))
        d = (wcol * agree).sum(0)
        return torch.where(d == 0, 1.0, d), (wcol.abs() * agree).sum(0)

    def evaluate(masks: list, agree, factors: list):
        """The float64 reference and its bound for given kept sets, rescales and elected agreement (None: no
        election)."""
        wt = torch.stack([w * (d if m is None else d * m) * (1.0 if f is None else f)
                          for w, d, m, f in zip(weights, deltas64, masks, factors, strict=True)])
        if agree is None:
            mixed, absolute = wt.sum(0), wt.abs().sum(0)
        else:
            mixed, absolute = (wt * agree).sum(0), (wt.abs() * agree).sum(0)
        d, dabs = divisor(agree)
        step = lam * mixed / d
        limit = gamma(roundings, arithmetic) * (base64.abs() + abs(lam) * absolute / d.abs()) + \
            step.abs() * gamma(k, arithmetic) * dabs / d.abs()
        return base64 + step, limit

    def election(masks: list, factors: list):
        """The elected agreement as the arithmetic makes it, and the elements whose weighted sum is within its own
        rounding error (and the rescales' intervals) of zero, where another evaluation may elect the other sign."""
        scaled = [None if f is None else float(torch.tensor(f, dtype=arithmetic)) for f in factors]
        weighted_a = torch.stack([(d if m is None else d * m) * (1.0 if f is None else f) * w
                                  for d, m, f, w in zip(deltas_a, masks, scaled, w_a, strict=True)])
        signs, total_a = weighted_a.sign(), weighted_a.sum(0)
        majority = torch.where(total_a >= 0, 1.0, -1.0).to(arithmetic)
        agree = (signs == majority).to(torch.float64)
        doubt = gamma(k, arithmetic) * weighted_a.abs().sum(0).to(torch.float64)
        for d, m, w, interval in zip(deltas_a, masks, weights, intervals, strict=True):
            if interval is not None:
                doubt += abs(w) * (d if m is None else d * m).abs().to(torch.float64) * (interval[2] - interval[0])
        ambiguous = total_a.abs().to(torch.float64) <= doubt
        other = torch.where(ambiguous, (signs == -majority).to(torch.float64), agree) if bool(ambiguous.any()) \
            else None
        return agree, other

    def candidates(masks: list, factors: list) -> list:
        """(reference, limit) for these kept sets and rescales: the election as the arithmetic makes it and, where
        ambiguous, the other one too."""
        if not consensus:
            return [evaluate(masks, None, factors)]
        agree, other = election(masks, factors)
        return [evaluate(masks, agree, factors)] + ([] if other is None else [evaluate(masks, other, factors)])

    def build(factors: list) -> TensorCheck:
        found = candidates(masks, factors)
        tied_inputs = [i for i, t in enumerate(trims) if t is not None and t.tied is not None]
        if tied_inputs:
            # equal magnitudes straddle a cut: another sort keeps others of them. An element's value depends only on
            # whether each input keeps it, so every combination of kept/dropped over the inputs tied there is
            # admissible
            choices = itertools.product((True, False), repeat=len(tied_inputs)) \
                if len(tied_inputs) <= MAX_TIED_INPUTS else [(True,) * len(tied_inputs), (False,) * len(tied_inputs)]
            for choice in choices:
                variant = list(masks)
                for i, keep in zip(tied_inputs, choice, strict=True):
                    trim = trims[i]
                    variant[i] = trim.mask | trim.tied if keep else trim.mask & ~trim.tied
                found += candidates(variant, factors)
        reference = found[0][0]
        limit = torch.stack([f[1] for f in found]).amax(0)
        return TensorCheck(reference, limit, [f[0] for f in found[1:]])

    centers = [None if i is None else i[1] for i in intervals]
    check = build(centers)
    if merged is not None and any(i is not None for i in intervals):
        # the merged model's own rescales: least squares on each input's contribution under the center's election,
        # rounded to the arithmetic dtype (a rescale is a 0-d tensor there) and clamped into its interval
        agree = election(masks, centers)[0] if consensus else None
        d = divisor(agree)[0]
        contributions = [lam * w * (dl if m is None else dl * m) * (1.0 if agree is None else agree[i]) / d
                         for i, (w, dl, m) in enumerate(zip(weights, deltas64, masks, strict=True))]
        free = [i for i, interval in enumerate(intervals) if interval is not None]
        target = merged.to(torch.float64) - base64 - sum((contributions[i] for i in range(k) if i not in free),
                                                         torch.zeros_like(base64))
        scale = (check.limit + 0.5 * ulp(merged, merged.dtype)).reshape(1, -1).clamp(min=1e-300)
        fit = coefficient_checks.least_squares(target.reshape(1, -1), [contributions[i].reshape(1, -1) for i in free],
                                               scale)[0]
        fitted = list(centers)
        for j, i in enumerate(free):
            value, interval = float(fit[j]), intervals[i]
            if value == value and interval is not None:  # not NaN
                value = float(torch.tensor(value, dtype=arithmetic))
                fitted[i] = min(max(value, interval[0]), interval[2])
        other = build(fitted)
        out = merged.dtype
        if float(other.ratio(merged, out, arithmetic).max()) < float(check.ratio(merged, out, arithmetic).max()):
            check = other
        check.coefficient_width = max((i[2] - i[1]) / i[1] for i in intervals if i is not None)
    signs = torch.stack([(d if m is None else d * m) * w for d, m, w in zip(deltas_a, masks, w_a, strict=True)]).sign()
    check.sign_conflicts = float(((signs > 0).any(0) & (signs < 0).any(0)).double().mean())
    check.kept = [None if m is None else float((m & (d != 0)).sum()) / max(1, int((d != 0).sum()))
                  for d, m in zip(deltas_a, masks, strict=True)]
    return check


def check_tensor(method: MergeMethod, base: torch.Tensor | None, inputs: list, per_model: dict, shared: dict,
                 key: tuple | None = None, arithmetic: torch.dtype | None = None,
                 merged: torch.Tensor | None = None) -> TensorCheck:
    """The reference and allowed difference of one merged tensor.

    Args:
        method: the recipe's method.
        base: the base tensor in its stored dtype (None without a base).
        inputs: the weighted inputs' tensors in their stored dtypes, in the method's order.
        per_model: the per-model parameter values, by parameter.
        shared: the shared parameter values.
        key: (seed, tensor name) for a randomised method whose masks are loratv's.
        arithmetic: the dtype the recipe's arithmetic runs in (None: float32, float64 for float64 inputs).
        merged: the merged tensor, whose own coefficients slerp, nuslerp and model_stock are checked with (None:
            the recipe's float64 coefficients only).

    Returns:
        The TensorCheck.
    """
    arithmetic = arithmetic or arithmetic_dtype(inputs + ([base] if base is not None else []))
    check = None
    if method.name in INTERPOLATIONS:
        check = _interpolation_check(method, base, inputs, per_model, shared, arithmetic, merged)
    if check is None:
        check = _check(method, base, inputs, per_model, shared, key, arithmetic, merged)
    if check.arithmetic is None:
        check.arithmetic = arithmetic
    return check


def _rows(x: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """A tensor as the rows its coefficients are computed over (mergekit's reductions along the last dimension)."""
    if flatten or x.dim() <= 1:
        return x.reshape(1, -1)
    if row_wise:
        x = x.transpose(0, -1)
    return x.reshape(-1, x.shape[-1])


def _unrows(rows: torch.Tensor, shape: torch.Size, row_wise: bool, flatten: bool) -> torch.Tensor:
    if flatten or len(shape) <= 1:
        return rows.reshape(shape)
    if row_wise:
        swapped = list(shape)
        swapped[0], swapped[-1] = swapped[-1], swapped[0]
        return rows.reshape(swapped).transpose(0, -1)
    return rows.reshape(shape)


def _interpolation_check(method: MergeMethod, base: torch.Tensor | None, inputs: list, per_model: dict,
                         shared: dict, arithmetic: torch.dtype, merged: torch.Tensor | None) -> TensorCheck | None:
    """slerp, nuslerp, model_stock through coefficient_checks (None: no finite coefficient interval)."""
    shape = inputs[0].shape
    row_wise = flatten = False
    if method.name == "slerp":
        assert base is not None
        flatten = True
        work = torch.float64 if arithmetic == torch.float64 else torch.float32  # slerp's own working dtype
        a, b = (x.to(arithmetic).to(torch.float64).reshape(1, -1) for x in (base, inputs[0]))
        found = coefficient_checks.slerp_candidates(
            a, b, float(shared["t"]), work, None if merged is None else merged.to(torch.float64).reshape(1, -1))
        arithmetic = work
    elif method.name == "nuslerp":
        weights = per_model["weight"]
        total = sum(weights)
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        row_wise, flatten = bool(shared["nuslerp_row_wise"]), bool(shared["nuslerp_flatten"])
        x0, x1 = (x.to(arithmetic) for x in inputs)
        offset = None
        if base is not None:
            b = base.to(arithmetic)
            x0, x1, offset = x0 - b, x1 - b, _rows(b.to(torch.float64), row_wise, flatten)
        found = coefficient_checks.nuslerp_candidates(
            _rows(x0.to(torch.float64), row_wise, flatten), _rows(x1.to(torch.float64), row_wise, flatten), offset,
            t, arithmetic, None if merged is None else _rows(merged.to(torch.float64), row_wise, flatten))
    else:
        assert base is not None
        flatten = not shared["filter_wise"]
        w0 = base.to(arithmetic)
        models = [x.to(arithmetic) for x in inputs]
        found = coefficient_checks.model_stock_candidates(
            _rows(w0.to(torch.float64), False, flatten),
            [_rows((x - w0).to(torch.float64), False, flatten) for x in models],
            [_rows(x.to(torch.float64), False, flatten) for x in models], arithmetic,
            None if merged is None else _rows(merged.to(torch.float64), False, flatten),
            None if merged is None else merged.dtype)
    if found is None:
        return None
    candidates, width = found
    reference, limit = coefficient_checks.best_of(
        None if merged is None else _rows(merged.to(torch.float64), row_wise, flatten), candidates,
        arithmetic if merged is None else merged.dtype, arithmetic, element_ratios)
    return TensorCheck(_unrows(reference, shape, row_wise, flatten), _unrows(limit, shape, row_wise, flatten),
                       arithmetic=arithmetic, coefficient_width=width)


def _check(method: MergeMethod, base: torch.Tensor | None, inputs: list, per_model: dict, shared: dict,
           key: tuple | None, arithmetic: torch.dtype, merged: torch.Tensor | None) -> TensorCheck:
    if method.name == "linear":
        return _linear_check(inputs, per_model, shared, arithmetic)
    if method.name in CERTIFIED or (method.randomised and key is not None and key[0] is not None):
        assert base is not None
        check = _gta_check(method, base, inputs, per_model, shared, arithmetic, key, merged)
        if check is not None:
            return check
    extra = {"key": key} if method.randomised else {}
    exact = method.merge(None if base is None else base.to(torch.float64), [t.to(torch.float64) for t in inputs],
                         per_model, shared, **extra)
    computed = method.merge(None if base is None else base.to(arithmetic), [t.to(arithmetic) for t in inputs],
                            per_model, shared, **extra)
    error = float((computed.to(torch.float64) - exact).abs().max()) if exact.numel() else 0.0
    return TensorCheck(exact, torch.full_like(exact, TOLERANCE_FACTOR * error), certified=False)


def support_violations(method: MergeMethod, base: torch.Tensor, inputs: list, per_model: dict, shared: dict,
                       merged: torch.Tensor) -> int:
    """For a randomised merge whose masks cannot be recomputed: the elements no mask could explain.

    Whatever DARE or DELLA drew, an element that moved off the base must be in some input's task-vector support,
    and (the *_ties variants, or a single input) move in the direction of one of the weighted task vectors.

    Args:
        method: a randomised method.
        base: the base tensor.
        inputs: the inputs' tensors.
        per_model: the per-model values ("weight").
        shared: the shared values ("lambda").
        merged: the merged tensor.

    Returns:
        The number of elements that break these conditions.
    """
    base64 = base.to(torch.float64)
    moved = merged.to(torch.float64) - base64.to(merged.dtype).to(torch.float64)
    weighted = torch.stack([w * (t.to(torch.float64) - base64) for w, t in zip(per_model["weight"], inputs,
                                                                             strict=True)])
    support = (weighted != 0).any(0)
    bad = (moved != 0) & ~support
    lam = float(shared.get("lambda", 1.0))
    if (method.name in CONSENSUS or len(inputs) == 1) and lam != 0:
        direction = moved.sign() * (1.0 if lam > 0 else -1.0)
        agrees = ((weighted.sign() == direction) & (weighted != 0)).any(0)
        bad |= (moved != 0) & ~agrees
    return int(bad.sum())
