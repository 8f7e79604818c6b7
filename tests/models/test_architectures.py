"""Config-only `loratv inspect`: tensor names and shapes from config.json alone, against two independent oracles.

1. transformers instantiating the same config on the meta device (no memory, no weights): the parameters it creates,
   in order, with a tied head counted once, must be loratv's list; its state dict holds nothing else.
2. `loratv inspect` of real tiny models saved by transformers (headers): same names, shapes and counts.
The LoRA footprint (r·(m+n) per module) is checked against PEFT's own count of trainable parameters.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers_io import run_cli
from loratv.models.architectures import config_tensors
from loratv.errors import LoratvError

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=100)
# (model_type, keys): optional keys left out on purpose in some, so the family defaults are exercised too
CASES = [
    ("starcoder2", dict(SMALL, num_key_value_heads=2, use_bias=True)),
    ("starcoder2", dict(SMALL, use_bias=False, tie_word_embeddings=False)),  # kv heads: the class default (2)
    ("llama", dict(SMALL)),  # kv heads = heads, no biases, untied
    ("llama", dict(SMALL, num_key_value_heads=2, attention_bias=True, mlp_bias=True, head_dim=8,
                   tie_word_embeddings=True)),
    ("mistral", dict(SMALL, num_key_value_heads=2, head_dim=32)),
    ("mistral", dict(SMALL, num_attention_heads=8)),  # kv heads: the class default (8)
    ("qwen2", dict(SMALL, num_key_value_heads=2)),
    ("qwen2", dict(SMALL, num_attention_heads=32, tie_word_embeddings=True)),  # kv heads: the class default (32)
    ("gpt2", dict(n_embd=48, n_layer=2, n_head=4, n_positions=40, vocab_size=90)),  # n_inner = 4·n_embd
    ("gpt2", dict(n_embd=48, n_layer=2, n_head=4, n_positions=40, vocab_size=90, n_inner=72,
                  tie_word_embeddings=False)),
]


def meta_model_tensors(model_type: str, keys: dict):
    """[(name, shape)] of the parameters transformers creates for this config (tied ones once), and the state dict's
    other keys (must be none besides the tied head)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **keys)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    extra = set(model.state_dict()) - {name for name, _ in params}
    return params, extra


@pytest.mark.parametrize("model_type,keys", CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(CASES)])
def test_names_and_shapes_match_transformers_on_meta(model_type, keys):
    expected, extra = meta_model_tensors(model_type, keys)
    tensors, tied = config_tensors({"model_type": model_type, **keys}, "config.json")
    assert tensors == expected
    head = "lm_head.weight"
    assert extra == ({head} if tied else set())


@pytest.mark.parametrize("name,tensors,layers,parameters", [
    ("starcoder2-3b", 483, 30, 3_030_371_328),
    ("llama-3-8b", 291, 32, 8_030_261_248),
    ("qwen2.5-7b", 339, 28, 7_615_616_512),
])
def test_public_configs_against_transformers(name, tensors, layers, parameters):
    """The shipped configs, full size, on the meta device: the counts quoted in docs/starcoder2-architecture.md."""
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    keys = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    expected, _ = meta_model_tensors(config["model_type"], keys)
    ours, _ = config_tensors(config, name)
    assert ours == expected
    assert len(ours) == tensors
    assert sum(math.prod(s) for _, s in ours) == parameters
    assert max(int(n.split(".")[2]) for n, _ in ours if n.startswith("model.layers.")) == layers - 1


def test_starcoder2_3b_matches_the_benchmark_generator():
    """benchmarks/make_starcoder2_3b.py writes the 3B-shaped pair of docs/benchmarks.md with its own shape table."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sc2", REPO / "benchmarks" / "make_starcoder2_3b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json.loads((CONFIGS / "starcoder2-3b.json").read_text())
    ours, tied = config_tensors(config, "starcoder2-3b.json")
    assert tied
    assert {n: tuple(s) for n, s, _ in module.model_tensors(30)} == dict(ours)


def inspect_json(capsys, *argv):
    rc, out, err = run_cli(capsys, "inspect", *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


COUNTED = ("total_tensors", "total_parameters", "layers", "tensors_per_layer", "global_tensors", "tied_embeddings",
           "per_layer", "per_kind", "per_tensor_kind", "shapes")


def counted(report, key):
    """A report's value with file order taken out (safetensors stores names sorted; the config gives module order)."""
    value = report[key]
    if key == "global_tensors":
        return sorted(value)
    if key == "per_tensor_kind":
        return sorted(value, key=lambda t: t["name"])
    return value


