"""The safetensors file format, read and written by hand so that nothing is trusted and nothing is loaded whole.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section. Each JSON entry
gives dtype, shape and [begin, end) offsets into the data section; `__metadata__` maps strings to strings.
"""

import hashlib
import json
import math
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loratv.common import dtypes
from loratv.errors import BadInputError
from loratv.io import safe_json, storage

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own cap
HEADER_ALIGNMENT = 8
MAX_NAME_CHARS = 4096  # real names are under 200 characters; names appear in one-line messages
MAX_DIMS = 64  # far beyond any real weight; bounds the work a hostile shape can cause
MAX_ELEMENTS = 2**62  # a tensor's element count (zero dims aside) must fit torch's int64 strides


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's data lies in a safetensors (or loaded .bin) file, and its dtype and shape."""

    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple
    file: Path
    start: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        """The element count (1 for a 0-d tensor)."""
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the entry's safetensors code."""
        return dtypes.torch_dtype_of(self.dtype)

    @property
    def element_size(self) -> int:
        """Bytes per element."""
        return dtypes.itemsize(self.dtype)


def read_header(path: "Path | storage.RemotePath"):
    """Parse and validate a safetensors header; returns (ordered list of TensorEntry, metadata dict).

    Args:
        path: the safetensors file, or an object-store URL (its size, then two ranged reads: the 8-byte length and
            the header; the entries' `file` is then the RemotePath).

    Returns:
        (entries sorted by data offset, the `__metadata__` dict of strings, {} when absent).

    Raises:
        LoratvError: the file cannot be read, or is truncated or corrupt: a header length beyond the file or the
            100 MiB cap, invalid JSON, a bad entry (name, dtype, shape or offsets), offsets that overlap or leave
            gaps, or data that does not end exactly at the end of the file.
    """
    path = storage.as_path(path)
    if isinstance(path, storage.RemotePath):
        size, header_len, raw = _remote_header(path)
    else:
        size, header_len, raw = _local_header(path)
    if len(raw) != header_len:
        raise BadInputError(f"{path}: truncated safetensors file (the file shrank while its header was read).")
    header = safe_json.loads(raw, path, "corrupt safetensors file: the header is not valid UTF-8 JSON")
    if not isinstance(header, dict):
        raise BadInputError(f"{path}: corrupt safetensors file (the header is not a JSON object).")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadInputError(f"{path}: corrupt safetensors file (__metadata__ must map strings to strings).")
    data_start = 8 + header_len
    data_len = size - data_start
    entries = []
    for name, spec in header.items():
        entries.append(_parse_entry(path, name, spec, data_start))
    entries.sort(key=lambda e: e.start)
    cursor = data_start
    for entry in entries:
        if entry.start != cursor:
            what = "overlap" if entry.start < cursor else "leave a gap"
            raise BadInputError(f"{path}: corrupt safetensors file (tensor offsets {what} at '{entry.name}').")
        cursor = entry.start + entry.nbytes
    if cursor - data_start != data_len:
        if cursor - data_start > data_len:
            raise BadInputError(
                f"{path}: truncated safetensors file (tensor data runs to byte {cursor} but the file has {size})."
            )
        raise BadInputError(f"{path}: corrupt safetensors file ({data_len - (cursor - data_start)} trailing bytes after the last tensor).")
    return entries, metadata


def _check_header_length(path, size: int, prefix: bytes) -> int:
    if len(prefix) < 8:
        raise BadInputError(f"{path}: not a safetensors file (only {size} bytes, shorter than the 8-byte header length).")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > size - 8:
        raise BadInputError(
            f"{path}: corrupt or truncated safetensors file (header length {header_len} exceeds the file size {size})."
        )
    if header_len > MAX_HEADER_BYTES:
        raise BadInputError(
            f"{path}: corrupt safetensors file (header length {header_len} is above the {MAX_HEADER_BYTES >> 20} MiB cap)."
        )
    return header_len


