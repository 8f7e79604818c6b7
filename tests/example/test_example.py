"""The embedded example (`loratv example`): what it is, and the numbers the merge/extract round trip must give.

Oracles: transformers and PEFT loading and merging the example themselves; float64 arithmetic on the adapter
file; the safetensors headers read with safetensors.safe_open.
"""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import header_shapes, loratv, ulp_of

N_TENSORS = 483
N_TARGETED = 120  # q/k/v/o weights in 30 layers
RANK, ALPHA = 8, 16
SCALE = ALPHA / RANK
GAMMA = (RANK + 2) * 2.0**-24  # fp32 error of a length-r dot product, times s, plus one rounding


def _is_target(name: str) -> bool:
    return name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))


@pytest.fixture(scope="module")
def ex(example_dir):
    base_file = example_dir / "base" / "model.safetensors"
    adapter_file = example_dir / "adapter" / "adapter_model.safetensors"
    return {
        "dir": example_dir,
        "base": example_dir / "base",
        "adapter": example_dir / "adapter",
        "base_tensors": load_file(base_file),
        "adapter_tensors": load_file(adapter_file),
        "shapes": header_shapes(base_file),
    }


def _delta64(ex, name):
    """ΔW = (B @ A) · s from the adapter file, in float64."""
    module = "base_model.model." + name[: -len(".weight")]
    a = ex["adapter_tensors"][module + ".lora_A.weight"].double()
    b = ex["adapter_tensors"][module + ".lora_B.weight"].double()
    return (b @ a) * SCALE, (b.abs() @ a.abs()) * SCALE


@pytest.fixture(scope="module")
def round_trip(ex, tmp_path_factory):
    """Merge in fp32 and in fp16, and extract each against the base (all through the CLI, in process)."""
    root = tmp_path_factory.mktemp("example_round_trip")
    out = {}
    for precision in ("fp32", "fp16"):
        merged, tv = root / f"merged-{precision}", root / f"tv-{precision}"
        loratv("merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", merged, "--precision", precision)
        loratv("extract", "--base", ex["base"], "--finetuned", merged, "-o", tv)
        out[precision] = {
            "merged": load_file(merged / "model.safetensors"),
            "tv": load_file(tv / "task_vector.safetensors"),
            "tv_file": tv / "task_vector.safetensors",
            "report": json.loads((tv / "task_vector.json").read_text()),
        }
    return out


