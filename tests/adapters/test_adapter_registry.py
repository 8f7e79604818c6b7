"""Issue 16: one home per adapter kind. Every peft_type loratv merges has exactly one registered kind implementing
the whole AdapterKind interface; tuners refused by name get their sentence; and a kind registered by a test (a toy
scaled-identity additive kind) merges through the normal merge pipeline, then leaves the registry cleanly."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratv.adapters import registry
from loratv.adapters.config import OTHER_TUNERS, parse_config
from loratv.adapters.kind import AdapterKind, TunerModule, require, tensor_shape
from loratv.adapters.kinds.peft_backed import TUNERS as PEFT_BACKED
from loratv.adapters.kinds.peft_backed import ROUTED, PeftBackedKind
from loratv.errors import LoratvError

MERGED = {"LORA", "LOHA", "LOKR", "ADALORA", "VERA", "IA3", "OFT"} | set(PEFT_BACKED)
ROUTED_KEYS = {f"{peft_type}+PEFT" for peft_type in ("OFT", "LOHA", "LOKR", "ADALORA")}  # native kinds' cases PEFT merges
INTERFACE_ATTRIBUTES = ("peft_type", "display_name", "config_fields", "refused_fields", "stored_tensor_roles",
                        "shared_tensors", "multiplicative", "supports_conv", "fixed_orientation", "refuses_conv1d",
                        "factored", "rank_field", "alpha_field", "update")
INTERFACE_METHODS = ("check_config", "parse_settings", "check_key", "check_groups", "map_keys", "build_module",
                     "resolve_target", "bind_module", "check_fits", "fit_problem", "bias_module", "additive_delta",
                     "apply_rows", "merged_value", "depth", "check_certifiable", "bound_terms", "describe")


def test_every_merged_peft_type_has_exactly_one_kind():
    kinds = registry.all_kinds()
    types = [k.peft_type for k in kinds]
    assert len(types) == len(set(types))
    assert set(types) == MERGED | ROUTED_KEYS
    assert {k.peft_type for k in ROUTED.values()} == ROUTED_KEYS
    for peft_type in MERGED:
        assert registry.kind_for(peft_type).peft_type == peft_type
        assert registry.kind_for(peft_type.lower()) is registry.kind_for(peft_type)
    assert [k for k in kinds if k.factored] == [registry.kind_for("LORA")]


@pytest.mark.parametrize("kind", registry.all_kinds(), ids=lambda k: k.peft_type)
def test_every_kind_implements_the_whole_interface(kind):
    assert isinstance(kind, AdapterKind)
    for name in INTERFACE_ATTRIBUTES:
        assert hasattr(kind, name), name
    for name in INTERFACE_METHODS:
        assert callable(getattr(kind, name)), name
    if isinstance(kind, PeftBackedKind):  # PEFT's own config class and layer: fields and tensors come from PEFT
        assert kind.display_name and kind.update and kind.multiplicative
        for name in ("parse_settings", "map_keys", "bind_module", "merged_value", "bound_terms"):
            assert getattr(PeftBackedKind, name) is not getattr(AdapterKind, name), name
        return
    assert kind.display_name and kind.update and kind.stored_tensor_roles and kind.config_fields
    overridden = {name for name in ("build_module", "depth") if getattr(type(kind), name) is not getattr(AdapterKind, name)}
    assert overridden == {"build_module", "depth"}
    if kind.factored:
        return  # LoRA: factors merged by rows (kinds/lora.delta_rows, its variants) and certified from them
    own = "apply_rows" if kind.multiplicative else "additive_delta"
    assert getattr(type(kind), own) is not getattr(AdapterKind, own), own


@pytest.mark.parametrize("peft_type", sorted(OTHER_TUNERS))
def test_refused_tuners_get_their_sentence(peft_type):
    with pytest.raises(LoratvError) as info:
        parse_config({"peft_type": peft_type}, "x/adapter_config.json")
    message = str(info.value)
    assert message == (f"x/adapter_config.json: {OTHER_TUNERS[peft_type]} adapters (peft_type {peft_type}) cannot "
                       "be merged by loratv.")
    with pytest.raises(ValueError):
        registry.register(type("Refused", (AdapterKind,), {"peft_type": peft_type})())


def test_unknown_peft_type_names_the_file_and_the_type():
    with pytest.raises(LoratvError, match=r"^a/adapter_config.json: NEWTHING adapters \(peft_type NEWTHING\)"):
        parse_config({"peft_type": "NewThing"}, "a/adapter_config.json")


def test_a_kind_registers_once():
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.kind_for("LOHA"))


class ScaledIdentityKind(AdapterKind):
    """A toy additive kind: ΔW = s·I on a square weight, s stored as `<module>.toy_s` (one element)."""

    peft_type = "TOY_SCALED_IDENTITY"
    display_name = "ToyIdentity"
    config_fields = frozenset({"target_modules"})
    stored_tensor_roles = ("toy_s",)
    update = "additive: ΔW = s·I"

    def build_module(self, adapter, module, keys):
        require(adapter, module, keys, "toy_s")
        if tensor_shape(adapter, keys["toy_s"]) != (1,):
            raise LoratvError(f"{adapter.tensors.path}: toy module '{module}' stores no scalar.")
        return TunerModule(module, module + ".weight", self.peft_type, keys)

    def fit_problem(self, adapter, module, shape):
        return None if len(shape) == 2 and shape[0] == shape[1] else "is not square"

    def additive_delta(self, adapter, module, shape, dtype, device, absolute=False, exact_scale=False):
        s = adapter.factor(module.keys["toy_s"]).to(device=device, dtype=dtype)
        s = s.abs() if absolute else s
        return torch.eye(shape[0], dtype=dtype, device=device) * s

    def depth(self, module, shape):
        return 1


@pytest.fixture
def toy_kind():
    kind = registry.register(ScaledIdentityKind())
    try:
        yield kind
    finally:
        registry.unregister(kind.peft_type)


def _tiny(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(6, 6, generator=g), "layer.bias": torch.randn(6, generator=g),
            "head.weight": torch.randn(3, 6, generator=g)}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "toy", "tie_word_embeddings": False}))
    (tmp_path / "adapter").mkdir()
    s = torch.tensor([0.375])
    save_file({"base_model.model.layer.toy_s": s}, tmp_path / "adapter" / "adapter_model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "TOY_SCALED_IDENTITY", "target_modules": ["layer"]}))
    return base, s


def test_a_registered_toy_kind_merges_through_the_pipeline_and_leaves_cleanly(tmp_path, toy_kind):
    from loratv.cli.app import main

    base, s = _tiny(tmp_path)
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "-o",
                 str(tmp_path / "merged"), "--quiet"]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    # independent expectation: W + s·I in float64, rounded once to float32
    want = (base["layer.weight"].double() + float(s) * torch.eye(6, dtype=torch.float64)).float()
    assert torch.equal(merged["layer.weight"], want)
    assert torch.equal(merged["layer.bias"], base["layer.bias"])
    assert torch.equal(merged["head.weight"], base["head.weight"])
    assert registry.kind_for("TOY_SCALED_IDENTITY") is toy_kind


def test_the_toy_kind_is_gone_after_its_test():
    assert "TOY_SCALED_IDENTITY" not in {k.peft_type for k in registry.all_kinds()}
    with pytest.raises(LoratvError, match="TOY_SCALED_IDENTITY"):
        registry.kind_for("TOY_SCALED_IDENTITY")


# --- LoRA's variants (kinds/lora_variants): chosen per module when LoRA builds it, as PEFT's LoraVariants are ---


def _peft_adapter(base, folder, seed=2, **config):
    """get_peft_model with `config`, every LoRA tensor perturbed, saved with save_pretrained."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from tiny_models import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32), LoraConfig(r=2, lora_alpha=4, **config))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name or "trainable_tokens_delta" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
    return folder


