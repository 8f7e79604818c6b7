"""`loratv precision`: the same adapter merged along every common dtype path, each extracted and compared.

Paths: fp32, fp16 and bf16 outputs computed in fp32 with one rounding (loratv); fp16/bf16 "cast first" (PEFT's
merge_and_unload on a model loaded in 16 bits, with its default fp32 adapter); and, by name only, fp16/bf16 "cast all"
(the same with autocast_adapter_dtype=False: the adapter rounded to 16 bits too). Per path: tensors changed (real, cast
artifact, unexplained), updates that vanished in rounding, effective-versus-intended cosine, largest error in ulps.
"""

import math
import shutil

import torch

from loratv.adapters.adapter import load_adapter
from loratv.adapters.registry import kind_for
from loratv.errors import LoratvError, UnsupportedAdapterError, param
from loratv.io.checkpoint import Checkpoint
from loratv.io.hub import available_locally
from loratv.io.outputs import atomic_output_dir
from loratv.numerics.precision import cast_difference
from loratv.ops.compare import DEFAULT_TOLERANCE, compare, write_comparison_files
from loratv.ops.extract import extract
from loratv.ops.merge import merge
from loratv.ops.task_vector_input import StoredTaskVector
from loratv.report.html import write_report
from loratv.report.plots import precision_plot
from loratv.report.records import write_json
from loratv.report.text import render_precision_text
from loratv.version import __version__

SCHEMA = "loratv.precision"
SCHEMA_VERSION = 1
RESULTS_FILE = "precision_results.json"
REPORT_FILE = "precision_report.txt"
PLOT_FILE = "precision_comparison.png"
# name -> (output precision, PEFT-on-a-16-bit-model mode or None for loratv's direct merge, description); the mode
# is merge()'s cast_base_first with autocast_adapter_dtype True ("autocast") or False ("cast-all")
PATHS = {
    "fp32": ("fp32", None, "fp32 output, sum in fp32, one rounding"),
    "fp16": ("fp16", None, "fp16 output, sum in fp32, rounded once to fp16"),
    "bf16": ("bf16", None, "bf16 output, sum in fp32, rounded once to bf16"),
    "fp16-cast-first": ("fp16", "autocast", "base loaded in fp16, adapter kept in fp32, ΔW in fp32, sum in fp32 "
                        "rounded to fp16 (PEFT on an fp16 model, default autocast_adapter_dtype=True)"),
    "bf16-cast-first": ("bf16", "autocast", "base loaded in bf16, adapter kept in fp32, ΔW in fp32, sum in fp32 "
                        "rounded to bf16 (PEFT on a bf16 model, default autocast_adapter_dtype=True)"),
    "fp16-cast-all": ("fp16", "cast-all", "base and adapter loaded in fp16, ΔW rounded to fp16, sum in fp16 "
                      "(PEFT on an fp16 model with autocast_adapter_dtype=False)"),
    "bf16-cast-all": ("bf16", "cast-all", "base and adapter loaded in bf16, ΔW rounded to bf16, sum in bf16 "
                      "(PEFT on a bf16 model with autocast_adapter_dtype=False)"),
}
# run when --paths is not given: the cast-all paths are PEFT's opt-out, asked for by name
DEFAULT_PATHS = ("fp32", "fp16", "bf16", "fp16-cast-first", "bf16-cast-first")


def path_summary(name: str, description: str, output_dtype: str, record: dict) -> dict:
    """One path's line in the study: counts, vanished updates, cosine, worst error and verdict from its comparison.

    Args:
        name: the path's name (a key of PATHS).
        description: the path's description.
        output_dtype: the merged model's dtype code ("F32", "F16" or "BF16").
        record: the path's comparison record (compare).

    Returns:
        The summary; "real" counts shared tensors, "unchanged" also counts adapter-only ones (an update that
        vanished).
    """
    s = record["summary"]
    counts = s["counts"]
    targeted = [t for t in record["tensors"] if t["targeted"]]
    return {
        "name": name,
        "description": description,
        "output_dtype": output_dtype,
        "total_tensors": s["total_tensors"],
        "changed_tensors": s["changed_tensors"],
        "counts": {
            "real": counts["shared"],
            "cast-artifact": counts["cast-artifact"],
            "unexplained": counts["unexplained"],
            "unchanged": counts["unchanged"] + counts["adapter-only"],
        },
        "vanished_elements": sum(t["vanished_elements"] for t in targeted),
        "targeted_elements": sum(t["parameters"] for t in targeted),
        "effective_cosine": s["targeted_cosine"],
        "max_error_ulps": max((t["max_error_ulps"] for t in targeted), default=None),
        "max_certificate_ratio": s["max_certificate_ratio"],
        "verdict": s["verdict"],
    }


