"""ulp and cast-artifact facts against NumPy's np.spacing and hand-checked bit patterns."""

import numpy as np
import pytest
import torch

from loratv.precision import is_cast_artifact, ulp


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