def _gptoss(folder):
    from transformers import AutoModelForCausalLM, GptOssConfig

    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                          max_position_embeddings=64, head_dim=8, layer_types=["full_attention"])
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


# case -> (base, PEFT config, {module-name suffix: the variant names its modules get}, adapter-wide variants)
VARIANT_CASES = {
    "plain": ("llama", {"target_modules": ["q_proj", "v_proj"]}, {"q_proj": [], "v_proj": []}, []),
    "dora": ("llama", {"target_modules": ["q_proj", "down_proj"], "use_dora": True},
             {"q_proj": ["dora"], "down_proj": ["dora"]}, ["dora"]),
    "rslora": ("llama", {"target_modules": ["q_proj"], "use_rslora": True}, {"q_proj": ["rslora"]}, ["rslora"]),
    "rslora_dora_conv1d": ("gpt2", {"target_modules": ["c_attn"], "use_rslora": True, "use_dora": True},
                           {"c_attn": ["rslora", "dora"]}, ["rslora", "dora"]),
    "lora_bias": ("gpt2", {"target_modules": ["c_fc"], "lora_bias": True}, {"c_fc": ["lora_bias"]},
                  ["lora_bias"]),
    "trainable_tokens": ("llama", {"target_modules": ["q_proj"], "trainable_token_indices": [1, 5]},
                         {"q_proj": []}, ["trainable_tokens"]),
    "target_parameters": ("llama", {"target_modules": ["q_proj"], "target_parameters": ["mlp.down_proj.weight"]},
                          {"q_proj": [], "down_proj.weight": ["target_parameters"]}, ["target_parameters"]),
    "experts": ("gptoss", {"target_modules": ["q_proj"], "target_parameters": ["experts.down_proj"]},
                {"q_proj": [], "experts.down_proj": ["target_parameters"]}, ["target_parameters"]),
    "conv": ("resnet", {"target_modules": ["convolution"]}, {"convolution": ["conv"]}, ["conv"]),
    "conv_dora": ("resnet", {"target_modules": ["convolution"], "use_dora": True},
                  {"convolution": ["dora", "conv"]}, ["dora", "conv"]),
}


