"""Outputs at object-store URLs (s3://, gs://, hf://): staged on local disk, uploaded under a temporary prefix, then
published under the output prefix with a completion marker written last.

An object store has no atomic rename of a folder, so the promise "an output appears only when complete" is kept
this way (docs/object-stores.md says what a reader sees at each moment):

1. The command writes the output into a local staging folder, exactly as it writes a local output.
2. Every file is uploaded under the temporary prefix `OUT.loratv-tmp-<id>/` (multipart for large files: the
   backend's put_file), beside the files that executor tasks on other machines uploaded there themselves (their
   shards and part files, see outputs.task_output). OUT itself is untouched: an interrupted or failed upload leaves
   nothing under OUT/.
3. OUT is checked again; with force, the existing output is deleted, its `.loratv-complete` marker first.
4. Each file is copied server side from the temporary prefix to OUT/, then the marker OUT/.loratv-complete is
   written last, and the temporary prefix is deleted.

A reader takes OUT as complete exactly when OUT/.loratv-complete exists; the marker lists every file and its size.
A single-file output needs none of this: an object becomes visible only when its upload completes (multipart
included), so it is uploaded straight to its key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loratv.errors import LoratvError, ObjectStoreError, OutputExistsError, param
from loratv.io import storage

MARKER = ".loratv-complete"
MARKER_SCHEMA = "loratv.complete"
NOTHING_LEFT = "nothing was left at the output URL and no input was changed"


def _reason(exc: BaseException) -> str:
    """A store failure's message without the URL it starts with (the outer sentence names the output)."""
    return re.sub(r"^\S+://\S*: ", "", str(exc).rstrip("."))


def _norm(url) -> str:
    return str(storage.as_path(url)).rstrip("/")


def refuse_overlap(out, inputs) -> None:
    """Refuse an output URL that is, holds or lies inside an input URL (local inputs cannot overlap a URL).

    Args:
        out: the output URL.
        inputs: the inputs (paths, URLs, RemotePaths; None entries are skipped).

    Raises:
        OutputExistsError: the output would be written into an input, or contains one.
    """
    target = _norm(out)
    for inp in inputs:
        if inp is None or not storage.is_url(inp if isinstance(inp, storage.RemotePath) else str(inp)):
            continue
        source = _norm(inp)
        if target == source or target.startswith(source + "/"):
            raise OutputExistsError(f"{out}: the output would be written into the input {inp}; choose another output "
                                    "path.")
        if source.startswith(target + "/"):
            raise OutputExistsError(f"{out}: the output path contains the input {inp}; choose another output path.")


def check_output(out, inputs, *, force: bool, folder: bool = True) -> storage.RemotePath:
    """Refuse an output URL that overlaps an input, or that exists without force.

    Args:
        out: the output URL as the user gave it.
        inputs: the input paths and URLs (None entries are skipped).
        force: an existing output may be replaced.
        folder: the output is a folder (a prefix), not a single object.

    Returns:
        The output's RemotePath.

    Raises:
        OutputExistsError: the output exists and force is False, overlaps an input, or is of the other kind (an
            object where a folder is wanted, or the reverse).
        ObjectStoreError: the store cannot be reached or refuses the request.
    """
    target = storage.as_path(out)
    assert isinstance(target, storage.RemotePath)
    if len(target.parts) < 3:  # "s3://bucket": the temporary prefix needs a sibling name inside the bucket
        raise LoratvError(f"{out}: give an output prefix inside the bucket (s3://bucket/name), not the bucket itself.")
    refuse_overlap(out, inputs)
    is_object = target.is_file()
    has_objects = bool(storage.list_tree(target))
    if folder and is_object:
        raise OutputExistsError(f"{out}: exists and is not a folder.")
    if not folder and has_objects:
        raise OutputExistsError(f"{out}: is a folder; give a file name.")
    if (is_object or has_objects) and not force:
        raise OutputExistsError(f"{out}: already exists; pass {param('force', True)} to replace it.")
    return target


def _staging_failure(out, exc: BaseException, staging: Path) -> LoratvError | None:
    """An OSError while writing the local staging copy (a full disk) becomes one sentence; others pass through."""
    if not isinstance(exc, OSError) or isinstance(exc, BrokenPipeError):
        return None
    name = os.path.realpath(str(exc.filename or ""))
    if exc.filename and (name == str(staging) or name.startswith(str(staging) + os.sep)):
        return LoratvError(f"{out}: cannot be written (its local staging copy in {staging.parent}: "
                           f"{exc.strerror or exc}); {NOTHING_LEFT}.")
    return None


_TEMPORARY: dict[str, storage.RemotePath] = {}  # a staging folder -> its output's temporary prefix


def temporary_prefix(staging: Path) -> storage.RemotePath | None:
    """The temporary prefix of the output a staging folder belongs to, where executor tasks upload the files they
    write themselves (published with the staged ones).

    Args:
        staging: the folder atomic_remote_dir yielded.

    Returns:
        The prefix, or None for any other folder.
    """
    return _TEMPORARY.get(str(staging))


def upload_file(local: Path, url: storage.RemotePath) -> None:
    """One local file to one object (the backend uploads a large file in parts, visible only when all have arrived).

    Args:
        local: the file.
        url: the object to write.

    Raises:
        ObjectStoreError: the store cannot be reached or refuses the upload.
    """
    _upload(local, url)


def _upload(local: Path, url: storage.RemotePath) -> None:
    """One file to one object (the backend uploads a large file in parts, visible only when all have arrived)."""
    with storage.remote_errors(url, "written"):
        fs, path = storage.filesystem(url)
        fs.put_file(str(local), path)


