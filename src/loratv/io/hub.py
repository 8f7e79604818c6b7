"""Hub ids versus local paths, and hub failures in words.

A source such as `models/base` is both a relative path and a valid hub id. Querying the hub for a folder the user
mistyped is wrong (a network round trip, a confusing "repository not found", or someone else's model), so a source
that looks local and does not exist is reported as a missing path and never sent to the hub. Everything else that
matches `org/name[@revision]` is downloaded, and a download failure is explained by its cause, not its class name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loratv.errors import BadInputError, LoratvError
from loratv.io import storage

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
# suffixes of files loratv reads: a source ending in one names a file, not a repository
LOCAL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".yml", ".yaml")
_TRUE = ("1", "true", "yes", "on")
# files a model download fetches: weights in safetensors form, configs, tokenizers
MODEL_FILE_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt"]


def offline_mode() -> bool:
    """Whether huggingface_hub works from its local cache only (HF_HUB_OFFLINE, read now, or as the client read it).

    Returns:
        True when HF_HUB_OFFLINE is set to 1/true/yes/on now, or huggingface_hub's constants say offline.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a declared dependency
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def local_reason(source: str | os.PathLike) -> str | None:
    """Why a source that does not exist must be a local path, or None when it may be a hub id.

    Args:
        source: the path or hub id as the user gave it.

    Returns:
        A clause such as "it starts with './'" or "'models' is a local folder", or None when the text matches
        `org/name[@revision]` and nothing about it points at the file system.
    """
    text = str(source)
    for prefix in ("./", "../", "/", "~", ".\\", "..\\"):
        if text.startswith(prefix):
            return f"it starts with '{prefix}'"
    name = text.partition("@")[0]
    if name.lower().endswith(LOCAL_SUFFIXES):
        return f"it ends in '{Path(name).suffix}'"
    if not HUB_ID.match(text):
        return "it is not of the form org/name[@revision]"
    first = text.split("/", 1)[0]
    if os.path.isdir(first):  # `models/base` beside a `models/` folder: a mistyped or not yet written path
        return f"'{first}' is a local folder"
    return None


def missing_path_error(source: str | os.PathLike, reason: str) -> LoratvError:
    """The one sentence for a local path that does not exist (never tried on the hub).

    Args:
        source: the path as the user gave it.
        reason: why it was taken as local, a clause from local_reason.

    Returns:
        The LoratvError, for the caller to raise.
    """
    return BadInputError(f"{source}: no such file or folder (not tried as a hub id because {reason}).")


