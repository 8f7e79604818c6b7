"""`loratv` command line: parses arguments and calls the library; no logic lives here."""

import argparse
import os
import shlex
import sys

from loratv.adapters.adapter import named_adapter
from loratv.errors import LoratvError, cli_message, one_line
from loratv.example.builder import example_merged, example_paths, write_example
from loratv.io.config_file import read_flag_file
from loratv.io.outputs import atomic_output_dir, guarded_inputs
from loratv.io.writer import parse_size
from loratv.ops.adapter_keys import describe_adapter_keys, render_keys_text
from loratv.ops.analyze import run_analysis
from loratv.ops.combine import FIDELITY_FILE as COMBINE_FIDELITY_FILE
from loratv.ops.combine import Recompression, combine
from loratv.ops.combine import summary_text as combine_summary
from loratv.ops.compare import DEFAULT_TOLERANCE, DELTAS_FILE, compare, write_comparison_files
from loratv.ops.convert import convert
from loratv.ops.extract import extract
from loratv.ops.inspect import describe, render_text
from loratv.ops.merge import merge
from loratv.ops.merge_models import merge_models
from loratv.ops.model_diff import RESULTS_FILE as DIFF_RESULTS_FILE
from loratv.ops.model_diff import diff_models, write_diff
from loratv.ops.precision_study import PATHS, precision_study
from loratv.ops.similarity import RESULTS_FILE as SIMILARITY_FILE
from loratv.ops.similarity import read_list, similarity
from loratv.ops.similarity import summary_text as similarity_summary
from loratv.ops.structure import render_summary, write_structure
from loratv.ops.task_vector_summary import RESULTS_FILE as SUMMARY_RESULTS_FILE
from loratv.ops.task_vector_summary import summarize_task_vector, write_summary
from loratv.ops.to_lora import DEFAULT_RANK, FIDELITY_FILE, Criterion, to_lora
from loratv.ops.validate import validate
from loratv.ops.verify import render, verify
from loratv.ops.verify_merge import render_verify_merge, verify_merge
from loratv.report.analysis_text import render_analysis_summary
from loratv.report.changes_text import render_diff_text, render_summary_text
from loratv.report.html import write_report
from loratv.report.records import dump_json
from loratv.report.text import render_precision_text, render_seed_summary, render_to_lora_text
from loratv.version import __version__

# the seed study's script names (repository root), which record themselves as `python SCRIPT …`
SEED_SCRIPTS = ("merge_lora.py", "extract_task_vectors.py", "compare_lora_task_vector.py", "final_validation.py",
                "quick_precision_test.py", "analyze_lora_vs_task_vector_math.py")


def _size(text):
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_device_flag(p):
    """Add --device, where deltas are computed: cpu, cuda or cuda:N (default: cpu).

    Args:
        p: the parser (or subparser) to add it to.
    """
    p.add_argument("--device", default="cpu", help="where deltas are computed: cpu, cuda or cuda:N (default: cpu)")


def add_executor_flag(p, unit: str, task_bytes: str | None = None):
    """Add --executor (local, ray or ray=ADDRESS), and --task-bytes where a task is a group of tensors.

    Args:
        p: the parser (or subparser) to add them to.
        unit: what one Ray task does, for the help text.
        task_bytes: the default of --task-bytes, for the help text (None: no such flag).
    """
    p.add_argument("--executor", default="local", metavar="local|ray[=ADDRESS]",
                   help=f"where the work runs: local (this process, the default), or ray: {unit}, each task opening "
                        "its inputs itself; ADDRESS is a cluster (auto, host:port, ray://host:10001), else "
                        "RAY_ADDRESS or a new local Ray instance. The output folder must be reachable from every "
                        "worker; the files are the local run's bit for bit (docs/scaling.md)")
    if task_bytes is not None:
        p.add_argument("--task-bytes", type=_size, default=None, metavar="SIZE",
                       help=f"with --executor ray: the input bytes one task reads at most, e.g. 1GB (default "
                            f"{task_bytes})")


def add_adapter_name_flag(p):
    """Add --adapter-name, the adapter to use in a folder that holds several (PEFT's subfolders).

    Args:
        p: the parser (or subparser) to add it to.
    """
    p.add_argument("--adapter-name", metavar="NAME", help="with an adapter folder that holds several adapters "
                   "(PEFT saves extra ones in subfolders): the one to use; 'default' is the top-level one")


def add_base_and_adapter(p):
    """Add --base, --adapter and --adapter-name (base and adapter default to the embedded example).

    Args:
        p: the parser (or subparser) to add them to.
    """
    p.add_argument("--base", help="base model (default: the embedded example)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder (default: the embedded example's adapter)")
    add_adapter_name_flag(p)


def add_output_flags(p):
    """Add --force (replace an existing output folder) and --quiet (print nothing but errors).

    Args:
        p: the parser (or subparser) to add them to.
    """
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors; no progress bar")


