"""The seed study's command lines (`merge_lora.py`, `extract_task_vectors.py`), kept working as thin aliases.

`compare_lora_task_vector.py`, `final_validation.py`, `quick_precision_test.py` and
`analyze_lora_vs_task_vector_math.py` likewise wrap `loratv compare`, `loratv validate`, the fp16/fp32 task-vector
comparison and `loratv analyze --spectrum`.

Each alias parses the seed's flag names and hands a namespace to the matching `loratv` command, so the two front
ends share every code path (and the exit-2 error convention). Differences from the seed, on purpose:

* `merge_lora.py --precision` defaults to fp32. The seed's README only shows `--precision fp32 --output_dir
  merged_model_fp32` and no record of its default survives; fp32 is the choice that loses nothing (a 16-bit output
  of an fp32 base rounds every tensor, which is where the study's 363 "fp16 artifacts" came from).
* An existing output folder is refused unless `--force` is given (the seed overwrote it).
* `extract_task_vectors.py` stores the tensors that changed, as `loratv extract` does; `--dense` stores all of them.
"""

import argparse
import sys

from .cli import (
    add_device_flag,
    add_output_flags,
    cmd_analyze,
    cmd_compare,
    cmd_extract,
    cmd_merge,
    cmd_validate,
    parse_with_config,
    run_guarded,
)
from .compare import DEFAULT_TOLERANCE

SEED_PRECISIONS = ("fp16", "fp32", "bf16")
SEED_DEFAULT_PRECISION = "fp32"


def merge_lora_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge_lora.py",
        description="Merge a PEFT LoRA adapter into its base model (alias of `loratv merge`, with the seed's flag names).",
    )
    p.add_argument("--base_model", help="base model: folder, .safetensors/.bin file or hub id org/name[@revision] "
                   "(default: the embedded example)")
    p.add_argument("--lora_path", help="PEFT LoRA adapter folder (default: the embedded example's adapter)")
    p.add_argument("--output_dir", help="output model folder (default: merged_model_<precision>)")
    p.add_argument("--precision", default=SEED_DEFAULT_PRECISION, choices=SEED_PRECISIONS,
                   help=f"dtype of the merged floating-point tensors; the sum is computed in fp32 and rounded once "
                        f"(default: {SEED_DEFAULT_PRECISION})")
    add_device_flag(p)
    add_output_flags(p)
    return p


def extract_task_vectors_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="extract_task_vectors.py",
        description="Extract the task vector, fine-tuned minus base (alias of `loratv extract`, with the seed's flag names).",
    )
    p.add_argument("--base_model", help="base model: folder, .safetensors/.bin file or hub id (default: the embedded example)")
    p.add_argument("--finetuned_model", help="fine-tuned model (default: the embedded example merged in fp32)")
    p.add_argument("--output_dir", default="task_vectors", help="output folder (default: task_vectors)")
    p.add_argument("--device", default="cpu",
                   help="accepted for compatibility and unused: extraction streams tensors and subtracts exactly on the CPU")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="accepted for compatibility and unnecessary: loratv reads weights only and never runs model code")
    p.add_argument("--dense", action="store_true", help="store every tensor, changed or not (as the seed did)")
    p.add_argument("--config", help="YAML file whose keys are these flag names (e.g. base_model, finetuned_model, "
                   "output_dir); flags given on the command line win")
    add_output_flags(p)
    return p


def _merge(argv) -> int:
    a = merge_lora_parser().parse_args(argv)
    return cmd_merge(argparse.Namespace(
        base=a.base_model, adapter=a.lora_path, output=a.output_dir, precision=a.precision, compute_dtype="fp32",
        device=a.device, max_shard_size=None, force=a.force, quiet=a.quiet,
    ))


def _extract(argv) -> int:
    a = parse_with_config(extract_task_vectors_parser(), argv)
    return cmd_extract(argparse.Namespace(
        base=a.base_model, finetuned=a.finetuned_model, output=a.output_dir, dense=a.dense, storage_dtype="auto",
        force=a.force, quiet=a.quiet,
    ))


def merge_lora_main(argv=None) -> int:
    return run_guarded(_merge, sys.argv[1:] if argv is None else argv)


def extract_task_vectors_main(argv=None) -> int:
    return run_guarded(_extract, sys.argv[1:] if argv is None else argv)


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare_lora_task_vector.py",
        description="Compare a LoRA adapter with a task vector and certify equivalence (alias of `loratv compare`, "
                    "with the seed's flag names). Exit 0 equivalent, 1 not, 2 bad input.",
    )
    p.add_argument("--base_model", help="base model (default: the embedded example)")
    p.add_argument("--lora_path", help="PEFT LoRA adapter folder (default: the embedded example's adapter)")
    p.add_argument("--task_vector_path", help="task vector folder or .safetensors file written by extract "
                   "(default, with no model argument: the embedded example's fp32 merge, compared on the fly)")
    p.add_argument("--output_dir", default="comparison_results", help="output folder (default: comparison_results)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="absolute per-element tolerance, the fallback verdict when the rounding certificate fails "
                        f"(default: {DEFAULT_TOLERANCE:g})")
    add_device_flag(p)
    p.add_argument("--generate_plots", action="store_true", help="write the four PNG plots")
    p.add_argument("--architecture_analysis", action="store_true",
                   help="write the plots too (the architecture coverage is one of them)")
    p.add_argument("--detailed_report", action="store_true",
                   help="accepted for compatibility: detailed_comparison_report.txt is always written")
    add_output_flags(p)
    return p


