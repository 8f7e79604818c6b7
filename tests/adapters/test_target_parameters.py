"""LoRA on raw parameters (`target_parameters`, PEFT's ParamWrapper): 3-D expert stacks of a tiny GPT-OSS (stored
(E, in, out), is_transposed) and of a tiny Mixtral written in its fused in-memory layout ((E, out, in)), plus a q_proj
LoRA beside them. Oracle: PEFT's merge_and_unload. ParamWrapper rounds twice on a 16-bit model (ΔW cast to the
parameter dtype, then the add), loratv once: fp32 is bit-exact, bf16 within one ulp, and compare certifies both."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import load_model, peft_merged_state, ulp_of


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + ["--quiet"])


def moe_config(arch):
    from transformers import GptOssConfig, MixtralConfig

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    if arch == "gptoss":
        return GptOssConfig(head_dim=8, layer_types=["full_attention"] * 2, **common)
    return MixtralConfig(tie_word_embeddings=False, **common)


def build_moe(arch, folder, dtype):
    """GPT-OSS saves its stacks as they are; transformers saves Mixtral expert by expert, so its fused state dict is
    written here directly (the layout a target_parameters adapter is trained on)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(moe_config(arch)).to(dtype)
    if arch == "gptoss":
        model.save_pretrained(folder)
    else:
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.save_pretrained(folder)
    return folder


def moe_adapter(base, folder):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], rank_pattern={"gate_up_proj": 3},
                        target_parameters=["experts.down_proj", "experts.gate_up_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32), config)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["gptoss", "mixtral"])
def test_expert_stacks_merge_like_peft_and_are_certified(tmp_path, arch, dtype):
    base = build_moe(arch, tmp_path / "base", dtype)
    adapter = moe_adapter(base, tmp_path / "adapter")
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(".experts.base_layer.lora_A" in k for k in keys)  # the nested wrapper PEFT writes
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(base, adapter, dtype)
    original = load_file(str(base / "model.safetensors"))
    stacks = [n for n in ours if n.endswith(("experts.down_proj", "experts.gate_up_proj"))]
    assert len(stacks) == 4 and all(not torch.equal(ours[n], original[n]) for n in stacks)
    for name, value in ours.items():
        if dtype == torch.float32 or name not in stacks:
            assert torch.equal(value, want[name]), name
        else:  # PEFT rounds ΔW to bf16 before adding: apart by at most an ulp of the sum plus one of ΔW
            gap = (value.double() - want[name].double()).abs()
            delta = (want[name].double() - original[name].double()).to(dtype)
            assert bool((gap <= ulp_of(want[name]) + ulp_of(delta)).all()), name
            assert (gap > 0).any()  # the double rounding is visible
    for merged in ("m", "peft"):
        folder = tmp_path / merged
        if merged == "peft":
            folder.mkdir()
            save_file({k: v.contiguous() for k, v in want.items() if k in original},
                      str(folder / "model.safetensors"), metadata={"format": "pt"})
            (folder / "config.json").write_text((base / "config.json").read_text())
        assert run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", folder,
                       "-o", tmp_path / f"c-{merged}", "--no-plots") == 0
        record = json.loads((tmp_path / f"c-{merged}" / "comparison_results.json").read_text())
        assert record["summary"]["verdict"] == "EQUIVALENT (certified)", merged
        ranks = {t["name"]: t["rank"] for t in record["tensors"] if t["targeted"]}
        assert {ranks[n] for n in stacks if n.endswith("gate_up_proj")} == {3}  # rank_pattern on the parameter
        assert {ranks[n] for n in stacks if n.endswith("down_proj")} == {2}


def test_expert_delta_against_float64_numpy(tmp_path):
    """ΔW[e,o,i] = s·Σ_r B[o,r,e]·A[e,r,i] (A expert-major, B expert-minor), reference §3.3, in NumPy float64."""
    import numpy as np

    base = build_moe("mixtral", tmp_path / "base", torch.float32)
    adapter = moe_adapter(base, tmp_path / "adapter")
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m", "--compute-dtype",
                   "fp64") == 0
    t = {k: v.double().numpy() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    prefix = "base_model.model.model.layers.1.mlp.experts."
    for name, nest, r in (("down_proj", "", 2), ("gate_up_proj", "base_layer.", 3)):
        a, b = t[prefix + nest + "lora_A.weight"], t[prefix + nest + "lora_B.weight"]
        w = original[f"model.layers.1.mlp.experts.{name}"].double().numpy()
        experts = w.shape[0]
        a3 = a.reshape(experts, r, a.shape[1])
        b3 = b.reshape(b.shape[0], r, experts)
        want = (w + (4 / r) * np.einsum("ore,eri->eoi", b3, a3)).astype(np.float32)
        np.testing.assert_array_equal(ours[f"model.layers.1.mlp.experts.{name}"].numpy(), want, err_msg=name)


def test_per_expert_checkpoint_is_mapped_through_transformers(tmp_path):
    """transformers saves Mixtral expert by expert (block_sparse_moe.experts.0.w1.weight): loratv maps the fused
    stacks the LoRA targets onto those pieces with transformers' conversion rules and writes them back one by one
    (tests/adapters/test_layouts.py covers the layouts in full, and the refusal where no rule exists)."""
    from transformers import AutoModelForCausalLM

    fused = build_moe("mixtral", tmp_path / "fused", torch.float32)
    adapter = moe_adapter(fused, tmp_path / "adapter")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(moe_config("mixtral")).save_pretrained(tmp_path / "per-expert")
    assert run_cli("merge", "--base", tmp_path / "per-expert", "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert ours.keys() == load_file(str(tmp_path / "per-expert" / "model.safetensors")).keys()
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in ours
    want = peft_merged_state(tmp_path / "per-expert", adapter, torch.float32)
    reloaded = load_model(tmp_path / "m", torch.float32).state_dict()
    assert all(torch.equal(reloaded[n], want[n]) for n in want)


def test_inspect_resolves_the_nesting_with_the_base(tmp_path):
    from loratv.ops.inspect import describe_adapter

    base = build_moe("gptoss", tmp_path / "base", torch.float32)
    adapter = moe_adapter(base, tmp_path / "adapter")
    report = describe_adapter(adapter, base)
    stacks = {m["module"]: m for m in report["modules"] if m["kind"] == "experts_t"}
    assert set(stacks) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")}
    assert stacks["model.layers.0.mlp.experts.gate_up_proj"]["rank"] == 3
    assert stacks["model.layers.0.mlp.experts.down_proj"]["delta_shape"] == [4, 48, 32]  # (E, in, out), stored
    # the adapter alone cannot name the parameters: said so, nothing guessed
    edit = json.loads((adapter / "adapter_config.json").read_text())
    edit["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(edit))
    alone = describe_adapter(adapter)
    assert "give --base" in alone["notes"][0] and not any("experts" in m["module"] for m in alone["modules"])


def test_precision_certifies_all_five_paths_of_expert_stacks(tmp_path):
    base = build_moe("gptoss", tmp_path / "base", torch.float32)
    adapter = moe_adapter(base, tmp_path / "adapter")
    assert run_cli("precision", "--base", base, "--adapter", adapter, "-o", tmp_path / "p", "--no-plots") == 0
    study = json.loads((tmp_path / "p" / "precision_results.json").read_text())
    assert len(study["paths"]) == 5 and all(p["verdict"] == "EQUIVALENT (certified)" for p in study["paths"])
