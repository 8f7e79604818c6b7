"""`loratv combine` against float64 NumPy sums of the inputs' ΔW, PEFT loading and merging the combined adapter,
PEFT's own `cat` combination, and the Eckart–Young error of a dense truncation. The inputs are PEFT adapters on tiny
Llama and StarCoder2 bases with mixed ranks, rank/alpha patterns, rsLoRA, lora_bias, embeddings and different target
sets."""

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file

from helpers_io import assert_nothing_at, assert_one_line_error, run_cli
from tiny_models import build_adapter, build_base, load_model, peft_merged_state

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama base and three adapters: rank 4 on q/v with patterns, rank 8 rsLoRA on q/k/o, rank 2 on v and the
    embedding."""
    root = tmp_path_factory.mktemp("combine")
    base = build_base("llama", root / "base")
    adapters = [
        build_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 32}),
        build_adapter(base, root / "b", seed=2, r=8, lora_alpha=8, use_rslora=True,
                      target_modules=["q_proj", "k_proj", "o_proj"]),
        build_adapter(base, root / "c", seed=3, r=2, lora_alpha=3, target_modules=["v_proj", "embed_tokens"]),
    ]
    return base, adapters


def _config(folder) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


def _pattern(patterns: dict, module: str):
    """PEFT's get_pattern_key: the first key in JSON order matching (.*\\.)?(key)$."""
    import re

    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", module)), None)


def _deltas(folder) -> dict:
    """Every module's s·B@A in float64 NumPy, the scale read from adapter_config.json independently of loratv,
    keyed by module; embeddings' in their stored (B@A) orientation."""
    config = _config(folder)
    tensors = {k: v.astype(np.float64) for k, v in np_load_file(str(folder / "adapter_model.safetensors")).items()}
    out = {}
    for key in tensors:
        for a_part, b_part in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if key.endswith(a_part):
                module = key[len(PREFIX):-len(a_part)]
                a, b = tensors[key], tensors[key[:-len(a_part)] + b_part]
                r = a.shape[0]
                rk, ak = _pattern(config.get("rank_pattern") or {}, module), \
                    _pattern(config.get("alpha_pattern") or {}, module)
                alpha = config["alpha_pattern"][ak] if ak else config["lora_alpha"]
                assert r == (config["rank_pattern"][rk] if rk else config["r"])
                scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
                out[module] = scale * (b.reshape(b.shape[0], r) @ a.reshape(r, -1))
    return out


def _weighted_sum(adapters, weights) -> dict:
    total: dict = {}
    for folder, w in zip(adapters, weights, strict=True):
        for module, delta in _deltas(folder).items():
            total[module] = total.get(module, 0) + w * delta
    return total


def test_the_exact_combination_is_the_weighted_sum(llama, tmp_path, capsys):
    base, adapters = llama
    weights = [0.5, -1.25, 2.0]
    out = tmp_path / "combined"
    rc, stdout, err = run_cli(capsys, "combine", *adapters, "--weights", *map(str, weights), "-o", out)
    assert rc == 0, err
    assert "rank" in stdout and "combine_fidelity.json" in stdout
    want = _weighted_sum(adapters, weights)
    got = _deltas(out)
    assert set(got) == set(want)  # the union of the target sets
    record = json.loads((out / "combine_fidelity.json").read_text())
    rows = {m["module"]: m for m in record["modules"]}
    config = _config(out)
    assert config["use_rslora"] is False and not config["use_dora"]
    for module, delta in want.items():
        row = rows[module]
        # ranks concatenated: the module's rank is the sum of its adapters' ranks
        ranks = [_deltas_rank(a, module) for a in adapters]
        assert row["rank"] == row["input_rank"] == sum(r for r in ranks if r)
        error = np.abs(got[module] - delta)
        assert error.max() <= row["max_element_error_bound"] * (1 + 1e-9) + 1e-300, module
        assert error.max() <= 2.0 ** -22 * np.abs(delta).max(), module  # one float32 rounding per factor element
        assert math.isclose(row["norm"], float(np.linalg.norm(delta)), rel_tol=1e-10)
        assert math.isclose(row["stored_error"], float(np.linalg.norm(got[module] - delta)), rel_tol=1e-6,
                            abs_tol=1e-12)


def _deltas_rank(folder, module):
    tensors = np_load_file(str(folder / "adapter_model.safetensors"))
    for a_part in (".lora_A.weight", ".lora_embedding_A"):
        key = f"{PREFIX}{module}{a_part}"
        if key in tensors:
            return tensors[key].shape[0]
    return None


def test_peft_loads_and_merges_the_combined_adapter(llama, tmp_path, capsys):
    base, adapters = llama
    weights = [1.0, 0.75, -0.5]
    out = tmp_path / "combined"
    assert run_cli(capsys, "combine", *adapters, "--weights", *map(str, weights), "-o", out, "--quiet")[0] == 0
    merged = peft_merged_state(base, out)
    reference = {k: v.double() for k, v in load_model(base).state_dict().items()}
    for module, delta in _weighted_sum(adapters, weights).items():
        name = f"{module}.weight"
        target = torch.from_numpy(delta.T if module.endswith("embed_tokens") else delta)
        expected = reference[name] + target
        assert torch.allclose(merged[name].double(), expected, rtol=0, atol=4e-7 * float(expected.abs().max())), name


