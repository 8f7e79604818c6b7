"""The browser test's skip is exact and visible: which of chromium / chromedriver is missing, the apt command, and
one line in pytest's summary saying how to run the tests (tests/conftest.py's pytest_terminal_summary)."""

import os
import subprocess
import sys
from pathlib import Path

from helpers_report import APT_INSTALL, chromium_status

REPO = Path(__file__).resolve().parents[2]


def _fake_path(tmp_path, *names):
    """A PATH holding only executables with these names."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        exe = bin_dir / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return str(bin_dir)


def test_skip_reason_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("LORATV_CHROMIUM", raising=False)
    monkeypatch.delenv("LORATV_CHROMEDRIVER", raising=False)
    monkeypatch.setenv("PATH", _fake_path(tmp_path, "chromium"))
    found, reason = chromium_status()
    assert found is None
    assert reason.startswith("chromedriver is not installed"), reason
    assert f"chromium is, at {tmp_path / 'bin' / 'chromium'}" in reason and APT_INSTALL in reason
    assert "no chromium" not in reason

    (tmp_path / "other").mkdir()
    monkeypatch.setenv("PATH", _fake_path(tmp_path / "other", "chromedriver"))
    found, reason = chromium_status()
    assert found is None and reason.startswith("chromium is not installed") and "chromedriver is, at" in reason


def test_summary_line_says_why_and_how(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "LORATV_CHROMIUM", "LORATV_CHROMEDRIVER")}
    env["PATH"] = _fake_path(tmp_path, "chromium")
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/report/test_report_browser.py", "-p", "no:cacheprovider",
                           "--basetemp", str(tmp_path / "basetemp")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("loratv: ")]
    assert len(lines) == 1, proc.stdout
    assert "browser tests of report.html skipped: chromedriver is not installed" in lines[0]
    assert APT_INSTALL in lines[0] and "python -m pytest tests/report/test_report_browser.py" in lines[0]
