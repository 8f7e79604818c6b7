"""report.html: one self-contained page rendered from the JSON records in an output folder.

It reads `comparison_results.json`, `precision_results.json` (with each path's `PATH/comparison_results.json`) and
`analysis_results.json`, whichever are there, and embeds the PNG plots beside them as data URIs (a plot that is
missing, e.g. after `--no-plots`, is rendered from its record in a temporary folder). No network: a
Content-Security-Policy forbids every load but data: images, and the script only sorts and filters tables that are
complete without it. `loratv report OUT/` re-renders the page from the saved records.
"""

import base64
import html
import math
import re
import struct
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loratv.errors import LoratvError
from loratv.io import safe_json
from loratv.io.outputs import atomic_output_file
from loratv.report import analysis_plots
from loratv.report import plots as comparison_plots
from loratv.report.analysis_plots import write_analysis_plots
from loratv.report.html_assets import CSS, JS
from loratv.report.plots import precision_plot, write_comparison_plots
from loratv.report.similarity_plots import heatmap_plot as similarity_heatmap_plot
from loratv.report.similarity_plots import per_layer_plot as similarity_per_layer_plot
from loratv.version import __version__

REPORT_FILE = "report.html"
# the record file names and schemas of compare.py, precision_study.py and analyze.py (tests check they agree;
# imported by value so that `loratv report` does not load torch)
COMPARISON_FILE, COMPARISON_SCHEMA = "comparison_results.json", "loratv.comparison"
PRECISION_FILE, PRECISION_SCHEMA = "precision_results.json", "loratv.precision"
ANALYSIS_FILE, ANALYSIS_SCHEMA = "analysis_results.json", "loratv.analysis"
VERIFY_MERGE_FILE, VERIFY_MERGE_SCHEMA = "verify_merge.json", "loratv.verify_merge"
SIMILARITY_FILE, SIMILARITY_SCHEMA = "similarity.json", "loratv.similarity"
SIMILARITY_PLOTS = {"heatmap": "similarity_heatmap.png", "per_layer": "similarity_per_layer.png"}
MAX_KIND_MATRICES_INPUTS = 60  # above this many inputs only the global matrix is rendered (page size)
PRECISION_PLOT = "precision_comparison.png"
SCHEMA_VERSION = 1
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "base-uri 'none'; form-action 'none'")
DASH = "—"
CATEGORIES = ("shared", "adapter-only", "cast-artifact", "unexplained", "unchanged")
ANALYSIS_CATEGORIES = ("shared", "adapter-only", "task-vector-only")
LETTERS = {"shared": "S", "adapter-only": "A", "cast-artifact": "C", "unexplained": "U", "unchanged": "·",
           "task-vector-only": "T"}
MEANING = {
    "shared": "targeted by the adapter and changed in the task vector: compared element by element",
    "adapter-only": "targeted by the adapter, unchanged in the task vector",
    "cast-artifact": "not targeted; changed only because the base was rounded to the fine-tuned dtype, bit for bit",
    "unexplained": "not targeted, changed, and not the base cast to the fine-tuned dtype",
    "unchanged": "neither targeted nor changed",
    "task-vector-only": "changed in the task vector, not by the adapter",
}
VERDICT_CLASS = {"EQUIVALENT (certified)": "v-certified", "EQUIVALENT within tolerance": "v-tolerance",
                 "CONSISTENT (masks not reproducible)": "v-tolerance", "NOT EQUIVALENT": "v-not"}
