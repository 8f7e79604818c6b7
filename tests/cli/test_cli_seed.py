"""The seed's scripts (merge_lora.py, extract_task_vectors.py) are aliases: same tensors as `loratv merge/extract`."""

import json
import runpy
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers_io import (  # noqa: F401 - fixtures are found by name
    REPO,
    assert_nothing_at,
    assert_one_line_error,
    example,
    loratv_cache,
    run_cli,
    run_subprocess,
    tensors_equal,
)
from loratv.cli.seed_scripts import extract_task_vectors_main, merge_lora_main

pytestmark = pytest.mark.usefixtures("loratv_cache")

MERGE = REPO / "merge_lora.py"
EXTRACT = REPO / "extract_task_vectors.py"
EXAMPLE_YAML = REPO / "examples" / "extract_task_vectors_config.yml"


@pytest.fixture(scope="module")
def reference(example, tmp_path_factory):
    """`loratv merge` (fp32 and fp16) and `loratv extract` outputs on the embedded example."""
    from loratv.cli import app as cli

    root = tmp_path_factory.mktemp("reference")
    for precision in ("fp32", "fp16"):
        assert cli.main(["merge", "--precision", precision, "-o", str(root / f"merge-{precision}"), "--quiet"]) == 0
    assert cli.main(["extract", "-o", str(root / "tv"), "--quiet"]) == 0
    return root


