"""spectrum.py against NumPy's dense SVD and known spectra (groundwork for issue 4's analyze --spectrum)."""

import math

import numpy as np
import pytest
import torch

from loratv.numerics.lowrank import Factors
from loratv.numerics.spectrum import (
    effective_rank,
    exact_spectrum,
    lora_spectrum,
    numerical_rank,
    principal_angles,
    randomized_spectrum,
    stable_rank,
)


def _orthonormal(rng, n, k):
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def test_lora_spectrum_equals_dense_svd_with_two_modules_in_both_orientations():
    rng = np.random.default_rng(0)
    m, n = 40, 30
    a1, b1 = rng.standard_normal((4, n)), rng.standard_normal((m, 4))  # linear: ΔW = s·B@A
    a2, b2 = rng.standard_normal((3, m)), rng.standard_normal((n, 3))  # transposed: ΔW = (s·B@A)ᵀ
    parts = [Factors.from_lora(torch.from_numpy(a1), torch.from_numpy(b1), 2.0, False),
             Factors.from_lora(torch.from_numpy(a2), torch.from_numpy(b2), -0.5, True)]
    dense = 2.0 * b1 @ a1 + (-0.5 * b2 @ a2).T
    spec = lora_spectrum(parts)
    expected = np.linalg.svd(dense, compute_uv=False)
    assert spec.s.numel() == 7
    assert np.allclose(spec.s.numpy(), expected[:7], rtol=1e-12, atol=1e-12 * expected[0])
    assert np.all(expected[7:] < 1e-12 * expected[0])  # the rank really is 4 + 3
    assert np.allclose((spec.u * spec.s) @ spec.v.T, dense, atol=1e-12 * expected[0])
    assert np.allclose(spec.u.T @ spec.u, np.eye(7), atol=1e-12)
    assert np.allclose(spec.v.T @ spec.v, np.eye(7), atol=1e-12)
    assert spec.frobenius == pytest.approx(np.linalg.norm(dense), rel=1e-12)
    assert spec.energy == pytest.approx(1.0, rel=1e-12)


def test_randomized_spectrum_recovers_a_known_spectrum_and_its_exact_residual():
    rng = np.random.default_rng(1)
    m, n, k = 300, 200, 10
    s_true = 0.7 ** np.arange(min(m, n))
    a = _orthonormal(rng, m, n) * s_true @ _orthonormal(rng, n, n).T
    spec = randomized_spectrum(torch.from_numpy(a), k, oversample=10, power_iterations=3)
    assert np.allclose(spec.s.numpy(), s_true[:k], rtol=1e-8)
    assert spec.residual == pytest.approx(float(np.sqrt((s_true[k:] ** 2).sum())), rel=1e-6)
    approx = (spec.u.numpy() * spec.s.numpy()) @ spec.v.numpy().T
    assert spec.residual == pytest.approx(float(np.linalg.norm(a - approx)), rel=1e-12)
    assert spec.energy == pytest.approx(float((s_true[:k] ** 2).sum() / (s_true**2).sum()), rel=1e-8)


def test_exact_spectrum_matches_numpy():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((20, 12))
    spec = exact_spectrum(torch.from_numpy(a), k=5)
    s = np.linalg.svd(a, compute_uv=False)
    assert np.allclose(spec.s.numpy(), s[:5], rtol=1e-12)
    assert spec.residual == pytest.approx(float(np.sqrt((s[5:] ** 2).sum())), rel=1e-12)


def test_numerical_rank_of_a_lora_merged_task_vector_is_r_above_the_rounding_floor():
    """An fp32 merge of a rank-8 LoRA: T = fp32(W + ΔW) − W has rank 8 plus rounding noise, and the noise floor
    (the Frobenius norm of half an ulp of every merged weight) separates the two."""
    rng = np.random.default_rng(3)
    m, n, r = 256, 192, 8
    w = (0.02 * rng.standard_normal((m, n))).astype(np.float32)
    a = (0.05 * rng.standard_normal((r, n))).astype(np.float32)
    b = (0.01 * rng.standard_normal((m, r))).astype(np.float32)
    delta = 2.0 * (b.astype(np.float64) @ a.astype(np.float64))
    merged = (w.astype(np.float64) + delta).astype(np.float32)
    t = merged.astype(np.float64) - w.astype(np.float64)
    s = exact_spectrum(torch.from_numpy(t)).s
    floor = float(np.linalg.norm(0.5 * np.spacing(np.abs(merged)).astype(np.float64)))
    assert numerical_rank(s, floor) == r
    assert float(s[r - 1]) > 100 * floor > float(s[r])


