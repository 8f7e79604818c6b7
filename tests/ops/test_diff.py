"""`loratv diff`: every tensor's category and change metrics, against oracles over the raw tensors.

The oracles read both models with safetensors.numpy and classify and measure in float64 NumPy on their own (a cast
artifact: `base.astype(finetuned dtype)` equal bit for bit; ulps: `np.spacing`); loratv's record is only compared.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers_io import assert_one_line_error, run_cli, run_json, write_model



def classify(w: np.ndarray, f: np.ndarray) -> str:
    """The oracle's category of a tensor present in both models with the same shape."""
    if np.array_equal(w.astype(np.float64), f.astype(np.float64)):
        return "unchanged"
    if w.dtype != f.dtype and w.astype(f.dtype).tobytes() == f.tobytes():
        return "cast-artifact"
    return "changed"


def test_example_base_vs_fp16_merge(capsys):
    rec = run_json(capsys, "diff")
    assert rec["schema"] == "loratv.parameter_changes" and rec["schema_version"] == 1
    by = rec["summary"]["by_category"]
    assert rec["summary"]["tensors"] == 483
    assert by["changed"] == 120 and by["cast-artifact"] == 363
    assert sum(by.values()) == 483
    # the same classification, tensor by tensor, from the raw files
    base = load_file(str(Path(rec["inputs"]["base"]) / "model.safetensors"))
    ft = load_file(str(Path(rec["inputs"]["finetuned"]) / "model.safetensors"))
    rows = {t["name"]: t for t in rec["tensors"]}
    assert {n: classify(base[n], ft[n]) for n in base} == {n: rows[n]["category"] for n in base}
    changed = {n for n in base if rows[n]["category"] == "changed"}
    assert all(re.search(r"\.[qkvo]_proj\.weight$", n) for n in changed)
    kinds = {g["kind"]: g["by_category"] for g in rec["kinds"]}
    assert kinds["self_attn.q_proj.weight"]["changed"] == 30 and kinds["mlp.c_fc.weight"]["cast-artifact"] == 30
    layers = {g["layer"]: g["by_category"] for g in rec["layers"]}
    assert all(layers[i]["changed"] == 4 and layers[i]["cast-artifact"] == 12 for i in range(30))
    assert layers[None]["cast-artifact"] == 3


def test_planted_single_element_change(tmp_path, capsys):
    rng = np.random.default_rng(11)
    base = {"model.layers.0.self_attn.q_proj.weight": (rng.standard_normal((16, 8)) * 0.02).astype(np.float32),
            "model.layers.0.self_attn.q_proj.bias": (rng.standard_normal(16) * 0.01).astype(np.float32),
            "model.embed_tokens.weight": (rng.standard_normal((32, 8)) * 0.02).astype(np.float32)}
    ft = {k: v.copy() for k, v in base.items()}
    name, where, steps = "model.layers.0.self_attn.q_proj.weight", (11, 5), 37
    w = base[name][where]
    new = w
    for _ in range(steps):  # 37 floats away from the base value, away from zero
        new = np.nextafter(new, np.float32(np.inf) if w > 0 else np.float32(-np.inf))
    ft[name][where] = new
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "f", ft)
    rec = run_json(capsys, "diff", "--base", tmp_path / "b", "--finetuned", tmp_path / "f")
    assert rec["summary"]["by_category"]["changed"] == 1 and rec["summary"]["by_category"]["unchanged"] == 2
    row = {t["name"]: t for t in rec["tensors"]}[name]
    exact = float(np.float64(new) - np.float64(w))
    assert row["category"] == "changed" and row["changed_elements"] == 1
    assert row["max_abs_change"] == abs(exact)
    assert row["worst_element"] == {"index": list(where), "base": float(w), "finetuned": float(new), "change": exact,
                                    "ulps": float(steps)}
    assert row["max_change_ulps"] == abs(exact) / abs(float(np.spacing(w))) == steps
    norm = np.sqrt((base[name].astype(np.float64) ** 2).sum())
    assert row["relative_change"] == pytest.approx(abs(exact) / norm, rel=1e-12)
    assert rec["largest"]["by_max_abs_change"][0]["name"] == name