@pytest.mark.parametrize("case", list(VARIANT_CASES))
def test_every_lora_module_gets_the_variants_its_peft_config_chooses(tmp_path, case):
    from tiny_models import build_base

    from loratv.adapters.adapter import bind, load_adapter
    from loratv.adapters.kinds.lora_variants import DORA, adapter_variants
    from loratv.io.checkpoint import Checkpoint

    arch, config, expected, wide = VARIANT_CASES[case]
    base = _gptoss(tmp_path / "base") if arch == "gptoss" else build_base(arch, tmp_path / "base")
    adapter = load_adapter(_peft_adapter(base, tmp_path / "adapter", **config))
    plan = bind(adapter, Checkpoint(base))  # target_parameters modules are built when the base resolves them
    assert adapter.modules
    seen = set()
    for name, module in adapter.modules.items():
        suffix = next(s for s in expected if name.endswith(s))
        seen.add(suffix)
        assert [v.name for v in module.variants] == expected[suffix], name
        assert module.additive == (DORA not in module.variants)
        assert module.merge_variant is (DORA if "dora" in expected[suffix] else None)
        assert all(module.has_variant(v) for v in expected[suffix])
    assert seen == set(expected)
    assert adapter_variants(adapter) == wide
    if "trainable_tokens" in wide:
        assert "model.embed_tokens.weight" in adapter.token_rows and "model.embed_tokens.weight" in plan.replacements


def test_the_lora_kind_builds_its_modules_and_knows_their_depth(tmp_path):
    from tiny_models import build_base

    from loratv.adapters.adapter import load_adapter
    from loratv.adapters.kinds.lora_variants import RSLORA

    base = build_base("llama", tmp_path / "base")
    adapter = load_adapter(_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"], use_rslora=True))
    kind = registry.kind_for("LORA")
    name, module = next(iter(adapter.modules.items()))
    keys = {"A": module.a_key, "B": module.b_key}
    rebuilt = kind.build_module(adapter, name, keys)
    assert rebuilt == module and rebuilt.variants == (RSLORA,)
    assert kind.depth(module, (8, 8)) == module.r + 2
    with pytest.raises(LoratvError, match="has only one of its two LoRA factors"):
        kind.build_module(adapter, name, {"A": module.a_key})


def test_every_variant_is_listed_once_and_documented():
    from pathlib import Path

    from loratv.adapters.kinds.lora_variants import VARIANTS, LoraVariant, variant_named

    names = [v.name for v in VARIANTS]
    assert len(names) == len(set(names))
    doc = (Path(__file__).resolve().parents[2] / "docs" / "adapter-kinds.md").read_text(encoding="utf-8")
    for variant in VARIANTS:
        assert isinstance(variant, LoraVariant) and variant.display_name
        assert variant_named(variant.name) is variant
        assert f"`{variant.name}`" in doc, variant.name
    with pytest.raises(KeyError):
        variant_named("nope")
