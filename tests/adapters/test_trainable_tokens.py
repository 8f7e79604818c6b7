"""trainable_token_indices: PEFT trains a few embedding rows and stores their new values; the merge copies them in
(index_copy, cast to the base dtype). Oracle: PEFT's merge_and_unload on adapters PEFT made, rows randomised."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import build_base, load_model, peft_merged_state

INDICES = [1, 5, 7, 100]


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + ["--quiet"])


def token_adapter(base, folder, dtype, indices):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, dtype), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                                  trainable_token_indices=indices))
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name or "trainable_tokens_delta" in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
        model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind, indices", [("starcoder2", INDICES), ("llama", {"embed_tokens": INDICES})],
                         ids=["tied-list", "untied-dict"])
def test_token_rows_merge_like_peft_and_compare_certifies(tmp_path, kind, indices, dtype):
    base = build_base(kind, tmp_path / "base", dtype=dtype)
    adapter = token_adapter(base, tmp_path / "adapter", dtype, indices)
    assert any("trainable_tokens_delta" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    merged = tmp_path / "m"
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", merged) == 0
    ours = load_file(str(merged / "model.safetensors"))
    want = peft_merged_state(base, adapter, dtype)
    for name, value in ours.items():
        assert torch.equal(value, want[name]), name
    w = load_file(str(base / "model.safetensors"))
    rows = (ours["model.embed_tokens.weight"] != w["model.embed_tokens.weight"]).any(dim=1).nonzero().flatten()
    assert rows.tolist() == INDICES  # exactly the trained rows changed
    assert json.loads((merged / "config.json").read_text()).get("tie_word_embeddings", False) == (kind == "starcoder2")
    out = tmp_path / "cmp"
    assert run_cli("compare", "--base", base, "--adapter", adapter, "--finetuned", merged, "-o", out, "--no-plots") == 0
    record = json.loads((out / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
    row = next(t for t in record["tensors"] if t["name"] == "model.embed_tokens.weight")
    assert row["category"] == "shared"


def test_rows_that_do_not_fit_are_refused(tmp_path, capsys):
    base = build_base("llama", tmp_path / "base")
    adapter = token_adapter(base, tmp_path / "adapter", torch.float32, INDICES)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [1, 5, 7]  # one index fewer than the stored rows
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 2
    assert "trainable_tokens_delta" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_precision_certifies_every_path_with_token_rows(tmp_path):
    base = build_base("starcoder2", tmp_path / "base")
    adapter = token_adapter(base, tmp_path / "adapter", torch.float32, INDICES)
    assert run_cli("precision", "--base", base, "--adapter", adapter, "-o", tmp_path / "p", "--no-plots") == 0
    study = json.loads((tmp_path / "p" / "precision_results.json").read_text())
    assert len(study["paths"]) == 5 and all(p["verdict"] == "EQUIVALENT (certified)" for p in study["paths"])
