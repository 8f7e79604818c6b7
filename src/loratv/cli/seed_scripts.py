"""The seed study's workflow scripts (repository root), kept working as written in its README.

`merge_lora.py`, `extract_task_vectors.py`, `compare_lora_task_vector.py`, `final_validation.py`,
`quick_precision_test.py` and `analyze_lora_vs_task_vector_math.py` parse the seed's flag names and hand a namespace
to the matching `loratv` command, so the two front ends share every code path. The seed's documented defaults hold,
with the embedded example standing in for what cannot be downloaded:

* `--base_model` (seed: bigcode/starcoder2-3b) is the embedded StarCoder2 miniature, with one line saying so and
  how to get the real model; `--lora_path` (seed: checkpoint-40000/) is `checkpoint-40000/` in the working folder
  (the repository ships the miniature's adapter there), else the same adapter from loratv's cache;
  `--device` (seed: cuda:0) is cuda:0 when a CUDA GPU is present and cpu otherwise, said in one line (a cuda
  device given on a machine without CUDA also falls back to cpu, where `loratv` refuses it).
* A previous output of the same script is replaced, as the seed did (its README writes merged_model_fp32 twice);
  any other existing folder is refused unless --force is given.
* Errors name the script's own flags (`--base_model`, not `loratv`'s `--base`).
* `merge_lora.py --precision` defaults to fp32, the choice that loses nothing (no record of the seed's survives).
"""

import argparse
import re
import sys
from pathlib import Path

import torch

from loratv.cli.app import (
    cmd_analyze,
    cmd_compare,
    cmd_extract,
    cmd_merge,
    cmd_validate,
    parse_with_config,
    run_guarded,
)
from loratv.errors import LoratvError, cli_message
from loratv.example.builder import example_merged, example_paths
from loratv.io.output_kinds import holds_output_of
from loratv.ops.compare import DEFAULT_TOLERANCE
from loratv.ops.precision_study import compare_task_vector_pair, render_pair_text
from loratv.report.records import dump_json

SEED_PRECISIONS = ("fp16", "fp32", "bf16")
SEED_DEFAULT_PRECISION = "fp32"
SEED_CHECKPOINT = "checkpoint-40000"
REAL_BASE_MODEL = "bigcode/starcoder2-3b"
SEED_DEVICE = "cuda:0"

# `loratv` flag → the seed scripts' name for it, for messages raised by the shared code
SEED_FLAG_NAMES = {
    "--base": "--base_model",
    "--adapter": "--lora_path",
    "--finetuned": "--finetuned_model",
    "--task-vector": "--task_vector_path",
    "--output": "--output_dir",
    "--storage-dtype": "--storage_dtype",
    "--lora-deltas": "--lora_file",
    "--no-plots": "--no_plots",
}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]*(?![\w-])")


def say(message: str, quiet: bool) -> None:
    """One informational line on stdout, before the command's own output (stderr is kept for the one-line error).

    Args:
        message: the line to print.
        quiet: print nothing.
    """
    if not quiet:
        print(message, flush=True)


def seed_flag_message(message: str, flags: dict | None = None) -> str:
    """A message from the shared code with `loratv`'s flag names replaced by the seed scripts' ones.

    Args:
        message: the error sentence.
        flags: the mapping to apply (default SEED_FLAG_NAMES).

    Returns:
        The sentence as the script's user must read it.
    """
    names = SEED_FLAG_NAMES if flags is None else flags
    return FLAG.sub(lambda m: names.get(m.group(0), m.group(0)), message)


def run_seed(func, argv) -> int:
    """run_guarded(func, argv), with every error sentence in the seed scripts' flag names.

    Args:
        func: the script's body, called with argv.
        argv: the arguments without the program name.

    Returns:
        the exit code: func's own, or run_guarded's for a failure (2; 0 on a broken pipe, 130 when interrupted).

    Raises:
        LoratvError: only inside the guarded call, where func's LoratvError is raised again with the seed's flag
            names; run_guarded turns it into exit code 2, so none leaves run_seed.
    """
    def translated():
        try:
            return func(argv)
        except LoratvError as exc:
            raise LoratvError(seed_flag_message(cli_message(exc))) from None

    return run_guarded(translated)


