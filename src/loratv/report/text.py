"""Text renderings of a comparison record (schema `loratv.comparison`, docs/comparison-results.md) and of a
precision record (schema `loratv.precision`). They read the record alone, so a saved JSON re-renders later.
"""

DASH = "—"  # printed for every null value
CATEGORIES = ("shared", "adapter-only", "cast-artifact", "unexplained", "unchanged")
TV_ONLY = ("cast-artifact", "unexplained")
NAME_WIDTH = 60
DTYPE_NAMES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}


def _fmt(value, spec: str = "") -> str:
    return DASH if value is None else format(value, spec)


def _cos(value) -> str:
    """Cosine with 12 decimals plus 1 − cos, since cosines of matching tensors differ only far to the right."""
    return DASH if value is None else f"{value:.12f}  (1 − cos = {1 - value:.2e})"


def _name(name: str, width: int = NAME_WIDTH) -> str:
    """Truncate from the left: the end of a tensor name (layer, module) is the informative part."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def _pct(part, total) -> str:
    return DASH if not total else f"{100 * part / total:.1f}%"


def _table(headers, rows, align: str = "l") -> list[str]:
    """Fixed-width columns sized to their content; `align` gives 'l'/'r' per column, the rest right-aligned."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[j]) for row in cells) for j in range(len(headers))]
    align = align.ljust(len(headers), "r")

    def line(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    return [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(row) for row in cells[1:]]


def _key_values(pairs) -> list[str]:
    width = max(len(k) for k, _ in pairs)
    return [f"{k.ljust(width)} : {v}" for k, v in pairs]


def _section(title: str) -> list[str]:
    return ["", title, "=" * len(title)]


def _config_text(config) -> str:
    if not config:
        return DASH
    keys = ("r", "lora_alpha", "use_rslora", "target_modules", "modules_to_save", "bias")

    def value(v):
        return (", ".join(map(str, v)) or DASH) if isinstance(v, list) else _fmt(v)

    return "; ".join(f"{k}={value(config.get(k))}" for k in keys)


def _header(record) -> list[str]:
    inputs = record.get("inputs") or {}
    return ["loratv comparison report", "=" * 24] + _key_values([
        ("loratv version", _fmt(record.get("loratv_version"))),
        ("schema", f"{record.get('schema')} v{record.get('schema_version')}"),
        ("base", _fmt(inputs.get("base"))),
        ("adapter", _fmt(inputs.get("adapter"))),
        ("task vector", _fmt(inputs.get("task_vector"))),
        ("fine-tuned", _fmt(inputs.get("finetuned"))),
        ("adapter config", _config_text(inputs.get("adapter_config"))),
        ("tolerance", f"{_fmt(record.get('tolerance'), 'g')} (absolute, per element)"),
        ("reproduce with", _fmt(record.get("command"))),
    ])


def _verdict(summary) -> list[str]:
    lines = _section(f"Verdict: {summary['verdict']}")
    reasons = summary.get("reasons") or []
    return lines + ([f"  - {r}" for r in reasons] or ["  (certified: every targeted tensor within its bound)"])


def _counts(summary) -> list[str]:
    counts, params = summary["counts"], summary["parameters"]
    nt, np_ = summary["total_tensors"], summary["total_parameters"]

    def row(label, tensors, parameters):
        return [label, f"{tensors:,} of {nt:,} tensors", f"({_pct(tensors, nt)})",
                f"{parameters:,} of {np_:,} parameters", f"({_pct(parameters, np_)})"]

    rows = [row(c, counts.get(c, 0), params.get(c, 0)) for c in ("shared", "adapter-only", "tv-only")]
    rows += [row("  " + c, counts.get(c, 0), params.get(c, 0)) for c in TV_ONLY]
    rows += [row("unchanged", counts.get("unchanged", 0), params.get("unchanged", 0)),
             row("targeted", summary["targeted_tensors"], summary["targeted_parameters"]),
             row("changed", summary["changed_tensors"], summary["changed_parameters"])]
    intro = ["Tensors and parameters are different units: a tensor is one named array, a parameter one scalar.",
             "targeted = shared + adapter-only; changed = shared + tv-only; tv-only = cast-artifact + unexplained."]
    stored = f"Adapter stores {_fmt(summary.get('adapter_stored_parameters'), ',')} parameters."
    return _section("Counts by category") + intro + [""] + _table(
        ["category", "tensors", "%", "parameters", "%"], rows) + ["", stored]


def _statistics(summary) -> list[str]:
    shared = summary["counts"].get("shared", 0)
    threshold = _fmt(summary.get("perfect_match_threshold"), "g")
    return _section("Agreement") + _key_values([
        ("global cosine", _cos(summary.get("global_cosine"))),
        ("targeted cosine", _cos(summary.get("targeted_cosine"))),
        ("mean cosine (shared)", _cos(summary.get("mean_cosine"))),
        ("min cosine (shared)", _cos(summary.get("min_cosine"))),
        (f"perfect matches (cos > {threshold})", f"{summary.get('perfect_matches', 0)} of {shared} shared tensors"),
        ("max |T − ΔW| (targeted)", _fmt(summary.get("max_abs_diff"), ".3e")),
        ("max certificate ratio", _fmt(summary.get("max_certificate_ratio"), ".3g") + "  (≤ 1 is certified)"),
        *([("max tolerance ratio", _fmt(summary.get("max_tolerance_ratio"), ".3g")
            + f"  ({summary['uncertified_tensors']} tensors with no derived bound; ≤ 1 is within tolerance)")]
          if summary.get("uncertified_tensors") else []),
        ("relative Frobenius error", _fmt(summary.get("relative_frobenius_error"), ".3e")),
        ("worst tensors", ", ".join(summary.get("worst_tensors") or []) or DASH),
    ])


def _per_layer(tensors) -> list[str]:
    layers = sorted({t["layer"] for t in tensors if t["layer"] is not None})
    groups = [(str(layer), [t for t in tensors if t["layer"] == layer]) for layer in layers]
    globals_ = [t for t in tensors if t["layer"] is None]
    if globals_:
        groups.append(("global", globals_))
    rows = [[label] + [sum(t["category"] == c for t in group) for c in CATEGORIES] + [len(group)]
            for label, group in groups]
    return _section("Tensors per layer and category") + _table(["layer", *CATEGORIES, "total"], rows)


def _over(t: dict) -> float:
    """A targeted tensor's certificate ratio, or its tolerance ratio where no bound is derived."""
    ratio = t.get("certificate_ratio") if t.get("tolerance_ratio") is None else t.get("tolerance_ratio")
    return ratio or 0.0


def _targeted(tensors) -> list[str]:
    rows = [[_name(t["name"]), t["category"], _fmt(t["cosine"], ".12f"),
             _fmt(None if t["cosine"] is None else 1 - t["cosine"], ".2e"), _fmt(t["max_abs_diff"], ".3e"),
             _fmt(t["certificate_ratio"] if t.get("tolerance_ratio") is None else t["tolerance_ratio"], ".3g")
             + ("" if t.get("tolerance_ratio") is None else " (tol)"), _fmt(t["max_error_ulps"], ".3g"),
             _fmt(t["relative_frobenius_error"], ".3e")]
            for t in tensors if t["targeted"]]
    headers = ["tensor", "category", "cosine", "1 − cos", "max|T−ΔW|", "cert ratio", "max ulps", "rel frob err"]
    return _section(f"Targeted tensors ({len(rows)})") + (_table(headers, rows, "ll") if rows else ["  (none)"])


def _tv_only(tensors) -> list[str]:
    rows = [[_name(t["name"]), t["category"], _fmt(t["max_abs_task_vector"], ".3e"), _fmt(t["cast_dtype"])]
            for t in tensors if t["category"] in TV_ONLY]
    headers = ["tensor", "category", "max|T|", "cast dtype"]
    title = f"Changed tensors the adapter does not target (tv-only: {len(rows)})"
    return _section(title) + (_table(headers, rows, "ll") if rows else ["  (none)"])


def render_comparison_text(record: dict) -> str:
    """The `detailed_comparison_report.txt` of a comparison record.

    Args:
        record: the comparison record (`loratv.comparison`).

    Returns:
        The report text.
    """
    summary, tensors = record["summary"], record["tensors"]
    notes = [f"  - {n}" for n in record.get("notes") or []] or ["  (none)"]
    lines = (_header(record) + _verdict(summary) + _counts(summary) + _statistics(summary)
             + _per_layer(tensors) + _targeted(tensors) + _tv_only(tensors) + _section("Notes") + notes)
    return "\n".join(lines) + "\n"


def _dtype_name(code) -> str:
    return DTYPE_NAMES.get(code, str(code).lower())


def worst_tensor_lines(record: dict, limit: int = 5) -> list:
    """Where a NOT EQUIVALENT verdict comes from, for the printed summary: the targeted tensors whose certificate
    ratio exceeds 1, largest first, each with the element where the ratio peaks, |T − ΔW| there and the ratio; then
    the unexplained tensors with their largest change.

    Args:
        record: a comparison record (schema `loratv.comparison`).
        limit: how many tensors of each kind to name.

    Returns:
        Lines to print (empty when nothing exceeds its bound and nothing is unexplained).
    """
    tensors = record.get("tensors") or []
    over = sorted((t for t in tensors if t.get("targeted") and _over(t) > 1), key=lambda t: -_over(t))
    unexplained = sorted((t for t in tensors if t.get("category") == "unexplained"),
                         key=lambda t: -(t.get("max_abs_task_vector") or 0))
    lines = []
    if over:
        lines.append(f"Tensors beyond their rounding bound ({len(over)}; worst first):")
        for t in over[:limit]:
            where = t.get("worst_element")
            diff = t.get("worst_element_diff")
            at = f" at element {where}" if where is not None else ""
            there = f": |T − ΔW| = {diff:.3e}" if diff is not None else f": max |T − ΔW| = {t['max_abs_diff']:.3e}"
            limit_name = "the rounding bound" if t.get("tolerance_ratio") is None else "the tolerance (no derived bound)"
            lines.append(f"  {t['name']}{at}{there}, {_over(t):.3g}× {limit_name}")
        if len(over) > limit:
            lines.append(f"  … and {len(over) - limit} more")
    if unexplained:
        lines.append(f"Unexplained changes in untargeted tensors ({len(unexplained)}; largest first):")
        for t in unexplained[:limit]:
            lines.append(f"  {t['name']}: max |T| = {t.get('max_abs_task_vector') or 0:.3e}")
        if len(unexplained) > limit:
            lines.append(f"  … and {len(unexplained) - limit} more")
    return lines


def render_seed_summary(record: dict) -> str:
    """The short summary `loratv validate` prints, in the seed script's wording, plus what tv-only tensors are.

    Args:
        record: the comparison record (`loratv.comparison`).

    Returns:
        The summary text, ending in a newline.
    """
    s = record["summary"]
    counts = s["counts"]
    shared = counts.get("shared", 0)
    lines = [
        f"Shared tensors analysed: {shared}",
        f"Average cosine similarity: {_fmt(s.get('mean_cosine'), '.10f')}",
        f"Global cosine: {_fmt(s.get('global_cosine'), '.10f')}",
        f"Max absolute difference: {_fmt(s.get('max_abs_diff'), '.3e')}",
        f"Perfect matches (cosine > {_fmt(s.get('perfect_match_threshold'), 'g')}): "
        f"{s.get('perfect_matches', 0)} of {shared}",
        f"Verdict: {s['verdict']}",
    ]
    if s["verdict"] == "NOT EQUIVALENT":
        lines += worst_tensor_lines(record)
    tv_only = counts.get("tv-only", 0)
    if tv_only > 0:
        cast, unexplained = counts.get("cast-artifact", 0), counts.get("unexplained", 0)
        codes = dict.fromkeys(t["cast_dtype"] for t in record["tensors"]
                              if t["category"] == "cast-artifact" and t.get("cast_dtype"))
        what = f"{cast} of them are cast artifacts"
        if codes:
            dtypes = " or ".join(_dtype_name(c) for c in codes)
            what += (f": the fine-tuned tensor equals the base cast to {dtypes} bit for bit"
                     " (rounding of the untouched weights, not training)")
        lines += ["", f"{tv_only} tensors changed that the adapter does not target; {what}; "
                      f"{unexplained} are unexplained."]
    return "\n".join(lines) + "\n"


def render_precision_text(record: dict) -> str:
    """One table row per merge path of a precision record (schema `loratv.precision`).

    Args:
        record: the precision record.

    Returns:
        The text: the table, the paths' descriptions, a column key and the notes, ending in a newline.
    """
    rows = []
    for p in record["paths"]:
        c = p["counts"]
        rows.append([p["name"], p["output_dtype"], f"{p['changed_tensors']:,} of {p['total_tensors']:,}",
                     c.get("real", 0), c.get("cast-artifact", 0), c.get("unexplained", 0), c.get("unchanged", 0),
                     f"{p['vanished_elements']:,} of {p['targeted_elements']:,}", _fmt(p["effective_cosine"], ".12f"),
                     _fmt(p["max_error_ulps"], ".3g"), _fmt(p["max_certificate_ratio"], ".3g"), p["verdict"]])
    headers = ["path", "dtype", "changed tensors", "real", "cast-artifact", "unexplained", "unchanged",
               "vanished elements", "effective cosine", "max ulps", "max cert", "verdict"]
    table = _table(headers, rows, "ll" + "r" * 9 + "l") if rows else ["  (no paths)"]
    lines = ["loratv precision study", "=" * 22] + _key_values(
        [("base", _fmt(record.get("base"))), ("adapter", _fmt(record.get("adapter")))])
    lines += [""] + table + ["", "Paths:"] + [f"  {p['name']}: {p['description']}" for p in record["paths"]]
    lines += ["", "Columns:",
              "  real / cast-artifact / unexplained: changed tensors the adapter targets / that equal the base cast to",
              "    the output dtype bit for bit / anything else",
              "  vanished elements: targeted elements where ΔW ≠ 0 but the stored weight is the base in that dtype",
              "  effective cosine: between what the merge stored (fine-tuned − base) and ΔW, over targeted tensors",
              "  max ulps: largest |T − ΔW| in ulps of the output dtype at the weight's magnitude (an fp32 ulp is",
              "    8192 times finer than an fp16 one)",
              "  max cert: largest certificate ratio; ≤ 1 means every element is within the rounding bound"]
    lines += [f"note: {n}" for n in record.get("notes", [])]
    return "\n".join(lines) + "\n"


def render_to_lora_text(record: dict) -> str:
    """What `loratv to-lora` wrote and what it lost: the summary, then the tensors with the largest errors.

    Args:
        record: the to-lora record (`loratv.to_lora`).

    Returns:
        The report text.
    """
    s = record["summary"]
    criterion = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in record["criterion"].items() if v is not None)
    ranks = _fmt(s["rank_min"]) if s["rank_min"] == s["rank_max"] else f"{s['rank_min']}–{s['rank_max']}"
    lines = [
        f"to-lora: {s['changed_tensors']} changed tensors → {s['lora_modules']} LoRA modules "
        f"(rank {ranks}; criterion: {criterion}), {s['full_value_tensors']} full values, "
        f"{s['excluded_tensors']} excluded" + (f", {s['tied_tensors']} tied" if s["tied_tensors"] else "")
        + (f", {s['skipped_cast_artifacts']} cast artifacts skipped" if s["skipped_cast_artifacts"] else ""),
        f"overall: relative Frobenius error {s['relative_error']:.3e}, energy retained {s['energy_retained']:.6f}, "
        f"{s['adapter_parameters']:,} stored parameters for {s['changed_parameters']:,} changed "
        f"({_pct(s['adapter_parameters'], s['changed_parameters'])})",
    ]
    worst = sorted(record["tensors"], key=lambda t: -t["relative_error"])[:8]
    if worst:
        lines += ["", "largest relative errors:"]
        rows = [(_name(t["name"], 56), t["handling"], _fmt(t["rank"]), f"{t['relative_error']:.3e}",
                 f"{t['energy_retained']:.6f}") for t in worst]
        lines += _table(["tensor", "handling", "rank", "rel. error", "energy"], rows, "ll")
    lines += [f"note: {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"