def precision_study(base, adapter, out, *, paths=None, keep_merged=False, tolerance=DEFAULT_TOLERANCE,
                    device="cpu", plots=True, force=False, progress=False, command=None) -> dict:
    """Merge along each path, extract, compare. `paths` None: DEFAULT_PATHS for an additive LoRA; the three direct
    paths for DoRA and the other tuners (the cast-first and cast-all paths reproduce PEFT's additive LoRA merge only).

    Args:
        base: the base model (folder, file or hub id).
        adapter: the adapter (PEFT folder or single LoRA file).
        out: the output folder (written atomically): one subfolder per path with its task vector and comparison
            files, then precision_results.json, precision_report.txt and, with plots, the plot and report.html.
        paths: names of PATHS to run, in order (the caller checks them: loratv.precision_study and the CLI do);
            None: the defaults above.
        keep_merged: keep each path's merged model (OUT/<path>/merged_model) instead of deleting it.
        tolerance: compare's tolerance.
        device: where merge and compare compute ("cpu", "cuda", ...).
        plots: write the precision plot and report.html (the per-path comparisons are written without plots).
        force: replace an existing output folder.
        progress: show progress bars.
        command: the command line, recorded in the study.

    Returns:
        The study record (schema loratv.precision): base, adapter, one path_summary per path, notes and command.

    Raises:
        LoratvError: UnsupportedAdapterError when `paths` names a cast-first or cast-all path for an adapter that is
            not additive LoRA; or what merge, extract and compare raise.
    """

    loaded = load_adapter(adapter)
    additive_lora = kind_for(loaded.settings.peft_type).factored and not loaded.settings.use_dora
    notes = []
    kind = "DoRA" if loaded.settings.use_dora else loaded.settings.tuner_name
    if paths is None:
        paths = [p for p in DEFAULT_PATHS if additive_lora or not PATHS[p][1]]
        if not additive_lora:
            notes.append(f"cast-first paths skipped: they reproduce PEFT's additive LoRA merge, not {kind}.")
    elif not additive_lora and any(PATHS[p][1] for p in paths):
        cast_first_paths = " ".join(p for p in paths if PATHS[p][1])
        raise UnsupportedAdapterError(f"{param('paths', paths, flag_value=cast_first_paths)}: cast-first paths are defined for "
                          f"additive LoRA only, and {loaded.config_path} is {kind}.")
    summaries = []
    with atomic_output_dir(out, [base, adapter], force=force) as tmp:
        for name in paths:
            precision, cast_first, description = PATHS[name]
            folder = tmp / name
            folder.mkdir()
            merged = folder / "merged_model"
            merge(base, adapter, merged, precision=precision, cast_base_first=cast_first is not None,
                  autocast_adapter_dtype=cast_first != "cast-all", device=device, progress=progress)
            extract(base, merged, folder / "task_vectors", progress=progress)
            # compared with the merged model itself: T exact in float64, even where the stored T rounds
            record = compare(base, adapter, finetuned=merged, tolerance=tolerance, device=device, progress=progress)
            write_comparison_files(record, folder, plots=False)
            if not keep_merged:
                shutil.rmtree(merged)
            code = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}[precision]
            summaries.append(path_summary(name, description, code, record))
        study = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "loratv_version": __version__,
            "base": str(base),
            "adapter": str(adapter),
            "paths": summaries,
            "notes": notes,
            "command": command,
        }
        write_json(study, tmp / RESULTS_FILE)
        (tmp / REPORT_FILE).write_text(render_precision_text(study), encoding="utf-8")
        if plots:

            precision_plot(study, tmp / PLOT_FILE)
            write_report(tmp)  # the page reads the study and each path's comparison_results.json
    return study


def _finite_max_abs(t: torch.Tensor, where, name: str) -> float:
    """max |t|, refusing NaN and Inf (Python's max() would silently drop a NaN)."""
    value = float(t.abs().max()) if t.numel() else 0.0
    if not math.isfinite(value):
        raise LoratvError(f"{where}: task vector tensor '{name}' contains NaN or Inf.")
    return value


