"""Text report and plots rendered from comparison / precision records built by helpers_report from real tensor names
(the example model's 483, and a synthetic 80-layer model), with numbers from a seeded RNG. Every expectation
is computed in this file from the record or the names, independently of loratv.report."""

from collections import Counter

import numpy as np
import pytest
from matplotlib.image import imread

from helpers_report import CATEGORIES, make_record
from loratv.example import builder as example
from loratv.report import plots, text

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def precision_record():
    rng = np.random.default_rng(7)
    paths = []
    for name, dtype in [("fp32", "F32"), ("fp16", "F16"), ("bf16", "BF16"),
                        ("fp16-cast-first", "F16"), ("bf16-cast-first", "BF16")]:
        cast = 0 if dtype == "F32" else 358 + int(rng.integers(0, 4))
        real, unexplained = 120, int(rng.integers(0, 3))
        paths.append({
            "name": name, "description": f"merge in fp32, output {dtype}", "output_dtype": dtype,
            "total_tensors": 483, "changed_tensors": real + cast + unexplained,
            "counts": {"real": real, "cast-artifact": cast, "unexplained": unexplained,
                       "unchanged": 483 - real - cast - unexplained},
            "vanished_elements": 0 if dtype == "F32" else int(rng.integers(10, 5000)), "targeted_elements": 184320,
            "effective_cosine": 1 - 10 ** rng.uniform(-12, -4), "max_error_ulps": float(rng.uniform(0.2, 3)),
            "max_certificate_ratio": float(rng.uniform(0.1, 2)), "verdict": "EQUIVALENT within tolerance",
        })
    return {"schema": "loratv.precision", "schema_version": 1, "base": "example/base",
            "adapter": "example/adapter", "paths": paths}


def check_png(path):
    assert path.exists()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image[..., :3]) > 0  # not one flat colour


def split_name(name):
    """Layer and per-layer kind straight from the name: model.layers.N.<kind>."""
    parts = name.split(".", 3)
    return (int(parts[2]), parts[3]) if parts[1] == "layers" else (None, name)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def record():
    return make_record(example.base_shapes())


@pytest.fixture(scope="module")
def rendered(record, tmp_path_factory):
    out = tmp_path_factory.mktemp("plots")
    info = {key: getattr(plots, f"{key}_plot")(record, out / name) for key, name in plots.FILES.items()}
    return out, info


# ---------------------------------------------------------------- plots

