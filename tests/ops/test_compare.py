"""`loratv compare` against independent oracles: PEFT's own merges, dense float64 NumPy, and planted errors.

Verdicts are checked on models merged by loratv and by PEFT (fp32, fp16 both ways, bf16); categories are counted
from the base with NumPy; metrics are recomputed densely in float64 from the files.
"""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file

from helpers_io import assert_nothing_at, assert_one_line_error, example, loratv_cache, run_cli  # noqa: F401
from tiny_models import BASES, CASES, build_adapter, build_base, peft_model

CATEGORY_KEYS = {"shared", "adapter-only", "tv-only", "cast-artifact", "unexplained", "unchanged"}
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _merged_example(example, tmp_path, precision="fp32"):
    out = tmp_path / f"merged_{precision}"
    rc, _, err = _cli(["merge", "--base", example["base"], "--adapter", example["adapter"], "-o", out,
                       "--precision", precision, "--quiet"])
    assert rc == 0, err
    return out


def _cli(argv):
    from loratv.cli.app import main

    return main([str(a) for a in argv]), "", ""


def _compare(base, adapter, out, *, finetuned=None, task_vector=None, extra=()):
    from loratv.cli.app import main

    argv = ["compare", "--base", base, "--adapter", adapter, "-o", out, "--no-plots", "--quiet", *extra]
    argv += ["--finetuned", finetuned] if finetuned is not None else ["--task-vector", task_vector]
    rc = main([str(a) for a in argv])
    record = json.loads((out / "comparison_results.json").read_text()) if out.exists() else None
    return rc, record


