"""The seed study's command lines (`merge_lora.py`, `extract_task_vectors.py`), kept working as thin aliases.

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

from .cli import cmd_extract, cmd_merge, parse_with_config, run_guarded

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
    p.add_argument("--device", default="cpu", help="where deltas are computed: cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors; no progress bar")
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
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors; no progress bar")
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
