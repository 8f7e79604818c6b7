"""kohya / diffusers LoRA single files and `loratv convert` (issue 5, part 4).

PEFT → kohya → PEFT is bit-exact; kohya and diffusers files written here by hand (not by loratv) merge to exactly
PEFT's merge_and_unload of the equivalent PEFT adapter; bad input ends with one sentence naming the file, exit 2 and
nothing written.
"""

import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import build_adapter, build_base, peft_merged_state, raw_tensor_bytes

PEFT_PREFIX = "base_model.model."


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv])


def lora_factors(adapter) -> dict:
    """module -> (A, B) as PEFT stored them (Linear, Conv1D and Embedding alike)."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, value in tensors.items():
        for a_name, b_name in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_name):
                module = key[len(PEFT_PREFIX): -len(a_name)]
                out[module] = (value, tensors[key[: -len(a_name)] + b_name])
    return out


def with_alphas(adapter, folder, alphas: dict):
    """A copy of a PEFT adapter whose modules get these alphas, each by a full-name anchored alpha_pattern key."""
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["alpha_pattern"] = {"^" + re.escape(m): a for m, a in alphas.items()}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def assert_merges_like_peft(tmp_path, base, single_file, equivalent, changed: int):
    out = tmp_path / "merged"
    assert run_cli("merge", "--base", base, "--adapter", single_file, "-o", out, "--quiet") == 0
    ours = load_file(str(out / "model.safetensors"))
    want = peft_merged_state(base, equivalent)
    w = load_file(str(base / "model.safetensors"))
    assert sum(not torch.equal(ours[n], w[n]) for n in ours) == changed
    for name, value in ours.items():
        assert torch.equal(value, want[name]), name  # fp32: bit for bit
    return out


def scales(adapter_path) -> dict:
    from loratv.adapters.adapter import load_adapter

    return {n: (m.r, m.scale) for n, m in load_adapter(adapter_path).modules.items()}


# ---------------------------------------------------------------- 1. PEFT → kohya → PEFT

ROUND_TRIPS = {
    "llama_patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj",
                                                                        "embed_tokens", "lm_head"],
                                     rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})),
    "llama_rslora": ("llama", dict(r=4, lora_alpha=7, use_rslora=True, target_modules=["q_proj", "o_proj"],
                                   rank_pattern={"o_proj": 9})),  # α·√r divides back exactly for r = 4 and 9
    "gpt2_conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                 alpha_pattern={"c_fc": 5}, fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_peft_kohya_peft_round_trip_is_bit_exact(tmp_path, case):
    kind, lora = ROUND_TRIPS[case]
    base = build_base(kind, tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", **lora)
    kohya, back = tmp_path / "lora.safetensors", tmp_path / "back"
    assert run_cli("convert", adapter, "-o", kohya, "--to", "kohya", "--base", base, "--quiet") == 0
    assert run_cli("convert", kohya, "-o", back, "--to", "peft", "--base", base, "--quiet") == 0

    stored = raw_tensor_bytes(kohya)
    factors = lora_factors(adapter)
    assert len(stored) == 3 * len(factors)
    for module in factors:
        name = "lora_te_" + module.replace(".", "_")
        assert stored[name + ".alpha"][:2] == ("F32", ())
        assert {name + ".lora_down.weight", name + ".lora_up.weight"} <= set(stored)
    source = {k: v for k, v in raw_tensor_bytes(adapter / "adapter_model.safetensors").items() if ".lora_" in k}
    assert raw_tensor_bytes(back / "adapter_model.safetensors") == source  # names, dtypes, shapes, bytes
    assert scales(back) == scales(adapter)  # r and scale per module, bit for bit
    if case == "llama_patterns":  # PEFT itself reads the written rank/alpha patterns the same way
        ours, want = peft_merged_state(base, back), peft_merged_state(base, adapter)
        assert all(torch.equal(ours[n], want[n]) for n in want)


# ---------------------------------------------------------------- 2. a kohya file written by hand

def handwritten_kohya(tmp_path, adapter):
    """lora_te_<module> with down = A, up = B, random float32 alphas (one module without, so alpha = r), and one
    module stored as 1×1 convs (kohya's 4-D Linear); returns (file, {module: alpha})."""
    gen = torch.Generator().manual_seed(7)
    tensors, alphas = {}, {}
    for i, (module, (a, b)) in enumerate(sorted(lora_factors(adapter).items())):
        name = "lora_te_" + module.replace(".", "_")
        if i == 1:
            a, b = a.reshape(*a.shape, 1, 1), b.reshape(*b.shape, 1, 1)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
        if i == 0:
            alphas[module] = a.shape[0]
            continue
        alpha = (0.5 + 15.5 * torch.rand((), generator=gen)).to(torch.float32)
        tensors[f"{name}.alpha"] = alpha
        alphas[module] = float(alpha)
    path = tmp_path / "handwritten.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path, alphas


def test_handwritten_kohya_file_merges_converts_and_inspects(tmp_path, capsys):
    base = build_base("llama", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"],
                            rank_pattern={"up_proj": 2})
    kohya, alphas = handwritten_kohya(tmp_path, adapter)
    equivalent = with_alphas(adapter, tmp_path / "equivalent", alphas)
    assert_merges_like_peft(tmp_path, base, kohya, equivalent, changed=len(alphas))

    back = tmp_path / "back"
    assert run_cli("convert", kohya, "-o", back, "--to", "peft", "--base", base, "--quiet") == 0
    assert raw_tensor_bytes(back / "adapter_model.safetensors") == raw_tensor_bytes(adapter / "adapter_model.safetensors")
    assert scales(back) == scales(equivalent)

    capsys.readouterr()
    assert run_cli("inspect", kohya, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["format"], report["lora_modules"], report["ranks"]) == ("kohya", 6, {"4": 4, "2": 2})
    assert all(m["module"].startswith("lora_te_model_layers_") for m in report["modules"])
    assert run_cli("inspect", kohya, "--base", base, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert {m["module"] for m in report["modules"]} == set(alphas) and report["touched_tensors"] == 6
    assert run_cli("inspect", kohya) == 0
    assert "(kohya LoRA file)" in capsys.readouterr().out


def test_compare_certifies_a_kohya_merge(tmp_path, capsys):
    base = build_base("llama", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    kohya, _ = handwritten_kohya(tmp_path, adapter)
    merged = tmp_path / "merged"
    assert run_cli("merge", "--base", base, "--adapter", kohya, "-o", merged, "--quiet") == 0
    capsys.readouterr()
    rc = run_cli("compare", "--base", base, "--adapter", kohya, "--finetuned", merged, "-o", tmp_path / "cmp",
                 "--no-plots", "--json")
    record = json.loads(capsys.readouterr().out)
    assert rc == 0 and record["summary"]["verdict"] == "EQUIVALENT (certified)"
    # precision and validate take the file as they take a PEFT adapter
    assert run_cli("precision", "--base", base, "--adapter", kohya, "-o", tmp_path / "p", "--no-plots",
                   "--quiet") == 0
    study = json.loads((tmp_path / "p" / "precision_results.json").read_text())
    assert len(study["paths"]) == 5 and all(p["verdict"] == "EQUIVALENT (certified)" for p in study["paths"])
    assert run_cli("validate", "--base", base, "--adapter", kohya, "-o", tmp_path / "v", "--no-plots", "--quiet") == 0


# ---------------------------------------------------------------- 3. diffusers files

def diffusers_file(tmp_path, adapter, *, prefix: str, metadata: str | None, kohya_style: bool = False):
    """PEFT's factors under diffusers names: `<prefix><module>.lora_A/B.weight` (every other module as the
    kohya-derived `.lora.down/up.weight`), no `base_model.model.`; optionally the LoraConfig as metadata."""
    tensors = {}
    for i, (module, (a, b)) in enumerate(sorted(lora_factors(adapter).items())):
        old_style = kohya_style and i % 2
        down, up = (".lora.down.weight", ".lora.up.weight") if old_style else (".lora_A.weight", ".lora_B.weight")
        tensors[prefix + module + down], tensors[prefix + module + up] = a, b
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", **({"lora_adapter_metadata": metadata} if metadata else {})})
    return path


DIFFUSERS_CASES = {
    # alpha folded into the factors: scale 1 (the PEFT adapter has lora_alpha = r)
    "folded": (dict(r=4, lora_alpha=4, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 2}), "transformer.", None),
    # a pipeline's save_lora_weights: the LoraConfig packed as "transformer.<field>"
    "pipeline_metadata": (dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"v_proj": 3}), "transformer.",
                          "packed"),
    # a model's save_lora_adapter: no component prefix, the LoraConfig as is
    "model_metadata": (dict(r=4, lora_alpha=8, rank_pattern={"model.layers.1.self_attn.q_proj": 2}), "", "flat"),
}