def test_base_loads_in_transformers(ex):
    from transformers import Starcoder2ForCausalLM

    model, info = Starcoder2ForCausalLM.from_pretrained(ex["base"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.tie_word_embeddings and model.config.num_hidden_layers == 30
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    state = model.state_dict()
    for name, t in ex["base_tensors"].items():
        assert torch.equal(state[name], t), name
    assert len(ex["shapes"]) == N_TENSORS == len(ex["base_tensors"])
    assert "lm_head.weight" not in ex["shapes"]


def test_adapter_loads_in_peft(ex):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import Starcoder2ForCausalLM

    config = LoraConfig.from_pretrained(ex["adapter"])
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(Starcoder2ForCausalLM.from_pretrained(ex["base"]), config)
        result = set_peft_model_state_dict(model, ex["adapter_tensors"])
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k], result.missing_keys
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * N_TARGETED == len(ex["adapter_tensors"])
    for name, p in lora.items():  # every LoRA parameter took its value from the file
        key = name.replace(".default", "")
        assert torch.equal(p.detach(), ex["adapter_tensors"][key]), name


def test_values_not_representable_in_fp16_or_bf16(ex):
    for name, t in ex["base_tensors"].items():
        assert t.dtype == torch.float32
        assert (t.to(torch.float16).float() != t).all(), f"{name} has fp16-exact values"
        assert (t.to(torch.bfloat16).float() != t).all(), f"{name} has bf16-exact values"


def test_example_is_deterministic(example_dir, tmp_path):
    again = tmp_path / "again"
    loratv("example", "-o", again)
    files = sorted(p.relative_to(example_dir) for p in example_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file()) == files
    assert len(files) >= 4
    for rel in files:
        assert (example_dir / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_fp32_merge_equals_peft_bit_for_bit(ex, round_trip):
    from peft import PeftModel
    from transformers import Starcoder2ForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(Starcoder2ForCausalLM.from_pretrained(ex["base"]), ex["adapter"])
        oracle = model.merge_and_unload().state_dict()
    merged = round_trip["fp32"]["merged"]
    assert set(merged) == set(ex["base_tensors"])
    for name, want in oracle.items():
        got = merged[name if name != "lm_head.weight" else "model.embed_tokens.weight"]  # tied
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_fp32_round_trip_changes_exactly_the_targets(ex, round_trip):
    tv, report = round_trip["fp32"]["tv"], round_trip["fp32"]["report"]
    targets = {n for n in ex["shapes"] if _is_target(n)}
    assert len(targets) == N_TARGETED
    assert report["total_tensors"] == N_TENSORS and report["changed_tensors"] == N_TARGETED
    assert set(tv) == targets
    assert {t["name"] for t in report["tensors"] if t["changed"]} == targets


def test_fp32_task_vector_is_the_lora_delta(ex, round_trip):
    merged, tv = round_trip["fp32"]["merged"], round_trip["fp32"]["tv"]
    for name, t in tv.items():
        assert t.dtype == torch.float32
        delta, mag = _delta64(ex, name)
        # T = M - W with M = fp32(W + ΔW_fp32): off from the exact ΔW by the rounding of M, the fp32 GEMM error and
        # at most one rounding when T is stored in float32
        bound = ulp_of(merged[name]) + ulp_of(t) + GAMMA * mag
        err = (t.double() - delta).abs()
        assert (err <= bound).all(), f"{name}: max error {float(err.max())}"
        assert torch.allclose(t.double(), delta, rtol=1e-5, atol=1e-7), name


def test_fp16_round_trip_changes_everything(ex, round_trip):
    merged, tv, report = round_trip["fp16"]["merged"], round_trip["fp16"]["tv"], round_trip["fp16"]["report"]
    assert report["total_tensors"] == N_TENSORS and report["changed_tensors"] == N_TENSORS
    assert set(tv) == set(ex["shapes"])
    untargeted = [n for n in ex["shapes"] if not _is_target(n)]
    assert len(untargeted) == N_TENSORS - N_TARGETED == 363
    for name, w in ex["base_tensors"].items():
        assert merged[name].dtype == torch.float16
        if name in untargeted:  # pure fp16 rounding artefact, computed independently
            want = w.to(torch.float16).double() - w.double()
            assert torch.equal(tv[name].double(), want), name
        else:
            delta, mag = _delta64(ex, name)
            bound = ulp_of(merged[name]) + ulp_of(tv[name]) + GAMMA * mag
            assert ((tv[name].double() - delta).abs() <= bound).all(), name


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_report_counts_match_the_headers(ex, round_trip, precision):
    report, tv_file = round_trip[precision]["report"], round_trip[precision]["tv_file"]
    shapes = ex["shapes"]
    stored = header_shapes(tv_file)
    records = {t["name"]: t for t in report["tensors"]}
    assert len(report["tensors"]) == len(records) == N_TENSORS
    assert set(records) == set(shapes)
    for name, rec in records.items():
        assert tuple(rec["shape"]) == shapes[name]
        assert rec["parameters"] == math.prod(shapes[name])
        assert rec["changed"] == (name in stored)
        if name in stored:
            assert stored[name] == shapes[name]
    changed = [n for n in shapes if n in stored]
    assert report["total_tensors"] == len(shapes)
    assert report["changed_tensors"] == len(changed) == sum(r["changed"] for r in records.values())
    assert report["total_parameters"] == sum(math.prod(s) for s in shapes.values())
    assert report["changed_parameters"] == sum(math.prod(shapes[n]) for n in changed)
    if precision == "fp32":
        assert report["changed_parameters"] == 30 * (64 * 64 * 2 + 32 * 64 * 2)
