"""What a folder holds, when loratv wrote it: which command's output it is, read from the record that command left.

The seed study's scripts rewrote their output folders on every run, and its README runs some of them twice into the
same folder (the quick start, then the step-by-step guide). Its aliases therefore replace a previous output of the
same command, and still refuse anything else (a folder of the user's, another command's output) without --force.
"""

import json
from pathlib import Path

from loratv.io.integrity import MANIFEST

# kind: (record file, its "schema" field, the manifest "operation" when the record is a manifest)
RECORDS = {
    "merge": (MANIFEST, "loratv.manifest", "merge"),
    "extract": (MANIFEST, "loratv.manifest", "extract"),
    "comparison": ("comparison_results.json", "loratv.comparison", None),
    "analysis": ("analysis_results.json", "loratv.analysis", None),
    "to-lora": ("to_lora_fidelity.json", "loratv.to_lora", None),
    "summary": ("task_vector_summary.json", "loratv.task_vector_summary", None),
    "diff": ("parameter_changes.json", "loratv.parameter_changes", None),
    "structure": ("model_structure.json", "loratv.structure", None),
}


def _read_record(path: Path):
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def output_kind(folder) -> str | None:
    """The kind of loratv output `folder` holds, or None.

    Args:
        folder: a path that may or may not exist.

    Returns:
        "validation" for a `loratv validate` folder (a comparison beside its merged model), one of RECORDS' keys
        for the other commands, or None when the folder is not recognisably a loratv output.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for kind, (file, schema, operation) in RECORDS.items():
        record = _read_record(folder / file)
        if record is None or record.get("schema") != schema:
            continue
        if operation is not None and record.get("operation") != operation:
            continue
        if kind == "comparison" and any(folder.glob("merged_model_*")):
            return "validation"
        return kind
    return None


def holds_output_of(folder, kind: str) -> bool:
    """Whether `folder` holds a previous output of the command `kind` (so that a seed script may replace it).

    Args:
        folder: the output path a seed script was given.
        kind: "validation" or one of RECORDS' keys ("merge", "extract", "comparison", "analysis", …).

    Returns:
        True when the folder exists and holds exactly that kind of loratv output.
    """
    return output_kind(folder) == kind
