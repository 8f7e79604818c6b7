"""`verify-merge`: is this model the merge its recipe describes? For a model made by loratv, mergekit or anyone.

Every tensor the recipe produces is recomputed from the inputs (merging/verification.py) and the merged model's
tensor is held to the rounding bound of the recipe's arithmetic (`EQUIVALENT (certified)`; slerp, nuslerp,
model_stock and rescaled task vectors with their coefficients in the interval any evaluation order allows), to a
stated tolerance where no finite bound follows (`EQUIVALENT within tolerance`), or, for
DARE and DELLA made with masks loratv cannot recompute, to what any mask allows (`CONSISTENT (masks not
reproducible)`). Otherwise `NOT EQUIVALENT`, naming the tensors, the worst elements and their ratios. Exit codes as
`compare`: 0 equivalent or consistent, 1 not equivalent, 2 bad input. The record also gives, per tensor, each input's
kept fraction and the sign-conflict rate, and per input the norm of its task vector and its cosine with the merged
model's (merged − base); with an output folder, report.html renders it (report/html.py).
"""

import shlex
from pathlib import Path

import torch

from loratv.errors import BadInputError
from loratv.io.outputs import atomic_output_dir
from loratv.io.state_dict import open_checkpoint
from loratv.merging.recipe import check_densities, layer_fraction, load_recipe
from loratv.merging.verification import check_tensor, support_violations
from loratv.ops.merge_models import (
    LoraModel,
    _arithmetic_like_mergekit,
    _check_tensors,
    _num_layers,
    _open_inputs,
)
from loratv.report.html import VERIFY_MERGE_FILE, write_report
from loratv.report.records import dump_json
from loratv.version import __version__

RECORD_FILE = VERIFY_MERGE_FILE
SCHEMA = "loratv.verify_merge"
SCHEMA_VERSION = 1
WORST = 10  # tensors named in the summary


def _seed_of(merged) -> int | None:
    """The seed of a merge written by loratv's merge-models (its shards' metadata), else None."""
    for metadata in getattr(merged, "file_metadata", {}).values():
        if metadata.get("loratv_operation") == "merge-models" and "seed" in metadata:
            try:
                return int(metadata["seed"])
            except ValueError:
                return None
    return None


