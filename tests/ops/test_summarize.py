"""`loratv summarize`: a task vector's counts, norms, groupings, sparsity and spectra, against float64 NumPy oracles.

Every oracle reads the models (or the stored task vector) with safetensors.numpy directly and computes in float64;
loratv's output is only ever compared with it, never fed back.
"""

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers_io import assert_one_line_error, run_cli, run_json, write_model
from loratv.cli.app import main

LAYER = re.compile(r"\.layers\.(\d+)\.")


def place(name):
    m = LAYER.search(name)
    return (int(m.group(1)), name[m.end():]) if m else (None, name)


def oracle(base: dict, ft: dict | None = None, stored: dict | None = None) -> dict:
    """Per tensor T in float64 (F − W, or as stored in a task vector file: a tensor not stored is zero) and its
    statistics, plus per-layer and per-kind sums."""
    tensors = {}
    for name, w in base.items():
        if stored is not None:
            t = stored[name].astype(np.float64) if name in stored else np.zeros(w.shape)
        else:
            t = ft[name].astype(np.float64) - w.astype(np.float64)
        tensors[name] = {"t": t, "norm": float(np.sqrt((t * t).sum())), "max_abs": float(np.abs(t).max(initial=0)),
                         "nonzero": int(np.count_nonzero(t)), "size": t.size,
                         "base_norm": float(np.sqrt((w.astype(np.float64) ** 2).sum()))}
    layers, kinds = {}, {}
    for name, o in tensors.items():
        layer, kind = place(name)
        for table, key in ((layers, layer), (kinds, kind)):
            g = table.setdefault(key, {"sq": 0.0, "max": 0.0, "nonzero": 0, "size": 0, "tensors": 0, "changed": 0})
            g["sq"] += o["norm"] ** 2
            g["max"] = max(g["max"], o["max_abs"])
            g["nonzero"] += o["nonzero"]
            g["size"] += o["size"]
            g["tensors"] += 1
            g["changed"] += o["nonzero"] > 0
    return {"tensors": tensors, "layers": layers, "kinds": kinds}


@pytest.fixture
def planted(tmp_path):
    """A small float32 model and a fine-tuned copy: a planted rank-3 change, a sparse change, a changed norm vector,
    and unchanged tensors (embedding, a layer-1 matrix)."""
    rng = np.random.default_rng(7)
    base = {
        "model.embed_tokens.weight": rng.standard_normal((40, 24)).astype(np.float32) * 0.02,
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((24, 24)).astype(np.float32) * 0.02,
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((48, 24)).astype(np.float32) * 0.02,
        "model.layers.0.input_layernorm.weight": (1 + 0.05 * rng.standard_normal(24)).astype(np.float32),
        "model.layers.1.self_attn.q_proj.weight": rng.standard_normal((24, 24)).astype(np.float32) * 0.02,
        "model.layers.1.mlp.up_proj.weight": rng.standard_normal((48, 24)).astype(np.float32) * 0.02,
        "model.norm.weight": (1 + 0.05 * rng.standard_normal(24)).astype(np.float32),
    }
    ft = {k: v.copy() for k, v in base.items()}
    # rank 3 with well-separated singular values 0.05, 0.03, 0.02
    u, _ = np.linalg.qr(rng.standard_normal((24, 3)))
    v, _ = np.linalg.qr(rng.standard_normal((24, 3)))
    low_rank = (u * np.array([0.05, 0.03, 0.02])) @ v.T
    ft["model.layers.0.self_attn.q_proj.weight"] = (base["model.layers.0.self_attn.q_proj.weight"] + low_rank).astype(np.float32)
    up = ft["model.layers.1.mlp.up_proj.weight"]
    up[5, 7] += np.float32(0.25)
    up[40, 0] -= np.float32(0.125)
    ft["model.layers.0.input_layernorm.weight"] = (base["model.layers.0.input_layernorm.weight"] + 0.01).astype(np.float32)
    b = write_model(tmp_path / "base", base)
    f = write_model(tmp_path / "ft", ft)
    return {"base": b, "ft": f, "base_t": base, "ft_t": ft, "rank": 3,
            "low_rank_name": "model.layers.0.self_attn.q_proj.weight"}