def compare_task_vector_pair(fp16_dir, fp32_dir, base=None) -> dict:
    """The seed's quick precision test: which tensors an fp16 and an fp32 task vector change, and why they differ.

    With the base (given, or recorded in task_vector.json and still on disk), every claim is checked exactly: an
    fp16-only tensor is a cast artifact when base + T16 is the base rounded to fp16, and a shared tensor is "the fp32
    merge rounded to fp16" when base + T16 == fp16(base + T32), bit for bit.

    Args:
        fp16_dir: the task vector extracted from the fp16 merge (folder or file written by extract).
        fp32_dir: the task vector extracted from the fp32 merge.
        base: the base model; None: the one recorded by the fp16 task vector, if available locally.

    Returns:
        The pair record (schema loratv.precision_pair): changed, shared and one-sided tensor counts, the largest
        fp16-only |T| and shared |T16 − T32|, and (with a base, else None) the cast artifacts, shared tensors equal
        to the fp32 merge rounded, and shared tensors undecided because a stored T was rounded.

    Raises:
        LoratvError: a task vector holds NaN or Inf among the tensors read; or either does not belong to the base.
    """



    half, full = StoredTaskVector(fp16_dir), StoredTaskVector(fp32_dir)
    base_source = base or half.recorded_base
    base_ckpt = None
    if base_source is not None and (base is not None or available_locally(base_source)):
        base_ckpt = Checkpoint(base_source, label=f"base {base_source}")
        half.check_against(base_ckpt)
        full.check_against(base_ckpt)
    changed_half = _changed_names(half)
    changed_full = _changed_names(full)
    only_half = [n for n in changed_half if n not in changed_full]
    only_full = [n for n in changed_full if n not in changed_half]
    shared = [n for n in changed_half if n in changed_full]
    cast_artifacts, rounded_shared, max_shared_gap = 0, 0, 0.0
    fp16_only_max = 0.0
    for name in only_half:
        t16 = half.tensors.read(name).to(torch.float64)
        fp16_only_max = max(fp16_only_max, _finite_max_abs(t16, fp16_dir, name))
        if base_ckpt is not None:
            w = base_ckpt.read(name)
            cast_artifacts += bool(torch.equal(t16, cast_difference(w, torch.float16)))
    undecided = 0
    for name in shared:
        t16 = half.tensors.read(name).to(torch.float64)
        t32 = full.tensors.read(name).to(torch.float64)
        max_shared_gap = max(max_shared_gap, _finite_max_abs(t16 - t32, f"{fp16_dir} or {fp32_dir}", name))
        if base_ckpt is None:
            continue
        if half.storage_rounding(name) is not None or full.storage_rounding(name) is not None:
            undecided += 1  # base + T is not the fine-tuned weight exactly: no bit-for-bit claim
            continue
        w = base_ckpt.read(name).to(torch.float64)
        rounded_shared += bool(torch.equal(w + t16, (w + t32).to(torch.float16).to(torch.float64)))
    return {
        "schema": "loratv.precision_pair",
        "schema_version": 1,
        "fp16_dir": str(fp16_dir),
        "fp32_dir": str(fp32_dir),
        "base": str(base_source) if base_ckpt is not None else None,
        "fp16_changed_tensors": len(changed_half),
        "fp32_changed_tensors": len(changed_full),
        "shared_tensors": len(shared),
        "fp16_only_tensors": len(only_half),
        "fp32_only_tensors": len(only_full),
        "fp16_only_max_abs": fp16_only_max,
        "fp16_only_cast_artifacts": cast_artifacts if base_ckpt is not None else None,
        "shared_max_abs_gap": max_shared_gap,
        "shared_equal_to_fp32_rounded": rounded_shared if base_ckpt is not None else None,
        "shared_undecided": undecided if base_ckpt is not None else None,
    }


def _changed_names(tv) -> list:
    if tv.records is not None:
        return [n for n, r in tv.records.items() if r.get("changed")]

    return [n for n in tv.tensors.names() if bool(torch.count_nonzero(tv.tensors.read(n)))]


def render_pair_text(pair: dict, storage_flag: str = "loratv extract --storage-dtype fp64") -> str:
    """The quick precision test as text; `storage_flag` is how the reader's front end re-extracts exactly.

    Args:
        pair: what compare_task_vector_pair returned.
        storage_flag: the command shown for re-extracting undecided tensors exactly.

    Returns:
        The text, ending in a newline.
    """
    lines = [
        f"fp16 task vector {pair['fp16_dir']}: {pair['fp16_changed_tensors']} tensors changed",
        f"fp32 task vector {pair['fp32_dir']}: {pair['fp32_changed_tensors']} tensors changed",
        f"changed in both: {pair['shared_tensors']}; only in fp16: {pair['fp16_only_tensors']}; "
        f"only in fp32: {pair['fp32_only_tensors']}",
    ]
    if pair["fp16_only_tensors"]:
        lines.append(f"fp16-only tensors: max |T| = {pair['fp16_only_max_abs']:.3e}")
        if pair["fp16_only_cast_artifacts"] is not None:
            lines.append(
                f"  {pair['fp16_only_cast_artifacts']} of {pair['fp16_only_tensors']} are cast artifacts: base + T16 is "
                "the base rounded to fp16, bit for bit (untouched weights rounded, not training)"
            )
        else:
            lines.append("  (no base available: pass --base to prove whether they are cast artifacts)")
    if pair["shared_tensors"]:
        lines.append(f"tensors changed in both: max |T16 − T32| = {pair['shared_max_abs_gap']:.3e}")
        if pair["shared_equal_to_fp32_rounded"] is not None:
            decided = pair["shared_tensors"] - pair["shared_undecided"]
            lines.append(
                f"  {pair['shared_equal_to_fp32_rounded']} of {decided} decidable tensors equal the fp32 merge rounded "
                "to fp16, bit for bit"
            )
        if pair["shared_undecided"]:
            lines.append(
                f"  {pair['shared_undecided']} undecided: their task vectors were rounded when stored (float32 could not "
                f"hold the exact difference); re-extract with `{storage_flag}` to decide them"
            )
    return "\n".join(lines) + "\n"