@pytest.mark.parametrize("case", list(DIFFUSERS_CASES))
def test_diffusers_file_merges_like_peft(tmp_path, case):
    lora, prefix, packing = DIFFUSERS_CASES[case]
    base = build_base("llama", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], **lora)
    config = json.loads((adapter / "adapter_config.json").read_text())
    metadata = None
    if packing == "packed":
        metadata = json.dumps({f"transformer.{k}": v for k, v in config.items()})
    elif packing == "flat":
        metadata = json.dumps(config)
    path = diffusers_file(tmp_path, adapter, prefix=prefix, metadata=metadata, kohya_style=packing is None)
    assert_merges_like_peft(tmp_path, base, path, adapter, changed=4)


# ---------------------------------------------------------------- 4. refused, by name, with nothing written

def kohya_llama(tmp_path):
    base = build_base("llama", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    return base, adapter, lora_factors(adapter)["model.layers.0.self_attn.q_proj"]


def assert_refused(capsys, argv, out, *words):
    """Exit 2, one line naming what is wrong, and OUT untouched: absent, or (when it is an input) unchanged."""
    before = out.read_bytes() if out.is_file() else None
    capsys.readouterr()
    assert run_cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("loratv: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)
    assert out.read_bytes() == before if before is not None else not out.exists()


def test_bad_kohya_input_is_refused(tmp_path, capsys):
    base, adapter, (a, b) = kohya_llama(tmp_path)
    out = tmp_path / "out"
    cases = {
        "nomatch.safetensors": ({"lora_te_model_layers_7_self_attn_q_proj.lora_down.weight": a,
                                 "lora_te_model_layers_7_self_attn_q_proj.lora_up.weight": b},
                                ["lora_te_model_layers_7_self_attn_q_proj", "matches no module"]),
        "onefactor.safetensors": ({"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": a},
                                  ["lora_te_model_layers_0_self_attn_q_proj", "only its down factor"]),
        "loha.safetensors": ({"lora_te_model_layers_0_self_attn_q_proj.hada_w1_a": a,
                              "lora_te_model_layers_0_self_attn_q_proj.hada_w1_b": b}, ["LoHa", "hada_w1_a"]),
        "rank.safetensors": ({"lora_te_model_layers_0_self_attn_q_proj.lora_down.weight": a,
                              "lora_te_model_layers_0_self_attn_q_proj.lora_up.weight": b[:, :2]}, ["rank 4"]),
    }
    for file, (tensors, words) in cases.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / file))
        assert_refused(capsys, ["merge", "--base", base, "--adapter", tmp_path / file, "-o", out, "--quiet"], out,
                       file, *words)


