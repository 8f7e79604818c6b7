"""Text renderings of a task-vector summary (schema `loratv.task_vector_summary`) and of a parameter-changes record
(schema `loratv.parameter_changes`), docs/summarize-and-diff.md. They read the record alone, so a saved JSON
re-renders later.
"""

from loratv.report.text import DASH, _fmt, _name, _pct, _table

SPECTRUM_VALUES = 4  # leading singular values shown per tensor in the text table


def _e(value) -> str:
    return _fmt(value, ".3e")


def _int(value) -> str:
    return _fmt(value, ",")


def _frac(value) -> str:
    return DASH if value is None else f"{100 * value:.2f}%"


def _dtypes(counts: dict) -> str:
    return ", ".join(f"{code} ×{n}" for code, n in sorted(counts.items())) or DASH


def _layer(value) -> str:
    return "(outside layers)" if value is None else str(value)


def _of(part, total) -> str:
    return f"{_int(part)} of {_int(total)}" if total is not None else f"{_int(part)} (total unknown)"


def _bytes(n) -> str:
    if n is None:
        return DASH
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# ---- loratv summarize ----------------------------------------------------------------------------------------


def _summary_head(r: dict) -> list[str]:
    inputs, counts, storage = r["inputs"], r["counts"], r["storage"]
    t, p = counts["tensors"], counts["parameters"]
    if inputs["source"] == "computed":
        lines = [f"Task vector fine-tuned − base, computed: {inputs['finetuned']} − {inputs['base']}"]
        stored = "computed on the fly (nothing stored)"
    else:
        lines = [f"Task vector {inputs['task_vector']}" + (f" (base {inputs['base']})" if inputs["base"] else "")]
        layout = {"dense": "dense storage: every tensor", "sparse": "sparse storage: changed tensors only"}
        stored = (f"stored {_int(t['stored'])} tensors, {_int(p['stored'])} elements ("
                  + layout.get(storage["layout"], "dense or sparse unknown: the model's total is unknown") + ")")
    norms, sparsity = r["norms"], r["sparsity"]
    rows = [
        ("tensors", f"changed {_of(t['changed'], t['total'])}; {stored}"),
        ("parameters", f"{_int(p['changed_elements'])} elements changed, in changed tensors "
                       f"{_of(p['in_changed_tensors'], p['total'])}"),
        ("dtypes", f"base {_dtypes(r['dtypes']['base'])}; fine-tuned {_dtypes(r['dtypes']['finetuned'])}"
                   + (f"; stored {_dtypes(r['dtypes']['stored'])}" if r["dtypes"]["stored"] else "")),
        ("norm", f"‖T‖_F = {_e(norms['l2_norm'])}, max |T| = {_e(norms['max_abs'])}, "
                 f"‖T‖/‖W‖ = {_e(norms['relative_change'])}"),
        ("exact zeros", f"{_frac(sparsity['zero_fraction_of_model'])} of the model, "
                        f"{_frac(sparsity['zero_fraction_of_stored'])} of stored elements, "
                        f"{_frac(sparsity['zero_fraction_of_changed_tensors'])} of changed tensors"),
    ]
    if storage["file"]:
        meta = storage["metadata"]
        origin = ", ".join(f"{k} {meta[k]}" for k in ("base", "finetuned", "loratv_operation") if k in meta)
        rounded = ("unknown (no task_vector.json)" if storage["rounded_elements"] is None else
                   f"{_int(storage['rounded_elements'])} in {_int(storage['rounded_tensors'])} tensors")
        rows.append(("storage", f"{storage['file']}: {_bytes(storage['file_bytes'])} "
                                f"({_bytes(storage['tensor_bytes'])} of tensors); elements rounded when stored: {rounded}"))
        rows.append(("file metadata", origin or DASH))
    width = max(len(k) for k, _ in rows)
    return lines + [f"  {k.ljust(width)}  {v}" for k, v in rows]


