"""HRA merged through the compact WY form of its reflections (adapters/kinds/hra.py), against oracles computed
independently in float64 NumPy: the dense product of the Householder matrices (or I − 2QQᵀ from NumPy's QR for
PEFT's apply_GS), applied to the base weight. loratv's merge is that exact value rounded once (fp32: within half an
ulp; bf16: the float64 value rounded to fp32, then to bf16), on a tiny Llama, a tiny StarCoder2 (biases: unchanged)
and a Conv2d; `--peft-arithmetic` gives PEFT's merge_and_unload bit for bit; compare accepts both merges."""

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helpers_io import run_cli
from loratv.adapters.kinds.hra import householder_wy
from tiny_models import build_base, load_model, peft_merged_state

peft = pytest.importorskip("peft")


def _reflections(u: np.ndarray, apply_gs: bool) -> np.ndarray:
    """The n×n product PEFT's HRA multiplies W by, densely in float64."""
    n, r = u.shape
    if apply_gs:
        q, _ = np.linalg.qr(u)  # same span as Gram–Schmidt's V, so the same projector VVᵀ
        return np.eye(n) - 2 * q @ q.T
    product = np.eye(n)
    for i in range(r):
        unit = u[:, i] / np.linalg.norm(u[:, i])
        product = product @ (np.eye(n) - 2 * np.outer(unit, unit))
    return product


@pytest.mark.parametrize("apply_gs", [False, True], ids=["householder", "gram-schmidt"])
def test_the_wy_form_is_the_product_of_the_reflections(apply_gs):
    gen = np.random.default_rng(7)
    u = gen.standard_normal((24, 6))
    unit, t = householder_wy(torch.from_numpy(u), apply_gs)
    got = np.eye(24) - unit.numpy() @ t.numpy() @ unit.numpy().T
    np.testing.assert_allclose(got, _reflections(u, apply_gs), rtol=0, atol=1e-13)
    np.testing.assert_allclose(got @ got.T, np.eye(24), rtol=0, atol=1e-13)  # orthogonal, an exact fact


def _adapter(base, folder, dtype, apply_gs: bool, targets=("q_proj", "v_proj"), model=None):
    from peft import HRAConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = HRAConfig(r=4, target_modules=list(targets), apply_GS=apply_gs)
        peft_model = get_peft_model(model if model is not None else load_model(base, dtype), config)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype))
        peft_model.save_pretrained(folder)
    return folder


def _exact(base_state: dict, adapter_state: dict, name: str, apply_gs: bool) -> tuple[np.ndarray, np.ndarray]:
    """(W·P, |W|·|P|) in float64: the exact merge and the magnitude its float64 evaluations round against."""
    module = name[: -len(".weight")]
    w = base_state[name].double().numpy()
    u = adapter_state[f"base_model.model.{module}.hra_u"].double().numpy()
    product, flat = _reflections(u, apply_gs), w.reshape(w.shape[0], -1)
    return (flat @ product).reshape(w.shape), (np.abs(flat) @ np.abs(product)).reshape(w.shape)


def _check_rounded_once(got: torch.Tensor, exact: tuple[np.ndarray, np.ndarray]) -> None:
    """fp32: |got − exact| ≤ ½ulp(got) plus float64 noise; bf16: the same through fp32 first (two roundings)."""
    value, magnitude = exact
    err = np.abs(got.double().numpy() - value)
    ulp32 = np.spacing(np.abs(got.float().numpy())).astype(np.float64)
    noise = 1e-12 * magnitude  # float64 evaluation, far below an fp32 ulp unless the element cancels
    if got.dtype == torch.float32:
        limit = 0.5 * ulp32 + noise
    else:
        ulp16 = ulp32 * 2.0 ** 16  # bf16 keeps 8 of fp32's 24 significand bits
        limit = 0.5 * ulp16 + 0.5 * ulp32 + noise
    assert (err <= limit).all(), float((err / limit).max())


def _write(folder, state: dict, names) -> None:
    folder.mkdir()
    save_file({k: state[k].contiguous().clone() for k in names}, str(folder / "model.safetensors"))


@pytest.mark.parametrize("apply_gs", [False, True], ids=["householder", "gram-schmidt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "starcoder2"])
def test_merge_is_the_exact_product_rounded_once_and_compare_accepts_both_merges(arch, dtype, apply_gs, tmp_path,
                                                                                  capsys):
    base = build_base(arch, tmp_path / "base", dtype=dtype)
    adapter = _adapter(base, tmp_path / "adapter", dtype, apply_gs)
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged")
    assert rc == 0, err
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    original = load_file(str(base / "model.safetensors"))
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    changed = sorted(n for n in got if not torch.equal(got[n], original[n]))
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed), changed
    for name in changed:
        assert got[name].dtype == dtype
        _check_rounded_once(got[name], _exact(original, stored, name, apply_gs))

    peft_state = peft_merged_state(base, adapter, dtype)
    for label, state in (("peft", peft_state), ("loratv", got)):
        _write(tmp_path / label, state, original)
        rc, _, err = run_cli(capsys, "compare", "--base", base, "--adapter", adapter, "--finetuned",
                             tmp_path / label, "-o", tmp_path / f"cmp-{label}")
        assert rc == 0, (label, err)
        summary = json.loads((tmp_path / f"cmp-{label}" / "comparison_results.json").read_text())["summary"]
        assert summary["verdict"] == "EQUIVALENT within tolerance", (label, summary)

    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "merged-peft",
                         "--peft-arithmetic")
    assert rc == 0, err
    bits = load_file(str(tmp_path / "merged-peft" / "model.safetensors"))
    assert all(torch.equal(v, peft_state[n]) for n, v in bits.items())


def test_a_conv2d_merge_and_fp64_compute(tmp_path, capsys):
    """PEFT's HRAConv2d views the kernel as (out, in·k·k); with --compute-dtype fp64 the float64 value is rounded
    once, straight to the output dtype."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv2d", nn.Conv2d(8, 16, 3))
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(base / "model.safetensors"))
    adapter = _adapter(base, tmp_path / "adapter", torch.float32, False, targets=("conv2d",), model=model)
    original = load_file(str(base / "model.safetensors"))
    stored = load_file(str(adapter / "adapter_model.safetensors"))
    exact = _exact(original, stored, "conv2d.weight", False)
    for compute in ("fp32", "fp64"):
        rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", adapter, "-o", tmp_path / compute,
                             "--compute-dtype", compute, "--precision", "bf16")
        assert rc == 0, err
        got = load_file(str(tmp_path / compute / "model.safetensors"))
        assert torch.equal(got["conv2d.bias"], original["conv2d.bias"].bfloat16())
        if compute == "fp64":  # one rounding, float64 → bf16: the nearest bf16 to the exact value
            want = torch.from_numpy(exact[0]).to(torch.bfloat16)
            assert torch.equal(got["conv2d.weight"], want)
        else:
            _check_rounded_once(got["conv2d.weight"], exact)
