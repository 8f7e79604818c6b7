"""Builders and oracles shared by the PEFT-oracle, example and training tests.

Every model is a tiny randomly initialised transformers model written to a temporary folder; every adapter is made
by PEFT itself (get_peft_model + save_pretrained). The oracles are PEFT's merge_and_unload and plain torch, never
loratv's own output.
"""

import json
from pathlib import Path

import torch

VOCAB = 128
HIDDEN = 32
SEQ = 12


def tiny_config(kind: str):
    """A 2-layer, hidden-32, vocab-128 config of the given architecture."""
    from transformers import GPT2Config, LlamaConfig, Starcoder2Config

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if kind == "starcoder2":  # biases everywhere, tied embeddings
        return Starcoder2Config(
            hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, use_bias=True, tie_word_embeddings=True, **common,
        )
    if kind == "llama":  # untied lm_head, no biases
        return LlamaConfig(
            hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, **common,
        )
    if kind == "gpt2":  # Conv1D layers stored (in, out), tied wte
        return GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64, **common)
    if kind == "resnet":  # Conv2d layers: a 7×7 stem, 1×1 and 3×3 bottleneck convolutions
        from transformers import ResNetConfig

        return ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                            layer_type="bottleneck", num_labels=4)
    raise ValueError(kind)


def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    return AutoModelForImageClassification if kind == "resnet" else AutoModelForCausalLM


def build_base(kind: str, folder: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """Random tiny model saved with save_pretrained (safetensors). Biases and norms are randomised too."""
    torch.manual_seed(seed)
    model = _auto_class(kind).from_config(tiny_config(kind))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
            elif p.dim() == 1:  # norm weights
                p.copy_(1 + 0.05 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(folder)
    return Path(folder)


def load_model(folder, dtype=None):
    model_type = json.loads((Path(folder) / "config.json").read_text())["model_type"]
    return _auto_class(model_type).from_pretrained(folder, dtype=dtype or "auto").eval()


def randomise_adapter(peft_model, seed: int, bias: str = "none") -> None:
    """LoRA B is zero at init: give every LoRA tensor, trained copy and (for bias != none) trainable bias a value."""
    gen = torch.Generator().manual_seed(seed)

    def rand_like(p):
        return torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)

    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * rand_like(p))
            elif ".modules_to_save." in name:
                p.add_(0.05 * rand_like(p))
            elif bias != "none" and name.endswith(".bias") and p.requires_grad:
                p.add_(0.05 * rand_like(p))


def build_adapter(base: Path, folder: Path, seed: int = 1, dtype=None, save_kwargs=None, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter for the model in `base`, randomised and saved with save_pretrained."""
    import warnings

    from peft import LoraConfig, get_peft_model

    model = load_model(base, dtype)
    config = LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out / tied-embedding notices
        peft_model = get_peft_model(model, config)
        randomise_adapter(peft_model, seed, lora_kwargs.get("bias", "none"))
        peft_model.save_pretrained(folder, **(save_kwargs or {}))
    return Path(folder)


def peft_model(base, adapter, dtype=None, autocast_adapter_dtype: bool = True):
    """The unmerged PeftModel (the reference forward pass); autocast_adapter_dtype is PEFT's own parameter (True:
    a 16-bit model's adapter is upcast to fp32, False: it stays in the model's dtype)."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load_model(base, dtype), adapter,
                                         autocast_adapter_dtype=autocast_adapter_dtype).eval()


def peft_merged_state(base, adapter, dtype=None, autocast_adapter_dtype: bool = True) -> dict:
    """Oracle: PEFT's own merge_and_unload (default, unsafe merge) state dict, the model loaded in `dtype`."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = peft_model(base, adapter, dtype, autocast_adapter_dtype).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def token_batch(seed: int = 0, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=gen)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


# ---------------------------------------------------------------- ulp distances

_BITS = {
    torch.float64: (torch.int64, 63),
    torch.float32: (torch.int32, 31),
    torch.float16: (torch.int16, 15),
    torch.bfloat16: (torch.int16, 15),
}


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Map floats to integers that are consecutive for consecutive floats (±0 both map to 0)."""
    int_dtype, sign_bit = _BITS[x.dtype]
    bits = x.contiguous().view(int_dtype).to(torch.int64)
    if x.dtype == torch.float64:
        mag = bits & 0x7FFFFFFFFFFFFFFF
        return torch.where(bits < 0, -mag, mag)
    mag = bits & ((1 << sign_bit) - 1)
    return torch.where(bits < 0, -mag, mag)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-element distance in units in the last place of the (common) dtype; 0 means bit-identical (or ±0)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (_ordered(a) - _ordered(b)).abs()