def failure_reason(exc: BaseException, revision: str | None = None, filename: str | None = None) -> str:
    """A download failure from huggingface_hub, as a clause that follows "as a hub id, ".

    Args:
        exc: what snapshot_download or hf_hub_download raised.
        revision: the revision asked for, to name it when it does not exist.
        filename: the single file asked for (hf_hub_download), to name it when it is missing.

    Returns:
        The cause in words: gated, not found or private, no such revision, not in the cache while offline, no
        network, or the HTTP status the hub answered.
    """
    try:
        from huggingface_hub import errors as hf
    except ImportError:  # pragma: no cover - a declared dependency
        return f"it could not be downloaded ({type(exc).__name__})"
    # subclasses first: GatedRepoError is a RepositoryNotFoundError, and every *NotFound is an HfHubHTTPError
    if isinstance(exc, hf.GatedRepoError):
        return ("it is a gated repository: accept its licence on huggingface.co and log in "
                "(`hf auth login` or HF_TOKEN)")
    if isinstance(exc, hf.RepositoryNotFoundError):
        return ("it was not found on the hub (no such repository, or a private one and you are not logged in: "
                "`hf auth login` or HF_TOKEN)")
    if isinstance(exc, hf.RevisionNotFoundError):
        return f"its revision '{revision}' does not exist" if revision else "the revision asked for does not exist"
    if isinstance(exc, hf.LocalEntryNotFoundError) or isinstance(exc, getattr(hf, "OfflineModeIsEnabled", ())):
        if offline_mode():
            return "it is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE)"
        # the client raises this when it could not reach the hub and the cache does not have the files either
        return "the hub could not be reached (no network?) and it is not in the local Hugging Face cache"
    entry_missing = getattr(hf, "RemoteEntryNotFoundError", None) or getattr(hf, "EntryNotFoundError", None)
    if filename and entry_missing is not None and isinstance(exc, entry_missing):
        return f"it has no {filename}"
    if isinstance(exc, hf.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        said = (getattr(exc, "server_message", None) or "").strip().splitlines()
        detail = f": {said[0][:120]}" if said else ""
        return f"the hub answered HTTP {status}{detail}" if status else f"the hub request failed{detail}"
    if isinstance(exc, OSError) or "connect" in type(exc).__name__.lower() or "timeout" in type(exc).__name__.lower():
        return f"the hub could not be reached (no network? {type(exc).__name__})"
    message = str(exc).strip().splitlines()
    return f"it could not be downloaded ({type(exc).__name__}{': ' + message[0][:120] if message else ''})"


def hub_error(source: str, exc: BaseException, *, revision: str | None = None,
              filename: str | None = None) -> LoratvError:
    """The one sentence for a source that is neither a local path nor downloadable.

    Args:
        source: the path or hub id as the user gave it.
        exc: what huggingface_hub raised.
        revision: the revision asked for, if any.
        filename: the single file asked for, if any.

    Returns:
        The LoratvError, for the caller to raise, with the cause from failure_reason.
    """
    reason = failure_reason(exc, revision, filename)
    return BadInputError(f"{source}: no such local file or folder, and as a hub id {reason}.")


def snapshot(hub_id: str, allow_patterns: list[str]) -> Path:
    """Download (or find in the cache) the files of `org/name[@revision]` that match allow_patterns.

    Args:
        hub_id: `org/name` or `org/name@revision`.
        allow_patterns: glob patterns of the files to fetch.

    Returns:
        The local snapshot folder.

    Raises:
        LoratvError: the cause in one sentence (see failure_reason).
    """
    repo_id, _, revision = hub_id.partition("@")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision or None, allow_patterns=allow_patterns)
    except Exception as exc:  # every type the client raises is explained by failure_reason
        raise hub_error(hub_id, exc, revision=revision or None) from None
    return Path(folder)


def single_file(hub_id: str, filename: str) -> Path:
    """Download (or find in the cache) one file of `org/name[@revision]`.

    Args:
        hub_id: `org/name` or `org/name@revision`.
        filename: the file in the repository, e.g. config.json.

    Returns:
        The local path of the file.

    Raises:
        LoratvError: the cause in one sentence (see failure_reason).
    """
    repo_id, _, revision = hub_id.partition("@")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision or None))
    except Exception as exc:  # every type the client raises is explained by failure_reason
        raise hub_error(hub_id, exc, revision=revision or None, filename=filename) from None


def resolve(source: str | os.PathLike, download) -> Path | storage.RemotePath:
    """An object-store URL as a RemotePath, a local path as given, else a hub id passed to download(hub_id), else a
    missing-path error.

    Args:
        source: an object-store URL (s3://, gs://, hf://), a local file or folder, or `org/name[@revision]`.
        download: called with the hub id when the source is not local; returns the local path.

    Returns:
        The RemotePath of an existing URL, or the existing local path.

    Raises:
        LoratvError: nothing lies at the URL, the source looks local and does not exist (the hub is not asked), or
            the download failed.
    """
    if storage.is_url(source):  # s3://, gs://, hf://...: read in place through fsspec, never downloaded
        return storage.resolve(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    reason = local_reason(source)
    if reason is not None:
        raise missing_path_error(source, reason)
    return download(str(source))


def available_locally(source) -> bool:
    """Whether a model that an output records as its input can be opened here with no network access.

    Task vectors and LoRA-delta files record the base they came from; a later command given no base may use it, but
    only where it is already on this machine: asking the hub would turn a quiet default into a download.

    Args:
        source: a recorded model: a path or a hub id `org/name[@revision]`, or None.

    Returns:
        True for an existing local path, or a hub id whose snapshot is in the local Hugging Face cache.
    """
    if not source:
        return False
    text = str(source)
    if Path(text).expanduser().exists():
        return True
    if local_reason(text) is not None:
        return False
    from huggingface_hub import snapshot_download

    repo_id, _, revision = text.partition("@")
    try:
        snapshot_download(repo_id, revision=revision or None, allow_patterns=MODEL_FILE_PATTERNS, local_files_only=True)
    except Exception:  # the client raises many types; all mean "not in the local cache"
        return False
    return True
