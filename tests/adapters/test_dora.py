"""DoRA (issue 5, first part): loratv's merge against PEFT's merge_and_unload, and the commands that need an additive
ΔW refusing DoRA by name. Adapters are made by PEFT itself with every LoRA factor and magnitude randomised."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import build_base, load_model, peft_merged_state


def run_cli(*argv) -> int:
    from loratv.cli.app import main

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
    # validate (merge → extract → compare) takes DoRA: certified on its own merge, in fp32 and bf16
    for precision in ("fp32", "bf16"):
        assert run_cli("validate", "--base", base, "--adapter", adapter, "-o", tmp_path / f"v{precision}",
                       "--precision", precision, "--no-plots") == 0
        record = json.loads((tmp_path / f"v{precision}" / "comparison_results.json").read_text())
        assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
    # precision runs the three direct paths (the cast-first ones model additive LoRA) and certifies each
    assert run_cli("precision", "--base", base, "--adapter", adapter, "-o", tmp_path / "p", "--no-plots") == 0
    study = json.loads((tmp_path / "p" / "precision_results.json").read_text())
    assert [p["name"] for p in study["paths"]] == ["fp32", "fp16", "bf16"]
    assert all(p["verdict"] == "EQUIVALENT (certified)" for p in study["paths"])
    assert "cast-first" in study["notes"][0] and "DoRA" in study["notes"][0]
    capsys.readouterr()
    for argv in (["precision", "--base", base, "--adapter", adapter, "-o", tmp_path / "p2", "--paths",
                  "bf16-cast-first"],
                 ["analyze", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m", "-o", tmp_path / "a"],
                 ["merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "cf", "--precision", "bf16",
                  "--cast-base-first"]):
        assert run_cli(*argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert "DoRA" in err and "Traceback" not in err, err
        assert not (tmp_path / argv[argv.index("-o") + 1].name).exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_compare_certifies_peft_dora_merges(tmp_path, case, dtype):
    """compare on PEFT's own DoRA merge: certified, every target shared, and the ΔW it writes is NumPy's float64
    m/‖W + ΔW‖ ⊙ (W + ΔW) − W (rounded once to fp32)."""
    import numpy as np
    from safetensors.torch import save_file

    kind, targets = CASES[case]
    base = build_base(kind, tmp_path / "base", dtype=dtype)
    adapter = dora_adapter(base, tmp_path / "adapter", targets)
    merged = tmp_path / "peft_merged"
    merged.mkdir()
    state = {k: v.contiguous() for k, v in peft_merged_state(base, adapter, dtype).items()}
    w = load_file(str(base / "model.safetensors"))
    save_file({k: state[k] for k in w}, str(merged / "model.safetensors"), metadata={"format": "pt"})
    (merged / "config.json").write_text((base / "config.json").read_text())
    out = tmp_path / "cmp"
    assert run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", merged, "-o", out, "--no-plots") == 0
    record = json.loads((out / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
    shared = [t for t in record["tensors"] if t["category"] == "shared"]
    assert shared and all(t["certificate_ratio"] <= 1 for t in shared)
    assert {t["category"] for t in record["tensors"]} <= {"shared", "unchanged"}
    # the delta compare wrote, against NumPy
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    deltas = load_file(str(out / "lora_deltas.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    for key in (k for k in tensors if "lora_magnitude_vector" in k):
        module = key[len("base_model.model."):-len(".lora_magnitude_vector")]
        emb = module + ".lora_embedding_A" in {k[len("base_model.model."):] for k in tensors}
        a = tensors[f"base_model.model.{module}." + ("lora_embedding_A" if emb else "lora_A.weight")].double().numpy()
        b = tensors[f"base_model.model.{module}." + ("lora_embedding_B" if emb else "lora_B.weight")].double().numpy()
        m = tensors[key].double().numpy()
        ww = w[module + ".weight"].double().numpy()
        transposed = emb or kind == "gpt2"
        v = ww + (b @ a).T * scale if transposed else ww + (b @ a) * scale
        if transposed:
            expected = v * (m / np.linalg.norm(v, axis=0))[None, :] - ww
        else:
            expected = v * (m / np.linalg.norm(v, axis=1))[:, None] - ww
        got = deltas[module + ".weight"].double().numpy()
        np.testing.assert_allclose(got, expected, rtol=2**-23, atol=1e-30)


def test_compare_catches_a_planted_error_in_a_dora_merge(tmp_path):
    base = build_base("llama", tmp_path / "base")
    adapter = dora_adapter(base, tmp_path / "adapter", ["q_proj"])
    merged = tmp_path / "m"
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", merged) == 0
    file = merged / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name][3, 5] += 1e-3
    from safetensors.torch import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})
    out = tmp_path / "cmp"
    assert run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", merged, "-o", out, "--no-plots") == 1
    record = json.loads((out / "comparison_results.json").read_text())
    row = next(t for t in record["tensors"] if t["name"] == name)
    assert record["summary"]["verdict"] == "NOT EQUIVALENT" and row["worst_element"] == [3, 5]


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
    from loratv.cli.app import main

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
