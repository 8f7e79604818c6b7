"""PEFT's other tuners (issue 5): LoHa, LoKr, AdaLoRA, VeRA, IA³ and OFT adapters made by PEFT itself, every trainable
tensor randomised, merged by loratv and by PEFT's merge_and_unload (the oracle); compare certifies the merge, catches
a planted error, and inspect describes each kind. Refusals name the reason."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_io import assert_nothing_at, assert_one_line_error, edit_adapter_config
from tiny_models import build_base, load_model, peft_merged_state


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + ["--quiet"])


def inspect_cli(*argv) -> int:
    from loratv.cli.app import main

    return main(["inspect"] + [str(a) for a in argv])


def configs():
    import peft

    return {
        "loha": ("llama", peft.LoHaConfig(r=4, alpha=6, target_modules=["q_proj", "v_proj"],
                                           rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
        "lokr": ("llama", peft.LoKrConfig(r=3, alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                                           decompose_both=True)),
        "lokr_full": ("llama", peft.LoKrConfig(r=8, alpha=6, target_modules=["q_proj", "down_proj"])),
        "adalora": ("llama", peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, total_step=10,
                                                 target_modules=["q_proj", "v_proj"])),
        "adalora_gpt2": ("gpt2", peft.AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, total_step=10,
                                                     target_modules=["c_attn"], fan_in_fan_out=True)),
        "vera": ("llama", peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"])),
        "vera_gpt2": ("gpt2", peft.VeraConfig(r=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        "ia3": ("llama", peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])),
        "ia3_gpt2": ("gpt2", peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"],
                                             feedforward_modules=["mlp.c_proj"], fan_in_fan_out=True)),
        "oft": ("llama", peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"])),
        "oft_share": ("llama", peft.OFTConfig(r=0, oft_block_size=4, block_share=True,
                                               target_modules=["q_proj", "down_proj"])),
        "oft_cayley": ("llama", peft.OFTConfig(r=0, oft_block_size=8, use_cayley_neumann=False,
                                                target_modules=["q_proj"])),
    }


def make_adapter(base, folder, config, seed=5):
    """get_peft_model with `config`, then every trainable tensor randomised (most start at zero or one)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32), config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.3 * noise if "ia3" in name else (0.1 if "oft" in name else 0.3) * noise)
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuner-bases")
    return {(arch, dtype): build_base(arch, root / f"{arch}-{dtype}", dtype=getattr(torch, dtype))
            for arch in ("llama", "gpt2") for dtype in ("float32", "bfloat16")}


PEFT_TYPES = {"loha": "LOHA", "lokr": "LOKR", "lokr_full": "LOKR", "adalora": "ADALORA", "adalora_gpt2": "ADALORA",
              "vera": "VERA", "vera_gpt2": "VERA", "ia3": "IA3", "ia3_gpt2": "IA3", "oft": "OFT",
              "oft_share": "OFT"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(PEFT_TYPES))
