"""Object-store URLs (s3://, gs://, hf://, any fsspec protocol) beside local paths: which sources are URLs, and the
few filesystem queries and ranged reads loratv makes on them, through fsspec.

A URL becomes a RemotePath: a pure path whose first part keeps the scheme (`s3:`, then bucket and key parts), so
that `/`, `.name`, `.parent` and `.suffix` work as on a local folder and `str()` gives the URL back. Its queries
(exists, is_file, is_dir, stat, iterdir, glob) are answered by fsspec; tensor data and headers are read with ranged
requests (`read_range`), never by fetching a whole object. fsspec and its backend (s3fs, gcsfs, huggingface_hub)
are imported only when a URL is used, so local paths never touch them.

Credentials and endpoints come from where the backend looks for them: for s3://, botocore's chain (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION, ~/.aws/config and
~/.aws/credentials, instance roles); for every protocol, fsspec's configuration (FSSPEC_<PROTOCOL>_<KEY> environment
variables, e.g. FSSPEC_S3_ENDPOINT_URL, and JSON files in ~/.config/fsspec/).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loratv.errors import LoratvError, ObjectStoreError

# a scheme of two characters or more (one letter is a Windows drive), then "://"
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
READ_PIECE_BYTES = 16 << 20  # the largest single ranged request: bounds the memory a copy of a big tensor holds
_EXTRA_FOR = {"s3": "install it with pip install 'loratv[s3]'", "s3a": "install it with pip install 'loratv[s3]'",
              "gs": "install gcsfs with pip install gcsfs", "gcs": "install gcsfs with pip install gcsfs"}


def is_url(source: object) -> bool:
    """Whether a source names an object-store location (`scheme://...`, other than file://) rather than a local path.

    Args:
        source: a path, a URL, a RemotePath or anything else (a state dict, None).

    Returns:
        True for a RemotePath or a string of the form `scheme://...` whose scheme is not `file`.
    """
    if isinstance(source, RemotePath):
        return True
    if not isinstance(source, str):
        return False
    match = _URL.match(source)
    return match is not None and match.group(1).lower() != "file"


def as_path(source: str | os.PathLike) -> Path | RemotePath:
    """A source as a path object: a RemotePath for a URL, else a local Path (what `Path(source)` would give).

    Args:
        source: a local path or a URL.

    Returns:
        The RemotePath or Path.
    """
    if isinstance(source, RemotePath):
        return source
    if is_url(source):
        return RemotePath(str(source))
    return Path(source)


@dataclass(frozen=True)
class RemoteStat:
    """The part of os.stat_result that loratv reads from an object."""

    st_size: int


class RemotePath(PurePosixPath):
    """A location in an object store, used where loratv uses a local Path (joins, names, suffixes and the queries
    below); `str()` is the URL."""

    def __str__(self) -> str:
        parts = self.parts
        if not parts or not parts[0].endswith(":"):  # not built from a URL (cannot happen through as_path)
            return "/".join(parts)
        return f"{parts[0]}//" + "/".join(parts[1:])

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    @property
    def protocol(self) -> str:
        """The URL's scheme, e.g. "s3"."""
        return self.parts[0][:-1]

    def exists(self) -> bool:
        """Whether an object or a non-empty prefix ("folder") lies at this URL.

        Returns:
            True when it exists.

        Raises:
            ObjectStoreError: the store cannot be reached or refuses the request (see remote_errors).
        """
        with remote_errors(self):
            fs, path = filesystem(self)
            return bool(fs.exists(path))

    def is_file(self) -> bool:
        """Whether an object lies at this URL.

        Returns:
            True for an object, False for a prefix or nothing.

        Raises:
            ObjectStoreError: the store cannot be reached or refuses the request.
        """
        with remote_errors(self):
            fs, path = filesystem(self)
            return bool(fs.isfile(path))

    def is_dir(self) -> bool:
        """Whether objects lie under this URL as a prefix (a "folder"; a bucket counts as one).

        Returns:
            True for a prefix with objects under it.

        Raises:
            ObjectStoreError: the store cannot be reached or refuses the request.
        """
        with remote_errors(self):
            fs, path = filesystem(self)
            return bool(fs.isdir(path))

    def is_symlink(self) -> bool:
        """Object stores have no symbolic links.

        Returns:
            False.
        """
        return False

    def stat(self) -> RemoteStat:
        """The object's size.

        Returns:
            A RemoteStat with st_size.

        Raises:
            ObjectStoreError: no object at this URL, or the store cannot be reached or refuses the request.
        """
        return RemoteStat(size(self))

    def iterdir(self) -> Iterator[RemotePath]:
        """The objects and prefixes directly under this prefix.

        Returns:
            An iterator of RemotePaths, sorted.

        Raises:
            ObjectStoreError: the store cannot be reached or refuses the request.
        """
        with remote_errors(self):
            fs, path = filesystem(self)
            names = fs.ls(path, detail=False)
        own = path.rstrip("/")
        return iter(sorted(_child(fs, n) for n in names if n.rstrip("/") != own))

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Objects and prefixes under this prefix that match a relative glob pattern (`*.safetensors`, `*/x.json`).

        Args:
            pattern: the pattern, relative to this URL.

        Returns:
            An iterator of the matching RemotePaths, sorted.

        Raises:
            ObjectStoreError: the store cannot be reached or refuses the request.
        """
        with remote_errors(self):
            fs, path = filesystem(self)
            names = fs.glob(f"{path.rstrip('/')}/{pattern}")
        return iter(sorted(_child(fs, n) for n in names))

    def expanduser(self) -> RemotePath:
        """A URL has no home folder to expand.

        Returns:
            This path.
        """
        return self

    def resolve(self) -> RemotePath:
        """A URL has no symbolic links or relative parts to resolve.

        Returns:
            This path.
        """
        return self

    def read_bytes(self) -> bytes:
        """The whole object (only for small files: configs and indexes).

        Returns:
            Its bytes.

        Raises:
            ObjectStoreError: no object at this URL, or the store cannot be reached or refuses the request.
        """
        with remote_errors(self):
            fs, path = filesystem(self)
            return bytes(fs.cat_file(path))

    def read_text(self, encoding: str = "utf-8") -> str:
        """The whole object as text (only for small files).

        Args:
            encoding: the text encoding.

        Returns:
            The decoded text.

        Raises:
            ObjectStoreError: as read_bytes.
            UnicodeDecodeError: the object is not text in that encoding.
        """
        return self.read_bytes().decode(encoding)


def _child(fs, name: str) -> RemotePath:
    return RemotePath(fs.unstrip_protocol(name.rstrip("/")))


def filesystem(url: str | os.PathLike):
    """The fsspec filesystem for a URL (credentials, endpoint and options from the standard places; fsspec caches
    the instance) and the URL's path in that filesystem's terms.

    Args:
        url: the URL.

    Returns:
        (fsspec filesystem, path within it, e.g. "bucket/key" for s3).

    Raises:
        ObjectStoreError: fsspec, or the protocol's backend (s3fs, gcsfs), is not installed, or the protocol is unknown.
    """
    text = str(url)
    protocol = text.split("://", 1)[0].lower()
    hint = _EXTRA_FOR.get(protocol, "install fsspec and the package that serves this protocol")
    try:
        import fsspec
    except ImportError:
        raise ObjectStoreError(f"{text}: reading object-store URLs needs fsspec; {hint}.") from None
    try:
        return fsspec.core.url_to_fs(text)
    except ImportError:
        raise ObjectStoreError(f"{text}: the {protocol}:// backend of fsspec is not installed; {hint}.") from None
    except ValueError as exc:
        raise ObjectStoreError(f"{text}: fsspec cannot open {protocol}:// URLs ({_first_line(exc)}).") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0][:160] if lines else "") or type(exc).__name__


@contextmanager
def remote_errors(url: str | os.PathLike, doing: str = "read"):
    """Turn what fsspec or its backend raises into one sentence naming the URL (LoratvErrors pass through).

    Args:
        url: the URL the block works on (named in the message).
        doing: "read" or "written", as the message says it.

    Yields:
        None.

    Raises:
        ObjectStoreError: for a missing object, denied access, or any other failure of the store or the network.
    """
    try:
        yield
    except LoratvError:
        raise
    except FileNotFoundError:
        raise ObjectStoreError(f"{url}: no such object or folder in the object store.") from None
    except PermissionError as exc:
        raise ObjectStoreError(f"{url}: the object store refused access ({_first_line(exc)}); check the credentials "
                               "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE for s3://).") from None
    except Exception as exc:  # botocore, aiohttp, gcsfs and the hub each raise their own types
        raise ObjectStoreError(f"{url}: cannot be {doing} ({type(exc).__name__}: {_first_line(exc)}).") from None


def resolve(source: str | os.PathLike) -> RemotePath:
    """A URL that must exist as an object or a prefix.

    Args:
        source: the URL as the user gave it.

    Returns:
        Its RemotePath.

    Raises:
        ObjectStoreError: nothing lies at the URL, or the store cannot be reached or refuses the request.
    """
    path = RemotePath(str(source))
    if not path.exists():
        raise ObjectStoreError(f"{source}: no such object or folder in the object store.")
    return path


def size(url: str | os.PathLike) -> int:
    """An object's size in bytes.

    Args:
        url: the object's URL.

    Returns:
        The size.

    Raises:
        ObjectStoreError: no object at the URL, or the store cannot be reached or refuses the request.
    """
    with remote_errors(url):
        fs, path = filesystem(url)
        return int(fs.size(path))


def read_range(url: str | os.PathLike, start: int, nbytes: int) -> bytes:
    """Bytes [start, start + nbytes) of an object, in one ranged request.

    Args:
        url: the object's URL.
        start: the first byte.
        nbytes: how many bytes (at most; fewer come back where the object ends sooner).

    Returns:
        The bytes, shorter than nbytes only when the object ends first.

    Raises:
        ObjectStoreError: no object at the URL, or the store cannot be reached or refuses the request.
    """
    if nbytes <= 0:
        return b""
    with remote_errors(url):
        fs, path = filesystem(url)
        try:
            return bytes(fs.cat_file(path, start=start, end=start + nbytes))
        except OSError as exc:
            if _unsatisfiable(exc):  # HTTP 416: the range starts at or past the object's end
                return b""
            raise


def _unsatisfiable(exc: OSError) -> bool:
    text = str(exc).lower()
    return "range" in text and ("not satisfiable" in text or "invalidrange" in text or "416" in text)


def iter_range(url: str | os.PathLike, start: int, nbytes: int, what: str,
               piece_bytes: int = READ_PIECE_BYTES) -> Iterator[bytes]:
    """Bytes [start, start + nbytes) of an object in consecutive ranged requests of at most piece_bytes.

    Args:
        url: the object's URL.
        start: the first byte.
        nbytes: how many bytes.
        what: what is being read, for the truncation message ("tensor 'x'").
        piece_bytes: the largest request.

    Yields:
        The pieces, together exactly nbytes long.

    Raises:
        ObjectStoreError: the object ends before the range does (truncated), or cannot be read.
    """
    done = 0
    while done < nbytes:
        piece = read_range(url, start + done, min(piece_bytes, nbytes - done))
        if not piece:
            raise ObjectStoreError(f"{url}: truncated object (it ends at byte {start + done} while reading {what}).")
        yield piece
        done += len(piece)


def list_tree(url: str | os.PathLike) -> dict[str, int]:
    """Every object under a prefix, at any depth.

    Args:
        url: the prefix.

    Returns:
        {name relative to the prefix, POSIX form: size}; empty when nothing lies under it.

    Raises:
        ObjectStoreError: the store cannot be reached or refuses the request.
    """
    with remote_errors(url):
        fs, path = filesystem(url)
        root = path.rstrip("/")
        fs.invalidate_cache(root)  # a listing cached earlier in this process may predate another writer's objects
        if not fs.isdir(root):
            return {}
        found = fs.find(root, detail=True)
    out = {}
    for name, info in found.items():
        rel = name.rstrip("/")[len(root):].lstrip("/")
        if rel and info.get("type", "file") == "file":
            out[rel] = int(info.get("size") or 0)
    return out


_CACHE: list[Path] = []  # this process's folder for small files fetched from object stores


def local_cache_folder() -> Path:
    """A local folder, private to this process and removed when it exits, for the small files of an object-store
    input that commands copy with the OS (configs, tokenizer files): a fresh one for each call.

    Returns:
        The new, empty folder.
    """
    if not _CACHE:
        _CACHE.append(Path(tempfile.mkdtemp(prefix="loratv-remote-")))
        atexit.register(shutil.rmtree, _CACHE[0], True)
    return Path(tempfile.mkdtemp(dir=_CACHE[0]))


def download(url: str | os.PathLike, local: Path) -> None:
    """Copy one (small) object to a local file.

    Args:
        url: the object's URL.
        local: the local file to write (its folder must exist).

    Raises:
        ObjectStoreError: no object at the URL, or the store cannot be reached or refuses the request.
    """
    with remote_errors(url):
        fs, path = filesystem(url)
        fs.get_file(path, str(local))
