#!/usr/bin/env python
"""Write a synthetic StarCoder2-3B-shaped checkpoint (fp32, random weights) and a PEFT LoRA adapter for it.

The model folder looks like one `save_pretrained` would write: 5 GB shards named model-0000i-of-0000N.safetensors,
model.safetensors.index.json and a config.json that transformers' Starcoder2Config accepts. Shapes follow
bigcode/starcoder2-3b: hidden 3072, intermediate 12288, 30 layers, 24 heads of 128, 2 KV heads, vocab 49152, biases
on every linear, LayerNorm with bias, tied embeddings (no lm_head stored). 483 tensors, ~3.03 B parameters, ~12.1 GB.

Tensors are generated chunk by chunk and written straight to disk, so memory stays at a few tens of MB whatever the
layer count. Values are deterministic for a given --seed.

    python benchmarks/make_starcoder2_3b.py --out /tmp/loratv-bench/base --adapter-out /tmp/loratv-bench/adapter
    python benchmarks/make_starcoder2_3b.py --out /tmp/sc2-small --adapter-out /tmp/sc2-small-lora --layers 2
"""

import argparse
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import torch

HIDDEN = 3072
INTERMEDIATE = 12288
HEADS = 24
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS  # 128
KV_DIM = KV_HEADS * HEAD_DIM  # 256
VOCAB = 49152
MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
CHUNK_ELEMS = 8 * 1024 * 1024  # 32 MB of fp32 per generated chunk
LORA_R = 16
LORA_ALPHA = 32
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def model_tensors(layers: int):
    """(name, shape, kind) in the order transformers' Starcoder2ForCausalLM names its state dict.

    kind: "w" random normal * 0.02, "b" bias (random normal * 0.02), "ln" LayerNorm weight (1 + normal * 0.02).
    """
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN), "w")]
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj, (o, n) in (
            ("q_proj", (HIDDEN, HIDDEN)),
            ("k_proj", (KV_DIM, HIDDEN)),
            ("v_proj", (KV_DIM, HIDDEN)),
            ("o_proj", (HIDDEN, HIDDEN)),
        ):
            out.append((f"{p}.self_attn.{proj}.weight", (o, n), "w"))
            out.append((f"{p}.self_attn.{proj}.bias", (o,), "b"))
        out.append((f"{p}.mlp.c_fc.weight", (INTERMEDIATE, HIDDEN), "w"))
        out.append((f"{p}.mlp.c_fc.bias", (INTERMEDIATE,), "b"))
        out.append((f"{p}.mlp.c_proj.weight", (HIDDEN, INTERMEDIATE), "w"))
        out.append((f"{p}.mlp.c_proj.bias", (HIDDEN,), "b"))
        for ln in ("input_layernorm", "post_attention_layernorm"):
            out.append((f"{p}.{ln}.weight", (HIDDEN,), "ln"))
            out.append((f"{p}.{ln}.bias", (HIDDEN,), "b"))
    out.append(("model.norm.weight", (HIDDEN,), "ln"))
    out.append(("model.norm.bias", (HIDDEN,), "b"))
    return out


def adapter_tensors(layers: int):
    """(name, shape, kind) of the PEFT LoRA adapter on q/k/v/o_proj; kind "lora" = normal * 0.01."""
    out = []
    for i in range(layers):
        for proj in LORA_TARGETS:
            o = KV_DIM if proj in ("k_proj", "v_proj") else HIDDEN
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            out.append((f"{p}.lora_A.weight", (LORA_R, HIDDEN), "lora"))
            out.append((f"{p}.lora_B.weight", (o, LORA_R), "lora"))
    return out