def final_validation_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="final_validation.py",
        description="Merge, extract and compare, then print the verdict (alias of `loratv validate`); with no "
                    "arguments it validates the embedded example. Exit 0 equivalent, 1 not, 2 bad input.",
    )
    p.add_argument("--base_model", help="base model (default: the embedded example)")
    p.add_argument("--lora_path", help="PEFT LoRA adapter folder (default: the embedded example's adapter)")
    p.add_argument("--output_dir", default="validation_results",
                   help="output folder (default: validation_results); a previous validation output there is "
                        "replaced, anything else is refused without --force")
    p.add_argument("--precision", default="fp32", choices=SEED_PRECISIONS, help="dtype of the merged model (default: fp32)")
    add_device_flag(p)
    add_output_flags(p)
    return p


def quick_precision_parser() -> argparse.ArgumentParser:
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


def analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analyze_lora_vs_task_vector_math.py",
        description="Distributions, residual in ulps, spectra and ranks of the LoRA delta against the task vector "
                    "(alias of `loratv analyze --spectrum`, with the seed's flag names).",
    )
    p.add_argument("--lora_file", help="lora_deltas.safetensors (or its folder) written by compare "
                   "(default, with no file argument: the embedded example's adapter)")
    p.add_argument("--task_vector_file", help="task vector folder or task_vector.safetensors written by extract "
                   "(default, with no file argument: the embedded example's fp32 merge, on the fly)")
    p.add_argument("--base_model", help="base model, for ulps and the noise floor (default: the one the inputs record)")
    p.add_argument("--output_dir", default="analysis_results", help="output folder (default: analysis_results)")
    p.add_argument("--verbose", action="store_true", help="print one line per tensor")
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    add_device_flag(p)
    add_output_flags(p)
    return p


def _analyze(argv) -> int:
    a = analyze_parser().parse_args(argv)
    if (a.lora_file is None) != (a.task_vector_file is None):
        from .errors import LoratvError

        raise LoratvError("give both --lora_file and --task_vector_file (or neither, for the embedded example).")
    return cmd_analyze(argparse.Namespace(
        base=a.base_model, adapter=None, lora_deltas=a.lora_file, task_vector=a.task_vector_file, finetuned=None,
        output=a.output_dir, spectrum=True, exact_svd=False, device=a.device, no_plots=a.no_plots, json=False,
        verbose=a.verbose, force=a.force, quiet=a.quiet,
    ))


def _compare(argv) -> int:
    a = compare_parser().parse_args(argv)
    plots = a.generate_plots or a.architecture_analysis
    return cmd_compare(argparse.Namespace(
        base=a.base_model, adapter=a.lora_path, task_vector=a.task_vector_path, finetuned=None,
        output=a.output_dir, tolerance=a.tolerance, device=a.device, no_plots=not plots, json=False,
        force=a.force, quiet=a.quiet,
    ))


def _final_validation(argv) -> int:
    from .validate import is_validation_output

    a = final_validation_parser().parse_args(argv)
    return cmd_validate(argparse.Namespace(
        base=a.base_model, adapter=a.lora_path, output=a.output_dir, precision=a.precision, tolerance=DEFAULT_TOLERANCE,
        device=a.device, no_plots=False, json=False, force=a.force or is_validation_output(a.output_dir),
        quiet=a.quiet,
    ))


def _quick_precision(argv) -> int:
    from .precision_study import compare_task_vector_pair, render_pair_text
    from .results import dump_json

    a = quick_precision_parser().parse_args(argv)
    pair = compare_task_vector_pair(a.fp16_dir, a.fp32_dir, base=a.base_model)
    sys.stdout.write(dump_json(pair) if a.json else render_pair_text(pair))
    return 0


def compare_main(argv=None) -> int:
    return run_guarded(_compare, sys.argv[1:] if argv is None else argv)


def final_validation_main(argv=None) -> int:
    return run_guarded(_final_validation, sys.argv[1:] if argv is None else argv)


def analyze_main(argv=None) -> int:
    return run_guarded(_analyze, sys.argv[1:] if argv is None else argv)


def quick_precision_main(argv=None) -> int:
    return run_guarded(_quick_precision, sys.argv[1:] if argv is None else argv)
