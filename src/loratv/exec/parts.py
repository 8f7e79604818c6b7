"""Part files: the raw tensor bytes one task writes for the driver to assemble into a single output file.

A task that produces pieces of one file (a task vector, compare's ΔW file, an adapter) cannot write its pieces in
place before the driver knows the final layout, so it appends them to a part file of its own inside the output's
temporary folder and reports where each tensor lies; the driver copies them into the real writer in order.
"""

from pathlib import Path

import torch

from loratv.common import dtypes
from loratv.io import storage

PARTS_FOLDER = ".parts"  # inside the output's temporary folder, removed once assembled


class PartWriter:
    """Appends tensors' raw bytes to one file, with the writer interface (begin, write*, end) of SafetensorsWriter.

    Args:
        path: the part file (rewritten from scratch, so a retried task leaves no trace of its first try).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")  # closed by close()
        self.spans: dict[str, tuple[int, int]] = {}  # tensor name -> (offset, nbytes) in the part file
        self.codes: dict[str, str] = {}  # tensor name -> its dtype code
        self.shapes: dict[str, tuple] = {}  # tensor name -> its shape
        self._begun: tuple[str, int] | None = None

    def begin(self, name: str, code: str, shape) -> None:
        """Start a tensor (its dtype and shape are the caller's to report; only its bytes are kept).

        Args:
            name: the tensor's name.
            code: its safetensors dtype code.
            shape: its shape.
        """
        self._begun = (name, self._file.tell())
        self.codes[name] = code
        self.shapes[name] = tuple(shape)

    def write(self, data) -> None:
        """Append bytes of the current tensor.

        Args:
            data: a buffer of raw little-endian bytes.
        """
        self._file.write(data)

    def end(self) -> None:
        """Finish the current tensor and record where it lies."""
        assert self._begun is not None, "no tensor begun"
        name, start = self._begun
        self.spans[name] = (start, self._file.tell() - start)
        self._begun = None

    def close(self) -> None:
        """Flush and close the part file."""
        self._file.close()

    def abort(self) -> None:
        """Close the part file after a failure (the output's temporary folder, and the part with it, is removed)."""
        self._file.close()


def read_part(path: Path, span: tuple[int, int], code: str, shape) -> torch.Tensor:
    """One tensor back from a part file.

    Args:
        path: the part file (local, or an object-store URL).
        span: (offset, nbytes) as PartWriter recorded it.
        code: the tensor's safetensors dtype code.
        shape: its shape.

    Returns:
        The tensor, on the CPU.

    Raises:
        OSError: the part file is shorter than the span (it was cut short after the task reported it).
    """
    offset, nbytes = span
    if storage.is_url(path):  # a part a task uploaded to an object-store output's temporary prefix
        raw = bytearray(storage.read_range(path, offset, nbytes))
    else:
        with open(path, "rb") as f:
            f.seek(offset)
            raw = bytearray(f.read(nbytes))
    if len(raw) != nbytes:
        raise OSError(f"{path}: part file truncated (expected {nbytes} bytes at {offset})")
    return torch.frombuffer(raw, dtype=dtypes.torch_dtype_of(code)).reshape(tuple(shape)) if nbytes else \
        torch.empty(tuple(shape), dtype=dtypes.torch_dtype_of(code))