def test_change_metrics_and_every_category(tmp_path, capsys):
    rng = np.random.default_rng(5)
    f32 = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float32)  # noqa: E731
    base = {
        "model.layers.0.mlp.up_proj.weight": f32(12, 6),
        "model.layers.0.mlp.down_proj.weight": f32(6, 12),
        "model.layers.1.mlp.up_proj.weight": f32(12, 6),
        "model.layers.1.mlp.down_proj.weight": f32(6, 12),
        "model.layers.1.input_layernorm.weight": np.float32(1) + f32(6),
        "model.norm.weight": np.arange(6, dtype=np.float32),  # exactly representable in fp16: a lossless cast
        "lm_head.weight": f32(10, 6),
    }
    ft = {k: v.copy() for k, v in base.items()}
    ft["model.layers.0.mlp.up_proj.weight"] += f32(12, 6)  # changed everywhere
    ft["model.layers.0.mlp.up_proj.weight"][0] = base["model.layers.0.mlp.up_proj.weight"][0]  # …but row 0
    ft["model.layers.0.mlp.down_proj.weight"] = base["model.layers.0.mlp.down_proj.weight"].astype(np.float16)
    ft["model.layers.1.mlp.up_proj.weight"] = np.zeros((6, 12), np.float32)  # another shape
    del ft["model.layers.1.mlp.down_proj.weight"]
    ft["model.layers.1.extra.weight"] = f32(3)
    ft["model.norm.weight"] = base["model.norm.weight"].astype(np.float16)
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "f", ft)
    rec = run_json(capsys, "diff", "--base", tmp_path / "b", "--finetuned", tmp_path / "f")
    rows = {t["name"]: t for t in rec["tensors"]}
    assert {n: r["category"] for n, r in rows.items()} == {
        "model.layers.0.mlp.up_proj.weight": "changed",
        "model.layers.0.mlp.down_proj.weight": "cast-artifact",
        "model.layers.1.mlp.up_proj.weight": "shape-mismatch",
        "model.layers.1.mlp.down_proj.weight": "only-in-base",
        "model.layers.1.input_layernorm.weight": "unchanged",
        "model.norm.weight": "unchanged",
        "lm_head.weight": "unchanged",
        "model.layers.1.extra.weight": "only-in-finetuned",
    }
    assert rows["model.norm.weight"]["dtype_changed"] is True
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        w, f = base[name].astype(np.float64), ft[name].astype(np.float64)
        d = f - w
        row = rows[name]
        assert row["changed_elements"] == np.count_nonzero(d)
        assert row["max_abs_change"] == np.abs(d).max()
        assert row["relative_change"] == pytest.approx(np.sqrt((d * d).sum() / (w * w).sum()), rel=1e-12)
        assert row["max_change_ulps"] == pytest.approx((np.abs(d) / np.abs(np.spacing(base[name]))).max(), rel=1e-15)
    assert rows["model.layers.0.mlp.up_proj.weight"]["changed_elements"] == 11 * 6
    layers = {g["layer"]: g["by_category"] for g in rec["layers"]}
    assert layers[0]["changed"] == 1 and layers[0]["cast-artifact"] == 1
    assert layers[1] == {"changed": 0, "cast-artifact": 0, "unchanged": 1, "only-in-base": 1,
                         "only-in-finetuned": 1, "shape-mismatch": 1}
    assert layers[None]["unchanged"] == 2
    kinds = {g["kind"]: g["by_category"] for g in rec["kinds"]}
    assert kinds["mlp.up_proj.weight"]["changed"] == 1 and kinds["mlp.up_proj.weight"]["shape-mismatch"] == 1


def test_outputs(tmp_path, capsys):
    base = {"model.layers.0.w": np.ones((4, 4), np.float32)}
    ft = {"model.layers.0.w": np.full((4, 4), 2, np.float32)}
    write_model(tmp_path / "b", base)
    write_model(tmp_path / "f", ft)
    rc, out, err = run_cli(capsys, "diff", "--base", tmp_path / "b", "--finetuned", tmp_path / "f")
    assert rc == 0, err
    assert "1 changed" in out and sorted(p.name for p in tmp_path.iterdir()) == ["b", "f"]  # nothing written
    out_dir = tmp_path / "out"
    rc, out, err = run_cli(capsys, "diff", "--base", tmp_path / "b", "--finetuned", tmp_path / "f", "-o", out_dir)
    assert rc == 0, err
    rec = json.loads((out_dir / "parameter_changes.json").read_text())
    assert rec["schema"] == "loratv.parameter_changes" and rec["summary"]["by_category"]["changed"] == 1
    text = (out_dir / "parameter_changes.txt").read_text()
    assert text.startswith("Parameter changes")
    from loratv.report.changes_text import render_diff_text

    assert render_diff_text(rec) == text  # the text renders from the saved record alone
    rc, _, err = run_cli(capsys, "diff", "--base", tmp_path / "b", "--finetuned", tmp_path / "f", "-o", out_dir)
    assert_one_line_error(rc, err, out_dir)


def test_bad_inputs_exit_2_naming_the_file(tmp_path, capsys):
    base = {"model.layers.0.w": np.ones((4, 4), np.float32)}
    write_model(tmp_path / "b", base)
    missing = tmp_path / "missing"
    assert_one_line_error(*run_cli(capsys, "diff", "--base", tmp_path / "b", "--finetuned", missing)[::2], missing)
    assert_one_line_error(*run_cli(capsys, "diff", "--base", missing, "--finetuned", tmp_path / "b")[::2], missing)
    assert_one_line_error(*run_cli(capsys, "diff", "--base", tmp_path / "b")[::2], "--finetuned")
    nan = {"model.layers.0.w": np.ones((4, 4), np.float32)}
    nan["model.layers.0.w"][2, 2] = np.nan
    write_model(tmp_path / "nan", nan)
    rc, _, err = run_cli(capsys, "diff", "--base", tmp_path / "nan", "--finetuned", tmp_path / "b")
    assert_one_line_error(rc, err, tmp_path / "nan" / "model.safetensors", "model.layers.0.w", "NaN")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(b"\x10\x00")
    rc, _, err = run_cli(capsys, "diff", "--base", tmp_path / "b", "--finetuned", tmp_path / "trunc")
    assert_one_line_error(rc, err, tmp_path / "trunc" / "model.safetensors")
