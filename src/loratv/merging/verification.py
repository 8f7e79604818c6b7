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

Methods whose arithmetic has no derived bound here (slerp, nuslerp, model_stock: square roots, arc-cosines and
sines; the L1 rescale, a sum over a whole tensor) are held, like PEFT-backed tuners, to a stated tolerance
½·ulp_out(M) + 4·E, E the largest difference between the float32 evaluation and the float64 one on this tensor:
`within tolerance`, never certified. A randomised method (DARE, DELLA) can be recomputed only with its masks: given
loratv's seed it is; otherwise only what holds for any mask is checked (see `support_violations`).
"""

import itertools
from dataclasses import dataclass, field

import torch

from loratv.merging import sparsify
from loratv.merging.methods import MergeMethod
from loratv.numerics.precision import gamma, ulp, unit_roundoff

TOLERANCE_FACTOR = 4
MAX_TIED_INPUTS = 6  # inputs with a straddled cut whose kept/dropped combinations are all tried (2^6 at most)
CERTIFIED = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties")
CONSENSUS = ("ties", "breadcrumbs_ties", "dare_ties", "della")


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
    """

    reference: torch.Tensor
    limit: torch.Tensor
    alternatives: list = field(default_factory=list)
    certified: bool = True
    kept: list = field(default_factory=list)
    sign_conflicts: float = 0.0
    arithmetic: torch.dtype = torch.float32

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
        m = merged.to(torch.float64)
        allowed = self.limit.clone()
        if unit_roundoff(out_dtype) > unit_roundoff(arithmetic) or not self.certified:
            allowed += 0.5 * ulp(m, out_dtype)
        diff = (m - self.reference).abs()
        for other in self.alternatives:
            diff = torch.minimum(diff, (m - other).abs())
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


def _trims(method: MergeMethod, deltas: list, per_model: dict) -> list:
    trims = []
    for i, delta in enumerate(deltas):
        trim = None
        if method.sparsification is not None:
            trim = sparsify.trim_of(delta.abs(), method.sparsification, per_model["density"][i],
                                    gamma=per_model.get("gamma", [0.0] * len(deltas))[i])
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


