"""The public Python API (`import loratv`), tried as a new user would.

Oracles: PEFT's merge_and_unload (tests/tiny_models.py builds tiny transformers models and PEFT adapters), the merged
files on disk read with safetensors, and float64 torch for task vectors; never the API's own output alone.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file

import loratv
from loratv.errors import cli_message
from tiny_models import build_adapter, build_base, load_model, peft_merged_state

pytest.importorskip("peft")

CERTIFIED = "EQUIVALENT (certified)"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _merged_state(folder) -> dict:
    state = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, f)))
    return state


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_llama")
    base = build_base("llama", root / "base")
    adapter = build_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, adapter


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_gpt2")
    base = build_base("gpt2", root / "base")
    adapter = build_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                            fan_in_fan_out=True)
    return base, adapter


# ---------------------------------------------------------------- a fresh interpreter, the example


def test_fresh_interpreter_on_the_example(example_dir, tmp_path):
    script = textwrap.dedent(f"""
        import sys
        import loratv
        from safetensors.torch import load_file
        import torch
        base, adapter = {str(example_dir / "base")!r}, {str(example_dir / "adapter")!r}
        r = loratv.merge(base, adapter, "merged", precision="fp32")
        assert isinstance(r, loratv.MergeResult) and len(r.tensors_changed) == 120, r
        c = loratv.compare(base, adapter, finetuned="merged")
        assert c.verdict == "EQUIVALENT (certified)", c.verdict
        files = load_file("merged/model.safetensors")
        n = 0
        for name, t in loratv.iter_merged(base, adapter, precision="fp32"):
            assert torch.equal(t, files[name]) and t.dtype == files[name].dtype, name
            n += 1
        assert n == len(files)
        print("ok", sorted(loratv.__all__) == sorted(set(loratv.__all__)), c.counts["shared"])
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "True", "120"]


def test_public_names_are_documented():
    for name in loratv.__all__:
        assert hasattr(loratv, name), name
    for name in ("merge", "extract", "compare", "validate", "precision_study", "analyze", "to_lora", "convert",
                 "inspect", "verify", "iter_merged", "iter_task_vector", "load_adapter"):
        doc = getattr(loratv, name).__doc__
        assert doc and "Args:" in doc and "Returns:" in doc and "Raises:" in doc, name


# ---------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_merge_and_streams_match_peft(case, request, tmp_path):
    base, adapter = request.getfixturevalue(case)
    oracle = peft_merged_state(base, adapter)
    result = loratv.merge(base, adapter, tmp_path / "merged")
    assert isinstance(result, loratv.MergeResult) and result.output == tmp_path / "merged"
    files = _merged_state(tmp_path / "merged")
    for name, value in files.items():
        if name in oracle:
            assert _same_bits(value, oracle[name]), name
    changed = {n for n in files if not _same_bits(files[n], load_file(base / "model.safetensors")[n])}
    assert changed == set(result.tensors_changed)
    # the stream equals the files, tensor by tensor and in the same set
    streamed = 0
    for name, value in loratv.iter_merged(base, adapter):
        assert _same_bits(value, files[name]), name
        streamed += 1
    assert streamed == len(files)
    # an already-loaded state dict as the base (with its config, for GPT-2's Conv1D layout)
    state = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    for name, value in loratv.iter_merged(state, adapter, base_config=config):
        assert _same_bits(value, files[name]), name
    loratv.merge(state, adapter, tmp_path / "from_state", base_config=config)
    from_state = _merged_state(tmp_path / "from_state")
    assert from_state.keys() == files.keys() and all(_same_bits(from_state[n], files[n]) for n in files)
    # the comparison of the adapter with its own merge is certified, from a path and from a state dict
    assert loratv.compare(base, adapter, finetuned=tmp_path / "merged").verdict == CERTIFIED
    assert loratv.compare(state, adapter, finetuned=tmp_path / "merged").verdict == CERTIFIED


def test_adapter_deltas_match_peft(llama):
    base, adapter = llama
    oracle = peft_merged_state(base, adapter)
    base_state = load_file(base / "model.safetensors")
    bound = loratv.load_adapter(adapter).bind(base)
    assert bound.targeted and all("q_proj" in n or "v_proj" in n for n in bound.targeted)
    for name in bound.targeted:
        delta = bound.delta(name)
        assert delta is not None and delta.dtype == torch.float32
        assert _same_bits((base_state[name] + delta), oracle[name]), name
        assert _same_bits(bound.merged(name), oracle[name]), name
    assert bound.delta("model.norm.weight") is None
    with pytest.raises(loratv.LoratvError):
        bound.delta("no.such.tensor")


