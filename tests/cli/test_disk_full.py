"""A full disk and failing writes (issue 7, item 4): a merge or an extraction whose writes fail ends with one
sentence naming the output and the error (exit 2), nothing at the output path or beside it, and inputs untouched.

Two ways to fail a write: (1) in CI always, a sitecustomize.py (written by the test, on PYTHONPATH of the CLI
subprocess only) makes os.pwrite, os.write, os.copy_file_range and os.sendfile write short and then raise ENOSPC
once a byte budget is spent; (2) where the test may mount (root with CAP_SYS_ADMIN), a real tmpfs too small for the
output, filled by the shards or, sized to hold them exactly, by the small JSON files written after them.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from helpers_io import assert_nothing_at, assert_one_line_error, tree_digest

INJECT = '''
import errno, os

_budget = int(os.environ["LORATV_TEST_ENOSPC_AFTER"])
_spent = 0


def _allow(n):
    """How many of n bytes may still be written; ENOSPC once the budget is gone (as a filling disk does)."""
    global _spent
    left = _budget - _spent
    if left <= 0 and n > 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    n = min(n, left)
    _spent += n
    return n


def _wrap(real, size_of, shrink):
    def call(*args):
        n = _allow(size_of(args))
        return real(*shrink(args, n)) if n else 0
    return call


os.pwrite = _wrap(os.pwrite, lambda a: memoryview(a[1]).nbytes, lambda a, n: (a[0], memoryview(a[1]).cast("B")[:n], a[2]))
os.write = _wrap(os.write, lambda a: memoryview(a[1]).nbytes, lambda a, n: (a[0], memoryview(a[1]).cast("B")[:n]))
os.copy_file_range = _wrap(os.copy_file_range, lambda a: a[2], lambda a, n: (a[0], a[1], n, *a[3:]))
os.sendfile = _wrap(os.sendfile, lambda a: a[3], lambda a, n: (a[0], a[1], a[2], n))
'''


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A 16 MB model (two shards), a LoRA on half its tensors, a fine-tuned copy, and the injection module."""
    root = tmp_path_factory.mktemp("diskfull")
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(8)]
    base = {n: torch.randn(512, 1024, generator=g) for n in names}
    for folder in ("base", "adapter", "finetuned", "inject"):
        (root / folder).mkdir()
    weight_map = {}
    for i, part in enumerate((names[:4], names[4:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: base[n] for n in part}, root / "base" / shard)
        weight_map.update({n: shard for n in part})
    (root / "base" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (root / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    save_file({n: t * 1.5 for n, t in base.items()}, root / "finetuned" / "model.safetensors")
    adapter = {}
    for n in names[::2]:
        module = "base_model.model." + n.removesuffix(".weight")
        adapter[f"{module}.lora_A.weight"] = torch.randn(4, 1024, generator=g)
        adapter[f"{module}.lora_B.weight"] = torch.randn(512, 4, generator=g)
    save_file(adapter, root / "adapter" / "adapter_model.safetensors")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["up_proj"]}))
    (root / "inject" / "sitecustomize.py").write_text(INJECT)
    return {k: root / k for k in ("base", "adapter", "finetuned", "inject")}


def _argv(kind, inputs, out):
    if kind == "merge":
        return ["merge", "--base", inputs["base"], "--adapter", inputs["adapter"], "-o", out, "--quiet"]
    return ["extract", "--base", inputs["base"], "--finetuned", inputs["finetuned"], "-o", out, "--quiet"]


def _run(argv, cwd, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "loratv.cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_clean_failure(proc, out, before, inputs):
    line = assert_one_line_error(proc.returncode, proc.stderr, out)
    assert "No space left on device" in line and "nothing was left at the output path" in line, line
    assert_nothing_at(out)
    assert {k: tree_digest(inputs[k]) for k in ("base", "adapter", "finetuned")} == before


# bytes written before the disk is "full": at once, inside the first shard, inside the second
BUDGETS = {"merge": [0, 3 << 20, 11 << 20], "extract": [5 << 20]}


@pytest.mark.parametrize("kind", ["merge", "extract"])
def test_injected_enospc_at_several_points(inputs, tmp_path, kind):
    before = {k: tree_digest(inputs[k]) for k in ("base", "adapter", "finetuned")}
    pythonpath = os.pathsep.join([str(inputs["inject"]), os.environ.get("PYTHONPATH", "")])
    out = tmp_path / "out"
    for budget in BUDGETS[kind]:
        proc = _run(_argv(kind, inputs, out), tmp_path, {"PYTHONPATH": pythonpath,
                                                          "LORATV_TEST_ENOSPC_AFTER": str(budget)})
        _assert_clean_failure(proc, out, before, inputs)
    if kind == "merge":  # control: with room to spare the same command succeeds under the same injection
        proc = _run(_argv(kind, inputs, out), tmp_path, {"PYTHONPATH": pythonpath,
                                                          "LORATV_TEST_ENOSPC_AFTER": str(1 << 40)})
        assert proc.returncode == 0, proc.stderr


@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> folder on a tmpfs of that many bytes; skipped where mounting is not permitted."""
    mounted = []

    def mount(size):
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); the injected ENOSPC "
                        "test covers this case")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def test_real_full_tmpfs(inputs, small_tmpfs, tmp_path):
    """An 8 MiB tmpfs for a 16 MB merge and extraction: ENOSPC in the shards."""
    before = {k: tree_digest(inputs[k]) for k in ("base", "adapter", "finetuned")}
    disk = small_tmpfs(8 << 20)
    for kind in ("merge", "extract"):
        out = disk / f"{kind}-out"
        _assert_clean_failure(_run(_argv(kind, inputs, out), tmp_path, {}), out, before, inputs)
        assert os.listdir(disk) == [], "the full disk was not cleaned up"


def test_real_tmpfs_full_after_the_shards(inputs, small_tmpfs, tmp_path):
    """A tmpfs that holds the merged shards exactly: config.json, the index or the manifest hits ENOSPC."""
    before = {k: tree_digest(inputs[k]) for k in ("base", "adapter", "finetuned")}
    measured = tmp_path / "measured"
    from loratv.cli import app as cli

    assert cli.main([str(a) for a in _argv("merge", inputs, measured)]) == 0
    shards = sorted(measured.glob("*.safetensors"))
    pages = sum(math.ceil(f.stat().st_size / 4096) for f in shards) + 1  # and one for the lock file's pid
    disk = small_tmpfs(pages * 4096)
    out = disk / "out"
    _assert_clean_failure(_run(_argv("merge", inputs, out), tmp_path, {}), out, before, inputs)
    assert os.listdir(disk) == []
