"""Session setup shared by every test module.

- LORATV_CACHE points to a fresh temporary folder for the whole session, so the cached example (and its cached
  merges) never touch ~/.cache. Modules may still override it with their own fixture.
- Offline: no hub access, and transformers/PEFT progress output kept quiet.
- `tests/` is importable, so modules can `from tiny_models import ...` (builders and oracles live in tests/tiny_models.py).
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
    from loratv.cli.app import main

    out = tmp_path_factory.mktemp("example") / "ex"
    assert main(["example", "-o", str(out)]) == 0
    return out


BROWSER_TESTS = "tests/report/test_report_browser.py"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line when the browser tests were skipped, with the exact reason and how to run them: with `-q` a skip is
    otherwise only an `s` in the progress line, and report.html would go untested in a real browser unnoticed."""
    skipped = [r for r in terminalreporter.stats.get("skipped", [])
               if str(getattr(r, "nodeid", "")).replace("\\", "/").split("::")[0].endswith("test_report_browser.py")]
    if not skipped:
        return
    longrepr = skipped[0].longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ").removeprefix("browser test: ")
    terminalreporter.write_line(
        f"loratv: {len(skipped)} browser tests of report.html skipped: {reason}; then run "
        f"`python -m pytest {BROWSER_TESTS}` (docs/report.md).", yellow=True, bold=True)