def default_base(base_model: str | None, quiet: bool) -> str:
    """The seed's --base_model default: the embedded miniature, said in one line (the real one needs a download).

    Args:
        base_model: the value given, or None.
        quiet: print nothing.

    Returns:
        The base model to use.
    """
    if base_model is not None:
        return base_model

    base = example_paths()["base"]
    say(f"base model: the embedded StarCoder2 miniature ({base}); --base_model {REAL_BASE_MODEL} downloads the "
        "real one", quiet)
    return str(base)


def default_adapter(lora_path: str | None, quiet: bool) -> str:
    """The seed's --lora_path default: checkpoint-40000/ in the working folder, else the same adapter from the cache.

    Args:
        lora_path: the value given, or None.
        quiet: print nothing.

    Returns:
        The adapter folder to use.
    """
    if lora_path is not None:
        return lora_path
    if Path(SEED_CHECKPOINT).is_dir():
        say(f"LoRA adapter: {SEED_CHECKPOINT}/ (the default --lora_path)", quiet)
        return f"{SEED_CHECKPOINT}/"

    adapter = example_paths()["adapter"]
    say(f"LoRA adapter: the embedded example's ({adapter}), as no {SEED_CHECKPOINT}/ is in this folder", quiet)
    return str(adapter)


def default_device(device: str | None, quiet: bool) -> str:
    """The seed's --device default, cuda:0, where a CUDA GPU is present; cpu otherwise. Said in one line; a cuda
    device asked for on a machine without CUDA falls back to cpu, also said.

    Args:
        device: the value given, or None.
        quiet: print nothing.

    Returns:
        The device name to use.
    """

    if device is not None:
        # the seed's README passes --device cuda:0 everywhere; on a machine without CUDA it must still run as written
        if device.startswith("cuda") and not torch.cuda.is_available():
            say(f"device: cpu (--device {device} asks for a CUDA GPU and this machine has none)", quiet)
            return "cpu"
        return device
    if torch.cuda.is_available():
        say(f"device: {SEED_DEVICE} (the default --device; a CUDA GPU is present)", quiet)
        return SEED_DEVICE
    say(f"device: cpu (no CUDA GPU on this machine; the seed's default --device {SEED_DEVICE} needs one)", quiet)
    return "cpu"


def replace_previous(out: str, kind: str, force: bool, quiet: bool) -> bool:
    """--force, or True when `out` holds this script's previous output (which the seed's scripts overwrote).

    Args:
        out: the output folder.
        kind: the kind of output this script writes (as holds_output_of names it).
        force: whether --force was given.
        quiet: print nothing (a replaced previous output is otherwise said in one line).

    Returns:
        whether `out` may be replaced: the `force` to hand to the command.
    """
    if force:
        return True
    if holds_output_of(out, kind):
        say(f"replacing the previous {kind} output in {out}", quiet)
        return True
    return False


def add_seed_device_flag(p: argparse.ArgumentParser) -> None:
    """Add --device with the seed's default left open (None: cuda:0 with a CUDA GPU, else cpu; see default_device).

    Args:
        p: the script's parser.
    """
    p.add_argument("--device", default=None, help=f"where deltas are computed: cpu, cuda or cuda:N (default: "
                   f"{SEED_DEVICE} when a CUDA GPU is present, else cpu)")


def add_seed_models(p: argparse.ArgumentParser) -> None:
    """Add --base_model and --lora_path, the seed's names for the base model and the adapter.

    Args:
        p: the script's parser.
    """
    p.add_argument("--base_model", help="base model: folder, .safetensors/.bin file or hub id org/name[@revision] "
                   f"(default: the embedded StarCoder2 miniature; --base_model {REAL_BASE_MODEL} downloads the real one)")
    p.add_argument("--lora_path", help=f"PEFT LoRA adapter folder (default: {SEED_CHECKPOINT}/ in the working folder, "
                   "else the embedded example's adapter, which is the same)")


def add_seed_output_flags(p: argparse.ArgumentParser, progress_bar: bool = True) -> None:
    """Add --force (replace any existing output folder) and --quiet (print nothing but errors).

    Args:
        p: the script's parser.
        progress_bar: whether the script shows a progress bar (--quiet's help then says it hides it).
    """
    p.add_argument("--force", action="store_true", help="replace an existing output folder (a previous output of "
                   "this script is replaced without it)")
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors" + ("; no progress bar" if progress_bar else ""))


# ---- merge_lora.py ------------------------------------------------------------------------------------------


