"""The seed study's research scripts (repository root), each a thin alias of one `loratv` subcommand.

| script | alias of |
|---|---|
| `analyze_task_vectors.py` | `loratv summarize` (a task vector alone: counts, norms per layer and kind, largest changes, storage) |
| `analyze_task_vector_structure.py` | `loratv summarize --spectrum` (the same, with spectra and numerical ranks) |
| `investigate_parameter_changes.py` | `loratv diff` (base vs fine-tuned with no adapter: what changed, cast artifacts) |
| `visualize_model_structure.py` | `loratv structure` (the layers × module-kinds picture, PNG and HTML) |
| `debug_lora_structure.py` | `loratv inspect ADAPTER --keys` (every key, rank, alpha, scaling, orientation, base tensor) |

They take the seed scripts' flag names and defaults (seed_scripts.py): the embedded miniature for --base_model,
checkpoint-40000/ for --lora_path, and the workflow's own outputs (task_vectors_fp32/, merged_model_fp16/) where the
seed's walkthrough has written them.
"""

import argparse
import sys
from pathlib import Path

from loratv.cli.app import cmd_diff, cmd_inspect_keys, cmd_structure, cmd_summarize
from loratv.cli.seed_scripts import (
    REAL_BASE_MODEL,
    add_seed_output_flags,
    default_adapter,
    default_base,
    replace_previous,
    run_seed,
    say,
)
from loratv.errors import LoratvError
from loratv.example.builder import example_merged

WORKFLOW_TASK_VECTOR = "task_vectors_fp32/"
WORKFLOW_FP16_MERGE = "merged_model_fp16/"


def _add_output(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("--output_dir", help=f"also write the record there as JSON and text (e.g. {default_name}; "
                   "default: print only)")
    p.add_argument("--json", action="store_true", help="print the record (JSON) instead of the text")
    p.add_argument("--top", type=int, default=10, help="how many of the largest changes to list (default: 10)")
    add_seed_output_flags(p, progress_bar=False)


# ---- analyze_task_vectors.py and analyze_task_vector_structure.py -------------------------------------------


def task_vector_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser shared by analyze_task_vectors.py and analyze_task_vector_structure.py.

    Args:
        prog: the script's name.
        description: the script's description in --help.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--task_vector_path", help=f"task vector folder or .safetensors file written by "
                   f"extract_task_vectors.py (default: {WORKFLOW_TASK_VECTOR} when it exists here, else the "
                   "embedded example's fp32 merge minus its base, on the fly)")
    p.add_argument("--base_model", help="base model, for relative changes and the rounding floor (default: the one "
                   "the task vector records, when it is on this machine)")
    p.add_argument("--finetuned_model", help="fine-tuned model: the task vector is computed on the fly as it minus "
                   "--base_model (default base: the embedded StarCoder2 miniature)")
    _add_output(p, "task_vector_summary")
    return p


def analyze_task_vectors_parser() -> argparse.ArgumentParser:
    """The parser of analyze_task_vectors.py: `loratv summarize` with the seed's flag names.

    Returns:
        the argparse parser.
    """
    return task_vector_parser(
        "analyze_task_vectors.py",
        "A task vector's summary, with no adapter: tensors and parameters changed, stored and in the model, norms per "
        "layer and module kind, the largest changes, sparsity, dtypes and storage (alias of `loratv summarize`).")


def analyze_task_vector_structure_parser() -> argparse.ArgumentParser:
    """The parser of analyze_task_vector_structure.py: `loratv summarize --spectrum`.

    Returns:
        the argparse parser.
    """
    return task_vector_parser(
        "analyze_task_vector_structure.py",
        "The structure of a task vector, with no adapter: sparsity, norms per layer and module kind, and the "
        "singular values, numerical rank (threshold stated), stable and effective rank of every changed 2-D tensor "
        "(alias of `loratv summarize --spectrum`).")