def ulp_of(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at |x| (as float64): nextafter(|x|, inf) - |x|."""
    ax = x.abs()
    return (torch.nextafter(ax, torch.full_like(ax, float("inf"))).double() - ax.double())


def read_config(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def raw_tensor_bytes(file) -> dict:
    """name -> (dtype code, shape, the tensor's raw bytes), read straight from a .safetensors file."""
    import struct

    data = Path(file).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = data[8 + n :]
    return {k: (v["dtype"], tuple(v["shape"]), body[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}


def header_shapes(file) -> dict:
    """name -> shape, from the safetensors header via safetensors.safe_open (no tensor data read)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def loratv(*argv) -> None:
    """Run the CLI in-process (quiet) and require success."""
    from loratv.cli.app import main

    argv = [str(a) for a in argv]
    if argv[0] in ("merge", "extract"):
        argv.append("--quiet")
    rc = main(argv)
    assert rc == 0, f"loratv {' '.join(argv)} exited {rc}"


# LoRA cases merged by PEFT's oracle tests: case -> (base, LoraConfig kwargs)
QV = ["q_proj", "v_proj"]
BASES = {
    "starcoder2": ("starcoder2", torch.float32),
    "llama": ("llama", torch.float32),
    "gpt2": ("gpt2", torch.float32),
    "llama_bf16": ("llama", torch.bfloat16),
}
INPUT_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")

# case -> (base, LoraConfig kwargs)
CASES = {
    "llama_qv": ("llama", dict(r=4, lora_alpha=8, target_modules=QV)),
    "llama_rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=QV + ["k_proj", "o_proj"])),
    "llama_patterns": (
        "llama",
        dict(r=4, lora_alpha=8, target_modules=QV,
             rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 32}),
    ),
    "llama_modules_to_save_head": ("llama", dict(r=4, lora_alpha=8, target_modules=QV, modules_to_save=["lm_head"])),
    "llama_embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "starcoder2_bias_all": ("starcoder2", dict(r=4, lora_alpha=8, target_modules=QV, bias="all")),
    "starcoder2_lora_bias": ("starcoder2", dict(r=4, lora_alpha=8, target_modules=["q_proj", "c_fc"], lora_bias=True)),
    # LoRA on a tied embedding: PEFT merges into the shared parameter, so the head changes too and stays tied
    "starcoder2_tied_embedding": ("starcoder2", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "starcoder2_tied_lm_head": ("starcoder2", dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])),
    # a trained copy of one of a tied pair unties it (PEFT's unload sets tie_word_embeddings=False)
    "starcoder2_tied_modules_to_save_head": (
        "starcoder2", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "starcoder2_tied_modules_to_save_embedding": (
        "starcoder2", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    # GPT-2 Conv1D: W stored (in, out); attention c_proj is square (32x32), so only the layer type tells
    "gpt2_conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "bf16_llama_qv": ("llama_bf16", dict(r=4, lora_alpha=8, target_modules=QV)),
    # reference §9, first row: rslora + rank/alpha patterns + embedding LoRA + modules_to_save on a bf16 base
    "bf16_llama_golden": (
        "llama_bf16",
        dict(r=4, lora_alpha=8, use_rslora=True, target_modules=QV + ["embed_tokens"],
             rank_pattern={"model.layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 32},
             modules_to_save=["lm_head"]),
    ),
}
# PEFT's unmerged forward uses the *unmodified* shared weight for the tied head, while its merge adds the delta to
# the shared tensor (peft#2018): merged and unmerged PEFT models differ there, so the logits oracle is PEFT's merge.


def conv_adapter(base, folder, use_dora: bool):
    """A PEFT LoRA (or DoRA) adapter on every convolution of a ResNet base, with random non-zero factors."""
    import warnings

    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["convolution"], use_dora=use_dora))
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
                elif "lora_" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(folder)
    return folder
