"""Hub ids versus missing local paths, and hub failures explained by their cause (loratv/hub.py).

The hub client is replaced by a function that raises each error type huggingface_hub defines, constructed as the
installed version allows; a missing path that looks local must never reach it.
"""

import os
import shutil
import subprocess
import sys

import pytest

from helpers_io import assert_one_line_error, run_cli

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def _response(status: int):
    """A response object for the HTTP error types (httpx in huggingface_hub >= 1.0, requests before)."""
    url = "https://huggingface.co/api/models/org/name"
    try:
        import httpx2 as httpx
    except ImportError:
        try:
            import httpx
        except ImportError:
            httpx = None
    if httpx is not None:
        return httpx.Response(status, request=httpx.Request("GET", url))
    import requests

    response = requests.Response()
    response.status_code = status
    response.url = url
    return response


def _http_error(cls, status: int, message: str = "error"):
    return cls(message, response=_response(status))


def _errors():
    from huggingface_hub import errors as hf

    return [
        ("gated", lambda: _http_error(hf.GatedRepoError, 403), ["gated", "licence", "log in"]),
        ("missing repo", lambda: _http_error(hf.RepositoryNotFoundError, 404), ["not found", "private"]),
        ("missing revision", lambda: _http_error(hf.RevisionNotFoundError, 404), ["revision 'v9'", "does not exist"]),
        ("server error", lambda: _http_error(hf.HfHubHTTPError, 503), ["HTTP 503"]),
        ("connection", lambda: ConnectionError("connection refused"), ["could not be reached", "no network"]),
        ("os error", lambda: OSError(101, "Network is unreachable"), ["could not be reached", "no network"]),
    ]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """snapshot_download / hf_hub_download replaced; calls recorded; cwd is an empty folder, so ids are not paths."""
    import huggingface_hub

    calls = []
    raised = {"exc": None}

    def fake(repo_id, *args, **kwargs):
        calls.append(repo_id)
        raise raised["exc"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return calls, raised


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _errors()])
def test_hub_failure_is_explained_by_its_cause(fake_hub, capsys, example_dir, case, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls, raised = fake_hub
    _, make, words = _errors()[case]
    raised["exc"] = make()
    for argv in (["merge", "--base", "org/name@v9", "--adapter", example_dir / "adapter", "-o", "out"],
                 ["inspect", "org/name@v9"], ["inspect", "--config-only", "org/name@v9"]):
        rc, _, err = run_cli(capsys, *argv)
        line = assert_one_line_error(rc, err, "org/name@v9", "no such local file or folder, and as a hub id")
        for word in words:
            assert word in line, (word, line)
        assert type(raised["exc"]).__name__ not in line or "no network" in line, line
    assert calls and set(calls) == {"org/name"}


@pytest.mark.parametrize("offline", [True, False])
def test_not_in_cache_says_offline_or_no_network(fake_hub, capsys, example_dir, monkeypatch, offline):
    import huggingface_hub.constants as constants
    from huggingface_hub import errors as hf

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    calls, raised = fake_hub
    raised["exc"] = hf.LocalEntryNotFoundError("Cannot find the requested files in the disk cache")
    rc, _, err = run_cli(capsys, "merge", "--base", "org/name", "--adapter", example_dir / "adapter", "-o", "out")
    line = assert_one_line_error(rc, err, "org/name")
    if offline:
        assert "not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE)" in line, line
    else:
        assert "could not be reached (no network?)" in line and "not in the local Hugging Face cache" in line, line
    assert "LocalEntryNotFoundError" not in line


@pytest.mark.parametrize("source,reason", [
    ("models/base", "'models' is a local folder"),
    ("./base", "it starts with './'"),
    ("../nowhere/base", "it starts with '../'"),
    ("org/name.safetensors", "it ends in '.safetensors'"),
    ("base", "it is not of the form org/name[@revision]"),
])
def test_missing_local_path_is_reported_without_asking_the_hub(fake_hub, capsys, example_dir, source, reason):
    calls, raised = fake_hub
    os.mkdir("models")  # `models/base` beside a `models/` folder is a path, however hub-id-like it looks
    raised["exc"] = AssertionError("the hub must not be asked")
    for argv in (["merge", "--base", source, "--adapter", example_dir / "adapter", "-o", "out"],
                 ["inspect", source], ["inspect", "--config-only", source]):
        rc, _, err = run_cli(capsys, *argv)
        line = assert_one_line_error(rc, err, f"{source}: no such file or folder (not tried as a hub id because")
        assert reason in line, line
    assert calls == []
    assert not os.path.exists("out")


def test_real_hub_cache_layout_still_resolves_offline(example_dir, tmp_path):
    """HF_HUB_CACHE/models--org--name/snapshots/<commit>/ with refs/main, HF_HUB_OFFLINE=1, in a fresh process (the
    hub client reads its settings at import), from a working folder that also holds an unrelated `org` file."""
    cache = tmp_path / "hub"
    snap = cache / "models--org--name" / "snapshots" / COMMIT
    shutil.copytree(example_dir / "base", snap)
    (cache / "models--org--name" / "refs").mkdir()
    (cache / "models--org--name" / "refs" / "main").write_text(COMMIT)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    out = work / "merged"
    proc = subprocess.run([sys.executable, "-m", "loratv.cli", "merge", "--base", "org/name", "--adapter",
                           str(example_dir / "adapter"), "-o", str(out), "--quiet"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file()
    proc = subprocess.run([sys.executable, "-m", "loratv.cli", "inspect", "org/name", "--config-only", "--json"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
