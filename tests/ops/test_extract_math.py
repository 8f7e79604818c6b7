"""The task-vector arithmetic against independent oracles: NumPy's IEEE float32 subtraction and exact fractions."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from loratv.ops.extract import TensorStats, _stored_difference


def _pairs(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal(n) * 0.02).astype(np.float32)
    ft = base + (rng.standard_normal(n) * 0.003).astype(np.float32)
    # wide exponent gaps (the cases where a float64 subtraction would round), zeros, equal values, subnormals
    base[:50] = np.float32(1e-30)
    ft[50:100] = np.float32(3e-38) * np.float32(1e-3)
    base[100:150] = ft[100:150]
    base[150:160] = 0
    ft[160:170] = np.float32(2**-149)
    return base, ft.astype(np.float32)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_float32_storage_is_correctly_rounded_and_counted(input_dtype):
    base_np, ft_np = _pairs()
    base = torch.from_numpy(base_np).to(input_dtype)
    ft = torch.from_numpy(ft_np).to(input_dtype)
    stats = TensorStats("t", tuple(base.shape), "F32", "F32", "F32")
    stored = _stored_difference(base, ft, "F32", stats)

    b64 = base.to(torch.float64).numpy()
    f64 = ft.to(torch.float64).numpy()
    # NumPy's float32 subtraction of float32 operands is correctly rounded (IEEE 754): the oracle for each element
    expected = f64.astype(np.float32) - b64.astype(np.float32)
    assert np.array_equal(stored.numpy(), expected)

    exact = [Fraction(float(f)) - Fraction(float(b)) for f, b in zip(f64, b64)]
    rounded = sum(Fraction(float(s)) != e for s, e in zip(stored.numpy(), exact))
    assert stats.rounded_elements == rounded
    assert stats.nonzero == sum(e != 0 for e in exact)
    assert stats.max_abs == pytest.approx(max(abs(float(e)) for e in exact), rel=2**-23)
    assert stats.sumsq == pytest.approx(float(sum(e * e for e in exact)), rel=1e-12)
    # the 50 weights of 1e-30 that moved by ~0.02 need ~80 bits; fp16 flushes 1e-30 to zero, so nothing rounds there
    assert (rounded >= 50) if input_dtype != torch.float16 else (rounded == 0)


def test_float64_storage_counts_inexact_subtractions():
    base = torch.tensor([1.0, 2.0**-60 * (1 + 2**-23), 0.5, 3.0], dtype=torch.float32)
    ft = torch.tensor([1.0 + 2**-23, 1.0, 0.25, 3.0], dtype=torch.float32)
    stats = TensorStats("t", (4,), "F32", "F32", "F64")
    stored = _stored_difference(base, ft, "F64", stats)
    exact = [Fraction(float(f)) - Fraction(float(b)) for f, b in zip(ft.double(), base.double())]
    inexact = sum(Fraction(float(s)) != e for s, e in zip(stored, exact))
    assert inexact == 1  # 1 − 2^-60·(1 + 2^-23) needs 84 bits
    assert stats.inexact_subtractions == inexact
    assert stats.nonzero == 3


def test_chunked_and_second_pass_paths_equal_numpy(example_dir, tmp_path, monkeypatch):
    """Tiny read chunks and a tiny keep limit force the multi-chunk read-ahead and the second pass."""
    import loratv.ops.extract as extract_module
    from safetensors.numpy import load_file

    from loratv.ops.merge import merge

    merged = tmp_path / "merged"
    merge(example_dir / "base", example_dir / "adapter", merged, precision="fp16")
    monkeypatch.setattr(extract_module, "READ_BYTES", 4096)
    monkeypatch.setattr(extract_module, "KEEP_BYTES", 1024)
    extract_module.extract(example_dir / "base", merged, tmp_path / "tv", dense=True)

    base = load_file(example_dir / "base" / "model.safetensors")
    ft = load_file(merged / "model.safetensors")
    tv = load_file(tmp_path / "tv" / "task_vector.safetensors")
    assert set(tv) == set(base)
    for name, b in base.items():
        assert np.array_equal(tv[name], ft[name].astype(np.float32) - b), name
