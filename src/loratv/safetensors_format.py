"""The safetensors file format, read and written by hand so that nothing is trusted and nothing is loaded whole.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data section. Each JSON entry
gives dtype, shape and [begin, end) offsets into the data section; `__metadata__` maps strings to strings.
"""

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dtypes
from .errors import LoratvError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own cap
HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors code, e.g. "F32"
    shape: tuple
    file: Path
    start: int  # absolute byte offset in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtypes.torch_dtype_of(self.dtype)


def read_header(path: Path):
    """Parse and validate a safetensors header; returns (ordered list of TensorEntry, metadata dict)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LoratvError(f"{path}: not a safetensors file (only {size} bytes, shorter than the 8-byte header length).")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len > size - 8:
                raise LoratvError(
                    f"{path}: corrupt or truncated safetensors file (header length {header_len} exceeds the file size {size})."
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise LoratvError(f"{path}: cannot be read ({exc.strerror}).") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoratvError(f"{path}: corrupt safetensors file (the header is not valid UTF-8 JSON).") from None
    if not isinstance(header, dict):
        raise LoratvError(f"{path}: corrupt safetensors file (the header is not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoratvError(f"{path}: corrupt safetensors file (__metadata__ must map strings to strings).")
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
            raise LoratvError(f"{path}: corrupt safetensors file (tensor offsets {what} at '{entry.name}').")
        cursor = entry.start + entry.nbytes
    if cursor - data_start != data_len:
        if cursor - data_start > data_len:
            raise LoratvError(
                f"{path}: truncated safetensors file (tensor data runs to byte {cursor} but the file has {size})."
            )
        raise LoratvError(f"{path}: corrupt safetensors file ({data_len - (cursor - data_start)} trailing bytes after the last tensor).")
    return entries, metadata


def _parse_entry(path, name, spec, data_start):
    try:
        code = spec["dtype"]
        shape = tuple(spec["shape"])
        begin, end = spec["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise LoratvError(f"{path}: corrupt safetensors file (entry '{name}' lacks dtype, shape or data_offsets).") from None
    if code not in dtypes.SAFETENSORS_DTYPES:
        raise LoratvError(f"{path}: tensor '{name}' has dtype '{code}', which loratv does not read.")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise LoratvError(f"{path}: corrupt safetensors file (tensor '{name}' has an invalid shape {list(shape)}).")
    if not all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)) or not 0 <= begin <= end:
        raise LoratvError(f"{path}: corrupt safetensors file (tensor '{name}' has invalid data_offsets).")
    expected = math.prod(shape) * dtypes.itemsize(code)
    if end - begin != expected:
        raise LoratvError(
            f"{path}: corrupt safetensors file (tensor '{name}' of shape {list(shape)} needs {expected} bytes, offsets give {end - begin})."
        )
    return TensorEntry(name, code, shape, path, data_start + begin, end - begin)


def read_bytes(entry: TensorEntry, start: int = 0, stop: int | None = None, into=None):
    """Bytes [start, stop) of the tensor's data, read with positioned reads.

    `into`, a uint8 tensor of at least that many bytes, is reused instead of allocating (and page-faulting) a new
    buffer for every read; the result then aliases it.
    """
    stop = entry.nbytes if stop is None else stop
    size = stop - start
    if into is not None and into.numel() >= size:
        view = memoryview(into.numpy())[:size]
    else:
        view = memoryview(torch.empty(size, dtype=torch.uint8).numpy())  # no zero-fill, unlike bytearray
    if not size:
        return view
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.start + start)
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise LoratvError(f"{entry.file}: truncated while reading tensor '{entry.name}'.")
            got += n
    return view


def bytes_to_tensor(buf, code: str, shape) -> torch.Tensor:
    dtype = dtypes.torch_dtype_of(code)
    if len(buf) == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(tuple(shape))


def tensor_to_bytes(tensor: torch.Tensor) -> memoryview:
    """Little-endian raw bytes of a CPU tensor, without a copy when it is contiguous."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # reshape first: a 0-d tensor cannot be viewed as bytes


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, data first, header last.

    The header space is reserved up front from an upper bound on every tensor that may be written (so the set of
    tensors can still shrink, as when a task vector keeps only the tensors that changed) and padded with spaces,
    which the format allows. Tensors may be written in pieces (`begin`, `write`*, `end`).
    """

    def __init__(self, path: Path, candidates, metadata: dict | None = None):
        self.path = Path(path)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.entries = []  # (name, code, shape, begin, end)
        self._open = None  # (name, code, shape, begin, expected_bytes)
        self._offset = 0
        self.header_size = self._reserve(candidates)
        self._f = open(self.path, "wb", buffering=0)  # unbuffered, so copy_file_range and write share one position
        self._f.seek(8 + self.header_size)

    def _reserve(self, candidates) -> int:
        candidates = list(candidates)
        bound = sum(math.prod(shape) * 8 for _, shape in candidates) or 1
        widest = {
            name: {"dtype": "BF16", "shape": list(shape), "data_offsets": [bound, bound]} for name, shape in candidates
        }
        if self.metadata:
            widest = {"__metadata__": self.metadata, **widest}
        size = len(json.dumps(widest, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        return -(-size // HEADER_ALIGNMENT) * HEADER_ALIGNMENT

    def begin(self, name: str, code: str, shape):
        assert self._open is None, "previous tensor not finished"
        self._open = (name, code, tuple(shape), self._offset, math.prod(shape) * dtypes.itemsize(code))

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # an unbuffered write may be short
            done += self._f.write(view[done:])
        self._offset += len(view)

    def copy_from(self, src: Path, offset: int, nbytes: int) -> None:
        """Append bytes [offset, offset+nbytes) of another file, in the kernel where the OS allows (as `cp` does)."""
        with open(src, "rb", buffering=0) as f:
            done = 0
            try:
                while done < nbytes:
                    n = os.copy_file_range(f.fileno(), self._f.fileno(), nbytes - done, offset + done)
                    if n == 0:
                        raise LoratvError(f"{src}: truncated while copying tensor data.")
                    done += n
            except (AttributeError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                    raise
                f.seek(offset + done)
                while done < nbytes:
                    piece = f.read(min(64 << 20, nbytes - done))
                    if not piece:
                        raise LoratvError(f"{src}: truncated while copying tensor data.") from None
                    self._f.write(piece)
                    done += len(piece)
        self._offset += nbytes

    def end(self) -> None:
        name, code, shape, begin, expected = self._open
        if self._offset - begin != expected:
            raise RuntimeError(f"tensor '{name}': wrote {self._offset - begin} bytes, expected {expected}")
        self.entries.append((name, code, shape, begin, self._offset))
        self._open = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.begin(name, dtypes.code_of(tensor.dtype), tensor.shape)
        self.write(tensor_to_bytes(tensor))
        self.end()

    def close(self) -> None:
        header = {"__metadata__": self.metadata} if self.metadata else {}
        for name, code, shape, begin, end in self.entries:
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(raw) > self.header_size:
            raise RuntimeError("safetensors header outgrew its reservation")
        raw += b" " * (self.header_size - len(raw))
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self.header_size))
        self._f.write(raw)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
