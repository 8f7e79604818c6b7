"""The analysis record (schema `loratv.analysis`) as a Markdown report and as a short terminal summary."""

import math

from loratv.report.analysis_plots import FILES, bin_label
from loratv.report.text import DASH, _fmt, _name

QUANTITY_TITLES = {"delta": "ΔW, the LoRA delta", "task_vector": "T, the task vector", "residual": "R = T − ΔW"}


def _g(value, digits: int = 4) -> str:
    return DASH if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def _md_table(headers, rows) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _summary_lines(record) -> list[str]:
    s = record["summary"]
    lines = [
        f"{s['tensors']} tensors differ from zero in ΔW or T: {s['shared']} in both, {s['adapter_only']} only in ΔW, "
        f"{s['task_vector_only']} only in T.",
        f"‖T‖ = {_g(s['task_vector_norm'], 6)}, ‖ΔW‖ = {_g(s['delta_norm'], 6)}, ‖T − ΔW‖ = {_g(s['residual_norm'])} "
        f"(relative {_g(s['relative_residual'])}).",
    ]
    if s["max_residual_ulps"] is not None:
        lines.append(f"Largest |T − ΔW|: {_g(s['max_residual_ulps'])} ulps of the stored weight.")
    if record.get("spectrum") and record["inputs"].get("base") is None:
        lines.append(f"Spectra of {s['spectra']} two-dimensional tensors: singular values only; numerical ranks need "
                     "the base model's rounding-noise floor (pass the base).")
    elif record.get("spectrum"):
        lines.append(
            f"Spectra of {s['spectra']} two-dimensional tensors: numerical rank above the rounding-noise floor equals "
            f"the adapter's r for {s['numerical_rank_equals_adapter_rank']} of {s['with_adapter_rank']} targeted "
            f"tensors; {s['numerical_rank_zero']} have rank 0 (nothing above rounding noise).")
    return lines


def render_analysis_summary(record: dict, verbose: bool = False) -> str:
    """The short terminal summary of an analysis record: the summary lines and the record's notes.

    Args:
        record: the `loratv.analysis` record.
        verbose: add one line per tensor (category, ‖T‖, relative residual, numerical rank, σ_r+1/φ).

    Returns:
        The text, ending in a newline.
    """
    lines = _summary_lines(record) + [f"note: {n}" for n in record["notes"]]
    if verbose:
        lines += ["", f"{'tensor':60}  {'category':16}  {'‖T‖':>10}  {'‖T−ΔW‖/‖T‖':>11}  {'rank':>5}  {'σ_r+1/φ':>8}"]
        for t in record["tensors"]:
            sp = t.get("spectrum") or {}
            rank = sp.get("numerical_rank")
            lines.append(f"{_name(t['name']):60}  {t['category']:16}  {t['task_vector_norm']:10.4g}  "
                         f"{_g(t['relative_residual']):>11}  {_fmt(rank):>5}  {_g(_next_over_floor(sp), 3):>8}")
    return "\n".join(lines) + "\n"


def _next_over_floor(sp: dict):
    """σ_{r+1}/φ: below 1 means everything past the adapter's rank is rounding noise."""
    r, s, floor = sp.get("adapter_rank"), sp.get("singular_values") or [], sp.get("noise_floor")
    if not r or not floor or len(s) <= r:
        return None
    return s[r] / floor


def render_analysis_markdown(record: dict) -> str:
    """The Markdown report of an analysis record: inputs, summary, notes, the ulp, kind, layer, spectrum (when the
    record has one) and worst-tensor sections, and links to the plot files.

    Args:
        record: the `loratv.analysis` record.

    Returns:
        The Markdown text.
    """
    inputs = record["inputs"]
    out = ["# loratv analysis: LoRA delta against task vector", ""]
    out += [f"- base: `{inputs['base']}`", f"- LoRA delta: `{inputs['lora_delta']}`",
            f"- task vector: `{inputs['task_vector']}` ({inputs['task_vector_kind']})",
            f"- loratv {record['loratv_version']}" + (f"; command: `{record['command']}`" if record["command"] else ""), ""]
    out += ["## Summary", ""] + _summary_lines(record) + [""]
    out += [f"> note: {n}" for n in record["notes"]] + ([""] if record["notes"] else [])
    out += _ulp_section(record) + _kind_sections(record) + _layer_section(record)
    if record.get("spectrum"):
        out += _spectrum_section(record)
    out += _worst_section(record)
    out += ["## Plots", ""]
    keys = ["scatter", "distributions", "ulps"] + (["spectra", "ranks"] if record.get("spectrum") else [])
    out += [f"![{k}]({FILES[k]})" for k in keys] + [""]
    return "\n".join(out)


