"""Every command block the documentation marks as runnable runs, and the output it shows is the output it prints.

Markers (HTML comments, invisible on GitHub), each on the line right before a fenced block:

    <!-- runnable -->   the next ```bash block is run with `bash -e -o pipefail` in a fresh folder holding `ex/`
                        (the embedded example: ex/base, ex/adapter), `examples/` and the seed scripts, offline, with
                        LORATV_CACHE pointing at the test session's cache; it must exit 0 within TIMEOUT seconds.
    <!-- output -->     the next fenced block shows what the nearest runnable block above it (in the same file)
                        prints: each of its lines must appear in that block's stdout, in the same order (a line
                        `...` stands for lines left out). One run may have several output blocks, so a document can
                        show parts of one run in different sections without running it twice.

Only commands that run offline in seconds on the example are marked (no pip, no hub, no benchmarks). The blocks run
two at a time; the example and its fp32 merge are written to the cache before, so no two blocks race to write them.
"""

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "SETUP.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
SEED_SCRIPTS = ["merge_lora.py", "extract_task_vectors.py", "compare_lora_task_vector.py", "final_validation.py",
                "analyze_lora_vs_task_vector_math.py", "quick_precision_test.py"]
RUNNABLE = "<!-- runnable -->"
OUTPUT = "<!-- output -->"
TIMEOUT = 120
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")


def _fenced(lines, i, where):
    """(language, body lines, index after the block) of the fenced block starting at line i (blank lines skipped)."""
    while i < len(lines) and not lines[i].strip():
        i += 1
    m = FENCE.match(lines[i]) if i < len(lines) else None
    if not m:
        raise AssertionError(f"{where}: a marker must be followed by a fenced block")
    indent, fence, lang = m.groups()
    body = []
    i += 1
    while i < len(lines) and lines[i].strip() != fence:
        body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
        i += 1
    if i == len(lines):
        raise AssertionError(f"{where}: unterminated fenced block")
    return lang, body, i + 1


def parse_blocks(path: Path):
    """[{"where", "script", "expected": [lines of each output block]}] for every runnable block of one file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        marker = lines[i].strip()
        where = f"{path.relative_to(REPO)}:{i + 1}"
        if marker == OUTPUT:
            assert blocks, f"{where}: an output block needs a runnable block above it"
            _, expected, i = _fenced(lines, i + 1, where)
            blocks[-1]["expected"].append(expected)
        elif marker == RUNNABLE:
            lang, body, i = _fenced(lines, i + 1, where)
            assert lang in ("bash", "sh", "shell"), f"{where}: runnable blocks are bash, not {lang!r}"
            blocks.append({"where": where, "script": "\n".join(body) + "\n", "expected": []})
        else:
            i += 1
    return blocks


BLOCKS = [b for doc in DOCS if doc.is_file() for b in parse_blocks(doc)]


def matches_in_order(expected, actual_lines):
    """The expected lines not found in order in the actual output (empty when all are)."""
    actual = [line.rstrip() for line in actual_lines]
    missing = []
    pos = 0
    for line in expected:
        line = line.rstrip()
        if not line.strip() or line.strip() == "...":
            continue
        try:
            pos = actual.index(line, pos) + 1
        except ValueError:
            missing.append(line)
    return missing


def _run(block, example_root: Path):
    folder = Path(tempfile.mkdtemp(prefix="loratv-doc-"))
    try:
        shutil.copytree(example_root, folder / "ex")
        os.symlink(REPO / "examples", folder / "examples")
        for script in SEED_SCRIPTS:
            os.symlink(REPO / script, folder / script)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", COLUMNS="200")
        try:
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block["script"]], cwd=folder, env=env,
                                  capture_output=True, text=True, timeout=TIMEOUT)
            return proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as exc:
            return "timeout", exc.stdout or "", exc.stderr or ""
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every runnable block's (exit code, stdout, stderr), run two at a time against one warmed cache."""
    from loratv.example import example_merged, example_paths, write_example

    example_paths()
    example_merged("fp32")
    root = tmp_path_factory.mktemp("docs-example") / "ex"
    write_example(root)
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = pool.map(lambda b: _run(b, root), BLOCKS)
        return {b["where"]: r for b, r in zip(BLOCKS, runs)}


@pytest.mark.parametrize("block", BLOCKS, ids=[b["where"] for b in BLOCKS])
def test_runnable_block(block, results):
    rc, out, err = results[block["where"]]
    assert rc == 0, f"{block['where']} exited {rc}\n--- script\n{block['script']}--- stderr\n{err[-3000:]}"
    for expected in block["expected"]:
        missing = matches_in_order(expected, out.splitlines())
        assert not missing, (f"{block['where']}: shown output not printed (in this order):\n" + "\n".join(missing)
                             + f"\n--- actual stdout\n{out[-6000:]}")


def test_the_documents_carry_runnable_blocks():
    per_file = {}
    for b in BLOCKS:
        per_file[b["where"].rsplit(":", 1)[0]] = per_file.get(b["where"].rsplit(":", 1)[0], 0) + 1
    for doc in ("docs/starcoder2-architecture.md", "docs/lora-vs-task-vectors.md", "SETUP.md", "CONTRIBUTING.md"):
        assert per_file.get(doc, 0) >= 1, doc
    shown = sum(len(b["expected"]) for b in BLOCKS)
    assert shown >= 5


def test_the_output_matcher():
    assert matches_in_order(["a", "...", "c"], ["a", "b", "c"]) == []
    assert matches_in_order(["c", "a"], ["a", "b", "c"]) == ["a"]
    assert matches_in_order(["x"], ["a"]) == ["x"]
