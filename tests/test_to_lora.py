"""Truncated task vectors written as PEFT adapters (groundwork for issue 4's to-lora): PEFT itself loads them, and
its merge_and_unload lands on the fine-tuned weights within the error that truncate() reported."""

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models import build_base, load_model

MODULES = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def test_truncated_task_vector_as_a_peft_adapter(tmp_path):
    from peft import PeftModel

    from loratv.cli import main
    from loratv.spectrum import truncate
    from loratv.to_lora import write_adapter

    base = build_base("llama", tmp_path / "base")
    state = load_file(str(base / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    finetuned = dict(state)
    ranks = {}
    for k, module in enumerate(MODULES):  # a "full fine-tune" whose updates have ranks 1..4 plus a little noise
        w = state[module + ".weight"]
        r = k + 1
        update = 0.05 * torch.randn(w.shape[0], r, generator=gen) @ torch.randn(r, w.shape[1], generator=gen)
        finetuned[module + ".weight"] = (w.double() + update.double() + 1e-7 * torch.randn(w.shape, generator=gen).double()).float()
        ranks[module] = r
    factors, cuts = {}, {}
    for module in MODULES:
        t = finetuned[module + ".weight"].double() - state[module + ".weight"].double()
        cut = truncate(t, max_error=1e-4)
        cuts[module] = cut
        factors[module] = (cut.a, cut.b)
        assert cut.rank == ranks[module]
    adapter = write_adapter(tmp_path / "adapter", factors, base_model=str(base))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(load_model(base, torch.float32), adapter).merge_and_unload()
    merged_state = {k: v.detach() for k, v in merged.state_dict().items()}
    for module in MODULES:
        name = module + ".weight"
        measured = float(torch.linalg.matrix_norm(merged_state[name].double() - finetuned[name].double()))
        ulp = np.spacing(np.abs(finetuned[name].numpy())).astype(np.float64)
        rounding = float(np.linalg.norm(ulp))  # PEFT's fp32 merge rounds once more: at most an ulp per element
        assert abs(measured - cuts[module].stored_error) <= rounding, module
    # loratv reads the adapter too, with the same per-module ranks and scaling 1
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(tmp_path / "m"), "--quiet"]) == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    for module in MODULES:
        assert torch.equal(ours[module + ".weight"], merged_state[module + ".weight"]), module


def test_nothing_to_write_is_refused(tmp_path):
    from loratv.to_lora import write_adapter

    with pytest.raises(ValueError):
        write_adapter(tmp_path / "a", {"m": (torch.zeros(0, 3), torch.zeros(4, 0))})
    assert not (tmp_path / "a").exists()