VERDICT_MARK = {"v-certified": "✓", "v-tolerance": "≈", "v-not": "✗", "v-none": "?"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+@([\w./-]+)$")  # org/name@revision, as checkpoint.py accepts


@dataclass
class Records:
    """The records found in one output folder (None where absent)."""
    folder: Path
    comparison: dict | None = None
    precision: dict | None = None
    paths: dict = field(default_factory=dict)  # precision path name -> its comparison record
    analysis: dict | None = None
    verification: dict | None = None  # verify-merge's record
    similarity: dict | None = None  # similarity's record


# ---------------------------------------------------------------- reading and writing

def _read_record(path: Path, schema: str) -> dict:

    try:  # strict: no duplicate keys, NaN, lone surrogates or runaway nesting (loratv never writes them)
        record = safe_json.loads(path.read_bytes(), path)
    except LoratvError as exc:
        raise LoratvError(f"{str(exc).rstrip('.')}; nothing was written.") from None
    if not isinstance(record, dict):
        raise LoratvError(f"{path}: holds a JSON {type(record).__name__}, not a {schema} record; nothing was written.")
    if record.get("schema") != schema:
        raise LoratvError(f"{path}: schema is {record.get('schema')!r}, expected {schema!r}; nothing was written.")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise LoratvError(f"{path}: schema_version {record.get('schema_version')!r} is not one this loratv reads "
                          f"({SCHEMA_VERSION}); nothing was written.")
    _check_fields(record, schema, path)
    return record


def _require(obj, keys, where: str, path: Path, kind=dict) -> None:
    if not isinstance(obj, kind):
        raise LoratvError(f"{path}: {where} is not a JSON {'object' if kind is dict else 'list'}; nothing was written.")
    missing = [k for k in keys if k not in obj] if kind is dict else []
    if missing:
        raise LoratvError(f"{path}: {where} lacks {', '.join(missing)}; nothing was written.")


def _check_fields(record: dict, schema: str, path: Path) -> None:
    """The fields the page reads; anything else missing is shown as a dash."""
    if schema == COMPARISON_SCHEMA:
        _require(record, ("inputs", "summary", "tensors"), "the record", path)
        _require(record["summary"], ("verdict", "counts", "total_tensors"), "summary", path)
        _require(record["tensors"], (), "tensors", path, list)
        for i, t in enumerate(record["tensors"]):
            _require(t, ("name", "layer", "kind", "category"), f"tensors[{i}]", path)
            if t["category"] not in CATEGORIES:
                raise LoratvError(f"{path}: tensors[{i}] has category {t['category']!r}, not one of "
                                  f"{', '.join(CATEGORIES)}; nothing was written.")
    elif schema == VERIFY_MERGE_SCHEMA:
        _require(record, ("summary", "tensors", "inputs", "merge_method"), "the record", path)
        _require(record["summary"], ("verdict", "tensors"), "summary", path)
        _require(record["tensors"], (), "tensors", path, list)
        _require(record["inputs"], (), "inputs", path, list)
        for i, t in enumerate(record["tensors"]):
            _require(t, ("name", "kind"), f"tensors[{i}]", path)
    elif schema == SIMILARITY_SCHEMA:
        _require(record, ("adapters", "cosine", "clustering", "per_kind"), "the record", path)
        _require(record["cosine"], (), "cosine", path, list)
        if len(record["cosine"]) != len(record["adapters"]):
            raise LoratvError(f"{path}: cosine has {len(record['cosine'])} rows for {len(record['adapters'])} "
                              "adapters; nothing was written.")
    elif schema == PRECISION_SCHEMA:
        _require(record, ("paths",), "the record", path)
        _require(record["paths"], (), "paths", path, list)
        for i, p in enumerate(record["paths"]):
            _require(p, ("name", "verdict", "counts"), f"paths[{i}]", path)
    else:
        _require(record, ("inputs", "summary", "tensors"), "the record", path)
        _require(record["tensors"], (), "tensors", path, list)
        for i, t in enumerate(record["tensors"]):
            _require(t, ("name", "category"), f"tensors[{i}]", path)


def load_records(folder) -> Records:
    """Every record in `folder`; one clear LoratvError when there is none or one is unreadable.

    Args:
        folder: an output folder of compare, validate, precision or analyze.

    Returns:
        The Records: comparison, precision and analysis where their JSON files exist, and for a precision record the
        comparison record of each path that has a sub-folder with one.

    Raises:
        LoratvError: `folder` is not a folder, holds no record, or a record is unreadable, of the wrong schema or
            missing a required field.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LoratvError(f"{folder}: not a folder; give the output folder of compare, validate, precision or analyze.")
    records = Records(folder)
    for attr, name, schema in (("comparison", COMPARISON_FILE, COMPARISON_SCHEMA),
                               ("precision", PRECISION_FILE, PRECISION_SCHEMA),
                               ("analysis", ANALYSIS_FILE, ANALYSIS_SCHEMA),
                               ("verification", VERIFY_MERGE_FILE, VERIFY_MERGE_SCHEMA),
                               ("similarity", SIMILARITY_FILE, SIMILARITY_SCHEMA)):
        if (folder / name).is_file():
            setattr(records, attr, _read_record(folder / name, schema))
    if records.precision is not None:
        for p in records.precision["paths"]:
            name = str(p["name"])
            sub = folder / name / COMPARISON_FILE
            if re.fullmatch(r"[\w.+-]+", name) and name not in (".", "..") and sub.is_file():
                records.paths[name] = _read_record(sub, COMPARISON_SCHEMA)
    if records.comparison is None and records.precision is None and records.analysis is None and \
            records.verification is None and records.similarity is None:
        raise LoratvError(f"{folder}: holds no {COMPARISON_FILE}, {PRECISION_FILE}, {ANALYSIS_FILE}, "
                          f"{VERIFY_MERGE_FILE} or {SIMILARITY_FILE}; nothing to report, nothing was written.")
    return records


def plot_files(records: Records) -> dict:
    """PNG file name -> the record kind whose plot it is, for the records present.

    Args:
        records: the records of one folder.

    Returns:
        {file name: "comparison", "precision" or "analysis"}; the spectra plots only when the analysis has a spectrum.
    """

    files = {}
    if records.comparison is not None:
        files.update({name: "comparison" for name in comparison_plots.FILES.values()})
    if records.precision is not None:
        files[PRECISION_PLOT] = "precision"
    if records.analysis is not None:
        keys = ["scatter", "distributions", "ulps"] + (["spectra", "ranks"] if records.analysis.get("spectrum") else [])
        files.update({analysis_plots.FILES[k]: "analysis" for k in keys})
    if records.similarity is not None:
        files.update({name: "similarity" for name in SIMILARITY_PLOTS.values()})
    return files


def collect_images(records: Records) -> dict:
    """PNG bytes per file name: the file in the folder, or (when missing) rendered from the record.

    Args:
        records: the records of one folder; missing plots are drawn in a temporary folder, the folder is not written.

    Returns:
        {file name: PNG bytes} for every file of plot_files(records) that exists or could be drawn.
    """

    wanted = plot_files(records)
    images = {name: (records.folder / name).read_bytes() for name in wanted if (records.folder / name).is_file()}
    missing = {wanted[name] for name in wanted if name not in images}
    if missing:
        with tempfile.TemporaryDirectory(prefix="loratv-report-") as tmp_name:
            tmp = Path(tmp_name)
            # a kind is in `missing` only when its record is present (plot_files)
            if "comparison" in missing and records.comparison is not None:
                write_comparison_plots(records.comparison, tmp)
            if "precision" in missing and records.precision is not None:
                precision_plot(records.precision, tmp / PRECISION_PLOT)
            if "analysis" in missing and records.analysis is not None:
                write_analysis_plots(records.analysis, tmp)
            if "similarity" in missing and records.similarity is not None:
                similarity_heatmap_plot(records.similarity, tmp / SIMILARITY_PLOTS["heatmap"])
                similarity_per_layer_plot(records.similarity, tmp / SIMILARITY_PLOTS["per_layer"])
            images.update({name: (tmp / name).read_bytes() for name in wanted
                           if name not in images and (tmp / name).is_file()})
    return images


def write_report(folder) -> Path:
    """Render FOLDER/report.html from the records there; written beside its final name, then renamed into place.

    Args:
        folder: an output folder of compare, validate, precision or analyze.

    Returns:
        The path of report.html (replaced if it existed).

    Raises:
        LoratvError: no readable record in the folder (from load_records), or a record field of the wrong shape;
            nothing is written then.
    """

    folder = Path(folder)
    records = load_records(folder)
    try:
        render_report(records, {})  # a malformed field fails here, in milliseconds, before any plot is drawn
        page = render_report(records, collect_images(records))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise LoratvError(f"{folder}: a record there has a field of the wrong shape ({type(exc).__name__}: {exc}); "
                          "nothing was written.") from exc
    target = folder / REPORT_FILE
    with atomic_output_file(target, force=True) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return target


# ---------------------------------------------------------------- number formatting (HTML-safe strings)

def _e(value) -> str:
    return html.escape(str(value), quote=True)


def sci(x, digits: int = 3) -> str:
    """A float for reading: plain between 0.001 and 10⁶, else mantissa × 10^exponent.

    Args:
        x: a number, or None.
        digits: significant digits.

    Returns:
        HTML-safe text: "0", the plain number (thousands separated at 10³ and above), "m × 10<sup>e</sup>", the
        escaped repr of a non-finite value, or the dash for None; minus signs as U+2212.
    """
    if x is None:
        return DASH
    x = float(x)
    if not math.isfinite(x):
        return _e(x)
    if x == 0:
        return "0"
    a = abs(x)
    if 1e3 <= a < 1e6:
        return f"{x:,.0f}".replace("-", "−")
    if 1e-3 <= a < 1e3:
        text = f"{x:.{digits}g}"
        if "e" not in text:  # 999.9 rounds to 1e+03: written as a power below
            return text.replace("-", "−")
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa} × 10<sup>{int(exponent)}</sup>".replace("-", "−")


def cos(c) -> str:
    """A cosine: near 1 as `1 − gap`, since matching tensors differ only far right of the point.

    Args:
        c: the cosine, or None.

    Returns:
        "1", "1 − gap" for 0 < 1 − c < 10⁻⁴, else six decimals; the dash for None.
    """
    if c is None:
        return DASH
    gap = 1.0 - float(c)
    if gap == 0:
        return "1"
    if 0 < gap < 1e-4:
        return f"1 − {sci(gap)}"
    return f"{float(c):.6f}".replace("-", "−")


def integer(n) -> str:
    """An integer with thousands separators.

    Args:
        n: an int (or anything int() takes), or None.

    Returns:
        "1,234", or the dash for None.
    """
    return DASH if n is None else f"{int(n):,}"


def params(n) -> str:
    """A parameter count with its size in words: 1,407,616 (1.41 M).

    Args:
        n: the count, or None.

    Returns:
        The count with separators and, from 1,000 up, its size in k, M or B; the dash for None.
    """
    if n is None:
        return DASH
    n = int(n)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n:,} ({n / size:.3g} {unit})"
    return f"{n:,}"


def _raw(x) -> str:
    return "" if x is None else repr(float(x)) if isinstance(x, float) else str(x)


def _field(row: dict, key: str, fmt) -> str:
    """The numeric cell of row[key], shown through `fmt`."""
    return _num_cell(row.get(key), fmt(row.get(key)))


def _num_cell(x, shown: str) -> str:
    """A right-aligned cell that sorts on its exact value and shows it on hover."""
    raw = _raw(x)
    title = f' title="{_e(raw)}"' if raw and isinstance(x, float) else ""
    return f'<td class="n" data-v="{_e(raw)}"{title}>{shown}</td>'


def _chip(category: str) -> str:
    return f'<span class="chip c-{_e(category)}" aria-hidden="true">{LETTERS.get(category, "?")}</span> '


def _cat_cell(category: str) -> str:
    return f'<td data-v="{_e(category)}">{_chip(category)}{_e(category)}</td>'


# ---------------------------------------------------------------- building blocks

def _heading(level: int, ident: str, text: str) -> str:
    return f'<h{level} id="{_e(ident)}">{text}</h{level}>'


def _numbers(items) -> str:
    """Headline numbers as a definition list of cards: (label, value html, small html or None)."""
    cards = []
    for label, value, small in items:
        extra = f"<small>{small}</small>" if small else ""
        cards.append(f"<div><dt>{label}</dt><dd>{value}{extra}</dd></div>")
    return '<dl class="numbers">' + "".join(cards) + "</dl>"


def _kv(rows) -> str:
    body = "".join(f'<tr><th scope="row">{k}</th><td>{v}</td></tr>' for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _source(path) -> str:
    """A path or hub id as given, with a pinned hub revision named."""
    if path is None:
        return DASH
    text = f"<code>{_e(path)}</code>"
    match = HUB_ID.match(str(path))
    if match and not str(path).startswith((".", "/")):
        text += f' <span class="note">(hub revision <code>{_e(match.group(1))}</code>)</span>'
    return text


def _png_size(data: bytes):
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return struct.unpack(">II", data[16:24])
    return None


def _figure(images: dict, name: str, alt: str, caption: str) -> str:
    data = images.get(name)
    if data is None:
        return ""
    size = _png_size(data)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{uri}" alt="{_e(alt)}"{dims} data-file="{_e(name)}">'
            f"<figcaption>{caption} <span class=\"mono\">({_e(name)})</span></figcaption></figure>")


def _list(items, cls: str) -> str:
    return f'<ul class="{cls}">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>" if items else ""


def _tools(table_id: str, noun: str, categories: dict, example: str) -> str:
    options = "".join(f'<option value="{_e(c)}">{_e(c)} ({n:,})</option>' for c, n in categories.items() if n)
    return (f'<div class="tools" data-tools-for="{_e(table_id)}" hidden>'
            f'<label>Tensor name contains <input type="search" placeholder="e.g. {_e(example)}" '
            f'aria-controls="{_e(table_id)}" autocomplete="off"></label>'
            f'<label>Category <select aria-controls="{_e(table_id)}"><option value="">all categories</option>'
            f'{options}</select></label><output aria-live="polite"></output></div>'
            f'<noscript><p class="note">Sorting and filtering need JavaScript; every {noun[:-1]} is listed below.'
            "</p></noscript>")


def _th(label: str, kind, title, sortable: bool = False) -> str:
    attrs = ' class="n"' if kind == "num" else ""
    if sortable and kind:
        attrs += f' data-sort="{kind}"'
    if title:
        attrs += f' title="{_e(title)}"'
    return f'<th scope="col"{attrs}>{label}</th>'


def _data_table(table_id: str, noun: str, caption: str, headers, rows) -> str:
    """headers: (label html, 'num'|'text'|None, title); rows: (row id, category, [cell html]). Column 1 is the name."""
    head = "".join(_th(label, kind, title, sortable=True) for label, kind, title in headers)
    body = "".join(f'<tr id="{_e(rid)}" data-cat="{_e(cat)}">{"".join(cells)}</tr>' for rid, cat, cells in rows)
    return (f'<div class="scroll tall"><table class="data" id="{_e(table_id)}" data-interactive data-name-col="1" '
            f'data-noun="{_e(noun)}"><caption class="note">{caption}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


# ---------------------------------------------------------------- comparison

def _row_id(prefix: str, i: int) -> str:
    return f"{prefix}-t{i}"


def _verdict_block(summary: dict, ident: str) -> str:
    verdict = summary["verdict"]
    cls = VERDICT_CLASS.get(verdict, "v-none")
    return (f'<p class="verdict {cls}" id="{_e(ident)}" data-verdict="{_e(verdict)}">'
            f'<span aria-hidden="true">{VERDICT_MARK[cls]}</span> {_e(verdict)}</p>')


def _lead(rec: dict) -> str:
    s, counts = rec["summary"], rec["summary"]["counts"]
    targeted = s.get("targeted_tensors", counts.get("shared", 0) + counts.get("adapter-only", 0))
    parts = []
    if s.get("certified"):
        parts.append(f"Every one of the {targeted:,} tensors the adapter targets equals the task vector within the "
                     f"floating-point rounding bound of its merge (largest ratio to the bound "
                     f"{sci(s.get('max_certificate_ratio'))}; at most 1 is certified).")
    elif s["verdict"] == "EQUIVALENT within tolerance" and s.get("uncertified_tensors"):
        parts.append(f"The {s['uncertified_tensors']:,} targeted tensors are merged by PEFT's own code, for which "
                     "loratv derives no rounding bound: each is within its tolerance (½ ulp of the output dtype "
                     "plus 4 × the largest error of PEFT's own merge of it against its float64 evaluation; largest "
                     f"ratio {sci(s.get('max_tolerance_ratio'))}). Equivalent, not certified.")
    elif s["verdict"] == "EQUIVALENT within tolerance":
        parts.append(f"The rounding certificate fails, but every difference is within the tolerance "
                     f"{sci(rec.get('tolerance'))}.")
    else:
        parts.append("The task vector is not the adapter's delta: see the reasons below and the worst tensors.")
    cast = [t for t in rec["tensors"] if t["category"] == "cast-artifact"]
    if cast:
        dtypes = ", ".join(sorted({str(t.get("cast_dtype") or t.get("finetuned_dtype")) for t in cast}))
        parts.append(f"The {len(cast):,} other changed tensors are the base cast to {_e(dtypes)}, bit for bit: "
                     "rounding, not training.")
    if counts.get("unexplained"):
        parts.append(f"{counts['unexplained']:,} changed tensors are unexplained: not targeted and not a cast of "
                     "the base.")
    return '<p class="lead">' + " ".join(parts) + "</p>"


def _category_bar(counts: dict, total: int, categories=CATEGORIES, explain: bool = True) -> str:
    """Tensors per category as a proportional bar; the legend carries the numbers (and, with explain, what each
    category means), so the bar itself is decoration."""
    total = total or 1
    spans = "".join(f'<span class="c-{c}" style="width:{100 * counts.get(c, 0) / total:.3f}%" '
                    f'title="{c}: {counts.get(c, 0):,}"></span>' for c in categories if counts.get(c))
    legend = "".join(f"<li>{_chip(c)}<strong>{_e(c)}</strong> {counts.get(c, 0):,} "
                     f"({100 * counts.get(c, 0) / total:.1f}%)" + (f": {MEANING[c]}" if explain else "") + "</li>"
                     for c in categories if explain or counts.get(c))
    cls = "legend explain" if explain else "legend"
    return f'<div class="bar" aria-hidden="true">{spans}</div><ul class="{cls}">{legend}</ul>'


def _comparison_numbers(rec: dict) -> str:
    s, counts = rec["summary"], rec["summary"]["counts"]
    g = s.get
    return _numbers([
        ("Tensors in the base", integer(g("total_tensors")), f"{params(g('total_parameters'))} parameters"),
        ("Changed in the task vector", integer(g("changed_tensors")), f"{params(g('changed_parameters'))} parameters"),
        ("Targeted by the adapter", integer(g("targeted_tensors")),
         f"the adapter stores {params(g('adapter_stored_parameters'))} parameters"),
        ("Shared (both change)", integer(counts.get("shared")),
         f"{integer(g('perfect_matches'))} with cosine &gt; {_e(g('perfect_match_threshold', 0.9999))}"),
        ("Cast artifacts", integer(counts.get("cast-artifact")), "the base rounded to the fine-tuned dtype"),
        ("Unexplained", integer(counts.get("unexplained")), "changed, not targeted, not a cast"),
        ("Cosine, targeted tensors", cos(g("targeted_cosine")), f"all tensors: {cos(g('global_cosine'))}"),
        ("Smallest cosine (shared)", cos(g("min_cosine")), f"mean {cos(g('mean_cosine'))}"),
        ("Max |T − ΔW|", sci(g("max_abs_diff")), f"weight units (tolerance {sci(rec.get('tolerance'))}); "
                                                  f"‖T − ΔW‖ / ‖T‖ = {sci(g('relative_frobenius_error'))}"),
        ("Max certificate ratio", sci(g("max_certificate_ratio")), "|T − ΔW| / rounding bound; ≤ 1 is certified"),
        *([("Max tolerance ratio", sci(g("max_tolerance_ratio")),
            f"{integer(g('uncertified_tensors'))} tensors merged by PEFT's own code with no derived bound: "
            "|T − ΔW| / (½ ulp + 4 × PEFT's own error); ≤ 1 is within tolerance, never certified")]
          if g("uncertified_tensors") else []),
    ])


def _dtype_counts(tensors, key: str) -> str:
    counts = Counter(str(t.get(key)) for t in tensors if t.get(key))
    return ", ".join(f"{_e(k)} × {n:,}" for k, n in counts.most_common()) or DASH


def _config_value(v) -> str:
    if isinstance(v, list):
        return ", ".join(f"<code>{_e(x)}</code>" for x in v) or DASH
    if isinstance(v, dict):
        return ", ".join(f"<code>{_e(k)}</code>: {_e(x)}" for k, x in v.items()) or DASH
    return DASH if v is None else f"<code>{_e(v)}</code>"


def _comparison_inputs(rec: dict) -> str:
    inputs = rec["inputs"] or {}
    rows = [("Base", _source(inputs.get("base"))), ("Adapter", _source(inputs.get("adapter")))]
    if inputs.get("task_vector") is not None:
        rows.append(("Task vector", _source(inputs.get("task_vector"))))
    if inputs.get("finetuned") is not None:
        rows.append(("Fine-tuned model", _source(inputs.get("finetuned"))))
    rows += [("Base dtypes", _dtype_counts(rec["tensors"], "base_dtype")),
             ("Fine-tuned dtypes", _dtype_counts(rec["tensors"], "finetuned_dtype")),
             ("Tolerance (fallback)", f"{sci(rec.get('tolerance'))} absolute, per element"),
             ("loratv", f"{_e(rec.get('loratv_version', DASH))} (record {_e(rec.get('schema'))} "
                        f"v{_e(rec.get('schema_version'))})")]
    config = inputs.get("adapter_config") or {}
    out = _kv(rows)
    if config:
        out += "<h3>Adapter configuration</h3>" + _kv((f"<code>{_e(k)}</code>", _config_value(v))
                                                      for k, v in config.items())
    out += ('<p class="note">Paths and hub ids are recorded as given; a hub id without <code>@revision</code> '
            "follows the hub's default branch.</p>")
    notes = rec.get("notes") or []
    if notes:
        out += "<h3>Notes</h3>" + _list([_e(n) for n in notes], "notes")
    return out


def _grid(tensors) -> tuple:
    layered = [(i, t) for i, t in enumerate(tensors) if t["layer"] is not None]
    layers = sorted({t["layer"] for _, t in layered})
    kinds = list(dict.fromkeys(t["kind"] for _, t in layered))
    return layered, layers, kinds


def coverage_table(tensors, prefix: str, table_id: str) -> str:
    """Layers × module kinds as an HTML table: each cell a letter and colour for its tensor's category, linking to
    its row in the tensor table; tensors outside layers listed below.

    Args:
        tensors: the record's tensor entries (each with "name", "layer", "kind", "category").
        prefix: the row-id prefix of the tensor table the cells link to.
        table_id: the HTML id of the grid table.

    Returns:
        The HTML fragment (empty when there are no tensors).
    """
    layered, layers, kinds = _grid(tensors)
    cells, others = {}, [(i, t) for i, t in enumerate(tensors) if t["layer"] is None]
    for i, t in layered:
        if (t["layer"], t["kind"]) in cells:  # two tensors in one cell (unusual names): list the second below
            others.append((i, t))
        else:
            cells[(t["layer"], t["kind"])] = (i, t)
    out = []
    if layers:
        head = "".join(f'<th scope="col" title="{_e(k)}"><span>{_e(k)}</span></th>' for k in kinds)
        rows = []
        for layer in layers:
            tds = []
            for kind in kinds:
                hit = cells.get((layer, kind))
                if hit is None:
                    tds.append('<td class="empty" title="no tensor"></td>')
                    continue
                i, t = hit
                c = t["category"]
                tds.append(f'<td class="c-{_e(c)}"><a href="#{_row_id(prefix, i)}" title="{_e(t["name"])}: '
                           f'{_e(c)}">{LETTERS.get(c, "?")}</a></td>')
            rows.append(f'<tr><th scope="row">{_e(layer)}</th>{"".join(tds)}</tr>')
        out.append(f'<p class="note">{len(layers)} layers × {len(kinds)} module kinds: one letter and colour per '
                   f'tensor (legend above), blank where a layer has no such tensor. Select a cell to jump to its row '
                   f'in the tensor table.</p><div class="scroll fit"><table class="grid" id="{_e(table_id)}">'
                   f'<caption class="visually-hidden">Category of each tensor by layer and module kind</caption>'
                   f'<thead><tr><th scope="col">layer</th>{head}</tr></thead>'
                   f'<tbody>{"".join(rows)}</tbody></table></div>')
    if others:
        items = [f'<a href="#{_row_id(prefix, i)}">{_chip(t["category"])}<code>{_e(t["name"])}</code></a> '
                 f'{_e(t["category"])}' for i, t in others]
        out.append(f"<p>Tensors outside the layers ({len(others)}):</p>" + _list(items, "globals"))
    return "".join(out)


TENSOR_HEADERS = [
    ("#", "num", "position in the base model"),
    ("tensor", "text", None),
    ("category", "text", None),
    ("dtype", "text", "base dtype → fine-tuned dtype"),
    ("parameters", "num", None),
    ("cosine", "num", "cosine between the task vector T and the LoRA delta ΔW"),
    ("max |T − ΔW|", "num", "largest element-wise difference (weight units); for untargeted tensors max |T|"),
    ("certificate ratio", "num", "max |T − ΔW| / rounding bound, per element; ≤ 1 is certified (for tensors "
                                 "with no derived bound: / tolerance, ≤ 1 is within it)"),
    ("max error (ulps)", "num", "max |T − ΔW| in units in the last place of the fine-tuned dtype"),
    ("‖T‖", "num", "Frobenius norm of the task vector"),
    ("‖ΔW‖", "num", "Frobenius norm of the LoRA delta"),
]


def tensor_table(rec: dict, prefix: str, table_id: str) -> str:
    """The sortable, filterable table of a comparison record's tensors (TENSOR_HEADERS' columns), in base order.

    Args:
        rec: the comparison record.
        prefix: the row-id prefix (the coverage grid links to these rows).
        table_id: the HTML id of the table.

    Returns:
        The HTML fragment: filter tools and the table.
    """
    rows = []
    for i, t in enumerate(rec["tensors"]):
        dtype = f"{_e(t.get('base_dtype') or DASH)} → {_e(t.get('finetuned_dtype') or DASH)}"
        rows.append((_row_id(prefix, i), t["category"], [
            _num_cell(i, str(i)),
            f'<td class="name"><code>{_e(t["name"])}</code></td>',
            _cat_cell(t["category"]),
            f"<td>{dtype}</td>",
            _field(t, "parameters", integer),
            _field(t, "cosine", cos),
            _field(t, "max_abs_diff", sci),
            _field(t, "certificate_ratio" if t.get("tolerance_ratio") is None else "tolerance_ratio", sci),
            _field(t, "max_error_ulps", sci),
            _field(t, "task_vector_norm", sci),
            _field(t, "lora_delta_norm", sci),
        ]))
    counts = Counter(t["category"] for t in rec["tensors"])
    example = next((t["name"] for t in rec["tensors"] if t["layer"] is not None), "weight")
    example = ".".join(example.split(".")[1:3]) if example.count(".") >= 3 else example
    caption = (f"{len(rows):,} tensors in base order. Dashes: not applicable (the adapter does not target the tensor, "
               "or a norm is zero). Hover a number for its exact value.")
    return (_tools(table_id, "tensors", {c: counts.get(c, 0) for c in CATEGORIES}, example)
            + _data_table(table_id, "tensors", caption, TENSOR_HEADERS, rows))


def _worst(rec: dict, prefix: str) -> str:
    index = {t["name"]: i for i, t in enumerate(rec["tensors"])}
    worst = [n for n in rec["summary"].get("worst_tensors") or [] if n in index]
    if not worst:
        return ""
    items = [f'<a href="#{_row_id(prefix, index[n])}"><code>{_e(n)}</code></a>' for n in worst]
    return "<p>Worst tensors (largest certificate ratio, then unexplained):</p>" + _list(items, "reasons")


def _comparison_alts(rec: dict) -> dict:
    tensors, counts = rec["tensors"], rec["summary"]["counts"]
    _, layers, kinds = _grid(tensors)
    shared = [t for t in tensors if t["category"] == "shared" and t.get("cosine") is not None]
    parts = ", ".join(f"{counts.get(c, 0):,} {c}" for c in CATEGORIES if counts.get(c))
    ratios = [(t["task_vector_norm"] / t["base_norm"], t["name"]) for t in tensors
              if t["layer"] is not None and t.get("task_vector_norm") and t.get("base_norm")]
    top = max(ratios, default=None)
    return {
        "cosine": (f"Left: 1 − cosine of each of the {len(shared):,} shared tensors against its position in the "
                   f"base, on a log axis, coloured by module kind; right: a histogram of the same values. Smallest "
                   f"cosine {_plain(cos(rec['summary'].get('min_cosine')))}."),
        "norm": ("Histograms on log–log axes of the Frobenius norms of the task vector for shared, cast-artifact and "
                 "unexplained tensors, with the LoRA delta norms of targeted tensors as a dashed outline."),
        "coverage": (f"Grid of {len(layers)} layers by {len(kinds)} module kinds, each cell coloured by its tensor's "
                     f"category: {parts}."),
        "heatmap": (f"Grid of {len(layers)} layers by {len(kinds)} module kinds coloured by the relative change "
                    f"‖T‖/‖W‖ on a log colour scale" + (f"; largest {_plain(sci(top[0]))} in {top[1]}." if top
                                                        else "; no tensor changed.")),
    }


def _plain(text: str) -> str:
    """Markup-free text for alt attributes."""
    return re.sub(r"<sup>(.*?)</sup>", r"^\1", text)


def comparison_sections(rec: dict, images: dict) -> list:
    """(section id, nav title, html) for a comparison record.

    Args:
        rec: the comparison record.
        images: PNG bytes per file name, embedded where a plot is shown (a missing one is left out).

    Returns:
        The sections, in page order.
    """

    s = rec["summary"]
    alts = _comparison_alts(rec)
    reasons = s.get("reasons") or []
    verdict = (_heading(2, "verdict", "Verdict") + _verdict_block(s, "verdict-text") + _lead(rec)
               + (("<h3>Why not certified</h3>" + _list([_e(r) for r in reasons], "reasons")) if reasons else "")
               + _worst(rec, "cmp") + _comparison_numbers(rec)
               + "<h3>Every base tensor by category</h3>"
               + _category_bar(s["counts"], s["total_tensors"], explain=False))
    inputs = _heading(2, "compared", "What was compared") + _comparison_inputs(rec)
    coverage = (_heading(2, "coverage", "Architecture coverage")
                + '<p>Where the task vector and the adapter change the model: one row per layer, one column per '
                  'module kind (the tensor name without its layer prefix).</p>'
                + _category_bar(s["counts"], s["total_tensors"]) + coverage_table(rec["tensors"], "cmp", "coverage-grid")
                + _figure(images, comparison_plots.FILES["coverage"], alts["coverage"], "The same coverage as a figure.")
                + _figure(images, comparison_plots.FILES["heatmap"], alts["heatmap"],
                          "How much each tensor changed relative to its base weight; blank cells are unchanged."))
    plots = ""
    if comparison_plots.FILES["cosine"] in images or comparison_plots.FILES["norm"] in images:
        plots = (_heading(2, "cosines", "Cosines and norms")
                 + _figure(images, comparison_plots.FILES["cosine"], alts["cosine"],
                           "How close each shared tensor's task vector is to its LoRA delta (1 − cosine, log scale; "
                           "values at the floor are exactly 1 to double precision).")
                 + _figure(images, comparison_plots.FILES["norm"], alts["norm"],
                           "Sizes of the changes: task-vector norms by category against the adapter's delta norms."))
    table = (_heading(2, "tensors", "Every tensor")
             + "<p>Sort by any column; filter by name or category. Cells of the coverage grid link here.</p>"
             + tensor_table(rec, "cmp", "tensor-table"))
    out = [("verdict", "Verdict", verdict), ("compared", "What was compared", inputs),
           ("coverage", "Architecture coverage", coverage)]
    if plots:
        out.append(("cosines", "Cosines and norms", plots))
    out.append(("tensors", "Every tensor", table))
    return out


# ---------------------------------------------------------------- precision

PRECISION_HEADERS = [
    ("merge path", "text", None), ("verdict", "text", None), ("output dtype", "text", None),
    ("changed tensors", "num", "tensors whose task vector is nonzero: real + cast artifacts + unexplained"),
    ("real", "num", "targeted tensors changed (shared)"), ("cast artifacts", "num", None),
    ("unexplained", "num", None),
    ("vanished updates", "num", "elements where ΔW ≠ 0 but the merge rounded back to the base value"),
    ("effective cosine", "num", "cosine of the merged change with the intended ΔW, targeted tensors"),
    ("max error (ulps)", "num", "worst |T − ΔW| in ulps of the output dtype"),
    ("max certificate ratio", "num", "≤ 1 is certified"),
]


def _precision_lead(rec: dict) -> str:
    paths = rec["paths"]
    verdicts = Counter(p["verdict"] for p in paths)
    if len(verdicts) == 1:
        text = f"All {len(paths)} merge paths are {_e(paths[0]['verdict'])}." if len(paths) > 1 else \
            f"The merge path is {_e(paths[0]['verdict'])}."
    else:
        text = f"{len(paths)} merge paths: " + ", ".join(f"{n} {_e(v)}" for v, n in verdicts.items()) + "."
    lost = max(paths, key=lambda p: p.get("vanished_elements") or 0, default=None)
    if lost is not None and lost.get("vanished_elements"):
        text += (f" Rounding loses the most updates on <code>{_e(lost['name'])}</code>: "
                 f"{lost['vanished_elements']:,} elements where ΔW ≠ 0 but the merged weight equals the base.")
    worst = max((p for p in paths if p.get("max_error_ulps") is not None), key=lambda p: p["max_error_ulps"],
                default=None)
    if worst is not None:
        text += (f" The largest error is {sci(worst['max_error_ulps'])} ulps, on <code>{_e(worst['name'])}</code> "
                 f"(certificate ratio {sci(worst.get('max_certificate_ratio'))}).")
    return f'<p class="lead">{text}</p>'


def precision_sections(rec: dict, paths: dict, images: dict) -> list:
    """(section id, nav title, html) for a precision record.

    Args:
        rec: the precision record.
        paths: path name -> that path's comparison record, where the folder has one.
        images: PNG bytes per file name, embedded where a plot is shown.

    Returns:
        The sections, in page order.
    """
    rows = []
    for p in rec["paths"]:
        counts = p["counts"]
        verdict = p["verdict"]
        cls = VERDICT_CLASS.get(verdict, "v-none")
        vanished, targeted = p.get("vanished_elements"), p.get("targeted_elements")
        share = f" <small>({100 * vanished / targeted:.2g}%)</small>" if targeted and vanished is not None else ""
        rows.append((f"path-{p['name']}", verdict, [
            f'<th scope="row" class="wrap"><code>{_e(p["name"])}</code><br><small>{_e(p.get("description") or "")}'
            "</small></th>",
            f'<td class="pv" data-verdict="{_e(verdict)}"><span class="chip {cls}" aria-hidden="true">'
            f'{VERDICT_MARK[cls]}</span> {_e(verdict)}</td>',
            f"<td>{_e(p.get('output_dtype') or DASH)}</td>",
            _num_cell(p.get("changed_tensors"), integer(p.get("changed_tensors"))),
            _num_cell(counts.get("real"), integer(counts.get("real"))),
            _num_cell(counts.get("cast-artifact"), integer(counts.get("cast-artifact"))),
            _num_cell(counts.get("unexplained"), integer(counts.get("unexplained"))),
            _num_cell(vanished, integer(vanished) + share),
            _num_cell(p.get("effective_cosine"), cos(p.get("effective_cosine"))),
            _num_cell(p.get("max_error_ulps"), sci(p.get("max_error_ulps"))),
            _num_cell(p.get("max_certificate_ratio"), sci(p.get("max_certificate_ratio"))),
        ]))
    head = "".join(_th(label, kind, title) for label, kind, title in PRECISION_HEADERS)
    body = "".join(f'<tr id="{_e(rid)}">{"".join(cells)}</tr>' for rid, _, cells in rows)
    totals = sorted({p.get("total_tensors") for p in rec["paths"]} - {None})
    targeted = sorted({p.get("targeted_elements") for p in rec["paths"]} - {None})
    scope = (f" Out of {', '.join(f'{n:,}' for n in totals)} tensors" if totals else "") + (
        f"; vanished updates out of {', '.join(f'{n:,}' for n in targeted)} targeted elements." if targeted else ".")
    table = (f'<div class="scroll"><table class="data" id="precision-table"><caption class="note">One row per merge '
             f"path: the same adapter merged, extracted and compared.{scope}</caption><thead><tr>{head}</tr></thead>"
             f"<tbody>{body}</tbody></table></div>")
    names = ", ".join(p["name"] for p in rec["paths"])
    alt = (f"Two bar charts over the merge paths {names}: left, changed tensors stacked as real, cast-artifact and "
           "unexplained; right, vanished updates (count) and the worst error (ulps) on a symmetric log scale.")
    section = (_heading(2, "precision", "Precision: every merge path") + _precision_lead(rec)
               + _kv([("Base", _source(rec.get("base"))), ("Adapter", _source(rec.get("adapter")))])
               + table
               + _list([_e(n) for n in rec.get("notes") or []], "notes")
               + _figure(images, PRECISION_PLOT, alt,
                         "What rounding does on each path: changed tensors by kind of change, updates lost to "
                         "rounding, and the worst error in ulps."))
    details = []
    for p in rec["paths"]:
        sub = paths.get(p["name"])
        if sub is None:
            continue
        prefix = f"p-{p['name']}"
        details.append(
            f'<details id="{_e(prefix)}"><summary><code>{_e(p["name"])}</code>: {_e(sub["summary"]["verdict"])}, '
            f'{integer(sub["summary"].get("changed_tensors"))} changed tensors</summary>'
            + _verdict_block(sub["summary"], f"{prefix}-verdict") + _lead(sub)
            + _comparison_numbers(sub) + _heading(4, f"{prefix}-cov", "Architecture coverage")
            + _category_bar(sub["summary"]["counts"], sub["summary"]["total_tensors"])
            + coverage_table(sub["tensors"], prefix, f"{prefix}-grid")
            + _heading(4, f"{prefix}-tab", "Every tensor") + tensor_table(sub, prefix, f"{prefix}-table")
            + "</details>")
    if details:
        section += ("<h3>Each path in detail</h3><p>The comparison record of each path "
                    "(<code>PATH/comparison_results.json</code>), with its coverage grid and tensor table.</p>"
                    + "".join(details))
    return [("precision", "Precision", section)]


# ---------------------------------------------------------------- analysis

ANALYSIS_HEADERS = [
    ("#", "num", "position among the analysed tensors (base order)"), ("tensor", "text", None),
    ("category", "text", None), ("adapter rank", "num", "Σ r of the LoRA modules on this tensor"),
    ("numerical rank", "num", "singular values of T above the rounding-noise floor (≥: a lower bound)"),
    ("stable rank", "num", "‖T‖²_F / σ₁²"), ("energy in top r", "num", "fraction of ‖T‖²_F in the first r singular values"),
    ("max angle (°)", "num", "largest principal angle between T's and the adapter's column spaces"),
    ("cosine", "num", "cosine between T and ΔW"), ("‖T − ΔW‖ / ‖T‖", "num", None),
    ("max residual (ulps)", "num", "|T − ΔW| in ulps of the stored weight"),
]


def _analysis_table(rec: dict) -> str:
    rows = []
    for i, t in enumerate(rec["tensors"]):
        sp = t.get("spectrum") or {}
        rank = sp.get("numerical_rank")
        rank_text = DASH if rank is None else ("≥ " if sp.get("numerical_rank_is_lower_bound") else "") + f"{rank:,}"
        rows.append((f"an-t{i}", t["category"], [
            _num_cell(i, str(i)), f'<td class="name"><code>{_e(t["name"])}</code></td>', _cat_cell(t["category"]),
            _field(t, "adapter_rank", integer),
            _num_cell(rank, rank_text),
            _field(sp, "stable_rank", sci),
            _field(sp, "energy_in_top_r", cos),
            _field(sp, "column_space_max_angle_deg", sci),
            _field(t, "cosine", cos),
            _field(t, "relative_residual", sci),
            _field(t, "max_residual_ulps", sci),
        ]))
    counts = Counter(t["category"] for t in rec["tensors"])
    cats = {c: counts.get(c, 0) for c in ANALYSIS_CATEGORIES}
    cats.update({c: n for c, n in counts.items() if c not in cats})
    caption = f"{len(rows):,} tensors where ΔW or T is nonzero, in base order."
    return (_tools("analysis-table", "tensors", cats, "q_proj")
            + _data_table("analysis-table", "tensors", caption, ANALYSIS_HEADERS, rows))


def analysis_sections(rec: dict, images: dict) -> list:
    """(section id, nav title, html) for an analysis record.

    Args:
        rec: the analysis record.
        images: PNG bytes per file name, embedded where a plot is shown.

    Returns:
        The sections, in page order.
    """

    s, inputs = rec["summary"], rec.get("inputs") or {}
    g = s.get
    spectra = g("spectra") or 0
    numbers = _numbers([
        ("Tensors analysed", integer(g("tensors")),
         f"{integer(g('shared'))} shared, {integer(g('adapter_only'))} adapter-only, "
         f"{integer(g('task_vector_only'))} task-vector-only"),
        ("‖T − ΔW‖ / ‖T‖", sci(g("relative_residual")), f"‖T‖ = {sci(g('task_vector_norm'))}, "
                                                          f"‖ΔW‖ = {sci(g('delta_norm'))}"),
        ("Max residual", f"{sci(g('max_residual_ulps'))} ulps", "in ulps of the stored weight"),
        ("Spectra computed", integer(spectra), _e(rec.get("svd") or "not requested (--spectrum)")),
    ] + ([("Numerical rank = adapter rank", f"{integer(g('numerical_rank_equals_adapter_rank'))} of "
                                             f"{integer(g('with_adapter_rank'))}",
           f"{integer(g('numerical_rank_zero'))} with rank 0 (only rounding noise)")] if spectra else []))
    summary = (_heading(2, "analysis", "Analysis: task vector against LoRA delta") + numbers
               + _kv([("Base", _source(inputs.get("base"))), ("LoRA delta", _source(inputs.get("lora_delta"))),
                      ("Task vector", _source(inputs.get("task_vector"))
                       + (f' <span class="note">({_e(inputs["task_vector_kind"])})</span>'
                          if inputs.get("task_vector_kind") else "")),
                      ("loratv", _e(rec.get("loratv_version", DASH)))])
               + (("<h3>Notes</h3>" + _list([_e(n) for n in rec["notes"]], "notes")) if rec.get("notes") else ""))
    with_rank = [t for t in rec["tensors"] if (t.get("spectrum") or {}).get("numerical_rank") is not None]
    _, layers, kinds = _grid([t for t in with_rank if "layer" in t and "kind" in t])
    kinds_seen = list(dict.fromkeys(t.get("kind") for t in rec["tensors"] if t.get("spectrum")))
    out = [("analysis", "Analysis", summary)]
    if analysis_plots.FILES["spectra"] in images or analysis_plots.FILES["ranks"] in images:
        out.append(("spectra", "Spectra and ranks", _heading(2, "spectra", "Spectra and ranks")
                    + _figure(images, analysis_plots.FILES["spectra"],
                              f"Line plots, one panel per module kind ({len(kinds_seen)}), of the leading singular "
                              "values of each task-vector tensor on a log axis relative to its rounding-noise floor, "
                              "coloured by layer, with the adapter rank marked.",
                              "Singular values of each tensor of T; a LoRA merge drops to the noise floor right "
                              "after the adapter rank.")
                    + _figure(images, analysis_plots.FILES["ranks"],
                              f"Grid of {len(layers)} layers by {len(kinds)} module kinds showing the numerical rank "
                              "of each task-vector tensor as a number and a colour.",
                              "Numerical rank of T above the rounding-noise floor per tensor.")))
    hist = g("residual_ulp_histogram") or {}
    ulp_alt = (f"Bar chart of |T − ΔW| in ulps of the stored weight over {sum(hist.get('counts') or []):,} elements, "
               f"symmetric log count axis; max {_plain(sci(g('max_residual_ulps')))} ulps.")
    out.append(("residuals", "Values and residuals", _heading(2, "residuals", "Values and residuals")
                + _figure(images, analysis_plots.FILES["scatter"], "Scatter plots of sampled elements: the task vector against the "
                          "LoRA delta with the line y = x, and the residual T − ΔW against ΔW, by module kind.",
                          "Sampled elements: T against ΔW, and the residual.")
                + _figure(images, analysis_plots.FILES["distributions"], "Quantile curves on a logit axis of ΔW, T and T − ΔW per "
                          "module kind, with skewness and excess kurtosis in the legends.",
                          "Distributions of the values per module kind.")
                + _figure(images, analysis_plots.FILES["ulps"], ulp_alt, "The residual in units in the last place.")
                + _layer_table(rec)))
    out.append(("analysis-tensors", "Analysed tensors", _heading(2, "analysis-tensors", "Analysed tensors")
                + _analysis_table(rec)))
    return out


def _layer_table(rec: dict) -> str:
    layers = rec.get("layers") or []
    if not layers:
        return ""
    head = ("<tr><th scope=\"col\">layer</th><th scope=\"col\" class=\"n\">tensors</th><th scope=\"col\" class=\"n\">"
            "‖T‖</th><th scope=\"col\" class=\"n\">‖ΔW‖</th><th scope=\"col\" class=\"n\">‖T − ΔW‖ / ‖T‖</th>"
            "<th scope=\"col\" class=\"n\">min cosine</th></tr>")
    body = "".join(
        f'<tr><th scope="row">{_e(DASH if row.get("layer") is None else row["layer"])}</th>'
        f'{_num_cell(row.get("tensors"), integer(row.get("tensors")))}'
        f'{_num_cell(row.get("task_vector_norm"), sci(row.get("task_vector_norm")))}'
        f'{_num_cell(row.get("delta_norm"), sci(row.get("delta_norm")))}'
        f'{_num_cell(row.get("relative_residual"), sci(row.get("relative_residual")))}'
        f'{_num_cell(row.get("min_cosine"), cos(row.get("min_cosine")))}</tr>' for row in layers)
    return (f'<h3>Per layer</h3><div class="scroll tall"><table class="data" id="layer-table"><thead>{head}</thead>'
            f"<tbody>{body}</tbody></table></div>")


# ---------------------------------------------------------------- reproduce, page

def _reconstructed(rec: dict, kind: str) -> str:
    """An equivalent command from the recorded inputs, for records saved without `command`."""
    if kind == "verification":
        return f"loratv verify-merge {rec.get('recipe')} {rec.get('merged')} -o OUT"
    if kind == "similarity":
        entries = rec.get("inputs") or []
        adapters = " ".join(str(i["source"]) for i in entries if i.get("kind") == "lora")
        vectors = " ".join(str(i["source"]) for i in entries if i.get("kind") == "task_vector")
        return (f"loratv similarity {adapters}" + (f" --base {rec['base']}" if rec.get("base") else "")
                + (f" --task-vectors {vectors}" if vectors else "") + " -o OUT")
    inputs = rec.get("inputs") or {}
    if kind == "comparison":
        parts = ["loratv compare", f"--base {inputs.get('base')}", f"--adapter {inputs.get('adapter')}"]
        if inputs.get("task_vector"):
            parts.append(f"--task-vector {inputs['task_vector']}")
        elif inputs.get("finetuned"):
            parts.append(f"--finetuned {inputs['finetuned']}")
        return " ".join(parts + ["-o OUT"])
    if kind == "precision":
        names = " ".join(str(p["name"]) for p in rec["paths"])
        return f"loratv precision --base {rec.get('base')} --adapter {rec.get('adapter')} --paths {names} -o OUT"
    delta = str(inputs.get("lora_delta"))
    flag = "--lora-deltas" if delta.endswith(".safetensors") else "--adapter"
    source = "--finetuned" if "computed" in str(inputs.get("task_vector_kind")) else "--task-vector"
    base = f" --base {inputs['base']}" if inputs.get("base") else ""
    return (f"loratv analyze{base} {flag} {delta} {source} {inputs.get('task_vector')} -o OUT"
            + (" --spectrum" if rec.get("spectrum") else ""))


def _reproduce(records: Records) -> str:
    items = []
    for kind, label in (("comparison", "comparison"), ("precision", "precision study"), ("analysis", "analysis"),
                        ("verification", "merge verification"), ("similarity", "similarity map")):
        rec = getattr(records, kind)
        if rec is None:
            continue
        command = rec.get("command")
        if command:
            items.append(f"<p>The {label}, as it was run:</p><pre><code>{_e(command)}</code></pre>")
        else:
            items.append(f"<p>The {label} (no command was recorded; this is the equivalent command from its "
                         f"inputs):</p><pre><code>{_e(_reconstructed(rec, kind))}</code></pre>")
    items.append("<p>This page, again, from the JSON records in its folder (plots missing there are re-drawn from "
                 "the records):</p><pre><code>loratv report OUT/</code></pre>")
    return _heading(2, "reproduce", "How to reproduce") + "".join(items)


def _subtitle(records: Records) -> str:
    if records.comparison is not None:
        inputs = records.comparison["inputs"] or {}
        other = inputs.get("task_vector") or inputs.get("finetuned")
        what = "task vector" if inputs.get("task_vector") else "fine-tuned model"
        return (f"Does the {what} <code>{_e(other)}</code> equal the base <code>{_e(inputs.get('base'))}</code> plus "
                f"the adapter <code>{_e(inputs.get('adapter'))}</code>?")
    if records.precision is not None:
        return (f"The adapter <code>{_e(records.precision.get('adapter'))}</code> merged into "
                f"<code>{_e(records.precision.get('base'))}</code> along {len(records.precision['paths'])} dtype paths.")
    if records.verification is not None:
        rec = records.verification
        return (f"Is <code>{_e(rec.get('merged'))}</code> the {_e(rec['merge_method'])} merge that "
                f"<code>{_e(rec.get('recipe'))}</code> describes?")
    if records.similarity is not None:
        return (f"Which of these {len(records.similarity['adapters'])} adapters (and task vectors) are alike, "
                "duplicated or outliers?")
    assert records.analysis is not None  # load_records raises when a folder holds no record
    inputs = records.analysis.get("inputs") or {}
    return (f"The task vector <code>{_e(inputs.get('task_vector'))}</code> against the LoRA delta "
            f"<code>{_e(inputs.get('lora_delta'))}</code>.")


def _title(records: Records) -> str:
    if records.comparison is not None:
        return f"loratv report: {records.comparison['summary']['verdict']}"
    if records.precision is not None:
        return "loratv report: precision study"
    if records.analysis is None and records.verification is not None:
        return f"loratv report: merge {records.verification['summary']['verdict']}"
    if records.analysis is None and records.similarity is not None:
        return f"loratv report: similarity of {len(records.similarity['adapters'])} inputs"
    return "loratv report: analysis"


def page_head(title_html: str, extra_css: str = "") -> str:
    """A self-contained page's opening up to </head>: the CSP that forbids any network load, and the report's CSS.

    Args:
        title_html: the page title, already escaped.
        extra_css: CSS added after the report's own.

    Returns:
        The HTML text from <!DOCTYPE html> to </head>.
    """
    css = CSS + ("\n" + extra_css if extra_css else "")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="loratv {_e(__version__)}">
<title>{title_html}</title>
<style>{css}</style>
</head>"""