def _tuner_adapter(base, folder, config):
    """A PEFT adapter of a non-LoRA tuner on `base`, every trainable parameter given a seeded random value."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32), config)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen) + (1.0 if p.dim() == 1 else 0.0))
        model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tuner", ["LOHA", "LOKR", "ADALORA", "VERA"])
def test_additive_tuner_deltas_match_peft(llama, tuner, tmp_path):
    """W + delta(name) is PEFT's merge bit for bit for the additive tuners (the kind's own ΔW)."""
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, VeraConfig

    base, _ = llama
    targets = ["q_proj", "v_proj"]
    config = {"LOHA": LoHaConfig(r=4, alpha=8, target_modules=targets),
              "LOKR": LoKrConfig(r=4, alpha=8, target_modules=targets),
              "ADALORA": AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=targets),
              "VERA": VeraConfig(r=8, target_modules=targets)}[tuner]
    adapter = _tuner_adapter(base, tmp_path / "adapter", config)
    oracle = peft_merged_state(base, adapter)
    base_state = load_file(base / "model.safetensors")
    bound = loratv.load_adapter(adapter).bind(base)
    assert len(bound.targeted) == 4
    for name in bound.targeted:
        delta = bound.delta(name)
        assert delta is not None and not torch.equal(delta, torch.zeros_like(delta))
        assert _same_bits(base_state[name] + delta, oracle[name]), name


def test_a_multiplicative_tuner_has_no_delta(llama, tmp_path):
    from peft import IA3Config

    base, _ = llama
    adapter = _tuner_adapter(base, tmp_path / "adapter", IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    bound = loratv.load_adapter(adapter).bind(base)
    name = bound.targeted[0]
    with pytest.raises(loratv.UnsupportedAdapterError, match="merged value"):
        bound.delta(name)
    assert _same_bits(bound.merged(name), peft_merged_state(base, adapter)[name])


# ---------------------------------------------------------------- task vectors


def test_iter_task_vector_is_the_float64_difference_rounded_once(example_dir, tmp_path):
    base, adapter = example_dir / "base", example_dir / "adapter"
    loratv.merge(base, adapter, tmp_path / "fp16", precision="fp16")
    b = load_file(base / "model.safetensors")
    f = _merged_state(tmp_path / "fp16")
    norms = {}
    for name, t in loratv.iter_task_vector(base, tmp_path / "fp16"):
        want = (f[name].double() - b[name].double()).float()
        assert _same_bits(t, want), name
        norms[name] = float(torch.linalg.vector_norm(t.double()))
    assert norms.keys() == b.keys()
    # the extracted file stores exactly what the stream yields for the changed tensors
    result = loratv.extract(base, tmp_path / "fp16", tmp_path / "tv")
    assert isinstance(result, loratv.TaskVectorResult)
    stored = load_file(result.file)
    sparse = dict(loratv.iter_task_vector(base, tmp_path / "fp16", dense=False))
    assert stored.keys() == sparse.keys() and all(_same_bits(stored[n], sparse[n]) for n in stored)
    assert result.to_dict() == json.loads((tmp_path / "tv" / "task_vector.json").read_text())
    # a state dict on either side gives the same values
    for name, t in loratv.iter_task_vector(b, f, dense=False):
        assert _same_bits(t, sparse[name]), name


# ---------------------------------------------------------------- compare: results, outputs, threads


def test_compare_without_output_writes_nothing(example_dir, tmp_path, monkeypatch):
    base, adapter = example_dir / "base", example_dir / "adapter"
    loratv.merge(base, adapter, tmp_path / "merged", precision="fp32")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    torch.set_num_threads(3)
    try:
        c = loratv.compare(base, adapter, finetuned=tmp_path / "merged")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    assert os.listdir(work) == []
    assert c.output is None and c.verdict == CERTIFIED and c.certified and c.equivalent
    assert c.counts["shared"] == 120 and sum(c.counts.values()) >= 483
    assert len(c.tensors) == 483 and all(isinstance(t, loratv.TensorComparison) for t in c.tensors)
    worst = c.worst(3)
    assert len(worst) == 3 and worst[0].certificate_ratio >= worst[-1].certificate_ratio
    # with an output, the same record, written as the CLI writes it
    written = loratv.compare(base, adapter, finetuned=tmp_path / "merged", output=tmp_path / "cmp", plots=False)
    on_disk = json.loads((tmp_path / "cmp" / "comparison_results.json").read_text())
    assert written.to_dict()["summary"] == on_disk["summary"]
    assert written.to_dict()["tensors"] == on_disk["tensors"]
    assert (tmp_path / "cmp" / "lora_deltas.safetensors").is_file()
    # results are frozen
    with pytest.raises(AttributeError):
        c.output = tmp_path  # type: ignore[misc]


# ---------------------------------------------------------------- errors name parameters, the CLI names flags


def test_errors_name_parameters_not_flags(example_dir, tmp_path, capsys):
    base, adapter = example_dir / "base", example_dir / "adapter"
    with pytest.raises(loratv.BadInputError) as exc:
        loratv.merge(base, adapter, tmp_path / "m", precision="fp8")
    assert str(exc.value).startswith("precision='fp8': choose one of") and "--" not in str(exc.value)
    assert cli_message(exc.value).startswith("--precision fp8: choose one of")
    with pytest.raises(loratv.BadInputError, match=r"tolerance=-1\.0: must be"):
        loratv.compare(base, adapter, finetuned=base, tolerance=-1.0)
    with pytest.raises(loratv.BadInputError, match="exactly one of task_vector and finetuned"):
        loratv.compare(base, adapter)
    with pytest.raises(loratv.BadInputError, match="storage_dtype='fp16'"):
        loratv.extract(base, base, tmp_path / "tv", storage_dtype="fp16")
    with pytest.raises(loratv.BadInputError, match="device='tpu'"):
        loratv.merge(base, adapter, tmp_path / "m", device="tpu")
    (tmp_path / "exists").mkdir()
    with pytest.raises(loratv.OutputExistsError, match=r"pass force=True to replace it"):
        loratv.merge(base, adapter, tmp_path / "exists")
    assert issubclass(loratv.UnsupportedAdapterError, loratv.LoratvError)
    # the command line still prints its flags
    from loratv.cli.app import main

    assert main(["compare", "--base", str(base), "--adapter", str(adapter), "--finetuned", str(base),
                 "--tolerance", "-1", "-o", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == "loratv: error: --tolerance -1.0: must be a finite number ≥ 0.\n"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "exists")]) == 2
    assert capsys.readouterr().err.endswith("already exists; pass --force to replace it.\n")


# ---------------------------------------------------------------- no side effects, typing


# importing and calling loratv without process-wide effects (backend, pyplot, threads, signals, cwd): see
# tests/test_package_layout.py


USER_SCRIPT = """
from pathlib import Path

