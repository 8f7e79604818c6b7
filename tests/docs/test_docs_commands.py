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

REPO = Path(__file__).resolve().parents[2]
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
OUTPUT_FLAGS = ("-o", "--output", "--output_dir")


def readme_outputs(text: str | None = None) -> set:
    """The output paths that the README's "Set up and run" commands write. A reader runs those first, in the same
    folder, so a runnable block must not write one of them without --force (it would fail with "already exists")."""
    import shlex

    text = (REPO / "README.md").read_text(encoding="utf-8") if text is None else text
    section = re.search(r"^## Set up and run\n(.*?)(?=^## )", text, re.S | re.M)
    text = section.group(1) if section else text
    spans = re.findall(r"`([^`\n]+)`", text) + [line for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                                                  for line in block.splitlines()]
    outputs = set()
    for span in spans:
        for part in re.split(r"&&|;|\|\|?", span):
            try:
                argv = shlex.split(part)
            except ValueError:
                continue
            if not argv or not (argv[0] == "loratv" or (argv[0] == "python" and argv[1:2] and argv[1].endswith(".py"))):
                continue
            for flag, value in zip(argv, argv[1:]):
                if flag in OUTPUT_FLAGS and not re.fullmatch(r"[A-Z_]+", value):  # OUT, DIR: placeholders
                    outputs.add(value.rstrip("/"))
    return outputs


README_OUTPUTS = sorted(readme_outputs())


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
        for output in README_OUTPUTS:  # what the README's first commands left: a block must not clash with it
            (folder / output).mkdir(parents=True, exist_ok=True)
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
    from loratv.example.builder import example_merged, example_paths, write_example

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


def test_the_readme_outputs_are_found():
    """The blocks run beside the README's outputs; this proves the parser finds them (else the check is empty)."""
    assert {"validation_results", "precision_results"} <= set(README_OUTPUTS), README_OUTPUTS
    sample = "## Set up and run\n```bash\nloratv validate -o first --force && loratv merge -o OUT\n```\n## Next\n`loratv x -o later`"
    assert readme_outputs(sample) == {"first"}


def test_no_reference_outside_the_repository():
    """A clone stands on its own: no document or source file points into a sibling folder such as ../shared."""
    files = DOCS + sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "examples").rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "../shared" not in text, f"{path.relative_to(REPO)} refers to ../shared"
        links = re.findall(r"\]\(([^)#\s]+)", text) if path.suffix == ".md" else []
        for target in links:  # relative Markdown links resolve inside the repo
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (path.parent / target).resolve()
            assert REPO in resolved.parents or resolved == REPO, f"{path.relative_to(REPO)} links outside: {target}"
            assert resolved.exists(), f"{path.relative_to(REPO)} links to a missing file: {target}"


EXAMPLE_SCRIPT = REPO / "examples" / "check_cast_artifacts.py"


@pytest.mark.parametrize("blocked", ["safetensors", "torch"])
def test_example_script_needs_only_torch(blocked, tmp_path, example_dir):
    """After `pip install -e .` (no safetensors): the script runs; without torch: one line, no traceback."""
    import sys

    from loratv.example.builder import example_merged

    runner = (f"import sys; sys.modules[{blocked!r}] = None; sys.argv = sys.argv[1:]; import runpy; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", runner, str(EXAMPLE_SCRIPT), str(example_dir / "base"),
                           str(example_dir / "adapter"), str(example_merged("fp32"))],
                          capture_output=True, text=True, timeout=120)
    if blocked == "safetensors":
        assert proc.returncode == 0, proc.stderr
        assert "363 of 363 untargeted tensors are the base cast to float32, bit for bit" in proc.stdout
    else:
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "check_cast_artifacts.py: needs torch; install it with `pip install torch` (or `pip install -e .`)."]