def verification_sections(rec: dict) -> list:
    """(section id, nav title, html) for a verify-merge record: the verdict, the inputs' task vectors against the
    merged one, the kept density per layer, and every tensor's ratio to what it may differ by.

    Args:
        rec: the verify-merge record.

    Returns:
        The sections, in page order.
    """
    s = rec["summary"]
    tensors, inputs = rec["tensors"], rec["inputs"]
    ratios = [t.get("max_ratio") for t in tensors if t.get("max_ratio") is not None]
    conflicts = [t["sign_conflicts"] for t in tensors if t.get("sign_conflicts") is not None]
    numbers = _numbers([
        ("Tensors checked", integer(s["tensors"]), f"{integer(s.get('failing_count'))} beyond what is allowed"),
        ("Largest ratio", sci(max(ratios)) if ratios else DASH, "of |M − reference| to the allowed difference"),
        ("Sign conflicts", f"{sci(sum(conflicts) / len(conflicts))}" if conflicts else DASH,
         "mean fraction of elements whose inputs' task vectors disagree in sign"),
        ("Missing tensors", integer(len(s.get("missing_tensors") or [])), "of the recipe, absent from the model"),
    ])
    head = (_heading(2, "merge-verification", f"Merge verification: {rec['merge_method']}")
            + _verdict_block(s, "merge-verdict") + numbers
            + _kv([("Recipe", _source(rec.get("recipe"))), ("Merged model", _source(rec.get("merged"))),
                   ("Seed", _e(rec.get("seed") if rec.get("seed") is not None else DASH)),
                   ("loratv", _e(rec.get("loratv_version", DASH)))])
            + (f'<p class="note">{_e(s["not_reproducible"])}.</p>' if s.get("not_reproducible") else ""))
    rows = "".join(f"<tr><td><code>{_e(i['model'])}</code></td><td>{sci(i.get('task_vector_norm'))}</td>"
                   f"<td>{cos(i.get('cosine_with_merged'))}</td></tr>" for i in inputs)
    contributions = (_heading(3, "merge-inputs", "Each input's task vector against the merged one")
                     + '<div class="scroll"><table class="data"><thead><tr><th>input</th><th>‖task vector‖</th>'
                       f"<th>cosine with merged − base</th></tr></thead><tbody>{rows}</tbody></table></div>")
    layers: dict = {}
    for t in tensors:
        match = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", t["name"])
        kept = t.get("kept") or []
        if match and kept and any(k is not None for k in kept):
            layers.setdefault(int(match.group(1)), []).append(kept)
    density = ""
    if layers:
        width = max(len(k) for rows_ in layers.values() for k in rows_)
        body = ""
        for layer in sorted(layers):
            cells = []
            for i in range(width):
                values = [k[i] for k in layers[layer] if i < len(k) and k[i] is not None]
                cells.append(f"<td>{sci(sum(values) / len(values)) if values else DASH}</td>")
            body += f"<tr><td>{layer}</td>{''.join(cells)}</tr>"
        labels = "".join(f"<th>input {i + 1}</th>" for i in range(width))
        density = (_heading(3, "merge-density", "Density kept per layer")
                   + '<p class="note">The mean over the layer\'s tensors of the fraction of each input\'s nonzero task '
                     "vector that the sparsification kept.</p>"
                   + f'<div class="scroll"><table class="data"><thead><tr><th>layer</th>{labels}</tr></thead>'
                     f"<tbody>{body}</tbody></table></div>")
    table_rows = []
    for i, t in enumerate(tensors):
        kept = ", ".join(DASH if k is None else sci(k) for k in (t.get("kept") or [])) or DASH
        ratio = t.get("max_ratio")
        table_rows.append((_row_id("vm", i), t["kind"], [
            f"<td><code>{_e(t['name'])}</code></td>", f"<td>{_e(t['kind'])}</td>",
            _num_cell(ratio, sci(ratio)) if ratio is not None else f"<td>{integer(t.get('violations'))} unexplained</td>",
            f"<td>{_e(t.get('worst_element', DASH))}</td>", f"<td>{kept}</td>",
            _num_cell(t.get("sign_conflicts"), sci(t.get("sign_conflicts")))]))
    table = _data_table("merge-tensors", "tensors", "Every tensor: ratio ≤ 1 passes (certified: against the derived "
                        "rounding bound; tolerance: against ½ ulp + 4 × the measured float32 error).",
                        [("tensor", "text", None), ("check", "text", None), ("max ratio", "num", None),
                         ("worst element", "text", None), ("kept per input", "text", None),
                         ("sign conflicts", "num", None)], table_rows)
    return [("merge-verification", "Merge verification", head + contributions + density),
            ("merge-tensors", "Merged tensors", _heading(3, "merge-tensors-h", "Tensor by tensor") + table)]


