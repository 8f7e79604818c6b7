"""The seed's research scripts (repository root): each runs with the seed's flag names and defaults, and its numbers
match NumPy over the files it read (never loratv's own records)."""

import json
import runpy
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers_io import REPO, assert_nothing_at, assert_one_line_error, example, loratv_cache  # noqa: F401

pytestmark = pytest.mark.usefixtures("loratv_cache")

SCRIPTS = {
    "analyze_task_vectors.py": ["--task_vector_path", "--base_model", "--finetuned_model", "--output_dir", "--json",
                                "--top", "--force", "--quiet"],
    "analyze_task_vector_structure.py": ["--task_vector_path", "--base_model", "--finetuned_model", "--output_dir",
                                         "--json", "--top", "--force", "--quiet"],
    "investigate_parameter_changes.py": ["--base_model", "--finetuned_model", "--output_dir", "--json", "--top",
                                         "--force", "--quiet"],
    "visualize_model_structure.py": ["--base_model", "--lora_path", "--task_vector_path", "--finetuned_model",
                                     "--output_dir", "--json", "--force", "--quiet"],
    "debug_lora_structure.py": ["--lora_path", "--base_model", "--json"],
}


def run_script(name, argv, monkeypatch, capsys):
    """The root script itself, run in-process as __main__: (exit code, stdout, stderr)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [name] + [str(a) for a in argv])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(REPO / name), run_name="__main__")
    cap = capsys.readouterr()
    return exc.value.code, cap.out, cap.err


@pytest.fixture(scope="module")
def merges(example):
    """The example's base and its fp32 and fp16 merges, as NumPy arrays."""
    from loratv.example.builder import example_merged

    return {
        "base": load_file(example["base"] / "model.safetensors"),
        "fp32": load_file(example_merged("fp32") / "model.safetensors"),
        "fp16": load_file(example_merged("fp16") / "model.safetensors"),
    }


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_names_every_flag(name, monkeypatch, capsys):
    rc, out, _ = run_script(name, ["--help"], monkeypatch, capsys)
    assert rc == 0
    for flag in SCRIPTS[name]:
        assert flag in out, (name, flag)
    assert "alias of `loratv" in " ".join(out.split())