def merge_lora_parser() -> argparse.ArgumentParser:
    """The parser of merge_lora.py: `loratv merge` with the seed's flag names.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(
        prog="merge_lora.py",
        description="Merge a PEFT LoRA adapter into its base model (alias of `loratv merge`, with the seed's flag names).",
    )
    add_seed_models(p)
    p.add_argument("--output_dir", default="merged_model", help="output model folder (default: merged_model)")
    p.add_argument("--precision", default=SEED_DEFAULT_PRECISION, choices=SEED_PRECISIONS,
                   help=f"dtype of the merged floating-point tensors; the sum is computed in fp32 and rounded once "
                        f"(default: {SEED_DEFAULT_PRECISION})")
    add_seed_device_flag(p)
    add_seed_output_flags(p)
    return p


def _merge(argv) -> int:
    a = merge_lora_parser().parse_args(argv)
    base, adapter = default_base(a.base_model, a.quiet), default_adapter(a.lora_path, a.quiet)
    return cmd_merge(argparse.Namespace(
        base=base, adapter=adapter, output=a.output_dir, precision=a.precision, compute_dtype="fp32",
        device=default_device(a.device, a.quiet), max_shard_size=None,
        force=replace_previous(a.output_dir, "merge", a.force, a.quiet), quiet=a.quiet,
    ))


def merge_lora_main(argv=None) -> int:
    """merge_lora.py's entry point: merge the adapter into the base as `loratv merge` does.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 once the merged model is written; 2 on bad input).
    """
    return run_seed(_merge, sys.argv[1:] if argv is None else argv)


# ---- extract_task_vectors.py --------------------------------------------------------------------------------


def extract_task_vectors_parser() -> argparse.ArgumentParser:
    """The parser of extract_task_vectors.py: `loratv extract` with the seed's flag names.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(
        prog="extract_task_vectors.py",
        description="Extract the task vector, fine-tuned minus base (alias of `loratv extract`, with the seed's flag names).",
    )
    p.add_argument("--base_model", help="base model: folder, .safetensors/.bin file or hub id (default: the embedded "
                   f"StarCoder2 miniature; --base_model {REAL_BASE_MODEL} downloads the real one)")
    p.add_argument("--finetuned_model", help="fine-tuned model, e.g. merged_model_fp32/ from merge_lora.py (default: "
                   "the embedded example merged in fp32)")
    p.add_argument("--output_dir", default="task_vectors", help="output folder (default: task_vectors)")
    p.add_argument("--device", default="cpu",
                   help="accepted for compatibility and unused: extraction streams tensors and subtracts exactly on the CPU")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="accepted for compatibility and unnecessary: loratv reads weights only and never runs model code")
    p.add_argument("--dense", action="store_true", help="store every tensor, changed or not (as the seed did)")
    p.add_argument("--storage_dtype", default="auto", choices=["auto", "fp32", "fp64"],
                   help="dtype of the stored differences, each the exact difference rounded once: auto = float32 "
                        "(float64 if an input is float64); fp64 stores every difference of 16- or 32-bit models exactly")
    p.add_argument("--config", help="YAML file whose keys are these flag names (e.g. base_model, finetuned_model, "
                   "output_dir); flags given on the command line win")
    add_seed_output_flags(p)
    return p


def _extract(argv) -> int:
    a = parse_with_config(extract_task_vectors_parser(), argv)
    finetuned = a.finetuned_model
    if finetuned is None:
        if a.base_model is not None:
            raise LoratvError("give --finetuned_model too: the fine-tuned model to subtract the base from "
                              "(e.g. merged_model_fp32/ from merge_lora.py).")

        finetuned = str(example_merged("fp32"))
        say(f"fine-tuned model: the embedded example merged in fp32 ({finetuned})", a.quiet)
    return cmd_extract(argparse.Namespace(
        base=default_base(a.base_model, a.quiet), finetuned=finetuned, output=a.output_dir, dense=a.dense,
        storage_dtype=a.storage_dtype, force=replace_previous(a.output_dir, "extract", a.force, a.quiet),
        quiet=a.quiet,
    ))


def extract_task_vectors_main(argv=None) -> int:
    """extract_task_vectors.py's entry point: write the task vector as `loratv extract` does.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 once the task vector is written; 2 on bad input).
    """
    return run_seed(_extract, sys.argv[1:] if argv is None else argv)


