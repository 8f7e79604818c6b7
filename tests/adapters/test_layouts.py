"""transformers-5 checkpoint layouts (issue 15). An adapter made on a transformers-5 model names the in-memory modules
(`vit.layers.0.attention.k_proj`, `model.language_model.…`, fused `experts.gate_up_proj`), while save_pretrained writes
(and the hub holds) the original names with experts stored one by one. loratv maps the two through transformers' own
conversion rules, merges, and writes the base's on-disk layout.

Oracles: transformers (from_pretrained of loratv's output) and PEFT (merge_and_unload of the same adapter on the same
base, loaded by transformers): every parameter equal, bit for bit in fp32; compare certifies the merge."""

import json
import warnings

import pytest
import torch

from helpers_io import assert_nothing_at, assert_one_line_error
from tiny_models import header_shapes

pytestmark = pytest.mark.filterwarnings("ignore")

TEXT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=32, tie_word_embeddings=False)


def tiny_config(arch):
    import transformers as T

    if arch == "vit":
        return T.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           image_size=8, patch_size=4, num_labels=3)
    if arch == "llava":
        vision = T.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=8, patch_size=4)
        return T.LlavaConfig(text_config=T.LlamaConfig(intermediate_size=32, **TEXT), vision_config=vision,
                             image_token_index=63)
    if arch == "qwen3_moe":
        return T.Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                                head_dim=8, **TEXT)
    if arch == "mixtral":
        return T.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **TEXT)
    if arch == "deepseek_v3":  # layer 0 dense, layer 1 MoE with a shared expert
        return T.DeepseekV3Config(intermediate_size=32, moe_intermediate_size=8, n_routed_experts=4,
                                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                                  topk_group=1, q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4,
                                  qk_rope_head_dim=4, v_head_dim=4, **TEXT)
    raise ValueError(arch)


def model_class(folder):
    import transformers

    return getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])


def load(folder):
    return model_class(folder).from_pretrained(folder, dtype=torch.float32).eval()


def build_base(arch, folder):
    """A random tiny model written by save_pretrained: transformers' on-disk layout (original names, experts one by
    one), the layout the hub holds."""
    import transformers

    torch.manual_seed(0)
    config = tiny_config(arch)
    classes = {"vit": "ViTForImageClassification", "llava": "LlavaForConditionalGeneration"}
    model = getattr(transformers, classes.get(arch, "AutoModelForCausalLM"))
    model = model(config) if arch in classes else model.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # zero-initialised biases, routers and norms get values too
    model.save_pretrained(folder)
    return folder