def _summarize(parser, spectrum: bool, argv) -> int:
    a = parser.parse_args(argv)
    task_vector, base, finetuned = a.task_vector_path, a.base_model, a.finetuned_model
    if task_vector is not None and finetuned is not None:
        raise LoratvError("give --task_vector_path or --finetuned_model, not both.")
    if finetuned is not None:
        base = default_base(base, a.quiet or a.json)
    elif task_vector is None:
        if base is not None:
            raise LoratvError("give --task_vector_path or --finetuned_model too: --base_model alone has no change "
                              "to summarise.")
        if Path(WORKFLOW_TASK_VECTOR).is_dir():
            task_vector = WORKFLOW_TASK_VECTOR
            say(f"task vector: {WORKFLOW_TASK_VECTOR} (the default --task_vector_path)", a.quiet or a.json)
        else:
            say(f"task vector: the embedded example's fp32 merge minus its base, on the fly (no "
                f"{WORKFLOW_TASK_VECTOR} here)", a.quiet or a.json)
    output = a.output_dir
    return cmd_summarize(argparse.Namespace(
        task_vector=task_vector, base=base, finetuned=finetuned, spectrum=spectrum, top=a.top, output=output,
        json=a.json, force=output is not None and replace_previous(output, "summary", a.force, a.quiet or a.json),
        quiet=a.quiet,
    ))


def analyze_task_vectors_main(argv=None) -> int:
    """analyze_task_vectors.py's entry point: a task vector's summary, as `loratv summarize`.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 once printed and written; 2 on bad input).
    """
    return run_seed(lambda args: _summarize(analyze_task_vectors_parser(), False, args),
                    sys.argv[1:] if argv is None else argv)


def analyze_task_vector_structure_main(argv=None) -> int:
    """analyze_task_vector_structure.py's entry point: a task vector's summary with spectra and ranks.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 once printed and written; 2 on bad input).
    """
    return run_seed(lambda args: _summarize(analyze_task_vector_structure_parser(), True, args),
                    sys.argv[1:] if argv is None else argv)


# ---- investigate_parameter_changes.py -----------------------------------------------------------------------


def investigate_parameter_changes_parser() -> argparse.ArgumentParser:
    """The parser of investigate_parameter_changes.py: `loratv diff` with the seed's flag names.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(
        prog="investigate_parameter_changes.py",
        description="Base vs fine-tuned with no adapter at all: which tensors changed and by how much (max |Δ|, "
                    "relative change, elements changed, ulps), which are cast artifacts (the base rounded to the "
                    "fine-tuned dtype, bit for bit), per layer and module kind (alias of `loratv diff`).",
    )
    p.add_argument("--base_model", help="base model: folder, .safetensors/.bin file or hub id (default: the embedded "
                   f"StarCoder2 miniature; --base_model {REAL_BASE_MODEL} downloads the real one)")
    p.add_argument("--finetuned_model", help=f"fine-tuned model (default: {WORKFLOW_FP16_MERGE} when it exists here, "
                   "else the embedded example merged in fp16)")
    _add_output(p, "parameter_changes")
    return p


def _investigate(argv) -> int:
    a = investigate_parameter_changes_parser().parse_args(argv)
    quiet = a.quiet or a.json
    finetuned = a.finetuned_model
    if finetuned is None:
        if a.base_model is not None:
            raise LoratvError("give --finetuned_model too: the model to compare with the base.")
        if Path(WORKFLOW_FP16_MERGE).is_dir():
            finetuned = WORKFLOW_FP16_MERGE
            say(f"fine-tuned model: {WORKFLOW_FP16_MERGE} (the default --finetuned_model)", quiet)
        else:

            finetuned = str(example_merged("fp16"))
            say(f"fine-tuned model: the embedded example merged in fp16 ({finetuned})", quiet)
    output = a.output_dir
    return cmd_diff(argparse.Namespace(
        base=default_base(a.base_model, quiet), finetuned=finetuned, top=a.top, output=output, json=a.json,
        force=output is not None and replace_previous(output, "diff", a.force, quiet), quiet=a.quiet,
    ))


def investigate_parameter_changes_main(argv=None) -> int:
    """investigate_parameter_changes.py's entry point: base vs fine-tuned, as `loratv diff`.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 once printed and written; 2 on bad input).
    """
    return run_seed(_investigate, sys.argv[1:] if argv is None else argv)


# ---- visualize_model_structure.py ---------------------------------------------------------------------------


def visualize_model_structure_parser() -> argparse.ArgumentParser:
    """The parser of visualize_model_structure.py: `loratv structure` with the seed's flag names.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(
        prog="visualize_model_structure.py",
        description="The architecture picture: a layers × module-kinds grid of the model's tensors, each cell marked "
                    "by whether the LoRA targets it and the task vector changes it (or only rounds it: a cast "
                    "artifact), as model_structure.png, a self-contained model_structure.html and "
                    "model_structure.json (alias of `loratv structure`).",
    )
    p.add_argument("--base_model", help="base model (default: the embedded StarCoder2 miniature; --base_model "
                   f"{REAL_BASE_MODEL} downloads the real one)")
    p.add_argument("--lora_path", help="PEFT LoRA adapter folder (default: checkpoint-40000/ in the working folder, "
                   "else the embedded example's adapter; 'none' for no adapter)")
    p.add_argument("--task_vector_path", help=f"task vector written by extract_task_vectors.py (default: "
                   f"{WORKFLOW_TASK_VECTOR} when it exists here)")
    p.add_argument("--finetuned_model", help="fine-tuned model, compared with the base tensor by tensor (instead of "
                   "a task vector; default without either: the embedded example merged in fp32)")
    p.add_argument("--output_dir", default="model_structure", help="output folder (default: model_structure)")
    p.add_argument("--json", action="store_true", help="print the structure record (JSON) instead of the summary")
    add_seed_output_flags(p)  # structure reads tensors with a progress bar
    return p


