"""The embedded example: a StarCoder2-architecture miniature (30 layers, hidden 64) and a q/k/v/o LoRA on it.

Same tensor inventory as StarCoder2-3B (483 tensors: 30 layers x 16 + 3, tied embeddings, biases everywhere),
written deterministically from a fixed seed. Every weight is an fp32 value that fp16 and bf16 cannot represent,
as in a trained model, so that casting the base to fp16 changes every tensor (the seed study's 363 artifacts).
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from loratv.example.tokenizer import write_tokenizer_files
from loratv.io.outputs import atomic_output_dir, shared_cache_lock
from loratv.io.safetensors_format import SafetensorsWriter
from loratv.ops.merge import merge

EXAMPLE_VERSION = 2  # 2: tokenizer files in base/ and adapter/
SEED = 20240229  # StarCoder2's release date
HIDDEN = 64
INTERMEDIATE = 256
LAYERS = 30
HEADS = 4
KV_HEADS = 2
VOCAB = 512
MAX_POSITIONS = 512
RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

CONFIG = {
    "architectures": ["Starcoder2ForCausalLM"],
    "model_type": "starcoder2",
    "hidden_size": HIDDEN,
    "intermediate_size": INTERMEDIATE,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    "hidden_act": "gelu_pytorch_tanh",
    "norm_epsilon": 1e-5,
    "use_bias": True,
    "rope_theta": 999999.4420358813,
    "sliding_window": None,
    "attention_dropout": 0.0,
    "residual_dropout": 0.0,
    "embedding_dropout": 0.0,
    "initializer_range": 0.018042,
    "use_cache": True,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def layer_shapes(i: int, head_dim: int = HIDDEN // HEADS) -> list[tuple[str, tuple[int, ...]]]:
    """The 16 tensors of one StarCoder2 decoder layer of the example, in the order they are written.

    Args:
        i: the layer index (0 … LAYERS - 1).
        head_dim: the attention head size; k/v projections have KV_HEADS·head_dim outputs.

    Returns:
        (name, shape) pairs; weights in nn.Linear orientation (out, in).
    """
    kv = KV_HEADS * head_dim
    p = f"model.layers.{i}."
    return [
        (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (p + "self_attn.q_proj.bias", (HIDDEN,)),
        (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
        (p + "self_attn.k_proj.bias", (kv,)),
        (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
        (p + "self_attn.v_proj.bias", (kv,)),
        (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (p + "self_attn.o_proj.bias", (HIDDEN,)),
        (p + "mlp.c_fc.weight", (INTERMEDIATE, HIDDEN)),
        (p + "mlp.c_fc.bias", (INTERMEDIATE,)),
        (p + "mlp.c_proj.weight", (HIDDEN, INTERMEDIATE)),
        (p + "mlp.c_proj.bias", (HIDDEN,)),
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "input_layernorm.bias", (HIDDEN,)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        (p + "post_attention_layernorm.bias", (HIDDEN,)),
    ]


def base_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the example base model (483: embedding, 30 layers of 16, final norm), in file order.

    Returns:
        (name, shape) pairs; the embedding is tied, so there is no lm_head.weight.
    """
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        shapes += layer_shapes(i)
    return shapes + [("model.norm.weight", (HIDDEN,)), ("model.norm.bias", (HIDDEN,))]


def _unrepresentable(values: np.ndarray) -> np.ndarray:
    """Nudge by one fp32 ulp every value that fp16 or bf16 could store exactly (their low mantissa bits are 0)."""
    values = values.astype(np.float32)
    bits = values.view(np.uint32)
    exact = (bits & 0x1FFF) == 0  # low 13 bits zero: representable in fp16's mantissa (and all of bf16's)
    values[exact] = np.nextafter(values[exact], np.float32(np.inf))
    return values


def _value(rng, name, shape) -> torch.Tensor:
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        v = 1.0 + 0.05 * rng.standard_normal(shape)
    elif name.endswith(".bias"):
        v = 0.01 * rng.standard_normal(shape)
    else:
        v = 0.02 * rng.standard_normal(shape)
    return torch.from_numpy(_unrepresentable(v).reshape(shape))


def write_base(folder: Path) -> None:
    """Write the example base model: model.safetensors (fp32, deterministic from SEED), config.json,
    generation_config.json and the tokenizer files.

    Args:
        folder: an existing folder; the files are written into it, replacing any of the same names.
    """
    rng = np.random.default_rng(SEED)
    shapes = base_shapes()
    writer = SafetensorsWriter(folder / "model.safetensors", shapes, {"format": "pt"})
    for name, shape in shapes:
        writer.add(name, _value(rng, name, shape))
    writer.close()
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": 0, "eos_token_id": 0}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(folder, VOCAB, MAX_POSITIONS)


