"""Writing a PEFT LoRA adapter: adapter_config.json and adapter_model.safetensors, as PEFT saves them.

Every module gets its own rank through `rank_pattern` and `lora_alpha` equal to that rank through `alpha_pattern`, so
PEFT's scaling alpha/r is exactly 1 and ΔW = lora_B @ lora_A as stored (to-lora's truncations, combine's sums).
Pattern keys are the full module names with their dots escaped: PEFT (≥ 0.15) matches them as regular expressions
anchored at a dot.
"""

import json
import re
from collections import Counter
from pathlib import Path

import torch

from loratv.adapters.structures import CONFIG_NAME, PREFIX
from loratv.io.safetensors_format import SafetensorsWriter
from loratv.io.writer import finished

WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_config(ranks: dict, base_model: str | None, *, modules_to_save=None, bias: str = "none",
                   fan_in_fan_out: bool = False, lora_bias: bool = False) -> dict:
    """The adapter_config.json of a LoRA with these per-module ranks (module name -> r ≥ 1), scaling 1 each.

    Args:
        ranks: module name → rank.
        base_model: recorded as base_model_name_or_path (may be None).
        modules_to_save: modules saved whole (None or empty: none).
        bias: PEFT's bias setting ("none", "lora_only", ...).
        fan_in_fan_out: PEFT's flag, True for Conv1D modules.
        lora_bias: PEFT's flag for a bias on lora_B.

    Returns:
        The config: r and lora_alpha the most common rank (the larger on a tie; 1 when there are no ranks), the
        other ranks in rank_pattern and alpha_pattern under regex-escaped module names.
    """
    counts = Counter(ranks.values())
    default = max(counts, key=lambda r: (counts[r], r)) if counts else 1  # the most common rank (the larger on a tie)
    pattern = {re.escape(module): r for module, r in ranks.items() if r != default}
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": default,
        "lora_alpha": default,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": bias,
        "lora_bias": lora_bias,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "modules_to_save": sorted(modules_to_save or ()) or None,
        "inference_mode": True,
    }


def write_adapter(folder, factors: dict, *, base_model: str | None = None, dtype: torch.dtype = torch.float32,
                  kinds: dict | None = None, full_values: dict | None = None, modules_to_save=(),
                  bias: str = "none", biases: dict | None = None, operation: str = "to-lora",
                  fan_in_fan_out: bool | None = None, metadata: dict | None = None) -> Path:
    """Write `folder`/adapter_config.json and adapter_model.safetensors for {module: (A (k, n…), B (m, k…))} as PEFT
    stores them for each module's kind (linear by default), plus lora_B biases and full values {tensor name: value}.

    Args:
        folder: the folder to write into (created if missing).
        factors: module → (A, B), A's first and B's second dimension the rank; modules of rank 0 are dropped.
        base_model: recorded as base_model_name_or_path.
        dtype: the dtype the factors (and lora_B biases) are written in (full values keep theirs).
        kinds: module → "linear", "conv1d", "conv" or "embedding" (default "linear").
        full_values: tensor name → value, written under PEFT's prefix as they are.
        modules_to_save: modules saved whole, for the config.
        bias: PEFT's bias setting for the config.
        biases: module → its lora_B bias (the config gets lora_bias = True when there is one).
        operation: the loratv command, recorded in the file's metadata.
        fan_in_fan_out: PEFT's flag (None: True when a module's kind is conv1d).
        metadata: more string entries for the file's metadata (the caller's loratv_version among them).

    Returns:
        `folder`, as a Path.

    Raises:
        ValueError: no factor of nonzero rank and no full value: there is nothing to write.
    """
    kinds = kinds or {}
    biases = biases or {}
    factors = {m: ab for m, ab in factors.items() if ab[0].shape[0] > 0}
    full_values = full_values or {}
    if not factors and not full_values:
        raise ValueError("no module has a nonzero rank: there is nothing to write")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = []
    for module in sorted(factors):
        a, b = factors[module]
        a_name, b_name = (("lora_embedding_A", "lora_embedding_B") if kinds.get(module) == "embedding"
                          else ("lora_A.weight", "lora_B.weight"))
        tensors.append((f"{PREFIX}{module}.{a_name}", a.to(dtype).contiguous()))
        tensors.append((f"{PREFIX}{module}.{b_name}", b.to(dtype).contiguous()))
        if module in biases:
            tensors.append((f"{PREFIX}{module}.lora_B.bias", biases[module].to(dtype).contiguous()))
    for name in sorted(full_values):
        tensors.append((f"{PREFIX}{name}", full_values[name].contiguous()))
    header = {"format": "pt", "loratv_operation": operation, **(metadata or {})}
    writer = SafetensorsWriter(folder / WEIGHTS_NAME, [(n, tuple(t.shape)) for n, t in tensors], header)
    with finished(writer):
        for name, tensor in tensors:
            writer.add(name, tensor)
    if fan_in_fan_out is None:
        fan_in_fan_out = any(kinds.get(m) == "conv1d" for m in factors)
    config = adapter_config({m: ab[0].shape[0] for m, ab in factors.items()}, base_model,
                            modules_to_save=modules_to_save, bias=bias, fan_in_fan_out=fan_in_fan_out,
                            lora_bias=any(m in biases for m in factors))
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder
