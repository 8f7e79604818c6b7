"""A progress bar on an interactive terminal, nothing otherwise."""

import sys
from contextlib import contextmanager

from tqdm import tqdm


class _Silent:
    def update(self, n):
        pass


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool):
    """A context manager giving a byte-counting tqdm bar on stderr, or a silent stand-in.

    Args:
        total: the number of bytes the work covers.
        label: the bar's description.
        enabled: False always gives the silent stand-in (so does a stderr that is not a terminal).

    Yields:
        An object with `update(n)`: the tqdm bar (closed on exit, not left on screen) or a no-op.
    """
    if not enabled or not sys.stderr.isatty():
        yield _Silent()
        return

    with tqdm(total=total, desc=label, unit="B", unit_scale=True, leave=False, file=sys.stderr) as bar:
        yield bar
