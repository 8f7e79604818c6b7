"""`loratv verify OUT`: re-check a folder written by merge or extract against its manifest.

Every recorded file present with its size and sha256, no unrecorded file, every safetensors header valid (the
same parser as for inputs), the shards and index consistent, and every floating-point tensor finite. Problems are
collected, not raised: the caller lists them all (exit 1); only a path that is not a loratv output is bad input.
"""

from dataclasses import dataclass, field
from pathlib import Path

from loratv.common import dtypes
from loratv.common.streaming import row_chunks
from loratv.errors import LoratvError, one_line
from loratv.io import safe_json
from loratv.io.checkpoint import Checkpoint
from loratv.io.integrity import MANIFEST, SCHEMA
from loratv.io.safetensors_format import file_sha256, read_header

CHUNK_BYTES = 64 << 20


@dataclass
class VerifyReport:
    folder: Path
    operation: str | None = None
    files: int = 0
    tensors: int = 0
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the check found no problem."""
        return not self.problems

    def record(self) -> dict:
        """The report as a JSON-ready dict (for --json output).

        Returns:
            folder, operation, files_checked, tensors_checked, ok and the list of problems.
        """
        return {"folder": str(self.folder), "operation": self.operation, "files_checked": self.files,
                "tensors_checked": self.tensors, "ok": self.ok, "problems": self.problems}


def _read_manifest(folder: Path, report: VerifyReport):
    try:
        manifest = safe_json.read(folder / MANIFEST)
    except LoratvError as exc:
        report.problems.append(str(exc))
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA or not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int) for v in files.values()
    ):
        report.problems.append(f"{folder / MANIFEST}: not a loratv manifest (schema '{SCHEMA}' with a size and "
                               "sha256 per file).")
        return None
    report.operation = manifest.get("operation") if isinstance(manifest.get("operation"), str) else None
    return files


def _check_files(folder: Path, files: dict, report: VerifyReport) -> None:
    for name, want in files.items():
        path = folder / name
        if ".." in Path(name).parts or Path(name).is_absolute() or not path.is_file():
            report.problems.append(f"{path}: missing (the manifest records it).")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            report.problems.append(f"{path}: {size} bytes, but {want['size']} were written.")
        elif file_sha256(path) != want["sha256"]:
            report.problems.append(f"{path}: sha256 differs from the one recorded when it was written (the file "
                                   "changed or is corrupt).")
        report.files += 1
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != MANIFEST and rel not in files and not path.name.startswith("."):
            report.problems.append(f"{path}: not recorded in the manifest (added after loratv wrote the folder).")


def _check_tensors(folder: Path, report: VerifyReport) -> None:
    """Headers by the input parser, shards against the index, then every float tensor read in chunks."""

    shards = sorted(folder.glob("*.safetensors"))
    valid = []
    for shard in shards:
        try:
            read_header(shard)
            valid.append(shard)
        except LoratvError as exc:
            report.problems.append(str(exc))
    if not shards or len(valid) != len(shards):
        if not shards:
            report.problems.append(f"{folder}: holds no .safetensors file.")
        return
    try:
        ckpt = Checkpoint(folder)
    except LoratvError as exc:
        report.problems.append(str(exc))
        return
    for name in ckpt.names():
        entry = ckpt.entry(name)
        report.tensors += 1
        if not dtypes.is_float(entry.dtype):
            continue
        try:
            for start, stop in row_chunks(entry.shape, entry.element_size, CHUNK_BYTES):
                if not dtypes.all_finite(ckpt.read_rows(name, start, stop)):
                    report.problems.append(f"{entry.file}: tensor '{name}' contains NaN or Inf.")
                    break
        except LoratvError as exc:
            report.problems.append(str(exc))


def verify(folder) -> VerifyReport:
    """Re-check a folder written by merge or extract: its manifest, files, safetensors headers and tensors.

    Args:
        folder: the output folder (a path or str) holding the loratv manifest.

    Returns:
        The report; problems with the contents are collected in it, not raised.

    Raises:
        LoratvError: `folder` is not a folder, or has no manifest (so is not a loratv output).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LoratvError(f"{folder}: no such folder (verify checks a folder written by loratv merge or extract).")
    if not (folder / MANIFEST).is_file():
        raise LoratvError(f"{folder}: has no {MANIFEST}, so it was not written by loratv merge or extract (or the "
                          "manifest was removed).")
    report = VerifyReport(folder)
    files = _read_manifest(folder, report)
    if files is not None:
        _check_files(folder, files, report)
    _check_tensors(folder, report)
    return report


def render(report: VerifyReport) -> str:
    """The report as text: one summary line when it is ok, else one line per problem.

    Args:
        report: what verify returned.

    Returns:
        The text, ending in a newline.
    """
    if report.ok:
        what = f" ({report.operation} output)" if report.operation else ""
        return (f"verified {report.folder}{what}: {report.files} files match their sha256, {report.tensors} tensors "
                "read, every header valid and every tensor finite\n")
    lines = [f"{report.folder}: {len(report.problems)} problem{'s' if len(report.problems) > 1 else ''}:"]
    lines += [f"  {one_line(p)}" for p in report.problems]
    return "\n".join(lines) + "\n"