def _visualize(argv) -> int:
    a = visualize_model_structure_parser().parse_args(argv)
    quiet = a.quiet or a.json
    if a.task_vector_path is not None and a.finetuned_model is not None:
        raise LoratvError("give --task_vector_path or --finetuned_model, not both.")
    task_vector, finetuned = a.task_vector_path, a.finetuned_model
    if task_vector is None and finetuned is None:
        if Path(WORKFLOW_TASK_VECTOR).is_dir():
            task_vector = WORKFLOW_TASK_VECTOR
            say(f"task vector: {WORKFLOW_TASK_VECTOR} (the default --task_vector_path)", quiet)
        elif a.base_model is None:

            finetuned = str(example_merged("fp32"))
            say(f"fine-tuned model: the embedded example merged in fp32 ({finetuned})", quiet)
    adapter = None if a.lora_path == "none" else default_adapter(a.lora_path, quiet)
    return cmd_structure(argparse.Namespace(
        model=default_base(a.base_model, quiet), adapter=adapter, task_vector=task_vector, finetuned=finetuned,
        output=a.output_dir, json=a.json, force=replace_previous(a.output_dir, "structure", a.force, quiet),
        quiet=a.quiet,
    ))


def visualize_model_structure_main(argv=None) -> int:
    """visualize_model_structure.py's entry point: the architecture picture, as `loratv structure`.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 once the picture is written; 2 on bad input).
    """
    return run_seed(_visualize, sys.argv[1:] if argv is None else argv)


# ---- debug_lora_structure.py --------------------------------------------------------------------------------


def debug_lora_structure_parser() -> argparse.ArgumentParser:
    """The parser of debug_lora_structure.py: `loratv inspect --keys` with the seed's flag names.

    Returns:
        the argparse parser.
    """
    p = argparse.ArgumentParser(
        prog="debug_lora_structure.py",
        description="An adapter dumped for debugging: every stored key with its shape, dtype and size; per module "
                    "its rank, alpha and the scaling PEFT applies, its orientation, and the base tensor it maps to "
                    "(alias of `loratv inspect ADAPTER --keys --base B`).",
    )
    p.add_argument("--lora_path", help="PEFT (or kohya/diffusers) LoRA adapter (default: checkpoint-40000/ in the "
                   "working folder, else the embedded example's adapter)")
    p.add_argument("--base_model", help="base model, to map each module to its base tensor (default: the embedded "
                   "StarCoder2 miniature for the default adapter; else the base the adapter records, when it is a "
                   "local folder; 'none' to skip)")
    p.add_argument("--json", action="store_true", help="print the dump as JSON")
    return p


def _debug(argv) -> int:
    a = debug_lora_structure_parser().parse_args(argv)
    adapter = default_adapter(a.lora_path, a.json)
    base = a.base_model
    if base == "none":
        base = None
    elif base is None and a.lora_path is None:
        base = default_base(None, a.json)
    return cmd_inspect_keys(argparse.Namespace(path=adapter, base=base, json=a.json, config_only=False,
                                               lora_targets=None, lora_rank=None))


def debug_lora_structure_main(argv=None) -> int:
    """debug_lora_structure.py's entry point: dump an adapter's keys, as `loratv inspect --keys`.

    Args:
        argv: the arguments without the program name (default: sys.argv[1:]).

    Returns:
        the exit code (0 once printed; 2 on bad input).
    """
    return run_seed(_debug, sys.argv[1:] if argv is None else argv)