@pytest.mark.parametrize("kind", ["starcoder2", "llama", "gpt2"])
def test_config_only_equals_headers_of_a_saved_model(capsys, tmp_path, kind):
    from tiny_models import build_base

    folder = build_base(kind, tmp_path / kind)
    headers = inspect_json(capsys, folder)
    config_only = inspect_json(capsys, folder, "--config-only")
    assert config_only["format"] == "config" and headers["format"] == "safetensors"
    for key in COUNTED:
        assert counted(config_only, key) == counted(headers, key), key
    assert config_only["data_bytes"] == sum(v["bytes"] for v in headers["shards"].values())

    # a folder holding only the config.json is inspected from it without the flag, and so is the file itself
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "config.json").write_bytes((folder / "config.json").read_bytes())
    for source in (alone, alone / "config.json"):
        report = inspect_json(capsys, source)
        assert report["format"] == "config"
        assert report["shapes"] == headers["shapes"]


def test_config_only_of_the_example(capsys):
    headers = inspect_json(capsys)[0]
    config_only = inspect_json(capsys, "--config-only")[0]
    for key in COUNTED:
        assert counted(config_only, key) == counted(headers, key), key
    assert (config_only["total_tensors"], config_only["tied_embeddings"]) == (483, True)


@pytest.mark.parametrize("kind,targets", [("starcoder2", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                          ("llama", ["q_proj", "v_proj", "down_proj"]),
                                          ("gpt2", ["c_attn", "c_proj"])])
def test_lora_footprint_against_peft(capsys, tmp_path, kind, targets):
    """PEFT's own trainable-parameter count of a LoRA on the same targets is what inspect says it would store."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import build_base, load_model

    folder = build_base(kind, tmp_path / kind)
    report = inspect_json(capsys, folder, "--config-only", "--lora-targets", ",".join(targets), "--lora-rank", "4,8")
    for entry in report["lora"]["per_rank"]:
        model = get_peft_model(load_model(folder), LoraConfig(r=entry["rank"], target_modules=targets,
                                                                  fan_in_fan_out=kind == "gpt2"))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert entry["stored_parameters"] == trainable
        modules = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0] + ".weight"
                   for n, _ in model.named_parameters() if ".lora_A." in n}
        assert sorted(modules) == sorted(report["lora"]["touched"])
    lora = report["lora"]
    assert lora["touched_parameters"] == sum(math.prod(report["shapes"][n]) for n in lora["touched"])


def test_lora_footprint_of_starcoder2_3b(capsys):
    """The corrected "24.8 %": 120 of 483 tensors, but a fifth of the parameters, and the adapter stores r·(m+n)."""
    report = inspect_json(capsys, CONFIGS / "starcoder2-3b.json", "--lora-rank", "8,16,64")
    lora = report["lora"]
    assert (lora["touched_tensors"], lora["total_tensors"]) == (120, 483)
    h, kv = 3072, 2 * 128
    per_layer = 2 * h * h + 2 * kv * h
    assert lora["touched_parameters"] == 30 * per_layer
    for entry in lora["per_rank"]:
        r = entry["rank"]
        assert entry["stored_parameters"] == 30 * r * (2 * (h + h) + 2 * (kv + h))
    assert [e["stored_parameters"] for e in lora["per_rank"]] == [4_546_560, 9_093_120, 36_372_480]


def test_refusals(capsys, tmp_path):
    # any model_type transformers knows is inspected (tests/models/test_meta_model.py); others are refused by name
    config = tmp_path / "custom.json"
    config.write_text(json.dumps({"model_type": "my-custom-lm", "hidden_size": 8}))
    rc, out, err = run_cli(capsys, "inspect", config)
    assert rc == 2 and "my-custom-lm" in err and str(config) in err and len(err.splitlines()) == 1

    # the hand-written rules still require their shape keys (transformers would take its class defaults)
    missing = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}
    with pytest.raises(LoratvError, match="'intermediate_size'"):
        config_tensors(missing, "missing.json")

    rc, out, err = run_cli(capsys, "inspect", CONFIGS / "llama-3-8b.json", "--lora-targets", "c_attn")
    assert rc == 2 and "matches no weight matrix" in err


def test_lora_flags_refused_for_an_adapter(capsys, example_dir):
    rc, out, err = run_cli(capsys, "inspect", example_dir / "adapter", "--lora-rank", "8")
    assert rc == 2 and "adapter" in err and len(err.splitlines()) == 1
