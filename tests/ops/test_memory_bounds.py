"""Resource bounds (issue 7, item 6): merge and extract run under a hard memory limit derived from the largest
tensor, on a model of 2,000 small tensors and on one with a single 2 GiB tensor.

The limit is RLIMIT_DATA, set in the CLI subprocess before it starts: it caps the private writable memory a
process may map (heap, anonymous mmaps, thread stacks; what /proc/PID/status calls VmData), and an allocation
beyond it fails at once. RLIMIT_AS is unworkable here: it also counts the address space torch and glibc reserve
without using (PROT_NONE malloc arenas of 64 MiB per thread, library mappings), which varies with thread count.
The limit is relative to the VmData of an idle interpreter that has imported torch and loratv, measured the same
way:

    limit = idle VmData + F + largest tensor's bytes

F is each command's fixed working memory, from its own constants: merge, 128 MiB (one row chunk of work,
streaming.CHUNK_BYTES); extract, its four 64 MiB read buffers (extract.READ_BYTES) plus 128 MiB. The small model
(256 MiB of tensors of 128 KiB) is larger than F, so holding it would fail; the 2 GiB tensor plus one full-size
temporary would too. Both claims are checked: loading the small model, or the large tensor and one result, under
the same limits fails. The peak RSS of each run (from wait4) is printed.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

MIB = 1 << 20
SMALL_SHAPE, SMALL_COUNT = (64, 512), 2000  # 128 KiB each, 250 MiB in all
BIG_SHAPE = (32768, 16384)  # 2 GiB of float32


def _sparse_model(path: Path, tensors):
    """A safetensors file of zeros written as a sparse file: (name, shape) float32 tensors, no disk used."""
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


def _lora(folder: Path, modules, shape, r=4):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module in modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, shape[1], generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], r, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors")
    targets = sorted({m.rsplit(".", 1)[1] for m in modules})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                            "target_modules": targets}))


def _limited(argv, limit, cwd, python_code=None):
    """Run the CLI (or `python -c python_code`) with RLIMIT_DATA = limit: (exit code, peak RSS bytes, stderr).
    The shell sets the limit and execs Python in its place (no preexec_fn in a threaded pytest)."""
    head = [sys.executable, "-c", python_code] if python_code else [sys.executable, "-m", "loratv.cli"]
    shell = ["/bin/sh", "-c", f'ulimit -d {limit // 1024} && exec "$@"', "sh"]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(shell + head + [str(a) for a in argv], cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, usage.ru_maxrss * 1024, err.read()


@pytest.fixture(scope="module")
def idle_vmdata():
    """VmData of an interpreter that has imported torch and loratv's commands, and nothing more."""
    code = ("import torch, loratv.cli, loratv.ops.merge, loratv.ops.extract, loratv.ops.verify\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmData:')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return int(out) * 1024


def _bounds():
    from loratv.ops.extract import READ_BYTES
    from loratv.common.streaming import CHUNK_BYTES

    return {"merge": CHUNK_BYTES, "extract": 4 * READ_BYTES + 128 * MIB}


def _output_root(tmp_path, need):
    """/dev/shm when it has room (the 2 GiB outputs then cost no disk time), else the test's tmp folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > need + (1 << 30):
        folder = Path(tempfile.mkdtemp(dir=shm, prefix="loratv-mem-"))
        return folder, True
    return tmp_path, False


def test_two_thousand_small_tensors(idle_vmdata, tmp_path):
    names = [f"model.layers.{i // 10}.mlp.p{i % 10}.weight" for i in range(SMALL_COUNT)]
    base = tmp_path / "base"
    _sparse_model(base / "model.safetensors", [(n, SMALL_SHAPE) for n in names])
    _lora(tmp_path / "adapter", [n.removesuffix(".weight") for n in names[::20]], SMALL_SHAPE)
    largest = 4 * SMALL_SHAPE[0] * SMALL_SHAPE[1]
    model_bytes = SMALL_COUNT * largest
    bounds = _bounds()
    limits = {cmd: idle_vmdata + bound + largest for cmd, bound in bounds.items()}
    assert model_bytes > bounds["merge"] + largest  # holding the model cannot fit under merge's limit

    rc, rss, err = _limited(["merge", "--base", base, "--adapter", tmp_path / "adapter", "-o", tmp_path / "merged",
                             "--quiet"], limits["merge"], tmp_path)
    assert rc == 0, err
    print(f"\n2000 tensors, merge: peak RSS {rss / MIB:.0f} MiB, limit idle + {(limits['merge'] - idle_vmdata) / MIB:.0f} MiB")
    rc, rss, err = _limited(["extract", "--base", base, "--finetuned", tmp_path / "merged", "-o", tmp_path / "tv",
                             "--quiet"], limits["extract"], tmp_path)
    assert rc == 0, err
    print(f"2000 tensors, extract: peak RSS {rss / MIB:.0f} MiB, limit idle + "
          f"{(limits['extract'] - idle_vmdata) / MIB:.0f} MiB")
    assert json.loads((tmp_path / "tv" / "task_vector.json").read_text())["changed_tensors"] == 100

    # control: the limit is below what holding the model takes
    load = f"from safetensors.torch import load_file; load_file({str(base / 'model.safetensors')!r})"
    rc, _, err = _limited([], limits["merge"], tmp_path, python_code=load)
    assert rc != 0, "loading the whole model fit under the merge limit; the test would prove nothing"


def test_a_single_2_gib_tensor(idle_vmdata, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    base = tmp_path / "base"
    _sparse_model(base / "model.safetensors", [(name, BIG_SHAPE)])
    tuned = tmp_path / "tuned"  # the same zeros but one changed page: a changed 2 GiB task-vector tensor
    _sparse_model(tuned / "model.safetensors", [(name, BIG_SHAPE)])
    fd = os.open(tuned / "model.safetensors", os.O_WRONLY)
    os.pwrite(fd, b"\x3f" * 4096, (tuned / "model.safetensors").stat().st_size // 2)
    os.close(fd)
    _lora(tmp_path / "adapter", [name.removesuffix(".weight")], BIG_SHAPE, r=1)
    largest = 4 * BIG_SHAPE[0] * BIG_SHAPE[1]
    limits = {cmd: idle_vmdata + bound + largest for cmd, bound in _bounds().items()}
    # a targeted tensor's s·B@A is formed whole, as PEFT forms it (bit-identity needs PEFT's GEMM shapes;
    # adapter.delta_rows): `largest` holds it, and the rows being merged take a second chunk beside the first
    from loratv.common.streaming import CHUNK_BYTES

    limits["merge"] += CHUNK_BYTES
    root, is_shm = _output_root(tmp_path, largest)
    try:
        rc, rss, err = _limited(["merge", "--base", base, "--adapter", tmp_path / "adapter", "-o", root / "merged",
                                 "--quiet"], limits["merge"], tmp_path)
        assert rc == 0, err
        print(f"\n2 GiB tensor, merge: peak RSS {rss / MIB:.0f} MiB, limit idle + "
              f"{(limits['merge'] - idle_vmdata) / MIB:.0f} MiB")
        assert (root / "merged" / "model.safetensors").stat().st_size > largest
        shutil.rmtree(root / "merged")
        rc, rss, err = _limited(["extract", "--base", base, "--finetuned", tuned, "-o", root / "tv", "--quiet"],
                                limits["extract"], tmp_path)
        assert rc == 0, err
        assert json.loads((root / "tv" / "task_vector.json").read_text())["changed_elements"] == 1024
        print(f"2 GiB tensor, extract: peak RSS {rss / MIB:.0f} MiB, limit idle + "
              f"{(limits['extract'] - idle_vmdata) / MIB:.0f} MiB")
    finally:
        if is_shm:
            shutil.rmtree(root, ignore_errors=True)

    # control: the tensor and one full-size result (what a non-streaming merge holds) do not fit
    load = (f"from safetensors.torch import load_file; w = load_file({str(base / 'model.safetensors')!r})"
            f"[{name!r}]; w2 = w + 1")
    rc, _, err = _limited([], limits["merge"], tmp_path, python_code=load)
    assert rc != 0, "the tensor and a copy fit under the limit; the test would prove nothing"