def _gta_check(method: MergeMethod, base: torch.Tensor, inputs: list, per_model: dict, shared: dict,
               arithmetic: torch.dtype) -> TensorCheck:
    weights = per_model["weight"]
    k = len(inputs)
    base_a = base.to(arithmetic)
    deltas_a = [t.to(arithmetic) - base_a for t in inputs]
    trims = _trims(method, deltas_a, per_model)
    masks = [None if t is None else t.mask for t in trims]
    base64 = base.to(torch.float64)
    deltas64 = [x.to(torch.float64) - base64 for x in inputs]
    w_a = torch.tensor(weights, dtype=arithmetic).tolist()
    lam = float(shared["lambda"])
    consensus = method.name in CONSENSUS
    wcol = torch.tensor(weights, dtype=torch.float64).reshape(-1, *([1] * base64.dim()))

    def evaluate(masks: list, agree):
        """The float64 reference and its bound for given kept sets and elected agreement (None: no election)."""
        wt = torch.stack([w * (d if m is None else d * m) for w, d, m in zip(weights, deltas64, masks, strict=True)])
        if agree is None:
            mixed, absolute = wt.sum(0), wt.abs().sum(0)
            d = torch.full_like(base64, float(sum(weights)))
            d = torch.where(d.abs() < 1e-8, 1.0, d)
            dabs = torch.full_like(base64, float(sum(abs(w) for w in weights)))
        else:
            mixed, absolute = (wt * agree).sum(0), (wt.abs() * agree).sum(0)
            d = (wcol * agree).sum(0)
            d = torch.where(d == 0, 1.0, d)
            dabs = (wcol.abs() * agree).sum(0)
        if not shared["normalize"]:
            d, dabs = torch.ones_like(base64), torch.zeros_like(base64)
        step = lam * mixed / d
        limit = gamma(k + 8, arithmetic) * (base64.abs() + abs(lam) * absolute / d.abs()) + \
            step.abs() * gamma(k, arithmetic) * dabs / d.abs()
        return base64 + step, limit

    def candidates(masks: list) -> list:
        """(reference, limit) for these kept sets: the election as the arithmetic makes it, and where the weighted
        sum is within its own rounding error of zero (another summation order may round it to the other side),
        the other election too."""
        if not consensus:
            return [evaluate(masks, None)]
        weighted_a = torch.stack([(d if m is None else d * m) * w for d, m, w in zip(deltas_a, masks, w_a,
                                                                                    strict=True)])
        signs, total_a = weighted_a.sign(), weighted_a.sum(0)
        majority = torch.where(total_a >= 0, 1.0, -1.0).to(arithmetic)
        agree = (signs == majority).to(torch.float64)
        found = [evaluate(masks, agree)]
        ambiguous = total_a.abs().to(torch.float64) <= \
            gamma(k, arithmetic) * weighted_a.abs().sum(0).to(torch.float64)
        if bool(ambiguous.any()):
            found.append(evaluate(masks, torch.where(ambiguous, (signs == -majority).to(torch.float64), agree)))
        return found

    found = candidates(masks)
    tied_inputs = [i for i, t in enumerate(trims) if t is not None and t.tied is not None]
    if tied_inputs:
        # equal magnitudes straddle a cut: another sort keeps others of them. An element's value depends only on
        # whether each input keeps it, so every combination of kept/dropped over the inputs tied there is admissible
        choices = itertools.product((True, False), repeat=len(tied_inputs)) if len(tied_inputs) <= MAX_TIED_INPUTS \
            else [(True,) * len(tied_inputs), (False,) * len(tied_inputs)]
        for choice in choices:
            variant = list(masks)
            for i, keep in zip(tied_inputs, choice, strict=True):
                trim = trims[i]
                variant[i] = trim.mask | trim.tied if keep else trim.mask & ~trim.tied
            found += candidates(variant)
    signs = torch.stack([(d if m is None else d * m) * w for d, m, w in zip(deltas_a, masks, w_a, strict=True)]).sign()
    conflicts = float(((signs > 0).any(0) & (signs < 0).any(0)).double().mean())
    kept = [None if m is None else float((m & (d != 0)).sum()) / max(1, int((d != 0).sum()))
            for d, m in zip(deltas_a, masks, strict=True)]
    reference, limit = found[0]
    limit = torch.stack([f[1] for f in found]).amax(0)
    return TensorCheck(reference, limit, [f[0] for f in found[1:]], kept=kept, sign_conflicts=conflicts)


def check_tensor(method: MergeMethod, base: torch.Tensor | None, inputs: list, per_model: dict, shared: dict,
                 key: tuple | None = None, arithmetic: torch.dtype | None = None) -> TensorCheck:
    """The reference and allowed difference of one merged tensor.

    Args:
        method: the recipe's method.
        base: the base tensor in its stored dtype (None without a base).
        inputs: the weighted inputs' tensors in their stored dtypes, in the method's order.
        per_model: the per-model parameter values, by parameter.
        shared: the shared parameter values.
        key: (seed, tensor name) for a randomised method whose masks are loratv's.
        arithmetic: the dtype the recipe's arithmetic runs in (None: float32, float64 for float64 inputs).

    Returns:
        The TensorCheck.
    """
    arithmetic = arithmetic or arithmetic_dtype(inputs + ([base] if base is not None else []))
    check = _check(method, base, inputs, per_model, shared, key, arithmetic)
    check.arithmetic = arithmetic
    return check


def _check(method: MergeMethod, base: torch.Tensor | None, inputs: list, per_model: dict, shared: dict,
           key: tuple | None, arithmetic: torch.dtype) -> TensorCheck:
    rescale = bool(shared.get("rescale"))
    if method.name == "linear":
        return _linear_check(inputs, per_model, shared, arithmetic)
    if method.name in CERTIFIED and not rescale:
        assert base is not None
        return _gta_check(method, base, inputs, per_model, shared, arithmetic)
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
