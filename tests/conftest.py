"""Session setup shared by every test module.

- LORATV_CACHE points to a fresh temporary folder for the whole session, so the cached example (and its cached
  merges) never touch ~/.cache. Modules may still override it with their own fixture.
- Offline: no hub access, and transformers/PEFT progress output kept quiet.
- `tests/` is importable, so modules can `from models import ...` (builders and oracles live in tests/models.py).
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

_SESSION_CACHE = None


def pytest_configure(config):
    global _SESSION_CACHE
    _SESSION_CACHE = tempfile.mkdtemp(prefix="loratv-test-cache-")
    os.environ["LORATV_CACHE"] = _SESSION_CACHE
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_unconfigure(config):
    if _SESSION_CACHE:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory):
    """`loratv example -o DIR` run once per session: DIR/base and DIR/adapter. Read only."""
    from loratv.cli import main

    out = tmp_path_factory.mktemp("example") / "ex"
    assert main(["example", "-o", str(out)]) == 0
    return out