def verify_merge(config_path, merged_source, out=None, *, dtype_like_mergekit: bool = False,
                 force: bool = False) -> dict:
    """Check a merged model against its recipe applied to the inputs.

    Args:
        config_path: the mergekit YAML recipe.
        merged_source: the merged model (folder, file or hub id).
        out: a folder for verify_merge.json (None: nothing is written).
        dtype_like_mergekit: the recipe's arithmetic is mergekit's without `dtype: float32` (the config's dtype,
            else the inputs' own): decisions and bounds in that dtype.
        force: replace an existing `out`.

    Returns:
        The record: verdict, summary, per-tensor rows and per-input statistics.

    Raises:
        LoratvError: a bad recipe, input or merged model (one sentence naming the file).
    """
    recipe = load_recipe(config_path)
    method = recipe.method
    opened = _open_inputs(recipe)
    reference_ref = recipe.base_model or recipe.inputs()[0]
    reference = opened[reference_ref]
    if isinstance(reference, LoraModel):
        reference = reference.base
    _check_tensors(recipe, reference_ref, reference, opened)
    merged = open_checkpoint(merged_source, label=f"merged model {merged_source}")
    num_layers = _num_layers(reference.config)
    seed = _seed_of(merged) if method.randomised else None
    base_ref = recipe.base_model
    refs = recipe.inputs()
    weighted_refs = refs if method.base_weighted or base_ref is None else [r for r in refs if r != base_ref]
    rows, missing, mismatched = [], [], []
    dots = [0.0] * len(weighted_refs)
    norms = [0.0] * len(weighted_refs)
    merged_norm = 0.0
    kinds = set()
    for name in reference.names():
        if not reference.entry(name).torch_dtype.is_floating_point:
            continue
        if name not in merged:
            missing.append(name)
            continue
        if tuple(merged.entry(name).shape) != tuple(reference.entry(name).shape):
            mismatched.append(name)
            continue
        t = layer_fraction(name, num_layers)
        shared = recipe.shared_values(name, t)
        values = [recipe.model_values(ref, name, t) for ref in weighted_refs]
        check_densities(recipe, name, weighted_refs, values)
        per_model = {p.name: [v[p.name] for v in values] for p in method.parameters if p.per_model}
        inputs = [opened[ref].read(name) for ref in weighted_refs]
        base = opened[base_ref].read(name) if base_ref is not None and (method.needs_base or method.uses_base) \
            else None
        value = merged.read(name)
        row = {"name": name, "dtype": str(value.dtype).replace("torch.", "")}
        if method.randomised and seed is None:
            assert base is not None
            row.update(kind="consistent", violations=support_violations(method, base, inputs, per_model, shared,
                                                                        value))
            kinds.add("consistent")
        else:
            arithmetic = _arithmetic_like_mergekit(recipe, name, opened) if dtype_like_mergekit else None
            check = check_tensor(method, base, inputs, per_model, shared,
                                 key=(seed, name) if seed is not None else None, arithmetic=arithmetic,
                                 merged=value)
            arithmetic = check.arithmetic
            assert arithmetic is not None  # check_tensor sets it
            ratio = check.ratio(value, value.dtype, arithmetic)
            worst = int(torch.argmax(ratio.reshape(-1))) if ratio.numel() else 0
            row.update(kind="certified" if check.certified else "tolerance", max_ratio=float(ratio.max()),
                       worst_element=[int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape)]
                       if ratio.dim() else [],
                       max_abs_diff=float((value.double() - check.reference).abs().max()),
                       kept=check.kept, sign_conflicts=check.sign_conflicts)
            if check.coefficient_width is not None:
                row["coefficient_width"] = check.coefficient_width
            kinds.add(row["kind"])
        if base is not None:
            moved = value.double() - base.double()
            merged_norm += float((moved * moved).sum())
            for i, x in enumerate(inputs):
                delta = x.double() - base.double()
                dots[i] += float((delta * moved).sum())
                norms[i] += float((delta * delta).sum())
        rows.append(row)
    if not rows:
        raise BadInputError(f"{merged.path}: holds none of the recipe's tensors.")
    failing = [r for r in rows if r.get("max_ratio", 0) > 1 or r.get("violations", 0) > 0]
    if failing or missing or mismatched:
        verdict = "NOT EQUIVALENT"
    elif kinds == {"certified"}:
        verdict = "EQUIVALENT (certified)"
    elif "consistent" in kinds:
        verdict = "CONSISTENT (masks not reproducible)"
    else:
        verdict = "EQUIVALENT within tolerance"
    failing.sort(key=lambda r: -(r.get("max_ratio") or r.get("violations") or 0))
    inputs_record = [{"model": ref, "task_vector_norm": norms[i] ** 0.5,
                      "cosine_with_merged": dots[i] / (norms[i] * merged_norm) ** 0.5
                      if norms[i] > 0 and merged_norm > 0 else None}
                     for i, ref in enumerate(weighted_refs)] if base_ref is not None else []
    record = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "loratv_version": __version__,
        "recipe": str(recipe.path), "merged": str(merged.path), "merge_method": method.name, "seed": seed,
        "command": shlex.join(["loratv", "verify-merge", str(recipe.path), str(merged.path)]
                              + (["--dtype-like-mergekit"] if dtype_like_mergekit else [])
                              + (["-o", str(out)] if out is not None else [])),
        "summary": {"verdict": verdict, "certified": verdict == "EQUIVALENT (certified)", "tensors": len(rows),
                    "failing_tensors": [r["name"] for r in failing[:WORST]], "failing_count": len(failing),
                    "missing_tensors": missing, "shape_mismatches": mismatched,
                    "max_ratio": max((r.get("max_ratio", 0.0) for r in rows), default=0.0),
                    "not_reproducible": "DARE/DELLA masks drawn by another tool cannot be recomputed: only the "
                                        "support and sign conditions every mask meets were checked"
                    if "consistent" in kinds else None},
        "inputs": inputs_record,
        "tensors": rows,
    }
    if out is not None:
        with atomic_output_dir(out, [Path(recipe.path), merged.path], force=force) as tmp:
            (tmp / RECORD_FILE).write_text(dump_json(record))
            write_report(tmp)
    return record


def render_verify_merge(record: dict) -> str:
    """The record as a few lines of text.

    Args:
        record: what verify_merge returned.

    Returns:
        The text, ending in a newline.
    """
    s = record["summary"]
    lines = [f"verify-merge: {record['merge_method']} recipe {record['recipe']} against {record['merged']}",
             f"Verdict: {s['verdict']}",
             f"  tensors checked: {s['tensors']}; largest ratio to the allowed difference: {s['max_ratio']:.3g}"]
    for row in record["tensors"]:
        if row["name"] in s["failing_tensors"]:
            if "violations" in row:
                lines.append(f"  {row['name']}: {row['violations']} elements no mask explains")
            else:
                lines.append(f"  {row['name']}: {row['max_ratio']:.3g}× the allowed difference at element "
                             f"{row['worst_element']}")
    if s["missing_tensors"]:
        lines.append(f"  missing from the merged model: {', '.join(s['missing_tensors'][:WORST])}")
    if s["shape_mismatches"]:
        lines.append(f"  another shape in the merged model: {', '.join(s['shape_mismatches'][:WORST])}")
    if s["not_reproducible"]:
        lines.append(f"  {s['not_reproducible']}")
    for entry in record["inputs"]:
        cosine = "n/a" if entry["cosine_with_merged"] is None else f"{entry['cosine_with_merged']:.4f}"
        lines.append(f"  {entry['model']}: ‖task vector‖ {entry['task_vector_norm']:.4g}, cosine with the merged "
                     f"task vector {cosine}")
    return "\n".join(lines) + "\n"