def add_merge_arguments(p):
    """Add the flags of `loratv merge`: models, output, precision, compute dtype, device, sharding, PEFT modes.

    Args:
        p: the parser (or subparser) to add them to.
    """
    p.add_argument("--base", help="base model: folder, .safetensors/.bin file, or hub id org/name[@revision] "
                   "(default: the embedded example)")
    p.add_argument("--adapter", help="PEFT LoRA adapter folder (default: the embedded example's adapter)")
    add_adapter_name_flag(p)
    p.add_argument("-o", "--output", help="output model folder (default: merged_model_<precision>)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="dtype of floating-point output tensors; auto keeps each tensor's base dtype (default: auto)")
    p.add_argument("--compute-dtype", default="fp32", choices=["fp32", "fp64"],
                   help="dtype in which base + delta is computed before the single cast to the output dtype (default: fp32)")
    add_device_flag(p)
    p.add_argument("--max-shard-size", type=_size, default=None,
                   help="split output shards at this many bytes, e.g. 5GB (default: keep the base's shard layout)")
    p.add_argument("--cast-base-first", action="store_true",
                   help="reproduce PEFT's merge_and_unload on a model loaded in --precision d (default settings): the "
                        "base rounded to d, the adapter kept in fp32, each delta computed in fp32 and added in place "
                        "(sum in fp32, rounded to d; an embedding's delta is rounded to d first): rounds twice or "
                        "three times; for precision studies")
    p.add_argument("--no-autocast-adapter-dtype", action="store_true",
                   help="with --cast-base-first: PEFT with autocast_adapter_dtype=False instead, the adapter's "
                        "factors rounded to d too, the delta computed from them in fp32 (PEFT's CPU arithmetic) and "
                        "rounded to d, the sum rounded in d")
    p.add_argument("--peft-arithmetic", action="store_true",
                   help="HRA: run PEFT's own merge (its n×n reflection product, then an n³ matmul per module) for "
                        "PEFT's bits, instead of loratv's compact WY evaluation in float64 rounded once (faster, and "
                        "within half an ulp of the exact merge plus a float64 term)")
    add_executor_flag(p, "one task per output shard (see --max-shard-size)")
    add_output_flags(p)


def add_merge_models_arguments(p):
    """Add the flags of `loratv merge-models`: the recipe, output, compute dtype, device, sharding.

    Args:
        p: the parser (or subparser) to add them to.
    """
    p.add_argument("recipe", metavar="CONFIG", help="mergekit YAML merge configuration (models, merge_method, base_model, parameters, "
                   "dtype, out_dtype)")
    p.add_argument("-o", "--output", required=True, help="output model folder")
    p.add_argument("--compute-dtype", default="fp32", choices=["fp32", "fp64"],
                   help="dtype the method computes in before the one rounding to the output dtype (default: fp32)")
    add_device_flag(p)
    p.add_argument("--max-shard-size", type=_size, default=None,
                   help="split output shards at this many bytes, e.g. 5GB (default: the reference model's layout)")
    p.add_argument("--seed", type=int, default=0,
                   help="key of DARE's and DELLA's masks, with the tensor name, the input's position and the element "
                        "index: the same masks on any thread count, processing order or device (default: 0)")
    p.add_argument("--dtype-like-mergekit", action="store_true",
                   help="compute each tensor in the dtype mergekit does (the config's dtype, else the inputs' own: "
                        "bf16 arithmetic for bf16 inputs) instead of --compute-dtype: mergekit's bits and roundings")
    add_executor_flag(p, "one task per output shard (see --max-shard-size)")
    add_output_flags(p)


def add_extract_arguments(p):
    """Add the flags of `loratv extract`: models, output, --dense, --storage-dtype and --config.

    Args:
        p: the parser (or subparser) to add them to.
    """
    p.add_argument("--base", help="base model (default: the embedded example)")
    p.add_argument("--finetuned", help="fine-tuned model (default: the embedded example merged in fp32)")
    p.add_argument("-o", "--output", default="task_vectors", help="output folder (default: task_vectors)")
    p.add_argument("--dense", action="store_true", help="store every tensor, changed or not (as the seed did)")
    p.add_argument("--storage-dtype", default="auto", choices=["auto", "fp32", "fp64"],
                   help="dtype of the stored differences, each the exact difference rounded once: auto = float32 "
                        "(float64 if an input is float64); the JSON counts rounded elements")
    p.add_argument("--config", help="YAML file whose keys are this command's flag names (e.g. base, finetuned, output)")
    add_executor_flag(p, "one task per group of tensors of at most --task-bytes of input", "2GiB")
    add_output_flags(p)


def add_compare_arguments(p):
    """Add the flags of `loratv compare`: models, task vector or fine-tuned model, output, tolerance, plots.

    Args:
        p: the parser (or subparser) to add them to.
    """
    add_base_and_adapter(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--task-vector", help="task vector folder (or .safetensors file) written by `loratv extract`")
    source.add_argument("--finetuned", help="fine-tuned model; the task vector is computed on the fly, streaming "
                        "(default, with no other model argument: the embedded example merged in fp32)")
    p.add_argument("-o", "--output", default="comparison_results", help="output folder (default: comparison_results)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="absolute per-element tolerance on |T − ΔW|, the fallback verdict when the rounding "
                        f"certificate fails (default: {DEFAULT_TOLERANCE:g})")
    add_device_flag(p)
    p.add_argument("--no-plots", action="store_true", help="skip the four PNG plots")
    p.add_argument("--json", action="store_true", help="print the comparison record (JSON) instead of the summary")
    add_executor_flag(p, "one task per group of tensors of at most --task-bytes of input", "2GiB")
    add_output_flags(p)


def add_validate_arguments(p):
    """Add the flags of `loratv validate`: models, output, merge precision, tolerance, device, plots.

    Args:
        p: the parser (or subparser) to add them to.
    """
    add_base_and_adapter(p)
    p.add_argument("-o", "--output", default="validation_results", help="output folder (default: validation_results)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the merged model that is extracted and compared (default: fp32)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"fallback absolute tolerance (default: {DEFAULT_TOLERANCE:g})")
    add_device_flag(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the comparison record (JSON) instead of the summary")
    add_output_flags(p)


def add_analyze_arguments(p):
    """Add the flags of `loratv analyze`: the LoRA delta and task vector sources, output, spectra, plots.

    Args:
        p: the parser (or subparser) to add them to.
    """
    p.add_argument("--base", help="base model (for ulps and the noise floor; needed with --adapter or --finetuned)")
    delta = p.add_mutually_exclusive_group()
    delta.add_argument("--adapter", help="PEFT LoRA adapter: ΔW from its factors (exact spectra)")
    delta.add_argument("--lora-deltas", help="lora_deltas.safetensors (or the folder) written by `loratv compare`")
    add_adapter_name_flag(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--task-vector", help="task vector folder (or .safetensors file) written by `loratv extract`")
    source.add_argument("--finetuned", help="fine-tuned model; the task vector is computed on the fly")
    p.add_argument("-o", "--output", default="analysis_results", help="output folder (default: analysis_results)")
    p.add_argument("--spectrum", action="store_true", help="add spectra and ranks: singular values, numerical rank "
                   "above the rounding-noise floor, stable/effective rank, principal angles, and their two plots")
    p.add_argument("--exact-svd", action="store_true", help="with --spectrum: full SVD of every tensor instead of "
                   "the randomized leading singular values (slow for large tensors)")
    add_device_flag(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help="print the analysis record (JSON) instead of the summary")
    p.add_argument("--verbose", action="store_true", help="also print one line per tensor")
    add_output_flags(p)


def add_to_lora_arguments(p):
    """Add the flags of `loratv to-lora`: sources, output, rank criterion, tensor filters, factor dtype.

    Args:
        p: the parser (or subparser) to add them to.
    """

    p.add_argument("--base", help="base model (needed with --finetuned; with --task-vector, to write full values of "
                   "tensors a LoRA cannot hold and to recognise cast artifacts) (default, with no model argument: the "
                   "embedded example)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--finetuned", help="fine-tuned model; the task vector is computed on the fly (default, with "
                        "no model argument: the embedded example merged in fp32)")
    source.add_argument("--task-vector", help="task vector folder (or .safetensors file) written by `loratv extract`")
    p.add_argument("-o", "--output", default="to_lora_adapter", help="adapter folder to write (default: to_lora_adapter)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rank", type=int, help=f"the same rank for every module (default: {DEFAULT_RANK})")
    how.add_argument("--energy", type=float, help="per module, the smallest rank keeping this fraction of ‖T‖²_F, e.g. 0.99")
    how.add_argument("--max-error", type=float,
                     help="per module, the smallest rank with relative Frobenius error ‖T − BA‖/‖T‖ at most this")
    p.add_argument("--max-rank", type=int, help="cap on any module's rank (with --energy or --max-error)")
    p.add_argument("--include", metavar="REGEX", help="only tensors whose name matches (re.search); the rest are "
                   "reported as excluded")
    p.add_argument("--exclude", metavar="REGEX", help="leave out tensors whose name matches (reported as excluded)")
    p.add_argument("--skip-cast-artifacts", action="store_true",
                   help="leave out tensors whose change is only the base rounded to the fine-tuned dtype (listed, "
                        "and counted in the error)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the stored LoRA factors (default: fp32); the errors reported include their rounding")
    add_device_flag(p)
    p.add_argument("--json", action="store_true", help="print the fidelity record (JSON) instead of the summary")
    add_executor_flag(p, "one task per group of tensors of at most --task-bytes, each computing its SVDs", "1GiB")
    add_output_flags(p)


def add_convert_arguments(p):
    """Add the flags of `loratv convert`: ADAPTER, output, --to, --base and --adapter-name.

    Args:
        p: the parser (or subparser) to add them to.
    """
    p.add_argument("adapter", nargs="?", help="the LoRA to convert: a PEFT adapter folder, or a kohya / diffusers "
                   ".safetensors file (default: the embedded example's PEFT adapter, converted to kohya)")
    p.add_argument("-o", "--output", help="adapter folder to write (--to peft) or .safetensors file (--to kohya) "
                   "(default: converted_adapter.safetensors, or converted_adapter for --to peft)")
    p.add_argument("--to", choices=["peft", "kohya"], help="the format to write (required with ADAPTER; default with "
                   "no ADAPTER: kohya)")
    p.add_argument("--base", help="base model: maps kohya's flattened module names back (required for kohya files) "
                   "and checks every module's shape")
    add_adapter_name_flag(p)
    p.add_argument("--json", action="store_true", help="print the conversion record (JSON) instead of the summary")
    add_output_flags(p)


def build_parser() -> argparse.ArgumentParser:
    """Build the `loratv` parser: one subcommand per command, each with its cmd_* function as `func`.

    Returns:
        the argparse parser.
    """
    parser = argparse.ArgumentParser(
        prog="loratv",
        description="Merge LoRA adapters, extract task vectors, compare the two with a proven verdict, and inspect what "
                    "the weights contain (streaming, offline).",
    )
    parser.add_argument("--version", action="version", version=f"loratv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("merge", help="merge a LoRA adapter into a base model, one tensor at a time")
    add_merge_arguments(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("merge-models", help="merge several models of one architecture by a mergekit YAML recipe "
                       "(linear, task_arithmetic, ties, breadcrumbs(_ties), dare_*, della(_linear), slerp, nuslerp, model_stock), "
                       "streamed, one rounding")
    add_merge_models_arguments(p)
    p.set_defaults(func=cmd_merge_models)

    p = sub.add_parser("verify-merge", help="check a merged model (loratv's, mergekit's or anyone's) against its "
                       "mergekit recipe applied to the inputs (exit 0 equivalent, 1 not, 2 bad input)")
    p.add_argument("recipe", metavar="CONFIG", help="the mergekit YAML recipe the model claims to be")
    p.add_argument("merged", metavar="MERGED", help="the merged model (folder, file or hub id)")
    p.add_argument("-o", "--output", help="folder for verify_merge.json (default: write nothing)")
    p.add_argument("--json", action="store_true", help="print the record (JSON) instead of the summary")
    p.add_argument("--dtype-like-mergekit", action="store_true",
                   help="hold the model to the arithmetic mergekit uses without `dtype: float32` (the config's "
                        "dtype, else the inputs' own, e.g. bf16) instead of float32")
    add_output_flags(p)
    p.set_defaults(func=cmd_verify_merge)

    p = sub.add_parser("extract", help="extract the task vector (fine-tuned minus base), exact, rounded once to the storage dtype")
    add_extract_arguments(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("compare", help="compare an adapter with a task vector tensor by tensor and certify equivalence "
                       "(exit 0 equivalent, 1 not, 2 bad input)")
    add_compare_arguments(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("validate", help="merge, extract and compare in one go, and print the verdict "
                       "(exit 0 equivalent, 1 not, 2 bad input)")
    add_validate_arguments(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("precision", help="merge along the fp32, fp16, bf16 and cast-first paths, extract and compare "
                       "each, and tabulate what rounding does")
    add_base_and_adapter(p)
    p.add_argument("-o", "--output", default="precision_results", help="output folder (default: precision_results)")
    p.add_argument("--paths", nargs="+", default=None, metavar="PATH",
                   help="merge paths to run, of fp32 fp16 bf16 fp16-cast-first bf16-cast-first fp16-cast-all "
                        "bf16-cast-all (cast-first: PEFT on a model loaded in fp16/bf16, adapter kept in fp32; "
                        "cast-all: the same with autocast_adapter_dtype=False, adapter rounded too). Default: the "
                        "first five; for DoRA and non-LoRA tuners the first three")
    p.add_argument("--keep-merged", action="store_true", help="keep each path's merged model (deleted after extraction by default)")
    add_device_flag(p)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plot")
    p.add_argument("--json", action="store_true", help="print the precision record (JSON) instead of the table")
    add_output_flags(p)
    p.set_defaults(func=cmd_precision)

    p = sub.add_parser("analyze", help="distributions, residual in ulps, spectra and ranks of the LoRA delta and the "
                       "task vector, as a Markdown report, JSON and plots")
    add_analyze_arguments(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("to-lora", help="turn a task vector (or fine-tuned minus base) into a PEFT LoRA adapter by "
                       "truncated SVD, with the error stated per tensor")
    add_to_lora_arguments(p)
    p.set_defaults(func=cmd_to_lora)

    p = sub.add_parser("combine", help="write a weighted sum of LoRA adapters as one PEFT LoRA adapter, exact "
                       "(ranks concatenated) or recompressed by SVD with the error stated; no base needed")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER", help="PEFT LoRA adapters (folders or hub ids)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per adapter, negative ones subtract (default: all 1)")
    p.add_argument("-o", "--output", required=True, help="adapter folder to write")
    p.add_argument("--max-rank", type=int, help="recompress every module to at most this rank (QR + SVD of its "
                   "factors)")
    p.add_argument("--max-error", type=float, help="recompress every module to the fewest singular triplets whose "
                   "relative Frobenius error is at most this, in [0, 1)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16", "fp64"),
                   help="dtype of the written factors (default: the inputs' when they share one, else fp32)")
    p.add_argument("--json", action="store_true", help=f"print the record ({COMBINE_FIDELITY_FILE}) instead of the "
                   "summary")
    add_output_flags(p)
    p.set_defaults(func=cmd_combine)

    p = sub.add_parser("similarity", help="which of many LoRA adapters (and task vectors) on one base are alike, "
                       "duplicated or outliers: K×K cosines and subspace overlaps from the factors, clustered")
    p.add_argument("adapters", nargs="*", metavar="ADAPTER", help="PEFT LoRA adapters (folders or hub ids)")
    p.add_argument("--list", metavar="FILE", help="a text file naming one adapter per line (# comments allowed), "
                   "added after the ADAPTERs")
    p.add_argument("--base", help="base model: adapters are bound to it (shapes checked); needed with "
                   "--task-vectors")
    p.add_argument("--task-vectors", nargs="+", default=[], metavar="TV",
                   help="task vectors written by `loratv extract`, compared with the adapters")
    p.add_argument("-o", "--output", required=True, help=f"folder to write {SIMILARITY_FILE} and the plots into")
    p.add_argument("--duplicate-cosine", type=float, default=0.99,
                   help="list pairs whose global cosine is at least this as near-duplicates (default 0.99)")
    p.add_argument("--sign-conflicts", action="store_true",
                   help="also compute, on each tensor's top-k support, the pairwise sign-conflict rates and TIES's "
                        "sign-agreement ratio (dense: every input's rows materialised a block at a time)")
    p.add_argument("--density", type=float, default=0.2,
                   help="with --sign-conflicts: the fraction of each tensor in an input's support (default 0.2)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--json", action="store_true", help=f"print the record ({SIMILARITY_FILE}) instead of the summary")
    add_executor_flag(p, "one task per group of tensors of at most --task-bytes of factors, returning partial sums "
                      "that are added in the local order", "256MiB")
    add_output_flags(p)
    p.set_defaults(func=cmd_similarity)

    p = sub.add_parser("convert", help="rewrite a LoRA as a PEFT adapter folder or a kohya .safetensors file, "
                       "factors copied bit for bit and every scale kept exactly")
    add_convert_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("summarize", help="summarize a task vector with no adapter: tensors and parameters changed and "
                       "stored, storage, norms per layer and module kind, sparsity, largest changes (--spectrum: ranks)")
    p.add_argument("task_vector", nargs="?", metavar="TASK_VECTOR",
                   help="task vector folder (or .safetensors file) written by `loratv extract` (default, with no "
                        "--finetuned: the embedded example's fp32 merge minus its base, computed)")
    p.add_argument("--base", help="base model: with TASK_VECTOR, adds relative changes ‖T‖/‖W‖, the model's totals "
                   "and the rounding floor of --spectrum; required with --finetuned")
    p.add_argument("--finetuned", help="fine-tuned model; the task vector is computed on the fly, streaming")
    p.add_argument("--spectrum", action="store_true", help="for each changed matrix: leading singular values, "
                   "numerical rank (threshold stated), stable and effective rank")
    p.add_argument("--top", type=int, default=10, help="how many of the largest changes to list (default: 10)")
    p.add_argument("-o", "--output", help="write OUT/task_vector_summary.json and .txt (default: write nothing)")
    p.add_argument("--json", action="store_true", help="print the summary record (JSON) instead of the text")
    add_output_flags(p)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("diff", help="compare a base and a fine-tuned model with no adapter: every tensor unchanged, "
                       "cast-artifact or changed, with max |Δ|, relative change and ulps")
    p.add_argument("--base", help="base model (default: the embedded example's base)")
    p.add_argument("--finetuned", help="fine-tuned model (default: the embedded example merged in fp16)")
    p.add_argument("--top", type=int, default=10, help="how many of the largest changes to list (default: 10)")
    p.add_argument("-o", "--output", help="write OUT/parameter_changes.json and .txt (default: write nothing)")
    p.add_argument("--json", action="store_true", help="print the record (JSON) instead of the text")
    add_output_flags(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("inspect", help="describe a model or adapter from its headers alone (or a model from its "
                       "config.json alone)")
    p.add_argument("path", nargs="?", help="model folder/file, hub id, adapter folder, or a config.json (or a folder "
                   "holding only config.json: shapes computed from the configuration) (default: the embedded example)")
    p.add_argument("--base", help="for an adapter: the base model, to count the tensors it touches")
    add_adapter_name_flag(p)
    p.add_argument("--config-only", action="store_true", help="read only the model's config.json and compute every "
                   "saved tensor's name, shape and dtype from it (any architecture transformers knows, built on the "
                   "meta device; without the loratv[transformers] extra: starcoder2, llama, mistral, qwen2, gpt2); "
                   "a hub id fetches config.json alone")
    p.add_argument("--lora-targets", type=_comma_list, metavar="M1,M2,...",
                   help="for a model: what a LoRA on these modules would touch and store (default with --lora-rank: "
                        "q_proj,k_proj,v_proj,o_proj, or PEFT's defaults for a model type outside the five "
                        "hand-written families; 'all-linear' for every linear weight but embeddings and head)")
    p.add_argument("--lora-rank", type=_comma_ints, metavar="R1,R2,...",
                   help="for a model: the LoRA ranks to count stored parameters for, r*(m+n) per module (default "
                        "with --lora-targets: 8)")
    p.add_argument("--keys", action="store_true", help="for an adapter: dump every stored key (shape, dtype, numel) "
                   "and per module its rank, alpha, applied scaling, orientation and (with --base) the base tensor")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("report", help="re-render OUT/report.html, the self-contained HTML page, from the JSON records "
                       "in an output folder of compare, validate, precision or analyze")
    p.add_argument("folder", help="the output folder (holds comparison_results.json, precision_results.json or "
                   "analysis_results.json)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("verify", help="re-check a folder written by merge or extract: every file against the sha256 "
                       "in its manifest, headers, index, every tensor finite (exit 0 sound, 1 problems, 2 bad input)")
    p.add_argument("folder", help="output folder of loratv merge or extract (holds loratv_manifest.json)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("structure", help="the architecture picture: a layers x module-kinds grid of the model's "
                       "tensors, each marked by whether the adapter targets it and the task vector changes it")
    p.add_argument("model", nargs="?", help="the base model: folder, .safetensors/.bin file or hub id (default, with "
                   "no other argument: the embedded example with its adapter and its fp32 merge)")
    p.add_argument("--adapter", help="PEFT (or kohya/diffusers) LoRA adapter: its targets, from the headers")
    add_adapter_name_flag(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--task-vector", help="task vector folder (or .safetensors file) written by `loratv extract`: "
                        "its changed tensors, from task_vector.json")
    source.add_argument("--finetuned", help="fine-tuned model: every tensor compared with the base, streamed")
    p.add_argument("-o", "--output", default="model_structure", help="output folder for model_structure.png, .html "
                   "and .json (default: model_structure)")
    p.add_argument("--json", action="store_true", help="print the structure record (JSON) instead of the summary")
    add_output_flags(p)
    p.set_defaults(func=cmd_structure)

    p = sub.add_parser("example", help="write the embedded StarCoder2 miniature and its LoRA adapter")
    p.add_argument("-o", "--output", required=True, help="folder to create (holds base/ and adapter/)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_example)
    return parser


def load_yaml_defaults(parser: argparse.ArgumentParser, config_path: str, aliases: dict | None = None) -> None:
    """Make the keys of a YAML file the parser's defaults; explicit flags still win.

    Args:
        parser: the (sub)command's parser whose defaults are set.
        config_path: the YAML file, whose keys are the parser's flag names.
        aliases: file key -> argparse dest, for keys that are not the dest (default: none).
    """

    parser.set_defaults(**read_flag_file(config_path, parser, aliases or {}))


def cmd_merge(args) -> int:
    """Run `loratv merge`: merge the adapter into the base (default: the embedded example) and print the summary.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the merged model is written; 2 on bad input, via run_guarded).
    """

    base, adapter = _example_pair(args.base, args.adapter, "adapter", example_paths)
    out = args.output or f"merged_model_{args.precision}"
    result = merge(base, adapter, out, precision=args.precision, compute_dtype=args.compute_dtype, device=args.device,
                   max_shard_size=args.max_shard_size, cast_base_first=getattr(args, "cast_base_first", False),
                   autocast_adapter_dtype=not getattr(args, "no_autocast_adapter_dtype", False),
                   peft_arithmetic=getattr(args, "peft_arithmetic", False), force=args.force, progress=not args.quiet,
                   executor=getattr(args, "executor", "local"))
    if not args.quiet:
        for note in result.notes:
            print(f"note: {note}")
        print(result.summary())
    return 0


def cmd_merge_models(args) -> int:
    """Run `loratv merge-models`: merge the recipe's models and print what was written.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the merged model is written; 2 on bad input, via run_guarded).
    """
    result = merge_models(args.recipe, args.output, compute_dtype=args.compute_dtype, device=args.device,
                          max_shard_size=args.max_shard_size, seed=args.seed,
                          dtype_like_mergekit=args.dtype_like_mergekit, force=args.force, progress=not args.quiet,
                          executor=args.executor)
    if not args.quiet:
        print(result.summary())
    return 0


def cmd_verify_merge(args) -> int:
    """Run `loratv verify-merge`: recompute the recipe and check the merged model against it.

    Args:
        args: the parsed command line.

    Returns:
        0 equivalent (or consistent), 1 not equivalent (2 on bad input, via run_guarded).
    """
    record = verify_merge(args.recipe, args.merged, args.output, dtype_like_mergekit=args.dtype_like_mergekit,
                          force=args.force)
    if args.json:
        print(dump_json(record), end="")
    elif not args.quiet:
        print(render_verify_merge(record), end="")
    return 1 if record["summary"]["verdict"] == "NOT EQUIVALENT" else 0


def _executor_options(args) -> dict:
    """--executor and --task-bytes as keyword arguments (a default --task-bytes left to the command)."""
    options = {"executor": getattr(args, "executor", "local")}
    if getattr(args, "task_bytes", None) is not None:
        options["task_bytes"] = args.task_bytes
    return options


def cmd_extract(args) -> int:
    """Run `loratv extract`: write the task vector (fine-tuned minus base) and print its summary.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the task vector is written; 2 on bad input, via run_guarded).
    """

    base, finetuned = _base_and_finetuned(args, "extract", "fp32")
    result = extract(base, finetuned, args.output, dense=args.dense, storage_dtype=args.storage_dtype,
                     force=args.force, progress=not args.quiet, **_executor_options(args))
    if not args.quiet:
        print(result.summary())
        print(f"wrote {os.path.join(args.output, 'task_vector.safetensors')} and {os.path.join(args.output, 'task_vector.json')}")
    return 0


def _command_line() -> str:
    """The command as typed: `loratv …`, or `python SCRIPT.py …` for the seed-compatible scripts."""

    program = os.path.basename(sys.argv[0])
    head = f"python {program}" if program in SEED_SCRIPTS else "loratv"
    return f"{head} {shlex.join(sys.argv[1:])}"


def _folder(path) -> str:
    """A folder as printed: its name with one trailing slash, however it was typed."""
    return str(path).rstrip("/") + "/"


def _verdict_exit(record) -> int:
    return 0 if record["summary"]["verdict"] != "NOT EQUIVALENT" else 1


def cmd_compare(args) -> int:
    """Run `loratv compare`: compare the adapter's ΔW with the task vector, write the results and print the verdict.

    With no model argument, the embedded example's adapter is compared with its fp32 merge (computed on the fly).

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 when the verdict is not NOT EQUIVALENT, 1 when it is; 2 on bad input, via run_guarded).

    Raises:
        LoratvError: some model arguments are given but not all of --base, --adapter and --task-vector or --finetuned.
    """

    if args.base is None and args.adapter is None and args.task_vector is None and args.finetuned is None:
        paths = example_paths()
        base, adapter, task_vector, finetuned = paths["base"], paths["adapter"], None, example_merged("fp32")
    elif args.base is None or args.adapter is None or (args.task_vector is None and args.finetuned is None):
        raise LoratvError("compare needs --base, --adapter and one of --task-vector or --finetuned (or none, for the embedded example).")
    else:
        base, adapter, task_vector, finetuned = args.base, args.adapter, args.task_vector, args.finetuned
    inputs = [base, adapter, task_vector, finetuned]
    with atomic_output_dir(args.output, guarded_inputs(inputs), force=args.force) as tmp:
        record = compare(base, adapter, task_vector=task_vector, finetuned=finetuned, tolerance=args.tolerance,
                         device=args.device, deltas_path=tmp / DELTAS_FILE, progress=not args.quiet and not args.json,
                         command=_command_line(), **_executor_options(args))
        write_comparison_files(record, tmp, plots=not args.no_plots)
    _print_record(args, record, f"wrote {_folder(args.output)}")
    return _verdict_exit(record)


def _print_record(args, record, footer):

    if args.json:
        sys.stdout.write(dump_json(record))
    elif not args.quiet:
        print(render_seed_summary(record), end="")
        print(footer)


def cmd_validate(args) -> int:
    """Run `loratv validate`: merge, extract and compare in one go, and print the verdict (or the JSON record).

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 when the verdict is not NOT EQUIVALENT, 1 when it is; 2 on bad input, via run_guarded).
    """

    base, adapter = _example_pair(args.base, args.adapter, "adapter", example_paths)
    record = validate(base, adapter, args.output, precision=args.precision, tolerance=args.tolerance,
                      device=args.device, plots=not args.no_plots, force=args.force,
                      progress=not args.quiet and not args.json, command=_command_line())
    _print_record(args, record, f"wrote {_folder(args.output)} (merged model, task vector, comparison report and plots)")
    return _verdict_exit(record)


def cmd_precision(args) -> int:
    """Run `loratv precision`: merge along each precision path, extract and compare, and print the table.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the study is written; 2 on bad input, via run_guarded).

    Raises:
        LoratvError: --paths names a merge path that is not one of PATHS.
    """

    base, adapter = _example_pair(args.base, args.adapter, "adapter", example_paths)
    unknown = [p for p in args.paths or [] if p not in PATHS]
    if unknown:
        raise LoratvError(f"--paths {unknown[0]}: choose from {', '.join(PATHS)}.")
    study = precision_study(base, adapter, args.output, paths=args.paths, keep_merged=args.keep_merged, device=args.device,
                            plots=not args.no_plots, force=args.force, progress=not args.quiet and not args.json,
                            command=_command_line())
    if args.json:
        sys.stdout.write(dump_json(study))
    elif not args.quiet:
        print(render_precision_text(study), end="")
        print(f"wrote {_folder(args.output)}")
    return 0


def cmd_analyze(args) -> int:
    """Run `loratv analyze`: write the analysis of the LoRA delta and the task vector, and print its summary.

    With no model argument, the embedded example's base, adapter and fp32 merge are used (set on `args`).

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the analysis is written; 2 on bad input, via run_guarded).
    """

    given = [args.base, args.adapter, args.lora_deltas, args.task_vector, args.finetuned]
    if all(x is None for x in given):
        paths = example_paths()
        args.base, args.adapter, args.finetuned = paths["base"], paths["adapter"], example_merged("fp32")
    record = run_analysis(args.output, base=args.base, adapter=args.adapter, lora_deltas=args.lora_deltas,
                          task_vector=args.task_vector, finetuned=args.finetuned, spectrum=args.spectrum,
                          exact_svd=args.exact_svd, device=args.device, plots=not args.no_plots, force=args.force,
                          progress=not args.quiet and not args.json, command=_command_line())
    if args.json:
        sys.stdout.write(dump_json(record))
    elif not args.quiet:
        print(render_analysis_summary(record, verbose=args.verbose), end="")
        print(f"wrote {_folder(args.output)} (analysis_report.md, analysis_results.json" + ("" if args.no_plots else ", plots") + ")")
    return 0


def cmd_to_lora(args) -> int:
    """Run `loratv to-lora`: turn the task vector into a PEFT LoRA adapter and print its fidelity summary.

    With no model argument, the embedded example's base and fp32 merge are used (set on `args`).

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the adapter is written; 2 on bad input, via run_guarded).

    Raises:
        LoratvError: --base is given without --finetuned or --task-vector.
    """

    if args.base is None and args.finetuned is None and args.task_vector is None:  # the README's promise: the example

        args.base, args.finetuned = example_paths()["base"], example_merged("fp32")
    elif args.finetuned is None and args.task_vector is None:
        raise LoratvError("to-lora needs --finetuned or --task-vector (or no model argument, for the embedded example).")
    criterion = Criterion(rank=args.rank, energy=args.energy, max_error=args.max_error, max_rank=args.max_rank)
    record = to_lora(args.output, base=args.base, finetuned=args.finetuned, task_vector=args.task_vector,
                     criterion=criterion, include=args.include, exclude=args.exclude,
                     skip_cast_artifacts=args.skip_cast_artifacts, dtype=args.dtype,
                     device=args.device, force=args.force, progress=not args.quiet and not args.json,
                     command=_command_line(), **_executor_options(args))
    if args.json:
        sys.stdout.write(dump_json(record))
    elif not args.quiet:
        print(render_to_lora_text(record), end="")
        print(f"wrote {_folder(args.output)} (PEFT adapter and {FIDELITY_FILE})")
    return 0


def cmd_combine(args) -> int:
    """Run `loratv combine`: write the weighted sum of the adapters and print its summary.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the adapter is written; 2 on bad input, via run_guarded).
    """
    record = combine(args.adapters, args.output, weights=args.weights,
                     recompression=Recompression(max_rank=args.max_rank, max_error=args.max_error), dtype=args.dtype,
                     force=args.force, progress=not args.quiet and not args.json, command=_command_line())
    if args.json:
        sys.stdout.write(dump_json(record))
    elif not args.quiet:
        print(combine_summary(record, args.output))
        print(f"wrote {_folder(args.output)} (PEFT adapter and {COMBINE_FIDELITY_FILE})")
    return 0


def cmd_similarity(args) -> int:
    """Run `loratv similarity`: compare the adapters (and task vectors) and print the summary.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the record is written; 2 on bad input, via run_guarded).
    """
    adapters = list(args.adapters) + (read_list(args.list) if args.list else [])
    record = similarity(adapters, args.output, task_vectors=args.task_vectors, base=args.base,
                        duplicate_cosine=args.duplicate_cosine, sign_conflicts=args.sign_conflicts,
                        density=args.density, plots=not args.no_plots, force=args.force,
                        progress=not args.quiet and not args.json, command=_command_line(),
                        **_executor_options(args))
    if args.json:
        sys.stdout.write(dump_json(record))
    elif not args.quiet:
        print(similarity_summary(record, args.output))
        print(f"wrote {_folder(args.output)} ({SIMILARITY_FILE}" + ("" if args.no_plots else ", plots") + ")")
    return 0


def cmd_convert(args) -> int:
    """Run `loratv convert`: rewrite the LoRA as a PEFT folder or a kohya file and print what was written.

    With no ADAPTER, the embedded example's PEFT adapter is converted (to kohya unless --to says otherwise); the
    output defaults to converted_adapter(.safetensors). Both are set on `args`.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the converted adapter is written; 2 on bad input, via run_guarded).

    Raises:
        LoratvError: ADAPTER is given without --to.
    """

    if args.adapter is None:  # the README's promise: no model argument converts the example's PEFT adapter

        args.adapter, args.to = example_paths()["adapter"], args.to or "kohya"
    elif args.to is None:
        raise LoratvError("convert ADAPTER needs --to peft or --to kohya.")
    if args.output is None:
        args.output = "converted_adapter" + (".safetensors" if args.to == "kohya" else "")
    record = convert(args.adapter, args.output, to=args.to, base=args.base, force=args.force)
    if args.json:
        sys.stdout.write(dump_json(record))
    elif not args.quiet:
        ranks = ", ".join(f"r={r} x{n}" for r, n in record["ranks"].items())
        print(f"wrote {args.output} ({args.to}): {record['modules']} LoRA modules of {record['source']} "
              f"({record['source_format']}; {ranks}), factors copied bit for bit, every scale unchanged")
    return 0


def _comma_list(text: str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give at least one name")
    return items


def _comma_ints(text: str) -> list:
    try:
        values = [int(t) for t in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"ranks must be positive: {text!r}")
    return values


def cmd_inspect(args) -> int:
    """Run `loratv inspect`: describe a model or adapter from its headers and print text or JSON.

    With no path, the embedded example's base and adapter are described; with --keys, cmd_inspect_keys runs instead.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once printed; 2 on bad input, via run_guarded).
    """

    if getattr(args, "keys", False):
        return cmd_inspect_keys(args)
    lora = dict(lora_targets=args.lora_targets, lora_ranks=args.lora_rank)
    if args.path is None:
        paths = example_paths()
        reports = [describe(paths["base"], config_only=args.config_only, **lora),
                   describe(paths["adapter"], base=paths["base"])]
    else:
        reports = [describe(args.path, base=args.base, config_only=args.config_only, **lora)]
    if args.json:
        sys.stdout.write(dump_json(reports if len(reports) > 1 else reports[0]))
    else:
        print("\n\n".join(render_text(r) for r in reports))
    return 0


def cmd_structure(args) -> int:
    """Run `loratv structure`: write the layers × module-kinds picture of the model and print its summary.

    With no argument at all, the embedded example's base, adapter and fp32 merge are used.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the picture is written; 2 on bad input, via run_guarded).

    Raises:
        LoratvError: --adapter, --task-vector or --finetuned is given without MODEL.
    """

    model, adapter, task_vector, finetuned = args.model, args.adapter, args.task_vector, args.finetuned
    if all(x is None for x in (model, adapter, task_vector, finetuned)):
        paths = example_paths()
        model, adapter, finetuned = paths["base"], paths["adapter"], example_merged("fp32")
    elif model is None:
        raise LoratvError("structure needs the MODEL (or no arguments at all, for the embedded example).")
    record = write_structure(args.output, model, adapter=adapter, task_vector=task_vector, finetuned=finetuned,
                             force=args.force, progress=not args.quiet and not args.json)
    if args.json:
        sys.stdout.write(dump_json(record))
    elif not args.quiet:
        print(render_summary(record))
        print(f"wrote {_folder(args.output)} (model_structure.png, model_structure.html, model_structure.json)")
    return 0


def cmd_inspect_keys(args) -> int:
    """Run `loratv inspect --keys`: dump every stored key of an adapter, and per module its rank and scaling.

    With no path, the embedded example's adapter is dumped, with its base unless --base is given.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once printed; 2 on bad input, via run_guarded).

    Raises:
        LoratvError: --keys is combined with --config-only, --lora-targets or --lora-rank.
    """

    if args.config_only or args.lora_targets is not None or args.lora_rank is not None:
        raise LoratvError("--keys dumps an adapter's stored keys; it does not combine with --config-only, "
                          "--lora-targets or --lora-rank.")
    path, base = args.path, args.base
    if path is None:
        paths = example_paths()
        path, base = paths["adapter"], base or paths["base"]
    report = describe_adapter_keys(path, base)
    if args.json:
        sys.stdout.write(dump_json(report))
    else:
        print(render_keys_text(report))
    return 0


def cmd_summarize(args) -> int:
    """Run `loratv summarize`: summarise a task vector (also written with -o) and print text or JSON.

    With no model argument, the embedded example's fp32 merge minus its base is summarised.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once printed and written; 2 on bad input, via run_guarded).
    """

    base, task_vector, finetuned = args.base, args.task_vector, args.finetuned
    if base is None and task_vector is None and finetuned is None:
        base, finetuned = example_paths()["base"], example_merged("fp32")
    kwargs = dict(task_vector=task_vector, base=base, finetuned=finetuned, spectrum=args.spectrum, top=args.top,
                  command=_command_line())
    if args.output:
        record = write_summary(args.output, force=args.force, **kwargs)
    else:
        record = summarize_task_vector(**kwargs)
    if args.json:
        sys.stdout.write(dump_json(record))
    elif not args.quiet:
        print(render_summary_text(record), end="")
        if args.output:
            print(f"wrote {os.path.join(args.output, SUMMARY_RESULTS_FILE)} and the text report beside it")
    return 0


def cmd_diff(args) -> int:
    """Run `loratv diff`: compare a base and a fine-tuned model tensor by tensor and print text or JSON.

    With neither model, the embedded example's base and its fp16 merge are compared; -o also writes the record.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once printed and written; 2 on bad input, via run_guarded).
    """

    base, finetuned = _base_and_finetuned(args, "diff", "fp16")
    if args.output:
        record = write_diff(args.output, base, finetuned, force=args.force, top=args.top, command=_command_line())
    else:
        record = diff_models(base, finetuned, top=args.top, command=_command_line())
    if args.json:
        sys.stdout.write(dump_json(record))
    elif not args.quiet:
        print(render_diff_text(record), end="")
        if args.output:
            print(f"wrote {os.path.join(args.output, DIFF_RESULTS_FILE)} and the text report beside it")
    return 0


def cmd_report(args) -> int:
    """Run `loratv report`: re-render report.html in an output folder from its JSON records.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once the page is written; 2 on bad input, via run_guarded).
    """

    path = write_report(args.folder)
    if not args.quiet:
        print(f"wrote {path}")
    return 0


def cmd_verify(args) -> int:
    """Run `loratv verify`: re-check a merge or extract output folder against its manifest and print the result.

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 when the folder is sound, 1 when problems are found; 2 on bad input, via run_guarded).
    """

    report = verify(args.folder)
    if args.json:
        sys.stdout.write(dump_json(report.record()))
    else:
        sys.stdout.write(render(report))
    return 0 if report.ok else 1


def cmd_example(args) -> int:
    """Run `loratv example`: write the embedded StarCoder2 miniature (base/) and its LoRA adapter (adapter/).

    Args:
        args: the parsed command line.

    Returns:
        the exit code (0 once written; 2 on bad input, via run_guarded).
    """

    out = write_example(args.output, force=args.force)
    print(f"wrote {out}/base (StarCoder2 miniature, 483 tensors) and {out}/adapter (LoRA r=8 on q/k/v/o)")
    return 0


def _base_and_finetuned(args, command: str, example_precision: str):
    """--base and --finetuned as given, or neither: the example's base and its merge at `example_precision`."""
    if args.base is None and args.finetuned is None:

        return example_paths()["base"], example_merged(example_precision)
    if args.base is None or args.finetuned is None:
        raise LoratvError(f"{command} needs both --base and --finetuned (or neither, for the embedded example).")
    return args.base, args.finetuned


def _example_pair(first, second, second_name, example_paths):
    if first is None and second is None:
        paths = example_paths()
        return paths["base"], paths[second_name]
    if first is None or second is None:
        raise LoratvError(f"give both --base and --{second_name} (or neither, for the embedded example).")
    return first, second


def parse_with_config(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse argv; when it names --config FILE.yml, the file's keys become the (sub)command's defaults and argv is
    parsed again, so flags given on the command line win.

    Args:
        parser: the parser to use (`loratv`'s, or a seed script's).
        argv: the arguments without the program name (None: sys.argv[1:]).

    Returns:
        the parsed command line.
    """
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        target = parser
        if getattr(args, "command", None):
            # the parser's one subcommands action (argparse has no public accessor for it)
            commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
            target = commands.choices[args.command]
        load_yaml_defaults(target, args.config)
        args = parser.parse_args(argv)
    return args


def run(argv, parser=None) -> int:
    """Parse, call, and turn every expected failure into one sentence on stderr and exit code 2.

    --adapter-name is resolved here, into the adapter folder it names (the inspected path for `inspect`).

    Args:
        argv: the arguments without the program name.
        parser: the parser to use (default: build_parser()).

    Returns:
        the command's exit code, or run_guarded's for a failure (2; 130 when interrupted).
    """
    parser = parser or build_parser()

    def parse_and_call():
        args = parse_with_config(parser, argv)
        if getattr(args, "adapter_name", None) is not None:
            field = "path" if args.command == "inspect" else "adapter"
            setattr(args, field, str(named_adapter(getattr(args, field), args.adapter_name)))
        return args.func(args)

    return run_guarded(parse_and_call)


def run_guarded(func, *args, **kwargs) -> int:
    """Call func; turn every expected failure into one `loratv: error:` sentence on stderr and exit code 2.

    Args:
        func: the callable to run.
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Returns:
        func's result; 2 after a LoratvError or OSError, 0 after a broken pipe (stdout is then /dev/null), 130 after
        Ctrl-C.
    """
    try:
        return func(*args, **kwargs)
    except LoratvError as exc:
        print(f"loratv: error: {one_line(cli_message(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as exc:
        where = exc.filename or "output"
        print(f"loratv: error: {one_line(f'{where}: {exc.strerror or exc}')}; nothing was written.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are complete or absent: atomic_output_dir removed the temporary one
        print("loratv: interrupted; no partial output was left.", file=sys.stderr)
        return 130




def main(argv=None) -> int:
    """`loratv`'s entry point: run the command line and return its exit code.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (see run).
    """
    return run(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