def _diverging(c) -> str:
    """A cosine in [−1, 1] as a background colour: blue (−1), white (0), red (1); grey for None."""
    if c is None:
        return "#dddddd"
    t = max(-1.0, min(1.0, float(c)))
    end = (178, 24, 43) if t > 0 else (33, 102, 172)
    mix = [round(255 + (e - 255) * abs(t)) for e in end]
    return f"rgb({mix[0]},{mix[1]},{mix[2]})"


def _matrix_table(ident: str, names: list, order: list, matrix: list, hidden: bool) -> str:
    head = "".join(f'<th scope="col" title="{_e(names[j])}"><span>{_e(names[j])}</span></th>' for j in order)
    body = []
    for i in order:
        cells = []
        for j in order:
            c = matrix[i][j]
            shown = DASH if c is None else f"{c:.2f}"
            cells.append(f'<td style="background:{_diverging(c)}" data-v="{"" if c is None else repr(float(c))}" '
                         f'title="{_e(names[i])} · {_e(names[j])}: {"no delta" if c is None else f"{c:.6f}"}">'
                         f"{shown}</td>")
        body.append(f'<tr><th scope="row">{_e(names[i])}</th>{"".join(cells)}</tr>')
    return (f'<div class="scroll matrix-wrap" data-matrix="{_e(ident)}"{" hidden" if hidden else ""}>'
            f'<table class="matrix"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def similarity_sections(rec: dict, images: dict) -> list:
    """(section id, nav title, html) for a similarity record: the numbers, the cosine matrix (global, or one module
    kind, chosen in a menu) in clustered order, near-duplicates and outliers, each input's norm, and the plots.

    Args:
        rec: the similarity record.
        images: PNG bytes per file name.

    Returns:
        The sections, in page order.
    """
    names, cosine = rec["adapters"], rec["cosine"]
    k = len(names)
    order = rec["clustering"]["order"] or list(range(k))
    off = [cosine[i][j] for i in range(k) for j in range(i + 1, k) if cosine[i][j] is not None]
    numbers = _numbers([
        ("Inputs", integer(k), "adapters and task vectors"),
        ("Near-duplicates", integer(len(rec.get("near_duplicates") or [])),
         f"pairs with cosine ≥ {rec.get('duplicate_cosine')}"),
        ("Outliers", integer(len(rec.get("outliers") or [])), "far below the fleet's mean cosine"),
        ("Cosine range", f"{cos(min(off))} … {cos(max(off))}" if off else DASH, "over pairs of inputs"),
    ])
    matrices = [("global", "all tensors", cosine)]
    if k <= MAX_KIND_MATRICES_INPUTS:
        matrices += [(f"kind-{i}", f"module kind {kind}", m) for i, (kind, m) in enumerate(rec["per_kind"].items())]
    options = "".join(f'<option value="{_e(ident)}">{_e(label)}</option>' for ident, label, _ in matrices)
    menu = (f'<p class="tools" data-matrix-select><label>Cosine over <select>{options}</select></label> '
            "— rows and columns in the clustering's order; hover a cell for the exact value.</p>")
    tables = "".join(_matrix_table(ident, names, order, m, hidden=n > 0)
                     for n, (ident, _, m) in enumerate(matrices))
    note = "" if k <= MAX_KIND_MATRICES_INPUTS else (
        f'<p class="note">With {k} inputs only the global matrix is drawn here; the per-kind ones are in '
        f"{SIMILARITY_FILE}.</p>")
    head = (_heading(2, "similarity", "Similarity of the inputs") + numbers
            + _figure(images, SIMILARITY_PLOTS["heatmap"], "Cosine matrix heatmap",
                      "The global cosine of every pair, in clustered order.")
            + _heading(3, "similarity-matrix", "The matrix") + menu + tables + note)
    pairs = [(_row_id("sim-d", n), "pair", [f"<td>{_e(p['a'])}</td>", f"<td>{_e(p['b'])}</td>",
                                            _num_cell(p["cosine"], cos(p["cosine"]))])
             for n, p in enumerate(rec.get("near_duplicates") or [])]
    duplicates = _heading(3, "similarity-duplicates", "Near-duplicates") + (
        _data_table("sim-duplicates", "pairs", "Pairs at or above the duplicate threshold, most similar first.",
                    [("input", "text", None), ("input", "text", None), ("cosine", "num", None)], pairs)
        if pairs else "<p>None.</p>")
    means = [sum(c for j, c in enumerate(cosine[i]) if j != i and c is not None) / max(1, k - 1) for i in range(k)]
    norms = rec.get("norms") or [None] * k
    outliers = {o["index"] for o in rec.get("outliers") or []}
    inputs = rec.get("inputs") or [{"name": n} for n in names]
    rows = [(_row_id("sim-i", i), "outlier" if i in outliers else "input", [
        f"<td>{_e(names[i])}</td>", f"<td>{_e(inputs[i].get('kind', DASH))}</td>",
        _num_cell(norms[i], sci(norms[i])), _num_cell(means[i], cos(means[i])),
        f"<td>{order.index(i) + 1}</td>", f"<td>{'outlier' if i in outliers else ''}</td>"]) for i in range(k)]
    table = _data_table("sim-inputs", "inputs", "Each input: ‖ΔW‖_F over all tensors, its mean cosine with the others, "
                        "its place in the clustered order.",
                        [("input", "text", None), ("kind", "text", None), ("‖ΔW‖", "num", None),
                         ("mean cosine", "num", None), ("cluster position", "num", None), ("flag", "text", None)],
                        rows)
    layers = _heading(3, "similarity-layers", "Per layer") + _figure(
        images, SIMILARITY_PLOTS["per_layer"], "Pairwise cosine per layer",
        "Median and range of the pairwise cosines, layer by layer.")
    return [("similarity", "Similarity", head),
            ("similarity-details", "Duplicates, outliers, layers",
             duplicates + _heading(3, "similarity-inputs", "Inputs") + table + layers)]


def render_report(records: Records, images: dict) -> str:
    """The whole page, from the records and the PNG bytes (file name -> bytes) alone.

    Args:
        records: the records of one folder.
        images: PNG bytes per file name; plots missing from it are left out of the page.

    Returns:
        The self-contained HTML document.
    """
    sections = []
    if records.comparison is not None:
        sections += comparison_sections(records.comparison, images)
    if records.precision is not None:
        sections += precision_sections(records.precision, records.paths, images)
    if records.analysis is not None:
        sections += analysis_sections(records.analysis, images)
    if records.verification is not None:
        sections += verification_sections(records.verification)
    if records.similarity is not None:
        sections += similarity_sections(records.similarity, images)
    sections.append(("reproduce", "How to reproduce", _reproduce(records)))
    nav = "".join(f'<li><a href="#{_e(ident)}">{_e(title)}</a></li>' for ident, title, _ in sections)
    sources = [name for name, rec in ((COMPARISON_FILE, records.comparison), (PRECISION_FILE, records.precision),
                                      (ANALYSIS_FILE, records.analysis), (VERIFY_MERGE_FILE, records.verification),
                                      (SIMILARITY_FILE, records.similarity))
               if rec is not None]
    sources += [f"{name}/{COMPARISON_FILE}" for name in records.paths]
    body = "\n".join(f"<section aria-labelledby=\"{_e(ident)}\">{content}</section>" for ident, _, content in sections)
    title = _title(records)
    return f"""{page_head(_e(title))}
<body>
<header>
<h1>{_e(title)}</h1>
<p class="sub">{_subtitle(records)}</p>
<nav aria-label="Sections"><ol>{nav}</ol></nav>
</header>
<main>
{body}
</main>
<footer><p>Rendered by loratv {_e(__version__)} from {", ".join(f"<code>{_e(s)}</code>" for s in sources)} and the
PNG plots beside them. Self-contained: it loads nothing from the network (the images are embedded); the script only
sorts and filters the tables.</p></footer>
<script>{JS}</script>
</body>
</html>
"""
