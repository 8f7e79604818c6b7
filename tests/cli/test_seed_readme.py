"""The seed study's README followed as a reader would: every command of README.md's seed-sequence block, verbatim and
in its order, in a fresh copy of the repository root, each in its own interpreter.

Commands naming `bigcode/starcoder2-3b` read a local hub cache that holds the miniature (HF_HUB_OFFLINE=1). After
each command, what the next step needs is checked, and the numbers it printed are checked against counts computed
here from the files with NumPy (never from loratv's own records). At the end, `git status` must show nothing new.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers_io import REPO, example, loratv_cache  # noqa: F401 - fixtures are found by name

pytestmark = pytest.mark.usefixtures("loratv_cache")

REAL_BASE = "bigcode/starcoder2-3b"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
SEED_README = REPO.parent / "shared" / "reference" / "seed-README.md"
ROOT_FILES = ["merge_lora.py", "extract_task_vectors.py", "compare_lora_task_vector.py", "final_validation.py",
              "quick_precision_test.py", "analyze_lora_vs_task_vector_math.py", "extract_task_vectors_config.yml",
              "requirements.txt", ".gitignore"]
PLOTS = ["cosine_similarity_analysis.png", "model_architecture_coverage.png", "norm_distribution_comparison.png",
         "parameter_modification_heatmap.png"]


def seed_commands() -> list[str]:
    """The lines of README.md's seed-sequence block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- seed-sequence -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no seed-sequence block"
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def seed_readme_commands(text: str) -> set[str]:
    """Every command in the seed README's bash blocks, continuation lines joined and whitespace collapsed."""
    commands = set()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.add(" ".join(line.split()))
    return commands


def test_the_block_is_the_seed_readme_verbatim():
    """Every line of the block is a command of the seed's README, as its readers have it (when it is beside us)."""
    commands = seed_commands()
    assert len(commands) == 22
    if not SEED_README.is_file():
        pytest.skip(f"{SEED_README} is not beside the repository")
    seed = seed_readme_commands(SEED_README.read_text(encoding="utf-8"))
    assert [c for c in commands if c not in seed] == []
    # and every python command of the seed's workflow appears in the block
    workflow = {c for c in seed if c.startswith("python ")}
    assert workflow - set(commands) == set()


def _git(root: Path, *argv) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=root, capture_output=True,
                          text=True, check=False)


@pytest.fixture(scope="module")
def seed_root(tmp_path_factory, example):
    """A copy of the repository root's seed files in a git repository of its own, and a hub cache standing in for
    bigcode/starcoder2-3b."""
    root = tmp_path_factory.mktemp("seed") / "repo"
    root.mkdir()
    for name in ROOT_FILES:
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "checkpoint-40000", root / "checkpoint-40000")
    hub = root.parent / "hub"
    repo_cache = hub / f"models--{REAL_BASE.replace('/', '--')}"
    shutil.copytree(example["base"], repo_cache / "snapshots" / SNAPSHOT)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(SNAPSHOT)
    if shutil.which("git"):
        assert _git(root, "init", "-q").returncode == 0
        assert _git(root, "add", "-A").returncode == 0
        assert _git(root, "commit", "-q", "-m", "seed").returncode == 0
    return root, hub


