"""`loratv analyze`: distributions, residual in ulps, spectra and ranks. Oracles: float64 NumPy on the files
(moments, norms, cosines, SVD, np.spacing for ulps) and the adapter's own factors (B @ A · s), never loratv's
output fed back to itself."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers_io import REPO, example, loratv_cache, run_subprocess  # noqa: F401 - fixtures are found by name


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + ["--quiet"])


@pytest.fixture(scope="module")
def merged(example, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("analyze")
    out = {}
    for precision in ("fp32", "fp16"):
        m, tv, cmp = root / f"m{precision}", root / f"tv{precision}", root / f"cmp{precision}"
        assert run_cli("merge", "--base", example["base"], "--adapter", example["adapter"], "-o", m,
                       "--precision", precision) == 0
        assert run_cli("extract", "--base", example["base"], "--finetuned", m, "-o", tv) == 0
        assert run_cli("compare", "--base", example["base"], "--adapter", example["adapter"], "--task-vector", tv,
                       "-o", cmp, "--no-plots") in (0, 1)
        out[precision] = {"merged": m, "tv": tv, "cmp": cmp}
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def fp32_record(example, merged):  # noqa: F811
    out = merged["root"] / "an32"
    assert run_cli("analyze", "--base", example["base"], "--adapter", example["adapter"], "--finetuned",
                   merged["fp32"]["merged"], "-o", out, "--spectrum") == 0
    return json.loads((out / "analysis_results.json").read_text()), out


def lora_deltas_numpy(adapter_dir) -> dict:
    """ΔW = (B @ A) · alpha/r in float64 NumPy, straight from the adapter file."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            out[module + ".weight"] = (b.numpy().astype(np.float64) @ a.numpy().astype(np.float64)) * scale
    return out


def test_statistics_match_numpy(example, merged, fp32_record):  # noqa: F811
    record, _ = fp32_record
    w = load_file(str(example["base"] / "model.safetensors"))
    f = load_file(str(merged["fp32"]["merged"] / "model.safetensors"))
    deltas = lora_deltas_numpy(example["adapter"])
    assert {t["name"] for t in record["tensors"]} == set(deltas)
    for row in record["tensors"][:12]:
        t = f[row["name"]].numpy().astype(np.float64) - w[row["name"]].numpy().astype(np.float64)
        d = deltas[row["name"]]
        for key, x in (("task_vector", t), ("delta", d), ("residual", t - d)):
            st = row["stats"][key]
            c = x - x.mean()
            m2, m3, m4 = (c**2).mean(), (c**3).mean(), (c**4).mean()
            assert st["mean"] == pytest.approx(x.mean(), rel=1e-9, abs=1e-14 * np.abs(x).max())
            assert st["std"] == pytest.approx(math.sqrt(m2), rel=1e-9)
            assert st["skewness"] == pytest.approx(m3 / m2**1.5, rel=1e-6, abs=1e-9)
            assert st["excess_kurtosis"] == pytest.approx(m4 / m2**2 - 3, rel=1e-6, abs=1e-9)
            assert st["quantiles"]["0.5"] == pytest.approx(np.quantile(x, 0.5), rel=1e-12, abs=1e-300)
            assert st["quantiles_exact"]
        assert row["task_vector_norm"] == pytest.approx(np.linalg.norm(t), rel=1e-12)
        assert row["delta_norm"] == pytest.approx(np.linalg.norm(d), rel=1e-12)
        cos = float((t * d).sum() / (np.linalg.norm(t) * np.linalg.norm(d)))
        assert row["cosine"] == pytest.approx(cos, abs=1e-12)