def test_merge_lora_script_defaults(reference, tmp_path):
    """No flags: the embedded example, fp32, written to merged_model (the seed's documented default) in the working
    directory; one line each says which base, adapter and device were used."""
    proc = run_subprocess([], cwd=tmp_path, script=MERGE)
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout.splitlines()
    assert any(line.startswith("base model: the embedded StarCoder2 miniature") and
               "--base_model bigcode/starcoder2-3b downloads the real one" in line for line in said), said
    assert any(line.startswith("LoRA adapter: the embedded example's") for line in said), said  # no checkpoint-40000/ here
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert any(line.startswith(f"device: {device} (") for line in said), said
    out = tmp_path / "merged_model"
    assert tensors_equal(load_file(out / "model.safetensors"), load_file(reference / "merge-fp32" / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def run_script(script, argv, monkeypatch):
    """The script file itself, run in-process as __main__ (cheaper than a fresh interpreter): its exit code."""
    monkeypatch.setattr(sys, "argv", [str(script)] + [str(a) for a in argv])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    return exc.value.code


def test_merge_lora_script_seed_flags(capsys, example, reference, tmp_path, monkeypatch):
    out = tmp_path / "merged_model_fp16"
    capsys.readouterr()
    rc = run_script(MERGE, ["--base_model", example["base"], "--lora_path", example["adapter"], "--precision", "fp16",
                            "--output_dir", out, "--device", "cpu"], monkeypatch)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "merged 120 of 483 tensors" in cap.out
    assert tensors_equal(load_file(out / "model.safetensors"), load_file(reference / "merge-fp16" / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_merge_lora_bad_input(capsys, example, tmp_path):
    out = tmp_path / "out"
    capsys.readouterr()
    rc = merge_lora_main(["--base_model", str(tmp_path / "nope"), "--lora_path", str(example["adapter"]),
                          "--output_dir", str(out)])
    assert_one_line_error(rc, capsys.readouterr().err, tmp_path / "nope")
    assert_nothing_at(out)
    with pytest.raises(SystemExit) as exc:  # argparse's own convention, also exit 2
        merge_lora_main(["--precision", "fp8"])
    assert exc.value.code == 2


def test_extract_script_with_yaml_config(example, reference, tmp_path):
    from loratv.example.builder import example_merged

    config = tmp_path / "tv.yml"
    config.write_text(yaml.safe_dump({
        "base_model": str(example["base"]),
        "finetuned_model": str(example_merged("fp32")),
        "output_dir": str(tmp_path / "from_yaml"),
        "device": "cpu",
        "trust_remote_code": True,
    }))
    proc = run_subprocess(["--config", config], cwd=tmp_path, script=EXTRACT)
    assert proc.returncode == 0, proc.stderr
    got = load_file(tmp_path / "from_yaml" / "task_vector.safetensors")
    assert len(got) == 120
    assert tensors_equal(got, load_file(reference / "tv" / "task_vector.safetensors"))
    report = json.loads((tmp_path / "from_yaml" / "task_vector.json").read_text())
    assert report["changed_tensors"] == 120 and report["total_tensors"] == 483


def test_extract_script_flags_win_over_yaml(reference, tmp_path, capsys):
    config = tmp_path / "tv.yml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "from_yaml"), "dense": True}))
    assert extract_task_vectors_main(["--config", str(config), "--output_dir", str(tmp_path / "from_flag"), "--quiet"]) == 0
    assert not (tmp_path / "from_yaml").exists()
    dense = load_file(tmp_path / "from_flag" / "task_vector.safetensors")
    assert len(dense) == 483  # dense: came from the YAML file
    sparse = load_file(reference / "tv" / "task_vector.safetensors")
    assert tensors_equal({k: dense[k] for k in sparse}, sparse)
    assert all(not t.any() for k, t in dense.items() if k not in sparse)


def test_extract_script_defaults_and_seed_flags(reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert extract_task_vectors_main(["--device", "cuda:3", "--trust_remote_code", "--quiet"]) == 0  # both unused
    assert tensors_equal(load_file(tmp_path / "task_vectors" / "task_vector.safetensors"),
                         load_file(reference / "tv" / "task_vector.safetensors"))


def test_the_example_yaml_works(reference, tmp_path, monkeypatch):
    data = yaml.safe_load(EXAMPLE_YAML.read_text())
    monkeypatch.chdir(tmp_path)
    assert extract_task_vectors_main(["--config", str(EXAMPLE_YAML), "--quiet"]) == 0
    out = tmp_path / data["output_dir"]
    assert tensors_equal(load_file(out / "task_vector.safetensors"), load_file(reference / "tv" / "task_vector.safetensors"))


def test_extract_script_bad_yaml(capsys, tmp_path):
    config = tmp_path / "tv.yml"
    config.write_text("base_model: x\nnot_a_flag: 1\n")
    capsys.readouterr()
    rc = extract_task_vectors_main(["--config", str(config), "--output_dir", str(tmp_path / "out")])
    assert_one_line_error(rc, capsys.readouterr().err, config, "not_a_flag")
    assert_nothing_at(tmp_path / "out")
    config.write_text("[unclosed\n")
    rc = extract_task_vectors_main(["--config", str(config)])
    assert_one_line_error(rc, capsys.readouterr().err, config, "YAML")


def test_loratv_extract_config(capsys, example, reference, tmp_path):
    from loratv.example.builder import example_merged

    config = tmp_path / "tv.yml"
    out = tmp_path / "tv"
    config.write_text(yaml.safe_dump({"base": str(example["base"]), "finetuned": str(example_merged("fp32")),
                                      "output": str(out), "storage-dtype": "fp32"}))
    rc, _, err = run_cli(capsys, "extract", "--config", config, "--quiet")
    assert rc == 0, err
    assert tensors_equal(load_file(out / "task_vector.safetensors"), load_file(reference / "tv" / "task_vector.safetensors"))


@pytest.mark.parametrize(
    "script, flags",
    [
        (MERGE, ["--base_model", "--lora_path", "--output_dir", "--precision", "--device", "--force"]),
        (EXTRACT, ["--base_model", "--finetuned_model", "--output_dir", "--device", "--trust_remote_code", "--config",
                   "--dense", "--force"]),
    ],
    ids=["merge_lora", "extract_task_vectors"],
)
def test_help_mentions_every_flag(capsys, monkeypatch, script, flags):
    capsys.readouterr()
    assert run_script(script, ["--help"], monkeypatch) == 0
    help_text = capsys.readouterr().out
    for flag in flags:
        assert flag in help_text, flag
    text = " ".join(help_text.split())
    if script == MERGE:
        assert "{fp16,fp32,bf16}" in text and "default: fp32" in text
    else:
        assert "never runs model code" in text and "unused" in text and "default: task_vectors" in text