def _summary_groups(title: str, groups: list, key: str, with_base: bool) -> list[str]:
    headers = [key, "tensors", "changed", "parameters", "changed elements", "zeros", "‖T‖_F", "max |T|"]
    if with_base:
        headers.append("‖T‖/‖W‖")
    rows = []
    for g in groups:
        label = _layer(g[key]) if key == "layer" else _name(str(g[key]), 48)
        row = [label, g["tensors"], g["changed_tensors"], _int(g["parameters"]), _int(g["changed_elements"]),
               _frac(g["zero_fraction"]), _e(g["l2_norm"]), _e(g["max_abs"])]
        if with_base:
            row.append(_e(g["relative_change"]))
        rows.append(row)
    return ["", title] + _table(headers, rows, "l")


def _summary_largest(title: str, items: list) -> list[str]:
    rows = [[_name(t["name"]), "×".join(map(str, t["shape"])) or "()", _e(t["l2_norm"]), _e(t["max_abs"]),
             _e(t["relative_change"]), _pct(t["nonzero"], t["parameters"])] for t in items]
    return ["", title] + (_table(["tensor", "shape", "‖T‖_F", "max |T|", "‖T‖/‖W‖", "nonzero"], rows, "ll")
                          if rows else ["  (no tensor changed)"])


def _summary_spectra(r: dict) -> list[str]:
    spec = r["spectrum"]
    lines = ["", f"Spectra of {spec['tensors']} changed matrices ({spec['svd']})"]
    for rule, text in spec["rules"].items():
        lines.append(f"  rank rule '{rule}': {text}")
    rows = []
    for t in r["tensors"]:
        s = t["spectrum"]
        if not s:
            continue
        sv = " ".join(f"{v:.2e}" for v in s["singular_values"][:SPECTRUM_VALUES])
        rank = f"{'≥' if s['numerical_rank_is_lower_bound'] else ''}{s['numerical_rank']}/{s['max_rank']}"
        rows.append([_name(t["name"], 48), sv, rank, _e(s["rank_threshold"]), s["rank_rule"],
                     f"{s['stable_rank']:.2f}", f"{s['effective_rank']:.2f}"])
    if rows:
        lines += _table(["tensor", f"σ1…σ{SPECTRUM_VALUES}", "rank", "threshold", "rule", "stable", "effective"],
                        rows, "ll")
    return lines


