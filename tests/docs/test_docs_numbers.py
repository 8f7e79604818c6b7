"""Numbers the documents state outside command-output blocks, recomputed here so they cannot drift.

- docs/starcoder2-architecture.md: the summary table (tensors, parameters, what a q/k/v/o LoRA touches and stores
  at r = 8, 16, 64 for the three public configs), row by row, from `loratv inspect`'s JSON for each config.
- docs/lora-vs-task-vectors.md: the StarCoder2-3B-shaped figures it quotes from docs/benchmarks.md (measured there,
  too slow to rerun here) must be the figures benchmarks.md states.
"""

import re
from pathlib import Path

import pytest

from loratv.ops.inspect import describe

REPO = Path(__file__).resolve().parents[2]
ARCH = REPO / "docs" / "starcoder2-architecture.md"
LVT = REPO / "docs" / "lora-vs-task-vectors.md"
MODELS = [("StarCoder2-3B", "starcoder2-3b"), ("Llama-3-8B", "llama-3-8b"), ("Qwen2.5-7B", "qwen2.5-7b")]
RANKS = (8, 16, 64)


def _pct(x: float, digits: int) -> str:
    return f"{100 * x:.{digits}f} %"


def table_row(label: str, config: str) -> str:
    """The Markdown row the summary table must hold for one model."""
    r = describe(REPO / "examples" / "configs" / f"{config}.json", lora_ranks=list(RANKS))
    lora = r["lora"]
    layers = f"{r['layers']} × {r['tensors_per_layer']} + {len(r['global_tensors'])}"
    cells = [
        f"[{label}](../examples/configs/{config}.json)",
        f"{r['total_tensors']} = {layers}",
        f"{r['total_parameters']:,} ({r['total_parameters'] / 1e9:.2f} B)",
        "yes" if r["tied_embeddings"] else "no",
        f"{lora['touched_tensors']} ({_pct(lora['share_of_tensors'], 2)})",
        f"{lora['touched_parameters']:,} ({_pct(lora['share_of_parameters'], 2)})",
    ]
    cells += [f"{p['stored_parameters']:,} ({_pct(p['share_of_model'], 3)})" for p in lora["per_rank"]]
    return "| " + " | ".join(cells) + " |"


def _section(text: str, marker: str) -> str:
    start = text.index(marker)
    return text[start:text.index("\n\n", start)]


@pytest.mark.parametrize("label,config", MODELS)
def test_architecture_summary_table(label, config):
    table = _section(ARCH.read_text(encoding="utf-8"), "<!-- checked: lora-table -->")
    row = table_row(label, config)
    assert row in table.splitlines(), f"expected row:\n{row}\nin:\n{table}"


def test_the_summary_table_has_no_other_rows():
    table = _section(ARCH.read_text(encoding="utf-8"), "<!-- checked: lora-table -->")
    rows = [line for line in table.splitlines() if line.startswith("| [")]
    assert len(rows) == len(MODELS)


# figures the two documents quote for the 3B-shaped pair, each exactly as benchmarks.md states it
QUOTED_FROM_BENCHMARKS = [
    (ARCH, "483 tensors, 3.030 B parameters, 12.12 GB"),
    (ARCH, "240 fp32 tensors, 36 MB"),
    (ARCH, "2.45 GB of fp32"),
    (LVT, "240 fp32 tensors, 36 MB"),
    (LVT, "2.45 GB of fp32"),
    (LVT, "largest certificate ratio 0.899, global cosine 0.99999999999982"),
    (LVT, "numerical rank 16 = r for 120 of 120"),
    (LVT, "rank 0 for all 61 two-dimensional cast artifacts"),
    (LVT, "smallest σ₁₆/φ = 48 507"),
    (LVT, "| 36.4 | 16 × 120 modules |"),
    (LVT, "**6.35e-07**"),
    (LVT, "| | 6.39e-07 |"),
    (LVT, "| 181.5 |"),
]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)  # line breaks differ between the files


@pytest.mark.parametrize("doc,quote", QUOTED_FROM_BENCHMARKS,
                         ids=[f"{d.stem}:{q[:30]}" for d, q in QUOTED_FROM_BENCHMARKS])
def test_quoted_benchmark_figures(doc, quote):
    """The quote is in benchmarks.md, and every number in it is in the document that quotes it."""
    assert _flat(quote) in _flat((REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8"))
    text = _flat(doc.read_text(encoding="utf-8"))
    for number in re.findall(r"\d[\d.,e-]*\d|\d", quote.replace("48 507", "48507")):
        assert number in text.replace("48 507", "48507"), (number, quote)
