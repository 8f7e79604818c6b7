"""Output folders that appear only when complete, and never on top of an input."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from .errors import LoratvError


def _real(path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _refuse_overlap(out, out_real: Path, inputs) -> None:
    for inp in inputs:
        if inp is None:
            continue
        inp_real = _real(inp)
        if _within(out_real, inp_real):
            raise LoratvError(f"{out}: the output would be written into the input {inp}; choose another output path.")
        if _within(inp_real, out_real):
            raise LoratvError(f"{out}: the output path contains the input {inp}; choose another output path.")


def check_output(out, inputs, *, force: bool) -> Path:
    """Refuse an output that is, holds or lies inside an input, or that exists without --force."""
    out_real = _real(out)
    _refuse_overlap(out, out_real, inputs)
    if out_real.exists() and not force:
        raise LoratvError(f"{out}: already exists; pass --force to replace it.")
    if out_real.exists() and not out_real.is_dir():
        raise LoratvError(f"{out}: exists and is not a folder.")
    return out_real


@contextmanager
def atomic_output_dir(out, inputs=(), *, force: bool = False):
    """Yield a temporary sibling folder; rename it to `out` only if the block finishes without an exception."""
    out_real = check_output(out, inputs, force=force)
    out_real.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_real.parent / f".{out_real.name}.loratv-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_real.exists():
        old = out_real.parent / f".{out_real.name}.loratv-old-{os.getpid()}"
        os.rename(out_real, old)
        os.rename(tmp, out_real)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_real)


@contextmanager
def atomic_output_file(out, inputs=(), *, force: bool = False):
    """Yield a temporary sibling path with the same suffix; rename it to `out` only if the block finishes without an
    exception (the single-file counterpart of atomic_output_dir)."""
    out_real = _real(out)
    _refuse_overlap(out, out_real, inputs)
    if out_real.is_dir():
        raise LoratvError(f"{out}: is a folder; give a file name.")
    if out_real.exists() and not force:
        raise LoratvError(f"{out}: already exists; pass --force to replace it.")
    out_real.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_real.parent / f".{out_real.stem}.loratv-tmp-{os.getpid()}{out_real.suffix}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_real)