def test_ulp_histogram_matches_np_spacing(example, merged, fp32_record):  # noqa: F811
    record, _ = fp32_record
    w = load_file(str(example["base"] / "model.safetensors"))
    f = load_file(str(merged["fp32"]["merged"] / "model.safetensors"))
    deltas = lora_deltas_numpy(example["adapter"])
    row = record["tensors"][5]
    name = row["name"]
    fw, ww = f[name].numpy(), w[name].numpy()
    r = np.abs(fw.astype(np.float64) - ww.astype(np.float64) - deltas[name])
    spacing = np.maximum(np.spacing(np.abs(fw)), np.spacing(np.abs(ww))).astype(np.float64)
    ulps = r / spacing
    edges = [e if e is not None else math.inf for e in row["residual_ulp_histogram"]["edges"]]
    expected = [int(((ulps >= lo) & (ulps < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
    # the adapter's ΔW evaluated in float64 two ways (NumPy here, torch in loratv) may differ in the last bit:
    # allow a handful of elements to sit on the other side of a bin edge
    assert sum(abs(a - b) for a, b in zip(expected, row["residual_ulp_histogram"]["counts"])) <= 4
    assert row["max_residual_ulps"] == pytest.approx(ulps.max(), rel=1e-6)


def test_spectra_recover_rank_r_above_the_noise_floor(example, merged, fp32_record):  # noqa: F811
    """For a LoRA merge every targeted tensor has numerical rank exactly r = 8: σ_8(T) above the floor, σ_9(T) below,
    its leading singular values are NumPy's, and its top-8 spaces are the adapter's (angles ≈ 0)."""
    record, _ = fp32_record
    w = load_file(str(example["base"] / "model.safetensors"))
    f = load_file(str(merged["fp32"]["merged"] / "model.safetensors"))
    deltas = lora_deltas_numpy(example["adapter"])
    assert record["summary"]["numerical_rank_equals_adapter_rank"] == record["summary"]["with_adapter_rank"] == 120
    for row in record["tensors"][:16]:
        sp = row["spectrum"]
        t = f[row["name"]].numpy().astype(np.float64) - w[row["name"]].numpy().astype(np.float64)
        s = np.linalg.svd(t, compute_uv=False)
        assert sp["adapter_rank"] == 8 and sp["numerical_rank"] == 8 and not sp["numerical_rank_is_lower_bound"]
        assert s[7] > sp["noise_floor"] > s[8]
        np.testing.assert_allclose(sp["singular_values"][:8], s[:8], rtol=1e-10)
        np.testing.assert_allclose(sp["delta_singular_values"][:8],
                                   np.linalg.svd(deltas[row["name"]], compute_uv=False)[:8], rtol=1e-10)
        assert sp["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
        assert sp["energy_in_top_r"] == pytest.approx((s[:8] ** 2).sum() / (s**2).sum(), rel=1e-12)
        assert sp["column_space_max_angle_deg"] < 1e-3 and sp["row_space_max_angle_deg"] < 1e-3


def test_fp16_cast_artifacts_are_rank_zero_and_within_half_an_ulp(example, merged):  # noqa: F811
    """The seed's "363 extra tensors" of an fp16 merge: every one has numerical rank 0 (nothing above rounding) and
    |T| ≤ ½ ulp of the stored weight, read through the seed-style inputs (lora deltas file + stored task vector)."""
    out = merged["root"] / "an16"
    assert run_cli("analyze", "--base", example["base"], "--lora-deltas", merged["fp16"]["cmp"], "--task-vector",
                   merged["fp16"]["tv"], "-o", out, "--spectrum") == 0
    record = json.loads((out / "analysis_results.json").read_text())
    s = record["summary"]
    assert (s["shared"], s["task_vector_only"]) == (120, 363)
    only = [t for t in record["tensors"] if t["category"] == "task-vector-only"]
    assert all(t["max_residual_ulps"] <= 0.5 for t in only)
    spectra = [t["spectrum"] for t in only if "spectrum" in t]
    assert spectra and all(sp["numerical_rank"] == 0 for sp in spectra)
    shared = [t["spectrum"] for t in record["tensors"] if t["category"] == "shared"]
    assert all(sp["numerical_rank"] == 8 for sp in shared)  # ranks read from compare's record beside the deltas


def test_report_files(fp32_record):
    record, out = fp32_record
    from loratv.report.analysis_plots import FILES

    for name in FILES.values():
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    report = (out / "analysis_report.md").read_text()
    for heading in ("## Summary", "## Residual in ulps", "## Distributions per module kind", "## Per layer",
                    "## Spectra and ranks", "## Plots"):
        assert heading in report
    assert report.count("self_attn.q_proj.weight` |") >= 30  # one spectrum row per layer
    json.loads((out / "analysis_results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


def test_seed_script_and_verbose(example, merged, tmp_path, capsys):  # noqa: F811
    from loratv.cli.seed_scripts import analyze_main

    out = tmp_path / "seed"
    assert analyze_main(["--lora_file", str(merged["fp32"]["cmp"] / "lora_deltas.safetensors"), "--task_vector_file",
                         str(merged["fp32"]["tv"]), "--base_model", str(example["base"]), "--output_dir", str(out),
                         "--verbose", "--no_plots"]) == 0
    text = capsys.readouterr().out
    assert "120 of 120" in text and text.count("self_attn.") >= 120
    record = json.loads((out / "analysis_results.json").read_text())
    assert record["spectrum"] is True and record["inputs"]["base"] == str(example["base"])


@pytest.mark.parametrize("argv, message", [
    (["--adapter", "ADAPTER", "--task-vector", "nowhere"], "no such file"),
    (["--lora-deltas", "nowhere", "--task-vector", "TV"], "no such file"),
    (["--task-vector", "TV"], "needs the LoRA side"),
])
def test_bad_input_exits_2_without_output(example, merged, tmp_path, capsys, argv, message):  # noqa: F811
    from loratv.cli.app import main

    argv = [str(example["adapter"]) if a == "ADAPTER" else str(merged["fp32"]["tv"]) if a == "TV" else a for a in argv]
    out = tmp_path / "out"
    assert main(["analyze", "-o", str(out)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists()


def test_root_seed_script_runs_on_the_example_and_refuses_half_its_inputs(tmp_path, loratv_cache):  # noqa: F811
    script = REPO / "analyze_lora_vs_task_vector_math.py"
    proc = run_subprocess(["--output_dir", tmp_path / "a", "--no_plots", "--quiet"], cwd=tmp_path, script=script,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "a" / "analysis_results.json").read_text())
    assert record["summary"]["numerical_rank_equals_adapter_rank"] == 120
    proc = run_subprocess(["--lora_file", tmp_path / "x", "--output_dir", tmp_path / "b"], cwd=tmp_path, script=script)
    assert proc.returncode == 2 and "give both --lora_file and --task_vector_file" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "b").exists()


@pytest.mark.parametrize("source", ["finetuned", "task_vector"])
def test_row_blocks_change_nothing(example, merged, monkeypatch, source):  # noqa: F811
    """Large tensors go through in row blocks: with blocks of 15 rows every count, floor and moment must be what one
    block per tensor gives (the example's tensors otherwise fit one block)."""
    import loratv.ops.analyze as analyze_module

    inputs = {"finetuned": merged["fp32"]["merged"]} if source == "finetuned" else {"task_vector": merged["fp32"]["tv"]}
    record = analyze_module.analyze(base=example["base"], adapter=example["adapter"], **inputs)
    monkeypatch.setattr(analyze_module, "BLOCK_ELEMENTS", 1000)
    blocked = analyze_module.analyze(base=example["base"], adapter=example["adapter"], **inputs)
    for a, b in zip(blocked["tensors"], record["tensors"]):
        assert a["name"] == b["name"]
        assert a["residual_ulp_histogram"]["counts"] == b["residual_ulp_histogram"]["counts"]
        assert a["max_residual_ulps"] == b["max_residual_ulps"]
        assert a["noise_floor"] == pytest.approx(b["noise_floor"], rel=1e-12)
        for q in ("delta", "task_vector", "residual"):
            assert a["stats"][q]["std"] == pytest.approx(b["stats"][q]["std"], rel=1e-12)
            assert a["stats"][q]["skewness"] == pytest.approx(b["stats"][q]["skewness"], rel=1e-9, abs=1e-12)


def test_embedding_lora_with_a_saved_base_layer_counts_its_delta(tmp_path):
    """PEFT saves `embed_tokens.base_layer.weight` beside an embedding LoRA: ΔW is that copy − W plus s·(B@A)ᵀ,
    checked against the float64 product of the stored factors (the LoRA part must not be dropped)."""
    import loratv
    from tiny_models import build_adapter, build_base

    base = build_base("llama", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.embed_tokens."
    assert prefix + "base_layer.weight" in stored
    loratv.merge(base, adapter, tmp_path / "merged", precision="fp32")
    record = loratv.analyze(base=base, adapter=adapter, finetuned=tmp_path / "merged").to_dict()
    row = next(t for t in record["tensors"] if t["name"] == "model.embed_tokens.weight")
    w = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"].double()
    a, b = stored[prefix + "lora_embedding_A"].double(), stored[prefix + "lora_embedding_B"].double()
    want = stored[prefix + "base_layer.weight"].double() - w + (b @ a).T * (8 / 4)
    assert row["delta_norm"] == pytest.approx(float(want.norm()), rel=1e-12)
    assert row["cosine"] == pytest.approx(1.0, abs=1e-6)