def _ulp_section(record) -> list[str]:
    hist = record["summary"]["residual_ulp_histogram"]
    if hist is None:
        return []
    total = sum(hist["counts"]) or 1
    rows = []
    for lo, hi, c in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
        rows.append((bin_label(lo, hi), f"{c:,}", f"{100 * c / total:.3g}%"))
    return (["## Residual in ulps of the stored weight", "",
             "Each |T − ΔW| divided by the spacing of floats at the larger of the stored fine-tuned and base weights.",
             ""] + _md_table(["ulps", "elements", "share"], rows))


def _kind_sections(record) -> list[str]:
    out = ["## Distributions per module kind", "",
           "Moments over every element (population formulas; kurtosis is the excess); quantiles from a deterministic "
           "sample of each tensor.", ""]
    for q, title in QUANTITY_TITLES.items():
        rows = []
        for kind, k in record["kinds"].items():
            st = k[q]
            qs = st["quantiles_sampled"]
            rows.append((f"`{kind}`", k["tensors"], _g(st["mean"]), _g(st["std"]), _g(st["min"]), _g(st["max"]),
                         _g(st["skewness"], 3), _g(st["excess_kurtosis"], 3), _g(qs["0.01"]), _g(qs["0.5"]),
                         _g(qs["0.99"])))
        out += [f"### {title}", ""] + _md_table(
            ["kind", "tensors", "mean", "std", "min", "max", "skew", "ex. kurt.", "q0.01", "median", "q0.99"], rows)
    return out


def _layer_section(record) -> list[str]:
    rows = [(DASH if r["layer"] is None else r["layer"], r["tensors"], _g(r["task_vector_norm"]), _g(r["delta_norm"]),
             _g(r["relative_residual"]), DASH if r["min_cosine"] is None else f"{r['min_cosine']:.12f}")
            for r in record["layers"]]
    return ["## Per layer", ""] + _md_table(["layer", "tensors", "‖T‖", "‖ΔW‖", "‖T − ΔW‖/‖T‖", "lowest cosine"], rows)


def _spectrum_section(record) -> list[str]:
    rows = []
    for t in record["tensors"]:
        sp = t.get("spectrum")
        if not sp:
            continue
        rank = _fmt(sp["numerical_rank"])
        if sp["numerical_rank_is_lower_bound"]:
            rank = f"≥ {rank}"
        r = sp["adapter_rank"]
        s = sp["singular_values"]
        rows.append((f"`{t['name']}`", _fmt(r), rank, _g(sp["noise_floor"], 3), _g(s[r - 1] if r and len(s) >= r else None, 4),
                     _g(s[r] if r and len(s) > r else None, 3), _g(sp["stable_rank"], 4),
                     _g(sp["effective_rank_of_computed"], 4), _g(sp["energy_in_top_r"], 8),
                     _g(sp["column_space_max_angle_deg"], 3), _g(sp["row_space_max_angle_deg"], 3)))
    svd = record["svd"]
    return (["## Spectra and ranks", "",
             f"Leading singular values of T ({svd} SVD; the randomized sketch's residual is computed exactly and kept in "
             "the JSON). Numerical rank counts σ_i(T) above the rounding-noise floor φ = ‖b‖_F, b the per-element "
             "rounding bound of the merge path (docs/math.md §8): by Weyl's inequality rounding alone cannot lift a "
             "singular value above φ. Angles are the largest principal angles between T's top-r column (row) space "
             "and ΔW's, that is lora_B's columns (lora_A's rows) for a Linear module.", ""]
            + _md_table(["tensor", "r", "numerical rank", "floor φ", "σ_r", "σ_r+1", "stable rank", "effective rank",
                         "energy in top r", "column angle °", "row angle °"], rows))


def _worst_section(record, count: int = 20) -> list[str]:
    rows = sorted((t for t in record["tensors"] if t["relative_residual"] is not None),
                  key=lambda t: -t["relative_residual"])[:count]
    table = [(f"`{t['name']}`", t["category"], _g(t["task_vector_norm"]), _g(t["delta_norm"]),
              _g(t["relative_residual"]), DASH if t["cosine"] is None else f"{t['cosine']:.12f}",
              _g(t["max_residual_ulps"])) for t in rows]
    return ([f"## The {len(rows)} tensors with the largest relative residual", ""]
            + _md_table(["tensor", "category", "‖T‖", "‖ΔW‖", "‖T − ΔW‖/‖T‖", "cosine", "max ulps"], table))
