"""Output folders (and files) that appear only when complete, never on top of an input, one writer at a time.

An output OUT is written into a temporary sibling `.OUT.loratv-tmp-PID`, flushed to disk, and renamed into place
only when complete; an existing output (with --force) is swapped for the new one in one atomic rename where the OS
allows it, so OUT always holds one complete version. A lock file `.OUT.loratv-lock`, held with flock(2) for the
whole run, makes a second writer of the same path fail at once. The kernel releases the lock when its holder dies,
even by SIGKILL, so the next run that takes it knows that every temporary sibling of OUT is stale and removes it.

An object-store URL (s3://, gs://, hf://) has no rename and no lock: it is staged in a local folder and published by
io/remote_output.py (uploaded under a temporary prefix, copied into place, a `.loratv-complete` marker written last);
docs/object-stores.md says what a reader sees meanwhile.
"""

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import cast

from loratv.errors import LoratvError, OutputExistsError, param
from loratv.io import remote_output, storage

try:  # POSIX only: on Windows outputs are still atomic, but two writers of one path are not kept apart
    import fcntl
except ImportError:
    fcntl = None  # type: ignore[assignment]
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# errors that mean "the output cannot be written here", whichever file raised them
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _real(path) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _refuse_overlap(out, out_real: Path, inputs) -> None:
    for inp in inputs:
        if inp is None or storage.is_url(inp):  # an object-store input cannot overlap a local output
            continue
        inp_real = _real(inp)
        if _within(out_real, inp_real):
            raise OutputExistsError(f"{out}: the output would be written into the input {inp}; choose another output path.")
        if _within(inp_real, out_real):
            raise OutputExistsError(f"{out}: the output path contains the input {inp}; choose another output path.")


def output_path(out) -> Path:
    """An output as a path object for results and messages: a local Path, or an object-store URL's RemotePath
    (which `Path(url)` would mangle: `s3://b/x` into `s3:/b/x`).

    Args:
        out: the output as the user gave it.

    Returns:
        The Path (or the RemotePath, typed as the Path it stands in for).
    """
    return cast(Path, storage.as_path(out))


def task_folder(staging: Path) -> str:
    """Where an executor's tasks write their files for an output being written: its temporary folder, or for an
    object-store output its temporary prefix (a task on another machine cannot reach the driver's staging folder).

    Args:
        staging: the folder atomic_output_dir yielded.

    Returns:
        A local path or a URL, as a string (it goes over the wire).
    """
    temporary = remote_output.temporary_prefix(staging)
    return str(temporary if temporary is not None else staging)


