"""Streaming writer for a Hugging Face weights folder: shards laid out in advance, tensors written in order.

Peak memory is whatever the caller holds for one tensor (or one chunk of one); headers are reserved up front and
filled in last (see SafetensorsWriter).
"""

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loratv.common import dtypes
from loratv.io.safetensors_format import SafetensorsWriter

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 bytes (decimal units as Hugging Face uses; KiB/MiB/GiB are binary).

    Args:
        text: a number (decimals allowed) with an optional unit B, KB, MB, GB, TB, KiB, MiB or GiB, any case; no
            unit means bytes.

    Returns:
        The size in bytes, rounded down.

    Raises:
        ValueError: the text is not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    if not m:
        raise ValueError(f"invalid size '{text}' (use e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2) or ""])


@dataclass(frozen=True)
class OutTensor:
    """One tensor of a planned output: name, safetensors dtype code and shape."""

    name: str
    dtype: str  # safetensors code
    shape: tuple

    @property
    def nbytes(self) -> int:
        """The tensor's data size in bytes."""
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


def layout_like(tensors, shard_of: dict, base_files: list) -> list:
    """Keep the base's grouping: one output shard per base shard, same order; returns [(file name, [OutTensor])].

    A sharded safetensors base keeps its shard file names too (so its index and the merged one line up); a single
    file, or .bin shards, get the standard names.

    Args:
        tensors: the OutTensors to write, in write order.
        shard_of: tensor name -> the base file it came from (every tensor's name must be a key).
        base_files: the base's files, in order.

    Returns:
        [(shard file name, [OutTensor])], base shards left with no tensor dropped.
    """
    groups: dict[Path, list[OutTensor]] = {f: [] for f in base_files}
    for t in tensors:
        groups[shard_of[t.name]].append(t)
    kept = [(Path(f).name, g) for f, g in groups.items() if g]
    names = [name for name, _ in kept]
    if len(kept) > 1 and all(n.endswith(".safetensors") for n in names) and len(set(names)) == len(names):
        return kept
    return name_shards([g for _, g in kept])


def layout_by_size(tensors, max_bytes: int) -> list:
    """Cut the tensors, in order, into shards of at most max_bytes each (a bigger tensor gets a shard to itself).

    Args:
        tensors: the OutTensors to write, in write order.
        max_bytes: the shard size limit (of tensor data, headers not counted).

    Returns:
        [(shard file name, [OutTensor])] with standard names; one shard (possibly empty) when there are no tensors.
    """
    groups: list[list[OutTensor]] = []
    current: list[OutTensor] = []
    size = 0
    for t in tensors:
        if current and size + t.nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    if current or not groups:
        groups.append(current)
    return name_shards(groups)


def name_shards(groups) -> list:
    """Give groups of tensors the standard Hugging Face shard file names.

    Args:
        groups: lists of OutTensors, one per shard, in order.

    Returns:
        [(file name, group)]: "model.safetensors" for a single group, else "model-00001-of-0000N.safetensors", ….
    """
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


class ShardedWriter:
    """Writes planned shards in order; call `tensor(name)` for each planned tensor in plan order."""

    def __init__(self, folder: Path, shards, metadata: dict):
        self.folder = Path(folder)
        self.shards = shards
        self.metadata = metadata
        self._order = [(file, t) for file, group in shards for t in group]
        self._pos = 0
        self._writer: SafetensorsWriter | None = None
        self._file = None
        self._closing: list[SafetensorsWriter] = []
        self.digests: dict[str, str | None] = {}  # shard file name -> sha256, after close()

    def begin(self, name: str) -> OutTensor:
        """Start the next planned tensor, opening its shard (and closing the previous one in the background).

        Args:
            name: the tensor's name; it must be the next one in plan order.

        Returns:
            Its planned OutTensor (dtype and shape that its bytes must match).

        Raises:
            RuntimeError: `name` is not the next planned tensor.
        """
        file, spec = self._order[self._pos]
        if spec.name != name:
            raise RuntimeError(f"writer expected '{spec.name}', got '{name}'")
        if file != self._file:
            self._finish_file()
            group = next(g for f, g in self.shards if f == file)
            self._writer = SafetensorsWriter(self.folder / file, [(t.name, t.shape) for t in group], self.metadata,
                                             plan=[(t.name, t.dtype, t.shape) for t in group])
            self._file = file
        self._current().begin(spec.name, spec.dtype, spec.shape)
        return spec

    def write(self, data) -> None:
        """Append bytes of the current tensor (see SafetensorsWriter.write; not to be modified afterwards).

        Args:
            data: a buffer of the tensor's raw little-endian bytes (all of them, or the next piece).
        """
        self._current().write(data)

    def copy_from(self, src, offset: int, nbytes: int) -> None:
        """Append bytes of the current tensor straight from another file (see SafetensorsWriter.copy_from).

        Args:
            src: the file to copy from.
            offset: absolute byte offset in src.
            nbytes: how many bytes.
        """
        self._current().copy_from(src, offset, nbytes)

    def end(self) -> None:
        """Finish the current tensor.

        Raises:
            RuntimeError: the bytes written for it differ from its planned size (from SafetensorsWriter.end).
        """
        self._current().end()
        self._pos += 1

    def _current(self) -> SafetensorsWriter:
        assert self._writer is not None, "no tensor begun"
        return self._writer

    def _finish_file(self):
        if self._writer is not None:
            self._writer.close(wait=False)  # its header and fsync overlap the next shard
            self._closing.append(self._writer)
            self._writer = None

    def close(self) -> None:
        """Finish every shard (header, fsync), record their sha256 in `digests`, and write
        model.safetensors.index.json when there is more than one shard.

        Raises:
            RuntimeError: not every planned tensor was written.
        """
        if self._pos != len(self._order):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._order)} tensors")
        self._finish_file()
        for closing in self._closing:
            closing.wait()
            self.digests[closing.path.name] = closing.sha256
        self._closing = []
        write_index(self.folder, self.shards)

    def abort(self) -> None:
        """Stop every shard writer without finishing its file (the caller removes the output)."""
        for w in [*self._closing, self._writer]:
            if w is not None:
                w.abort()


def write_index(folder: Path, shards) -> None:
    """Write model.safetensors.index.json for a layout of more than one shard (nothing for a single file).

    Args:
        folder: the output folder.
        shards: the whole layout, [(shard file name, [OutTensor])].
    """
    if len(shards) < 2:
        return
    index = {
        "metadata": {"total_size": sum(t.nbytes for _, g in shards for t in g)},
        "weight_map": {t.name: file for file, g in shards for t in g},
    }
    (Path(folder) / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def finished(writer):
    """Close a writer (SafetensorsWriter, ShardedWriter, PartWriter) when the block ends, or abort it when the block
    or the close raises, so that no background write outlives a failure.

    Args:
        writer: the writer, or None (nothing to finish).

    Yields:
        The writer.

    Raises:
        BaseException: whatever the block or the close raised, once the writer is aborted.
    """
    if writer is None:
        yield None
        return
    try:
        yield writer
        writer.close()
    except BaseException:
        writer.abort()
        raise
