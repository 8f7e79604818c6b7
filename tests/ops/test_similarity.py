"""`loratv similarity` against dense float64 NumPy: every adapter's ΔW materialised from its file and config
independently of loratv, the cosines (global, per layer, per module kind) and subspace overlaps computed densely;
symmetric, unit diagonal, invariant to the order of the inputs; a duplicated adapter found; a task vector of a
merged adapter recognised as that adapter."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.torch import load_file, save_file

from helpers_io import assert_nothing_at, assert_one_line_error, run_cli
from tiny_models import build_adapter, build_base

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A Llama base; adapters a (rank 4, q/v), b = a with B doubled (a duplicate up to scale), c (rank 2 rsLoRA on
    q/k/o, patterns), d (rank 8 on v/o)."""
    root = tmp_path_factory.mktemp("similarity")
    base = build_base("llama", root / "base")
    a = build_adapter(base, root / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = root / "b"
    shutil.copytree(a, b)
    state = load_file(str(b / "adapter_model.safetensors"))
    state = {k: v * 2 if "lora_B" in k else v for k, v in state.items()}
    save_file(state, str(b / "adapter_model.safetensors"), metadata={"format": "pt"})
    c = build_adapter(base, root / "c", seed=3, r=2, lora_alpha=3, use_rslora=True,
                      target_modules=["q_proj", "k_proj", "o_proj"], rank_pattern={"model.layers.1.self_attn.q_proj": 3})
    d = build_adapter(base, root / "d", seed=4, r=8, lora_alpha=8, target_modules=["v_proj", "o_proj"])
    return base, [a, b, c, d]


def _deltas(folder) -> dict:
    """module -> s·B@A, float64 NumPy, from the file and adapter_config.json."""
    import re

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = {k: v.astype(np.float64) for k, v in np_load_file(str(folder / "adapter_model.safetensors")).items()}
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key[len(PREFIX):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            r = a.shape[0]
            ak = next((k for k in config.get("alpha_pattern") or {} if re.match(rf"(.*\.)?({k})$", module)), None)
            alpha = config["alpha_pattern"][ak] if ak else config["lora_alpha"]
            out[module] = (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r) * (b @ a)
    return out


def _dense_cosines(items: list, select=lambda name: True) -> np.ndarray:
    modules = sorted({m for d in items for m in d if select(m)})
    k = len(items)
    gram = np.zeros((k, k))
    for m in modules:
        flat = [d[m].ravel() if m in d else None for d in items]
        for i in range(k):
            for j in range(k):
                if flat[i] is not None and flat[j] is not None:
                    gram[i, j] += flat[i] @ flat[j]
    norms = np.sqrt(np.diag(gram))
    with np.errstate(invalid="ignore", divide="ignore"):  # an input without this kind: NaN, as loratv's None
        return gram / np.outer(norms, norms)


def test_cosines_and_overlaps_against_dense_numpy(fleet, tmp_path, capsys):
    base, adapters = fleet
    out = tmp_path / "sim"
    rc, stdout, err = run_cli(capsys, "similarity", *adapters, "-o", out)
    assert rc == 0, err
    assert "near-duplicates" in stdout
    record = json.loads((out / "similarity.json").read_text())
    assert record["adapters"] == ["a", "b", "c", "d"]
    items = [_deltas(a) for a in adapters]
    want = _dense_cosines(items)
    got = np.array(record["cosine"], dtype=float)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.array_equal(got, got.T) and np.all(np.diag(got) == 1.0)
    for layer, matrix in zip(record["per_layer"]["layers"], record["per_layer"]["cosine"], strict=True):
        expected = _dense_cosines(items, lambda m, layer=layer: f".layers.{layer}." in m)
        np.testing.assert_allclose(np.array(matrix, dtype=float), expected, rtol=0, atol=1e-12)
    for kind, matrix in record["per_kind"].items():
        expected = _dense_cosines(items, lambda m, kind=kind: m.endswith(kind))
        np.testing.assert_allclose(np.array(matrix, dtype=float), expected, rtol=0, atol=1e-12)
    assert [(p["a"], p["b"]) for p in record["near_duplicates"]] == [("a", "b")]
    # column-space overlap of a and d on their shared v_proj modules, densely: ‖QaᵀQd‖²/min(ra, rd)
    overlaps = []
    for m in sorted(set(items[0]) & set(items[3])):
        qa = np.linalg.svd(items[0][m], full_matrices=False)[0][:, :4]
        qd = np.linalg.svd(items[3][m], full_matrices=False)[0][:, :8]
        overlaps.append(np.linalg.norm(qa.T @ qd) ** 2 / 4)
    assert math.isclose(record["overlap"]["column"][0][3], float(np.mean(overlaps)), rel_tol=1e-9)
    assert record["overlap"]["column"][0][1] == pytest.approx(1.0, abs=1e-12)  # the duplicate: the same subspace
    assert record["overlap"]["column"][0][2] is not None and record["overlap"]["tensors_compared"][0][2] == 2
    assert (out / "similarity_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "similarity_per_layer.png").exists()
    # report.html: the global matrix in clustered order, each cell carrying the record's cosine
    import re

    page = (out / "report.html").read_text()
    matrix = page[page.index('data-matrix="global"'):]
    matrix = matrix[:matrix.index("</table>")]
    values = [float(v) for v in re.findall(r'<td style="[^"]*" data-v="([^"]+)"', matrix)]
    order = record["clustering"]["order"]
    assert values == [record["cosine"][i][j] for i in order for j in order]
    assert page.count('data-matrix="kind-') == len(record["per_kind"])
    (out / "report.html").unlink()
    rc, _, err = run_cli(capsys, "report", out)  # re-rendered from the JSON alone
    assert rc == 0 and (out / "report.html").read_text().count('data-matrix="') == len(record["per_kind"]) + 1


def test_the_order_of_the_inputs_only_permutes_the_matrices(fleet, tmp_path, capsys):
    base, adapters = fleet
    first, second = tmp_path / "one", tmp_path / "two"
    order = [3, 1, 0, 2]
    assert run_cli(capsys, "similarity", *adapters, "-o", first, "--no-plots", "--quiet")[0] == 0
    assert run_cli(capsys, "similarity", *[adapters[i] for i in order], "-o", second, "--no-plots",
                   "--quiet")[0] == 0
    one = np.array(json.loads((first / "similarity.json").read_text())["cosine"], dtype=float)
    two = np.array(json.loads((second / "similarity.json").read_text())["cosine"], dtype=float)
    np.testing.assert_allclose(two, one[np.ix_(order, order)], rtol=0, atol=1e-14)


def test_a_task_vector_of_a_merged_adapter_is_that_adapter(fleet, tmp_path, capsys):
    base, adapters = fleet
    merged, tv = tmp_path / "merged", tmp_path / "tv"
    assert run_cli(capsys, "merge", "--base", base, "--adapter", adapters[2], "-o", merged, "--quiet")[0] == 0
    assert run_cli(capsys, "extract", "--base", base, "--finetuned", merged, "-o", tv, "--quiet")[0] == 0
    listing = tmp_path / "adapters.txt"
    listing.write_text("# the fleet\n" + "\n".join(str(a) for a in adapters) + "\n")
    out = tmp_path / "sim"
    rc, _, err = run_cli(capsys, "similarity", "--list", listing, "--base", base, "--task-vectors", tv, "-o", out,
                         "--quiet")
    assert rc == 0, err
    record = json.loads((out / "similarity.json").read_text())
    assert record["adapters"][-1] == "tv" and record["inputs"][-1]["kind"] == "task_vector"
    assert record["cosine"][2][4] > 1 - 1e-6  # c and its own merged-and-extracted task vector (fp32 rounding)
    assert abs(record["cosine"][0][4] - record["cosine"][0][2]) < 1e-6


def test_sign_conflicts_against_dense_numpy(fleet, tmp_path, capsys):
    """On each tensor's top-20 % support: per pair, the fraction of common support where signs differ; overall, the
    share of trimmed magnitude agreeing with TIES's elected sign."""
    base, adapters = fleet
    out = tmp_path / "sim"
    assert run_cli(capsys, "similarity", *adapters, "-o", out, "--sign-conflicts", "--no-plots", "--quiet")[0] == 0
    record = json.loads((out / "similarity.json").read_text())["sign_conflicts"]
    items = [_deltas(a) for a in adapters]
    k = len(items)
    conflicts, common = np.zeros((k, k)), np.zeros((k, k))
    agreeing = mass = 0.0
    for m in sorted({m for d in items for m in d}):
        held = [i for i in range(k) if m in items[i]]
        trimmed = {}
        for i in held:
            x = items[i][m].ravel()
            cut = np.sort(np.abs(x))[-max(1, int(0.2 * x.size))]
            trimmed[i] = np.where(np.abs(x) >= cut, x, 0.0)
        for i in held:
            for j in held:
                both = (trimmed[i] != 0) & (trimmed[j] != 0)
                common[i, j] += both.sum()
                conflicts[i, j] += (both & (np.sign(trimmed[i]) != np.sign(trimmed[j]))).sum()
        stack = np.stack([trimmed[i] for i in held])
        elected = np.where(stack.sum(0) >= 0, 1.0, -1.0)
        agreeing += float((np.abs(stack) * (np.sign(stack) == elected)).sum())
        mass += float(np.abs(stack).sum())
    with np.errstate(invalid="ignore"):
        want = conflicts / common
    got = np.array(record["rate"], dtype=float)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert record["rate"][0][1] == 0.0  # a and its scaled copy never disagree
    assert math.isclose(record["agreement_ratio"], agreeing / mass, rel_tol=1e-12)


def test_the_api(fleet, tmp_path):
    import loratv

    base, adapters = fleet
    result = loratv.similarity(adapters[:3], tmp_path / "api", base=base, plots=False)
    assert isinstance(result, loratv.SimilarityResult) and result.names == ("a", "b", "c")
    assert result.cosine[0][1] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("case", ["one", "dora", "shapes", "task-vector-without-base"])
def test_refusals(fleet, tmp_path, capsys, case):
    base, adapters = fleet
    out = tmp_path / "out"
    if case == "one":
        argv, phrase = [adapters[0]], "at least two"
    elif case == "dora":
        dora = build_adapter(base, tmp_path / "dora", seed=9, r=4, lora_alpha=8, target_modules=["q_proj"],
                             use_dora=True)
        argv, phrase = [adapters[0], dora], "DoRA"
    elif case == "shapes":
        wrong = tmp_path / "wrong"
        shutil.copytree(adapters[0], wrong)
        state = load_file(str(wrong / "adapter_model.safetensors"))
        key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"
        state[key] = torch.zeros(4, 16)
        save_file(state, str(wrong / "adapter_model.safetensors"), metadata={"format": "pt"})
        argv, phrase = [adapters[0], wrong], "not of one base"
    else:
        argv, phrase = [adapters[0], "--task-vectors", adapters[1]], "--base"
    rc, _, err = run_cli(capsys, "similarity", *argv, "-o", out)
    assert_one_line_error(rc, err, phrase)
    assert_nothing_at(out)
