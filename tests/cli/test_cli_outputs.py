"""Command-line defaults and output paths every command shares.

- `to-lora` and `convert` with no model argument run on the embedded example, as the README promises of every
  command, and explicit arguments keep working as before.
- An output whose parent folders are missing: every command creates them and says so in one line on stderr
  (docs/reliability.md); a failed run removes the folders it created.
"""

import json
import os

import pytest
from safetensors import safe_open

from helpers_io import assert_nothing_at, assert_one_line_error, run_cli

NOTE = "loratv: note: created missing parent folder"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- to-lora and convert with no model argument ----------------------------------------------------------------


def test_to_lora_with_no_model_argument_uses_the_example(capsys, workdir):
    rc, out, err = run_cli(capsys, "to-lora", "--rank", "8")
    assert rc == 0, err
    assert "wrote to_lora_adapter/" in out
    fidelity = json.loads((workdir / "to_lora_adapter" / "to_lora_fidelity.json").read_text())
    assert (workdir / "to_lora_adapter" / "adapter_config.json").is_file()
    # the example's task vector is a rank-8 LoRA on q/k/v/o: 120 modules, reproduced to rounding at rank 8
    assert json.dumps(fidelity).count("self_attn") >= 120


def test_to_lora_explicit_arguments_still_work(capsys, workdir, example_dir):
    from loratv.example.builder import example_merged

    rc, _, err = run_cli(capsys, "to-lora", "--base", example_dir / "base", "--finetuned", example_merged("fp32"),
                         "-o", "mine", "--rank", "4", "--quiet")
    assert rc == 0, err
    assert (workdir / "mine" / "to_lora_fidelity.json").is_file()
    assert not (workdir / "to_lora_adapter").exists()
    rc, _, err = run_cli(capsys, "to-lora", "--base", example_dir / "base", "-o", "other")
    assert_one_line_error(rc, err, "--finetuned or --task-vector")


def test_convert_with_no_adapter_writes_the_example_as_kohya(capsys, workdir):
    rc, out, err = run_cli(capsys, "convert")
    assert rc == 0, err
    assert "wrote converted_adapter.safetensors (kohya): 120 LoRA modules" in out
    with safe_open(str(workdir / "converted_adapter.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert len(keys) == 3 * 120 and all(k.startswith("lora_") for k in keys)


def test_convert_explicit_arguments_still_work(capsys, workdir, example_dir):
    rc, _, err = run_cli(capsys, "convert", example_dir / "adapter", "-o", "k.safetensors", "--to", "kohya", "--quiet")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "convert", "k.safetensors", "-o", "back", "--to", "peft", "--base",
                         example_dir / "base", "--quiet")
    assert rc == 0, err
    assert (workdir / "back" / "adapter_config.json").is_file()
    rc, _, err = run_cli(capsys, "convert", example_dir / "adapter", "-o", "x.safetensors")
    assert_one_line_error(rc, err, "--to peft or --to kohya")


def test_help_text_names_the_defaults(capsys):
    from loratv.cli.app import build_parser

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices  # noqa: SLF001 - no public accessor
    to_lora, convert = (" ".join(sub[c].format_help().split()) for c in ("to-lora", "convert"))
    assert "embedded example" in to_lora and "to_lora_adapter" in to_lora
    assert "embedded example" in convert and "converted_adapter.safetensors" in convert


# ---- missing parent folders, for every command -----------------------------------------------------------------

COMMANDS = {
    "merge": ["merge", "--quiet"],
    "extract": ["extract", "--quiet"],
    "compare": ["compare", "--quiet", "--no-plots"],
    "validate": ["validate", "--quiet", "--no-plots"],
    "precision": ["precision", "--quiet", "--no-plots", "--paths", "fp32"],
    "analyze": ["analyze", "--quiet", "--no-plots"],
    "to-lora": ["to-lora", "--quiet", "--rank", "2"],
    "convert": ["convert", "--quiet"],
    "example": ["example"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_missing_parents_are_created_and_reported(capsys, workdir, command):
    out = workdir / "new" / "sub" / ("out.safetensors" if command == "convert" else "out")
    rc, _, err = run_cli(capsys, *COMMANDS[command], "-o", out)
    assert rc == 0, err
    assert err.count(NOTE) == 1 and f"{NOTE} {out.parent}\n" in err, err
    assert out.exists()
    # the parent exists now: the second run (with --force) says nothing about it
    rc, _, err = run_cli(capsys, *COMMANDS[command], "-o", out, "--force")
    assert rc == 0, err
    assert NOTE not in err


def test_failed_run_removes_the_parents_it_created(capsys, workdir, example_dir):
    out = workdir / "new" / "sub" / "out"
    rc, _, err = run_cli(capsys, "merge", "--base", example_dir / "base", "--adapter", example_dir / "base", "-o", out)
    assert rc == 2, err
    assert_nothing_at(out)
    assert not (workdir / "new").exists()


def test_parent_that_cannot_be_created_is_one_sentence(capsys, workdir):
    (workdir / "afile").write_text("x")
    out = workdir / "afile" / "sub" / "out"
    rc, _, err = run_cli(capsys, "merge", "-o", out)
    assert rc == 2
    assert_one_line_error(rc, err, str(out))
    assert os.path.isfile(workdir / "afile")
