"""ulp and cast-artifact facts against NumPy's np.spacing and hand-checked bit patterns."""

import numpy as np
import pytest
import torch

from loratv.numerics.precision import is_cast_artifact, ulp


@pytest.mark.parametrize("np_dtype, dtype", [(np.float32, torch.float32), (np.float16, torch.float16)])
def test_ulp_equals_numpy_spacing(np_dtype, dtype):
    values = np.array([1.0, -1.0, 0.75, 3e-3, -1234.5, 6e-8, 0.0], dtype=np_dtype)
    got = ulp(torch.from_numpy(values.astype(np.float64)), dtype).numpy()
    expected = np.spacing(np.abs(values)).astype(np.float64)
    assert np.array_equal(got, expected)


def test_bf16_ulp_of_one_is_two_to_minus_seven():
    assert ulp(torch.tensor([1.0, 1.5]), torch.bfloat16).tolist() == [2.0**-7, 2.0**-7]


def test_cast_artifact_is_bit_exact():
    base = torch.tensor([0.1, 0.2, 1.0 / 3.0], dtype=torch.float32)
    assert is_cast_artifact(base.to(torch.float16), base)
    nudged = base.to(torch.float16).clone()
    nudged[1] = torch.nextafter(nudged[1], torch.tensor(1.0, dtype=torch.float16))
    assert not is_cast_artifact(nudged, base)
    exact = torch.tensor([0.5, 0.25], dtype=torch.float32)  # representable in fp16: casting changes nothing
    assert not is_cast_artifact(exact.to(torch.float16), exact)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("autocast", [True, False], ids=["cast-first", "cast-all"])
def test_merge_error_bound_covers_both_peft_merges_on_a_16_bit_model(dtype, autocast):
    """PEFT's merges on a model loaded in `dtype`, written out in torch (not loratv's merge): the base rounded first,
    then two deltas added in place — fp32 deltas (one Linear-like, one rounded to d first like an Embedding's) or,
    without autocast, deltas from rounded factors rounded to d. Every element stays within merge_error_bound, on
    weights spanning cancellation, deltas far below an ulp of W, and subnormal results."""
    from loratv.numerics.precision import merge_error_bound

    g = torch.Generator().manual_seed(11)
    n, r, s = 4096, 8, 1.7
    w = torch.randn(n, generator=g) * torch.logspace(-6, 0, n)
    factors = [(torch.randn(n, r, generator=g) * torch.logspace(-5, -1, n)[:, None], torch.randn(r, 1, generator=g))
               for _ in range(2)]
    w[::7] = -(factors[0][0][::7] @ factors[0][1]).squeeze(1) * s  # W ≈ −ΔW₁: cancellation
    m = w.to(dtype)
    exact = w.double().clone()
    g_abs = torch.zeros(n, dtype=torch.float64)
    for i, (b, a) in enumerate(factors):
        exact += s * (b.double() @ a.double()).squeeze(1)
        g_abs += abs(s) * (b.double().abs() @ a.double().abs()).squeeze(1)
        if autocast:
            delta = (b @ a).squeeze(1) * s
            m += delta.to(dtype) if i == 1 else delta  # fp32 into a 16-bit weight: summed in fp32, rounded to d
        else:
            m += ((b.to(dtype).float() @ a.to(dtype).float()).squeeze(1) * s).to(dtype)
    bound = merge_error_bound(w.double(), m.double(), g_abs, additions=2, k=r + 2, base_dtype=torch.float32,
                              out_dtype=dtype)
    error = (m.double() - exact).abs()
    assert bool((error <= bound).all()), float((error / bound).max())
    assert float((error / bound).max()) > 0.1  # and the bound is not vacuous
