"""report.html without a browser: which commands write it, that it embeds exactly the PNGs written and lists exactly
the record's tensors, that `loratv report` re-renders it, refuses bad input, and never links out. Expectations come
from the JSON records and the file system, parsed here independently of loratv.report.html."""

import base64
import json
import re
import shutil
from collections import Counter

import pytest
from helpers_io import run_cli
from helpers_report import Page, example_category, example_validation, layered_validation, make_record

from loratv.example import builder as example
from loratv.report import html as report_html

PNG = b"\x89PNG\r\n\x1a\n"


def page_of(folder) -> Page:
    return Page((folder / "report.html").read_text(encoding="utf-8"))


def data_images(page: Page) -> list:
    return page.find("img")


def check_self_contained(page: Page) -> None:
    """CSP present and strict; no attribute anywhere names a network or file location."""
    csp = page.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert len(csp) == 1
    rules = dict(r.strip().split(" ", 1) for r in csp[0]["content"].split(";") if r.strip())
    assert rules["default-src"] == "'none'" and rules["img-src"] == "data:"
    for tag, attrs in page.tags:
        for key in ("src", "href", "action", "data", "poster", "srcset"):
            value = attrs.get(key)
            if value is None:
                continue
            if key == "href":
                assert value.startswith("#"), (tag, value)
            else:
                assert value.startswith("data:image/png;base64,"), (tag, value[:40])
    assert not page.find("link") and not page.find("iframe") and not page.find("object")
    assert all("src" not in a for a in page.find("script"))  # the one script is inline


def check_headings(page: Page) -> None:
    levels = [level for level, _ in page.headings]
    assert levels.count(1) == 1 and levels[0] == 1
    assert all(b <= a + 1 for a, b in zip(levels, levels[1:])), page.headings  # no skipped level


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    return example_validation(tmp_path_factory)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return layered_validation(tmp_path_factory)


@pytest.fixture(scope="module")
def record(validated):
    return json.loads((validated / "comparison_results.json").read_text())


# ---------------------------------------------------------------- the page validate writes

def test_validate_writes_a_self_contained_page(validated, record):
    page = page_of(validated)
    check_self_contained(page)
    check_headings(page)
    assert page.text_by_id["verdict-text"].endswith(record["summary"]["verdict"])
    assert page.find("p", id="verdict-text")[0]["data-verdict"] == record["summary"]["verdict"]
    assert page.find("html")[0]["lang"] == "en"
    assert record["command"] in (validated / "report.html").read_text()


def test_embeds_exactly_the_pngs_written(validated):
    page = page_of(validated)
    images = data_images(page)
    pngs = sorted(validated.glob("*.png"))
    assert len(pngs) == 4 and len(images) == len(pngs)
    embedded = {img["data-file"]: base64.b64decode(img["src"].split(",", 1)[1]) for img in images}
    assert embedded == {p.name: p.read_bytes() for p in pngs}
    for img in images:
        assert len(img["alt"]) > 40  # a sentence, not a file name
        w, h = int.from_bytes(embedded[img["data-file"]][16:20], "big"), int.from_bytes(embedded[img["data-file"]][20:24], "big")
        assert (int(img["width"]), int(img["height"])) == (w, h)


def test_tensor_table_lists_every_tensor_in_base_order(validated, record):
    rows = page_of(validated).tables["tensor-table"]
    assert [cells[1] for _, cells in rows] == [t["name"] for t in record["tensors"]]
    assert [attrs["data-cat"] for attrs, _ in rows] == [t["category"] for t in record["tensors"]]
    letters = {"shared": "S", "cast-artifact": "C"}
    assert [cells[2] for _, cells in rows] == [f"{letters[t['category']]} {t['category']}" for t in record["tensors"]]
    # every targeted tensor shows its certificate ratio to 3 significant digits
    for (attrs, cells), t in zip(rows, record["tensors"]):
        if t["certificate_ratio"] is not None:
            assert cells[7] == f"{t['certificate_ratio']:.3g}"
        else:
            assert cells[7] == "—"