def _save_peft_merge(base, adapter, out, dtype=None, cast_after=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft_model(base, adapter, dtype).merge_and_unload()
    if cast_after is not None:
        merged = merged.to(cast_after)
    merged.save_pretrained(out)
    return out


def _adapter_deltas(adapter_dir, base_state, transposed=()):
    """Dense float64 ΔW per base tensor name, from the adapter file with NumPy (the oracle)."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = np_load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        d = scale * (b.astype(np.float64) @ a.astype(np.float64))
        name = module + ".weight"
        deltas[name] = d.T if any(module.endswith(t) for t in transposed) else d
        assert deltas[name].shape == base_state[name].shape
    return deltas


def _f64(tensor):
    return tensor.to(torch.float64).numpy()


def _untargeted_cast_changes(base_state, targeted, dtype):
    """Untargeted tensors that the cast to dtype changes (NumPy/torch round trip, independent of compare)."""
    return sum(
        1 for n, w in base_state.items()
        if n not in targeted and not torch.equal(w.to(dtype).to(w.dtype), w)
    )


# ---------------------------------------------------------------- the embedded example


def test_example_fp32_is_certified_and_metrics_equal_dense_float64(example, tmp_path):
    merged = _merged_example(example, tmp_path)
    rc, record = _compare(example["base"], example["adapter"], tmp_path / "cmp", finetuned=merged)
    assert rc == 0
    s = record["summary"]
    assert s["verdict"] == "EQUIVALENT (certified)"
    assert set(s["counts"]) == CATEGORY_KEYS
    assert s["counts"] == {"shared": 120, "adapter-only": 0, "tv-only": 0, "cast-artifact": 0, "unexplained": 0,
                           "unchanged": 363}

    base = load_file(str(example["base"] / "model.safetensors"))
    ft = load_file(str(merged / "model.safetensors"))
    deltas = _adapter_deltas(example["adapter"], base)
    by_name = {t["name"]: t for t in record["tensors"]}
    sum_dot = sum_t = sum_d = 0.0
    cosines = []
    for name, d in deltas.items():
        t = _f64(ft[name]) - _f64(base[name])
        rec = by_name[name]
        dot, nt, nd = float((t * d).sum()), float(np.linalg.norm(t)), float(np.linalg.norm(d))
        assert rec["dot"] == pytest.approx(dot, rel=1e-12)
        assert rec["task_vector_norm"] == pytest.approx(nt, rel=1e-12)
        assert rec["lora_delta_norm"] == pytest.approx(nd, rel=1e-12)
        assert rec["cosine"] == pytest.approx(dot / (nt * nd), rel=1e-12)
        assert rec["max_abs_diff"] == pytest.approx(float(np.abs(t - d).max()), rel=1e-9)
        assert rec["relative_frobenius_error"] == pytest.approx(float(np.linalg.norm(t - d)) / nt, rel=1e-9)
        assert rec["base_norm"] == pytest.approx(float(np.linalg.norm(_f64(base[name]))), rel=1e-12)
        assert 0 <= rec["certificate_ratio"] <= 1
        sum_dot, sum_t, sum_d = sum_dot + dot, sum_t + nt**2, sum_d + nd**2
        cosines.append(dot / (nt * nd))
    assert s["global_cosine"] == pytest.approx(sum_dot / np.sqrt(sum_t * sum_d), rel=1e-12)
    assert s["mean_cosine"] == pytest.approx(np.mean(cosines), rel=1e-12)
    assert s["min_cosine"] == pytest.approx(min(cosines), rel=1e-12)
    assert s["perfect_matches"] == sum(c > 0.9999 for c in cosines) == 120
    assert s["total_parameters"] == sum(w.numel() for w in base.values())
    assert s["parameters"]["shared"] == sum(base[n].numel() for n in deltas)
    assert s["adapter_stored_parameters"] == sum(v.size for v in np_load_file(str(example["adapter"] / "adapter_model.safetensors")).values())

    stored = load_file(str(tmp_path / "cmp" / "lora_deltas.safetensors"))
    assert set(stored) == set(deltas)
    for name, d in deltas.items():
        assert stored[name].dtype == torch.float32
        gap = np.abs(_f64(stored[name]) - d)
        assert (gap <= np.spacing(np.abs(d).astype(np.float32)).astype(np.float64)).all(), name


def test_example_fp16_has_363_cast_artifacts_and_is_certified(example, tmp_path):
    merged = _merged_example(example, tmp_path, "fp16")
    tv = tmp_path / "tv16"
    from loratv.cli.app import main

    assert main(["extract", "--base", str(example["base"]), "--finetuned", str(merged), "-o", str(tv), "--quiet"]) == 0
    for k, kwargs in enumerate(({"task_vector": tv}, {"task_vector": tv / "task_vector.safetensors"}, {"finetuned": merged})):
        out = tmp_path / f"cmp_{k}"
        rc, record = _compare(example["base"], example["adapter"], out, **kwargs)
        s = record["summary"]
        assert rc == 0 and s["verdict"] == "EQUIVALENT (certified)"
        assert s["counts"]["shared"] == 120
        assert s["counts"]["cast-artifact"] == s["counts"]["tv-only"] == 363
        assert s["counts"]["unexplained"] == s["counts"]["unchanged"] == 0
        assert {t["cast_dtype"] for t in record["tensors"] if t["category"] == "cast-artifact"} == {"F16"}
        assert any("cast" in note for note in record["notes"])


def _perturbed_copy(src, dst, name, index, delta):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    flat = state[name].reshape(-1)
    flat[index] += delta
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_one_element_off_by_1e_3_is_not_equivalent_and_named(example, tmp_path, capsys):
    merged = _merged_example(example, tmp_path)
    target = "model.layers.7.self_attn.v_proj.weight"
    bad = _perturbed_copy(merged, tmp_path / "bad", target, 5, 1e-3)
    rc, record = _compare(example["base"], example["adapter"], tmp_path / "cmp", finetuned=bad)
    assert rc == 1
    s = record["summary"]
    assert s["verdict"] == "NOT EQUIVALENT"
    assert s["worst_tensors"][0] == target
    assert target in s["reasons"][0]
    rec = next(t for t in record["tensors"] if t["name"] == target)
    assert rec["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert rec["certificate_ratio"] > 1e3
    assert rec["worst_element"] == [0, 5]
    # every other targeted tensor is still certified
    assert all(t["certificate_ratio"] <= 1 for t in record["tensors"] if t["targeted"] and t["name"] != target)


def test_untargeted_change_is_unexplained(example, tmp_path):
    merged = _merged_example(example, tmp_path)
    target = "model.layers.2.mlp.c_fc.bias"
    bad = _perturbed_copy(merged, tmp_path / "bad", target, 0, 1e-3)
    rc, record = _compare(example["base"], example["adapter"], tmp_path / "cmp", finetuned=bad)
    assert rc == 1
    s = record["summary"]
    assert s["counts"]["unexplained"] == 1 and s["counts"]["tv-only"] == 1
    assert s["verdict"] == "NOT EQUIVALENT" and target in " ".join(s["reasons"])
    rec = next(t for t in record["tensors"] if t["name"] == target)
    assert rec["category"] == "unexplained" and rec["changed_elements"] == 1


def test_a_few_ulps_off_fails_the_certificate_but_passes_the_tolerance(example, tmp_path):
    merged = _merged_example(example, tmp_path)
    target = "model.layers.0.self_attn.q_proj.weight"
    state = load_file(str(merged / "model.safetensors"))
    value = state[target].reshape(-1)[3]
    step = float(torch.nextafter(value.abs(), torch.tensor(float("inf"))) - value.abs())
    bad = _perturbed_copy(merged, tmp_path / "bad", target, 3, 16 * step)
    rc, record = _compare(example["base"], example["adapter"], tmp_path / "cmp", finetuned=bad)
    s = record["summary"]
    assert s["verdict"] == "EQUIVALENT within tolerance" and rc == 0
    assert not s["certified"] and s["within_tolerance"]
    assert s["worst_tensors"] == [target]
    rc, record = _compare(example["base"], example["adapter"], tmp_path / "cmp2", finetuned=bad,
                          extra=["--tolerance", "1e-12"])
    assert rc == 1 and record["summary"]["verdict"] == "NOT EQUIVALENT"


def test_adapter_from_another_seed_is_not_equivalent(example, tmp_path):
    merged = _merged_example(example, tmp_path)
    other = tmp_path / "other_adapter"
    shutil.copytree(example["adapter"], other)
    tensors = load_file(str(other / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(12345)
    tensors = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
    save_file(tensors, str(other / "adapter_model.safetensors"), metadata={"format": "pt"})
    rc, record = _compare(example["base"], other, tmp_path / "cmp", finetuned=merged)
    s = record["summary"]
    assert rc == 1 and s["verdict"] == "NOT EQUIVALENT"
    assert s["counts"]["shared"] == 120
    assert abs(s["global_cosine"]) < 0.2
    assert s["perfect_matches"] == 0


def test_comparing_with_the_base_itself_reports_adapter_only(example, tmp_path):
    rc, record = _compare(example["base"], example["adapter"], tmp_path / "cmp", finetuned=example["base"])
    s = record["summary"]
    assert rc == 1 and s["verdict"] == "NOT EQUIVALENT"
    assert s["counts"]["adapter-only"] == 120 and s["counts"]["unchanged"] == 363
    assert "does not" in s["reasons"][0]


# ---------------------------------------------------------------- PEFT's merges as the fine-tuned model


@pytest.fixture(scope="module")
def starcoder2_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sc2")
    base = build_base("starcoder2", root / "base")
    adapter = build_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=QKVO)
    return base, adapter


def test_peft_fp32_merge_is_certified(starcoder2_pair, tmp_path):
    base, adapter = starcoder2_pair
    ft = _save_peft_merge(base, adapter, tmp_path / "peft32")
    rc, record = _compare(base, adapter, tmp_path / "cmp", finetuned=ft)
    s = record["summary"]
    assert rc == 0 and s["verdict"] == "EQUIVALENT (certified)"
    assert s["counts"]["shared"] == 2 * 4 and s["counts"]["tv-only"] == 0


@pytest.mark.parametrize("how", ["loaded_in_fp16", "merged_then_cast"])
def test_peft_fp16_merge_of_fp32_base_is_certified_with_cast_artifacts(starcoder2_pair, tmp_path, how):
    base, adapter = starcoder2_pair
    if how == "loaded_in_fp16":
        ft = _save_peft_merge(base, adapter, tmp_path / "peft16", dtype=torch.float16)
    else:
        ft = _save_peft_merge(base, adapter, tmp_path / "peft16", cast_after=torch.float16)
    rc, record = _compare(base, adapter, tmp_path / "cmp", finetuned=ft)
    s = record["summary"]
    base_state = load_file(str(base / "model.safetensors"))
    targeted = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in QKVO}
    assert rc == 0 and s["verdict"] == "EQUIVALENT (certified)", s["reasons"]
    assert s["counts"]["shared"] == len(targeted)
    assert s["counts"]["cast-artifact"] == _untargeted_cast_changes(base_state, targeted, torch.float16)
    assert s["counts"]["unexplained"] == 0


def test_peft_bf16_model_merge_is_certified(tmp_path):
    base = build_base("llama", tmp_path / "base", dtype=torch.bfloat16)
    adapter = build_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    ft = _save_peft_merge(base, adapter, tmp_path / "peft_bf16")
    rc, record = _compare(base, adapter, tmp_path / "cmp", finetuned=ft)
    s = record["summary"]
    assert rc == 0 and s["verdict"] == "EQUIVALENT (certified)", s["reasons"]
    assert s["counts"]["shared"] == 4 and s["counts"]["tv-only"] == 0


def test_gpt2_conv1d_merge_by_peft_is_certified(tmp_path):
    base = build_base("gpt2", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                            fan_in_fan_out=True)
    ft = _save_peft_merge(base, adapter, tmp_path / "peft")
    rc, record = _compare(base, adapter, tmp_path / "cmp", finetuned=ft)
    s = record["summary"]
    assert rc == 0 and s["verdict"] == "EQUIVALENT (certified)", s["reasons"]
    assert s["counts"]["shared"] == 6  # c_attn + attn.c_proj + mlp.c_proj in 2 layers
    # dense oracle: the Conv1D delta is (s·B@A)ᵀ
    base_state = load_file(str(base / "model.safetensors"))
    ft_state = load_file(str(ft / "model.safetensors"))
    deltas = _adapter_deltas(adapter, base_state, transposed=("c_attn", "c_proj"))
    for rec in record["tensors"]:
        if rec["targeted"]:
            t = _f64(ft_state[rec["name"]]) - _f64(base_state[rec["name"]])
            d = deltas[rec["name"]]
            assert rec["cosine"] == pytest.approx(float((t * d).sum() / np.linalg.norm(t) / np.linalg.norm(d)), rel=1e-12)


# ---------------------------------------------------------------- CLI behaviour


def test_cli_exit_codes_and_files(example, tmp_path, capsys):
    merged = _merged_example(example, tmp_path)
    out = tmp_path / "cmp"
    rc, stdout, err = run_cli(capsys, "compare", "--base", example["base"], "--adapter", example["adapter"],
                              "--finetuned", merged, "-o", out)
    assert rc == 0, err
    assert "EQUIVALENT (certified)" in stdout
    for f in ("comparison_results.json", "detailed_comparison_report.txt", "lora_deltas.safetensors",
              "cosine_similarity_analysis.png", "norm_distribution_comparison.png",
              "model_architecture_coverage.png", "parameter_modification_heatmap.png"):
        assert (out / f).is_file(), f
    rc, stdout, err = run_cli(capsys, "compare", "--base", example["base"], "--adapter", example["adapter"],
                              "--finetuned", merged, "-o", tmp_path / "cmp_json", "--json", "--no-plots")
    assert rc == 0
    assert json.loads(stdout)["schema"] == "loratv.comparison"
    assert not (tmp_path / "cmp_json" / "cosine_similarity_analysis.png").exists()
    # an existing output is refused without --force
    rc, _, err = run_cli(capsys, "compare", "--base", example["base"], "--adapter", example["adapter"],
                         "--finetuned", merged, "-o", out)
    assert_one_line_error(rc, err, out)


def test_task_vector_of_another_model_is_refused(example, tmp_path, capsys):
    other = tmp_path / "other"
    build_base("llama", other)
    tv = tmp_path / "tv"
    from loratv.cli.app import main

    assert main(["extract", "--base", str(other), "--finetuned", str(other), "-o", str(tv), "--dense", "--quiet"]) == 0
    out = tmp_path / "cmp"
    rc, _, err = run_cli(capsys, "compare", "--base", example["base"], "--adapter", example["adapter"],
                         "--task-vector", tv, "-o", out)
    assert_one_line_error(rc, err, "task_vector")
    assert_nothing_at(out)


def test_missing_task_vector_and_output_into_input_are_refused(example, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc, _, err = run_cli(capsys, "compare", "--base", example["base"], "--adapter", example["adapter"],
                         "--task-vector", tmp_path / "nope", "-o", out)
    assert_one_line_error(rc, err, "nope")
    assert_nothing_at(out)
    merged = _merged_example(example, tmp_path)
    rc, _, err = run_cli(capsys, "compare", "--base", example["base"], "--adapter", example["adapter"],
                         "--finetuned", merged, "-o", merged / "inside")
    assert_one_line_error(rc, err, "inside")


def test_finetuned_with_nan_is_refused(example, tmp_path, capsys):
    merged = _merged_example(example, tmp_path)
    bad = _perturbed_copy(merged, tmp_path / "bad", "model.norm.weight", 0, float("nan"))
    out = tmp_path / "cmp"
    rc, _, err = run_cli(capsys, "compare", "--base", example["base"], "--adapter", example["adapter"],
                         "--finetuned", bad, "-o", out)
    assert_one_line_error(rc, err, "model.norm.weight", "NaN")
    assert_nothing_at(out)


# ---------------------------------------------------------------- every PEFT LoRA case merge supports


UNTYING_CASES = {"starcoder2_tied_modules_to_save_head", "starcoder2_tied_modules_to_save_embedding"}


@pytest.mark.parametrize("case", [
    "llama_rslora", "llama_patterns", "llama_modules_to_save_head", "llama_embedding", "starcoder2_bias_all",
    "starcoder2_lora_bias", "starcoder2_tied_embedding", "starcoder2_tied_lm_head", "bf16_llama_golden",
    "starcoder2_tied_modules_to_save_head",
])
def test_peft_merge_of_every_lora_case_is_certified(case, tmp_path, capsys):
    base_kind, lora = CASES[case]
    kind, dtype = BASES[base_kind]
    base = build_base(kind, tmp_path / "base", dtype=dtype)
    adapter = build_adapter(base, tmp_path / "adapter", **lora)
    ft = _save_peft_merge(base, adapter, tmp_path / "peft")
    out = tmp_path / "cmp"
    if case in UNTYING_CASES:  # the merged model stores a head the base does not: refused, clearly
        rc, _, err = run_cli(capsys, "compare", "--base", base, "--adapter", adapter, "--finetuned", ft, "-o", out)
        assert_one_line_error(rc, err, "untied")
        assert_nothing_at(out)
        return
    rc, record = _compare(base, adapter, out, finetuned=ft)
    s = record["summary"]
    assert rc == 0 and s["verdict"] == "EQUIVALENT (certified)", s["reasons"]
    # shared = exactly the tensors PEFT's merge changed (read independently from the two files)
    base_state = load_file(str(base / "model.safetensors"))
    ft_state = load_file(str(ft / "model.safetensors"))
    changed = {n for n, w in base_state.items() if not torch.equal(ft_state[n], w)}
    assert {t["name"] for t in record["tensors"] if t["category"] == "shared"} == changed
    assert s["counts"]["tv-only"] == 0


def _train_adapter(base, out, seed, steps=6):
    """A short real LoRA training run (PEFT, AdamW, causal-LM loss); `seed` sets the LoRA init."""
    from peft import LoraConfig, get_peft_model

    from tiny_models import VOCAB, load_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    data = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(42))
    model.train()
    for _ in range(steps):
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return out


def test_adapter_trained_from_another_seed_is_not_equivalent(tmp_path):
    base = build_base("starcoder2", tmp_path / "base", seed=3)
    ours = _train_adapter(base, tmp_path / "seed0", seed=0)
    other = _train_adapter(base, tmp_path / "seed1", seed=1)
    merged = tmp_path / "merged"
    from loratv.cli.app import main

    assert main(["merge", "--base", str(base), "--adapter", str(ours), "-o", str(merged), "--quiet"]) == 0
    rc, record = _compare(base, ours, tmp_path / "same", finetuned=merged)
    assert rc == 0 and record["summary"]["verdict"] == "EQUIVALENT (certified)"
    rc, record = _compare(base, other, tmp_path / "other", finetuned=merged)
    s = record["summary"]
    assert rc == 1 and s["verdict"] == "NOT EQUIVALENT"
    assert s["counts"]["shared"] == 4 and s["max_certificate_ratio"] > 1e3
    assert s["global_cosine"] < 0.9 and s["perfect_matches"] == 0
    assert len(s["reasons"]) == 4 and all("rounding bound" in r for r in s["reasons"])
