"""Model-merging methods, one registered definition each, with mergekit 0.1.5's arithmetic for one tensor.

A method receives, for one output tensor, the base model's tensor (None for methods without a base), every input
model's tensor (in input order, all in the compute dtype: float32 or float64), each input's resolved per-model
parameters and the shared parameters, and returns the merged tensor in the compute dtype; the caller rounds it once to
the output dtype. The operations and their order are mergekit's (`merge_methods/linear.py`,
`merge_methods/generalized_task_arithmetic.py`), so that both tools give the same bits when both compute in float32
(docs/merging.md).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loratv.merging import sparsify
from loratv.numerics.precision import gamma

REQUIRED = object()  # a parameter with no default


@dataclass(frozen=True)
class Parameter:
    """One parameter of a method: its name, type, scope and default.

    Attributes:
        name: as written in the YAML config.
        kind: float or bool.
        per_model: set under each model's `parameters` (mergekit's INPUT / NON_BASE scope), else shared (the
            config's top-level `parameters`).
        default: the value when absent, or REQUIRED.
    """

    name: str
    kind: type
    per_model: bool
    default: object = REQUIRED


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: its parameters, whether it needs a base model, and its arithmetic for one tensor.

    Attributes:
        name: the `merge_method` value.
        parameters: every parameter it reads.
        needs_base: the config must name a `base_model`.
        base_weighted: the base model is one of the weighted inputs when listed in `models` (linear); otherwise its
            entry in `models` only carries parameters and it is never a task vector of itself.
        randomised: its masks are drawn at random (DARE, DELLA); its merge also takes `key=(seed, tensor name)`.
        merge: (base, inputs, per-model values by parameter, shared values) -> merged tensor in the compute dtype.
        min_models: the fewest models besides the base.
        max_models: the most models besides the base (None: any number).
        uses_base: reads the base when the config names one, even if it does not need one (nuslerp).
        elementwise: every operation is elementwise once the sparsification's trims are known, so the merge can
            run on row blocks (its merge then takes `trims`, one sparsify.Trim or None per input).
        sparsification: the sparsify.trim_of kind its task vectors go through, or None.
    """

    name: str
    parameters: tuple
    needs_base: bool
    base_weighted: bool
    randomised: bool
    merge: Callable[..., torch.Tensor]
    min_models: int = 1
    max_models: int | None = None
    uses_base: bool = False
    elementwise: bool = False
    sparsification: str | None = None

    def parameter(self, name: str) -> Parameter | None:
        """The parameter called `name`, or None.

        Args:
            name: a parameter name.

        Returns:
            The Parameter, or None when the method has no such parameter.
        """
        return next((p for p in self.parameters if p.name == name), None)


def linear(base: torch.Tensor | None, inputs: list, per_model: dict, shared: dict) -> torch.Tensor:
    """Σ wᵢ·xᵢ (÷ Σ wᵢ with `normalize`): mergekit's linear_merge, accumulated by addcmul in input order, in float32
    (float64 for float64 inputs) whatever the inputs' dtype, and returned in the inputs' dtype.

    Args:
        base: unused (linear weighs every input, the base included when listed).
        inputs: the input tensors, in the compute dtype.
        per_model: {"weight": [w per input]}.
        shared: {"normalize": bool}.
    Returns:
        The merged tensor, in the compute dtype.
    """
    first = inputs[0]
    work = torch.float64 if first.dtype == torch.float64 else torch.float32  # mergekit's, whatever the inputs' dtype
    weights = torch.tensor([per_model["weight"]], dtype=work, device=first.device)  # (1, K), as mergekit
    result = torch.zeros_like(first, dtype=work)
    for tensor, coefficient in zip(inputs, weights.unbind(1), strict=True):
        result.addcmul_(tensor, coefficient.reshape((1,) * first.ndim) if first.ndim else coefficient.reshape(()))
    if shared["normalize"]:
        result.div_(weights.sum(dim=1).reshape((1,) * first.ndim) if first.ndim else weights.sum(dim=1).reshape(()))
    return result.to(first.dtype)


def _consensus_mask(weighted: torch.Tensor, mask_dtype: torch.dtype) -> torch.Tensor:
    """TIES's sign election ("sum"): keep each input's element whose sign is that of the sum of the weighted deltas
    (ties to +)."""
    sign = weighted.sign().to(mask_dtype)
    majority = (weighted.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


def _task_arithmetic_family(sparsification: str | None, consensus: bool) -> Callable[..., torch.Tensor]:
    """The generalized task arithmetic of mergekit (GTATask): sparsify each δᵢ = xᵢ − base, weigh, elect signs,
    sum, divide by the weights that agree (`normalize`), times `lambda`, added to the base."""

    def merge(base: torch.Tensor | None, inputs: list, per_model: dict, shared: dict, key: tuple = (0, ""),
              trims: list | None = None) -> torch.Tensor:
        """trims: each input's sparsify.Trim (or None), computed on the whole tensor; given, base and inputs may be
        row blocks of it (every operation below is elementwise), else they are computed here."""
        assert base is not None
        if not inputs:
            return base
        deltas = base.new_empty((len(inputs), *base.shape))
        for index, tensor in enumerate(inputs):
            delta = tensor - base
            if trims is not None:
                trim = trims[index]
            elif sparsification is not None:
                trim = sparsify.trim_of(delta.abs(), sparsification, per_model["density"][index],
                                        gamma=per_model.get("gamma", [0.0] * len(inputs))[index],
                                        epsilon=per_model.get("epsilon", [0.0] * len(inputs))[index],
                                        rescale=shared["rescale"], key=key, position=index)
            else:
                trim = None
            deltas[index] = delta if trim is None else trim.apply(delta)
        weights = torch.tensor(per_model["weight"], dtype=deltas.dtype, device=deltas.device)
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        if consensus:
            mask = _consensus_mask(deltas, torch.int8 if shared["int8_mask"] else base.dtype)
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mask = None
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if shared["normalize"]:
            mixed /= divisor
        if shared["lambda"] != 1:
            mixed *= shared["lambda"]
        return (base + mixed).to(base.dtype)

    return merge


BOUND_SLACK = 1 + 2.0 ** -20  # the bound's own float32 evaluation, covered


def rounding_bound(method: str, weights: list, shared: dict, base_max: float, input_maxes: list,
                   dtype: torch.dtype) -> float | None:
    """A bound on every element's rounding error of a linear or task-vector merge, from the inputs' largest
    magnitudes alone (found while they are read): the elementwise bounds of docs/merging.md,

        linear:       γ_{2K+1}(u)·Σ|wᵢ||xᵢ|, or with `normalize` γ_{2K+3}(u)·Σ|wᵢ||xᵢ|/|Σwᵢ| + |M|·γ_K(u)·Σ|wᵢ|/|Σwᵢ|
        task vectors: γ_{K+8}(u)·(|base| + |λ|·Σ_agreeing|wᵢδᵢ|/|D|) + |λ·Σwᵢδᵢ/D|·γ_K(u)·Σ_agreeing|wᵢ|/|D|

    bounded above with |xᵢ| ≤ max|xᵢ|, |δᵢ| ≤ max|xᵢ| + max|base| (trimming only drops elements) and, with
    `normalize` and weights of one sign, a weighted mean of |δᵢ| at most its largest and Σ|wᵢ|/|D| = 1.

    Args:
        method: the method's name ("linear" or a task-vector method).
        weights: the weights wᵢ, in the method's input order.
        shared: the shared parameters (normalize, lambda).
        base_max: max |base| (0 without a base).
        input_maxes: max |xᵢ| per input.
        dtype: the arithmetic dtype (its unit roundoff).

    Returns:
        The bound, or None where none follows from maxima (a normalized merge with weights summing to zero, or of
        both signs).
    """
    k = len(weights)
    if method == "linear":
        magnitude = sum(abs(w) * m for w, m in zip(weights, input_maxes, strict=True))
        total = float(sum(weights))
        if not shared["normalize"]:
            return gamma(2 * k + 1, dtype) * magnitude * BOUND_SLACK
        if total == 0:
            return None
        spread = sum(abs(w) for w in weights) / abs(total)
        return (gamma(2 * k + 3, dtype) + gamma(k, dtype) * spread) * magnitude / abs(total) * BOUND_SLACK
    lam = abs(float(shared["lambda"]))
    delta_maxes = [m + base_max for m in input_maxes]
    if not shared["normalize"]:
        return gamma(k + 8, dtype) * (base_max + lam * sum(abs(w) * d for w, d in zip(weights, delta_maxes,
                                                                                    strict=True))) * BOUND_SLACK
    if all(w > 0 for w in weights) or all(w < 0 for w in weights):
        delta_max = max(delta_maxes, default=0.0)
        return (gamma(k + 8, dtype) * (base_max + lam * delta_max) + gamma(k, dtype) * lam * delta_max) * BOUND_SLACK
    return None


def _gta(name: str, sparsification: str | None, consensus: bool, normalize: bool, rescale: bool) -> MergeMethod:
    params = [Parameter("int8_mask", bool, False, False), Parameter("normalize", bool, False, normalize),
              Parameter("rescale", bool, False, rescale), Parameter("lambda", float, False, 1.0),
              Parameter("weight", float, True), Parameter("density", float, True, 1.0)]
    if sparsification == "magnitude_outliers":
        params.append(Parameter("gamma", float, True, 0.01))
    if sparsification == "della_magprune":
        params.append(Parameter("epsilon", float, True, 0.15))
    return MergeMethod(name, tuple(params), needs_base=True, base_weighted=False,
                       randomised=sparsification in ("random", "della_magprune"),
                       merge=_task_arithmetic_family(sparsification, consensus), elementwise=True,
                       sparsification=sparsification)


def slerp(base: torch.Tensor | None, inputs: list, per_model: dict, shared: dict) -> torch.Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1) on the whole flattened tensor, with
    mergekit's arithmetic: norms taken chunk by chunk (2²⁰ elements) and combined as a norm of norms, the dot of the
    normalised chunks summed, a near-colinear pair (|cos| > 0.9995) interpolated linearly.

    Args:
        base: the base tensor (v0).
        inputs: [the other model's tensor] (v1).
        per_model: unused.
        shared: {"t": t}.

    Returns:
        The merged tensor, in the compute dtype.
    """
    assert base is not None
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    a, b = base.reshape(1, -1), inputs[0].reshape(1, -1)
    t = torch.tensor([shared["t"]], dtype=torch.float32, device=base.device).reshape(-1, 1).to(work)
    if not a.shape[1]:
        return ((1 - t) * a + t * b).reshape(base.shape).to(base.dtype)
    chunk = SLERP_CHUNK
    spans = range(0, a.shape[1], chunk)
    norm_a = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(a[:, i:i + chunk].to(work), dim=1, keepdim=True) for i in spans]), dim=0)
    norm_b = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(b[:, i:i + chunk].to(work), dim=1, keepdim=True) for i in spans]), dim=0)
    norm_a = torch.where(norm_a > SLERP_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > SLERP_EPS, norm_b, 1)
    dot = torch.stack([((a[:, i:i + chunk].to(work) / norm_a) * (b[:, i:i + chunk].to(work) / norm_b))
                       .sum(dim=1, keepdim=True) for i in spans]).sum(dim=0).clamp(-1, 1)
    linear_pair = dot.abs() > SLERP_DOT_THRESHOLD
    theta = torch.acos(torch.where(linear_pair, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear_pair, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear_pair, t, torch.sin(t * theta) / sin_theta)
    result = torch.empty_like(a)
    for i in spans:
        result[:, i:i + chunk] = coef_a * a[:, i:i + chunk].to(work) + coef_b * b[:, i:i + chunk].to(work)
    return result.reshape(base.shape)


def _nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """mergekit's nuslerp of two tensors: per row (or per column, or flattened) spherical interpolation."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NUSLERP_NORM_EPS)

    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= NUSLERP_EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    sin_theta = torch.sin(theta)
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(base: torch.Tensor | None, inputs: list, per_model: dict, shared: dict) -> torch.Tensor:
    """NuSLERP: spherical interpolation of two models at t = w₂/(w₁ + w₂) (0.5 when the weights cancel), of their
    task vectors when a base is given.

    Args:
        base: the base tensor, or None.
        inputs: the two models' tensors.
        per_model: {"weight": [w₁, w₂]}.
        shared: {"nuslerp_row_wise": bool, "nuslerp_flatten": bool}.

    Returns:
        The merged tensor, in the compute dtype.
    """
    weights = per_model["weight"]
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    row_wise, flatten = shared["nuslerp_row_wise"], shared["nuslerp_flatten"]
    if base is not None:
        return base + _nuslerp_pair(t, inputs[0] - base, inputs[1] - base, row_wise, flatten)
    return _nuslerp_pair(t, inputs[0], inputs[1], row_wise, flatten)


def model_stock(base: torch.Tensor | None, inputs: list, per_model: dict, shared: dict) -> torch.Tensor:
    """Model Stock: t = k·cos/(1 + (k − 1)·cos) from the mean pairwise cosine of the k task vectors (per row with
    `filter_wise`), then t·mean(models) + (1 − t)·base; the base where 1 + (k − 1)·cos is within 1e-6 of zero.

    Args:
        base: the base tensor.
        inputs: the k ≥ 2 models' tensors.
        per_model: unused.
        shared: {"filter_wise": bool}.

    Returns:
        The merged tensor, in the compute dtype.
    """
    assert base is not None
    shape = base.shape
    if shared["filter_wise"]:
        w0, ws = (base.unsqueeze(0), [w.unsqueeze(0) for w in inputs]) if base.dim() == 1 else (base, list(inputs))
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in inputs]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, first in enumerate(offsets):
        for second in offsets[i + 1:]:
            norms = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos_theta), (count * cos_theta) / safe)
    average = sum(ws) / count
    return (t * average + (1 - t) * w0).reshape(shape)


