"""Shared fixtures and helpers for the I/O tests (bad input, checkpoints, seed scripts, inspect).

Import the fixtures a module needs (`from helpers_io import loratv_cache, example, ...`); pytest picks them up from
the module's namespace. Inputs are always copied to a test's tmp folder before being changed; the cached example
is read only.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loratv_cache(tmp_path_factory):
    """LORATV_CACHE in a session-wide tmp folder (the example is written once), never ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "loratv-cache-io"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORATV_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def example(loratv_cache):
    """The cached embedded example: {"base": folder, "adapter": folder}. Read only."""
    from loratv.example.builder import example_paths

    return example_paths()


@pytest.fixture
def ex(example, tmp_path):
    """A private copy of the example ({"base", "adapter"} under tmp_path/ex) that a test may corrupt."""
    root = tmp_path / "ex"
    out = {}
    for key in ("base", "adapter"):
        out[key] = root / key
        shutil.copytree(example[key], out[key])
    return out


# ---- running the CLI ----------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    """loratv.cli.main in-process: (exit code, stdout, stderr)."""
    from loratv.cli import app as cli

    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_json(capsys, *argv) -> dict:
    """loratv.cli.main in-process with --json: the record it printed (exit code 0 asserted)."""
    rc, out, err = run_cli(capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def run_subprocess(argv, cwd, script=None, timeout=120):
    """`python -m loratv.cli ...` (or `python SCRIPT ...`) in a fresh interpreter: CompletedProcess."""
    head = [sys.executable, str(script)] if script else [sys.executable, "-m", "loratv.cli"]
    return subprocess.run(
        head + [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def assert_one_line_error(rc, err, *names):
    """Exit 2, one `loratv: error:` line naming every one of `names`, no traceback; returns the line."""
    assert "Traceback" not in err, err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("loratv: error:"), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def assert_nothing_at(out: Path):
    """Neither the output nor a temporary sibling of it exists."""
    out = Path(out)
    assert not out.exists(), f"{out} was created"
    if out.parent.is_dir():
        left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.loratv-")]
        assert not left, f"temporary siblings left behind: {left}"


def tree_digest(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder, to prove it was not modified."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- writing inputs -----------------------------------------------------------------------------------------


def write_model(folder: Path, tensors: dict) -> Path:
    """A model folder holding `tensors` (NumPy arrays) as model.safetensors, written by safetensors itself."""
    from safetensors.numpy import save_file as save_numpy

    folder.mkdir(parents=True, exist_ok=True)
    save_numpy(tensors, str(folder / "model.safetensors"))
    return folder


def write_raw_safetensors(path: Path, header, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors file written by hand: header (dict, or raw bytes) and data; header_len overrides the prefix."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    prefix = struct.pack("<Q", len(raw) if header_len is None else header_len)
    Path(path).write_bytes(prefix + raw + data)
    return Path(path)


def read_header_json(path: Path) -> dict:
    """The JSON header of a safetensors file, parsed independently of loratv."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def shard_model(src_file: Path, folder: Path, names: list[str], *, blobs: Path | None = None) -> dict:
    """Split a safetensors file into len(names) shards (tensor order kept) plus model.safetensors.index.json.

    With `blobs`, each shard is written there and symlinked into folder (the hub cache's layout).
    Returns the weight_map.
    """
    tensors = load_file(src_file)
    keys = list(tensors)
    n = len(names)
    size = -(-len(keys) // n)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(names):
        part = {k: tensors[k] for k in keys[i * size:(i + 1) * size]}
        target = (blobs / f"blob-{shard}") if blobs else folder / shard
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file(part, target, metadata={"format": "pt"})
        if blobs:
            os.symlink(os.path.relpath(target, folder), folder / shard)
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return weight_map


def rewrite_adapter(adapter: Path, edit) -> None:
    """Load adapter_model.safetensors, let edit(dict) change it in place, save it back (a tmp copy only)."""
    file = adapter / "adapter_model.safetensors"
    tensors = dict(load_file(file))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})


def edit_adapter_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def tensors_equal(a: dict, b: dict) -> bool:
    """Same names, dtypes, shapes and bits."""
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.numel() and not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def load_folder(folder: Path) -> dict:
    """Every tensor of a safetensors model folder (single file or shards), through safetensors itself."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out
