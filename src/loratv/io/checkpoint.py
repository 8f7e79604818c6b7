"""A model on disk: resolve a local folder, a single file or a hub id, index its tensors, read them lazily.

Tensors are read one at a time (or by rows, or as raw bytes); nothing is loaded until asked for.
"""

import os
from pathlib import Path
from typing import cast

import torch

from loratv.common import dtypes
from loratv.errors import BadInputError
from loratv.io import hub, safe_json, storage
from loratv.io import safetensors_format as stf

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
CONFIG_FIELD_TYPES = (("model_type", str, "a string"), ("tie_word_embeddings", bool, "true or false"),
                      ("torch_dtype", (str, type(None)), "a dtype name"), ("dtype", (str, type(None)), "a dtype name"))


def resolve_path(source: str | os.PathLike) -> Path:
    """A local path as given, an object-store URL (s3://, gs://, hf://) as a RemotePath read in place, or a hub id
    `org/name[@revision]` resolved through the Hugging Face cache.

    A RemotePath answers the Path methods loratv uses on inputs (`/`, name, suffix, parent, exists, is_file,
    is_dir, stat, iterdir, glob) and is read by ranged requests (io.storage), so it is typed as a Path here.

    Args:
        source: a model folder, a weights file, an object-store URL, or a hub id.

    Returns:
        The existing local path (for a hub id, its snapshot folder), or the URL's RemotePath.

    Raises:
        LoratvError: a source that looks like a local path and does not exist (the hub is not asked), a URL with
            nothing at it, or a hub download that failed, with its cause in words (hub.failure_reason).
    """
    # typed as the Path it stands in for: the callers (adapters, ops) use only the Path API a RemotePath answers
    return cast(Path, hub.resolve(source, _download))


def _download(hub_id: str) -> Path:
    return hub.snapshot(hub_id, hub.MODEL_FILE_PATTERNS)


def _allowed_root(folder: Path) -> str:
    """Where a shard may really live: the folder itself, or for a hub snapshot its repo's cache (the blobs/)."""
    real = os.path.realpath(folder)
    parts = Path(real).parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith(("models--", "datasets--")):
        return str(Path(*parts[:-2]))
    return real


def _inside(folder: Path, target: Path) -> bool:
    if isinstance(folder, storage.RemotePath):  # no links in an object store: the key must lie under the prefix
        return str(target).startswith(str(folder).rstrip("/") + "/")
    root = _allowed_root(folder)
    real_target = os.path.realpath(target)
    return os.path.commonpath([root, real_target]) == root


def _read_json(path: Path):
    return safe_json.read(path)