import torch

import loratv


def run(base: Path, adapter: Path, out: Path) -> str:
    result: loratv.MergeResult = loratv.merge(base, adapter, out, precision="fp16", force=True)
    changed: tuple[str, ...] = result.tensors_changed
    comparison = loratv.compare(base, adapter, finetuned=out)
    worst: tuple[loratv.TensorComparison, ...] = comparison.worst(3)
    counts: dict[str, int] = comparison.counts
    norms: dict[str, float] = {}
    for name, t in loratv.iter_task_vector(base, out):
        norms[name] = float(torch.linalg.vector_norm(t.double()))
    state: dict[str, torch.Tensor] = dict(loratv.iter_merged(base, adapter))
    bound = loratv.load_adapter(adapter).bind(state)
    delta: torch.Tensor | None = bound.delta(bound.targeted[0])
    record: dict[str, object] = comparison.to_dict()
    try:
        loratv.extract(base, out, out / "tv", storage_dtype="fp32")
    except loratv.OutputExistsError as exc:
        print(str(exc))
    return f"{comparison.verdict} {len(changed)} {len(worst)} {counts} {delta is None} {len(record)}"
"""


def test_mypy_strict_accepts_a_user_script(tmp_path):
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    (tmp_path / "wrong.py").write_text("import loratv\n\nverdict: int = loratv.compare('b', 'a', finetuned='f').verdict\n")
    cache = tmp_path / ".mypy_cache"
    ok = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "user.py"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "wrong.py"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1 and "Incompatible types in assignment" in wrong.stdout, wrong.stdout
    shutil.rmtree(cache, ignore_errors=True)
