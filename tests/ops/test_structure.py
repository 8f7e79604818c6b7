"""`loratv structure`: the layers × module-kinds grid, checked against independent oracles.

Targets: which base parameters PEFT itself wrapped (LoraLayer modules of a PEFT model built with tests/tiny_models.py).
Changes: NumPy over the task vector file, or over fine-tuned and base weights (bit patterns for the casts).
"""

import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers_io import assert_nothing_at, assert_one_line_error, run_cli, tree_digest
from tiny_models import build_adapter, build_base, loratv, peft_model

QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---------------------------------------------------------------- helpers and oracles

def structure(capsys, *argv):
    """Run `loratv structure … --json`; returns (stdout record, the JSON file's record, output folder)."""
    out = argv[argv.index("-o") + 1]
    rc, stdout, err = run_cli(capsys, "structure", *argv, "--json")
    assert rc == 0, err
    from pathlib import Path

    on_disk = json.loads((Path(out) / "model_structure.json").read_text())
    assert json.loads(stdout) == on_disk
    return on_disk


def states(record) -> dict:
    return {t["name"]: t["state"] for t in record["tensors"]}


def peft_targets(base, adapter) -> set:
    """Oracle: the base parameters PEFT wrapped in a LoRA layer (module name without PEFT's prefix + .weight)."""
    from peft.tuners.lora import LoraLayer

    model = peft_model(base, adapter)
    return {name.removeprefix("base_model.model.") + ".weight" for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def numpy_changed(task_vector_file) -> set:
    """Oracle: tensors of the task vector file with a nonzero element."""
    return {name for name, a in load_file(str(task_vector_file)).items() if np.any(a != 0)}


def numpy_model_diff(base_file, finetuned_file):
    """Oracle from the weights: (changed, pure casts): changed when any value differs; a pure cast when the fine-tuned
    tensor has the bits of the base cast to its dtype."""
    base, fine = load_file(str(base_file)), load_file(str(finetuned_file))
    changed, casts = set(), set()
    for name, b in base.items():
        f = fine[name]
        if np.any(f.astype(np.float64) != b.astype(np.float64)):
            changed.add(name)
            if f.dtype != b.dtype and np.array_equal(b.astype(f.dtype).view(np.uint8), f.view(np.uint8)):
                casts.add(name)
    return changed, casts


def check_grid(record) -> None:
    """The JSON grid is consistent: every tensor in exactly its cell, counts recounted from the cells."""
    cells = record["cells"]
    assert len(cells) == len(record["rows"])
    assert all(len(row) == len(cells[0]) for row in cells)
    placed = {}
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if cell["tensor"] is not None:
                assert cell["tensor"] not in placed
                placed[cell["tensor"]] = (i, j, cell["state"])
            elif record["rows"][i]["section"] == "layer":
                assert cell["state"] == "no-tensor"
            else:
                assert cell["state"] is None
    assert set(placed) == {t["name"] for t in record["tensors"]}
    columns = [c["name"] for c in record["columns"]]
    for t in record["tensors"]:
        i, j, state = placed[t["name"]]
        assert (i, j) == (t["row"], t["col"]) and state == t["state"]
        if t["layer"] is not None:
            assert record["rows"][i]["layer"] == t["layer"]
            assert t["name"].endswith("." + columns[j])  # kind = the name without its layer prefix
            assert f".{t['layer']}." in t["name"][: len(t["name"]) - len(columns[j])]
        else:
            assert record["rows"][i]["section"] in ("embeddings", "global")
    recount = {}
    for row in cells:
        for cell in row:
            if cell["state"] is not None:
                recount[cell["state"]] = recount.get(cell["state"], 0) + 1
    assert {k: v for k, v in record["counts"].items() if v} == recount


def check_png(path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert 500 <= width <= 4000 and 200 <= height <= 4000, (width, height)
    assert 10_000 < len(data) < 5_000_000
    from PIL import Image

    with Image.open(path) as im:
        im.verify()  # the whole stream decodes
    return width, height


# ---------------------------------------------------------------- the embedded example

@pytest.fixture(scope="module")
def merges(example_dir, tmp_path_factory):
    """The example merged at fp32 and fp16 (by `loratv merge`), and the fp16 task vector (by `loratv extract`)."""
    root = tmp_path_factory.mktemp("structure-merges")
    out = {}
    for precision in ("fp32", "fp16"):
        out[precision] = root / f"merged-{precision}"
        loratv("merge", "--base", example_dir / "base", "--adapter", example_dir / "adapter", "-o", out[precision],
               "--precision", precision)
    out["tv16"] = root / "tv16"
    loratv("extract", "--base", example_dir / "base", "--finetuned", out["fp16"], "-o", out["tv16"])
    return out


def test_example_fp32_both_on_qkvo_weights(capsys, example_dir, merges, tmp_path):
    rec = structure(capsys, example_dir / "base", "--adapter", example_dir / "adapter", "--finetuned",
                    merges["fp32"], "-o", tmp_path / "s")
    check_grid(rec)
    both = {n for n, s in states(rec).items() if s == "both"}
    assert len(both) == 120
    assert both == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(30) for p in QKVO}
    changed, _ = numpy_model_diff(example_dir / "base" / "model.safetensors", merges["fp32"] / "model.safetensors")
    assert changed == both
    assert set(states(rec).values()) == {"both", "neither"}  # the rest untouched
    assert rec["counts"]["neither"] == 483 - 120 and rec["counts"]["no-tensor"] == 0
    assert rec["layers"] == 30 and len(rec["columns"]) == 16
    assert [r["label"] for r in rec["rows"]] == ["embeddings"] + [str(i) for i in range(30)] + ["global"]
    width, height = check_png(tmp_path / "s" / "model_structure.png")
    assert height > width / 2  # 32 rows: the picture is sized to the grid, not a fixed strip


def test_example_fp16_cast_artifacts(capsys, example_dir, merges, tmp_path):
    base_file = example_dir / "base" / "model.safetensors"
    changed, casts = numpy_model_diff(base_file, merges["fp16"] / "model.safetensors")
    live = structure(capsys, example_dir / "base", "--adapter", example_dir / "adapter", "--finetuned",
                     merges["fp16"], "-o", tmp_path / "live")
    stored = structure(capsys, example_dir / "base", "--adapter", example_dir / "adapter", "--task-vector",
                       merges["tv16"], "-o", tmp_path / "stored")
    for rec in (live, stored):
        check_grid(rec)
        s = states(rec)
        cast = {n for n, v in s.items() if v == "cast-artifact"}
        assert len(cast) == 363
        assert cast == casts - {n for n, v in s.items() if v == "both"}
        assert {n for n, v in s.items() if v == "both"} == {f"model.layers.{i}.self_attn.{p}.weight"
                                                            for i in range(30) for p in QKVO}
        assert rec["counts"]["task-vector-only"] == 0 and rec["counts"]["neither"] == 0
        assert all(t["cast_dtype"] == "F16" for t in rec["tensors"] if t["state"] == "cast-artifact")
    assert numpy_changed(merges["tv16"] / "task_vector.safetensors") == changed
    # headers decide the changed set; only the untargeted changed tensors are read, for the cast test
    assert stored["tensors_read"] == 363


def test_stored_fp32_task_vector_reads_nothing(capsys, example_dir, merges, tmp_path):
    tv = tmp_path / "tv32"
    loratv("extract", "--base", example_dir / "base", "--finetuned", merges["fp32"], "-o", tv)
    rec = structure(capsys, example_dir / "base", "--adapter", example_dir / "adapter", "--task-vector", tv,
                    "-o", tmp_path / "s")
    assert rec["tensors_read"] == 0
    assert rec["counts"]["both"] == 120 and rec["counts"]["neither"] == 363


def test_no_arguments_is_the_example(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_cli(capsys, "structure", "-o", "out")
    assert rc == 0, err
    rec = json.loads((tmp_path / "out" / "model_structure.json").read_text())
    assert rec["counts"]["both"] == 120 and rec["counts"]["neither"] == 363
    assert rec["inputs"]["adapter"] and rec["inputs"]["finetuned"]
    assert "both" in out and "wrote out/" in out
    check_png(tmp_path / "out" / "model_structure.png")


def test_html_page_is_self_contained(capsys, example_dir, merges, tmp_path):
    structure(capsys, example_dir / "base", "--adapter", example_dir / "adapter", "--finetuned", merges["fp16"],
              "-o", tmp_path / "s")
    page = (tmp_path / "s" / "model_structure.html").read_text()
    assert 'http-equiv="Content-Security-Policy"' in page and "default-src 'none'" in page
    assert "http://" not in page and "https://" not in page
    assert 'src="data:image/png;base64,' in page
    assert page.count('class="c-shared"') == 120 and page.count('class="c-cast-artifact"') == 363
    assert '<table class="grid" id="structure-grid">' in page
    for i in range(483):  # each cell links to a row of the tensor table
        assert f'id="st-t{i}"' in page


# ---------------------------------------------------------------- PEFT as the oracle for targets

@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    """A tiny model, a PEFT LoRA on it, and a fine-tuned model with a known mix of changes, plus its task vector."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"structure-{kind}")
    base = build_base(kind, root / "base")
    targets = ["c_attn", "c_fc"] if kind == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    extra = {"fan_in_fan_out": True} if kind == "gpt2" else {}
    adapter = build_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=targets, **extra)
    targeted = peft_targets(base, adapter)
    # fine-tuned: every targeted tensor but one changed, plus one untargeted tensor
    weights = load_file(str(base / "model.safetensors"))
    rng = np.random.default_rng(0)
    keep = sorted(targeted)[0]
    untargeted = next(n for n in sorted(weights) if n not in targeted and (".h.1." in n or ".layers.1." in n))
    for name in sorted(targeted - {keep}) + [untargeted]:
        weights[name] = (weights[name] + 0.01 * rng.standard_normal(weights[name].shape)).astype(np.float32)
    finetuned = root / "finetuned"
    finetuned.mkdir()
    save_file(weights, str(finetuned / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(base / "config.json", finetuned / "config.json")
    tv = root / "tv"
    loratv("extract", "--base", base, "--finetuned", finetuned, "-o", tv)
    return {"base": base, "adapter": adapter, "targeted": targeted, "finetuned": finetuned, "tv": tv, "keep": keep,
            "untargeted": untargeted}


def test_targets_match_peft(capsys, tiny, tmp_path):
    rec = structure(capsys, tiny["base"], "--adapter", tiny["adapter"], "-o", tmp_path / "s")
    check_grid(rec)
    assert {t["name"] for t in rec["tensors"] if t["targeted"]} == tiny["targeted"]
    assert set(states(rec).values()) <= {"adapter-only", "neither"}
    assert rec["tensors_read"] == 0  # an adapter alone: headers only
    assert [s["state"] for s in rec["states"]] == ["adapter-only", "neither", "no-tensor"]


def test_task_vector_states_match_numpy(capsys, tiny, tmp_path):
    changed = numpy_changed(tiny["tv"] / "task_vector.safetensors")
    assert changed == (tiny["targeted"] - {tiny["keep"]}) | {tiny["untargeted"]}
    expected = {}
    for t in load_file(str(tiny["base"] / "model.safetensors")):
        hit, moved = t in tiny["targeted"], t in changed
        expected[t] = ("both" if moved else "adapter-only") if hit else ("task-vector-only" if moved else "neither")
    stored = structure(capsys, tiny["base"], "--adapter", tiny["adapter"], "--task-vector", tiny["tv"],
                       "-o", tmp_path / "stored")
    live = structure(capsys, tiny["base"], "--adapter", tiny["adapter"], "--finetuned", tiny["finetuned"],
                     "-o", tmp_path / "live")
    for rec in (stored, live):
        check_grid(rec)
        assert states(rec) == expected
    assert stored["tensors_read"] == 0  # same dtype: no cast to test, task_vector.json decides
    only_tv = structure(capsys, tiny["base"], "--task-vector", tiny["tv"], "-o", tmp_path / "tv-only")
    assert {n for n, s in states(only_tv).items() if s == "task-vector-only"} == changed


def test_gpt2_globals_and_png(capsys, tiny, tmp_path):
    rec = structure(capsys, tiny["base"], "--adapter", tiny["adapter"], "-o", tmp_path / "s")
    globals_ = {t["name"]: t for t in rec["tensors"] if t["layer"] is None}
    layered = [t for t in rec["tensors"] if t["layer"] is not None]
    assert len(rec["columns"]) == len({t["column"] for t in layered})
    assert rec["layers"] == 2
    numbers = sorted(t["number"] for t in globals_.values())
    assert numbers == list(range(1, len(globals_) + 1))
    embeddings = [t for t in globals_.values() if t["section"] == "embeddings"]
    assert embeddings and all(rec["rows"][t["row"]]["label"] == "embeddings" for t in embeddings)
    from loratv.report.structure_plot import structure_plot

    info = structure_plot(rec, tmp_path / "again.png")
    assert info["rows"] == len(rec["rows"]) and info["column_labels"] == [c["name"] for c in rec["columns"]]
    assert {k: v for k, v in info["cells"].items() if v} == {k: v for k, v in rec["counts"].items() if v}
    check_png(tmp_path / "s" / "model_structure.png")


# ---------------------------------------------------------------- bad input and outputs

def test_bad_inputs_are_one_sentence(capsys, example_dir, tiny, tmp_path):
    missing = tmp_path / "nope"
    rc, _, err = run_cli(capsys, "structure", missing, "-o", tmp_path / "o1")
    assert_one_line_error(rc, err, missing)
    assert_nothing_at(tmp_path / "o1")
    rc, _, err = run_cli(capsys, "structure", tiny["base"], "--adapter", example_dir / "adapter", "-o", tmp_path / "o2")
    assert_one_line_error(rc, err, "adapter_model.safetensors")
    assert_nothing_at(tmp_path / "o2")
    rc, _, err = run_cli(capsys, "structure", "--adapter", example_dir / "adapter", "-o", tmp_path / "o3")
    assert_one_line_error(rc, err, "MODEL")
    rc, _, err = run_cli(capsys, "structure", tiny["base"], "--task-vector", tmp_path, "-o", tmp_path / "o4")
    assert_one_line_error(rc, err, str(tmp_path))


def test_existing_output_needs_force(capsys, tiny, tmp_path):
    out = tmp_path / "s"
    structure(capsys, tiny["base"], "-o", out)
    before = tree_digest(out)
    rc, _, err = run_cli(capsys, "structure", tiny["base"], "-o", out, "--adapter", tiny["adapter"])
    assert_one_line_error(rc, err, str(out))
    assert tree_digest(out) == before
    rec = structure(capsys, tiny["base"], "--adapter", tiny["adapter"], "-o", out, "--force")
    assert rec["counts"]["adapter-only"] == len(tiny["targeted"])
    rc, _, err = run_cli(capsys, "structure", tiny["base"], "-o", tiny["base"] / "inside", "--force")
    assert_one_line_error(rc, err, "input")