def _local_header(path: Path) -> tuple:
    """(file size, header length, header bytes) of a local file, read through one open file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = _check_header_length(path, size, f.read(8))
            raw = f.read(header_len)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot be read ({exc.strerror}).") from None
    return size, header_len, raw


def _remote_header(url: "storage.RemotePath") -> tuple:
    """(object size, header length, header bytes) of an object: its size, then two ranged reads (the 8-byte
    length, then the header), so that no tensor data is fetched."""
    size = storage.size(url)
    header_len = _check_header_length(url, size, storage.read_range(url, 0, min(8, size)))
    return size, header_len, storage.read_range(url, 8, header_len)


def _parse_entry(path, name, spec, data_start):
    if len(name) > MAX_NAME_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadInputError(f"{path}: corrupt safetensors file (tensor name {_short(name)} is too long or holds control characters).")
    # lists only, as the format says: tuple() would also take a dict's keys or a string's characters
    if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list) and isinstance(spec.get("data_offsets"), list)
            and len(spec["data_offsets"]) == 2 and "dtype" in spec):
        raise BadInputError(f"{path}: corrupt safetensors file (entry '{name}' lacks dtype, a shape list or a "
                          "data_offsets pair).")
    code, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
    if not isinstance(code, str) or code not in dtypes.SAFETENSORS_DTYPES:
        raise BadInputError(f"{path}: tensor '{name}' has dtype {_short(code)}, which loratv does not read.")
    if len(shape) > MAX_DIMS:
        raise BadInputError(f"{path}: corrupt safetensors file (tensor '{name}' has {len(shape)} dimensions).")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadInputError(f"{path}: corrupt safetensors file (tensor '{name}' has an invalid shape {_short(list(shape))}).")
    if not all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)) or not 0 <= begin <= end:
        raise BadInputError(f"{path}: corrupt safetensors file (tensor '{name}' has invalid data_offsets).")
    # element counts in Python integers, before anything is allocated: a claim beyond int64 is refused outright
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise BadInputError(f"{path}: corrupt safetensors file (tensor '{name}' claims an absurd shape {_short(list(shape))}).")
    expected = math.prod(shape) * dtypes.itemsize(code)
    if end - begin != expected:
        raise BadInputError(
            f"{path}: corrupt safetensors file (tensor '{name}' of shape {_short(list(shape))} needs {expected} bytes, "
            f"offsets give {end - begin})."
        )
    return TensorEntry(name, code, shape, path, data_start + begin, end - begin)


def _short(value, limit: int = 80) -> str:
    """A hostile field, quoted for a one-line message and cut to a readable length."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= limit else text[:limit] + "…"


def read_bytes(entry: TensorEntry, start: int = 0, stop: int | None = None, into=None):
    """Bytes [start, stop) of the tensor's data, read with positioned reads (ranged requests for an object).

    `into`, a uint8 tensor of at least that many bytes, is reused instead of allocating (and page-faulting) a new
    buffer for every read; the result then aliases it.

    Args:
        entry: the tensor's index entry.
        start: first byte, relative to the tensor's data.
        stop: end byte (exclusive); None: the tensor's end.
        into: a CPU uint8 tensor to read into; ignored when smaller than stop - start.

    Returns:
        A memoryview of stop - start bytes.

    Raises:
        LoratvError: the file ends before the bytes (truncated since it was indexed).
    """
    stop = entry.nbytes if stop is None else stop
    size = stop - start
    if into is not None and into.numel() >= size:
        view = into.numpy().data[:size]  # ndarray.data: memoryview(array), typed as one
    else:
        view = torch.empty(size, dtype=torch.uint8).numpy().data  # no zero-fill, unlike bytearray
    if not size:
        return view
    if isinstance(entry.file, storage.RemotePath):  # ranged requests of just these bytes, in bounded pieces
        got = 0
        for piece in storage.iter_range(entry.file, entry.start + start, size, f"tensor '{entry.name}'"):
            view[got:got + len(piece)] = piece
            got += len(piece)
        return view
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.start + start)
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise BadInputError(f"{entry.file}: truncated while reading tensor '{entry.name}'.")
            got += n
    return view


def bytes_to_tensor(buf, code: str, shape) -> torch.Tensor:
    """A tensor over raw little-endian bytes, without a copy.

    Args:
        buf: a writable buffer (memoryview, bytearray) holding exactly prod(shape) elements.
        code: the safetensors dtype code.
        shape: the tensor's shape.

    Returns:
        A CPU tensor sharing `buf`'s memory (a new empty one for an empty buffer).
    """
    dtype = dtypes.torch_dtype_of(code)
    if len(buf) == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(tuple(shape))