def _copy(src: storage.RemotePath, dst: storage.RemotePath) -> None:
    """A server-side copy of one object (no bytes pass through this machine on s3 and gs)."""
    with storage.remote_errors(dst, "written"):
        fs, src_path = storage.filesystem(src)
        fs.copy(src_path, storage.filesystem(dst)[1])


def _put_marker(url: storage.RemotePath, files: dict[str, int]) -> None:
    body = json.dumps({"schema": MARKER_SCHEMA, "files": files}, indent=2, sort_keys=True) + "\n"
    with storage.remote_errors(url, "written"):
        fs, path = storage.filesystem(url)
        fs.pipe_file(path, body.encode("utf-8"))


def remove_tree(url: storage.RemotePath) -> None:
    """Delete every object under a prefix, the completion marker first (so that readers stop trusting it at once).

    Args:
        url: the prefix.

    Raises:
        ObjectStoreError: the store cannot be reached or refuses a deletion.
    """
    names = storage.list_tree(url)
    with storage.remote_errors(url, "written"):
        fs, root = storage.filesystem(url)
        if MARKER in names:
            fs.rm_file(f"{root.rstrip('/')}/{MARKER}")
        rest = [f"{root.rstrip('/')}/{n}" for n in sorted(names) if n != MARKER]
        if rest:
            fs.rm(rest)  # one batched request per 1000 keys on s3
        fs.invalidate_cache(root)


def _try_remove_tree(url: storage.RemotePath) -> None:
    try:
        remove_tree(url)
    except Exception:  # cleaning up after a failure must not hide the failure itself
        pass


def _temporary_for(target: storage.RemotePath) -> storage.RemotePath:
    return target.parent / f"{target.name}.loratv-tmp-{uuid.uuid4().hex[:16]}"


def _local_files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def publish(staging: Path, out, target: storage.RemotePath, inputs, force: bool,
            temporary: storage.RemotePath | None = None) -> None:
    """Upload a finished staging folder to the output URL (steps 2-4 of the module's description).

    Args:
        staging: the local folder holding the complete output (but what tasks uploaded to `temporary` themselves).
        out: the output URL as the user gave it (named in messages).
        target: its RemotePath.
        inputs: the inputs, checked against the output again.
        force: an existing output may be replaced.
        temporary: the temporary prefix (None: a new one); every object under it is published too.

    Raises:
        LoratvError: the output appeared meanwhile (without force), or an upload, copy or deletion failed; the
            temporary prefix is removed, and nothing is left under the output prefix unless the failure came while
            replacing an existing output (then it has no marker).
    """
    staged = _local_files(staging)
    temporary = temporary or _temporary_for(target)
    started = False
    try:
        for name in staged:
            _upload(staging / name, temporary / name)
        files = storage.list_tree(temporary)  # the staged files and those executor tasks uploaded themselves
        check_output(out, inputs, force=force)  # again: another run may have finished it meanwhile
        if storage.list_tree(target):
            remove_tree(target)
        started = True
        for name in files:
            _copy(temporary / name, target / name)
        _put_marker(target / MARKER, files)
    except BaseException as exc:
        if started:  # never leave a part of the new output under OUT without its marker if it can be helped
            _try_remove_tree(target)
        _try_remove_tree(temporary)
        if isinstance(exc, ObjectStoreError):
            raise ObjectStoreError(f"{out}: cannot be written ({_reason(exc)}); {NOTHING_LEFT}.") from None
        raise
    _try_remove_tree(temporary)


@contextmanager
def atomic_remote_dir(out, inputs=(), *, force: bool = False) -> Iterator[Path]:
    """Yield a local staging folder; publish it at the output URL only if the block finishes without an exception.

    Args:
        out: the output URL (a prefix).
        inputs: input paths and URLs the output must not be, hold or lie inside.
        force: replace an existing output.

    Yields:
        The local staging folder (created, empty), named like the output.

    Raises:
        LoratvError: the output is refused (check_output), staging it failed with an OSError such as a full disk,
            or publishing it failed (publish); nothing is left at the output URL then.
    """
    target = check_output(out, inputs, force=force)
    root = Path(os.path.realpath(tempfile.mkdtemp(prefix="loratv-stage-")))
    staging = root / target.name
    staging.mkdir()
    temporary = _TEMPORARY[str(staging)] = _temporary_for(target)
    try:
        try:
            yield staging
        except BaseException as exc:
            _try_remove_tree(temporary)  # what executor tasks may have uploaded
            failure = _staging_failure(out, exc, staging)
            if failure is not None:
                raise failure from None
            raise
        publish(staging, out, target, inputs, force, temporary)
    finally:
        del _TEMPORARY[str(staging)]
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def atomic_remote_file(out, inputs=(), *, force: bool = False) -> Iterator[Path]:
    """Yield a local staging path; upload it to the output URL only if the block finishes without an exception (an
    object appears only once its upload is complete, so no temporary key is needed).

    Args:
        out: the output URL (one object).
        inputs: input paths and URLs the output must not be, hold or lie inside.
        force: replace an existing object.

    Yields:
        The local staging path (not created), with the output's suffix.

    Raises:
        LoratvError: the output is refused, staging it failed with an OSError, or the upload failed.
    """
    target = check_output(out, inputs, force=force, folder=False)
    root = Path(os.path.realpath(tempfile.mkdtemp(prefix="loratv-stage-")))
    staging = root / target.name
    try:
        try:
            yield staging
        except BaseException as exc:
            failure = _staging_failure(out, exc, root)
            if failure is not None:
                raise failure from None
            raise
        check_output(out, inputs, force=force, folder=False)
        try:
            _upload(staging, target)
        except ObjectStoreError as exc:
            raise ObjectStoreError(f"{out}: cannot be written ({_reason(exc)}); {NOTHING_LEFT}.") from None
    finally:
        shutil.rmtree(root, ignore_errors=True)
