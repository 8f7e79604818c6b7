"""Adapters saved in fp16 or bf16 (a model trained in half precision with autocast_adapter_dtype=False): PEFT loads
their values exactly into fp32 factors, and loratv's merge must equal PEFT's merge_and_unload bit for bit."""

import warnings

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import build_base, load_model, peft_merged_state


def half_adapter(base, folder, dtype):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, dtype), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
                               autocast_adapter_dtype=False)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.bfloat16], ids=["fp16-adapter", "bf16-adapter"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_half_precision_adapters_merge_like_peft(tmp_path, adapter_dtype, base_dtype):
    from loratv.cli.app import main

    trained_on = build_base("llama", tmp_path / "trained_on", dtype=adapter_dtype)
    adapter = half_adapter(trained_on, tmp_path / "adapter", adapter_dtype)
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {adapter_dtype}
    base = build_base("llama", tmp_path / "base", dtype=base_dtype)  # same seed: the same weights in another dtype
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "m"), "--quiet"]) == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(base, adapter, base_dtype)
    changed = 0
    for name, value in ours.items():
        assert torch.equal(value, want[name]), name
        changed += "q_proj" in name or "o_proj" in name
    assert changed == 4