def test_bad_conversions_are_refused(tmp_path, capsys):
    base, adapter, (a, b) = kohya_llama(tmp_path)
    kohya = tmp_path / "lora.safetensors"
    assert run_cli("convert", adapter, "-o", kohya, "--to", "kohya", "--quiet") == 0
    assert_refused(capsys, ["convert", kohya, "-o", kohya, "--to", "peft", "--base", base, "--force"], kohya,
                   "lora.safetensors", "input")
    weights = adapter / "adapter_model.safetensors"
    assert_refused(capsys, ["convert", adapter, "-o", weights, "--to", "kohya", "--force"], weights, "input")
    out = tmp_path / "back"
    assert_refused(capsys, ["convert", kohya, "-o", out, "--to", "peft"], out, "lora.safetensors", "--base")

    rslora = build_adapter(base, tmp_path / "rslora", r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj"])
    assert (16 / math.sqrt(8)) * 8 != float(torch.tensor(16 * math.sqrt(8), dtype=torch.float32))
    out = tmp_path / "rslora.safetensors"
    assert_refused(capsys, ["convert", rslora, "-o", out, "--to", "kohya"], out, "adapter_config.json", "rsLoRA",
                   "bit for bit")


def test_ambiguous_flattened_name_is_refused(tmp_path, capsys):
    base = tmp_path / "tiny.safetensors"  # two modules that flatten to the same kohya name
    save_file({"a_b.c.weight": torch.zeros(3, 2), "a.b_c.weight": torch.zeros(3, 2)}, str(base))
    kohya = tmp_path / "amb.safetensors"
    save_file({"lora_te_a_b_c.lora_down.weight": torch.ones(1, 2), "lora_te_a_b_c.lora_up.weight": torch.ones(3, 1)},
              str(kohya))
    out = tmp_path / "out"
    assert_refused(capsys, ["merge", "--base", base, "--adapter", kohya, "-o", out, "--quiet"], out,
                   "amb.safetensors", "ambiguous", "a.b_c", "a_b.c")


# ---------------------------------------------------------------- 5. Conv2d (kohya's LoCon-style LoRA)

def test_kohya_conv2d_merges_and_converts_like_peft(tmp_path):
    """A 3×3 and a 1×1 Conv2d: kohya's 4-D factors pass through unchanged, merge to PEFT's merge_and_unload and
    convert to PEFT's own conv LoRA keys."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from loratv.ops.merge import merge
    from tiny_models import randomise_adapter

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.proj_out = torch.nn.Conv2d(8, 4, 1)

    torch.manual_seed(0)
    net = Net()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(base))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(net, LoraConfig(r=2, lora_alpha=3, target_modules=["conv_in", "proj_out"]))
    randomise_adapter(model, seed=4)
    state = model.state_dict()
    tensors = {}
    for module in ("conv_in", "proj_out"):
        tensors[f"lora_unet_{module}.lora_down.weight"] = state[f"base_model.model.{module}.lora_A.default.weight"]
        tensors[f"lora_unet_{module}.lora_up.weight"] = state[f"base_model.model.{module}.lora_B.default.weight"]
        tensors[f"lora_unet_{module}.alpha"] = torch.tensor(3.0)
    kohya = tmp_path / "conv.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(kohya))
    want = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    result = merge(base, kohya, tmp_path / "merged")
    ours = load_file(str(next(result.output.glob("*.safetensors"))))
    assert sorted(result.merged) == ["conv_in.weight", "proj_out.weight"]
    for name, value in ours.items():
        assert torch.equal(value, want[name]), name
    assert run_cli("convert", kohya, "-o", tmp_path / "peft", "--to", "peft", "--base", base, "--quiet") == 0
    written = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert written.keys() == {k.replace(".default", "") for k in state if ".lora_" in k}
    assert all(torch.equal(v, state[k.replace(".weight", ".default.weight")]) for k, v in written.items())
