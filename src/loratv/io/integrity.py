"""`loratv_manifest.json`: what a merge or an extraction read and wrote, by sha256, so `loratv verify` can re-check it.

inputs: per input (base, adapter, fine-tuned model) its source and, per file it read, the sha256 of a safetensors
shard's header (the 8-byte length and the JSON, which fix every tensor's name, dtype, shape and place; the data is
not re-read), of a JSON file whole, or of a pickle's first MiB (a pickle has no header). files: every file of the
output folder but the manifest itself, with its size and sha256 (shards hashed as they were written).
"""

import hashlib
import json
import os
from pathlib import Path, PurePosixPath

from loratv.io import storage
from loratv.io.safetensors_format import file_sha256, header_sha256
from loratv.version import __version__

MANIFEST = "loratv_manifest.json"
SCHEMA = "loratv.manifest"
SCHEMA_VERSION = 1
PICKLE_HEAD_BYTES = 1 << 20


def _head_sha256(path) -> str:
    if storage.is_url(path):
        return hashlib.sha256(storage.read_range(path, 0, PICKLE_HEAD_BYTES)).hexdigest()
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(PICKLE_HEAD_BYTES)).hexdigest()


def _file_record(path, root) -> tuple:
    try:
        name = str(storage.as_path(path).relative_to(root))
    except ValueError:
        name = str(path)
    size = storage.size(path) if storage.is_url(path) else os.path.getsize(path)
    record: dict[str, int | str] = {"size": size}
    if path.suffix == ".safetensors":
        record["header_sha256"], record["header_bytes"] = header_sha256(path)
    elif path.suffix == ".json":
        record["sha256"] = file_sha256(path)
    else:
        record["head_sha256"] = _head_sha256(path)
    return name, record


def checkpoint_record(ckpt, extra_files=()) -> dict:
    """An input's source and the identity of each file loratv read from it (a Checkpoint, plus e.g. its config).

    Args:
        ckpt: the io.checkpoint.Checkpoint read.
        extra_files: other files read for that input (e.g. its config.json).

    Returns:
        {"source": str, "files": {name relative to the checkpoint folder (or the full path outside it): record}},
        each record holding "size" and "header_sha256" + "header_bytes" (safetensors), "sha256" (JSON) or
        "head_sha256" (the first MiB of anything else).
    """
    if getattr(ckpt, "in_memory", False):  # an already-loaded state dict: no file was read
        return {"source": str(ckpt.source), "files": {}}
    files = [*ckpt.files, *([ckpt.index_file] if ckpt.index_file else []), *extra_files]
    root = ckpt.root
    return {"source": str(ckpt.source), "files": dict(_file_record(storage.as_path(f), root) for f in files)}


def adapter_record(adapter) -> dict:
    """checkpoint_record for an adapter: its weights file(s) plus its adapter_config.json.

    Args:
        adapter: the loaded adapter (its `tensors` Checkpoint, `config_path` and `source`).

    Returns:
        The record, with the adapter's own source.
    """
    extra = [adapter.config_path] if adapter.config_path and storage.as_path(adapter.config_path).suffix == ".json" else []
    record = checkpoint_record(adapter.tensors, extra)
    record["source"] = str(adapter.source)
    return record


def write_manifest(folder: Path, operation: str, inputs: dict, known: dict | None = None,
                   elsewhere: dict | None = None) -> dict:
    """Hash every file of `folder` (reusing `known` {relative name: sha256} for shards hashed while written) and
    write the manifest last, beside them.

    Args:
        folder: the output folder; every file under it (sub-folders included) but its manifest is listed.
        operation: what produced the folder (e.g. "merge", "extract").
        inputs: input name -> checkpoint_record / adapter_record.
        known: relative POSIX name -> sha256 already computed; None: hash every file.
        elsewhere: relative POSIX name -> {"size", "sha256"} of output files that are not in `folder` (written by
            executor tasks straight to an object-store output's temporary prefix); listed too.

    Returns:
        The manifest as written to folder/loratv_manifest.json.
    """
    folder = Path(folder)
    known = known or {}
    files = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or (path.name == MANIFEST and path.parent == folder):
            continue
        name = path.relative_to(folder).as_posix()
        files[name] = {"size": path.stat().st_size, "sha256": known.get(name) or file_sha256(path)}
    for name, record in (elsewhere or {}).items():
        files.setdefault(name, {"size": record["size"], "sha256": record["sha256"]})
    files = dict(sorted(files.items(), key=lambda item: PurePosixPath(item[0]).parts))
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "operation": operation,
        "inputs": inputs,
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
