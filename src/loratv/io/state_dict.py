"""An already-loaded state dict as a model source: the Checkpoint interface (names, entry, read, read_rows, iter_raw,
config, …) over `dict[str, torch.Tensor]`, so that every operation that takes a base also takes one in memory.

Its source name in records and messages is "<state dict>"; it has no files (a merge of it writes only the weights
and, when given, its config).
"""

from collections.abc import Mapping
from pathlib import Path

import torch

from loratv.common import dtypes
from loratv.errors import BadInputError
from loratv.io import safetensors_format as stf
from loratv.io.checkpoint import Checkpoint

STATE_DICT = "<state dict>"


class StateDictCheckpoint(Checkpoint):
    """Tensors of one in-memory state dict, in its order, with the interface of io.checkpoint.Checkpoint."""

    in_memory = True

    def __init__(self, state: Mapping[str, torch.Tensor], *, config: dict | None = None, label: str | None = None):
        self.source = STATE_DICT
        self.path = Path(STATE_DICT)
        self.root = self.path
        self.label = label or STATE_DICT
        self.format = "memory"
        self.index_file = None
        self.files: list[Path] = [self.path]  # one pseudo-file: the output keeps one shard unless split by size
        self.file_metadata: dict = {self.path: {}}
        self._config = dict(config) if config is not None else None
        self._tensors: dict[str, torch.Tensor] = {}
        self.entries: dict[str, stf.TensorEntry] = {}
        for name, tensor in state.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise BadInputError(f"{STATE_DICT}: entry {stf._short(name)} is not a tensor named by a string.")
            code = dtypes.code_of(tensor.dtype)
            tensor = tensor.detach()
            if tensor.device.type != "cpu" or not tensor.is_contiguous():
                tensor = tensor.to("cpu").contiguous()
            self._tensors[name] = tensor
            self.entries[name] = stf.TensorEntry(name, code, tuple(tensor.shape), self.path, 0,
                                                 tensor.numel() * tensor.element_size())

    # ---- queries: names, entry, `in` and len come from Checkpoint (they read self.entries) ----
    @property
    def config(self) -> dict | None:
        """A copy of the config given at construction, or None when none was."""
        return dict(self._config) if self._config is not None else None

    def shard_of(self, name: str) -> Path:
        """The pseudo-file every tensor belongs to.

        Args:
            name: the tensor name.

        Returns:
            Path("<state dict>").

        Raises:
            LoratvError: no tensor of that name (from `entry`).
        """
        return self.entry(name).file

    # ---- data ----
    def read(self, name: str) -> torch.Tensor:
        """One whole tensor.

        Args:
            name: the tensor name.

        Returns:
            A copy, as a file read gives one: the operations add into what they read, in place, and the caller's
            state dict must stay untouched.

        Raises:
            LoratvError: no tensor of that name.
        """
        self.entry(name)
        return self._tensors[name].clone()

    def read_rows(self, name: str, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) along the first dimension.

        Args:
            name: the tensor name.
            start: first row (inclusive).
            stop: last row (exclusive).
            into: ignored (accepted for the Checkpoint interface; nothing is read from disk).

        Returns:
            A copy of the rows (see `read`); a 0-d tensor is returned whole.

        Raises:
            LoratvError: no tensor of that name.
        """
        self.entry(name)
        tensor = self._tensors[name]
        return (tensor[start:stop] if tensor.dim() else tensor).clone()

    def read_raw(self, name: str) -> bytes:
        """A tensor's raw little-endian bytes, as a safetensors file would store them.

        Args:
            name: the tensor name.

        Returns:
            The bytes (a copy).

        Raises:
            LoratvError: no tensor of that name.
        """
        self.entry(name)
        return bytes(stf.tensor_to_bytes(self._tensors[name]))

    def iter_raw(self, name: str, chunk_bytes: int = 64 << 20):
        """A tensor's raw bytes, as Checkpoint.iter_raw gives them.

        Args:
            name: the tensor name.
            chunk_bytes: ignored: the tensor is already in memory, so it comes as one piece.

        Yields:
            One memoryview over the tensor's bytes (no copy: the tensor is never modified).

        Raises:
            LoratvError: no tensor of that name.
        """
        self.entry(name)
        yield stf.tensor_to_bytes(self._tensors[name])

    def aux_files(self) -> list[Path]:
        """Files beside the weights: a state dict has none.

        Returns:
            An empty list.
        """
        return []

    def total_parameters(self) -> int:
        """The number of elements over every tensor.

        Returns:
            The sum of each tensor's element count.
        """
        return sum(e.numel for e in self.entries.values())


def open_checkpoint(source, *, label: str | None = None,
                    config: dict | None = None) -> Checkpoint:
    """A Checkpoint for a folder, file or hub id; a StateDictCheckpoint for an already-loaded state dict.

    Args:
        source: a path, a hub id, or a `dict[str, torch.Tensor]`.
        label: how messages name it (default: the source).
        config: for a state dict, the model's config.json as a dict (optional; it tells e.g. Conv1D orientation).

    Returns:
        An object with the Checkpoint interface.

    Raises:
        LoratvError: the source cannot be opened.
    """
    if isinstance(source, Mapping):
        return StateDictCheckpoint(source, config=config, label=label)
    return Checkpoint(source, label=label)


def source_name(source) -> str:
    """How a source is named in labels and records: its path or hub id, or "<state dict>".

    Args:
        source: a path, a hub id, or a mapping of tensor names to tensors.

    Returns:
        "<state dict>" for a mapping, else str(source).
    """
    return STATE_DICT if isinstance(source, Mapping) else str(source)