def config_json(layers: int) -> dict:
    return {
        "architectures": ["Starcoder2ForCausalLM"],
        "model_type": "starcoder2",
        "attention_dropout": 0.0,
        "residual_dropout": 0.0,
        "embedding_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": HIDDEN,
        "initializer_range": 0.018042,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 16384,
        "mlp_type": "default",
        "norm_epsilon": 1e-05,
        "norm_type": "layer_norm",
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "num_key_value_heads": KV_HEADS,
        "rope_theta": 999999.4420358813,
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_bias": True,
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def adapter_config_json(base_name: str, layers: int) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": LORA_R,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }


def shard_plan(tensors, max_bytes=MAX_SHARD_BYTES):
    """Greedy sharding as transformers does it: start a new shard when the next tensor would overflow this one."""
    shards, current, size = [], [], 0
    for t in tensors:
        nbytes = math.prod(t[1]) * 4
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _header(tensors, metadata) -> bytes:
    header = {"__metadata__": metadata}
    offset = 0
    for name, shape, _ in tensors:
        nbytes = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors, seed: int, first_index: int, buf: torch.Tensor) -> int:
    """Write fp32 tensors chunk by chunk; tensor k draws from a generator seeded with (seed, first_index + k)."""
    written = 0
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(_header(tensors, {"format": "pt"}))
        for k, (_name, shape, kind) in enumerate(tensors):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + first_index + k)
            scale, shift = {"w": (0.02, 0.0), "b": (0.02, 0.0), "ln": (0.02, 1.0), "lora": (0.01, 0.0)}[kind]
            left = math.prod(shape)
            while left:
                n = min(left, CHUNK_ELEMS)
                chunk = buf[:n]
                torch.randn((n,), generator=gen, out=chunk)
                chunk.mul_(scale)
                if shift:
                    chunk.add_(shift)
                f.write(memoryview(chunk.numpy()).cast("B"))
                left -= n
                written += n * 4
    os.replace(tmp, path)
    return written


def make_model(out: Path, layers: int, seed: int, max_shard_bytes: int = MAX_SHARD_BYTES, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors(layers)
    shards = shard_plan(tensors, max_shard_bytes)
    buf = torch.empty(CHUNK_ELEMS, dtype=torch.float32)
    weight_map, total, index = {}, 0, 0
    n = len(shards)
    for s, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{s:05d}-of-{n:05d}.safetensors"
        t0 = time.time()
        total += write_safetensors(out / fname, shard, seed, index, buf)
        index += len(shard)
        for name, _, _ in shard:
            weight_map[name] = fname
        log(f"  {fname}: {len(shard)} tensors, {sum(math.prod(t[1]) for t in shard) * 4 / 1e9:.2f} GB, {time.time() - t0:.1f} s")
    if n > 1:
        with open(out / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(out / "config.json", "w") as f:
        json.dump(config_json(layers), f, indent=2)
    with open(out / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 0}, f, indent=2)
    params = sum(math.prod(t[1]) for t in tensors)
    return {"tensors": len(tensors), "params": params, "bytes": total, "shards": n}


def make_adapter(out: Path, base: Path, layers: int, seed: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(layers)
    buf = torch.empty(CHUNK_ELEMS, dtype=torch.float32)
    total = write_safetensors(out / "adapter_model.safetensors", tensors, seed + 1, 0, buf)
    with open(out / "adapter_config.json", "w") as f:
        json.dump(adapter_config_json(str(base), layers), f, indent=2)
    return {"tensors": len(tensors), "params": sum(math.prod(t[1]) for t in tensors), "bytes": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="model folder to write (created)")
    ap.add_argument("--adapter-out", type=Path, help="also write an r=16 LoRA adapter on q/k/v/o_proj here")
    ap.add_argument("--layers", type=int, default=30, help="number of decoder layers (30 = StarCoder2-3B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=5.0, help="max shard size in GB (10^9 bytes), as save_pretrained")
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error("--layers must be at least 1")
    t0 = time.time()
    info = make_model(args.out, args.layers, args.seed, int(args.shard_gb * 1e9))
    print(
        f"model: {args.out} ({info['tensors']} tensors, {info['params'] / 1e9:.3f} B params, "
        f"{info['bytes'] / 1e9:.2f} GB in {info['shards']} shard(s), {time.time() - t0:.1f} s)"
    )
    if args.adapter_out:
        a = make_adapter(args.adapter_out, args.out, args.layers, args.seed)
        print(f"adapter: {args.adapter_out} ({a['tensors']} tensors, {a['params'] / 1e6:.2f} M params)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
