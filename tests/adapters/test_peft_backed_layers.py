"""Every PEFT-backed tuner on the layer types of PEFT's own custom-model tests (Linear, nn.Conv1d/2d/3d, Embedding,
MultiheadAttention, and transformers' Conv1D in a GPT-2), in fp32 and bf16:

- `loratv merge` equals PEFT's merge_and_unload bit for bit (the oracle);
- `loratv compare` of PEFT's merged model is EQUIVALENT within tolerance, never certified;
- one element moved past its tolerance is NOT EQUIVALENT, and the element is named.

Where PEFT itself does not build a tuner on a layer type (it raises in get_peft_model), there is no adapter to
merge: the case is skipped with PEFT's reason. The custom models have no config.json, so loratv tells their
layers from the stored shapes and names (adapters/peft_layers.py); the GPT-2 one has a config and its layers come
from transformers."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helpers_io import run_cli
from loratv.adapters.kinds.peft_backed import TUNERS as REGISTERED
from tiny_models import build_base, load_model

peft = pytest.importorskip("peft")

# tuner -> config kwargs sized for these small layers (PEFT's defaults are sized for large ones)
OPTIONS = {
    "BOFT": {"boft_block_size": 4}, "HRA": {"r": 4}, "FOURIERFT": {"n_frequency": 20},
    "VBLORA": {"r": 2, "vector_length": 8, "num_vectors": 16}, "RANDLORA": {"r": 4}, "C3A": {"block_size": 8},
    "MISS": {"r": 4}, "PSOFT": {"r": 4}, "PVERA": {"r": 4}, "ROAD": {"group_size": 8}, "SHIRA": {"r": 2},
    "WAVEFT": {"n_frequency": 20}, "TRAINABLE_TOKENS": {"token_indices": [1, 5, 7]},
}


class Custom(nn.Module):
    """One layer named as in PEFT's custom models, after an identity so that the target is not the root."""

    def __init__(self, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == "linear":
            self.lin0 = nn.Linear(32, 48)
        elif layer_type == "emb":
            self.emb = nn.Embedding(40, 32)
        elif layer_type == "conv1d":
            self.conv1d = nn.Conv1d(8, 16, 3)
        elif layer_type == "conv2d":
            self.conv2d = nn.Conv2d(8, 16, 3)
        elif layer_type == "conv3d":
            self.conv3d = nn.Conv3d(4, 8, 3)
        elif layer_type == "mha":
            self.mha = nn.MultiheadAttention(32, 4)

    @property
    def target(self) -> str:
        return {"linear": "lin0"}.get(self.layer_type, self.layer_type)


def _randomise(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_((0.05 * torch.randn(p.shape, generator=gen)).to(p.dtype))


def _case(tuner: str, layer_type: str, dtype: torch.dtype, root):
    """(base folder, adapter folder, PEFT's merged state) — or a skip with PEFT's own reason."""
    from peft import PeftModel, get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    torch.manual_seed(0)
    if layer_type == "gpt2":
        base = build_base("gpt2", root / "base", dtype=dtype)
        model, target = load_model(base, dtype), "c_attn"
    else:
        custom = Custom(layer_type).to(dtype)
        base, target = root / "base", custom.target
        base.mkdir()
        save_file({k: v.contiguous() for k, v in custom.state_dict().items()}, str(base / "model.safetensors"))
        model = custom
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = PEFT_TYPE_TO_CONFIG_MAPPING[tuner](target_modules=[target], **OPTIONS.get(tuner, {}))
            peft_model = get_peft_model(model, config)
        except (ValueError, TypeError, NotImplementedError, RuntimeError, KeyError, AttributeError) as exc:
            pytest.skip(f"PEFT does not build {tuner} on {layer_type}: {str(exc).splitlines()[0][:120]}")
        _randomise(peft_model, 3)
        peft_model.save_pretrained(root / "adapter")
        if not load_file(str(root / "adapter" / "adapter_model.safetensors")):
            pytest.skip(f"PEFT builds {tuner} on {layer_type} but adapts nothing there (it saves no tensor)")
        # the oracle: PEFT loading the saved adapter onto a fresh copy of the base (what a user's merge sees; PEFT
        # keeps some unsaved training state, e.g. AdaLoRA's ranknum, out of the file)
        if layer_type == "gpt2":
            fresh = load_model(base, dtype)
        else:
            fresh = Custom(layer_type).to(dtype)
            fresh.load_state_dict(load_file(str(base / "model.safetensors")))
        reloaded = PeftModel.from_pretrained(fresh, root / "adapter")
        try:
            merged = {k: v.detach().clone() for k, v in reloaded.merge_and_unload().state_dict().items()}
        except AttributeError as exc:  # LN Tuning on MultiheadAttention: PEFT's own unload fails
            pytest.skip(f"PEFT's own merge_and_unload of {tuner} on {layer_type} fails: {exc}")
    stored = load_file(str(base / "model.safetensors"))
    return base, root / "adapter", {k: merged[k] for k in stored}


def _write(folder, state: dict) -> None:
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer_type", ["linear", "emb", "conv1d", "conv2d", "conv3d", "mha", "gpt2"])
@pytest.mark.parametrize("tuner", list(REGISTERED))
def test_merge_compare_and_a_planted_error(tuner, layer_type, dtype, tmp_path, capsys):
    base, adapter, want = _case(tuner, layer_type, dtype, tmp_path)
    original = load_file(str(base / "model.safetensors"))

    # HRA's default merge is its own float64 evaluation (tests/adapters/test_hra.py); PEFT's bits on request
    flags = ["--peft-arithmetic"] if tuner == "HRA" else []
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged", *flags)
    assert rc == 0, err
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    changed = [n for n in got if not torch.equal(got[n], original[n])]
    assert changed or tuner in ("LN_TUNING", "BEFT"), "the oracle changed nothing: the test would prove nothing"
    for name, value in got.items():
        assert value.dtype == want[name].dtype and torch.equal(value, want[name]), name

    _write(tmp_path / "peft", want)
    rc, _, err = run_cli(capsys, "compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "peft",
                         "-o", tmp_path / "cmp")
    assert rc == 0, err
    record = json.loads((tmp_path / "cmp" / "comparison_results.json").read_text())
    assert rc == 0 and record["summary"]["verdict"] == "EQUIVALENT within tolerance", (err, record["summary"])
    rows = {t["name"]: t for t in record["tensors"] if t["targeted"]}
    assert rows and all(t["certificate_ratio"] is None and t["tolerance_ratio"] <= 1 for t in rows.values())

    name = max(rows, key=lambda n: want[n].numel())
    planted = dict(want)
    value = want[name].reshape(-1).clone()
    step = float(value[0].abs()) * torch.finfo(dtype).eps + 4 * rows[name]["reference_error"]
    value[0] += 10 * max(step, torch.finfo(dtype).tiny)
    planted[name] = value.reshape(want[name].shape)
    _write(tmp_path / "planted", planted)
    rc, _, err = run_cli(capsys, "compare", "--base", base, "--adapter", adapter, "--finetuned",
                         tmp_path / "planted", "-o", tmp_path / "cmp2")
    assert rc == 1, err
    record = json.loads((tmp_path / "cmp2" / "comparison_results.json").read_text())
    assert rc == 1 and record["summary"]["verdict"] == "NOT EQUIVALENT", err
    row = next(t for t in record["tensors"] if t["name"] == name)
    assert row["tolerance_ratio"] > 1 and row["worst_element"] == [0] * len(want[name].shape)


# native tuners' cases loratv has no formula for, merged by PEFT's code (AdapterKind.routed): (peft_type, config
# kwargs, layer type)
ROUTED_CASES = {
    "loha-tucker-conv2d": ("LOHA", {"use_effective_conv2d": True, "r": 4}, "conv2d"),
    "lokr-tucker-conv2d": ("LOKR", {"use_effective_conv2d": True, "r": 1}, "conv2d"),  # r=1: w2 decomposed
    "oft-coft-linear": ("OFT", {"coft": True, "oft_block_size": 8, "r": 0}, "linear"),
    "oft-embedding": ("OFT", {"oft_block_size": 8, "r": 0}, "emb"),
    "adalora-conv2d": ("ADALORA", {"init_r": 4, "total_step": 10}, "conv2d"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(ROUTED_CASES))
def test_routed_cases_merge_bit_identical_and_compare(case, dtype, tmp_path, capsys):
    tuner, options, layer_type = ROUTED_CASES[case]
    OPTIONS[tuner] = options
    try:
        base, adapter, want = _case(tuner, layer_type, dtype, tmp_path)
    finally:
        OPTIONS.pop(tuner)
    rc, out, err = run_cli(capsys, "inspect", adapter, "--json")
    assert rc == 0, err
    assert json.loads(out)["peft_type"] == tuner  # PEFT's name, not the registry's key
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged")
    assert rc == 0, err
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(got[n], original[n]) for n in got), "the oracle changed nothing"
    assert all(v.dtype == want[n].dtype and torch.equal(v, want[n]) for n, v in got.items())
    _write(tmp_path / "peft", want)
    rc, _, err = run_cli(capsys, "compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "peft",
                         "-o", tmp_path / "cmp")
    assert rc == 0, err
    record = json.loads((tmp_path / "cmp" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT within tolerance"
