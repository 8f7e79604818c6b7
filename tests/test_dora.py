"""DoRA (issue 5, first part): loratv's merge against PEFT's merge_and_unload, and the commands that need an additive
ΔW refusing DoRA by name. Adapters are made by PEFT itself with every LoRA factor and magnitude randomised."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from models import build_base, load_model, peft_merged_state


def run_cli(*argv) -> int:
    from loratv.cli import main

    return main([str(a) for a in argv] + ["--quiet"])


def dora_adapter(base, folder, targets, seed=3):
    """get_peft_model(use_dora=True), then factors and magnitudes randomised (m starts as ‖W‖, B as zero)."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32),
                               LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
                elif "lora_" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
    return folder


CASES = {
    "llama_linear": ("llama", ["q_proj", "v_proj", "down_proj"]),
    "gpt2_conv1d": ("gpt2", ["c_attn", "c_fc"]),
    "starcoder2_embedding": ("starcoder2", ["embed_tokens", "o_proj"]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_dora_merge_matches_peft(tmp_path, case, dtype):
    kind, targets = CASES[case]
    base = build_base(kind, tmp_path / "base", dtype=dtype)
    adapter = dora_adapter(base, tmp_path / "adapter", targets)
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in keys)
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(base, adapter, dtype)
    w = load_file(str(base / "model.safetensors"))
    changed = 0
    for name, value in ours.items():
        if name not in want:
            continue
        assert torch.equal(value, want[name]), name  # bit for bit: same order of operations, one rounding
        changed += not torch.equal(value, w[name])
    assert changed >= len(targets)  # every target really changed


def test_commands_needing_an_additive_delta_refuse_dora(tmp_path, capsys):
    base = build_base("llama", tmp_path / "base")
    adapter = dora_adapter(base, tmp_path / "adapter", ["q_proj"])
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    capsys.readouterr()
    for argv in (["compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m", "-o", tmp_path / "c"],
                 ["validate", "--base", base, "--adapter", adapter, "-o", tmp_path / "v"],
                 ["analyze", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m", "-o", tmp_path / "a"],
                 ["merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "cf", "--precision", "bf16",
                  "--cast-base-first"]):
        assert run_cli(*argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert "DoRA" in err and "Traceback" not in err, err
        assert not (tmp_path / argv[argv.index("-o") + 1].name).exists()


def test_magnitude_shape_is_checked(tmp_path, capsys):
    from safetensors.torch import save_file

    base = build_base("llama", tmp_path / "base")
    adapter = dora_adapter(base, tmp_path / "adapter", ["q_proj"])
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if "lora_magnitude_vector" in k)
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(file), metadata={"format": "pt"})
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 2
    assert "output features" in capsys.readouterr().err
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True


def test_inspect_describes_dora(tmp_path, capsys):
    base = build_base("gpt2", tmp_path / "base")
    adapter = dora_adapter(base, tmp_path / "adapter", ["c_attn"])
    from loratv.cli import main

    assert main(["inspect", str(adapter), "--base", str(base), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["use_dora"] is True and all(m["dora"] for m in report["modules"])
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    for m in report["modules"]:  # r·(in + out) factors plus one magnitude per output feature, from the file itself
        prefix = f"base_model.model.{m['module']}."
        assert m["stored_parameters"] == sum(t.numel() for k, t in tensors.items() if k.startswith(prefix))
    assert report["touched_tensors"] == 2  # c_attn in both layers
    assert main(["inspect", str(adapter)]) == 0
    assert "DoRA" in capsys.readouterr().out