def test_peft_cat_gives_the_same_update_except_for_its_rounding(tmp_path, capsys):
    """PEFT's add_weighted_adapter(…, "cat") folds w·s into lora_A in two roundings; loratv in one. Without rsLoRA
    and patterns both are the weighted sum."""
    from peft import PeftModel

    base = build_base("llama", tmp_path / "base")
    first = build_adapter(base, tmp_path / "a", seed=4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    second = build_adapter(base, tmp_path / "b", seed=5, r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    weights = [0.7, -0.3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(load_model(base), first, adapter_name="a")
        model.load_adapter(second, adapter_name="b")
        model.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
        model.set_adapter("cat")
        peft_cat = {k: v.detach().double() for k, v in model.merge_and_unload().state_dict().items()}
    out = tmp_path / "combined"
    assert run_cli(capsys, "combine", first, second, "--weights", *map(str, weights), "-o", out, "--quiet")[0] == 0
    ours = {k: v.double() for k, v in peft_merged_state(base, out).items()}
    for name, value in peft_cat.items():
        assert torch.allclose(ours[name], value, rtol=0, atol=4e-7 * float(value.abs().max().clamp(min=1e-30))), name


def test_recompression_errors_are_eckart_young(llama, tmp_path, capsys):
    base, adapters = llama
    weights = [1.0, 0.5, -2.0]
    want = _weighted_sum(adapters, weights)
    out = tmp_path / "rank3"
    assert run_cli(capsys, "combine", *adapters, "--weights", *map(str, weights), "--max-rank", "3",
                   "--dtype", "fp64", "-o", out, "--quiet")[0] == 0
    record = json.loads((out / "combine_fidelity.json").read_text())
    assert record["mode"] == "recompressed"
    got = _deltas(out)
    for row in record["modules"]:
        s = np.linalg.svd(want[row["module"]], compute_uv=False)
        tail = float(np.sqrt((s[3:] ** 2).sum()))
        assert row["rank"] == min(3, int((s > 1e-12 * s[0]).sum()))
        assert math.isclose(row["dropped_error"], tail, rel_tol=1e-9, abs_tol=1e-12 * s[0])
        # float64 factors: what is stored is the truncation itself
        assert math.isclose(float(np.linalg.norm(got[row["module"]] - want[row["module"]])), tail, rel_tol=1e-9,
                            abs_tol=1e-12 * s[0])
    out = tmp_path / "err"
    assert run_cli(capsys, "combine", *adapters, "--weights", *map(str, weights), "--max-error", "0.3",
                   "-o", out, "--quiet")[0] == 0
    for row in json.loads((out / "combine_fidelity.json").read_text())["modules"]:
        s = np.linalg.svd(want[row["module"]], compute_uv=False)
        tails = [float(np.sqrt((s[k:] ** 2).sum())) for k in range(len(s) + 1)]
        norm = tails[0]
        assert row["relative_dropped_error"] <= 0.3 + 1e-12
        assert row["rank"] == next(k for k in range(len(tails)) if tails[k] <= 0.3 * norm)  # the fewest


def test_lora_bias_and_saved_modules(tmp_path, capsys):
    """lora_B biases add up (Σ wᵢsᵢbᵢ); a module saved whole is Σ wᵢMᵢ when its holders' weights sum to 1, and is
    refused otherwise."""
    base = build_base("starcoder2", tmp_path / "base")
    first = build_adapter(base, tmp_path / "a", seed=6, r=4, lora_alpha=8, target_modules=["q_proj", "c_fc"],
                          lora_bias=True, modules_to_save=["lm_head"])
    second = build_adapter(base, tmp_path / "b", seed=7, r=2, lora_alpha=8, target_modules=["q_proj"],
                           modules_to_save=["lm_head"])
    out = tmp_path / "combined"
    rc, _, err = run_cli(capsys, "combine", first, second, "--weights", "0.25", "0.75", "-o", out)
    assert rc == 0, err
    merged = peft_merged_state(base, out)
    base_state = {k: v.double() for k, v in load_model(base).state_dict().items()}
    a_merged, b_merged = peft_merged_state(base, first), peft_merged_state(base, second)
    for name, value in merged.items():
        # every tensor: base + Σ wᵢ(merged by adapter i − base), PEFT's own merges as the oracle
        expected = base_state[name] + 0.25 * (a_merged[name].double() - base_state[name]) + \
            0.75 * (b_merged[name].double() - base_state[name])
        assert torch.allclose(value.double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max())), name
    assert _config(out)["lora_bias"] is True
    out = tmp_path / "refused"
    rc, _, err = run_cli(capsys, "combine", first, second, "--weights", "0.5", "0.75", "-o", out)
    assert_one_line_error(rc, err, "lm_head", "sum to 1.25")
    assert_nothing_at(out)


@pytest.mark.parametrize("case", ["dora", "loha", "weights", "overwrite", "shapes"])
def test_refusals_are_one_sentence_and_write_nothing(llama, tmp_path, capsys, case):
    base, adapters = llama
    out = tmp_path / "out"
    argv = [*adapters[:2], "-o", out]
    phrase = {"dora": "DoRA", "loha": "LoHa", "weights": "3 weights for 2 adapters", "overwrite": "",
              "shapes": "do not fit"}[case]
    if case == "dora":
        dora = build_adapter(base, tmp_path / "dora", seed=8, r=4, lora_alpha=8, target_modules=["q_proj"],
                             use_dora=True)
        argv = [adapters[0], dora, "-o", out]
    elif case == "loha":
        from peft import LoHaConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(load_model(base), LoHaConfig(r=4, target_modules=["q_proj"]))
            model.save_pretrained(tmp_path / "loha")
        argv = [adapters[0], tmp_path / "loha", "-o", out]
    elif case == "weights":
        argv = [*adapters[:2], "--weights", "1", "2", "3", "-o", out]
    elif case == "overwrite":
        out = adapters[0]
        argv = [*adapters[:2], "-o", out, "--force"]
    elif case == "shapes":  # an adapter whose q_proj reads 16 features, where the other's reads 32
        from safetensors.torch import load_file, save_file

        wrong = tmp_path / "wrong"
        shutil.copytree(adapters[1], wrong)
        state = load_file(str(wrong / "adapter_model.safetensors"))
        key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
        state[key] = state[key][:, :16].contiguous()
        save_file(state, str(wrong / "adapter_model.safetensors"), metadata={"format": "pt"})
        argv = [adapters[0], wrong, "-o", out]
    rc, _, err = run_cli(capsys, "combine", *argv)
    assert_one_line_error(rc, err, *([phrase] if phrase else []))
    if case != "overwrite":
        assert_nothing_at(out)
    else:
        assert (adapters[0] / "adapter_config.json").exists()


def test_compare_certifies_the_combination_against_the_float64_sum(tmp_path, capsys):
    """The combined adapter against a fine-tuned model that is base + Σ wᵢΔWᵢ computed in float64 and rounded once:
    loratv compare certifies it (weights and scales whose products are powers of two fold exactly)."""
    from safetensors.torch import load_file, save_file

    base = build_base("llama", tmp_path / "base")
    adapters = [build_adapter(base, tmp_path / "a", seed=10, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                build_adapter(base, tmp_path / "b", seed=11, r=2, lora_alpha=4, target_modules=["v_proj", "o_proj"])]
    weights = [0.5, -0.25]
    out = tmp_path / "combined"
    assert run_cli(capsys, "combine", *adapters, "--weights", *map(str, weights), "-o", out, "--quiet")[0] == 0
    state = load_file(str(base / "model.safetensors"))
    for module, delta in _weighted_sum(adapters, weights).items():
        name = f"{module}.weight"
        state[name] = (state[name].double() + torch.from_numpy(delta)).float()
    finetuned = tmp_path / "finetuned"
    shutil.copytree(base, finetuned)
    save_file(state, str(finetuned / "model.safetensors"), metadata={"format": "pt"})
    rc, stdout, err = run_cli(capsys, "compare", "--base", base, "--adapter", out, "--finetuned", finetuned,
                              "-o", tmp_path / "cmp")
    assert rc == 0 and "EQUIVALENT (certified)" in stdout, (stdout, err)


def test_the_api_returns_the_record(llama, tmp_path):
    import loratv

    base, adapters = llama
    result = loratv.combine(adapters, tmp_path / "api", weights=[1, 1, 1], max_rank=4)
    assert isinstance(result, loratv.CombineResult) and result.output == tmp_path / "api"
    assert result.record["mode"] == "recompressed" and all(m["rank"] <= 4 for m in result.modules)


def test_gpt2_conv1d_adapters_combine_and_peft_merges_them(tmp_path, capsys):
    """Conv1D modules (fan_in_fan_out): the combined adapter keeps the flag and PEFT's merge of it is the weighted
    sum of PEFT's merges of the inputs."""
    base = build_base("gpt2", tmp_path / "base")
    first = build_adapter(base, tmp_path / "a", seed=12, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                          fan_in_fan_out=True)
    second = build_adapter(base, tmp_path / "b", seed=13, r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"],
                           fan_in_fan_out=True)
    out = tmp_path / "combined"
    assert run_cli(capsys, "combine", first, second, "--weights", "0.5", "1.5", "-o", out, "--quiet")[0] == 0
    assert _config(out)["fan_in_fan_out"] is True
    base_state = {k: v.double() for k, v in load_model(base).state_dict().items()}
    merged = peft_merged_state(base, out)
    a_merged, b_merged = peft_merged_state(base, first), peft_merged_state(base, second)
    for name, value in merged.items():
        expected = base_state[name] + 0.5 * (a_merged[name].double() - base_state[name]) + \
            1.5 * (b_merged[name].double() - base_state[name])
        assert torch.allclose(value.double(), expected, rtol=0, atol=1e-6 * float(expected.abs().max())), name