def check_against_oracle(rec: dict, o: dict, *, with_base: bool):
    rows = {t["name"]: t for t in rec["tensors"]}
    assert set(rows) == set(o["tensors"])
    for name, expected in o["tensors"].items():
        row = rows[name]
        assert row["nonzero"] == expected["nonzero"], name
        assert row["changed"] == (expected["nonzero"] > 0)
        assert row["l2_norm"] == pytest.approx(expected["norm"], rel=1e-12, abs=1e-300)
        assert row["max_abs"] == expected["max_abs"]
        assert row["zero_fraction"] == pytest.approx(1 - expected["nonzero"] / expected["size"])
        assert (row["layer"], row["kind"]) == place(name)
        if with_base:
            assert row["base_norm"] == pytest.approx(expected["base_norm"], rel=1e-12)
            if expected["nonzero"]:
                assert row["relative_change"] == pytest.approx(expected["norm"] / expected["base_norm"], rel=1e-12)
    for key, table in (("layer", o["layers"]), ("kind", o["kinds"])):
        groups = {g[key]: g for g in rec["layers" if key == "layer" else "kinds"]}
        assert set(groups) == set(table)
        for value, expected in table.items():
            g = groups[value]
            assert g["tensors"] == expected["tensors"] and g["changed_tensors"] == expected["changed"]
            assert g["changed_elements"] == expected["nonzero"] and g["parameters"] == expected["size"]
            assert g["l2_norm"] == pytest.approx(np.sqrt(expected["sq"]), rel=1e-12)
            assert g["max_abs"] == expected["max"]
    total = sum(e["size"] for e in o["tensors"].values())
    nonzero = sum(e["nonzero"] for e in o["tensors"].values())
    assert rec["counts"]["tensors"]["changed"] == sum(e["nonzero"] > 0 for e in o["tensors"].values())
    assert rec["counts"]["parameters"]["changed_elements"] == nonzero
    assert rec["sparsity"]["zero_fraction_of_model"] == pytest.approx(1 - nonzero / total)
    assert rec["norms"]["l2_norm"] == pytest.approx(np.sqrt(sum(e["norm"] ** 2 for e in o["tensors"].values())), rel=1e-12)


def test_computed_task_vector_matches_numpy(planted, capsys):
    rec = run_json(capsys, "summarize", "--base", planted["base"], "--finetuned", planted["ft"])
    assert rec["schema"] == "loratv.task_vector_summary" and rec["inputs"]["source"] == "computed"
    o = oracle(load_file(str(planted["base"] / "model.safetensors")), load_file(str(planted["ft"] / "model.safetensors")))
    check_against_oracle(rec, o, with_base=True)
    assert rec["counts"]["tensors"] == {"total": 7, "stored": None, "changed": 3}
    assert rec["counts"]["parameters"]["total"] == sum(e["size"] for e in o["tensors"].values())
    # largest by norm: the rank-3 change, then the sparse one, then the norm vector
    by_norm = [t["name"] for t in rec["largest"]["by_norm"]]
    expected = sorted((n for n, e in o["tensors"].items() if e["nonzero"]), key=lambda n: -o["tensors"][n]["norm"])
    assert by_norm == expected
    assert rec["tensors"][[t["name"] for t in rec["tensors"]].index("model.layers.1.mlp.up_proj.weight")]["nonzero"] == 2


def test_real_architecture_counts(tmp_path, capsys):
    """A tiny real Llama (tests/tiny_models.py), two tensors changed: every count and norm against NumPy."""
    from tiny_models import build_base

    base = build_base("llama", tmp_path / "base")
    tensors = load_file(str(base / "model.safetensors"))
    ft = {k: v.copy() for k, v in tensors.items()}
    ft["model.layers.1.self_attn.v_proj.weight"][:, 3] += np.float32(1e-3)
    ft["model.layers.0.mlp.down_proj.weight"][0, :5] *= np.float32(1.5)
    write_model(tmp_path / "ft", ft)
    rec = run_json(capsys, "summarize", "--base", base, "--finetuned", tmp_path / "ft", "--top", "1")
    check_against_oracle(rec, oracle(tensors, ft), with_base=True)
    assert rec["counts"]["tensors"]["total"] == len(tensors) and rec["counts"]["tensors"]["changed"] == 2
    assert len(rec["largest"]["by_norm"]) == 1
    groups = {g["group"]: g for g in rec["groups"]}
    assert groups["attention"]["changed_tensors"] == 1 and groups["mlp"]["changed_tensors"] == 1