def test_write_comparison_plots_writes_four_valid_pngs(tmp_path):
    paths = plots.write_comparison_plots(make_record(example.base_shapes()[:40], seed=1), tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted([
        "cosine_similarity_analysis.png", "norm_distribution_comparison.png",
        "model_architecture_coverage.png", "parameter_modification_heatmap.png"])
    for path in paths:
        check_png(path)


def test_heatmap_matches_norm_ratios(record, rendered):
    out, info = rendered
    check_png(out / "parameter_modification_heatmap.png")
    names = [t["name"] for t in record["tensors"]]
    layers = sorted({split_name(n)[0] for n in names} - {None})
    kinds = list(dict.fromkeys(split_name(n)[1] for n in names if split_name(n)[0] is not None))
    assert len(kinds) == 16 and len(layers) == 30
    assert tuple(info["heatmap"]["shape"]) == (30, 16)
    expected = [[None] * len(kinds) for _ in layers]
    for t in record["tensors"]:
        layer, kind = split_name(t["name"])
        if layer is not None and t["task_vector_norm"] > 0:
            expected[layers.index(layer)][kinds.index(kind)] = t["task_vector_norm"] / t["base_norm"]
    got = info["heatmap"]["values"]
    for got_row, want_row in zip(got, expected, strict=True):
        assert [v is None for v in got_row] == [v is None for v in want_row]
        assert [v for v in got_row if v is not None] == pytest.approx([v for v in want_row if v is not None], rel=1e-12)


def test_coverage_cells_match_categories(record, rendered):
    out, info = rendered
    check_png(out / "model_architecture_coverage.png")
    cov = info["coverage"]
    assert (cov["rows"], cov["columns"]) == (31, 16)  # 30 layers + global row
    expected = Counter(t["category"] for t in record["tensors"])
    assert cov["cells"] == {c: expected.get(c, 0) for c in CATEGORIES}
    assert cov["cells"]["shared"] == 119 and cov["cells"]["unexplained"] == 2


def test_cosine_and_norm_series_match_record(record, rendered):
    out, info = rendered
    shared = [t for t in record["tensors"] if t["category"] == "shared"]
    assert info["cosine"]["points"] == len(shared) == record["summary"]["counts"]["shared"]
    assert set(info["cosine"]["kinds"]) == {split_name(t["name"])[1] for t in shared}
    changed = Counter(t["category"] for t in record["tensors"] if t["changed"])
    targeted = sum(t["targeted"] for t in record["tensors"])
    assert info["norm"] == {"shared": changed["shared"], "cast-artifact": changed["cast-artifact"],
                            "unexplained": changed["unexplained"], "lora_delta": targeted}
    check_png(out / "cosine_similarity_analysis.png")
    check_png(out / "norm_distribution_comparison.png")


def test_large_record_renders(tmp_path):
    shapes = [s for i in range(80) for s in example.layer_shapes(i)]
    big = make_record(shapes, seed=3)
    assert len(big["tensors"]) == 1280
    info = {key: getattr(plots, f"{key}_plot")(big, tmp_path / name) for key, name in plots.FILES.items()}
    assert tuple(info["heatmap"]["shape"]) == (80, 16)
    assert (info["coverage"]["rows"], info["coverage"]["columns"]) == (80, 16)
    for name in plots.FILES.values():
        check_png(tmp_path / name)
    assert "model.layers.79.self_attn.q_proj.weight" in text.render_comparison_text(big)


EMPTY_CASES = {
    "nothing-changed": (example.base_shapes()[:40], lambda name: "unchanged"),
    "no-tv-only": (example.base_shapes()[:40], lambda name: "shared" if "_proj.weight" in name else "unchanged"),
    "only-tv-only": (example.base_shapes()[:40], lambda name: "cast-artifact"),
    "only-global": ([s for s in example.base_shapes() if ".layers." not in s[0]],
                    lambda name: {"model.embed_tokens.weight": "shared", "model.norm.weight": "cast-artifact"}
                    .get(name, "unchanged")),
}


@pytest.mark.parametrize("case", EMPTY_CASES)
def test_empty_categories_render(case, tmp_path):
    shapes, category = EMPTY_CASES[case]
    rec = make_record(shapes, category)
    for path in plots.write_comparison_plots(rec, tmp_path):
        check_png(path)
    assert rec["summary"]["verdict"] in text.render_comparison_text(rec)
    assert rec["summary"]["verdict"] in text.render_seed_summary(rec)
    if case == "only-global":
        assert tuple(plots.heatmap_plot(rec, tmp_path / "h.png")["shape"]) == (0, 0)
        cov = plots.coverage_plot(rec, tmp_path / "c.png")
        assert cov["rows"] == 1 and sum(cov["cells"].values()) == 3


def test_precision_plot_and_text(tmp_path):
    rec = precision_record()
    info = plots.precision_plot(rec, tmp_path / "precision_comparison.png")
    check_png(tmp_path / "precision_comparison.png")
    assert info["paths"] == [p["name"] for p in rec["paths"]]
    for part in ("real", "cast-artifact", "unexplained"):
        assert info[part] == [p["counts"][part] for p in rec["paths"]]
    assert info["vanished_elements"] == [p["vanished_elements"] for p in rec["paths"]]
    report = text.render_precision_text(rec)
    lines = report.splitlines()
    for p in rec["paths"]:
        rows = [line for line in lines if line.split()[:1] == [p["name"]]]
        assert len(rows) == 1 and p["verdict"] in rows[0]
        assert f"{p['changed_tensors']:,} of 483" in rows[0]


# ---------------------------------------------------------------- text

def table_after(report: str, title_prefix: str) -> list[str]:
    """Header, rule and rows of the table under the section whose title starts with title_prefix."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title_prefix)) + 2
    end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
    return lines[start:end]


def assert_aligned(table):
    rule = table[1]
    assert set(rule) <= {"-", " "}
    gaps = [i for i, ch in enumerate(rule) if ch == " "]
    for line in table:
        assert len(line) == len(rule), line
        assert all(line[i] == " " for i in gaps), line


def test_text_report(record):
    report = text.render_comparison_text(record)
    s = record["summary"]
    assert f"Verdict: {s['verdict']}" in report
    assert s["verdict"] == "EQUIVALENT within tolerance"
    assert all(reason in report for reason in s["reasons"])
    assert record["command"] in report and "0.1.0" in report
    for cat in ("shared", "cast-artifact", "unexplained", "unchanged"):
        n, p = s["counts"][cat], s["parameters"][cat]
        assert f"{n:,} of 483 tensors" in report
        assert f"{p:,} of {s['total_parameters']:,} parameters" in report
    table = table_after(report, "Targeted tensors")
    targeted = [t for t in record["tensors"] if t["targeted"]]
    assert len(table) == 2 + len(targeted)
    for t, row in zip(targeted, table[2:]):
        assert row.startswith(t["name"])
        assert f"{t['max_abs_diff']:.3e}" in row and f"{t['certificate_ratio']:.3g}" in row
    assert_aligned(table)
    adapter_only = next(row for row in table if row.startswith("model.layers.29.self_attn.o_proj.weight"))
    assert "—" in adapter_only  # null cosine
    tv_only = table_after(report, "Changed tensors the adapter does not target")
    assert len(tv_only) == 2 + s["counts"]["tv-only"]
    assert_aligned(tv_only)
    layer_table = table_after(report, "Tensors per layer")
    assert len(layer_table) == 2 + 31
    assert_aligned(layer_table)
    assert all(note in report for note in record["notes"])


def test_long_names_truncated_from_left_and_aligned():
    long = "model.encoder.very_long_prefix.layers.0." + "x" * 50 + ".q_proj.weight"
    rec = make_record([(long, (4, 4)), ("model.layers.1.self_attn.q_proj.weight", (4, 4))],
                      lambda name: "shared")
    table = table_after(text.render_comparison_text(rec), "Targeted tensors")
    assert_aligned(table)
    assert table[2].startswith("…") and table[2].split()[0].endswith(".q_proj.weight")
    assert len(table[2].split()[0]) == 60


def test_seed_summary(record):
    summary = text.render_seed_summary(record)
    s = record["summary"]
    counts = s["counts"]
    assert f"Shared tensors analysed: {counts['shared']}" in summary
    assert f"Average cosine similarity: {s['mean_cosine']:.10f}" in summary
    assert f"Perfect matches (cosine > 0.9999): {s['perfect_matches']} of {counts['shared']}" in summary
    assert f"Verdict: {s['verdict']}" in summary
    assert (f"{counts['tv-only']} tensors changed that the adapter does not target; {counts['cast-artifact']} of them "
            "are cast artifacts: the fine-tuned tensor equals the base cast to fp16 bit for bit (rounding of the "
            f"untouched weights, not training); {counts['unexplained']} are unexplained.") in summary

    clean = make_record(example.base_shapes()[:40], lambda n: "shared" if "_proj.weight" in n else "unchanged")
    assert clean["summary"]["counts"]["tv-only"] == 0
    assert "does not target" not in text.render_seed_summary(clean)
    assert "Verdict: EQUIVALENT (certified)" in text.render_seed_summary(clean)
