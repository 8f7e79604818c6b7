"""adapters/peft_backed.py: one module at a time through PEFT's own layer code, against PEFT's merge_and_unload of
the whole model (the oracle), for every tuner PEFT merges that loratv has no formula for, in fp32 and bf16.

The model is the small MLP of PEFT's own custom-model tests; every adapter parameter gets a seeded random value so
that no merge is trivially the identity."""

import json
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from loratv.adapters.peft_backed import peft_merged_module
from loratv.errors import BadInputError, UnsupportedAdapterError

peft = pytest.importorskip("peft")

# tuner -> config kwargs sized for the MLP below (PEFT's defaults are sized for large layers)
TUNERS = {
    "BOFT": {"boft_block_size": 4}, "HRA": {"r": 4}, "FOURIERFT": {"n_frequency": 50},
    "VBLORA": {"r": 2, "vector_length": 16, "num_vectors": 16}, "RANDLORA": {"r": 4}, "C3A": {"block_size": 16},
    "DELORA": {}, "GLORA": {}, "GRALORA": {}, "HIRA": {}, "MISS": {"r": 8}, "PSOFT": {"r": 8}, "PVERA": {"r": 4},
    "ROAD": {"group_size": 16}, "SHIRA": {"r": 2}, "TINYLORA": {}, "UNILORA": {}, "WAVEFT": {"n_frequency": 50},
    "LN_TUNING": {}, "BEFT": {}, "DEFT": {}, "FROD": {}, "PEANUT": {}, "SUPERTUNING": {},
}
SHAPES = {"lin0": (128, 64), "lin1": (64, 128)}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(64, 128)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(128, 64)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


def _adapter(tuner: str, dtype: torch.dtype, folder):
    """(base state dict, adapter config dict, adapter tensors, PEFT's merged state dict)."""
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    torch.manual_seed(0)
    base = MLP().to(dtype)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, PEFT_TYPE_TO_CONFIG_MAPPING[tuner](target_modules=list(SHAPES), **TUNERS[tuner]))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
        merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    config = json.loads((folder / "adapter_config.json").read_text())
    return state, config, load_file(str(folder / "adapter_model.safetensors")), merged


def _layers(state: dict, module: str, dtype: torch.dtype) -> dict:
    layers = {}
    for name, (out_features, in_features) in SHAPES.items():
        layer = nn.Linear(in_features, out_features, dtype=dtype, device="cpu" if name == module else "meta")
        if name == module:
            with torch.no_grad():
                layer.weight.copy_(state[f"{name}.weight"])
                layer.bias.copy_(state[f"{name}.bias"])
        layers[name] = layer
    return layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tuner", list(TUNERS))
def test_each_module_merges_bit_identical_to_merge_and_unload(tuner, dtype, tmp_path):
    state, config, tensors, want = _adapter(tuner, dtype, tmp_path)
    for module in SHAPES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = peft_merged_module(config, _layers(state, module, dtype), module, tensors)
        assert not torch.equal(want[f"{module}.weight"], state[f"{module}.weight"]) or tuner in ("LN_TUNING", "BEFT"), \
            "the oracle changed nothing: the test would prove nothing"
        for param in ("weight", "bias"):
            assert got[param].dtype == dtype
            assert torch.equal(got[param], want[f"{module}.{param}"]), (tuner, module, param)


def test_a_tensor_of_another_shape_is_one_sentence(tmp_path):
    state, config, tensors, _ = _adapter("HRA", torch.float32, tmp_path)
    key = next(k for k in tensors if ".lin0." in k)
    tensors[key] = torch.zeros(3, 3)
    with pytest.raises(BadInputError, match="do not fit PEFT's layer") as info:
        peft_merged_module(config, _layers(state, "lin0", torch.float32), "lin0", tensors, source="adapter.safetensors")
    assert "adapter.safetensors" in str(info.value) and "\n" not in str(info.value)


def test_without_peft_the_refusal_names_the_extra(tmp_path, monkeypatch):
    state, config, tensors, _ = _adapter("HRA", torch.float32, tmp_path)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UnsupportedAdapterError, match=r"pip install 'loratv\[peft\]'"):
        peft_merged_module(config, _layers(state, "lin0", torch.float32), "lin0", tensors)