SLERP_CHUNK = 1024 * 1024  # mergekit's _CHUNK_ELEMENTS: the norms and the dot are summed chunk by chunk
SLERP_EPS = 1e-8
SLERP_DOT_THRESHOLD = 0.9995
NUSLERP_NORM_EPS = 1e-7
NUSLERP_EPS = 1e-8

METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("linear", (Parameter("weight", float, True), Parameter("normalize", bool, False, True)),
                needs_base=False, base_weighted=True, randomised=False, merge=linear, elementwise=True),
    _gta("task_arithmetic", None, consensus=False, normalize=False, rescale=False),
    _gta("ties", "magnitude", consensus=True, normalize=True, rescale=False),
    _gta("breadcrumbs", "magnitude_outliers", consensus=False, normalize=False, rescale=False),
    _gta("breadcrumbs_ties", "magnitude_outliers", consensus=True, normalize=False, rescale=False),
    _gta("dare_linear", "random", consensus=False, normalize=False, rescale=True),
    _gta("dare_ties", "random", consensus=True, normalize=False, rescale=True),
    _gta("della", "della_magprune", consensus=True, normalize=True, rescale=True),
    _gta("della_linear", "della_magprune", consensus=False, normalize=False, rescale=True),
    MergeMethod("slerp", (Parameter("t", float, False),), needs_base=True, base_weighted=False, randomised=False,
                merge=slerp, min_models=1, max_models=1),
    MergeMethod("nuslerp", (Parameter("weight", float, True), Parameter("nuslerp_row_wise", bool, False, False),
                            Parameter("nuslerp_flatten", bool, False, True)),
                needs_base=False, base_weighted=False, randomised=False, merge=nuslerp, min_models=2, max_models=2,
                uses_base=True),
    MergeMethod("model_stock", (Parameter("filter_wise", bool, False, False),), needs_base=True,
                base_weighted=False, randomised=False, merge=model_stock, min_models=2),
)}
