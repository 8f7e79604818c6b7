"""`loratv validate`, `loratv precision` and the seed scripts compare_lora_task_vector.py, final_validation.py and
quick_precision_test.py, on the embedded example. Counts are checked against the base and the adapter read with
safetensors/NumPy, not against loratv's own records."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file

from helpers_io import REPO, example, loratv_cache, run_cli, run_subprocess  # noqa: F401

TARGETED = {f"model.layers.{i}.self_attn.{m}.weight" for i in range(30) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}


def _example_arrays(example):
    base = load_file(str(example["base"] / "model.safetensors"))
    adapter = np_load_file(str(example["adapter"] / "adapter_model.safetensors"))
    deltas = {}
    for key, a in adapter.items():
        if key.endswith("lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = adapter[key.replace("lora_A", "lora_B")]
            deltas[module + ".weight"] = 2.0 * (b.astype(np.float64) @ a.astype(np.float64))
    return base, deltas


def test_validate_prints_the_seed_summary_and_writes_everything(example, tmp_path, capsys):
    out = tmp_path / "val"
    rc, stdout, err = run_cli(capsys, "validate", "-o", out, "--quiet")
    assert rc == 0 and stdout == "", err
    rc, stdout, err = run_cli(capsys, "validate", "-o", out, "--force", "--precision", "fp16")
    assert rc == 0, err
    assert "Shared tensors analysed: 120" in stdout
    assert "Perfect matches (cosine > 0.9999): 120 of 120" in stdout
    assert "Verdict: EQUIVALENT (certified)" in stdout
    assert "363 of them are cast artifacts" in stdout  # printed whenever tv-only tensors exist
    for f in ("comparison_results.json", "detailed_comparison_report.txt", "lora_deltas.safetensors",
              "merged_model_fp16/model.safetensors", "task_vectors_fp16/task_vector.safetensors",
              "parameter_modification_heatmap.png"):
        assert (out / f).is_file(), f
    record = json.loads((out / "comparison_results.json").read_text())
    assert record["inputs"]["task_vector"] == str(out / "task_vectors_fp16")
    base, _ = _example_arrays(example)
    changed_by_cast = sum(1 for n, w in base.items() if n not in TARGETED and not torch.equal(w.half().float(), w))
    assert record["summary"]["counts"]["cast-artifact"] == changed_by_cast == 363


def test_precision_study_counts_and_vanished_updates(example, tmp_path, capsys):
    out = tmp_path / "prec"
    rc, stdout, err = run_cli(capsys, "precision", "-o", out, "--keep-merged")
    assert rc == 0, err
    study = json.loads((out / "precision_results.json").read_text())
    paths = {p["name"]: p for p in study["paths"]}
    assert list(paths) == ["fp32", "fp16", "bf16", "fp16-cast-first", "bf16-cast-first"]
    assert paths["fp32"]["changed_tensors"] == 120 and paths["fp32"]["counts"]["cast-artifact"] == 0
    for name in ("fp16", "bf16", "fp16-cast-first", "bf16-cast-first"):
        p = paths[name]
        assert p["changed_tensors"] == 483, name
        assert p["counts"] == {"real": 120, "cast-artifact": 363, "unexplained": 0, "unchanged": 0}, name
        assert p["verdict"] == "EQUIVALENT (certified)", name
    assert (out / "precision_comparison.png").is_file() and "fp16-cast-first" in stdout

    # vanished updates, recounted from the merged weights: ΔW ≠ 0 but the stored weight is the base in that dtype
    base, deltas = _example_arrays(example)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16-cast-first", torch.float16)):
        merged = load_file(str(out / name / "merged_model" / "model.safetensors"))
        vanished = sum(
            int(((merged[n] == base[n].to(dtype)).numpy() & (d != 0)).sum()) for n, d in deltas.items()
        )
        assert paths[name]["vanished_elements"] == vanished, name
    assert paths["fp32"]["vanished_elements"] == 0 < paths["bf16"]["vanished_elements"]

    # the cast-first path really rounds the base first: its merge differs from the one-rounding fp16 merge
    once = load_file(str(out / "fp16" / "merged_model" / "model.safetensors"))
    first = load_file(str(out / "fp16-cast-first" / "merged_model" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(once[name], first[name])
    assert torch.equal(once["model.norm.weight"], first["model.norm.weight"])


def test_seed_scripts_compare_final_validation_and_quick_precision(example, tmp_path):
    base, adapter = example["base"], example["adapter"]
    for precision in ("fp16", "fp32"):
        merged = tmp_path / f"merged_model_{precision}"
        r = run_subprocess(["--base_model", base, "--lora_path", adapter, "--precision", precision, "--output_dir",
                            merged, "--quiet"], tmp_path, REPO / "merge_lora.py")
        assert r.returncode == 0, r.stderr
        r = run_subprocess(["--base_model", base, "--finetuned_model", merged, "--output_dir",
                            f"task_vectors_{precision}", "--quiet"],
                           tmp_path, REPO / "extract_task_vectors.py")
        assert r.returncode == 0, r.stderr

    r = run_subprocess([], tmp_path, REPO / "quick_precision_test.py")  # the seed's default folders
    assert r.returncode == 0, r.stderr
    assert "only in fp16: 363" in r.stdout
    assert "363 of 363 are cast artifacts" in r.stdout

    r = run_subprocess(["--base_model", base, "--lora_path", adapter, "--task_vector_path", "task_vectors_fp16",
                        "--output_dir", "cmp", "--generate_plots", "--detailed_report", "--architecture_analysis",
                        "--tolerance", "1e-5", "--device", "cpu"], tmp_path, REPO / "compare_lora_task_vector.py")
    assert r.returncode == 0, r.stderr
    assert "EQUIVALENT (certified)" in r.stdout
    assert (tmp_path / "cmp" / "model_architecture_coverage.png").is_file()

    for _ in range(2):  # no arguments needed, and it may be run again
        r = run_subprocess([], tmp_path, REPO / "final_validation.py")
        assert r.returncode == 0, r.stderr
        assert "Verdict: EQUIVALENT (certified)" in r.stdout
    (tmp_path / "elsewhere").mkdir()
    r = run_subprocess(["--output_dir", "elsewhere"], tmp_path, REPO / "final_validation.py")
    assert r.returncode == 2 and "already exists" in r.stderr  # not a validation output: never replaced


def test_quick_precision_test_reports_missing_folders(tmp_path):
    r = run_subprocess([], tmp_path, REPO / "quick_precision_test.py")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "task_vectors_fp16" in r.stderr


@pytest.mark.parametrize("storage", ["fp64"])
def test_quick_precision_test_proves_fp16_is_fp32_rounded(example, tmp_path, storage, capsys):
    from loratv.cli.app import main

    for precision in ("fp16", "fp32"):
        merged = tmp_path / f"m{precision}"
        assert main(["merge", "--base", str(example["base"]), "--adapter", str(example["adapter"]), "-o", str(merged),
                     "--precision", precision, "--quiet"]) == 0
        assert main(["extract", "--base", str(example["base"]), "--finetuned", str(merged), "-o",
                     str(tmp_path / f"tv{precision}"), "--storage-dtype", storage, "--quiet"]) == 0
    from loratv.cli.seed_scripts import quick_precision_main

    capsys.readouterr()
    assert quick_precision_main(["--fp16_dir", str(tmp_path / "tvfp16"), "--fp32_dir", str(tmp_path / "tvfp32"),
                                 "--json"]) == 0
    pair = json.loads(capsys.readouterr().out)
    assert pair["shared_tensors"] == 120 and pair["shared_undecided"] == 0
    assert pair["shared_equal_to_fp32_rounded"] == 120
    assert pair["fp16_only_cast_artifacts"] == 363


def test_quick_precision_test_refuses_a_nan_in_a_shared_tensor(example, tmp_path, capsys):
    """A NaN in one shared task-vector tensor is named (Python's max() would drop it and report a gap of 0)."""
    from loratv.cli.app import main
    from loratv.cli.seed_scripts import quick_precision_main

    for precision in ("fp16", "fp32"):
        merged = tmp_path / f"m{precision}"
        assert main(["merge", "--base", str(example["base"]), "--adapter", str(example["adapter"]), "-o", str(merged),
                     "--precision", precision, "--quiet"]) == 0
        assert main(["extract", "--base", str(example["base"]), "--finetuned", str(merged), "-o",
                     str(tmp_path / f"tv{precision}"), "--storage-dtype", "fp64", "--quiet"]) == 0
    file = tmp_path / "tvfp16" / "task_vector.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.3.self_attn.v_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(file))
    capsys.readouterr()
    assert quick_precision_main(["--fp16_dir", str(tmp_path / "tvfp16"), "--fp32_dir", str(tmp_path / "tvfp32")]) == 2
    err = capsys.readouterr().err
    assert name in err and "NaN" in err
