"""The coefficient intervals behind certified slerp, nuslerp and model_stock checks: each must contain what a float32
evaluation gives in any order of summation (here sequential, reversed, sorted and torch's own, against float64
NumPy), and a check must fall back to a tolerance where no finite interval follows."""

import numpy as np
import pytest
import torch

from loratv.merging import coefficient_checks as cc
from loratv.merging.methods import METHODS
from loratv.merging.verification import check_tensor


def _float32_sums(terms: np.ndarray) -> list[float]:
    """The sum of float32 terms in four orders, each accumulated in float32."""
    orders = [terms, terms[::-1], np.sort(terms), terms[np.argsort(-np.abs(terms))]]
    sums = [float(np.add.accumulate(o.astype(np.float32), dtype=np.float32)[-1]) for o in orders]
    return sums + [float(torch.from_numpy(terms.astype(np.float32)).sum())]


def _normalized_dots(x: np.ndarray, y: np.ndarray) -> list[float]:
    """Σ (xᵢ/‖x‖)(yᵢ/‖y‖) in float32 with every combination of summation orders for the norms and the dot."""
    out = []
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    for nx, ny in zip(_float32_sums(x32 * x32), _float32_sums(y32 * y32), strict=True):
        terms = (x32 / np.float32(np.sqrt(np.float32(nx)))) * (y32 / np.float32(np.sqrt(np.float32(ny))))
        out += _float32_sums(terms)
    return out


@pytest.mark.parametrize("kind", ["random", "close", "opposite", "large-n"])
def test_the_cosine_interval_holds_every_summation_order(kind):
    rng = np.random.default_rng(3)
    n = 200_000 if kind == "large-n" else 3000
    x = rng.standard_normal(n).astype(np.float32)
    y = {"random": rng.standard_normal(n), "close": x + 1e-3 * rng.standard_normal(n),
         "opposite": -x + 0.2 * rng.standard_normal(n), "large-n": x + rng.standard_normal(n)}[kind].astype(np.float32)
    lo, hi = cc.normalized_dot(torch.from_numpy(x).double().reshape(1, -1), torch.from_numpy(y).double().reshape(1, -1),
                               torch.float32, 1e-8, 1.0)
    exact = float(np.dot(x.astype(np.float64), y) / np.linalg.norm(x.astype(np.float64)) / np.linalg.norm(y))
    assert float(lo) <= exact <= float(hi)
    for value in _normalized_dots(x, y):
        value = min(max(value, -1.0), 1.0)  # the methods clamp the cosine
        assert float(lo) <= value <= float(hi), (value, float(lo), float(hi))
    u = 2.0 ** -24
    assert float(hi - lo) < 12 * n * u  # the interval is the worst case's few n·u, not wider


def test_the_sine_ratio_interval_holds_the_float32_evaluation_and_the_function_increases():
    rng = np.random.default_rng(5)
    cosines = np.concatenate([rng.uniform(-0.99, 0.9995, 400), [0.0, 0.9995, -0.9, 1e-9]])
    for s in (0.0, 0.3, 0.5, 0.77, 1.0):
        interval = cc.sine_ratio_interval(s, torch.tensor(cosines), torch.tensor(cosines), torch.float32)
        assert interval is not None and interval.finite()
        c32 = torch.tensor(cosines, dtype=torch.float32)
        theta = torch.acos(c32)
        computed = (torch.sin(torch.tensor(s, dtype=torch.float32) * theta) / torch.sin(theta)).double()
        assert bool(((interval.lo <= computed) & (computed <= interval.hi)).all())
        # sin(sθ)/sin θ increases with θ on (0, π): the reason the ends of a cosine interval bound it
        grid = np.linspace(1e-6, np.pi - 1e-3, 20001)
        assert np.all(np.diff(np.sin(s * grid) / np.sin(grid)) >= -1e-15)
    assert cc.sine_ratio_interval(1.5, torch.tensor([0.3]), torch.tensor([0.3]), torch.float32) is None


def test_the_feasible_scalar_interval_is_every_t_that_fits():
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((3, 500)))
    t = torch.tensor([0.25, -1.5, 3.0], dtype=torch.float64)
    allowed = torch.full_like(x, 1e-6)
    y = t.unsqueeze(-1) * x + torch.from_numpy(rng.uniform(-1e-6, 1e-6, x.shape))
    lo, hi = cc.feasible_scalar(y, x, allowed)
    assert bool(((lo <= t) & (t <= hi)).all())
    for row in range(3):  # each end is tight: just outside it some element exceeds its allowance
        for end, step in ((lo[row], -1e-9), (hi[row], 1e-9)):
            assert bool(((y[row] - (end + step) * x[row]).abs() > allowed[row]).any())


def test_a_merge_without_a_finite_interval_is_held_to_the_tolerance():
    torch.manual_seed(0)
    base = torch.randn(64, 32)
    other = base + 0.1 * torch.randn(64, 32)
    slerp = METHODS["slerp"]
    merged = slerp.merge(base, [other], {}, {"t": 0.3})
    inside = check_tensor(slerp, base, [other], {}, {"t": 0.3}, merged=merged)
    assert inside.certified and inside.coefficient_width is not None
    assert float(inside.ratio(merged, merged.dtype, torch.float32).max()) <= 1
    beyond = slerp.merge(base, [other], {}, {"t": 1.4})  # extrapolation: sin(sθ)/sin θ is not monotone there
    outside = check_tensor(slerp, base, [other], {}, {"t": 1.4}, merged=beyond)
    assert not outside.certified and float(outside.ratio(beyond, beyond.dtype, torch.float32).max()) <= 1


@pytest.mark.parametrize("method", ["slerp", "nuslerp", "model_stock"])
def test_the_check_certifies_the_float32_merge_and_rejects_a_nudged_coefficient(method):
    torch.manual_seed(1)
    base = torch.randn(48, 40) * 0.02
    inputs = [base + 0.01 * (i + 1) * torch.randn(48, 40) for i in range(2 if method != "model_stock" else 3)]
    per_model = {"weight": [0.4, 0.6]} if method == "nuslerp" else {}
    shared = {"t": 0.35} if method == "slerp" else \
        {"nuslerp_row_wise": False, "nuslerp_flatten": False} if method == "nuslerp" else {"filter_wise": False}
    m = METHODS[method]
    merged = m.merge(base, inputs, per_model, shared)
    check = check_tensor(m, base, inputs, per_model, shared, merged=merged)
    assert check.certified and float(check.ratio(merged, merged.dtype, torch.float32).max()) <= 1
    assert 0 < check.coefficient_width < 0.05
    # the merge moved off the base by a relative 3× the coefficients' interval: no admissible coefficient explains it
    nudged = merged + 3 * check.coefficient_width * (merged - base)
    check = check_tensor(m, base, inputs, per_model, shared, merged=nudged)
    assert float(check.ratio(nudged, nudged.dtype, torch.float32).max()) > 1