@contextmanager
def task_output(folder: str):
    """In a task: a local folder to write files into that end up in `folder` (task_folder's answer).

    For a local folder the files are written in place; for a URL they are written to a private temporary folder
    and uploaded, each to folder/<its relative name>, when the block ends without an exception.

    Args:
        folder: the task folder, a local path or a URL.

    Yields:
        The local folder to write into (created).

    Raises:
        LoratvError: an upload failed (ObjectStoreError).
    """
    if not storage.is_url(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield Path(folder)
        return
    local = Path(tempfile.mkdtemp(prefix="loratv-task-"))
    try:
        yield local
        target = storage.RemotePath(folder)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            remote_output.upload_file(path, target / path.relative_to(local).as_posix())
    finally:
        shutil.rmtree(local, ignore_errors=True)


@contextmanager
def task_file(path: str):
    """In a task: a local path to write one file to that ends up at `path` (a file in a task folder).

    Args:
        path: the file's final place, a local path or a URL.

    Yields:
        The local path to write (its folder exists).

    Raises:
        LoratvError: the upload failed (ObjectStoreError).
    """
    folder, _, name = str(path).rpartition("/")
    with task_output(folder) as local:
        yield local / name


def remove_task_files(folder: str, name: str) -> None:
    """Remove what tasks wrote under folder/name (their part files, once assembled), locally or in the store.

    Args:
        folder: the task folder, a local path or a URL.
        name: the sub-folder.

    Raises:
        ObjectStoreError: the store refuses a deletion.
    """
    if storage.is_url(folder):
        remote_output.remove_tree(storage.RemotePath(folder) / name)
    else:
        shutil.rmtree(Path(folder) / name, ignore_errors=True)


def guarded_inputs(sources) -> list:
    """The inputs an output must stay clear of: object-store URLs and local paths that exist (a hub id, a state dict
    or None names no place the output could overlap).

    Args:
        sources: the command's input sources, as given.

    Returns:
        Those that are URLs or existing local paths, in order.
    """
    return [s for s in sources if s is not None and (storage.is_url(s) or (
        isinstance(s, (str, os.PathLike)) and os.path.exists(os.path.expanduser(s))))]


def check_output(out, inputs, *, force: bool) -> Path:
    """Refuse an output that is, holds or lies inside an input, or that exists without --force.

    Args:
        out: the output folder (or object-store URL) as the user gave it.
        inputs: the input paths and URLs (None entries are skipped).
        force: an existing output folder may be replaced.

    Returns:
        The output's real path (symlinks resolved, ~ expanded); for a URL, its RemotePath.

    Raises:
        OutputExistsError: the output exists and force is False.
        LoratvError: the output is, holds or lies inside an input, or exists and is not a folder.
    """
    if storage.is_url(out):  # the output's RemotePath, typed as the Path it stands in for
        return cast(Path, remote_output.check_output(out, inputs, force=force))
    out_real = _real(out)
    _refuse_overlap(out, out_real, inputs)
    if out_real.exists() and not force:
        raise OutputExistsError(f"{out}: already exists; pass {param('force', True)} to replace it.")
    if out_real.exists() and not out_real.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder.")
    return out_real


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextmanager
def _output_lock(out_real: Path, shown):
    """Hold `.OUT.loratv-lock` (flock) for the block; yields whether the lock is real (False where the filesystem
    has no flock, e.g. some network mounts: then only stale temporaries of dead pids are cleaned)."""
    lock = out_real.parent / f".{out_real.name}.loratv-lock"
    if fcntl is None:
        yield False
        return
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o644)
        except OSError as exc:
            raise LoratvError(f"{shown}: cannot be written ({exc.strerror}); nothing was written.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                yield False
                return
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise LoratvError(f"{shown}: another loratv process{who} is writing this output right now; wait for it "
                              "to finish or choose another output path.") from None
        # the previous holder unlinks the file on release: make sure we locked the file that is there now
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # informational only (a full disk must still get its clear message later)
            pass
        yield True
    finally:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def shared_cache_lock(folder: Path):
    """Wait for, then hold, a lock on a cache folder, so that concurrent runs fill it once instead of racing to
    write the same output (atomic_output_dir would make all but one fail).

    Where the OS or filesystem has no flock, the block runs unlocked.

    Args:
        folder: the cache folder (created if missing); the lock file is folder/.loratv-cache-lock.

    Yields:
        None, while the lock is held.

    Raises:
        OSError: the lock file cannot be created, or flock fails other than by being unsupported.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(folder / ".loratv-cache-lock", os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
        yield
    finally:
        os.close(fd)


def _remove_stale(out_real: Path, locked: bool) -> None:
    """Temporary siblings left by a killed run of the same output (we hold its lock, so none is live)."""
    prefixes = (f".{out_real.name}.loratv-tmp-", f".{out_real.name}.loratv-old-")
    for p in out_real.parent.iterdir():
        if not p.name.startswith(prefixes):
            continue
        pid = p.name.split("-")[-1].split(".")[0]
        if not locked and pid.isdigit() and _pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """Every file and folder of a finished output on disk before it is renamed into place (so that a crash after
    the rename cannot expose empty files); shards were fsynced by their writer and cost nothing here."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), directory=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # TypeError: Windows' CDLL needs a library name
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _put_in_place(tmp: Path, out_real: Path) -> None:
    if not out_real.exists() or not tmp.is_dir():
        os.replace(tmp, out_real)  # atomic for a file, even over an existing one
    elif _exchange(tmp, out_real):
        shutil.rmtree(tmp, ignore_errors=True)  # the previous output, now at the temporary name
    else:  # two renames: a kill between them leaves OUT absent (never partial) and the old one at a stale name
        old = out_real.parent / f".{out_real.name}.loratv-old-{os.getpid()}"
        os.rename(out_real, old)
        os.rename(tmp, out_real)
        shutil.rmtree(old, ignore_errors=True)
    try:
        _fsync_path(out_real.parent, directory=True)
    except OSError:
        pass


def _write_failure(out, exc: BaseException, tmp: Path):
    """An OSError while writing the output becomes one sentence; others (an input that vanished) pass through."""
    if not isinstance(exc, OSError) or isinstance(exc, BrokenPipeError):
        return None
    name = str(exc.filename or "")
    if exc.errno in WRITE_ERRNOS or (name and _within(_real(name), _real(tmp))):
        return LoratvError(f"{out}: cannot be written ({exc.strerror or exc}); nothing was left at the output path "
                           "and no input was changed.")
    return None


def make_parents(out, out_real: Path) -> list[Path]:
    """Create the missing folders above an output, saying so in one line on stderr (as `mkdir -p` would, but not
    silently: a typo in -o should be visible), and return them, deepest first, so a failed run can remove them.

    Args:
        out: the output path as the user gave it (shown in the note).
        out_real: its resolved form.

    Returns:
        The folders created, deepest first (empty when the parent already existed).

    Raises:
        LoratvError: a parent cannot be created (a file in the way, no permission, a read-only file system).
    """
    parent = out_real.parent
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    if not missing:
        return []
    shown = Path(out).expanduser().parent
    try:
        out_real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoratvError(f"{out}: its parent folder {shown} cannot be created ({exc.strerror or exc}); nothing was "
                          "written.") from None
    print(f"loratv: note: created missing parent folder {shown}", file=sys.stderr)
    return missing


def _remove_created(created: list[Path]) -> None:
    """Undo make_parents after a failed run: remove the folders it made, deepest first, if still empty."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def _atomic(out, inputs, force: bool, tmp_name, check):
    out_real = _real(out)
    _refuse_overlap(out, out_real, inputs)
    check(out_real)
    created = make_parents(out, out_real)
    try:
        with _locked_atomic(out, out_real, tmp_name, check) as tmp:
            yield tmp
    except BaseException:
        _remove_created(created)
        raise


@contextmanager
def _locked_atomic(out, out_real: Path, tmp_name, check):
    with _output_lock(out_real, out) as locked:
        check(out_real)  # again under the lock: another run may have finished it meanwhile
        _remove_stale(out_real, locked)
        tmp = out_real.parent / tmp_name(out_real)
        try:
            yield tmp
            if tmp.is_dir():
                _sync_tree(tmp)
            elif tmp.exists():
                _fsync_path(tmp)
            _put_in_place(tmp, out_real)
        except BaseException as exc:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            failure = _write_failure(out, exc, tmp)
            if failure is not None:
                raise failure from None
            raise


@contextmanager
def atomic_output_dir(out, inputs=(), *, force: bool = False):
    """Yield a temporary sibling folder; rename it to `out` only if the block finishes without an exception.

    An object-store URL (s3://, gs://, hf://) is staged in a local folder and published by
    remote_output.atomic_remote_dir: uploaded under a temporary prefix, copied into place, completion marker last.

    Args:
        out: the output folder or URL; missing parent folders are created (and removed again on failure).
        inputs: input paths (and URLs) the output must not be, hold or lie inside.
        force: replace an existing output folder.

    Yields:
        The temporary folder (created, empty) to write the output into (for a URL, the local staging folder).

    Raises:
        LoratvError: the output is refused (see check_output; OutputExistsError without force), or writing it
            failed with an OSError such as a full disk (nothing is left at the output path then).
    """

    if storage.is_url(out):  # staged locally, then published at the URL (io/remote_output.py)
        with remote_output.atomic_remote_dir(out, inputs, force=force) as staging:
            yield staging
        return

    def check(out_real):
        check_output(out, inputs, force=force)

    def make_tmp(out_real):
        return f".{out_real.name}.loratv-tmp-{os.getpid()}"

    with _atomic(out, inputs, force, make_tmp, check) as tmp:
        tmp.mkdir()
        yield tmp


@contextmanager
def atomic_output_file(out, inputs=(), *, force: bool = False):
    """Yield a temporary sibling path with the same suffix; rename it to `out` only if the block finishes without an
    exception (the single-file counterpart of atomic_output_dir).

    An object-store URL is staged locally and uploaded to its key (remote_output.atomic_remote_file).

    Args:
        out: the output file or URL; missing parent folders are created (and removed again on failure).
        inputs: input paths (and URLs) the output must not be, hold or lie inside.
        force: replace an existing output file.

    Yields:
        The temporary path (not created) to write the output to.

    Raises:
        LoratvError: `out` is a folder, exists without force, overlaps an input, or writing it failed with an
            OSError such as a full disk.
    """

    if storage.is_url(out):  # staged locally, then uploaded to its key (io/remote_output.py)
        with remote_output.atomic_remote_file(out, inputs, force=force) as staging:
            yield staging
        return

    def check(out_real):
        if out_real.is_dir():
            raise LoratvError(f"{out}: is a folder; give a file name.")
        if out_real.exists() and not force:
            raise OutputExistsError(f"{out}: already exists; pass {param('force', True)} to replace it.")

    def make_tmp(out_real):
        return f".{out_real.name}.loratv-tmp-{os.getpid()}{out_real.suffix}"

    with _atomic(out, inputs, force, make_tmp, check) as tmp:
        yield tmp