# ---- compare_lora_task_vector.py ----------------------------------------------------------------------------


def compare_parser() -> argparse.ArgumentParser:
    """The parser of compare_lora_task_vector.py: `loratv compare` with the seed's flag names.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(
        prog="compare_lora_task_vector.py",
        description="Compare a LoRA adapter with a task vector and certify equivalence (alias of `loratv compare`, "
                    "with the seed's flag names). Exit 0 equivalent, 1 not, 2 bad input.",
    )
    add_seed_models(p)
    p.add_argument("--task_vector_path", help="task vector folder or .safetensors file written by "
                   "extract_task_vectors.py (default, with no model argument: the embedded example's fp32 merge, "
                   "compared on the fly)")
    p.add_argument("--output_dir", default="comparison_results", help="output folder (default: comparison_results)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="absolute per-element tolerance, the fallback verdict when the rounding certificate fails "
                        f"(default: {DEFAULT_TOLERANCE:g})")
    add_seed_device_flag(p)
    p.add_argument("--generate_plots", action="store_true",
                   help="accepted for compatibility: the four PNG plots and report.html are written by default")
    p.add_argument("--architecture_analysis", action="store_true",
                   help="accepted for compatibility: model_architecture_coverage.png is one of the default plots")
    p.add_argument("--detailed_report", action="store_true",
                   help="accepted for compatibility: detailed_comparison_report.txt is always written")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    add_seed_output_flags(p)
    return p


def _compare(argv) -> int:
    a = compare_parser().parse_args(argv)
    if a.no_plots and (a.generate_plots or a.architecture_analysis):
        raise LoratvError("--no_plots contradicts --generate_plots/--architecture_analysis; give one or the other.")
    finetuned = None
    if a.task_vector_path is None:
        if a.base_model is not None or a.lora_path is not None:
            raise LoratvError("give --task_vector_path too: the task vector written by extract_task_vectors.py "
                              "(e.g. task_vectors_fp32/).")

        finetuned = str(example_merged("fp32"))
        say(f"task vector: the embedded example's fp32 merge minus its base, on the fly ({finetuned})", a.quiet)
    return cmd_compare(argparse.Namespace(
        base=default_base(a.base_model, a.quiet), adapter=default_adapter(a.lora_path, a.quiet),
        task_vector=a.task_vector_path, finetuned=finetuned, output=a.output_dir, tolerance=a.tolerance,
        device=default_device(a.device, a.quiet), no_plots=a.no_plots, json=False,
        force=replace_previous(a.output_dir, "comparison", a.force, a.quiet), quiet=a.quiet,
    ))


def compare_main(argv=None) -> int:
    """compare_lora_task_vector.py's entry point: compare and certify as `loratv compare` does.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 equivalent, 1 not, 2 on bad input).
    """
    return run_seed(_compare, sys.argv[1:] if argv is None else argv)


# ---- final_validation.py ------------------------------------------------------------------------------------


def final_validation_parser() -> argparse.ArgumentParser:
    """The parser of final_validation.py: `loratv validate` with the seed's flag names.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(
        prog="final_validation.py",
        description="Merge, extract and compare, then print the verdict (alias of `loratv validate`); with no "
                    "arguments it validates the embedded example. Exit 0 equivalent, 1 not, 2 bad input.",
    )
    add_seed_models(p)
    p.add_argument("--output_dir", default="validation_results", help="output folder (default: validation_results)")
    p.add_argument("--precision", default="fp32", choices=SEED_PRECISIONS, help="dtype of the merged model (default: fp32)")
    add_seed_device_flag(p)
    add_seed_output_flags(p)
    return p


def _final_validation(argv) -> int:
    a = final_validation_parser().parse_args(argv)
    return cmd_validate(argparse.Namespace(
        base=default_base(a.base_model, a.quiet), adapter=default_adapter(a.lora_path, a.quiet), output=a.output_dir,
        precision=a.precision, tolerance=DEFAULT_TOLERANCE, device=default_device(a.device, a.quiet),
        no_plots=False, json=False, force=replace_previous(a.output_dir, "validation", a.force, a.quiet),
        quiet=a.quiet,
    ))


def final_validation_main(argv=None) -> int:
    """final_validation.py's entry point: merge, extract and compare as `loratv validate` does.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 equivalent, 1 not, 2 on bad input).
    """
    return run_seed(_final_validation, sys.argv[1:] if argv is None else argv)


