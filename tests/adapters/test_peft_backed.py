"""adapters/peft_backed.py and the kinds built on it (adapters/kinds/peft_backed.py): one module at a time through
PEFT's own layer code, against PEFT's merge_and_unload of the whole model (the oracle), for every tuner PEFT merges
that loratv has no formula for, in fp32 and bf16 — the engine on PEFT's MLP, and `loratv merge` on tiny StarCoder2
(biases everywhere) and Llama models.

The model is the small MLP of PEFT's own custom-model tests; every adapter parameter gets a seeded random value so
that no merge is trivially the identity."""

import json
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from helpers_io import assert_nothing_at, assert_one_line_error, run_cli
from loratv.adapters.kinds.peft_backed import TUNERS as REGISTERED
from loratv.adapters.peft_backed import peft_merged_module
from loratv.errors import BadInputError, UnsupportedAdapterError
from tiny_models import build_base, load_model, peft_merged_state

peft = pytest.importorskip("peft")

# tuner -> config kwargs sized for the MLP below (PEFT's defaults are sized for large layers)
TUNERS = {
    "BOFT": {"boft_block_size": 4}, "HRA": {"r": 4}, "FOURIERFT": {"n_frequency": 50},
    "VBLORA": {"r": 2, "vector_length": 16, "num_vectors": 16}, "RANDLORA": {"r": 4}, "C3A": {"block_size": 16},
    "DELORA": {}, "GLORA": {}, "GRALORA": {}, "HIRA": {}, "MISS": {"r": 8}, "PSOFT": {"r": 8}, "PVERA": {"r": 4},
    "ROAD": {"group_size": 16}, "SHIRA": {"r": 2}, "TINYLORA": {}, "UNILORA": {}, "WAVEFT": {"n_frequency": 50},
    "LN_TUNING": {}, "BEFT": {}, "DEFT": {}, "FROD": {}, "PEANUT": {}, "SUPERTUNING": {},
    "TRAINABLE_TOKENS": {"token_indices": [1, 5, 7]}, "OSF": {},
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


# ---------------------------------------------------------------- `loratv merge` on transformers models


def _model_adapter(base, folder, tuner: str, dtype: torch.dtype, targets=("q_proj", "v_proj")):
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PEFT_TYPE_TO_CONFIG_MAPPING[tuner](target_modules=list(targets), **TUNERS[tuner])
        model = get_peft_model(load_model(base, dtype), config)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_((0.05 * torch.randn(p.shape, generator=gen)).to(p.dtype))
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_backed_bases")
    return {(kind, dtype): build_base(kind, root / f"{kind}-{str(dtype)[6:]}", dtype=dtype)
            for kind in ("starcoder2", "llama", "gpt2") for dtype in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tuner", list(REGISTERED))
def test_loratv_merge_is_merge_and_unload_bit_for_bit(tuner, dtype, bases, tmp_path, capsys):
    base = bases[("starcoder2", dtype)]
    adapter = _model_adapter(base, tmp_path / "adapter", tuner, dtype)
    # HRA's default merge is its own float64 evaluation (tests/adapters/test_hra.py); PEFT's bits on request
    flags = ["--peft-arithmetic"] if tuner == "HRA" else []
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged", *flags)
    assert rc == 0, err
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = peft_merged_state(base, adapter, dtype)
    original = load_file(str(base / "model.safetensors"))
    changed = {n for n in got if not torch.equal(got[n], original[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed), sorted(changed)
    for name, value in got.items():
        assert value.dtype == want[name].dtype and torch.equal(value, want[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trainable_tokens_on_tied_embeddings(dtype, bases, tmp_path, capsys):
    """Standalone TrainableTokens on StarCoder2's tied embed_tokens: the rows PEFT trained, bit for bit."""
    base = bases[("starcoder2", dtype)]
    adapter = _model_adapter(base, tmp_path / "adapter", "TRAINABLE_TOKENS", dtype, targets=("embed_tokens",))
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged")
    assert rc == 0, err
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = peft_merged_state(base, adapter, dtype)
    original = load_file(str(base / "model.safetensors"))
    name = "model.embed_tokens.weight"
    changed_rows = (got[name] != original[name]).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == [1, 5, 7]
    assert all(torch.equal(v, want[n]) for n, v in got.items())


def test_merge_without_biases_and_inspect(bases, tmp_path, capsys):
    base = bases[("llama", torch.float32)]
    adapter = _model_adapter(base, tmp_path / "adapter", "HRA", torch.float32)
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged",
                         "--peft-arithmetic")
    assert rc == 0, err
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = peft_merged_state(base, adapter, torch.float32)
    assert all(torch.equal(v, want[n]) for n, v in got.items())
    rc, out, err = run_cli(capsys, "inspect", adapter, "--json")
    assert rc == 0, err
    record = json.loads(out)
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    assert record["peft_type"] == "HRA" and record["ranks"] == {"4": 4} and len(record["modules"]) == 4
    assert record["stored_parameters"] == sum(t.numel() for t in stored.values())


def _write(folder, state: dict, base):
    """`state`'s tensors that the base stores, as a model folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    names = load_file(str(base / "model.safetensors"))
    save_file({k: v.contiguous().clone() for k, v in state.items() if k in names}, str(folder / "model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compare_holds_peft_merges_to_a_stated_tolerance_and_catches_a_planted_error(dtype, bases, tmp_path, capsys):
    """PEFT's own merge_and_unload output is EQUIVALENT within tolerance (never certified); one element moved by
    a few of its ulps past the tolerance is NOT EQUIVALENT and named."""
    base = bases[("llama", dtype)]
    adapter = _model_adapter(base, tmp_path / "adapter", "BOFT", dtype)
    merged = peft_merged_state(base, adapter, dtype)
    _write(tmp_path / "peft", merged, base)
    rc, out, err = run_cli(capsys, "compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "peft",
                           "-o", tmp_path / "cmp")
    assert rc == 0, err
    record = json.loads((tmp_path / "cmp" / "comparison_results.json").read_text())
    summary = record["summary"]
    assert summary["verdict"] == "EQUIVALENT within tolerance" and not summary["certified"]
    assert summary["uncertified_tensors"] == 4 and summary["max_tolerance_ratio"] <= 1
    assert any("no rounding bound" in r for r in summary["reasons"])
    targeted = [t for t in record["tensors"] if t["targeted"]]
    assert all(t["certificate_ratio"] is None and t["tolerance_ratio"] is not None for t in targeted)
    # the text report and report.html say which limit applies, and that it is not a certificate
    text = (tmp_path / "cmp" / "detailed_comparison_report.txt").read_text()
    assert "max tolerance ratio" in text and "4 tensors with no derived bound" in text and "(tol)" in text
    html = (tmp_path / "cmp" / "report.html").read_text()
    assert "Max tolerance ratio" in html and "Equivalent, not certified" in html

    name = "model.layers.1.self_attn.q_proj.weight"
    row = next(t for t in targeted if t["name"] == name)
    tolerance = row["max_abs_diff"] / row["tolerance_ratio"] if row["tolerance_ratio"] else row["reference_error"] * 4
    planted = dict(merged)
    planted[name] = merged[name].clone()
    planted[name][3, 5] += 3 * max(tolerance, torch.finfo(dtype).eps * float(merged[name][3, 5].abs()) * 4)
    _write(tmp_path / "planted", planted, base)
    rc, out, err = run_cli(capsys, "compare", "--base", base, "--adapter", adapter, "--finetuned",
                           tmp_path / "planted", "-o", tmp_path / "cmp2")
    assert rc == 1, err
    record = json.loads((tmp_path / "cmp2" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "NOT EQUIVALENT"
    assert record["summary"]["worst_tensors"][0] == name
    assert next(t for t in record["tensors"] if t["name"] == name)["worst_element"] == [3, 5]
    text = (tmp_path / "cmp2" / "detailed_comparison_report.txt").read_text()
    assert "× its tolerance (no rounding bound is derived) at element [3, 5]" in text
    assert f"{name} at element [3, 5]" in out and "× the tolerance (no derived bound)" in out  # the CLI's summary


def test_a_gpt2_conv1d_target_merges_bit_identical(bases, tmp_path, capsys):
    """transformers' Conv1D (GPT-2's c_attn, stored transposed) is wrapped by PEFT's own Conv1D code."""
    base = bases[("gpt2", torch.float32)]
    adapter = _model_adapter(base, tmp_path / "adapter", "HIRA", torch.float32, targets=("c_attn",))
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged")
    assert rc == 0, err
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    want = peft_merged_state(base, adapter, torch.float32)
    assert any(not torch.equal(got[n], load_file(str(base / "model.safetensors"))[n]) for n in got)
    assert all(torch.equal(v, want[n]) for n, v in got.items())


def test_a_layer_peft_cannot_wrap_is_refused_in_one_sentence(bases, tmp_path, capsys):
    """PEFT has no HRA layer for transformers' Conv1D: the refusal is one sentence naming the tuner and the
    module, and nothing is written."""
    from safetensors.torch import save_file

    base = bases[("gpt2", torch.float32)]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "HRA", "r": 4, "target_modules": ["c_attn"]}))
    width = load_file(str(base / "model.safetensors"))["transformer.h.0.attn.c_attn.weight"].shape[0]
    save_file({f"base_model.model.transformer.h.{i}.attn.c_attn.hra_u": torch.randn(width, 4) for i in range(2)},
              str(adapter / "adapter_model.safetensors"))
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged")
    assert_one_line_error(rc, err, "HRA", "c_attn")
    assert_nothing_at(tmp_path / "merged")


def test_without_peft_merge_names_the_extra(bases, tmp_path, capsys, monkeypatch):
    base = bases[("llama", torch.float32)]
    adapter = _model_adapter(base, tmp_path / "adapter", "HRA", torch.float32)
    monkeypatch.setitem(sys.modules, "peft", None)
    monkeypatch.setitem(sys.modules, "peft.mapping", None)
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged")
    assert_one_line_error(rc, err, "pip install 'loratv[peft]'")
    assert_nothing_at(tmp_path / "merged")


def test_commands_on_lora_factors_refuse_in_one_sentence(bases, tmp_path, capsys):
    """convert and analyze need LoRA factors: one sentence, exit 2, and it names only the commands that take it."""
    base = bases[("llama", torch.float32)]
    adapter = _model_adapter(base, tmp_path / "adapter", "HRA", torch.float32)
    rc, _, err = run_cli(capsys, "convert", adapter, "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert_one_line_error(rc, err, "HRA", "convert", "merge, compare, validate and inspect")
    assert_nothing_at(tmp_path / "k.safetensors")
    rc, _, err = run_cli(capsys, "analyze", "--base", base, "--adapter", adapter, "--finetuned", base, "-o",
                         tmp_path / "a")
    assert_one_line_error(rc, err, "HRA", "analyze", "merge, compare, validate and inspect")
    assert_nothing_at(tmp_path / "a")
