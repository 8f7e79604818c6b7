"""`loratv to-lora`: task vectors written back as PEFT adapters. Oracles: PEFT's merge_and_unload (it loads what
loratv wrote, and lands where the fidelity report says), float64 NumPy SVD (Eckart–Young: no rank-k matrix comes
closer than the tail of the spectrum), and a genuinely trained full fine-tune."""

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_io import example, loratv_cache  # noqa: F401 - fixtures are found by name
from tiny_models import VOCAB, build_base, load_model

MODULES = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + ["--quiet"])


def fidelity(folder) -> dict:
    return json.loads((folder / "to_lora_fidelity.json").read_text())


def peft_merge(base, adapter) -> dict:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(load_model(base, torch.float32), adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def rounding_norm(x: torch.Tensor) -> float:
    """‖one ulp per element‖_F: what one more fp32 rounding (PEFT's merge) can move a tensor by."""
    return float(np.linalg.norm(np.spacing(np.abs(x.numpy())).astype(np.float64)))


@pytest.fixture(scope="module", params=["starcoder2", "gpt2"])
def full_finetune(request, tmp_path_factory):
    """A real full fine-tune: every parameter trained by AdamW on a causal-LM loss for a few steps (StarCoder2: biases,
    LayerNorm, tied embeddings; GPT-2: Conv1D stored (in, out), position embeddings)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"ft_{kind}")
    base = build_base(kind, root / "base", seed=4)
    model = load_model(base, torch.float32).train()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(7))
    for _ in range(4):
        model(input_ids=data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(root / "finetuned")
    return {"kind": kind, "root": root, "base": base, "finetuned": root / "finetuned"}


def test_full_finetune_round_trips_through_peft_with_the_reported_error(full_finetune):
    base, finetuned, root = full_finetune["base"], full_finetune["finetuned"], full_finetune["root"]
    out = root / "adapter_r4"
    assert run_cli("to-lora", "--base", base, "--finetuned", finetuned, "-o", out, "--rank", "4") == 0
    record = fidelity(out)
    w = load_file(str(base / "model.safetensors"))
    f = load_file(str(finetuned / "model.safetensors"))
    changed = {n for n in w if not torch.equal(w[n], f[n])}
    # nothing silently dropped: every changed tensor is accounted for, and nothing else
    assert {t["name"] for t in record["tensors"]} == changed
    assert record["summary"]["excluded_tensors"] == 0
    merged = peft_merge(base, out)
    measured_sq, rounding_sq = 0.0, 0.0
    for t in record["tensors"]:
        name = t["name"]
        got = merged[name].double()
        measured = float(torch.linalg.vector_norm((got - f[name].double()).reshape(-1)))
        rounding = rounding_norm(f[name])
        assert abs(measured - t["error_norm"]) <= rounding + 1e-12, name  # reported = measured, up to PEFT's rounding
        if t["handling"] != "lora":
            assert torch.equal(merged[name], f[name]), name  # full values are exact
        measured_sq += measured**2
        rounding_sq += rounding**2
    assert abs(np.sqrt(measured_sq) - record["summary"]["error_norm"]) <= np.sqrt(rounding_sq) + 1e-12
    handlings = {t["handling"] for t in record["tensors"]}
    assert "lora" in handlings and any(h.startswith("full value") for h in handlings)
    # untouched tensors stay bit-identical after PEFT's merge
    for name in set(w) - changed:
        if name in merged:
            assert torch.equal(merged[name], w[name]), name


def lora_rows_with_singular_values(full_finetune, folder: str, *criterion):
    """Run to-lora with this criterion on the full fine-tune; yield each LoRA'd tensor's fidelity row with NumPy's
    float64 singular values of its task vector."""
    base, finetuned = full_finetune["base"], full_finetune["finetuned"]
    out = full_finetune["root"] / folder
    assert run_cli("to-lora", "--base", base, "--finetuned", finetuned, "-o", out, *criterion) == 0
    w = load_file(str(base / "model.safetensors"))
    f = load_file(str(finetuned / "model.safetensors"))
    for t in (t for t in fidelity(out)["tensors"] if t["handling"] == "lora"):
        diff = f[t["name"]].numpy().astype(np.float64) - w[t["name"]].numpy().astype(np.float64)
        yield t, np.linalg.svd(diff, compute_uv=False)


def test_rank_criterion_is_eckart_young_optimal(full_finetune):
    """For each LoRA'd tensor the error at rank k equals the tail √(Σ_{i>k} σ_i²) of NumPy's float64 SVD of T:
    no rank-k matrix can do better, and loratv's factors achieve it (up to their fp32 rounding)."""
    for t, s in lora_rows_with_singular_values(full_finetune, "adapter_r3", "--rank", "3"):
        tail = float(np.sqrt(np.sum(s[3:] ** 2)))
        assert t["rank"] == min(3, len(s))
        assert tail * (1 - 1e-9) <= t["error_norm"] <= tail * (1 + 1e-5) + 1e-7 * s[0], t["name"]


def test_energy_criterion_picks_the_smallest_rank(full_finetune):
    for t, s in lora_rows_with_singular_values(full_finetune, "adapter_e90", "--energy", "0.9"):
        s2 = s**2
        kept = np.cumsum(s2) / s2.sum()
        assert t["rank"] == int(np.argmax(kept >= 0.9)) + 1, t["name"]
        assert t["energy_retained"] >= 0.9 - 1e-6


def test_lora_merged_model_recovers_exactly_rank_r_at_the_rounding_level(example, tmp_path):
    """On a LoRA-merged model (r = 8), a --max-error just above what fp32 rounding can explain gives rank 8 for every
    module: rank 7 would leave σ_8, far above the noise; rank 8 leaves only rounding."""
    merged = tmp_path / "merged"
    assert run_cli("merge", "--base", example["base"], "--adapter", example["adapter"], "-o", merged) == 0
    w = load_file(str(example["base"] / "model.safetensors"))
    f = load_file(str(merged / "model.safetensors"))
    level = 0.0
    for name in w:
        if not torch.equal(w[name], f[name]):
            t = f[name].double() - w[name].double()
            level = max(level, 2 * rounding_norm(f[name]) / float(torch.linalg.matrix_norm(t)))
    out = tmp_path / "recovered"
    assert run_cli("to-lora", "--base", example["base"], "--finetuned", merged, "-o", out,
                   "--max-error", f"{level:.3e}") == 0
    record = fidelity(out)
    assert record["summary"]["lora_modules"] == 120
    assert {t["rank"] for t in record["tensors"]} == {8}
    assert all(t["relative_error"] <= level for t in record["tensors"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 8 and config["rank_pattern"] == {}


def test_stored_task_vector_and_include_exclude(example, tmp_path):
    merged, tv = tmp_path / "merged", tmp_path / "tv"
    assert run_cli("merge", "--base", example["base"], "--adapter", example["adapter"], "-o", merged) == 0
    assert run_cli("extract", "--base", example["base"], "--finetuned", merged, "-o", tv) == 0
    out = tmp_path / "only_q"
    assert run_cli("to-lora", "--task-vector", tv, "-o", out, "--rank", "8", "--include", r"q_proj",
                   "--exclude", r"layers\.0\.") == 0
    record = fidelity(out)
    rows = {t["name"]: t for t in record["tensors"]}
    assert len(rows) == 120  # every changed tensor is listed, written or not
    lora = [n for n, t in rows.items() if t["handling"] == "lora"]
    assert len(lora) == 29 and all("q_proj" in n and "layers.0." not in n for n in lora)
    excluded = [t for t in rows.values() if t["handling"] == "excluded"]
    assert len(excluded) == 91 and all(t["relative_error"] == 1.0 for t in excluded)
    tvs = load_file(str(tv / "task_vector.safetensors"))
    total = np.sqrt(sum(float(torch.linalg.matrix_norm(tvs[n].double())) ** 2 for n in rows))
    lost = np.sqrt(sum(float(torch.linalg.matrix_norm(tvs[t["name"]].double())) ** 2 for t in excluded))
    assert record["summary"]["relative_error"] == pytest.approx(lost / total, rel=1e-6)
    stored = load_file(str(out / "adapter_model.safetensors"))
    assert len(stored) == 2 * 29


def test_full_values_from_a_stored_task_vector_need_the_base(full_finetune, tmp_path):
    base, finetuned = full_finetune["base"], full_finetune["finetuned"]
    tv = tmp_path / "tv"
    assert run_cli("extract", "--base", base, "--finetuned", finetuned, "-o", tv) == 0
    assert run_cli("to-lora", "--task-vector", tv, "-o", tmp_path / "a", "--rank", "2") == 2
    assert not (tmp_path / "a").exists()
    assert run_cli("to-lora", "--task-vector", tv, "--base", base, "-o", tmp_path / "b", "--rank", "2") == 0
    assert run_cli("to-lora", "--finetuned", finetuned, "--base", base, "-o", tmp_path / "c", "--rank", "2") == 0
    same = [fidelity(tmp_path / x)["summary"]["relative_error"] for x in ("b", "c")]
    assert same[0] == pytest.approx(same[1], rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--rank", "4", "--energy", "0.9"], "not allowed with"),
    (["--energy", "1.5"], "must lie in (0, 1]"),
    (["--rank", "4", "--include", "("], "not a valid regular expression"),
])
def test_bad_arguments_exit_2_and_write_nothing(example, tmp_path, capsys, argv, message):
    from loratv.cli.app import main

    out = tmp_path / "a"
    with pytest.raises(SystemExit) if "not allowed" in message else _nothing():
        rc = main(["to-lora", "--base", str(example["base"]), "--finetuned", str(example["base"]), "-o", str(out)] + argv)
        assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_module_saved_whole_from_a_sparse_task_vector_names_the_missing_base(tmp_path, capsys):
    """Only a LayerNorm's weight changed: the module is saved whole, and its unchanged bias (absent from the stored
    task vector) can only come from the base, which the sentence asks for by its flag."""
    base = build_base("starcoder2", tmp_path / "base")
    state = load_file(str(base / "model.safetensors"))
    norm = "model.layers.0.input_layernorm.weight"
    state[norm] = state[norm] + 0.25
    finetuned = tmp_path / "finetuned"
    finetuned.mkdir()
    save_file(state, str(finetuned / "model.safetensors"), metadata={"format": "pt"})
    (finetuned / "config.json").write_text((base / "config.json").read_text())
    assert run_cli("extract", "--base", base, "--finetuned", finetuned, "-o", tmp_path / "tv") == 0
    assert run_cli("to-lora", "--task-vector", tmp_path / "tv", "-o", tmp_path / "a", "--rank", "2") == 2
    err = capsys.readouterr().err
    assert "model.layers.0.input_layernorm.bias" in err and "--base" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()
    assert run_cli("to-lora", "--task-vector", tmp_path / "tv", "--base", base, "-o", tmp_path / "b", "--rank", "2") == 0
    stored = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert torch.equal(stored["base_model.model.model.layers.0.input_layernorm.weight"], state[norm])


def test_unchanged_model_is_refused(example, tmp_path, capsys):
    out = tmp_path / "a"
    assert run_cli("to-lora", "--base", example["base"], "--finetuned", example["base"], "-o", out) == 2
    assert "no changed tensor" in capsys.readouterr().err and not out.exists()


def test_planted_low_rank_update_in_a_float16_model(tmp_path):
    """A rank-2 update to an fp16 Llama: --max-error finds rank 2 even though the fine-tuned weights were rounded to fp16,
    and PEFT's merge (on an fp32 load) reproduces the weights within the reported error plus fp16 rounding."""
    base = build_base("llama", tmp_path / "base", dtype=torch.float16)
    state = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    name = "model.layers.1.self_attn.q_proj.weight"
    w = state[name].double()
    update = 0.2 * torch.randn(w.shape[0], 2, generator=gen, dtype=torch.float64) @ torch.randn(2, w.shape[1], generator=gen, dtype=torch.float64)
    finetuned = dict(state)
    finetuned[name] = (w + update).half()
    folder = tmp_path / "ft"
    folder.mkdir()
    save_file(finetuned, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text((base / "config.json").read_text())
    out = tmp_path / "a"
    assert run_cli("to-lora", "--base", base, "--finetuned", folder, "-o", out, "--max-error", "0.01") == 0
    row = fidelity(out)["tensors"][0]
    assert row["name"] == name and row["rank"] == 2


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cast_artifacts_of_an_fp16_merge_are_found_and_can_be_skipped(example, tmp_path):  # noqa: F811
    """An fp16 merge changes all 483 tensors; 363 of them are only W rounded to fp16. to-lora names exactly those
    (oracle: NumPy's float16 cast of the base), and --skip-cast-artifacts leaves them out, counted in the error."""
    merged = tmp_path / "m16"
    assert run_cli("merge", "--base", example["base"], "--adapter", example["adapter"], "-o", merged,
                   "--precision", "fp16") == 0
    out = tmp_path / "a"
    assert run_cli("to-lora", "--base", example["base"], "--finetuned", merged, "-o", out, "--max-error", "0.01",
                   "--skip-cast-artifacts") == 0
    record = fidelity(out)
    w = load_file(str(example["base"] / "model.safetensors"))
    f = load_file(str(merged / "model.safetensors"))
    casts = {n for n in w if np.array_equal(f[n].numpy(), w[n].numpy().astype(np.float16))}
    skipped = {t["name"] for t in record["tensors"] if t["handling"] == "cast artifact (skipped)"}
    assert len(casts) == 363 and skipped == casts
    assert record["summary"]["lora_modules"] == 120 and record["summary"]["skipped_cast_artifacts"] == 363
    assert {t["rank"] for t in record["tensors"] if t["handling"] == "lora"} == {8}
    assert any("cast artifacts" in n for n in record["notes"])
    stored = load_file(str(out / "adapter_model.safetensors"))
    assert len(stored) == 240  # only the 120 LoRA modules' factors
