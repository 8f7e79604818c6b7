"""Conv2d LoRA and DoRA (issue 5): a tiny ResNet (7×7 stem, 1×1 and 3×3 bottleneck convolutions), adapters made by
PEFT with every factor randomised, merged by loratv and by PEFT's merge_and_unload; compare certifies the merge."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_io import assert_nothing_at, assert_one_line_error
from tiny_models import build_base, conv_adapter, load_model, peft_merged_state


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + ["--quiet"])


@pytest.fixture(scope="module")
def resnets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resnet")
    return {dtype: build_base("resnet", root / str(dtype), dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv2d_merge_is_peft_bit_for_bit_and_certified(tmp_path, resnets, use_dora, dtype):
    base = resnets[dtype]
    adapter = conv_adapter(base, tmp_path / "adapter", use_dora)
    kernels = {tuple(v.shape[2:]) for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()
               if k.endswith("lora_A.weight")}
    assert {(1, 1), (3, 3), (7, 7)} <= kernels
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(base, adapter, dtype)
    original = load_file(str(base / "model.safetensors"))
    changed = [n for n, v in ours.items() if not torch.equal(v, original[n])]
    assert set(changed) == {k for k in ours if k.endswith("convolution.weight")}
    for name, value in ours.items():
        assert torch.equal(value, want[name]), name
    assert run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m",
                   "-o", tmp_path / "c", "--no-plots") == 0
    record = json.loads((tmp_path / "c" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
    assert {t["name"] for t in record["tensors"] if t["category"] == "shared"} == set(changed)


def test_conv_delta_against_float64_numpy(tmp_path, resnets):
    """ΔW[o,i,h,w] = s·Σ_r B[o,r]·A[r,i,h,w], the reference formula, from the file in NumPy float64."""
    import numpy as np

    base = resnets[torch.float32]
    adapter = conv_adapter(base, tmp_path / "adapter", False)
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m", "--compute-dtype",
                   "fp64") == 0
    t = load_file(str(adapter / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    for key in [k for k in t if k.endswith("lora_A.weight")]:
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        a, b = t[key].double().numpy(), t[key.replace("lora_A", "lora_B")].double().numpy()
        delta = 2.0 * np.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
        want = (original[module + ".weight"].double().numpy() + delta).astype(np.float32)
        np.testing.assert_array_equal(ours[module + ".weight"].numpy(), want, err_msg=module)


def test_grouped_or_mismatched_conv_is_refused(tmp_path, resnets, capsys):
    base = resnets[torch.float32]
    adapter = conv_adapter(base, tmp_path / "adapter", False)
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in tensors if k.endswith("lora_A.weight") and tensors[k].shape[1] % 2 == 0
               and tensors[k].shape[2] == 3)
    tensors[key] = tensors[key][:, : tensors[key].shape[1] // 2].contiguous()  # as a groups=2 conv would store it
    save_file(tensors, str(file), metadata={"format": "pt"})
    capsys.readouterr()
    rc = run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert_one_line_error(rc, capsys.readouterr().err, "groups > 1")
    assert_nothing_at(tmp_path / "m")


def test_precision_certifies_all_five_paths_of_a_conv_lora(tmp_path, resnets):
    base = resnets[torch.float32]
    adapter = conv_adapter(base, tmp_path / "adapter", False)
    assert run_cli("precision", "--base", base, "--adapter", adapter, "-o", tmp_path / "p", "--no-plots") == 0
    study = json.loads((tmp_path / "p" / "precision_results.json").read_text())
    assert len(study["paths"]) == 5 and all(p["verdict"] == "EQUIVALENT (certified)" for p in study["paths"])


def test_inspect_describes_conv_modules(tmp_path, resnets):
    from loratv.ops.inspect import describe_adapter

    base = resnets[torch.float32]
    adapter = conv_adapter(base, tmp_path / "adapter", True)
    report = describe_adapter(adapter, base)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert report["use_dora"] and {m["kind"] for m in report["modules"]} == {"conv"}
    for m in report["modules"]:
        a = tensors[f"base_model.model.{m['module']}.lora_A.weight"]
        b = tensors[f"base_model.model.{m['module']}.lora_B.weight"]
        magnitude = tensors[f"base_model.model.{m['module']}.lora_magnitude_vector"]
        assert m["rank"] == 4 and m["delta_shape"] == [b.shape[0], *a.shape[1:]]
        assert m["stored_parameters"] == a.numel() + b.numel() + magnitude.numel()
    assert report["touched_tensors"] == len(report["modules"])


def conv_tuner_configs():
    import peft

    ffn = "resnet.encoder.stages.0.layers.0.layer.1.convolution"  # a 3×3 conv as IA³'s feedforward case
    return {
        "loha": peft.LoHaConfig(r=3, alpha=5, target_modules=["convolution"]),
        "lokr": peft.LoKrConfig(r=2, alpha=5, target_modules=["convolution"]),
        "lokr_whole_w2": peft.LoKrConfig(r=16, alpha=5, target_modules=["convolution"]),
        "ia3": peft.IA3Config(target_modules=["convolution", ffn], feedforward_modules=[ffn]),
        "oft": peft.OFTConfig(r=0, oft_block_size=4, target_modules=r".*layer\.[012]\.convolution"),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(conv_tuner_configs()))
def test_conv2d_tuners_merge_like_peft_and_are_certified(tmp_path, resnets, case, dtype):
    from peft import get_peft_model

    base = resnets[dtype]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32), conv_tuner_configs()[case])
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    noise = torch.randn(p.shape, generator=gen)
                    p.copy_(1 + 0.3 * noise if "ia3" in name else (0.1 if "oft" in name else 0.3) * noise)
        model.save_pretrained(tmp_path / "adapter")
    assert run_cli("merge", "--base", base, "--adapter", tmp_path / "adapter", "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(base, tmp_path / "adapter", dtype)
    original = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(v, original[n]) and v.dim() == 4 and v.shape[-1] == 3 for n, v in ours.items())
    for name, value in ours.items():
        assert torch.equal(value, want[name]), name
    assert run_cli("compare", "--base", base, "--adapter", tmp_path / "adapter", "--finetuned", tmp_path / "m",
                   "-o", tmp_path / "c", "--no-plots") == 0
    record = json.loads((tmp_path / "c" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