def test_rank_summaries_on_known_spectra():
    flat = torch.ones(4, dtype=torch.float64)
    assert effective_rank(flat) == pytest.approx(4.0)
    assert stable_rank(flat) == pytest.approx(4.0)
    spike = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    assert effective_rank(spike) == pytest.approx(1.0)
    assert stable_rank(spike) == pytest.approx(1.0)
    s = torch.tensor([2.0, 1.0], dtype=torch.float64)
    p = np.array([2 / 3, 1 / 3])
    assert effective_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert stable_rank(s) == pytest.approx(5 / 4)


def test_principal_angles():
    rng = np.random.default_rng(4)
    basis = _orthonormal(rng, 10, 4)
    mixed = basis @ rng.standard_normal((4, 4))  # the same space, other coordinates
    assert np.allclose(principal_angles(torch.from_numpy(basis), torch.from_numpy(mixed)).numpy(), 0.0, atol=1e-7)
    e = np.eye(6)
    angles = principal_angles(torch.from_numpy(e[:, :2]), torch.from_numpy(e[:, 2:4])).numpy()
    assert np.allclose(angles, np.pi / 2)
    # one shared direction and one at 60 degrees
    x = np.stack([e[:, 0], e[:, 1]], axis=1)
    y = np.stack([e[:, 0], 0.5 * e[:, 1] + math.sqrt(3) / 2 * e[:, 2]], axis=1)
    assert np.allclose(np.sort(principal_angles(torch.from_numpy(x), torch.from_numpy(y)).numpy()), [0.0, np.pi / 3],
                       atol=1e-7)


def _lowrank_plus_noise(rng, m, n, r, noise):
    a = rng.standard_normal((r, n))
    b = rng.standard_normal((m, r))
    return b @ a + noise * rng.standard_normal((m, n))


@pytest.mark.parametrize("exact_max_dim", [2048, 8])  # exact SVD, then the randomized path
def test_truncate_recovers_the_rank_and_reports_the_error_it_makes(exact_max_dim):
    from loratv.numerics.spectrum import truncate

    rng = np.random.default_rng(5)
    t = _lowrank_plus_noise(rng, 60, 40, 5, 1e-9)
    total = np.linalg.norm(t)
    for kwargs in ({"max_error": 1e-6}, {"energy": 0.999999}, {"rank": 5}):
        cut = truncate(torch.from_numpy(t), exact_max_dim=exact_max_dim, **kwargs)
        assert cut.rank == 5, kwargs
        assert cut.b.shape == (60, 5) and cut.a.shape == (5, 40)
        residual = np.linalg.norm(t - cut.b.numpy() @ cut.a.numpy())
        assert cut.error == pytest.approx(residual, rel=1e-9)
        assert cut.relative_error == pytest.approx(residual / total, rel=1e-9)
        stored = cut.b.numpy().astype(np.float32).astype(np.float64) @ cut.a.numpy().astype(np.float32).astype(np.float64)
        assert cut.stored_error == pytest.approx(np.linalg.norm(t - stored), rel=1e-9)
        assert cut.stored_error >= cut.error * (1 - 1e-12)
    # the balanced split: both factors carry √σ
    assert np.allclose(np.linalg.norm(cut.b.numpy(), axis=0), np.linalg.norm(cut.a.numpy(), axis=1))


def test_truncate_energy_and_error_criteria_pick_the_smallest_rank():
    from loratv.numerics.spectrum import truncate

    rng = np.random.default_rng(6)
    s = np.array([10.0, 5.0, 2.0, 1.0, 0.5])
    t = _orthonormal(rng, 30, 5) * s @ _orthonormal(rng, 20, 5).T
    energies = np.cumsum(s**2) / (s**2).sum()
    for k in range(1, 5):
        assert truncate(torch.from_numpy(t), energy=float(energies[k - 1])).rank == k
        tail = np.sqrt((s[k:] ** 2).sum()) / np.sqrt((s**2).sum())
        assert truncate(torch.from_numpy(t), max_error=float(tail) * (1 + 1e-9)).rank == k
    assert truncate(torch.from_numpy(np.zeros((4, 3))), energy=0.9).rank == 0