def render_summary_text(r: dict) -> str:
    """The text report of a `loratv.task_vector_summary` record.

    Args:
        r: the record (as returned by summarize_task_vector or read back from task_vector_summary.json).

    Returns:
        The report, lines ending in newlines.
    """
    with_base = r["inputs"]["base"] is not None
    lines = _summary_head(r)
    lines += _summary_groups("Per layer", r["layers"], "layer", with_base)
    lines += _summary_groups("Per module kind (name without the layer prefix)", r["kinds"], "kind", with_base)
    lines += _summary_groups("Per module group", r["groups"], "group", with_base)
    top = r["largest"]["top"]
    lines += _summary_largest(f"Largest changes by ‖T‖_F (top {top})", r["largest"]["by_norm"])
    if r["largest"]["by_relative_change"] is not None:
        lines += _summary_largest(f"Largest relative changes ‖T‖/‖W‖ (top {top})", r["largest"]["by_relative_change"])
    if r["spectrum"] is not None:
        lines += _summary_spectra(r)
    if r["notes"]:
        lines += [""] + [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


# ---- loratv diff ---------------------------------------------------------------------------------------------


def _present(r: dict) -> list[str]:
    """Categories that occur, in the record's order (columns of the per-layer and per-kind tables)."""
    by = r["summary"]["by_category"]
    return [c for c in r["categories"] if by.get(c)] or ["unchanged"]


def _layer_runs(groups: list, categories: list) -> list:
    """Consecutive layers with equal counts as one row (`0–29`): a uniform model reads at a glance."""
    runs: list[list] = []  # [first layer, last layer, values]
    for g in groups:
        values = [g["tensors"], _int(g["parameters"])] + [g["by_category"].get(c, 0) for c in categories]
        layer = g["layer"]
        last = runs[-1] if runs else None
        if last and layer is not None and last[1] is not None and last[1] == layer - 1 and last[2] == values:
            last[1] = layer
        else:
            runs.append([layer, layer, values])
    return [[_layer(a) if a == b else f"{a}–{b}"] + values for a, b, values in runs]


def _diff_groups(title: str, groups: list, key: str, categories: list) -> list[str]:
    if key == "layer":
        rows = _layer_runs(groups, categories)
    else:
        rows = [[_name(str(g[key]), 48), g["tensors"], _int(g["parameters"])]
                + [g["by_category"].get(c, 0) for c in categories] for g in groups]
    return ["", title] + _table([key, "tensors", "parameters"] + categories, rows, "l")


def _diff_largest(title: str, items: list) -> list[str]:
    rows = [[_name(t["name"]), f"{t['base_dtype']}→{t['finetuned_dtype']}", _e(t["max_abs_change"]),
             _e(t["relative_change"]), _pct(t["changed_elements"], t["parameters"]),
             _fmt(t["max_change_ulps"], ".4g")] for t in items]
    headers = ["tensor", "dtype", "max |Δ|", "‖Δ‖/‖W‖", "elements changed", "max ulps (base)"]
    return ["", title] + (_table(headers, rows, "ll") if rows else ["  (no tensor changed)"])


def render_diff_text(r: dict) -> str:
    """The text report of a `loratv.parameter_changes` record.

    Args:
        r: the record (as returned by diff_models or read back from parameter_changes.json).

    Returns:
        The report, lines ending in newlines.
    """
    s = r["summary"]
    by, p = s["by_category"], s["parameters"]
    counts = ", ".join(f"{by[c]} {c}" for c in r["categories"] if by.get(c))
    lines = [
        f"Parameter changes: base {r['inputs']['base']} → fine-tuned {r['inputs']['finetuned']}",
        f"  tensors      {s['tensors']}: {counts or 'none'}",
        f"  parameters   {_int(p['changed_elements'])} elements changed in {_int(p['in_changed_tensors'])} parameters "
        f"of changed tensors (base {_int(p['base'])}, fine-tuned {_int(p['finetuned'])}); "
        f"{_int(p['cast_artifact_elements'])} elements differ by a cast only",
        f"  dtypes       base {_dtypes(s['dtypes']['base'])}; fine-tuned {_dtypes(s['dtypes']['finetuned'])}",
        f"  changes      max |Δ| = {_e(s['max_abs_change'])}, ‖Δ‖_F = {_e(s['change_norm'])}, "
        f"‖Δ‖/‖W‖ = {_e(s['relative_change'])}, max {_fmt(s['max_change_ulps'], '.4g')} ulps of the base",
    ]
    categories = _present(r)
    lines += _diff_groups("Per layer (counts per layer; equal consecutive layers share a row)", r["layers"], "layer", categories)
    lines += _diff_groups("Per module kind (name without the layer prefix)", r["kinds"], "kind", categories)
    lines += _diff_groups("Per module group", r["groups"], "group", categories)
    top = r["largest"]["top"]
    lines += _diff_largest(f"Largest changes by ‖Δ‖/‖W‖ (top {top})", r["largest"]["by_relative_change"])
    lines += _diff_largest(f"Largest changes by max |Δ| (top {top})", r["largest"]["by_max_abs_change"])
    odd = [t for t in r["tensors"] if t["category"] in ("only-in-base", "only-in-finetuned", "shape-mismatch")]
    if odd:
        rows = [[_name(t["name"]), t["category"], "×".join(map(str, t["base_shape"] or [])) or DASH,
                 "×".join(map(str, t["finetuned_shape"] or [])) or DASH] for t in odd]
        lines += ["", "Not compared"] + _table(["tensor", "category", "base shape", "fine-tuned shape"], rows, "ll")
    if r["notes"]:
        lines += [""] + [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"