def _tensors(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def _option(argv: list, flag: str, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default


def _changed(merged: dict, base: dict) -> set:
    """Tensors whose value differs from the base's rounded to the merged dtype (compared exactly)."""
    return {n for n in base if not np.array_equal(merged[n], base[n].astype(merged[n].dtype))}


def test_seed_readme_runs_verbatim(seed_root, example):
    root, hub = seed_root
    env = dict(os.environ, HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1")
    base = _tensors(Path(example["base"]))
    adapter_modules = {k.rsplit(".lora_", 1)[0] for k in load_file(root / "checkpoint-40000" / "adapter_model.safetensors")}
    targeted = {m.split("base_model.model.", 1)[1] + ".weight" for m in adapter_modules}
    assert len(base) == 483 and len(targeted) == 120

    for line in seed_commands():
        argv = shlex.split(line)
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        out = proc.stdout
        said = out.splitlines()
        script, args = argv[1], argv[2:]
        defaults_base = script not in ("quick_precision_test.py", "analyze_lora_vs_task_vector_math.py")
        if defaults_base and "--base_model" not in args and "--config" not in args:
            assert any(s.startswith("base model: the embedded StarCoder2 miniature") for s in said), (line, out)

        if script == "merge_lora.py":
            target = root / _option(args, "--output_dir")
            merged = _tensors(target)
            precision = _option(args, "--precision")
            changed = _changed(merged, base)
            assert changed == targeted  # exactly the LoRA's tensors; the rest are the base, copied or rounded
            kept = len(base) - len(changed)
            copied, cast = (kept, 0) if precision == "fp32" else (0, kept)
            assert (f"merged {len(changed)} of {len(base)} tensors, replaced 0, copied {copied} unchanged, cast {cast}; "
                    f"wrote {_option(args, '--output_dir')}") in said, out
            assert {t.dtype for t in merged.values()} == {np.dtype(np.float32 if precision == "fp32" else np.float16)}
        elif script == "extract_task_vectors.py":
            target = _option(args, "--output_dir") or "task_vectors_fp32/"  # the config file's output_dir
            finetuned = _option(args, "--finetuned_model") or "merged_model_fp32/"
            tv = load_file(root / target / "task_vector.safetensors")
            merged = _tensors(root / finetuned)
            changed = {n for n in base if not np.array_equal(merged[n].astype(np.float64), base[n].astype(np.float64))}
            assert set(tv) == changed
            expected = 483 if "fp16" in finetuned else 120
            assert len(changed) == expected
            assert any(s.startswith(f"{expected} of 483 tensors changed") for s in said), out
        elif script == "compare_lora_task_vector.py":
            target = root / _option(args, "--output_dir")
            assert f"Shared tensors analysed: {len(targeted)}" in said, out
            assert f"Perfect matches (cosine > 0.9999): {len(targeted)} of {len(targeted)}" in said, out
            assert "Verdict: EQUIVALENT (certified)" in said, out
            for name in ["comparison_results.json", "detailed_comparison_report.txt", "lora_deltas.safetensors",
                         "report.html", *PLOTS]:
                assert (target / name).is_file(), name
            assert set(load_file(target / "lora_deltas.safetensors")) == targeted  # what the analysis step reads
        elif script == "final_validation.py":
            assert "Verdict: EQUIVALENT (certified)" in said, out
            assert (root / "validation_results" / "comparison_results.json").is_file()
        elif script == "analyze_lora_vs_task_vector_math.py":
            target = root / _option(args, "--output_dir")
            assert (target / "analysis_results.json").is_file() and (target / "analysis_report.md").is_file()
            assert f"{len(targeted)} tensors differ from zero in ΔW or T: {len(targeted)} in both, 0 only in ΔW, " \
                   "0 only in T." in said, out
            assert any(f"equals the adapter's r for {len(targeted)} of {len(targeted)} targeted tensors" in s
                       for s in said), out
        elif script == "quick_precision_test.py":
            half = _tensors(root / "merged_model_fp16")
            cast_artifacts = sum(np.array_equal(half[n], base[n].astype(np.float16)) for n in base if n not in targeted)
            assert cast_artifacts == 363
            assert "fp16 task vector task_vectors_fp16/: 483 tensors changed" in said, out
            assert "fp32 task vector task_vectors_fp32/: 120 tensors changed" in said, out
            assert f"  {cast_artifacts} of 363 are cast artifacts: base + T16 is the base rounded to fp16, bit for bit " \
                   "(untouched weights rounded, not training)" in said, out
        else:
            raise AssertionError(f"no check for {line}")

    if shutil.which("git"):
        # the seed's example data is tracked, not ignored; everything the commands wrote is ignored
        assert _git(root, "check-ignore", "-q", "checkpoint-40000/adapter_model.safetensors").returncode == 1
        status = _git(root, "status", "--porcelain", "--untracked-files=all")
        assert status.returncode == 0 and status.stdout == "", status.stdout


def test_checkpoint_is_the_example_adapter(tmp_path):
    """checkpoint-40000/ is byte for byte what `loratv example` writes as adapter/, and its tokenizer is the model's."""
    from loratv.cli.app import main

    assert main(["example", "-o", str(tmp_path / "ex")]) == 0
    written = {p.name: p.read_bytes() for p in (tmp_path / "ex" / "adapter").iterdir()}
    shipped = {p.name: p.read_bytes() for p in (REPO / "checkpoint-40000").iterdir()}
    assert shipped == written
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(shipped)
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(REPO / "checkpoint-40000")
    config = AutoConfig.from_pretrained(tmp_path / "ex" / "base")
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.eos_token_id == config.eos_token_id


def test_requirements_install_what_the_package_declares():
    """requirements.txt pins the torch the README installs first, then installs the package itself (so its
    dependencies are pyproject's, never a second list that drifts)."""
    lines = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines == ["torch==2.13.0", "-e ."]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 && pip install -e ." in readme
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_spec = next(d for d in deps if d.startswith("torch"))
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(torch_spec[len("torch"):])


def test_root_config_is_the_seeds():
    """extract_task_vectors_config.yml at the root holds the seed README's example config, key for key."""
    import yaml

    assert yaml.safe_load((REPO / "extract_task_vectors_config.yml").read_text()) == {
        "base_model": REAL_BASE, "finetuned_model": "merged_model_fp32/", "output_dir": "task_vectors_fp32/",
        "device": "cuda:0", "trust_remote_code": False,
    }
