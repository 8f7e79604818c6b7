"""The stylesheet and the script inlined into report.html (kept as strings: no package data to install)."""

# Okabe–Ito colours, the same as the PNG plots; every coloured cell also carries a letter.
CSS = """
:root { --fg: #1a1a1a; --muted: #555; --line: #d0d0d0; --zebra: #f6f6f6; --accent: #0072B2; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5;
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif; }
header, main, footer { max-width: 1440px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 20px; }
h1 { font-size: 1.7rem; margin: 0 0 4px; }
h2 { font-size: 1.35rem; margin: 36px 0 10px; padding-top: 8px; border-top: 2px solid var(--line); }
h3 { font-size: 1.1rem; margin: 22px 0 8px; }
h4 { font-size: 1rem; margin: 16px 0 6px; }
p.sub { color: var(--muted); margin: 0 0 10px; }
code, pre, .mono { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 0.9em; }
pre { background: #f3f3f3; border: 1px solid var(--line); padding: 10px 12px; overflow-x: auto; white-space: pre-wrap;
  word-break: break-all; }
a { color: #005a8c; }
nav ol { display: flex; flex-wrap: wrap; gap: 4px 18px; list-style: none; padding: 0; margin: 8px 0 0; }
.verdict { display: inline-block; font-size: 1.5rem; font-weight: 700; padding: 8px 16px; border-radius: 6px;
  border: 3px solid; margin: 4px 0 8px; }
.v-certified { color: #004f7c; border-color: #0072B2; background: #e6f1f8; }
.v-tolerance { color: #6b4a00; border-color: #E69F00; background: #fdf3e0; }
.v-not { color: #8a3300; border-color: #D55E00; background: #fbeae0; }
.v-none { color: var(--fg); border-color: var(--line); background: #f6f6f6; }
.chip.v-certified, .chip.v-tolerance, .chip.v-not, .chip.v-none { border-width: 1px; }
.lead { font-size: 1.05rem; max-width: 70em; }
dl.numbers { display: grid; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: 10px; margin: 14px 0; }
@media (max-width: 900px) { dl.numbers { grid-template-columns: repeat(2, minmax(0, 1fr)); } }
dl.numbers div { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; }
dl.numbers dt { color: var(--muted); font-size: 0.85rem; }
dl.numbers dd { margin: 0; font-size: 1.25rem; font-weight: 600; font-variant-numeric: tabular-nums; }
dl.numbers dd small { font-size: 0.8rem; font-weight: 400; color: var(--muted); display: block; }
.bar { display: flex; height: 26px; border: 1px solid #888; border-radius: 4px; overflow: hidden; margin: 8px 0 4px;
  max-width: 900px; }
.bar span { display: block; height: 100%; min-width: 2px; }
ul.legend { list-style: none; padding: 0; margin: 6px 0 12px; display: flex; flex-wrap: wrap; gap: 4px 18px; }
ul.legend.explain { display: block; }
ul.legend.explain li { margin: 3px 0; }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); white-space: nowrap; }
.chip { display: inline-block; min-width: 1.6em; text-align: center; font-weight: 700; border-radius: 3px;
  padding: 0 4px; border: 1px solid rgba(0,0,0,.25); }
.c-shared { background: #0072B2; color: #fff; }
.c-adapter-only { background: #56B4E9; color: #000; }
.c-cast-artifact { background: #E69F00; color: #000; }
.c-unexplained { background: #D55E00; color: #fff; }
.c-unchanged { background: #BBBBBB; color: #000; }
.c-task-vector-only { background: #E69F00; color: #000; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.kv th { text-align: left; padding: 3px 14px 3px 0; vertical-align: top; font-weight: 600; white-space: nowrap; }
table.kv td { padding: 3px 0; word-break: break-all; }
.scroll { overflow: auto; max-width: 100%; border: 1px solid var(--line); }
.scroll.fit { display: inline-block; vertical-align: top; }
.tall { max-height: 75vh; }
table.data { width: 100%; font-size: 0.86rem; }
table.data th, table.data td { padding: 3px 6px; border-bottom: 1px solid #e4e4e4; white-space: nowrap; }
table.data caption { text-align: left; padding: 4px 6px; white-space: normal; }
table.data thead th { position: sticky; top: 0; background: #eef2f5; z-index: 1; text-align: left; vertical-align: bottom;
  border-bottom: 2px solid #999; white-space: normal; }
table.data tbody tr:nth-child(even) { background: var(--zebra); }
table.data td.n, table.data th.n { text-align: right; }
table.data td.wrap, table.data th.wrap { white-space: normal; min-width: 14em; }
table.data small { color: var(--muted); }
table.data tbody th { text-align: left; font-weight: 400; }
table.data td.pv { white-space: normal; min-width: 9em; }
table.data tr:target { outline: 3px solid #000; outline-offset: -3px; background: #fff8c4; }
table.data th button { font: inherit; font-weight: 700; background: none; border: 0; padding: 0; cursor: pointer;
  color: inherit; text-align: inherit; }
table.data th button:focus-visible { outline: 2px solid var(--accent); }
table.data th[aria-sort="ascending"] button::after { content: " ▲"; }
table.data th[aria-sort="descending"] button::after { content: " ▼"; }
.tools { display: flex; flex-wrap: wrap; gap: 8px 20px; align-items: center; margin: 8px 0; }
.tools input[type=search] { font: inherit; padding: 3px 6px; width: 26em; max-width: 100%; }
.tools select { font: inherit; padding: 2px 4px; }
.tools output { color: var(--muted); }
table.grid { font-size: 0.75rem; margin: 6px 0; }
table.grid th, table.grid td { border: 1px solid #fff; padding: 0; }
table.grid thead th { vertical-align: bottom; font-weight: 600; padding: 2px 1px; }
table.grid thead th span { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; display: inline-block;
  max-height: 22em; overflow: hidden; text-overflow: ellipsis; }
table.grid tbody th { text-align: right; padding-right: 6px; font-weight: 600; font-variant-numeric: tabular-nums; }
table.grid td { width: 1.9em; min-width: 1.9em; height: 1.35em; text-align: center; line-height: 1.35em; }
table.grid td a { display: block; color: inherit; text-decoration: none; }
table.grid td a:focus-visible, table.grid td a:hover { outline: 2px solid #000; }
table.grid td.empty { background: #fff; }
ul.globals { columns: 2 28em; padding-left: 0; list-style: none; }
figure { margin: 16px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 0.9rem; max-width: 70em; }
details { margin: 8px 0; border: 1px solid var(--line); border-radius: 6px; padding: 4px 12px; }
details summary { cursor: pointer; font-weight: 600; padding: 4px 0; }
.note { color: var(--muted); }
ul.notes li, ul.reasons li { margin: 2px 0; }
footer { color: var(--muted); font-size: 0.85rem; margin-top: 40px; padding-bottom: 30px; }
table.matrix { border-collapse: collapse; font-size: 0.72rem; }
table.matrix td { min-width: 2.6em; text-align: center; padding: 2px 3px; border: 1px solid #fff; }
table.matrix thead th span { writing-mode: vertical-rl; transform: rotate(180deg); white-space: nowrap; }
table.matrix tbody tr:hover td, table.matrix tbody tr:hover th { outline: 1px solid #333; }
@media print { .tools, nav { display: none; } .scroll, .tall { max-height: none; overflow: visible; } }
"""