def test_coverage_grid_matches_names(validated, record):
    """Rows = layers 0..29 parsed from the names; each cell's letter is its tensor's category."""
    page = page_of(validated)
    grid = page.tables["coverage-grid"]
    assert [cells[0] for _, cells in grid] == [str(i) for i in range(example.LAYERS)]
    letters = {"shared": "S", "cast-artifact": "C", "unexplained": "U", "adapter-only": "A", "unchanged": "·"}
    by_name = {t["name"]: t["category"] for t in record["tensors"]}
    for i, (_, cells) in enumerate(grid):
        expected = [letters[by_name[name]] for name, _ in example.layer_shapes(i)]
        assert cells[1:] == expected
    counts = Counter(letter for _, cells in grid for letter in cells[1:])
    assert counts["S"] == record["summary"]["counts"]["shared"]
    # the 3 tensors outside layers are listed under the grid and link to their rows
    globals_ = [n for n, _ in example.base_shapes() if ".layers." not in n]
    index = {t["name"]: i for i, t in enumerate(record["tensors"])}
    hrefs = {a["href"] for a in page.find("a") if a.get("href", "").startswith("#cmp-t")}
    assert {f"#cmp-t{index[n]}" for n in globals_} <= hrefs
    assert len(hrefs) == len(record["tensors"])


def test_headline_numbers(validated, record):
    html = (validated / "report.html").read_text()
    s, counts = record["summary"], record["summary"]["counts"]

    def card(label):
        return re.search(rf"<dt>{re.escape(label)}</dt><dd>(.*?)<small>", html).group(1)

    assert card("Tensors in the base") == f"{s['total_tensors']:,}" == "483"
    assert card("Shared (both change)") == f"{counts['shared']:,}" == "120"
    assert card("Cast artifacts") == f"{counts['cast-artifact']:,}" == "363"
    assert card("Max certificate ratio") == f"{s['max_certificate_ratio']:.3g}"
    assert f"{s['total_parameters']:,}" in html and f"{s['adapter_stored_parameters']:,}" in html
    assert "The 363 other changed tensors are the base cast to F16, bit for bit" in page_of(validated).text