def test_analyze_task_vectors_on_the_example(merges, tmp_path, monkeypatch, capsys):
    """No arguments and no task_vectors_fp32/ here: the example's fp32 merge minus its base, on the fly."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_script("analyze_task_vectors.py", [], monkeypatch, capsys)
    assert rc == 0, err
    assert out.startswith("task vector: the embedded example's fp32 merge minus its base, on the fly")
    rc, out, err = run_script("analyze_task_vectors.py", ["--json"], monkeypatch, capsys)
    record = json.loads(out)
    base, ft = merges["base"], merges["fp32"]
    diffs = {n: ft[n].astype(np.float64) - base[n].astype(np.float64) for n in base}
    changed = {n for n, d in diffs.items() if d.any()}
    assert record["counts"]["tensors"] == {"total": len(base), "stored": None, "changed": len(changed)} == \
        {"total": 483, "stored": None, "changed": 120}
    assert record["counts"]["parameters"]["changed_elements"] == sum(int(np.count_nonzero(d)) for d in diffs.values())
    assert record["norms"]["l2_norm"] == pytest.approx(np.sqrt(sum((d * d).sum() for d in diffs.values())), rel=1e-12)
    worst = max(changed, key=lambda n: np.linalg.norm(diffs[n]))
    assert record["largest"]["by_norm"][0]["name"] == worst


def test_analyze_task_vectors_reads_the_workflows_task_vector(example, tmp_path, monkeypatch, capsys):
    """With task_vectors_fp32/ in the working folder (the seed's step 2), that is the default."""
    from loratv.cli.app import main
    from loratv.example.builder import example_merged

    monkeypatch.chdir(tmp_path)
    assert main(["extract", "--base", str(example["base"]), "--finetuned", str(example_merged("fp16")),
                 "-o", "task_vectors_fp32", "--quiet"]) == 0  # an fp16 one, so the default is visible in the count
    stored = load_file(tmp_path / "task_vectors_fp32" / "task_vector.safetensors")
    rc, out, err = run_script("analyze_task_vectors.py", ["--output_dir", "summary"], monkeypatch, capsys)
    assert rc == 0, err
    assert out.startswith("task vector: task_vectors_fp32/ (the default --task_vector_path)")
    record = json.loads((tmp_path / "summary" / "task_vector_summary.json").read_text())
    assert record["counts"]["tensors"]["stored"] == len(stored) == 483
    # its own previous output is replaced; another folder is refused without --force
    rc, _, err = run_script("analyze_task_vectors.py", ["--output_dir", "summary", "--quiet"], monkeypatch, capsys)
    assert rc == 0, err
    (tmp_path / "mine").mkdir()
    rc, _, err = run_script("analyze_task_vectors.py", ["--output_dir", "mine"], monkeypatch, capsys)
    assert_one_line_error(rc, err, "mine", "--force")


def test_structure_script_finds_the_adapter_rank(merges, tmp_path, monkeypatch, capsys):
    """Spectra of the example's task vector: every LoRA tensor has numerical rank r = 8 (the adapter's), with the
    singular values NumPy computes; untouched tensors have no spectrum."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_script("analyze_task_vector_structure.py", ["--json"], monkeypatch, capsys)
    assert rc == 0, err
    record = json.loads(out)
    config = json.loads((REPO / "checkpoint-40000" / "adapter_config.json").read_text())
    rows = {t["name"]: t for t in record["tensors"]}
    with_spectrum = {n for n, t in rows.items() if t["spectrum"]}
    assert len(with_spectrum) == 120
    for name in sorted(with_spectrum)[:6]:
        d = merges["fp32"][name].astype(np.float64) - merges["base"][name].astype(np.float64)
        s = np.linalg.svd(d, compute_uv=False)
        spec = rows[name]["spectrum"]
        assert spec["numerical_rank"] == config["r"] == 8
        assert spec["rank_rule"] == "rounding-floor" and s[7] > spec["rank_threshold"] > s[8]
        np.testing.assert_allclose(spec["singular_values"][:8], s[:8], rtol=1e-9)


def test_investigate_parameter_changes(merges, tmp_path, monkeypatch, capsys):
    """No arguments: the example's base against its fp16 merge: 120 changed, 363 cast artifacts, as NumPy sees them."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_script("investigate_parameter_changes.py", ["--json"], monkeypatch, capsys)
    assert rc == 0, err
    record = json.loads(out)
    base, half = merges["base"], merges["fp16"]
    cast = {n for n in base if np.array_equal(half[n], base[n].astype(np.float16))}
    changed = set(base) - cast
    assert record["summary"]["by_category"]["changed"] == len(changed) == 120
    assert record["summary"]["by_category"]["cast-artifact"] == len(cast) == 363
    assert {t["name"] for t in record["tensors"] if t["category"] == "changed"} == changed
    rc, out, err = run_script("investigate_parameter_changes.py", [], monkeypatch, capsys)
    assert rc == 0 and "fine-tuned model: the embedded example merged in fp16" in out


def test_investigate_uses_the_workflows_fp16_merge(example, tmp_path, monkeypatch, capsys):
    from loratv.example.builder import example_merged

    monkeypatch.chdir(tmp_path)
    shutil.copytree(example_merged("fp32"), tmp_path / "merged_model_fp16")  # any model there is taken
    rc, out, err = run_script("investigate_parameter_changes.py", ["--json", "--quiet"], monkeypatch, capsys)
    assert rc == 0, err
    assert json.loads(out)["summary"]["by_category"] == {"changed": 120, "cast-artifact": 0, "unchanged": 363,
                                                        "only-in-base": 0, "only-in-finetuned": 0, "shape-mismatch": 0}


@pytest.mark.parametrize("name, argv, named", [
    ("investigate_parameter_changes.py", ["--base_model", "{ex}/base"], ["--finetuned_model"]),
    ("investigate_parameter_changes.py", ["--base_model", "nope/base", "--finetuned_model", "{ex}/base"], ["nope/base"]),
    ("analyze_task_vectors.py", ["--task_vector_path", "missing_tv"], ["missing_tv"]),
    ("analyze_task_vectors.py", ["--base_model", "{ex}/base"], ["--task_vector_path", "--finetuned_model"]),
    ("analyze_task_vector_structure.py", ["--finetuned_model", "{ex}/base", "--task_vector_path", "x"],
     ["--task_vector_path", "--finetuned_model"]),
])
def test_errors_name_the_scripts_flags(name, argv, named, example, tmp_path, monkeypatch, capsys):
    """One line, exit 2, in the script's own flag names (never loratv's --base/--finetuned)."""
    monkeypatch.chdir(tmp_path)
    ex = example["base"].parent
    rc, _, err = run_script(name, [a.replace("{ex}", str(ex)) for a in argv + ["--output_dir", "out"]], monkeypatch,
                            capsys)
    line = assert_one_line_error(rc, err, *named)
    assert " --base " not in f"{line} " and "--finetuned " not in f"{line} "
    assert_nothing_at(tmp_path / "out")


def test_visualize_model_structure(merges, tmp_path, monkeypatch, capsys):
    """No arguments: the example with checkpoint-40000/'s adapter and its fp32 merge; the picture's cells are the
    adapter's targets (from the file's keys) and the changed tensors (NumPy), here the same 120."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(REPO / "checkpoint-40000", tmp_path / "checkpoint-40000")
    rc, out, err = run_script("visualize_model_structure.py", [], monkeypatch, capsys)
    assert rc == 0, err
    assert "LoRA adapter: checkpoint-40000/ (the default --lora_path)" in out.splitlines()
    folder = tmp_path / "model_structure"
    png = (folder / "model_structure.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert (folder / "model_structure.html").read_text().lstrip().lower().startswith("<!doctype html>")
    record = json.loads((folder / "model_structure.json").read_text())
    keys = load_file(tmp_path / "checkpoint-40000" / "adapter_model.safetensors")
    targeted = {k.split("base_model.model.", 1)[1].rsplit(".lora_", 1)[0] + ".weight" for k in keys}
    base, ft = merges["base"], merges["fp32"]
    changed = {n for n in base if not np.array_equal(ft[n], base[n])}
    assert record["counts"]["both"] == len(targeted & changed) == 120
    assert record["counts"]["neither"] == len(set(base) - targeted - changed) == 363
    # a second run replaces its own output; without an adapter, every change is the task vector's alone
    rc, out, err = run_script("visualize_model_structure.py", ["--lora_path", "none", "--json"], monkeypatch, capsys)
    assert rc == 0, err
    assert json.loads(out)["counts"]["task-vector-only"] == 120


def test_debug_lora_structure(example, tmp_path, monkeypatch, capsys):
    """Every stored key with the shape and dtype safetensors reports; each module's scaling α/r and its base tensor."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_script("debug_lora_structure.py", ["--json"], monkeypatch, capsys)
    assert rc == 0, err
    dump = json.loads(out)
    from safetensors import safe_open

    adapter = example["adapter"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    with safe_open(str(adapter / "adapter_model.safetensors"), "np") as f:
        stored = {k: f.get_slice(k) for k in f.keys()}
        listed = {k["key"]: k for k in dump["keys"]}
        assert set(listed) == set(stored)
        for key, sl in stored.items():
            assert listed[key]["shape"] == list(sl.get_shape()) and listed[key]["dtype"] == sl.get_dtype()
    base = load_file(example["base"] / "model.safetensors")
    assert len(dump["modules"]) == 120
    for m in dump["modules"]:
        assert m["scaling"] == config["lora_alpha"] / config["r"]
        assert m["base_tensor"]["name"] == m["module"] + ".weight"
        assert m["base_tensor"]["shape"] == list(base[m["base_tensor"]["name"]].shape)
    rc, out, err = run_script("debug_lora_structure.py", [], monkeypatch, capsys)
    assert rc == 0 and "240 stored keys" in out


def test_quick_precision_advice_can_be_followed(merges, tmp_path, monkeypatch, capsys):
    """The seed's precision walkthrough: with the default storage the shared tensors cannot be decided, and the
    script says how to re-extract; the seed's own extract script takes that flag, after which all 120 are proven to
    be the fp32 merge rounded to fp16 (as NumPy confirms on the merged files)."""
    from loratv.cli.seed_scripts import extract_task_vectors_main, merge_lora_main, quick_precision_main

    monkeypatch.chdir(tmp_path)
    for p in ("fp16", "fp32"):
        assert merge_lora_main(["--precision", p, "--output_dir", f"merged_model_{p}", "--quiet"]) == 0
        assert extract_task_vectors_main(["--finetuned_model", f"merged_model_{p}/", "--output_dir",
                                          f"task_vectors_{p}/", "--quiet"]) == 0
    capsys.readouterr()
    assert quick_precision_main([]) == 0
    out = capsys.readouterr().out
    assert "120 undecided" in out and "re-extract with `extract_task_vectors.py --storage_dtype fp64`" in out
    for p in ("fp16", "fp32"):
        assert extract_task_vectors_main(["--finetuned_model", f"merged_model_{p}/", "--output_dir",
                                          f"task_vectors_{p}/", "--storage_dtype", "fp64", "--quiet"]) == 0
    capsys.readouterr()
    assert quick_precision_main(["--json"]) == 0
    pair = json.loads(capsys.readouterr().out)
    half = load_file(tmp_path / "merged_model_fp16" / "model.safetensors")
    full = load_file(tmp_path / "merged_model_fp32" / "model.safetensors")
    shared = [n for n in full if not np.array_equal(full[n], merges["base"][n])]
    rounded = sum(np.array_equal(half[n], full[n].astype(np.float16)) for n in shared)
    assert pair["shared_undecided"] == 0 and pair["shared_tensors"] == len(shared) == 120
    assert pair["shared_equal_to_fp32_rounded"] == rounded == 120


def test_seed_flag_names_in_messages():
    """Messages from the shared code are shown in the scripts' flag names; other flags and words are untouched."""
    from loratv.cli.seed_scripts import seed_flag_message

    assert seed_flag_message("x: a fine-tuned model needs its base (--base).") == \
        "x: a fine-tuned model needs its base (--base_model)."
    assert seed_flag_message("give --task-vector or --finetuned; --base_model stays; --device cuda; --force") == \
        "give --task_vector_path or --finetuned_model; --base_model stays; --device cuda; --force"
    assert seed_flag_message("--storage-dtype fp8: choose auto, fp32 or fp64.") == \
        "--storage_dtype fp8: choose auto, fp32 or fp64."