def test_merge_is_peft_bit_for_bit_and_compare_certifies_it(tmp_path, bases, case, dtype):
    arch, config = configs()[case]
    base = bases[(arch, dtype)]
    adapter = make_adapter(base, tmp_path / "adapter", config)
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == PEFT_TYPES[case]
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(base, adapter, getattr(torch, dtype))
    original = load_file(str(base / "model.safetensors"))
    changed = [n for n, v in ours.items() if not torch.equal(v, original[n])]
    assert changed, "the adapter changed nothing"
    for name, value in ours.items():
        if name in want:  # tied heads are not stored
            assert want[name].dtype == value.dtype, name  # PEFT keeps the base dtype too
            assert torch.equal(value, want[name]), name
    if case == "ia3_gpt2":  # IA³ scales the bias of its non-feedforward modules as well
        assert any(n.endswith("attn.c_attn.bias") for n in changed)
        assert not any(n.endswith("mlp.c_proj.bias") for n in changed)
    assert run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m",
                   "-o", tmp_path / "c", "--no-plots") == 0
    record = json.loads((tmp_path / "c" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
    assert record["inputs"]["adapter_config"]["peft_type"] == PEFT_TYPES[case]
    targeted = {t["name"] for t in record["tensors"] if t["targeted"]}
    assert set(changed) <= targeted

    # one element moved by 5 % of the tensor's largest value: far beyond any rounding
    worst = changed[0]
    planted = dict(ours)
    value = planted[worst].clone()
    value.view(-1)[0] += 0.05 * value.abs().max()
    planted[worst] = value
    (tmp_path / "bad").mkdir()
    save_file(planted, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "bad" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    assert run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "bad",
                   "-o", tmp_path / "c2", "--no-plots") == 1
    bad = json.loads((tmp_path / "c2" / "comparison_results.json").read_text())
    row = next(t for t in bad["tensors"] if t["name"] == worst)
    assert bad["summary"]["verdict"] == "NOT EQUIVALENT"
    assert row["certificate_ratio"] > 1 and row["worst_element"] == [0] * len(value.shape)


def test_oft_exact_cayley_merges_like_peft_and_compare_refuses_by_name(tmp_path, bases, capsys):
    arch, config = configs()["oft_cayley"]
    base = bases[(arch, "float32")]
    adapter = make_adapter(base, tmp_path / "adapter", config)
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(base, adapter)
    assert all(torch.equal(v, want[n]) for n, v in ours.items() if n in want)
    capsys.readouterr()
    rc = run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m", "-o", tmp_path / "c")
    assert_one_line_error(rc, capsys.readouterr().err, "use_cayley_neumann")
    assert_nothing_at(tmp_path / "c")


def test_formulas_against_float64_numpy(tmp_path, bases):
    """The reference formulas themselves, evaluated independently in NumPy float64 from the file's tensors."""
    import numpy as np

    from loratv.adapters.adapter import bind, load_adapter
    from loratv.io.checkpoint import Checkpoint
    from loratv.adapters.tuners import additive_delta, apply_rows

    for case in ("loha", "lokr", "adalora", "vera", "ia3", "oft"):
        arch, config = configs()[case]
        base_dir = bases[(arch, "float32")]
        folder = make_adapter(base_dir, tmp_path / case, config)
        t = {k: v.double().numpy() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
        w_all = load_file(str(base_dir / "model.safetensors"))
        adapter = load_adapter(folder)
        plan = bind(adapter, Checkpoint(base_dir))
        name = "model.layers.0.self_attn.q_proj.weight"
        module = plan.deltas[name][0]
        key = "base_model.model.model.layers.0.self_attn.q_proj."
        w = w_all[name].double().numpy()
        cfg = json.loads((folder / "adapter_config.json").read_text())
        if case == "loha":
            s = cfg["alpha_pattern"]["q_proj"] / cfg["r"]
            want = w + s * (t[key + "hada_w1_a"] @ t[key + "hada_w1_b"]) * (t[key + "hada_w2_a"] @ t[key + "hada_w2_b"])
        elif case == "lokr":
            w1 = t[key + "lokr_w1_a"] @ t[key + "lokr_w1_b"] if key + "lokr_w1_a" in t else t[key + "lokr_w1"]
            w2 = t[key + "lokr_w2_a"] @ t[key + "lokr_w2_b"] if key + "lokr_w2_a" in t else t[key + "lokr_w2"]
            want = w + cfg["alpha"] / cfg["r"] * np.kron(w1, w2)
        elif case == "adalora":
            want = w + t[key + "lora_B"] @ (t[key + "lora_A"] * t[key + "lora_E"]) * cfg["lora_alpha"] / (
                cfg["init_r"] + 1e-5)
        elif case == "vera":
            out, inp = w.shape
            a, b = t["base_model.vera_A"][:, :inp], t["base_model.vera_B"][:out]
            want = w + (t[key + "vera_lambda_b"][:, None] * b) @ (t[key + "vera_lambda_d"][:, None] * a)
        elif case == "ia3":
            want = w * t[key + "ia3_l"]
        else:
            b = cfg["oft_block_size"]
            blocks = []
            for vec in t[key + "oft_R.weight"]:
                q = np.zeros((b, b))
                q[np.triu_indices(b, 1)] = vec
                q = q - q.T
                # five Neumann terms of the Cayley transform, as PEFT 0.21 defines them
                blocks.append(np.eye(b) + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q)
            r_full = np.zeros((w.shape[1], w.shape[1]))
            for i, blk in enumerate(blocks):
                r_full[i * b:(i + 1) * b, i * b:(i + 1) * b] = blk
            want = w @ r_full.T
        if module.multiplicative:
            got = apply_rows(adapter, module, torch.from_numpy(w), 0, w.shape[0]).numpy()
        else:
            got = w + additive_delta(adapter, module, w.shape, torch.float64, "cpu", exact_scale=True).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=case)


def test_inspect_describes_each_kind(tmp_path, bases, capsys):
    expected = {"loha": ("LoHa", "additive"), "ia3": ("IA³", "multiplicative"), "oft": ("OFT", "multiplicative"),
                "vera": ("VeRA", "additive"), "adalora": ("AdaLoRA", "additive"), "lokr": ("LoKr", "additive")}
    for case, (label, how) in expected.items():
        arch, config = configs()[case]
        base = bases[(arch, "float32")]
        adapter = make_adapter(base, tmp_path / case, config)
        capsys.readouterr()
        assert inspect_cli(adapter, "--base", base, "--json") == 0
        report = json.loads(capsys.readouterr().out)
        assert report["peft_type"] == PEFT_TYPES[case] and report["tuner"] == label
        assert report["modules"] and all(m["update"].startswith(how) for m in report["modules"])
        stored = sum(v.numel() for v in load_file(str(adapter / "adapter_model.safetensors")).values())
        assert report["stored_parameters"] == stored
        assert report["touched_tensors"] == len(report["modules"])
        assert inspect_cli(adapter) == 0
        assert f"PEFT {label}" in capsys.readouterr().out


def test_refusals_name_the_reason(tmp_path, bases, capsys):
    base = bases[("llama", "float32")]
    cases = {}
    arch, config = configs()["vera"]
    vera = make_adapter(base, tmp_path / "vera", config)
    edit_adapter_config(vera, save_projection=False)
    cases["save_projection"] = vera
    arch, config = configs()["ia3"]
    ia3 = make_adapter(base, tmp_path / "ia3", config)
    edit_adapter_config(ia3, peft_type="FROD")
    cases["FRoD"] = ia3
    for reason, adapter in cases.items():
        capsys.readouterr()
        rc = run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "out")
        assert_one_line_error(rc, capsys.readouterr().err, reason)
        assert_nothing_at(tmp_path / "out")
    # commands built on LoRA factors say which commands do take the tuner
    arch, config = configs()["loha"]
    loha = make_adapter(base, tmp_path / "loha", config)
    capsys.readouterr()
    rc = run_cli("analyze", "--base", base, "--adapter", loha, "--finetuned", base, "-o", tmp_path / "a")
    assert_one_line_error(rc, capsys.readouterr().err, "LoHa")
    # an IA³ vector that does not fit its layer
    arch, config = configs()["ia3"]
    bad = make_adapter(base, tmp_path / "ia3-bad", config)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.ia3_l"
    tensors[key] = torch.ones(3, 1)
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    rc = run_cli("merge", "--base", base, "--adapter", bad, "-o", tmp_path / "out")
    assert_one_line_error(rc, capsys.readouterr().err, "q_proj")
    assert_nothing_at(tmp_path / "out")


def test_pruned_adalora_merges_like_peft_with_alpha_over_init_r(tmp_path, bases):
    """AdaLoRA's rank_pattern masks: PEFT saves the kept triplets only; the scale stays α/(init_r + 1e-5)."""
    from peft import AdaLoraConfig, get_peft_model

    base = bases[("llama", "float32")]
    config = AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, total_step=10, target_modules=["q_proj", "v_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32), config)
        gen = torch.Generator().manual_seed(9)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        masks = {n.removeprefix("base_model.model.").removesuffix(".default"):
                 [True, False, True, True, False, True] if "q_proj" in n else [True, True] + [False] * 4
                 for n, _ in model.named_parameters() if n.endswith("lora_E.default")}
        model.peft_config["default"].rank_pattern = masks
        model.save_pretrained(tmp_path / "adapter")
    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert stored["base_model.model.model.layers.0.self_attn.v_proj.lora_A"].shape[0] == 2  # pruned on save
    assert run_cli("merge", "--base", base, "--adapter", tmp_path / "adapter", "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(base, tmp_path / "adapter")
    assert all(torch.equal(v, want[n]) for n, v in ours.items())
    assert run_cli("compare", "--base", base, "--adapter", tmp_path / "adapter", "--finetuned", tmp_path / "m",
                   "-o", tmp_path / "c", "--no-plots") == 0
    record = json.loads((tmp_path / "c" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
    assert {t["rank"] for t in record["tensors"] if t["name"].endswith("v_proj.weight")} == {2}
    # a mask that disagrees with the stored rank is caught
    edit_adapter_config(tmp_path / "adapter", rank_pattern={k: [True] * 6 for k in masks})
    rc = run_cli("merge", "--base", base, "--adapter", tmp_path / "adapter", "-o", tmp_path / "m2")
    assert rc == 2 and not (tmp_path / "m2").exists()


@pytest.mark.parametrize("case", ["loha", "lokr", "adalora", "vera", "ia3", "oft"])
def test_precision_runs_the_direct_paths_and_certifies_each(tmp_path, bases, case):
    arch, config = configs()[case]
    base = bases[(arch, "float32")]
    adapter = make_adapter(base, tmp_path / "adapter", config)
    assert run_cli("precision", "--base", base, "--adapter", adapter, "-o", tmp_path / "p", "--no-plots") == 0
    study = json.loads((tmp_path / "p" / "precision_results.json").read_text())
    assert [p["name"] for p in study["paths"]] == ["fp32", "fp16", "bf16"]
    assert all(p["verdict"] == "EQUIVALENT (certified)" for p in study["paths"])
    assert "cast-first paths skipped" in study["notes"][0]


@pytest.mark.parametrize("method", ["gptq", "bitsandbytes"])
def test_quantized_base_is_refused_with_the_reason(tmp_path, bases, capsys, method):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(bases[("llama", "float32")], base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "load_in_4bit": method == "bitsandbytes"}
    (base / "config.json").write_text(json.dumps(config))
    arch, lora = configs()["loha"]
    adapter = make_adapter(bases[("llama", "float32")], tmp_path / "adapter", lora)
    capsys.readouterr()
    rc = run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    assert_one_line_error(rc, capsys.readouterr().err, "quantized", method)
    assert_nothing_at(tmp_path / "m")
