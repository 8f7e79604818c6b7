"""Writing truncated task-vector factors as a PEFT LoRA adapter (groundwork for `loratv to-lora`, issue 4).

Every module gets its own rank through `rank_pattern` and `lora_alpha` equal to that rank through `alpha_pattern`,
so PEFT's scaling alpha/r is exactly 1 and ΔW = lora_B @ lora_A is the truncation itself. Pattern keys are the full
module names with their dots escaped: PEFT (≥ 0.15) matches them as regular expressions anchored at a dot.
"""

import json
import re
from collections import Counter
from pathlib import Path

import torch

from . import __version__
from .adapter import CONFIG_NAME, PREFIX
from .safetensors_format import SafetensorsWriter

WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_config(ranks: dict, base_model: str | None) -> dict:
    """The adapter_config.json of a LoRA with these per-module ranks (module name -> r ≥ 1), scaling 1 each."""
    counts = Counter(ranks.values())
    default = max(counts, key=lambda r: (counts[r], r))  # the most common rank (the larger on a tie)
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
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def write_adapter(folder, factors: dict, *, base_model: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write `folder`/adapter_config.json and adapter_model.safetensors for {module name: (A (k, n), B (m, k))}
    in the nn.Linear orientation (ΔW = B @ A, stored as the base's (out, in) weight). Modules of rank 0 are left out."""
    factors = {m: ab for m, ab in factors.items() if ab[0].shape[0] > 0}
    if not factors:
        raise ValueError("no module has a nonzero rank: there is nothing to write")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = []
    for module in sorted(factors):
        a, b = factors[module]
        tensors.append((f"{PREFIX}{module}.lora_A.weight", a.to(dtype).contiguous()))
        tensors.append((f"{PREFIX}{module}.lora_B.weight", b.to(dtype).contiguous()))
    metadata = {"format": "pt", "loratv_version": __version__, "loratv_operation": "to-lora"}
    writer = SafetensorsWriter(folder / WEIGHTS_NAME, [(n, tuple(t.shape)) for n, t in tensors], metadata)
    for name, tensor in tensors:
        writer.add(name, tensor)
    writer.close()
    config = adapter_config({m: ab[0].shape[0] for m, ab in factors.items()}, base_model)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder
