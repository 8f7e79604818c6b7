"""Interrupted runs and concurrent writers (issue 7, item 3), with the CLI as a subprocess.

A merge and an extraction are killed with SIGINT and with SIGKILL at random points, some anywhere in the run and
some while the output is being written. Afterwards the output path is absent or holds exactly the uninterrupted
run's files (an output that existed before, replaced with --force, is never absent); after SIGINT no temporary
sibling is left; after SIGKILL the next run removes them and succeeds. LORATV_INTERRUPT_TRIALS (default 1) repeats
every kind of trial that many times; LORATV_INTERRUPT_SEED picks other points.
"""

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers_io import assert_nothing_at, assert_one_line_error, run_cli, tree_digest

TRIALS = int(os.environ.get("LORATV_INTERRUPT_TRIALS", "1"))
SEED = int(os.environ.get("LORATV_INTERRUPT_SEED", "7"))
TALLY = {}  # what the trials saw, printed by test_interruption_tally (run with -s)


def _count(key):
    TALLY[key] = TALLY.get(key, 0) + 1


def _start(argv, cwd):
    return subprocess.Popen([sys.executable, "-m", "loratv.cli", *map(str, argv)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.loratv-"))


def _wait_for_temporary(proc, out, limit=60.0):
    """Seconds until the temporary output folder appears (None if the run ended first)."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if any(".loratv-tmp-" in n for n in _siblings(out)):
            return time.monotonic() - start
        if proc.poll() is not None:
            return None
        time.sleep(0.002)
    raise AssertionError("no temporary output appeared")


def _command(kind, m, out, force=False):
    if kind == "merge":
        argv = ["merge", "--base", m["base"], "--adapter", m["adapter"], "-o", out, "--quiet", "--precision", "fp16"]
    else:
        argv = ["extract", "--base", m["base"], "--finetuned", m["finetuned"], "-o", out, "--quiet", "--dense"]
    return argv + (["--force"] if force else [])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """8 float32 tensors of 1024×1024 (32 MB), a rank-4 LoRA on all of them, and a fine-tuned model; plus, from
    one uninterrupted run of each command (timed: how long in all, how long writing), the reference outputs."""
    root = tmp_path_factory.mktemp("interrupt")
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(8)]
    (root / "base").mkdir()
    (root / "adapter").mkdir()
    (root / "finetuned").mkdir()
    base = {n: torch.randn(1024, 1024, generator=g) for n in names}
    save_file(base, root / "base" / "model.safetensors")
    (root / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    save_file({n: t + 0.5 for n, t in base.items()}, root / "finetuned" / "model.safetensors")
    adapter = {}
    for n in names:
        module = "base_model.model." + n.removesuffix(".weight")
        adapter[f"{module}.lora_A.weight"] = torch.randn(4, 1024, generator=g)
        adapter[f"{module}.lora_B.weight"] = torch.randn(1024, 4, generator=g)
    save_file(adapter, root / "adapter" / "adapter_model.safetensors")
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    m = {"root": root, "base": root / "base", "adapter": root / "adapter", "finetuned": root / "finetuned"}
    for kind in ("merge", "extract"):
        out = root / f"reference-{kind}"
        start = time.monotonic()
        proc = _start(_command(kind, m, out), root)
        _wait_for_temporary(proc, out)
        appeared = time.monotonic()
        while any(".loratv-tmp-" in n for n in _siblings(out)):  # until it is renamed into place
            time.sleep(0.002)
        writing = time.monotonic() - appeared
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        m[kind] = {"digest": tree_digest(out), "total": time.monotonic() - start, "writing": max(0.05, writing)}
    return m


def _check_output(out, reference, existed):
    if out.exists():
        assert tree_digest(out) == reference, "the output path holds something other than the complete output"
        _count("output complete")
    else:
        assert not existed, "an output replaced with --force vanished"
        _count("output absent")


def _trial(m, kind, sig, phase, rng, tmp_path, existed):
    out = tmp_path / f"{kind}-out"
    reference = m[kind]["digest"]
    if existed:  # a previous complete output, replaced with --force
        rc, _, err = run_cli_quiet(_command(kind, m, out))
        assert rc == 0, err
    proc = _start(_command(kind, m, out, force=existed), tmp_path)
    if phase == "anywhere":
        time.sleep(rng.uniform(0, m[kind]["total"]))
    elif _wait_for_temporary(proc, out) is not None:
        time.sleep(rng.uniform(0, m[kind]["writing"]))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    rc = proc.returncode
    _count(f"{sig.name} trials")
    _check_output(out, reference, existed)
    if sig == signal.SIGINT:
        _count({130: "SIGINT caught by loratv (exit 130, cleaned up)", 0: "SIGINT after the run finished"}.get(
            rc, "SIGINT caught by Python, before or after loratv ran"))
        if rc == 130:
            assert stderr.strip().splitlines()[-1] == "loratv: interrupted; no partial output was left.", stderr
            assert "Traceback" not in stderr, stderr
        elif rc != 0:
            # the signal reached Python itself, before loratv ran (importing: a KeyboardInterrupt traceback) or
            # after it returned (finalizing: killed by the default handler, silently); the output check above holds
            assert rc in (-signal.SIGINT, 1) and ("Traceback" not in stderr or "KeyboardInterrupt" in stderr), stderr
        assert _siblings(out) == [], "temporary files left after SIGINT"
    else:
        assert rc in (0, -signal.SIGKILL), (rc, stderr)
        _count("SIGKILL killed the run" if rc else "SIGKILL after the run finished")
        _count(f"temporaries left by SIGKILL: {len(_siblings(out))}")
        # the next run ignores and removes whatever the killed one left
        rc, _, err = run_cli_quiet(_command(kind, m, out, force=out.exists()))
        assert rc == 0, err
        assert tree_digest(out) == reference
        assert _siblings(out) == [], "stale temporaries not removed by the next run"


def run_cli_quiet(argv):
    from loratv.cli import app as cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main([str(a) for a in argv])
    return rc, None, err.getvalue()


# (command, signal, where): "anywhere" is a uniform point of the whole run (interpreter start-up included),
# "writing" one of the time its temporary folder exists; every kind runs TRIALS times, alternately on a fresh and
# an existing output
KINDS = [("merge", signal.SIGINT, "anywhere"), ("merge", signal.SIGINT, "writing"),
         ("merge", signal.SIGKILL, "anywhere"), ("merge", signal.SIGKILL, "writing"),
         ("extract", signal.SIGINT, "writing"), ("extract", signal.SIGKILL, "writing")]


@pytest.mark.parametrize("kind, sig, phase", KINDS, ids=[f"{k}-{s.name}-{p}" for k, s, p in KINDS])
def test_interrupted_run_leaves_nothing_partial(model, tmp_path, kind, sig, phase):
    rng = random.Random(f"{SEED}-{kind}-{sig}-{phase}")
    for i in range(TRIALS):
        work = tmp_path / f"trial-{i}"
        work.mkdir()
        existed = (i + (sig == signal.SIGKILL and phase == "writing")) % 2 == 1  # alternate, both from the start
        _trial(model, kind, sig, phase, rng, work, existed)


def test_interruption_tally(model):
    """Prints what the trials above saw (run with -s for the campaign's figures)."""
    print(f"\ninterruptions: {TALLY}")


# ---- concurrent writers and stale temporaries --------------------------------------------------------------


def test_two_runs_writing_one_output_at_once(model, tmp_path):
    """Started together: one wins and writes the complete output, the other fails in one sentence (the lock is
    busy, or the output already exists if the winner finished first); nothing else is left."""
    out = tmp_path / "out"
    procs = [_start(_command("merge", model, out), tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    rc, err = next(r for r in results if r[0] == 2)
    line = assert_one_line_error(rc, err, out)
    assert "another loratv process" in line or "already exists" in line
    assert tree_digest(out) == model["merge"]["digest"]
    assert _siblings(out) == []


def test_a_held_lock_refuses_a_second_writer(capsys, model, tmp_path):
    from loratv.io.outputs import _output_lock

    out = tmp_path / "out"
    with _output_lock(out, out):
        rc, _, err = run_cli(capsys, *_command("merge", model, out))
    line = assert_one_line_error(rc, err, out)
    assert f"another loratv process (pid {os.getpid()}) is writing this output" in line
    assert_nothing_at(out)


def test_stale_temporaries_of_a_killed_run_are_removed(capsys, model, tmp_path):
    """What a SIGKILL leaves (a temporary folder, an old-output folder, an unlocked lock file) is removed by the next
    run, even when the dead run's pid now belongs to a live process (the lock, not the pid, decides)."""
    out = tmp_path / "out"
    stale = [tmp_path / f".out.loratv-tmp-{os.getpid()}", tmp_path / ".out.loratv-tmp-999999",
             tmp_path / ".out.loratv-old-999998"]
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half-written")
    (tmp_path / ".out.loratv-lock").write_text("999999\n")
    rc, _, err = run_cli(capsys, *_command("merge", model, out))
    assert rc == 0, err
    assert _siblings(out) == []
    assert tree_digest(out) == model["merge"]["digest"]


def test_failed_run_with_force_keeps_the_previous_output(capsys, model, tmp_path):
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, *_command("merge", model, out))
    assert rc == 0, err
    broken = tmp_path / "broken-adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((model["adapter"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x01")
    rc, _, err = run_cli(capsys, "merge", "--base", model["base"], "--adapter", broken, "-o", out, "--force")
    assert_one_line_error(rc, err, broken)
    assert tree_digest(out) == model["merge"]["digest"]
    assert _siblings(out) == []


def test_replacing_without_an_atomic_exchange(capsys, model, tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing, --force replaces by two renames and still leaves nothing else."""
    from loratv.io import outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous output")
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    rc, _, err = run_cli(capsys, *_command("merge", model, out, force=True))
    assert rc == 0, err
    assert tree_digest(out) == model["merge"]["digest"]
    assert _siblings(out) == []


def test_atomic_exchange_swaps_two_folders(tmp_path):
    from loratv.io.outputs import _exchange

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from-a").touch()
    (b / "from-b").touch()
    if not _exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here; the two-rename fallback is tested above")
    assert [p.name for p in a.iterdir()] == ["from-b"] and [p.name for p in b.iterdir()] == ["from-a"]
