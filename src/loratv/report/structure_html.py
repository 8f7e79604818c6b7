"""model_structure.html: the structure record as one self-contained page (the report's CSS, script and CSP).

The grid is report.html's coverage grid (table.grid, the same colour classes); each cell links to its tensor's row
in a sortable, filterable table. Nothing is loaded from the network: the PNG is embedded as a data URI.
"""

from loratv.report.html import (
    JS,
    _data_table,
    _e,
    _figure,
    _kv,
    _list,
    _numbers,
    _source,
    _tools,
    integer,
    page_head,
    params,
)
from loratv.report.structure_plot import LETTERS, legend_labels
from loratv.version import __version__

# the report's colour classes (html_assets.CSS): a `both` cell looks like a `shared` one in report.html
CSS_CLASS = {"both": "c-shared", "adapter-only": "c-adapter-only", "task-vector-only": "c-unexplained",
             "cast-artifact": "c-cast-artifact", "neither": "c-unchanged", "no-tensor": "empty"}
EXTRA_CSS = "table.grid tbody tr.sep th, table.grid tbody tr.sep td { border-top: 2px solid #333; }"


def _chip(state: str) -> str:
    letter = LETTERS.get(state) or "·"
    return f'<span class="chip {CSS_CLASS[state]}" aria-hidden="true">{letter}</span> '


def _row_id(i: int) -> str:
    return f"st-t{i}"


def grid_table(record: dict) -> str:
    """Rows × columns of the record as report.html's grid: letter and colour per cell, a link to the tensor's row.

    Args:
        record: the structure record (`loratv.structure`).

    Returns:
        The HTML fragment: a scrolling table with a separator row between sections, global tensors numbered.
    """
    index = {t["name"]: i for i, t in enumerate(record["tensors"])}
    head = "".join(f'<th scope="col" title="{_e(c["name"])} ({_e(c["kind"])})"><span>{_e(c["name"])}</span></th>'
                   for c in record["columns"])
    body = []
    previous = None
    for row, cells in zip(record["rows"], record["cells"]):
        tds = []
        for cell in cells:
            state = cell["state"]
            if cell["tensor"] is None:
                title = ' title="no tensor"' if state == "no-tensor" else ""
                tds.append(f'<td class="empty"{title}></td>')
                continue
            name = cell["tensor"]
            letter = LETTERS.get(state) or "·"
            if "number" in cell:  # a global tensor: numbered, as in the PNG
                letter = str(cell["number"])
            tds.append(f'<td class="{CSS_CLASS[state]}"><a href="#{_row_id(index[name])}" title="{_e(name)}: '
                       f'{_e(state)}">{_e(letter)}</a></td>')
        sep = ' class="sep"' if previous is not None and previous != row["section"] else ""
        previous = row["section"]
        body.append(f'<tr{sep}><th scope="row">{_e(row["label"])}</th>{"".join(tds)}</tr>')
    header = f'<thead><tr><th scope="col">layer</th>{head}</tr></thead>' if record["columns"] else ""
    return (f'<div class="scroll fit"><table class="grid" id="structure-grid"><caption class="visually-hidden">'
            f'What touches each tensor, by layer and module kind</caption>{header}<tbody>{"".join(body)}</tbody>'
            "</table></div>")


def _legend(record: dict) -> str:
    labels = legend_labels(record)
    items = [f'{_chip(s["state"])}<b>{_e(labels[s["state"]])}</b> ({s["count"]:,}): {_e(s["meaning"])}'
             for s in record["states"]]
    return '<ul class="legend explain">' + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


TENSOR_HEADERS = [
    ("#", "num", "position in the model"),
    ("tensor", "text", None),
    ("state", "text", None),
    ("layer", "num", None),
    ("module kind", "text", "the name without its layer prefix"),
    ("shape", "text", None),
    ("parameters", "num", None),
    ("dtype", "text", "model dtype → fine-tuned dtype"),
    ("adapter", "text", "what of the adapter touches the tensor (module and orientation)"),
]