# Progressive: the tables are complete HTML; this only adds sorting (header buttons) and filtering (the tool rows).
JS = """
"use strict";
(function () {
  function value(cell, numeric) {
    var v = cell.getAttribute("data-v");
    if (v === null) v = cell.textContent.trim();
    if (!numeric) return v.toLowerCase();
    return v === "" ? null : parseFloat(v);
  }
  function setup(table) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var nameCol = parseInt(table.getAttribute("data-name-col") || "1", 10);
    var names = rows.map(function (r) { return r.cells[nameCol].textContent.toLowerCase(); });
    rows.forEach(function (r, i) { r._order = i; r._name = names[i]; });
    var tools = document.querySelector('[data-tools-for="' + table.id + '"]');
    var search = tools && tools.querySelector("input[type=search]");
    var select = tools && tools.querySelector("select");
    var status = tools && tools.querySelector("output");
    var noun = table.getAttribute("data-noun") || "rows";
    function filter() {
      var text = search ? search.value.trim().toLowerCase() : "";
      var cat = select ? select.value : "";
      var shown = 0;
      rows.forEach(function (r) {
        var ok = (!text || r._name.indexOf(text) !== -1) && (!cat || r.getAttribute("data-cat") === cat);
        r.hidden = !ok;
        if (ok) shown++;
      });
      if (status) status.textContent = "Showing " + shown.toLocaleString("en") + " of " +
        rows.length.toLocaleString("en") + " " + noun;
    }
    if (tools) {
      tools.hidden = false;
      if (search) search.addEventListener("input", filter);
      if (select) select.addEventListener("change", filter);
      filter();
    }
    table._reveal = function (row) {
      if (row.hidden) { if (search) search.value = ""; if (select) select.value = ""; filter(); }
    };
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var type = th.getAttribute("data-sort");
      if (!type) return;
      var button = document.createElement("button");
      button.type = "button";
      while (th.firstChild) button.appendChild(th.firstChild);
      th.appendChild(button);
      button.addEventListener("click", function () {
        var descending = th.getAttribute("aria-sort") === "ascending";
        Array.prototype.forEach.call(th.parentNode.cells, function (c) { c.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        var numeric = type === "num";
        var keyed = rows.map(function (r) { return [value(r.cells[col], numeric), r]; });
        keyed.sort(function (a, b) {
          var x = a[0], y = b[0];
          if (x === null || y === null || x === "" || y === "") {  // missing values last, either direction
            var mx = x === null || x === "", my = y === null || y === "";
            if (mx !== my) return mx ? 1 : -1;
            return a[1]._order - b[1]._order;
          }
          var d = x < y ? -1 : x > y ? 1 : 0;
          return (descending ? -d : d) || a[1]._order - b[1]._order;
        });
        rows = keyed.map(function (k) { return k[1]; });
        var frag = document.createDocumentFragment();
        rows.forEach(function (r) { frag.appendChild(r); });
        body.appendChild(frag);
      });
    });
  }
  var tables = document.querySelectorAll("table[data-interactive]");
  Array.prototype.forEach.call(tables, setup);
  function reveal() {  // a link to a filtered-out row clears that table's filters first
    var id = decodeURIComponent(location.hash.slice(1));
    var row = id && document.getElementById(id);
    if (!row || row.tagName !== "TR") return;
    var table = row.closest("table");
    var details = row.closest("details");
    if (details) details.open = true;
    if (table && table._reveal) table._reveal(row);
    row.scrollIntoView({block: "center"});
  }
  window.addEventListener("hashchange", reveal);
  if (location.hash) reveal();
  Array.prototype.forEach.call(document.querySelectorAll("[data-matrix-select] select"), function (menu) {
    menu.addEventListener("change", function () {  // show the chosen matrix, hide the others
      Array.prototype.forEach.call(document.querySelectorAll("[data-matrix]"), function (m) {
        m.hidden = m.getAttribute("data-matrix") !== menu.value;
      });
    });
  });
})();
"""