@pytest.mark.parametrize("dense", [False, True])
def test_stored_task_vector_storage_and_sparsity(planted, tmp_path, capsys, dense):
    tv = tmp_path / "tv"
    argv = ["extract", "--base", planted["base"], "--finetuned", planted["ft"], "-o", tv, "--quiet"]
    assert main([str(a) for a in argv] + (["--dense"] if dense else [])) == 0
    stored_file = load_file(str(tv / "task_vector.safetensors"))  # the stored T (rounded to float32), read directly
    o = oracle(planted["base_t"], stored=stored_file)
    # the base the task vector records is gone: the summary stands on the task vector alone
    planted["base"].rename(tmp_path / "base-elsewhere")
    rec = run_json(capsys, "summarize", tv)
    planted["base"].parent.joinpath("base-elsewhere").rename(planted["base"])
    check_against_oracle(rec, o, with_base=False)
    assert rec["inputs"]["source"] == "stored" and rec["inputs"]["base"] is None
    assert rec["counts"]["tensors"] == {"total": 7, "stored": len(stored_file), "changed": 3}
    assert rec["counts"]["tensors"]["stored"] == (7 if dense else 3)
    stored_size = sum(a.size for a in stored_file.values())
    assert rec["counts"]["parameters"]["stored"] == stored_size
    stored_nonzero = sum(int(np.count_nonzero(a)) for a in stored_file.values())
    assert rec["sparsity"]["zero_fraction_of_stored"] == pytest.approx(1 - stored_nonzero / stored_size)
    storage = rec["storage"]
    assert storage["layout"] == ("dense" if dense else "sparse")
    assert storage["file_bytes"] == (tv / "task_vector.safetensors").stat().st_size
    assert storage["dtypes"] == {"F32": len(stored_file)}
    assert storage["metadata"]["base"] == str(planted["base"]) and storage["metadata"]["finetuned"] == str(planted["ft"])
    recorded = json.loads((tv / "task_vector.json").read_text())
    assert storage["rounded_elements"] == sum(t["rounded_elements"] for t in recorded["tensors"])
    assert rec["largest"]["by_relative_change"] is None and rec["norms"]["relative_change"] is None
    # with the base: relative changes as well, given or (when it is still there) taken from the task vector's record
    rec = run_json(capsys, "summarize", tv, "--base", planted["base"])
    check_against_oracle(rec, o, with_base=True)
    rec = run_json(capsys, "summarize", tv)
    check_against_oracle(rec, o, with_base=True)
    assert rec["notes"][0] == f"base taken from the task vector's record: {planted['base']}"


