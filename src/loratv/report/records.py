"""Writing records to disk: strict JSON (no NaN), and a record's output folder (JSON, rendered report, plots, page)."""

import json
import math
from collections.abc import Callable
from pathlib import Path

from loratv.report.html import write_report


def finite(value):
    """The record with every non-finite float replaced by None, so the JSON is standard.

    Args:
        value: a JSON-like value: dicts, lists and tuples are walked recursively, anything else kept as it is.

    Returns:
        A copy with NaN and ±inf floats as None and tuples as lists (a non-container value is returned itself).
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dump_json(record: dict | list) -> str:
    """The record as strict JSON text.

    Args:
        record: the JSON record (or a list of them); non-finite floats become null.

    Returns:
        The JSON, indented by 2, ending in a newline.
    """
    return json.dumps(finite(record), indent=2, allow_nan=False) + "\n"


def write_json(record: dict, path: Path) -> None:
    """Write the record as strict JSON (dump_json), UTF-8.

    Args:
        record: the JSON record (or a list of them); non-finite floats become null.
        path: the file to write (replaced if it exists).
    """
    Path(path).write_text(dump_json(record), encoding="utf-8")


def write_record_files(record: dict, folder: Path, results_name: str, report_name: str,
                       render: Callable[[dict], str], write_plots: Callable[[dict, Path], list],
                       plots: bool) -> list:
    """The record as strict JSON, its rendered report, and (unless plots=False) its plots and report.html.

    Args:
        record: the JSON record (non-finite floats become null).
        folder: the folder to write into (it exists).
        results_name: file name of the JSON record.
        report_name: file name of the rendered report.
        render: the record's text renderer.
        write_plots: writes the record's plots into the folder and returns their paths.
        plots: False writes neither plots nor report.html.

    Returns:
        The paths written.
    """
    folder = Path(folder)
    record = finite(record)  # the renderers see exactly what the JSON holds
    write_json(record, folder / results_name)
    (folder / report_name).write_text(render(record), encoding="utf-8")
    written = [folder / results_name, folder / report_name]
    if plots:
        written += write_plots(record, folder)
        written.append(write_report(folder))  # the page goes with the plots it embeds
    return written