def tensor_to_bytes(tensor: torch.Tensor) -> memoryview:
    """Little-endian raw bytes of a CPU tensor, without a copy when it is contiguous.

    Args:
        tensor: any tensor (detached and moved to the CPU first; a non-contiguous one is copied).

    Returns:
        A memoryview of its bytes in C order (empty for an empty tensor).
    """
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    return tensor.reshape(-1).view(torch.uint8).numpy().data  # reshape first: a 0-d tensor cannot be viewed as bytes


class _BackgroundIO:
    """Runs the file operations of one writer, in order, on a worker thread, so that computing the next tensor
    overlaps writing (or kernel-copying) the previous ones. Kernel copies hold no memory and queue freely; buffers
    waiting to be written are capped at `max_pending_bytes`, which bounds the memory they hold."""

    def __init__(self, max_pending_bytes: int = 256 << 20):
        self._queue: queue.Queue[tuple[Callable[..., object], tuple[object, ...], int] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._cancelled = False
        self._pending = 0
        self._limit = max_pending_bytes
        self._room = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="loratv-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            func, args, held = item
            if self._error is None and not self._cancelled:
                try:
                    func(*args)
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc
            with self._room:
                self._pending -= held
                self._room.notify_all()

    def submit(self, func, *args, held: int = 0):
        """Queue func(*args); `held` is the memory its arguments keep alive until it has run."""
        self._raise_pending()
        with self._room:
            while self._pending and self._pending + held > self._limit and self._error is None:
                self._room.wait()
            self._pending += held
        self._queue.put((func, args, held))

    def finish(self):
        self._queue.put(None)
        self._thread.join()
        self._raise_pending()

    def cancel(self):
        """Skip whatever is still queued (an interrupted or failed write is thrown away) and stop the thread."""
        self._cancelled = True
        self._queue.put(None)
        self._thread.join()

    def _raise_pending(self):
        if self._error is not None:
            raise self._error


def _pwrite_all(fd: int, view: memoryview, position: int) -> None:
    done = 0
    while done < len(view):  # a write may be short
        done += os.pwrite(fd, view[done:], position + done)


def _copy_range(src: Path, fd: int, offset: int, nbytes: int, position: int) -> None:
    """Bytes [offset, offset+nbytes) of `src` to `position` of fd, in the kernel where the OS allows (as `cp`)."""
    with open(src, "rb", buffering=0) as f:
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(f.fileno(), fd, nbytes - done, offset + done, position + done)
                if n == 0:
                    raise BadInputError(f"{src}: truncated while copying tensor data.")
                done += n
        except (AttributeError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                raise
            while done < nbytes:
                piece = os.pread(f.fileno(), min(64 << 20, nbytes - done), offset + done)
                if not piece:
                    raise BadInputError(f"{src}: truncated while copying tensor data.") from None
                _pwrite_all(fd, memoryview(piece), position + done)
                done += len(piece)


def _hash_range(src: Path, offset: int, nbytes: int, digest, chunk: int = 8 << 20) -> None:
    """Feed bytes [offset, offset+nbytes) of `src` to `digest` (they were just copied, so they come from the page
    cache)."""
    with open(src, "rb", buffering=0) as f:
        done = 0
        while done < nbytes:
            piece = os.pread(f.fileno(), min(chunk, nbytes - done), offset + done)
            if not piece:
                raise BadInputError(f"{src}: truncated while copying tensor data.")
            digest.update(piece)
            done += len(piece)


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of a whole file, read in pieces (hashlib releases the GIL, so this overlaps other work).

    Args:
        path: the file (or an object-store URL, read in ranged pieces).
        chunk: bytes per read.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    if storage.is_url(path):
        for piece in storage.iter_range(path, 0, storage.size(path), "the whole object", chunk):
            digest.update(piece)
        return digest.hexdigest()
    with open(path, "rb", buffering=0) as f:
        while True:
            piece = f.read(chunk)
            if not piece:
                return digest.hexdigest()
            digest.update(piece)


def header_sha256(path: Path) -> tuple:
    """(sha256 of the 8-byte length and the JSON header, their byte count) of a safetensors file already validated
    by read_header: what identifies an input shard without reading its data.

    Args:
        path: the safetensors file (or an object-store URL: two ranged reads).

    Returns:
        (hex digest, byte count hashed: 8 + header length, the header capped at MAX_HEADER_BYTES).
    """
    if storage.is_url(path):
        prefix = storage.read_range(path, 0, 8)
        (header_len,) = struct.unpack("<Q", prefix)
        raw = prefix + storage.read_range(path, 8, min(header_len, MAX_HEADER_BYTES))
        return hashlib.sha256(raw).hexdigest(), len(raw)
    with open(path, "rb") as f:
        prefix = f.read(8)
        (header_len,) = struct.unpack("<Q", prefix)
        raw = prefix + f.read(min(header_len, MAX_HEADER_BYTES))
    return hashlib.sha256(raw).hexdigest(), len(raw)


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, data first, header last.

    The header space is reserved up front from an upper bound on every tensor that may be written (so the set of
    tensors can still shrink, as when a task vector keeps only the tensors that changed) and padded with spaces,
    which the format allows. Tensors may be written in pieces (`begin`, `write`*, `end`). Data given to `write`
    must not be modified afterwards: it is written by a background thread.

    `sha256` holds the whole file's digest once written. With `plan` ([(name, code, shape)] in write order, known
    in advance as for a merge) the header is known first, so the file is hashed in order as it is written, on a
    second thread that runs beside the writing one (hashing costs as much CPU as a disk write takes time); otherwise
    it is read back and hashed after the fsync, on the writer thread.
    """

    def __init__(self, path: Path, candidates, metadata: dict | None = None, plan=None):
        self.path = Path(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.entries: list[tuple[str, str, tuple[int, ...], int, int]] = []  # (name, code, shape, begin, end)
        self._open: tuple[str, str, tuple[int, ...], int, int] | None = None  # (name, code, shape, begin, expected_bytes)
        self._offset = 0
        self.header_size = self._reserve(candidates)
        self.sha256: str | None = None
        self._predicted: bytes | None = None
        self._digest: hashlib._Hash | None = None  # a method's attribute annotations are never evaluated
        self._hasher: _BackgroundIO | None = None
        if plan is not None:
            entries, offset = [], 0
            for name, code, shape in plan:
                end = offset + math.prod(shape) * dtypes.itemsize(code)
                entries.append((name, code, tuple(shape), offset, end))
                offset = end
            self._predicted = self._header_bytes(entries)
            self._digest = hashlib.sha256(self._predicted)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._io = _BackgroundIO()
        if self._digest is not None:
            self._hasher = _BackgroundIO()

    def _reserve(self, candidates) -> int:
        candidates = list(candidates)
        bound = sum(math.prod(shape) * 8 for _, shape in candidates) or 1
        widest: dict[str, object] = {
            name: {"dtype": "BF16", "shape": list(shape), "data_offsets": [bound, bound]} for name, shape in candidates
        }
        if self.metadata:
            widest = {"__metadata__": self.metadata, **widest}
        size = len(json.dumps(widest, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        return -(-size // HEADER_ALIGNMENT) * HEADER_ALIGNMENT

    def begin(self, name: str, code: str, shape) -> None:
        """Start a tensor that will be written in pieces (`write`*, then `end`).

        Args:
            name: the tensor name (one of the candidates the header was reserved for).
            code: its safetensors dtype code.
            shape: its shape.
        """
        assert self._open is None, "previous tensor not finished"
        self._open = (name, code, tuple(shape), self._offset, math.prod(shape) * dtypes.itemsize(code))

    def write(self, data) -> None:
        """Append bytes of the open tensor; written (and hashed) on the background threads.

        Args:
            data: a buffer (bytes, memoryview, numpy array); it must not be modified afterwards.
        """
        view = memoryview(data).cast("B")
        if len(view):
            self._io.submit(_pwrite_all, self._fd, view, 8 + self.header_size + self._offset, held=len(view))
            if self._hasher is not None and self._digest is not None:  # both set, or neither
                self._hasher.submit(self._digest.update, view, held=len(view))
        self._offset += len(view)

    def copy_from(self, src: Path, offset: int, nbytes: int) -> None:
        """Append bytes [offset, offset+nbytes) of another file without passing them through Python.

        An object-store source (a RemotePath) is read here by ranged requests in pieces of
        storage.READ_PIECE_BYTES, each written and hashed as `write` does: one fetch of each byte, and memory bounded
        by the writer's cap on pending buffers.

        Args:
            src: the file to copy from (a local path or a RemotePath).
            offset: absolute byte offset in src.
            nbytes: how many bytes.

        Raises:
            LoratvError: an object-store source ends before the range (truncated) or cannot be read.
        """
        if isinstance(src, storage.RemotePath):
            for piece in storage.iter_range(src, offset, nbytes, "tensor data"):
                self.write(piece)
            return
        if nbytes:
            self._io.submit(_copy_range, Path(src), self._fd, offset, nbytes, 8 + self.header_size + self._offset)
            if self._hasher is not None and self._digest is not None:
                self._hasher.submit(_hash_range, Path(src), offset, nbytes, self._digest)
        self._offset += nbytes

    def end(self) -> None:
        """Finish the open tensor and record its header entry.

        Raises:
            RuntimeError: the bytes written for it differ from its shape and dtype's size.
        """
        assert self._open is not None, "no tensor begun"
        name, code, shape, begin, expected = self._open
        if self._offset - begin != expected:
            raise RuntimeError(f"tensor '{name}': wrote {self._offset - begin} bytes, expected {expected}")
        self.entries.append((name, code, shape, begin, self._offset))
        self._open = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (begin, write, end).

        Args:
            name: the tensor name.
            tensor: the tensor; its bytes are taken without a copy when contiguous on the CPU, so it must not be
                modified afterwards.

        Raises:
            LoratvError: the tensor's dtype has no safetensors code.
        """
        self.begin(name, dtypes.code_of(tensor.dtype), tensor.shape)
        self.write(tensor_to_bytes(tensor))
        self.end()

    def close(self, wait: bool = True) -> None:
        """Write the header and fsync. With wait=False this happens on the writer thread, overlapping whatever the
        caller does next (the next shard); `wait()` must then be called before the file is used.

        Args:
            wait: block until the file is complete, fsynced and `sha256` is set (and re-raise a background failure).
        """
        raw = self._header_bytes(self.entries)
        self._io.submit(_pwrite_all, self._fd, memoryview(raw), 0)
        self._io.submit(os.ftruncate, self._fd, 8 + self.header_size + self._offset)  # exact length, even if empty
        self._io.submit(os.fsync, self._fd)
        if self._hasher is not None and self._digest is not None and raw == self._predicted:
            self._hasher.submit(self._set_sha256, self._digest.hexdigest)
        else:  # no plan, or the plan was not followed: read the file back
            self._io.submit(self._set_sha256, lambda: file_sha256(self.path))
        if wait:
            self.wait()

    def _set_sha256(self, compute) -> None:
        self.sha256 = compute()

    def _header_bytes(self, entries) -> bytes:
        """The 8-byte length and the JSON header, padded with spaces to the reserved size."""
        header: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        for name, code, shape, begin, end in entries:
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(raw) > self.header_size:
            raise RuntimeError("safetensors header outgrew its reservation")
        return struct.pack("<Q", self.header_size) + raw + b" " * (self.header_size - len(raw))

    def wait(self) -> None:
        """Wait for the background writes and hashing to finish, then close the file.

        Raises:
            Exception: whatever a background write, copy or hash raised (OSError, LoratvError, RuntimeError), re-raised here.
        """
        self._io.finish()
        if self._hasher is not None:
            self._hasher.finish()
        assert self._fd is not None, "already closed"
        os.close(self._fd)
        self._fd = None

    def abort(self) -> None:
        """Stop writing: skip queued work and close the file (the caller deletes it). Safe after close or wait."""
        if self._fd is not None:
            self._io.cancel()  # queued writes are skipped: the file is about to be deleted
            if self._hasher is not None:
                self._hasher.cancel()
            os.close(self._fd)
            self._fd = None