def test_planted_rank_is_found(planted, tmp_path, capsys):
    name, k = planted["low_rank_name"], planted["rank"]
    t = planted["ft_t"][name].astype(np.float64) - planted["base_t"][name].astype(np.float64)
    s = np.linalg.svd(t, compute_uv=False)
    rec = run_json(capsys, "summarize", "--base", planted["base"], "--finetuned", planted["ft"], "--spectrum")
    rows = {r["name"]: r for r in rec["tensors"]}
    spec = rows[name]["spectrum"]
    assert spec["numerical_rank"] == k and spec["rank_rule"] == "rounding-floor"
    assert s[k - 1] > spec["rank_threshold"] > s[k]  # the floor separates the planted values from rounding noise
    np.testing.assert_allclose(spec["singular_values"], s[:len(spec["singular_values"])], rtol=1e-9, atol=1e-15)
    assert spec["stable_rank"] == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    p = s / s.sum()
    p = p[p > 0]
    assert spec["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert rec["spectrum"]["tensors"] == sum(1 for r in rec["tensors"] if r["spectrum"])
    assert "rounding-floor" in rec["spectrum"]["rules"]
    # the sparse change (two elements in distinct rows and columns) has rank 2; vectors get no spectrum
    assert rows["model.layers.1.mlp.up_proj.weight"]["spectrum"]["numerical_rank"] == 2
    assert rows["model.layers.0.input_layernorm.weight"]["spectrum"] is None
    # a stored task vector without the base: numpy's matrix_rank default tolerance, still rank 3
    tv = tmp_path / "tv"
    assert main(["extract", "--base", str(planted["base"]), "--finetuned", str(planted["ft"]), "-o", str(tv), "--quiet"]) == 0
    planted["base"].rename(tmp_path / "base-elsewhere")  # so that the recorded base cannot be used
    rec = run_json(capsys, "summarize", tv, "--spectrum")
    spec = {r["name"]: r for r in rec["tensors"]}[name]["spectrum"]
    assert spec["rank_rule"] == "matrix_rank-default" and spec["numerical_rank"] == k
    stored = load_file(str(tv / "task_vector.safetensors"))[name].astype(np.float64)
    assert spec["numerical_rank"] == np.linalg.matrix_rank(stored, tol=spec["rank_threshold"])
    assert spec["rank_threshold"] == pytest.approx(np.linalg.svd(stored, compute_uv=False)[0] * 24 * np.finfo(np.float32).eps)


def test_cast_artifacts_have_rank_zero_above_the_floor(tmp_path, capsys):
    """fp32 base, fp16 fine-tuned copy: every change is a cast; above the rounding floor nothing is left."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((32, 16)) * 0.02).astype(np.float32)
    write_model(tmp_path / "b", {"model.layers.0.mlp.fc.weight": w})
    write_model(tmp_path / "f", {"model.layers.0.mlp.fc.weight": w.astype(np.float16)})
    rec = run_json(capsys, "summarize", "--base", tmp_path / "b", "--finetuned", tmp_path / "f", "--spectrum")
    spec = rec["tensors"][0]["spectrum"]
    assert rec["tensors"][0]["changed"] and spec["numerical_rank"] == 0


def test_example_default_and_outputs(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "summarize", "--top", "3")
    assert rc == 0, err
    assert "changed 120 of 483" in out and "Per layer" in out and "Per module kind" in out
    before = sorted(p.name for p in tmp_path.iterdir())
    assert before == []  # without -o nothing is written
    out_dir = tmp_path / "summary"
    rc, out, err = run_cli(capsys, "summarize", "-o", out_dir, "--quiet")
    assert rc == 0 and out == "", err
    rec = json.loads((out_dir / "task_vector_summary.json").read_text())
    assert rec["schema"] == "loratv.task_vector_summary" and rec["schema_version"] == 1
    assert rec["counts"]["tensors"] == {"total": 483, "stored": None, "changed": 120}
    text = (out_dir / "task_vector_summary.txt").read_text()
    assert text.startswith("Task vector")
    from loratv.report.changes_text import render_summary_text

    assert render_summary_text(rec) == text  # the text renders from the saved record alone
    rc, _, err = run_cli(capsys, "summarize", "-o", out_dir)
    assert_one_line_error(rc, err, out_dir, "--force")
    assert run_cli(capsys, "summarize", "-o", out_dir, "--force", "--quiet")[0] == 0


def test_bad_inputs_exit_2_naming_the_file(planted, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert_one_line_error(*run_cli(capsys, "summarize", missing)[::2], missing)
    assert_one_line_error(*run_cli(capsys, "summarize", "--base", missing, "--finetuned", planted["ft"])[::2], missing)
    assert_one_line_error(*run_cli(capsys, "summarize", "--finetuned", planted["ft"])[::2], planted["ft"])
    assert_one_line_error(*run_cli(capsys, "summarize", "--base", planted["base"], "--finetuned", planted["ft"],
                               "--top", "0")[::2], "--top")
    # NaN in the fine-tuned model
    bad = {k: v.copy() for k, v in planted["ft_t"].items()}
    bad["model.norm.weight"][3] = np.nan
    write_model(tmp_path / "nan", bad)
    rc, _, err = run_cli(capsys, "summarize", "--base", planted["base"], "--finetuned", tmp_path / "nan")
    assert_one_line_error(rc, err, tmp_path / "nan" / "model.safetensors", "model.norm.weight", "NaN")
    # a stored task vector of another shape than the base
    tv = tmp_path / "tv"
    assert main(["extract", "--base", str(planted["base"]), "--finetuned", str(planted["ft"]), "-o", str(tv), "--quiet"]) == 0
    other = {k: v.copy() for k, v in planted["base_t"].items()}
    other["model.layers.0.self_attn.q_proj.weight"] = np.zeros((24, 25), np.float32)
    write_model(tmp_path / "other", other)
    rc, _, err = run_cli(capsys, "summarize", tv, "--base", tmp_path / "other")
    assert_one_line_error(rc, err, tv / "task_vector.safetensors", "shape")
    # Inf stored in the task vector file itself
    stored = load_file(str(tv / "task_vector.safetensors"))
    stored["model.layers.0.self_attn.q_proj.weight"][0, 0] = np.inf
    save_file(stored, str(tmp_path / "inf.safetensors"))
    rc, _, err = run_cli(capsys, "summarize", tmp_path / "inf.safetensors")
    assert_one_line_error(rc, err, tmp_path / "inf.safetensors", "NaN or Inf")
