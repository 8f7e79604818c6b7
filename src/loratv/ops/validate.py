"""`loratv validate`: merge → extract → compare → report in one output folder (the seed's final_validation.py)."""

from pathlib import Path

from loratv.io.outputs import atomic_output_dir
from loratv.ops.compare import DEFAULT_TOLERANCE, DELTAS_FILE, compare, write_comparison_files
from loratv.ops.extract import extract
from loratv.ops.merge import merge


def validate(
    base,
    adapter,
    out,
    *,
    precision: str = "fp32",
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "cpu",
    plots: bool = True,
    force: bool = False,
    progress: bool = False,
    command: str | None = None,
) -> dict:
    """OUT/merged_model_<precision>, OUT/task_vectors_<precision>, and compare's files in OUT; returns the record.

    Args:
        base: the base model (a folder, file or hub id, as merge and compare accept).
        adapter: the LoRA adapter merged into the base and compared against.
        out: the output folder, written atomically (to a temporary folder renamed into place).
        precision: merge's precision ("auto", "fp32", "fp16" or "bf16"); it also names the two subfolders.
        tolerance: compare's pass/fail tolerance.
        device: where merge and compare compute ("cpu", "cuda", ...).
        plots: whether write_comparison_files also draws the plots.
        force: replace an existing `out`.
        progress: show progress bars.
        command: the command line, recorded in compare's record.

    Returns:
        compare's record, with inputs.task_vector and inputs.finetuned naming the final (not temporary) folders.
    """
    with atomic_output_dir(out, [base, adapter], force=force) as tmp:
        merged = tmp / f"merged_model_{precision}"
        task_vector = tmp / f"task_vectors_{precision}"
        merge(base, adapter, merged, precision=precision, device=device, progress=progress)
        extract(base, merged, task_vector, progress=progress)
        record = compare(base, adapter, task_vector=task_vector, tolerance=tolerance, device=device,
                         deltas_path=tmp / DELTAS_FILE, progress=progress, command=command)
        # the record names the folders where they will be, not the temporary ones
        record["inputs"]["task_vector"] = str(Path(out) / task_vector.name)
        record["inputs"]["finetuned"] = str(Path(out) / merged.name)
        write_comparison_files(record, tmp, plots=plots)
    return record