# ---- quick_precision_test.py --------------------------------------------------------------------------------


def quick_precision_parser() -> argparse.ArgumentParser:
    """The parser of quick_precision_test.py: the fp16 and fp32 task vectors and the base model.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(
        prog="quick_precision_test.py",
        description="Compare an fp16 and an fp32 task vector of the same adapter: which tensors each changes, and "
                    "whether the difference is the fp16 rounding of the base (proved bit for bit when the base is known).",
    )
    p.add_argument("--fp16_dir", default="task_vectors_fp16/", help="task vector of the fp16 merge (default: task_vectors_fp16/)")
    p.add_argument("--fp32_dir", default="task_vectors_fp32/", help="task vector of the fp32 merge (default: task_vectors_fp32/)")
    p.add_argument("--base_model", help="the base model (default: the one recorded in the fp16 task_vector.json, if it exists)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _quick_precision(argv) -> int:

    a = quick_precision_parser().parse_args(argv)
    for folder, flag, precision in ((a.fp16_dir, "--fp16_dir", "fp16"), (a.fp32_dir, "--fp32_dir", "fp32")):
        if not Path(folder).exists():
            raise LoratvError(f"{folder}: no such task vector ({flag}); make it with `python merge_lora.py --precision "
                              f"{precision} --output_dir merged_model_{precision}` then `python extract_task_vectors.py "
                              f"--finetuned_model merged_model_{precision}/ --output_dir task_vectors_{precision}/`.")
    pair = compare_task_vector_pair(a.fp16_dir, a.fp32_dir, base=a.base_model)
    sys.stdout.write(dump_json(pair) if a.json else render_pair_text(pair, storage_flag="extract_task_vectors.py "
                                                                                    "--storage_dtype fp64"))
    return 0


def quick_precision_main(argv=None) -> int:
    """quick_precision_test.py's entry point: compare an fp16 and an fp32 task vector of the same adapter.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 once printed; 2 on bad input, e.g. a task vector folder that does not exist).
    """
    return run_seed(_quick_precision, sys.argv[1:] if argv is None else argv)


# ---- analyze_lora_vs_task_vector_math.py --------------------------------------------------------------------


def analyze_parser() -> argparse.ArgumentParser:
    """The parser of analyze_lora_vs_task_vector_math.py: `loratv analyze --spectrum` with the seed's flag names.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(
        prog="analyze_lora_vs_task_vector_math.py",
        description="Distributions, residual in ulps, spectra and ranks of the LoRA delta against the task vector "
                    "(alias of `loratv analyze --spectrum`, with the seed's flag names).",
    )
    p.add_argument("--lora_file", help="lora_deltas.safetensors (or its folder) written by compare_lora_task_vector.py "
                   "(default, with no file argument: the embedded example's adapter)")
    p.add_argument("--task_vector_file", help="task vector folder or task_vector.safetensors written by "
                   "extract_task_vectors.py (default, with no file argument: the embedded example's fp32 merge, on the fly)")
    p.add_argument("--base_model", help="base model, for ulps and the noise floor (default: the one the inputs record)")
    p.add_argument("--output_dir", default="analysis_results", help="output folder (default: analysis_results)")
    p.add_argument("--verbose", action="store_true", help="print one line per tensor")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    add_seed_device_flag(p)
    add_seed_output_flags(p)
    return p


def _analyze(argv) -> int:
    a = analyze_parser().parse_args(argv)
    if (a.lora_file is None) != (a.task_vector_file is None):
        raise LoratvError("give both --lora_file and --task_vector_file (or neither, for the embedded example).")
    return cmd_analyze(argparse.Namespace(
        base=a.base_model, adapter=None, lora_deltas=a.lora_file, task_vector=a.task_vector_file, finetuned=None,
        output=a.output_dir, spectrum=True, exact_svd=False, device=default_device(a.device, a.quiet),
        no_plots=a.no_plots, json=False, verbose=a.verbose,
        force=replace_previous(a.output_dir, "analysis", a.force, a.quiet), quiet=a.quiet,
    ))


def analyze_main(argv=None) -> int:
    """analyze_lora_vs_task_vector_math.py's entry point: the analysis of `loratv analyze --spectrum`.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 once the analysis is written; 2 on bad input).
    """
    return run_seed(_analyze, sys.argv[1:] if argv is None else argv)
