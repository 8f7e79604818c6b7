"""A progress bar on an interactive terminal, nothing otherwise."""

import sys
from contextlib import contextmanager

from tqdm import tqdm


class _Silent:
    def update(self, n):
        pass


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        yield _Silent()
        return

    with tqdm(total=total, desc=label, unit="B", unit_scale=True, leave=False, file=sys.stderr) as bar:
        yield bar