def test_report_command_rerenders_the_same_page(validated, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(validated, out, ignore=shutil.ignore_patterns("merged_model_*", "task_vectors_*", "*.safetensors"))
    original = (out / "report.html").read_bytes()
    (out / "report.html").unlink()
    rc, stdout, stderr = run_cli(capsys, "report", out)
    assert (rc, stderr) == (0, "") and "report.html" in stdout
    assert (out / "report.html").read_bytes() == original
    # without the PNGs the page still has its four plots, drawn from the record; nothing else is written
    for png in out.glob("*.png"):
        png.unlink()
    before = sorted(p.name for p in out.iterdir())
    assert run_cli(capsys, "report", out, "--quiet")[:2] == (0, "")
    assert sorted(p.name for p in out.iterdir()) == before
    images = data_images(page_of(out))
    assert len(images) == 4
    assert all(base64.b64decode(i["src"].split(",", 1)[1])[:8] == PNG for i in images)


def test_no_plots_means_no_page(tmp_path, capsys):
    rc, _, _ = run_cli(capsys, "compare", "-o", tmp_path / "c", "--no-plots", "--quiet")
    assert rc == 0
    assert (tmp_path / "c" / "comparison_results.json").is_file()
    assert not (tmp_path / "c" / "report.html").exists() and not list((tmp_path / "c").glob("*.png"))


# ---------------------------------------------------------------- precision and analyze

def test_precision_page(tmp_path, capsys):
    out = tmp_path / "prec"
    rc, _, _ = run_cli(capsys, "precision", "--paths", "fp32", "bf16-cast-first", "-o", out, "--quiet")
    assert rc == 0
    study = json.loads((out / "precision_results.json").read_text())
    page = page_of(out)
    check_self_contained(page)
    check_headings(page)
    rows = page.tables["precision-table"]
    assert [cells[0].split()[0] for _, cells in rows] == [p["name"] for p in study["paths"]]
    assert [cells[1] for _, cells in rows] == [f"✓ {p['verdict']}" for p in study["paths"]]
    assert [td["data-verdict"] for td in page.find("td", **{"class": "pv"})] == [p["verdict"] for p in study["paths"]]
    assert [cells[3] for _, cells in rows] == [f"{p['changed_tensors']:,}" for p in study["paths"]]
    assert [i["data-file"] for i in data_images(page)] == ["precision_comparison.png"]
    # each path's own comparison record gets its table, with all its tensors
    for p in study["paths"]:
        sub = json.loads((out / p["name"] / "comparison_results.json").read_text())
        table = page.tables[f"p-{p['name']}-table"]
        assert [cells[1] for _, cells in table] == [t["name"] for t in sub["tensors"]]
        assert page.find("p", id=f"p-{p['name']}-verdict")[0]["data-verdict"] == sub["summary"]["verdict"]
    assert study["command"] and study["command"] in page.text  # recorded (in-process its argv is pytest's)


def test_analyze_page(tmp_path, capsys):
    out = tmp_path / "ana"
    assert run_cli(capsys, "analyze", "--spectrum", "-o", out, "--quiet")[0] == 0
    rec = json.loads((out / "analysis_results.json").read_text())
    page = page_of(out)
    check_self_contained(page)
    check_headings(page)
    assert sorted(i["data-file"] for i in data_images(page)) == sorted(p.name for p in out.glob("*.png"))
    assert len(data_images(page)) == 5
    rows = page.tables["analysis-table"]
    assert [cells[1] for _, cells in rows] == [t["name"] for t in rec["tensors"]]
    ranks = [cells[4] for _, cells in rows]
    assert ranks == [str(t["spectrum"]["numerical_rank"]) for t in rec["tensors"]]
    assert [h for _, h in page.headings if h == "Spectra and ranks"]


# ---------------------------------------------------------------- bad input: one sentence, exit 2, nothing written

def corrupt_cases(folder):
    good = json.loads((folder / "comparison_results.json").read_text())
    return {
        "empty folder": None,
        "not JSON": "{\"schema\": \"loratv.comparison\", ",
        "wrong schema": json.dumps({**good, "schema": "loratv.analysis"}),
        "newer version": json.dumps({**good, "schema_version": 2}),
        "a list": "[1, 2]",
        "NaN": json.dumps(good).replace('"tolerance": 1e-05', '"tolerance": NaN', 1),
        "duplicate key": '{"schema": "loratv.comparison", "schema": "loratv.comparison"}',
        "not UTF-8": b"\xff\xfe{}",
        "tensor without category": json.dumps({**good, "tensors": [{"name": "x", "layer": None, "kind": "x"}]}),
        "unknown category": json.dumps({**good, "tensors": [dict(good["tensors"][0], category="weird")]}),
        "summary missing": json.dumps({k: v for k, v in good.items() if k != "summary"}),
        "tensors not a list": json.dumps({**good, "tensors": {"a": 1}}),
        "wrong type deep down": json.dumps({**good, "summary": {**good["summary"], "counts": [1, 2]}}),
    }


@pytest.mark.parametrize("case", ["empty folder", "not JSON", "wrong schema", "newer version", "a list", "NaN",
                                  "duplicate key", "not UTF-8",
                                  "tensor without category", "unknown category", "summary missing",
                                  "tensors not a list", "wrong type deep down"])
def test_bad_records_are_refused(case, validated, tmp_path, capsys):
    out = tmp_path / "bad"
    out.mkdir()
    text = corrupt_cases(validated)[case]
    if isinstance(text, bytes):
        (out / "comparison_results.json").write_bytes(text)
    elif text is not None:
        assert "NaN" in text or case != "NaN"
        (out / "comparison_results.json").write_text(text)
    (out / "report.html").write_text("old page")
    rc, stdout, stderr = run_cli(capsys, "report", out)
    assert rc == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("loratv: error: ") and str(out) in stderr
    assert (out / "report.html").read_text() == "old page"  # untouched
    assert sorted(p.name for p in out.iterdir()) == sorted(["report.html"] + ([] if text is None else
                                                                             ["comparison_results.json"]))


def test_missing_folder_is_refused(tmp_path, capsys):
    rc, _, stderr = run_cli(capsys, "report", tmp_path / "nowhere")
    assert rc == 2 and "not a folder" in stderr and not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------- synthetic records: verdicts, escaping

def test_not_equivalent_and_hostile_names_are_rendered_safely(tmp_path, capsys):
    shapes = example.base_shapes()[:60]
    hostile = 'model.layers.0.self_attn.q_proj.weight"><script>alert(1)</script>'
    shapes[1] = (hostile, shapes[1][1])
    rec = make_record(shapes, category=lambda n: "unexplained" if n == hostile else example_category(n))
    rec["summary"]["verdict"] = "NOT EQUIVALENT"
    rec["command"] = None
    (tmp_path / "comparison_results.json").write_text(json.dumps(rec))
    assert run_cli(capsys, "report", tmp_path, "--quiet")[0] == 0
    text = (tmp_path / "report.html").read_text()
    assert "<script>alert" not in text and text.count("<script>") == 1
    page = Page(text)
    assert page.find("p", id="verdict-text")[0]["class"] == "verdict v-not"
    assert [cells[1] for _, cells in page.tables["tensor-table"]] == [t["name"] for t in rec["tensors"]]
    assert rec["summary"]["reasons"][0] in page.text and hostile in page.text
    # no command in the record: an equivalent one is rebuilt from its inputs
    assert "loratv compare --base example/base --adapter example/adapter --finetuned merged_model_fp16" in text


def test_hub_revision_is_named(tmp_path):
    rec = make_record(example.base_shapes()[:20])
    rec["inputs"]["base"] = "bigcode/starcoder2-3b@a1b2c3d"
    rec["inputs"]["adapter"] = "someone/lora"
    (tmp_path / "comparison_results.json").write_text(json.dumps(rec))
    text = report_html.render_report(report_html.load_records(tmp_path), {})  # no plots needed here
    assert len(re.findall(r"hub revision <code>(.*?)</code>", text)) == 1 and "hub revision <code>a1b2c3d</code>" in text


# ---------------------------------------------------------------- an 80-layer model

def test_80_layer_page_lists_everything(big):
    rec = json.loads((big / "comparison_results.json").read_text())
    assert len(rec["tensors"]) == 80 * 16 + 3
    page = page_of(big)
    grid = page.tables["coverage-grid"]
    assert [cells[0] for _, cells in grid] == [str(i) for i in range(80)]
    assert all(len(cells) == 17 for _, cells in grid)
    assert Counter(c for _, cells in grid for c in cells[1:]) == {"S": 320, "C": 960}
    assert len(page.tables["tensor-table"]) == 1283
    assert len(data_images(page)) == 4


def test_names_and_schemas_agree_with_the_writers():
    from loratv.ops import analyze
    from loratv.ops import compare
    from loratv.ops import precision_study

    assert report_html.COMPARISON_FILE == compare.RESULTS_FILE and report_html.COMPARISON_SCHEMA == compare.SCHEMA
    assert report_html.ANALYSIS_FILE == analyze.RESULTS_NAME
    assert report_html.PRECISION_FILE == precision_study.RESULTS_FILE
    assert report_html.PRECISION_SCHEMA == precision_study.SCHEMA and report_html.PRECISION_PLOT == precision_study.PLOT_FILE


@pytest.mark.parametrize("value, text", [(3.0420788e-05, "3.04 × 10<sup>−5</sup>"), (0.4964, "0.496"),
                                         (78.22, "78.2"), (1407616.0, "1.41 × 10<sup>6</sup>"), (12345.6, "12,346"),
                                         (0.0, "0"), (None, "—"), (1e-5, "1 × 10<sup>−5</sup>")])
def test_number_format(value, text):
    assert report_html.sci(value) == text


def test_cosine_format():
    assert report_html.cos(1 - 1.1e-6) == "1 − 1.1 × 10<sup>−6</sup>"
    assert report_html.cos(0.5) == "0.500000" and report_html.cos(1.0) == "1" and report_html.cos(None) == "—"