def build_adapter(base, folder, **lora):
    """PEFT's adapter on the model transformers loads from `base` (its in-memory names), every factor random."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load(base), LoraConfig(r=2, lora_alpha=4, **lora))
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
    return folder


def peft_merged(base, adapter) -> dict:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(load(base), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def adapter_keys(adapter) -> list:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + ["--quiet"])


ARCHS = ["vit", "llava", "qwen3_moe", "mixtral", "deepseek_v3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_in_memory_adapter_merges_into_the_on_disk_layout(tmp_path, arch):
    base = build_base(arch, tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules="all-linear")
    keys = json.loads((adapter / "adapter_config.json").read_text())
    on_disk = header_shapes(base / "model.safetensors")
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0

    # the output is the base's layout: the same names (experts one by one) and shapes
    assert header_shapes(tmp_path / "m" / "model.safetensors") == on_disk
    # transformers reloads it, and every parameter is PEFT's merge_and_unload's, bit for bit
    ours = {k: v for k, v in load(tmp_path / "m").state_dict().items()}
    want = peft_merged(base, adapter)
    assert ours.keys() == want.keys()
    original = load(base).state_dict()
    changed = [n for n in want if not torch.equal(want[n], original[n])]
    modules = [k for k in adapter_keys(adapter) if k.endswith("lora_A.weight")]
    assert len(changed) == len(modules)  # each LoRA module (or target parameter) changed its tensor, no other
    for name in want:
        assert torch.equal(ours[name], want[name]), name
    if arch in ("qwen3_moe", "mixtral", "deepseek_v3"):  # all-linear reaches the fused stacks and the router
        assert set(keys["target_parameters"]) == {"gate_up_proj", "down_proj", "gate.weight"}
        assert any(n.endswith("experts.gate_up_proj") for n in changed)
        assert any(n.endswith("experts.down_proj") for n in changed)
        assert any(n.endswith("mlp.gate.weight") for n in changed)

    assert run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m",
                   "-o", tmp_path / "c", "--no-plots") == 0
    record = json.loads((tmp_path / "c" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"


def test_explicit_target_parameters_on_per_expert_mixtral(tmp_path):
    """`experts.gate_up_proj`/`experts.down_proj` named in full, with a rank_pattern on one, beside q_proj."""
    base = build_base("mixtral", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"], rank_pattern={"gate_up_proj": 3},
                            target_parameters=["experts.down_proj", "experts.gate_up_proj"])
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours, want = load(tmp_path / "m").state_dict(), peft_merged(base, adapter)
    assert all(torch.equal(ours[n], want[n]) for n in want)
    assert run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m",
                   "-o", tmp_path / "c", "--no-plots") == 0
    record = json.loads((tmp_path / "c" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
    ranks = {t["name"]: t["rank"] for t in record["tensors"] if t["targeted"]}
    assert ranks["model.layers.1.block_sparse_moe.experts.2.w3.weight"] == 3  # a piece of gate_up_proj
    assert ranks["model.layers.1.block_sparse_moe.experts.2.w2.weight"] == 2


def test_bare_target_names_match_as_peft_matches(tmp_path):
    """PEFT writes bare `gate_up_proj`/`down_proj`/`gate.weight`: only the experts and the router are ParamWrappers;
    q/k/v/o stay module LoRAs."""
    from loratv.adapters.adapter import bind, load_adapter
    from loratv.io.checkpoint import Checkpoint

    base = build_base("qwen3_moe", tmp_path / "base")
    adapter = load_adapter(build_adapter(base, tmp_path / "adapter", target_modules="all-linear"))
    owners = {n.replace(".base_layer", "") for n in adapter.param_groups}
    assert owners == {f"model.layers.{i}.mlp.{m}" for i in (0, 1) for m in ("experts", "gate")}
    assert all(".self_attn." in m for m in adapter.modules)
    plan = bind(adapter, Checkpoint(base))
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in plan.deltas  # a piece of the fused gate_up_proj
    assert "model.layers.0.mlp.gate.weight" in plan.deltas


def test_without_a_conversion_rule_the_message_names_both_layouts(tmp_path, capsys, monkeypatch):
    import loratv.adapters.layouts as layouts

    base = build_base("llava", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    monkeypatch.setattr(layouts, "_build", lambda base, model_type: None)  # a transformers without the rule
    capsys.readouterr()
    rc = run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    line = assert_one_line_error(rc, capsys.readouterr().err, "in-memory transformers-5 modules")
    assert "(model.language_model.…)" in line and "stores language_model.model.…" in line
    assert_nothing_at(tmp_path / "m")


def test_per_expert_message_uses_the_checkpoint_naming(tmp_path, capsys, monkeypatch):
    import loratv.adapters.layouts as layouts

    base = build_base("mixtral", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"],
                            target_parameters=["experts.down_proj", "experts.gate_up_proj"])
    monkeypatch.setattr(layouts, "_build", lambda base, model_type: None)
    capsys.readouterr()
    rc = run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    line = assert_one_line_error(rc, capsys.readouterr().err, "one by one")
    assert "block_sparse_moe.experts.0.w1.weight" in line and "w1'" not in line.replace(".w1.weight'", "")


def test_missing_transformers_names_the_extra(tmp_path, capsys, monkeypatch):
    import builtins

    base = build_base("vit", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    capsys.readouterr()
    rc = run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert_one_line_error(rc, capsys.readouterr().err, "pip install 'loratv[transformers]'")


def test_precision_certifies_every_path_across_the_layout(tmp_path):
    """Every precision path (fp32, fp16, bf16, cast-first), each merge compared piece by piece: all certified."""
    base = build_base("qwen3_moe", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules="all-linear")
    assert run_cli("precision", "--base", base, "--adapter", adapter, "-o", tmp_path / "p", "--no-plots") == 0
    study = json.loads((tmp_path / "p" / "precision_results.json").read_text())
    assert len(study["paths"]) >= 5 and all(p["verdict"] == "EQUIVALENT (certified)" for p in study["paths"])
