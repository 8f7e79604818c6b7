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


def _write_record_files(record: dict, folder: Path, results_name: str, report_name: str, render, write_plots,
                        plots: bool) -> list:
    """The record as strict JSON, its rendered report, and (unless plots=False) its plots and report.html, in
    `folder`."""
    folder = Path(folder)
    record = finite(record)  # the renderers see exactly what the JSON holds
    write_json(record, folder / results_name)
    (folder / report_name).write_text(render(record), encoding="utf-8")
    written = [folder / results_name, folder / report_name]
    if plots:
        from .report.html import write_report

        written += write_plots(record, folder)
        written.append(write_report(folder))  # the page goes with the plots it embeds
    return written


def write_comparison_files(record: dict, folder: Path, *, plots: bool = True) -> list:
    """comparison_results.json, detailed_comparison_report.txt and (unless plots=False) the four PNGs and
    report.html."""
    from .report.plots import write_comparison_plots
    from .report.text import render_comparison_text

    return _write_record_files(record, folder, RESULTS_FILE, REPORT_FILE, render_comparison_text,
                               write_comparison_plots, plots)


def write_analysis_files(record: dict, folder: Path, *, plots: bool = True) -> list:
    """analysis_results.json, analysis_report.md and (unless plots=False) the analysis PNGs and report.html."""
    from .analyze import REPORT_NAME, RESULTS_NAME
    from .report.analysis_plots import write_analysis_plots
    from .report.analysis_text import render_analysis_markdown

    return _write_record_files(record, folder, RESULTS_NAME, REPORT_NAME, render_analysis_markdown,
                               write_analysis_plots, plots)