def _index_shards(index_path: Path) -> tuple[list[Path], dict]:
    """Shard files named by an index, in first-appearance order, each proven to lie inside the index's folder;
    returned with the index's weight_map."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadInputError(f"{index_path}: index has no weight_map.")
    folder = index_path.parent
    shards = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or any(ord(c) < 32 for c in shard):
            raise BadInputError(f"{index_path}: tensor {stf._short(name)} maps to an invalid shard name {stf._short(shard)}.")
        if os.path.isabs(shard) or ".." in Path(shard).parts or storage.is_url(shard) or not _inside(folder, folder / shard):
            raise BadInputError(f"{index_path}: shard '{shard}' lies outside the model folder.")
        if shard not in shards:
            shards.append(shard)
    paths = []
    for shard in sorted(shards):
        path = folder / shard
        if not path.is_file():
            raise BadInputError(f"{index_path}: shard '{shard}' is missing.")
        paths.append(path)
    return paths, weight_map


class Checkpoint:
    """Tensors of one model (or adapter file), in file order, readable lazily."""

    def __init__(self, source, *, label: str | None = None):
        self.source = str(source)
        self.path = resolve_path(source)
        self.label = label or self.source
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.entries: dict[str, stf.TensorEntry] = {}
        self.file_metadata: dict[Path, dict] = {}
        self.files: list[Path] = []
        self.index_file: Path | None = None
        self._bin_state: dict[Path, dict] = {}
        self._aux_cache: list[Path] | None = None  # an object-store folder's aux files, once fetched
        self.format = "safetensors"
        self._index()

    # ---- discovery ----
    def _index(self):
        path = self.path
        if path.is_dir():
            if (path / SAFETENSORS_INDEX).is_file():
                self._load_index(path / SAFETENSORS_INDEX)
            elif (path / SAFETENSORS_SINGLE).is_file():
                self._load_safetensors([path / SAFETENSORS_SINGLE])
            elif (path / BIN_INDEX).is_file():
                self._load_index(path / BIN_INDEX)
            elif (path / BIN_SINGLE).is_file():
                self._load_bin([path / BIN_SINGLE])
            else:
                singles = sorted(p for p in path.glob("*.safetensors") if p.is_file())
                if len(singles) == 1:
                    self._load_safetensors(singles)
                else:
                    raise BadInputError(
                        f"{path}: folder holds no model weights (no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or {BIN_SINGLE})."
                    )
        elif path.suffix == ".safetensors":
            self._load_safetensors([path])
        elif path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            self._load_bin([path])
        elif path.name.endswith(".index.json"):
            self._load_index(path)
        else:
            raise BadInputError(f"{path}: not a model folder, a .safetensors file or a .bin checkpoint.")

    def _load_index(self, index_path: Path):
        self.index_file = index_path
        files, weight_map = _index_shards(index_path)
        if all(f.suffix == ".safetensors" for f in files):
            self._load_safetensors(files)
        else:
            self._load_bin(files)
        self._check_weight_map(weight_map)

    def _load_safetensors(self, files):
        for file in files:
            entries, metadata = stf.read_header(file)
            self.file_metadata[file] = metadata
            for entry in entries:
                if entry.name in self.entries:
                    raise BadInputError(f"{file}: tensor '{entry.name}' also appears in {self.entries[entry.name].file.name}.")
                self.entries[entry.name] = entry
            self.files.append(file)

    def _load_bin(self, files):
        self.format = "bin"
        if isinstance(files[0], storage.RemotePath):  # a pickle has no header: it can only be loaded whole
            raise BadInputError(f"{files[0]}: a pickled .bin checkpoint cannot be read in place from an object store "
                                "(loratv reads only safetensors there); convert it to safetensors or copy it to a "
                                "local folder.")

        for file in files:
            state = _torch_load(file)
            self._bin_state[file] = state
            self.file_metadata[file] = {}
            for name, tensor in state.items():
                if name in self.entries:
                    raise BadInputError(f"{file}: tensor '{name}' also appears in {self.entries[name].file.name}.")
                code = dtypes.code_of(tensor.dtype)
                self.entries[name] = stf.TensorEntry(
                    name, code, tuple(tensor.shape), file, 0, tensor.numel() * tensor.element_size()
                )
            self.files.append(file)

    def _check_weight_map(self, weight_map):
        for name, shard in weight_map.items():
            entry = self.entries.get(name)
            if entry is None or entry.file.name != Path(shard).name:
                raise BadInputError(f"{self.index_file}: tensor '{name}' is not in shard '{shard}'.")
        extra = set(self.entries) - set(weight_map)
        if extra:
            raise BadInputError(f"{self.index_file}: tensor '{sorted(extra)[0]}' is in a shard but not in the index.")

    # ---- queries ----
    def names(self) -> list[str]:
        """Every tensor name, in file order (shard by shard, by data offset within a safetensors file).

        Returns:
            A new list of the names.
        """
        return list(self.entries)

    def __contains__(self, name) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, name: str) -> stf.TensorEntry:
        """The index entry of one tensor: its dtype code, shape, file and byte range.

        Args:
            name: the tensor name.

        Returns:
            The TensorEntry (for a .bin checkpoint, start 0 and nbytes of the loaded tensor).

        Raises:
            LoratvError: the checkpoint has no tensor of that name.
        """
        try:
            return self.entries[name]
        except KeyError:
            raise BadInputError(f"{self.label}: has no tensor '{name}'.") from None

    @property
    def config(self) -> dict | None:
        """config.json beside the weights, with the fields loratv reads type-checked; read anew on every access.

        Returns:
            The config as a dict, or None when there is no config.json.

        Raises:
            LoratvError: config.json is not valid JSON or not an object, or model_type, tie_word_embeddings, dtype or
                torch_dtype has the wrong type.
        """
        path = self.root / "config.json"
        if not path.is_file():
            return None
        config = _read_json(path)
        if not isinstance(config, dict):
            raise BadInputError(f"{path}: not a model config (a JSON object).")
        for key, kind, what in CONFIG_FIELD_TYPES:  # the fields loratv reads decide orientation and tying
            if key in config and not isinstance(config[key], kind):
                raise BadInputError(f"{path}: '{key}' must be {what}, not {stf._short(config[key])}.")
        return config

    def shard_of(self, name: str) -> Path:
        """The file that holds a tensor.

        Args:
            name: the tensor name.

        Returns:
            The shard's path.

        Raises:
            LoratvError: the checkpoint has no tensor of that name (from `entry`).
        """
        return self.entry(name).file

    # ---- data ----
    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, on the CPU, in its stored dtype and shape.

        Args:
            name: the tensor name.

        Returns:
            For safetensors, a new tensor over freshly read bytes; for .bin, the loaded tensor itself (do not modify it).

        Raises:
            LoratvError: no tensor of that name, or the file was truncated since it was indexed.
        """
        entry = self.entry(name)
        if self.format == "bin":
            return self._bin_state[entry.file][name]
        return stf.bytes_to_tensor(stf.read_bytes(entry), entry.dtype, entry.shape)

    def read_rows(self, name: str, start: int, stop: int, into: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) along the first dimension (read into the uint8 buffer `into` when given).

        Args:
            name: the tensor name.
            start: first row (inclusive).
            stop: last row (exclusive).
            into: a CPU uint8 tensor of at least the rows' byte count, reused as the buffer; a smaller one is ignored.

        Returns:
            A (stop - start, *shape[1:]) CPU tensor in the stored dtype (aliasing `into` when it was used); a 0-d
            tensor is returned whole.

        Raises:
            LoratvError: no tensor of that name, or the file was truncated since it was indexed.
        """
        entry = self.entry(name)
        if self.format == "bin" or len(entry.shape) == 0:
            return self.read(name)[start:stop] if entry.shape else self.read(name)
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        buf = stf.read_bytes(entry, start * row_bytes, stop * row_bytes, into)
        return stf.bytes_to_tensor(buf, entry.dtype, (stop - start, *entry.shape[1:]))

    def read_raw(self, name: str) -> bytes:
        """A tensor's raw little-endian bytes, exactly as a safetensors file would store them.

        Args:
            name: the tensor name.

        Returns:
            The bytes (a copy).

        Raises:
            LoratvError: no tensor of that name, or the file was truncated since it was indexed.
        """
        entry = self.entry(name)
        if self.format == "bin":
            return bytes(stf.tensor_to_bytes(self.read(name)))
        return bytes(stf.read_bytes(entry))

    def iter_raw(self, name: str, chunk_bytes: int = 64 << 20):
        """Raw bytes of a tensor in pieces of at most chunk_bytes, for byte-exact copies in O(chunk) memory.

        Args:
            name: the tensor name.
            chunk_bytes: the largest piece; a .bin tensor comes as one piece.

        Yields:
            memoryviews of consecutive byte ranges, together the tensor's data (none for an empty tensor).

        Raises:
            LoratvError: no tensor of that name, or the file was truncated since it was indexed.
        """
        entry = self.entry(name)
        if self.format == "bin":
            yield stf.tensor_to_bytes(self.read(name))
            return
        for start in range(0, entry.nbytes, chunk_bytes):
            yield stf.read_bytes(entry, start, min(entry.nbytes, start + chunk_bytes))

    def aux_files(self) -> list[Path]:
        """Non-weight files beside the weights (configs, tokenizer, generation config, README).

        Returns:
            The files of the model folder, sorted, except weights, index files, hidden files and loratv_manifest.json;
            empty when the checkpoint is a single file.
        """
        if not self.path.is_dir():
            return []
        skip = {SAFETENSORS_INDEX, BIN_INDEX, "loratv_manifest.json"}  # the manifest describes that folder only
        if isinstance(self.path, storage.RemotePath):
            return self._remote_aux_files(skip)
        out = []
        for p in sorted(self.path.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.name not in skip and not p.name.endswith(WEIGHT_SUFFIXES):
                out.append(p)
        return out

    def _remote_aux_files(self, skip: set) -> list[Path]:
        """The aux files of an object-store folder, fetched once into a local cache folder: they are small (configs,
        tokenizer) and the commands copy them with the OS's file copy."""
        if self._aux_cache is None:
            names = storage.list_tree(self.path)
            wanted = sorted(n for n in names if "/" not in n and not n.startswith(".") and n not in skip
                            and not n.endswith(WEIGHT_SUFFIXES))
            folder = storage.local_cache_folder()
            for name in wanted:
                storage.download(self.path / name, folder / name)
            self._aux_cache = [folder / name for name in wanted]
        return list(self._aux_cache)

    def total_parameters(self) -> int:
        """The number of elements over every tensor.

        Returns:
            The sum of each tensor's element count.
        """
        return sum(e.numel for e in self.entries.values())


def _torch_load(file: Path) -> dict:
    """A pickled checkpoint, loaded with weights_only=True so that no code in it can run."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it contains objects other than tensors, and loratv never unpickles code"
        raise BadInputError(f"{file}: cannot be loaded as a weights-only checkpoint ({reason[:200]}).") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"{file}: is not a flat mapping of tensor names to tensors.")
    return state
