"""mergekit itself as a test oracle, in a virtual environment of its own so its pins never touch loratv's.

The environment is created once (torch 2.13.0 first, as the README installs it, so no second multi-GB torch build is
pulled; then mergekit 0.1.5 from PyPI) at $LORATV_MERGEKIT_VENV or ~/.cache/loratv/mergekit-0.1.5, built in a
temporary sibling and renamed into place, and reused by later sessions. `run_mergekit` runs many merges in one
mergekit process (its import of torch and transformers costs seconds): each exactly what `mergekit-yaml CONFIG OUT
--random-seed 0 --no-write-model-card` does.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"
DRIVER = """
import json, sys
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
import yaml
for config_file, out in json.loads(sys.argv[1]):
    options = MergeOptions(random_seed=0, write_model_card=False, lora_merge_cache=sys.argv[2] or None)
    options.apply_global_options()
    text = open(config_file, encoding="utf-8").read()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out, options=options, config_source=text)
"""


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def mergekit_python() -> Path:
    """The python of mergekit's environment, created on first use.

    Returns:
        Path to its interpreter.

    Raises:
        pytest.skip.Exception: the environment cannot be created here (no package index reachable).
    """
    venv = Path(os.environ.get("LORATV_MERGEKIT_VENV", Path.home() / ".cache" / "loratv" / "mergekit-0.1.5"))
    python = _venv_python(venv)
    if python.exists():
        return python
    partial = venv.with_name(f"{venv.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True, capture_output=True)
        pip = [str(_venv_python(partial)), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH], check=True, capture_output=True, timeout=1800)
        subprocess.run([*pip, MERGEKIT], check=True, capture_output=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"mergekit's environment could not be created ({MERGEKIT}): "
                    f"{detail.decode(errors='replace').strip().splitlines()[-1:] or exc}")
    try:
        partial.rename(venv)
    except OSError:  # another session made it meanwhile
        shutil.rmtree(partial, ignore_errors=True)
    return python


def run_mergekit(jobs: list[tuple[Path, Path]], lora_cache: Path | None = None) -> None:
    """Run mergekit on each (config, output folder), in one process, seeded, without a model card.

    Args:
        jobs: (YAML config, output folder) pairs; the configs must name models by absolute path.
        lora_cache: mergekit's --lora-merge-cache, for configs with model+lora references.

    Raises:
        AssertionError: mergekit failed (its output is in the message).
    """
    python = mergekit_python()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(python), "-c", DRIVER, json.dumps([[str(c), str(o)] for c, o in jobs]),
                           str(lora_cache or "")],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
