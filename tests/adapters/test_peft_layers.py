"""Issue 15 (items 2, 6, 7): layers and variants checked against PEFT itself. Every adapter is made by PEFT
(get_peft_model + save_pretrained, every trained tensor randomised); the oracle is PEFT's merge_and_unload, or,
where loratv deliberately rounds once and PEFT twice (16-bit bases), the one-rounding formula evaluated on PEFT's own
get_delta_weight. Narrow embeddings (widths 1–128), nn.MultiheadAttention, IA³ on models mixing Conv1D and Linear,
VeLoRA and MonteCLoRA, grouped convolutions, the NOT EQUIVALENT summary, and the README's refusal list."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helpers_io import assert_nothing_at, assert_one_line_error
from tiny_models import build_adapter, build_base, load_model, peft_merged_state

ROOT = Path(__file__).resolve().parents[2]


def cli(*argv, quiet=True) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + (["--quiet"] if quiet else []))


def save_base(model: nn.Module, folder: Path) -> Path:
    """A custom torch model's state dict as a one-file safetensors base (no config.json)."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def adapt(model: nn.Module, config, folder: Path, seed: int = 1) -> Path:
    """PEFT adapts `model` (in place), every trainable tensor randomised, and saves the adapter."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if not p.requires_grad:
                    continue
                noise = torch.randn(p.shape, generator=gen).to(p.dtype)
                if "magnitude" in name or "ia3_l" in name:
                    p.mul_(1 + 0.3 * noise) if "magnitude" in name else p.copy_(1 + 0.3 * noise)
                else:
                    p.copy_(noise)
        peft_model.save_pretrained(folder)
    return folder


def peft_reference(make_model, base: Path, adapter: Path):
    """(merge_and_unload's state dict, the unmerged PeftModel) for a custom model loaded from `base`."""
    from peft import PeftModel

    def fresh():
        model = make_model()
        model.load_state_dict(load_file(str(base / "model.safetensors")))
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(fresh(), adapter).merge_and_unload().state_dict()
        unmerged = PeftModel.from_pretrained(fresh(), adapter).eval()
    return {k: v.detach().clone() for k, v in merged.items()}, unmerged


# ------------------------------------------------------------------ narrow embeddings (item 1)

WIDTHS = list(range(1, 129))
VOCABS = (1, 7, 50, 257)
RANKS = (1, 2, 3, 4, 8, 16, 64)


def embedding_shapes():
    """Every width 1–128 (vocab cycling through VOCABS), and every vocab for the narrowest widths."""
    shapes = {(VOCABS[d % len(VOCABS)], d) for d in WIDTHS}
    shapes |= {(v, d) for d in range(1, 9) for v in VOCABS}
    return sorted(shapes)


class Embeddings(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embs = nn.ModuleDict({f"e{d}_{v}": nn.Embedding(v, d) for v, d in embedding_shapes()}).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_embeddings_of_every_width_merge_as_peft(tmp_path, dtype, use_dora):
    from peft import LoraConfig

    torch.manual_seed(0)
    base = save_base(Embeddings(dtype), tmp_path / "base")
    names = list(Embeddings().embs)
    ranks = {f"embs.{n}": RANKS[i % len(RANKS)] for i, n in enumerate(names)}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"embs\..*", rank_pattern=ranks, use_dora=use_dora)
    model = Embeddings(dtype)
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    adapter = adapt(model, config, tmp_path / "adapter")
    assert cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want, peft_model = peft_reference(lambda: Embeddings(dtype), base, adapter)
    original = load_file(str(base / "model.safetensors"))
    assert len(ours) == len(names) >= 128
    for name, value in ours.items():
        assert value.dtype == want[name].dtype == dtype, name
        if dtype == torch.float32 or use_dora:  # PEFT rounds once here too: bit for bit
            assert torch.equal(value, want[name]), (name, int((value != want[name]).sum()))
            continue
        # LoRA on a 16-bit embedding: PEFT's Embedding.merge adds ΔW.to(W.dtype) (two roundings), loratv rounds
        # fp32(W) + ΔW once; ΔW is PEFT's own get_delta_weight, so the product's order is PEFT's, bit for bit
        layer = peft_model.base_model.model.embs[name.split(".")[1]]
        delta = layer.get_delta_weight("default")
        assert delta.dtype == torch.float32
        w = original[name]
        assert torch.equal(value, (w.float() + delta).to(dtype)), name
        assert torch.equal(want[name], w + delta.to(dtype)), "PEFT's embedding merge is no longer W + bf16(ΔW)"


def test_lora_products_are_peft_order_for_narrow_linear_and_conv1d(tmp_path):
    """Linear and Conv1D (fan_in_fan_out) LoRA on narrow and tall shapes, fp32: merge_and_unload bit for bit."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    shapes = [(o, i) for o in (1, 2, 3, 5, 8, 33, 130) for i in (1, 4, 7, 64)]

    class Layers(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.ModuleDict({f"l{o}_{i}": nn.Linear(i, o) for o, i in shapes})
            self.c1d = nn.ModuleDict({f"c{o}_{i}": Conv1D(o, i) for o, i in shapes if o != i})

    torch.manual_seed(0)
    base = save_base(Layers(), tmp_path / "base")
    model = Layers()
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    names = [f"lin.{n}" for n in model.lin] + [f"c1d.{n}" for n in model.c1d]
    ranks = {n: RANKS[i % len(RANKS)] for i, n in enumerate(names)}
    adapter = adapt(model, LoraConfig(r=4, lora_alpha=8, target_modules=names, rank_pattern=ranks), tmp_path / "a")
    assert cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want, _ = peft_reference(Layers, base, adapter)
    for name, value in want.items():
        assert torch.equal(ours[name], value), name


# ------------------------------------------------------------------ nn.MultiheadAttention (item 7)

class Attention(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2).to(dtype)
        self.lin = nn.Linear(16, 16).to(dtype)

    def forward(self, x):
        return self.lin(self.attn(x, x, x)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_multihead_attention_merges_as_peft(tmp_path, dtype):
    from peft import LoraConfig

    torch.manual_seed(0)
    base = save_base(Attention(dtype), tmp_path / "base")
    model = Attention(dtype)
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    adapter = adapt(model, LoraConfig(r=2, lora_alpha=4, target_modules=["attn", "lin"]), tmp_path / "a")
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.attn.base_layer.out_proj.lora_A.weight" in keys
    assert cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want, unmerged = peft_reference(lambda: Attention(dtype), base, adapter)
    original = load_file(str(base / "model.safetensors"))
    assert {n for n in ours if not torch.equal(ours[n], original[n])} == {
        "attn.in_proj_weight", "attn.out_proj.weight", "lin.weight"}
    if dtype == torch.float32:
        for name, value in want.items():
            assert torch.equal(ours[name], value), name
        x = torch.randn(5, 1, 16, generator=torch.Generator().manual_seed(3))
        merged = Attention()
        merged.load_state_dict(ours)
        with torch.no_grad():  # the merged model is the one PEFT serves unmerged (out_proj's delta included twice)
            torch.testing.assert_close(merged.eval()(x), unmerged(x), atol=1e-4, rtol=1e-4)
    else:  # PEFT rounds ΔW to bf16 before adding; loratv rounds W + ΔW (+ ΔW) once, from PEFT's own deltas
        layer = unmerged.base_model.model.attn
        d_in = layer.get_delta_weight("default")
        d_out = layer.base_layer.out_proj.get_delta_weight("default")
        w_in, w_out = original["attn.in_proj_weight"], original["attn.out_proj.weight"]
        assert torch.equal(ours["attn.in_proj_weight"], (w_in.float() + d_in).to(dtype))
        assert torch.equal(ours["attn.out_proj.weight"], (w_out.float() + d_out + d_out).to(dtype))
    assert cli("compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m", "-o", tmp_path / "c",
               "--no-plots") == 0
    record = json.loads((tmp_path / "c" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"


# ------------------------------------------------------------------ IA³ with Conv1D and Linear layers (item 7)

@pytest.mark.parametrize("feedforward", [["c_fc"], ["c_fc", "score"], []], ids=["ff", "ff-head", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ia3_on_gpt2_conv1d_and_a_linear_head_merges_as_peft(tmp_path, dtype, feedforward):
    import peft
    from transformers import GPT2ForSequenceClassification

    from tiny_models import tiny_config

    config = tiny_config("gpt2")
    config.num_labels, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    base = tmp_path / "base"
    GPT2ForSequenceClassification(config).to(dtype).save_pretrained(base)
    ia3 = peft.IA3Config(target_modules=["c_attn", "c_fc", "score"], feedforward_modules=feedforward,
                         fan_in_fan_out=True)
    adapter = adapt(GPT2ForSequenceClassification.from_pretrained(base, dtype=dtype), ia3, tmp_path / "a")
    # PEFT switched the flag per layer and saved what the last (Linear) layer left
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    assert cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = peft.PeftModel.from_pretrained(GPT2ForSequenceClassification.from_pretrained(base, dtype=dtype),
                                              adapter).merge_and_unload().state_dict()
    assert {"score.weight", "transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"} <= {
        n for n in ours if not torch.equal(ours[n], load_file(str(base / "model.safetensors"))[n])}
    for name, value in ours.items():
        assert torch.equal(value, want[name]), name
    assert cli("compare", "--base", base, "--adapter", adapter, "--finetuned", tmp_path / "m", "-o", tmp_path / "c",
               "--no-plots") == 0


def test_ia3_on_a_custom_model_mixing_conv1d_and_linear_merges_as_peft(tmp_path):
    import peft
    from transformers.pytorch_utils import Conv1D

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = Conv1D(48, 16), Conv1D(16, 48)  # stored (in, out)
            self.head, self.proj = nn.Linear(16, 5), nn.Linear(16, 24)

    torch.manual_seed(0)
    base = save_base(Mixed(), tmp_path / "base")
    model = Mixed()
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    for order in (["up", "down", "head", "proj"], ["head", "proj", "up", "down"]):
        folder = tmp_path / "-".join(order)
        ia3 = peft.IA3Config(target_modules=order, feedforward_modules=["down", "proj"])
        fresh = Mixed()
        fresh.load_state_dict(load_file(str(base / "model.safetensors")))
        adapter = adapt(fresh, ia3, folder / "a")
        assert cli("merge", "--base", base, "--adapter", adapter, "-o", folder / "m") == 0
        ours = load_file(str(folder / "m" / "model.safetensors"))
        want, _ = peft_reference(Mixed, base, adapter)
        for name, value in want.items():
            assert torch.equal(ours[name], value), name
        assert not torch.equal(ours["up.weight"], load_file(str(base / "model.safetensors"))["up.weight"])


# ------------------------------------------------------------------ VeLoRA, MonteCLoRA (item 7)

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_base("llama", tmp_path_factory.mktemp("llama") / "base")


@pytest.mark.parametrize("variant", ["velora", "monteclora"])
def test_velora_and_monteclora_merge_as_peft(tmp_path, llama, variant):
    import peft

    extra = ({"velora_config": peft.VeloraConfig(num_groups=4)} if variant == "velora"
             else {"monteclora_config": peft.MontecloraConfig()})
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra)
    adapter = adapt(load_model(llama), config, tmp_path / "a")
    keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(f"lora_{variant}_" in k for k in keys)  # the training-time tensors are in the file
    assert cli("merge", "--base", llama, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(llama, adapter)
    changed = [n for n in ours if not torch.equal(ours[n], load_file(str(llama / "model.safetensors"))[n])]
    assert len(changed) == 4
    for name, value in ours.items():
        assert torch.equal(value, want[name]), name
    assert cli("compare", "--base", llama, "--adapter", adapter, "--finetuned", tmp_path / "m", "-o", tmp_path / "c",
               "--no-plots") == 0


# ------------------------------------------------------------------ grouped convolutions (item 7)

def test_grouped_convolution_is_refused_for_groups_not_ranks(tmp_path, capsys):
    from peft import LoraConfig

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, groups=2)

    torch.manual_seed(0)
    base = save_base(Grouped(), tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that merging is not supported
        adapter = adapt(Grouped(), LoraConfig(r=4, lora_alpha=8, target_modules=["conv"]), tmp_path / "a")
    with warnings.catch_warnings(), pytest.raises(NotImplementedError):  # PEFT refuses the merge itself
        warnings.simplefilter("ignore")
        peft_reference(Grouped, base, adapter)
    capsys.readouterr()
    rc = cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m")
    err = capsys.readouterr().err
    assert_one_line_error(rc, err, "grouped convolution")
    assert "groups = 2" in err and "rank" not in err.split("groups = 2")[0]
    assert_nothing_at(tmp_path / "m")


# ------------------------------------------------------------------ the NOT EQUIVALENT summary (item 6)

def test_not_equivalent_summary_names_the_worst_tensors(tmp_path, llama, capsys):
    adapter = build_adapter(llama, tmp_path / "a", seed=4, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    merged = peft_merged_state(llama, adapter)
    name, where = "model.layers.1.self_attn.v_proj.weight", (3, 5)
    merged[name][where] += 1e-3
    (tmp_path / "ft").mkdir()
    save_file({k: v.contiguous() for k, v in merged.items()},
              str(tmp_path / "ft" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "ft" / "config.json").write_text((llama / "config.json").read_text())
    capsys.readouterr()
    assert cli("compare", "--base", llama, "--adapter", adapter, "--finetuned", tmp_path / "ft", "-o", tmp_path / "c",
               "--no-plots", quiet=False) == 1
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "c" / "comparison_results.json").read_text())
    row = next(t for t in record["tensors"] if t["name"] == name)
    assert row["worst_element"] == list(where)
    # |T − ΔW| at the planted element, from the files alone in float64
    base = load_file(str(llama / "model.safetensors"))[name].double()
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    module = "base_model.model." + name.removesuffix(".weight")
    delta = (ad[module + ".lora_B.weight"].double() @ ad[module + ".lora_A.weight"].double()) * 2.0
    exact = abs(float(merged[name][where].double() - base[where] - delta[where]))
    assert row["worst_element_diff"] == pytest.approx(exact, rel=1e-6)
    line = next(ln for ln in out.splitlines() if name in ln)
    assert f"at element {list(where)}" in line
    assert f"|T − ΔW| = {row['worst_element_diff']:.3e}" in line and f"{exact:.2e}"[:4] in line
    assert f"{row['certificate_ratio']:.3g}× the rounding bound" in line
    assert out.index("Verdict: NOT EQUIVALENT") < out.index(name)


# ------------------------------------------------------------------ the README's refusal list (item 7)

def _refused_by_name() -> str:
    text = (ROOT / "README.md").read_text()
    return " ".join(re.search(r"Refused by name, with the reason:(.*?)analyze and to-lora", text, re.S)
                    .group(1).split())


def test_readme_refusal_list_matches_the_code():
    from loratv.adapters.config import OTHER_TUNERS, REFUSED_FIELDS

    listed = _refused_by_name()
    # every config field the code refuses, and every foreign tuner, is named in the list
    names = {"use_bdlora": "BD-LoRA", "alora_invocation_tokens": "aLoRA", "arrow_config": "Arrow",
             "kasa_config": "KaSA", "megatron_config": "Megatron", "layer_replication": "layer_replication",
             "use_qalora": "QALoRA"}
    assert {field for field, _, _ in REFUSED_FIELDS} == set(names)
    for field, phrase in names.items():
        assert phrase in listed, (field, phrase)
    assert "FRoD" in listed and "prompt-learning" in listed and set(OTHER_TUNERS) >= {"FROD", "UNILORA", "PROMPT_TUNING"}
    for phrase in ("grouped convolutions", "nn.MultiheadAttention", "Lily", "X-LoRA"):
        assert phrase in listed, phrase
    # what issues 15 and 17 made mergeable is no longer listed as refused
    for phrase in ("VeLoRA", "MonteCLoRA", "IA³", "coft", "OFT on Embedding", "Tucker"):
        assert phrase not in listed, phrase
