"""Chunked distribution statistics against NumPy's one-shot formulas (groundwork for issue 4's analyze)."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratv.numerics.moments import Moments, quantiles, ulp_histogram


def _numpy_moments(x):
    mu = x.mean()
    c = x - mu
    var = (c**2).mean()
    return mu, np.sqrt(var), (c**3).mean() / var**1.5, (c**4).mean() / var**2 - 3


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 3000), cuts=st.lists(st.integers(1, 2999), max_size=6),
       offset=st.sampled_from([0.0, 1e3, -7.5]), scale=st.sampled_from([1e-6, 1.0, 50.0]))
def test_chunked_moments_equal_one_shot_numpy(seed, n, cuts, offset, scale):
    rng = np.random.default_rng(seed)
    x = offset + scale * rng.standard_gamma(2.0, n)  # skewed, with a large offset to punish naive power sums
    m = Moments()
    bounds = sorted({0, n, *[c for c in cuts if c < n]})
    for a, b in zip(bounds, bounds[1:]):
        m.add(torch.from_numpy(x[a:b]))
    mu, sd, skew, kurt = _numpy_moments(x)
    # centring x ≈ offset loses log10(|offset|/scale) digits in any float64 method, NumPy's included
    conditioning = 1e-9 + 100 * np.finfo(np.float64).eps * (abs(offset) + scale) / scale
    assert m.count == n
    assert m.mean == pytest.approx(mu, rel=1e-12, abs=1e-12 * scale)
    assert m.std == pytest.approx(sd, rel=conditioning)
    assert m.skewness == pytest.approx(skew, rel=conditioning, abs=conditioning)
    assert m.excess_kurtosis == pytest.approx(kurt, rel=conditioning, abs=conditioning)
    assert m.minimum == x.min() and m.maximum == x.max()


def test_quantiles_exact_and_sampled():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10001)
    got = quantiles(torch.from_numpy(x))
    assert got["exact"]
    for q, v in got["values"].items():
        assert v == pytest.approx(float(np.quantile(x, float(q))), rel=1e-12)
    sampled = quantiles(torch.from_numpy(x), max_exact=1000)
    assert not sampled["exact"]
    assert sampled["values"]["0.5"] == pytest.approx(float(np.median(x)), abs=0.1)


def test_ulp_histogram_bins():
    h = ulp_histogram(torch.tensor([0.0, 0.3, -0.5, 0.75, 1.0, 3.0, 1e9]))
    assert sum(h["counts"]) == 7
    assert h["counts"][:5] == [1, 1, 2, 1, 1] and h["counts"][-1] == 1


def test_empty_and_constant_inputs():
    m = Moments()
    m.add(torch.empty(0))
    assert m.count == 0 and np.isnan(m.std)
    m.add(torch.full((5,), 2.0))
    assert m.std == 0.0 and np.isnan(m.skewness) and np.isnan(m.excess_kurtosis)


def test_merge_of_separate_statistics_is_the_statistics_of_the_union():
    """Per-kind statistics are merged from per-tensor ones: the result must be NumPy's on the concatenation."""
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(n, generator=gen, dtype=torch.float64) * s + m
             for n, s, m in ((1000, 1e-3, 5e-3), (17, 2.0, -1.0), (4096, 1e-9, 0.0))]
    merged = Moments()
    for p in parts:
        one = Moments()
        one.add(p)
        merged.merge(one)
    merged.merge(Moments())  # an empty set changes nothing
    x = torch.cat(parts).numpy()
    c = x - x.mean()
    m2, m3, m4 = (c**2).mean(), (c**3).mean(), (c**4).mean()
    assert merged.count == x.size
    assert merged.mean == pytest.approx(x.mean(), rel=1e-12)
    assert merged.std == pytest.approx(np.sqrt(m2), rel=1e-12)
    assert merged.skewness == pytest.approx(m3 / m2**1.5, rel=1e-9)
    assert merged.excess_kurtosis == pytest.approx(m4 / m2**2 - 3, rel=1e-9)
    assert (merged.minimum, merged.maximum) == (x.min(), x.max())
