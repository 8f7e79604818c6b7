"""Writing records to disk: strict JSON (no NaN) and the compare output folder (JSON, text report, ΔW, plots)."""

import json
import math
from pathlib import Path

from .compare import REPORT_FILE, RESULTS_FILE


def finite(value):
    """The record with every non-finite float replaced by None, so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dump_json(record: dict) -> str:
    return json.dumps(finite(record), indent=2, allow_nan=False) + "\n"


def write_json(record: dict, path: Path) -> None:
    Path(path).write_text(dump_json(record), encoding="utf-8")


def write_comparison_files(record: dict, folder: Path, *, plots: bool = True) -> list:
    """comparison_results.json, detailed_comparison_report.txt and (unless plots=False) the four PNGs."""
    from .report.text import render_comparison_text

    folder = Path(folder)
    record = finite(record)  # the renderers see exactly what the JSON holds
    write_json(record, folder / RESULTS_FILE)
    (folder / REPORT_FILE).write_text(render_comparison_text(record), encoding="utf-8")
    written = [folder / RESULTS_FILE, folder / REPORT_FILE]
    if plots:
        from .report.plots import write_comparison_plots

        written += write_comparison_plots(record, folder)
    return written


def write_analysis_files(record: dict, folder: Path, *, plots: bool = True) -> list:
    """analysis_results.json, analysis_report.md and (unless plots=False) the analysis PNGs."""
    from .analyze import REPORT_NAME, RESULTS_NAME
    from .report.analysis_text import render_analysis_markdown

    folder = Path(folder)
    record = finite(record)
    write_json(record, folder / RESULTS_NAME)
    (folder / REPORT_NAME).write_text(render_analysis_markdown(record), encoding="utf-8")
    written = [folder / RESULTS_NAME, folder / REPORT_NAME]
    if plots:
        from .report.analysis_plots import write_analysis_plots

        written += write_analysis_plots(record, folder)
    return written
