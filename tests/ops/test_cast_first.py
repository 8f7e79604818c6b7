"""PEFT on a model loaded in fp16/bf16 (issue 15): `merge --cast-base-first` is PEFT's merge_and_unload with its default
autocast_adapter_dtype=True (adapter kept in fp32), `--no-autocast-adapter-dtype` is the same with the adapter rounded
to 16 bits. Oracle: PEFT itself, on tiny real models (Linear, Conv1D with lora_bias, Embedding, Conv2d); compare
certifies every such merge and refuses one element moved a few ulps beyond its bound."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import build_adapter, build_base, conv_adapter, peft_merged_state

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# model kind -> LoRA settings: Linear (llama), Conv1D with lora_bias (gpt2; s = 3, so rounding s·bias is not exact),
# Embedding + Linear (llama)
ADAPTERS = {
    "llama": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": ("gpt2", dict(r=4, lora_alpha=12, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                          lora_bias=True)),
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"])),
}


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + ["--quiet"])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """(base, adapter) per case: fp32 bases (PEFT casts them on load), adapters saved by PEFT in fp32."""
    root = tmp_path_factory.mktemp("castfirst")
    bases = {kind: build_base(kind, root / f"base-{kind}") for kind in ("llama", "gpt2", "resnet")}
    out = {name: (bases[kind], build_adapter(bases[kind], root / f"adapter-{name}", seed=3, **kwargs))
           for name, (kind, kwargs) in ADAPTERS.items()}
    out["conv2d"] = (bases["resnet"], conv_adapter(bases["resnet"], root / "adapter-conv2d", use_dora=False))
    return out


def _merge(base, adapter, out, precision, autocast):
    flags = ["--cast-base-first"] + ([] if autocast else ["--no-autocast-adapter-dtype"])
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", out, "--precision", precision, *flags) == 0
    return load_file(str(out / "model.safetensors"))


def _verdict(base, adapter, finetuned, out) -> dict:
    rc = run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", finetuned, "-o", out, "--no-plots")
    record = json.loads((out / "comparison_results.json").read_text())
    assert rc == (0 if record["summary"]["verdict"].startswith("EQUIVALENT") else 1)
    return record


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("case", ["llama", "gpt2", "embedding", "conv2d"])
def test_cast_first_is_peft_on_a_16_bit_model_bit_for_bit_and_certified(tmp_path, pairs, case, precision, autocast):
    base, adapter = pairs[case]
    dtype = DTYPES[precision]
    ours = _merge(base, adapter, tmp_path / "m", precision, autocast)
    want = peft_merged_state(base, adapter, dtype, autocast_adapter_dtype=autocast)
    original = load_file(str(base / "model.safetensors"))
    for name, value in ours.items():
        assert value.dtype == dtype or not value.is_floating_point(), name
        assert torch.equal(value, want[name]), f"{name}: {(value.double() - want[name].double()).abs().max()}"
    merged = [n for n in ours if not torch.equal(ours[n], original[n].to(ours[n].dtype))]
    assert merged, "the adapter changed nothing"
    if case == "gpt2":
        assert any(n.endswith("c_attn.bias") for n in merged)  # lora_bias reached the bias
    if case == "embedding":
        assert "model.embed_tokens.weight" in merged

    record = _verdict(base, adapter, tmp_path / "m", tmp_path / "c")
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
    assert {t["name"] for t in record["tensors"] if t["category"] == "shared"} == set(merged)

    # one element moved 3 ulps beyond the bound compare allows it: ratio > 1, NOT EQUIVALENT
    name = max((t for t in record["tensors"] if t["category"] == "shared"), key=lambda t: t["certificate_ratio"])["name"]
    planted = dict(ours)
    planted[name] = _beyond_bound(base, adapter, name, ours[name], original[name])
    (tmp_path / "bad").mkdir()
    for f in (tmp_path / "m").iterdir():
        if f.name != "model.safetensors" and f.is_file():
            (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    save_file(planted, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    record = _verdict(base, adapter, tmp_path / "bad", tmp_path / "c-bad")
    assert record["summary"]["verdict"] == "NOT EQUIVALENT"
    assert next(t for t in record["tensors"] if t["name"] == name)["certificate_ratio"] > 1


def _beyond_bound(base, adapter, name, merged, w):
    """`merged` with its first element moved, away from ΔW, to 3 ulps past the largest value the rounding bound
    (precision.merge_error_bound, every merge path) allows there."""
    from loratv.adapters.adapter import bind, load_adapter
    from loratv.io.checkpoint import Checkpoint
    from loratv.ops.compare import expected_delta
    from loratv.numerics.precision import merge_error_bound

    ckpt, loaded = Checkpoint(base), load_adapter(adapter)
    delta = expected_delta(loaded, bind(loaded, ckpt), ckpt, name)
    d = sum(p.rows(0, 1).reshape(-1)[0] for p in delta.parts) if delta.parts else torch.tensor(0.0, dtype=torch.float64)
    g = sum(p.abs_rows(0, 1).reshape(-1)[0] for p in delta.parts) if delta.parts else torch.tensor(0.0, dtype=torch.float64)
    if delta.bias is not None:
        d, g = d + delta.bias.reshape(-1)[0], g + delta.bias.abs().reshape(-1)[0]
    w0 = w.reshape(-1)[:1].double()
    target = w0 + d
    m = merged.reshape(-1)[:1].clone()
    toward = torch.full_like(m, float("inf") if float(m.double() - target) >= 0 else float("-inf"))
    past = -1
    while past < 3:
        m = torch.nextafter(m, toward)
        bound = merge_error_bound(w0, m.double(), g.reshape(1), additions=delta.additions, k=delta.k,
                                  base_dtype=w.dtype, out_dtype=m.dtype)
        if past >= 0 or float((m.double() - target).abs()) > float(bound):
            past += 1
    out = merged.clone()
    out.view(-1)[0] = m[0]
    return out


def test_no_autocast_flag_needs_cast_base_first(tmp_path, pairs, capsys):
    base, adapter = pairs["llama"]
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m", "--precision", "fp16",
                   "--no-autocast-adapter-dtype") == 2
    assert "--no-autocast-adapter-dtype only applies with --cast-base-first" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_the_two_paths_differ_and_bf16_base_autocast_is_the_direct_merge(tmp_path, pairs):
    """On a fp32 base the two PEFT paths are different merges; on a base already stored in d, PEFT's default merge of
    a Linear LoRA is loratv's direct one (fl_d(fl_32(W + ΔW)) both)."""
    base, adapter = pairs["llama"]
    auto = _merge(base, adapter, tmp_path / "a", "bf16", True)
    cast_all = _merge(base, adapter, tmp_path / "b", "bf16", False)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(auto[name], cast_all[name])
    bf16_base = build_base("llama", tmp_path / "base16", dtype=torch.bfloat16)
    auto = _merge(bf16_base, adapter, tmp_path / "c", "bf16", True)
    assert run_cli("merge", "--base", bf16_base, "--adapter", adapter, "-o", tmp_path / "d") == 0
    direct = load_file(str(tmp_path / "d" / "model.safetensors"))
    for n, v in direct.items():
        assert torch.equal(v, auto[n]), n


