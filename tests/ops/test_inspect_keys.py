"""`loratv inspect ADAPTER --keys`: every stored key, and per module the scaling PEFT applies and the base tensor.

Oracles: `safetensors` for each key's shape and dtype, PEFT's own `module.scaling[adapter_name]` for the scale of
rsLoRA / rank_pattern / alpha_pattern adapters it built, PEFT's `base_layer.weight` for the base shapes.
"""

import json

import pytest
from safetensors import safe_open

from helpers_io import assert_one_line_error, run_cli
from tiny_models import build_adapter, build_base, header_shapes, peft_model

PREFIX = "base_model.model."


def keys_json(capsys, *argv) -> dict:
    rc, out, err = run_cli(capsys, "inspect", *argv, "--keys", "--json")
    assert rc == 0, err
    return json.loads(out)


def safetensors_keys(adapter) -> dict:
    """key -> (shape, dtype code) as the safetensors library reports them."""
    codes = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        out = {}
        for key in f.keys():
            s = f.get_slice(key)
            out[key] = (list(s.get_shape()), codes.get(s.get_dtype().lower(), s.get_dtype()))
        return out


def peft_lora_layers(base, adapter) -> dict:
    """module name (without PEFT's prefix) -> the LoraLayer PEFT built."""
    from peft.tuners.lora import LoraLayer

    model = peft_model(base, adapter)
    return {name.removeprefix(PREFIX): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys-llama")
    base = build_base("llama", root / "base")
    adapters = {
        "rslora": build_adapter(base, root / "rslora", r=4, lora_alpha=8, use_rslora=True,
                                target_modules=["q_proj", "v_proj", "up_proj"]),
        "patterns": build_adapter(base, root / "patterns", r=4, lora_alpha=8,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                                  rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
                                  alpha_pattern={"v_proj": 32, "o_proj": 3}),
        "rslora_patterns": build_adapter(base, root / "both", r=8, lora_alpha=16, use_rslora=True,
                                         target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                                         alpha_pattern={"q_proj": 5}),
    }
    return {"base": base, **adapters}


@pytest.mark.parametrize("which", ["rslora", "patterns", "rslora_patterns"])
def test_scaling_is_peft_scaling(capsys, llama, which):
    adapter = llama[which]
    r = keys_json(capsys, adapter, "--base", llama["base"])
    layers = peft_lora_layers(llama["base"], adapter)
    modules = {m["module"]: m for m in r["modules"]}
    assert set(modules) == set(layers)
    for name, layer in layers.items():
        m = modules[name]
        assert m["scaling"] == layer.scaling["default"], name  # exactly the float PEFT multiplies by
        assert m["rank"] == layer.r["default"] and m["alpha"] == layer.lora_alpha["default"]
        assert m["orientation"] == "linear"
        base_weight = layer.get_base_layer().weight
        assert m["base_tensor"]["name"] == name + ".weight"
        assert m["base_tensor"]["shape"] == list(base_weight.shape)
        assert m["base_tensor"]["dtype"] == "F32"
    if which == "patterns":
        assert modules["model.layers.0.self_attn.q_proj"]["rank_source"] == "rank_pattern['q_proj']"
        assert modules["model.layers.0.self_attn.k_proj"]["rank_source"] == "r"
        assert modules["model.layers.1.mlp.down_proj"]["rank"] == 6
        assert modules["model.layers.0.self_attn.v_proj"]["alpha_source"] == "alpha_pattern['v_proj']"
    assert r["config"]["use_rslora"] == (which != "patterns")
    assert r["scaling_rule"].startswith("alpha/sqrt(r)" if which != "patterns" else "alpha/r")


@pytest.mark.parametrize("which", ["rslora", "patterns"])
def test_every_key_listed_as_safetensors_reports(capsys, llama, which):
    adapter = llama[which]
    r = keys_json(capsys, adapter)
    oracle = safetensors_keys(adapter)
    assert {k["key"] for k in r["keys"]} == set(oracle)
    assert len(r["keys"]) == len(oracle)
    for k in r["keys"]:
        shape, dtype = oracle[k["key"]]
        assert k["shape"] == shape and k["dtype"] == dtype
        n = 1
        for d in shape:
            n *= d
        assert k["numel"] == n
        assert k["role"] in ("lora_A", "lora_B") and k["module"] is not None
    # each module's factors are the keys listed for it
    for m in r["modules"]:
        assert m["factors"]["lora_A"]["key"] == f"{PREFIX}{m['module']}.lora_A.weight"
        assert m["factors"]["lora_B"]["shape"][1] == m["rank"]
        # no --base: PEFT recorded the local base folder, which inspect uses (never a download)
        assert m["base_tensor"]["name"] == m["module"] + ".weight"
    assert r["base"] == str(llama["base"])


def test_text_lists_every_key(capsys, llama):
    rc, out, err = run_cli(capsys, "inspect", llama["patterns"], "--base", llama["base"], "--keys")
    assert rc == 0, err
    for key, (shape, dtype) in safetensors_keys(llama["patterns"]).items():
        line = next(line for line in out.splitlines() if line.startswith(key + " "))
        assert dtype in line and "x".join(map(str, shape)) in line
    assert "rank_pattern['q_proj']" in out and "alpha_pattern['v_proj']" in out


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys-gpt2")
    base = build_base("gpt2", root / "base")
    adapter = build_adapter(base, root / "adapter", r=4, lora_alpha=8, fan_in_fan_out=True,
                            target_modules=["c_attn", "c_proj", "c_fc"])
    return {"base": base, "adapter": adapter}


def test_gpt2_conv1d_base_shapes(capsys, gpt2):
    r = keys_json(capsys, gpt2["adapter"], "--base", gpt2["base"])
    shapes = header_shapes(gpt2["base"] / "model.safetensors")
    layers = peft_lora_layers(gpt2["base"], gpt2["adapter"])
    assert {m["module"] for m in r["modules"]} == set(layers)
    for m in r["modules"]:
        layer = layers[m["module"]]
        assert m["orientation"] == "conv1d" and m["orientation_reason"]
        base = m["base_tensor"]
        assert base["name"] == m["module"] + ".weight"
        assert tuple(base["shape"]) == shapes[base["name"]] == tuple(layer.get_base_layer().weight.shape)
        a, b = m["factors"]["lora_A"]["shape"], m["factors"]["lora_B"]["shape"]
        assert base["shape"] == [a[1], b[0]]  # stored (in, out): Conv1D is transposed
        assert m["scaling"] == layer.scaling["default"]
    assert r["config"]["fan_in_fan_out"] is True


def test_example_without_base_and_errors(capsys, example_dir):
    r = keys_json(capsys, example_dir / "adapter")
    assert len(r["keys"]) == 240 and len(r["modules"]) == 120
    assert all(m["scaling"] == 2.0 and m["orientation"] == "linear" for m in r["modules"])
    rc, _, err = run_cli(capsys, "inspect", example_dir / "base", "--keys")
    assert_one_line_error(rc, err, "adapter")
    rc, _, err = run_cli(capsys, "inspect", example_dir / "adapter", "--keys", "--lora-rank", "8")
    assert_one_line_error(rc, err, "--keys")