def adapter_config() -> dict:
    """What PEFT's LoraConfig(r=8, lora_alpha=16, target_modules=[q,k,v,o], task_type=CAUSAL_LM) saves.

    Returns:
        The adapter_config.json contents as a dict (a new one on each call).
    """
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": ALPHA,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": RANK,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(TARGETS),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def write_adapter(folder: Path) -> None:
    """Write the example LoRA: adapter_model.safetensors (fp32 lora_A/lora_B for q/k/v/o of every layer,
    deterministic from SEED + 1), adapter_config.json and the tokenizer files.

    Args:
        folder: an existing folder; the files are written into it, replacing any of the same names.
    """
    rng = np.random.default_rng(SEED + 1)
    head_dim = HIDDEN // HEADS
    out_dims = {"q_proj": HIDDEN, "k_proj": KV_HEADS * head_dim, "v_proj": KV_HEADS * head_dim, "o_proj": HIDDEN}
    tensors = []
    for i in range(LAYERS):
        for t in TARGETS:
            key = f"base_model.model.model.layers.{i}.self_attn.{t}"
            a = 0.05 * rng.standard_normal((RANK, HIDDEN))
            b = 0.01 * rng.standard_normal((out_dims[t], RANK))
            tensors.append((key + ".lora_A.weight", torch.from_numpy(a.astype(np.float32))))
            tensors.append((key + ".lora_B.weight", torch.from_numpy(b.astype(np.float32))))
    writer = SafetensorsWriter(
        folder / "adapter_model.safetensors", [(n, tuple(t.shape)) for n, t in tensors], {"format": "pt"}
    )
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.close()
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(), indent=2, sort_keys=True) + "\n")
    # a trainer's checkpoint folder saves the tokenizer beside the adapter
    write_tokenizer_files(folder, VOCAB, MAX_POSITIONS)


def cache_dir() -> Path:
    """Where the cached example lives: $LORATV_CACHE, else $XDG_CACHE_HOME/loratv or ~/.cache/loratv.

    Returns:
        That root's `example-v{EXAMPLE_VERSION}` subfolder (not created here).
    """
    root = os.environ.get("LORATV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "loratv"
    )
    return Path(root) / f"example-v{EXAMPLE_VERSION}"


def write_example(out, *, force: bool = False) -> Path:
    """`loratv example -o DIR`: DIR/base (the model) and DIR/adapter (the LoRA), each with the tokenizer files.

    DIR/adapter is byte for byte the repository's checkpoint-40000/, the seed study's example checkpoint.
    The folder appears only once complete (written to a temporary sibling, then renamed).

    Args:
        out: the folder to create.
        force: replace an existing folder.

    Returns:
        Path(out).

    Raises:
        LoratvError: `out` exists without `force`, is not a folder, or overlaps an input (from atomic_output_dir).
    """
    with atomic_output_dir(out, force=force) as tmp:
        (tmp / "base").mkdir()
        (tmp / "adapter").mkdir()
        write_base(tmp / "base")
        write_adapter(tmp / "adapter")
    return Path(out)


def example_paths() -> dict:
    """The cached example (written on first use): base and adapter folders.

    Concurrent first uses wait on a lock in the cache's parent folder, so the example is written once.

    Returns:
        {"base": Path, "adapter": Path} inside cache_dir().
    """
    root = cache_dir()
    if not (root / "base" / "model.safetensors").is_file() or not (root / "adapter" / "adapter_model.safetensors").is_file():
        with shared_cache_lock(root.parent):  # another process may be writing it: wait, then look again
            if not (root / "base" / "model.safetensors").is_file() or not (root / "adapter" / "adapter_model.safetensors").is_file():
                write_example(root, force=True)
    return {"base": root / "base", "adapter": root / "adapter"}


def example_merged(precision: str = "fp32") -> Path:
    """The example merged at `precision` (cached): the fine-tuned model that `extract` uses by default.

    Args:
        precision: the merge precision name ("fp32", "fp16", "bf16", "fp64"), passed to ops.merge.merge.

    Returns:
        The cached merged model folder, cache_dir() / f"merged-{precision}" (merged on first use, under a lock).
    """

    paths = example_paths()
    merged = cache_dir() / f"merged-{precision}"
    if not (merged / "model.safetensors").is_file():
        with shared_cache_lock(cache_dir().parent):
            if not (merged / "model.safetensors").is_file():
                merge(paths["base"], paths["adapter"], merged, precision=precision, force=True)
    return merged