def test_precision_paths_are_the_two_peft_merges(tmp_path, pairs, capsys):
    """`precision --paths fp16-cast-first fp16-cast-all` merges as PEFT does with and without autocast_adapter_dtype,
    and certifies both; the default paths leave cast-all out."""
    from loratv.ops.precision_study import DEFAULT_PATHS, PATHS

    assert set(PATHS) - set(DEFAULT_PATHS) == {"fp16-cast-all", "bf16-cast-all"}
    base, adapter = pairs["gpt2"]
    assert run_cli("precision", "--base", base, "--adapter", adapter, "-o", tmp_path / "p", "--no-plots",
                   "--keep-merged", "--paths", "fp16-cast-first", "fp16-cast-all") == 0
    study = json.loads((tmp_path / "p" / "precision_results.json").read_text())
    assert [p["verdict"] for p in study["paths"]] == ["EQUIVALENT (certified)"] * 2
    for name, autocast in (("fp16-cast-first", True), ("fp16-cast-all", False)):
        assert "autocast_adapter_dtype=" + ("True" if autocast else "False") in PATHS[name][2]
        ours = load_file(str(tmp_path / "p" / name / "merged_model" / "model.safetensors"))
        want = peft_merged_state(base, adapter, torch.float16, autocast_adapter_dtype=autocast)
        assert all(torch.equal(v, want[n]) for n, v in ours.items()), name
