"""A real (short) LoRA training run, then `loratv merge` and `loratv extract` on its result.

The adapter is trained by PEFT with AdamW on a causal-LM loss, so its factors are genuine training output rather
than random fills. Oracles: the trained in-memory PeftModel's logits, the PeftModel reloaded from disk, and
float64 (B @ A) · s computed from the saved adapter file.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import VOCAB, build_base, load_model, logits, loratv, peft_model, token_batch, ulp_of

R, ALPHA = 4, 8
SCALE = ALPHA / R
STEPS = 6
TARGETS = ("q_proj", "v_proj")


@pytest.fixture(scope="module", params=["llama", "starcoder2"])
def trained(request, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    kind = request.param
    root = tmp_path_factory.mktemp(f"train_{kind}")
    base = build_base(kind, root / "base", seed=3)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            load_model(base, torch.float32),
            LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS), lora_dropout=0.0, task_type="CAUSAL_LM"),
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    gen = torch.Generator().manual_seed(42)
    data = torch.randint(0, VOCAB, (4, 16), generator=gen)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    ids = token_batch(seed=5)
    reference_logits = logits(model, ids)

    merged, tv = root / "merged", root / "tv"
    loratv("merge", "--base", base, "--adapter", adapter, "-o", merged)
    loratv("extract", "--base", base, "--finetuned", merged, "-o", tv)
    return {
        "kind": kind, "base": base, "adapter": adapter, "merged": merged, "losses": losses, "ids": ids,
        "reference_logits": reference_logits,
        "tv": load_file(tv / "task_vector.safetensors"),
        "report": json.loads((tv / "task_vector.json").read_text()),
    }


def test_training_moved_the_adapter(trained):
    assert trained["losses"][-1] < trained["losses"][0]
    ad = load_file(trained["adapter"] / "adapter_model.safetensors")
    bs = [t for k, t in ad.items() if k.endswith("lora_B.weight")]
    assert len(bs) == 2 * len(TARGETS) and all(b.abs().max() > 0 for b in bs)  # B starts at zero


def test_changed_tensors_are_exactly_the_targets(trained):
    base = load_file(trained["base"] / "model.safetensors")
    targets = {f"model.layers.{i}.self_attn.{t}.weight" for i in range(2) for t in TARGETS}
    assert targets <= set(base)
    assert set(trained["tv"]) == targets
    report = trained["report"]
    assert report["changed_tensors"] == len(targets) and report["total_tensors"] == len(base)
    assert {t["name"] for t in report["tensors"] if t["changed"]} == targets
    merged = load_file(trained["merged"] / "model.safetensors")
    for name, w in base.items():
        if name not in targets:
            assert torch.equal(merged[name], w), name


def test_task_vector_is_the_trained_delta(trained):
    ad = load_file(trained["adapter"] / "adapter_model.safetensors")
    merged = load_file(trained["merged"] / "model.safetensors")
    gamma = (R + 2) * 2.0**-24  # fp32 error of the length-r dot product, the multiply by s and one more rounding
    for name, t in trained["tv"].items():
        module = "base_model.model." + name[: -len(".weight")]
        a, b = ad[module + ".lora_A.weight"].double(), ad[module + ".lora_B.weight"].double()
        delta = (b @ a) * SCALE
        bound = ulp_of(merged[name]) + ulp_of(t) + gamma * SCALE * (b.abs() @ a.abs())
        err = (t.double() - delta).abs()
        assert (err <= bound).all(), f"{name}: max error {float(err.max())}"
        assert delta.abs().max() > 0


def test_merged_logits_match_the_trained_model(trained):
    ids = trained["ids"]
    merged = logits(load_model(trained["merged"]), ids)
    torch.testing.assert_close(merged, trained["reference_logits"], atol=1e-5, rtol=1e-5)
    reloaded = logits(peft_model(trained["base"], trained["adapter"]), ids)
    torch.testing.assert_close(merged, reloaded, atol=1e-5, rtol=1e-5)