def tensor_table(record: dict) -> str:
    """The sortable, filterable table of every tensor of a structure record (TENSOR_HEADERS' columns).

    Args:
        record: the structure record (`loratv.structure`).

    Returns:
        The HTML fragment: filter tools (counts per state) and the table.
    """
    rows = []
    for i, t in enumerate(record["tensors"]):
        dtype = t["dtype"] if not t["finetuned_dtype"] or t["finetuned_dtype"] == t["dtype"] else \
            f"{t['dtype']} → {t['finetuned_dtype']}"
        cells = [f'<td class="n" data-v="{i}">{i}</td>', f"<td><code>{_e(t['name'])}</code></td>",
                 f'<td data-v="{_e(t["state"])}">{_chip(t["state"])}{_e(t["state"])}</td>',
                 f'<td class="n" data-v="{"" if t["layer"] is None else t["layer"]}">'
                 f'{"—" if t["layer"] is None else t["layer"]}</td>',
                 f"<td>{_e(t['column'] or t['section'])}</td>", f"<td>{_e(' × '.join(map(str, t['shape'])))}</td>",
                 f'<td class="n" data-v="{t["parameters"]}">{integer(t["parameters"])}</td>', f"<td>{_e(dtype)}</td>",
                 f'<td class="wrap">{_e("; ".join(t["adapter"]))}</td>']
        rows.append((_row_id(i), t["state"], cells))
    counts = {s["state"]: s["count"] for s in record["states"] if s["state"] != "no-tensor"}
    return (_tools("structure-tensors", "tensors", counts, "q_proj")
            + _data_table("structure-tensors", "tensors", f"Every tensor of the model ({len(rows):,}).",
                          TENSOR_HEADERS, rows))


def render_structure_page(record: dict, png: bytes | None = None) -> str:
    """The whole page from the record (and the PNG bytes, embedded when given).

    Args:
        record: a `loratv.structure` record.
        png: model_structure.png's bytes, or None to leave the picture out.

    Returns:
        The HTML text.
    """
    inputs = record["inputs"]
    parameters = sum(t["parameters"] for t in record["tensors"])
    numbers = _numbers([
        ("tensors", integer(record["total_tensors"]), params(parameters) + " parameters"),
        ("layers × module kinds", f"{record['layers']} × {len(record['columns'])}", None),
    ] + [(_e(s["state"]), integer(s["count"]), None) for s in record["states"] if s["state"] != "no-tensor"])
    kv = _kv([("model", _source(inputs["model"])), ("adapter", _source(inputs["adapter"])),
              ("task vector", _source(inputs["task_vector"])), ("fine-tuned model", _source(inputs["finetuned"])),
              ("model type", _e(record.get("model_type") or "—")),
              ("tensors read", f"{record['tensors_read']:,} (the rest decided from headers)")])
    globals_ = sorted((t["number"], i, t) for i, t in enumerate(record["tensors"]) if t["section"] != "layer")
    names = _list([f'<a href="#{_row_id(i)}">{n}</a>: {_chip(t["state"])}<code>{_e(t["name"])}</code> '
                   f'{_e(t["state"])}' for n, i, t in globals_], "globals")
    figure = _figure({"model_structure.png": png} if png else {}, "model_structure.png",
                     "Grid of layers by module kinds, each cell coloured by what touches its tensor",
                     "The same grid as a picture.")
    notes = _list([_e(n) for n in record["notes"]], "notes")
    title = "loratv structure: " + _e(inputs["model"])
    return f"""{page_head(title, EXTRA_CSS)}
<body>
<header>
<h1>Model structure</h1>
<p class="sub">Which tensors the adapter targets and the task vector changes, layer by layer.</p>
<nav aria-label="Sections"><ol><li><a href="#grid">Grid</a></li><li><a href="#tensors">Tensors</a></li>
<li><a href="#picture">Picture</a></li></ol></nav>
</header>
<main>
<section aria-labelledby="inputs"><h2 id="inputs">Inputs</h2>{numbers}{kv}{notes}</section>
<section aria-labelledby="grid"><h2 id="grid">Grid</h2>
<p class="note">{record['layers']} layers × {len(record['columns'])} module kinds (the tensor name without its layer
prefix), one letter and colour per tensor; blank where a layer has no such tensor. Tensors outside the layers sit in
rows of their own (embeddings above, the rest below), numbered. Select a cell to jump to its row.</p>
{_legend(record)}{grid_table(record)}
{"<p>Numbered cells:</p>" + names if globals_ else ""}</section>
<section aria-labelledby="tensors"><h2 id="tensors">Tensors</h2>{tensor_table(record)}</section>
<section aria-labelledby="picture"><h2 id="picture">Picture</h2>{figure}</section>
</main>
<footer><p>Rendered by loratv {_e(__version__)} from <code>model_structure.json</code>. Self-contained: it loads
nothing from the network (the image is embedded); the script only sorts and filters the table.</p></footer>
<script>{JS}</script>
</body>
</html>
"""
