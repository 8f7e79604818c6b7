"""Factored LoRA inner products and norms against dense float64 NumPy (the oracle)."""

import numpy as np
import pytest
import torch

from loratv.numerics.lowrank import factored_inner, factored_norm_sq


@pytest.mark.parametrize("m, n, r", [(64, 48, 8), (7, 300, 1), (128, 128, 16)])
def test_factored_products_equal_dense_float64(m, n, r):
    rng = np.random.default_rng(m * n + r)
    a = rng.standard_normal((r, n)).astype(np.float32)
    b = rng.standard_normal((m, r)).astype(np.float32)
    t = rng.standard_normal((m, n)).astype(np.float32)
    scale = 16 / np.sqrt(r)
    dense = scale * (b.astype(np.float64) @ a.astype(np.float64))
    got_inner = factored_inner(torch.from_numpy(a), torch.from_numpy(b), scale, torch.from_numpy(t))
    got_norm = factored_norm_sq(torch.from_numpy(a), torch.from_numpy(b), scale)
    assert got_inner == pytest.approx(float((dense * t.astype(np.float64)).sum()), rel=1e-12)
    assert got_norm == pytest.approx(float((dense * dense).sum()), rel=1e-12)


def test_norm_of_a_rank_one_delta_is_exact():
    a = torch.tensor([[3.0, 4.0]])  # |a| = 5
    b = torch.tensor([[1.0], [2.0], [2.0]])  # |b| = 3
    assert factored_norm_sq(a, b, 2.0) == (2 * 5 * 3) ** 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compensated_pair_meets_its_bound_against_exact_rationals(dtype):
    from fractions import Fraction

    from loratv.numerics.lowrank import Factors
    from loratv.numerics.precision import gamma

    gen = torch.Generator().manual_seed(7)
    r, m, n = 6, 5, 7
    # terms of mixed sign and magnitude, so that plain float64 summation cancels and rounds
    a = (torch.randn(r, n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-8, 8, (r, 1), generator=gen)).to(dtype)
    b = torch.randn(m, r, generator=gen, dtype=torch.float64).to(dtype)
    scale = 16 / 2**0.5  # rsLoRA's s: not a power of two, so the multiply by s rounds
    f = Factors.from_lora(a, b, scale, transposed=False)
    high, low, scaled_error = f.rows_compensated_pair(0, m)
    g = f.abs_rows(0, m)
    u = 2.0**-53
    for i in range(m):
        for j in range(n):
            exact = Fraction(scale) * sum(Fraction(float(b[i, k])) * Fraction(float(a[k, j])) for k in range(r))
            err = abs(Fraction(float(high[i, j])) + Fraction(float(low[i, j])) - exact)
            bound = (2 * u * (abs(float(low[i, j])) + abs(float(scaled_error[i, j])))
                     + gamma(r, torch.float64) ** 2 * float(g[i, j]))
            assert err <= Fraction(bound) * (1 + 1e-12)
