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


def check_output(out, inputs, *, force: bool) -> Path:
    """Refuse an output that is, holds or lies inside an input, or that exists without --force."""
    out_real = _real(out)
    for inp in inputs:
        if inp is None:
            continue
        inp_real = _real(inp)
        if _within(out_real, inp_real):
            raise LoratvError(f"{out}: the output would be written into the input {inp}; choose another output path.")
        if _within(inp_real, out_real):
            raise LoratvError(f"{out}: the output path contains the input {inp}; choose another output path.")
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
