#!/usr/bin/env python
"""Check, without loratv, which tensors of a merged model are the base merely cast to the merged dtype.

    python examples/check_cast_artifacts.py BASE_DIR ADAPTER_DIR MERGED_DIR

BASE_DIR and MERGED_DIR hold a single `model.safetensors` (this script loads both whole: it is meant for the
embedded example and small models; `loratv compare` does the same test streaming, on any size). ADAPTER_DIR holds
a PEFT `adapter_config.json` whose `target_modules` is a list. For every base tensor the adapter does not target it
prints whether the merged tensor equals the base cast to the merged tensor's dtype, bit for bit, and how many
elements differ from the base. Needs torch and safetensors only.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}


def main(base_dir, adapter_dir, merged_dir) -> int:
    base = load_file(Path(base_dir) / "model.safetensors")
    merged = load_file(Path(merged_dir) / "model.safetensors")
    targets = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["target_modules"]
    targeted = {n for n in base if n.endswith(".weight") and n.split(".")[-2] in targets}
    rest = [n for n in base if n not in targeted]
    dtype = merged[rest[0]].dtype
    bits = INT_VIEW[dtype]
    cast = [n for n in rest if torch.equal(merged[n].view(bits), base[n].to(dtype).view(bits))]
    moved = sum(int((merged[n].double() != base[n].double()).sum()) for n in rest)
    elements = sum(base[n].numel() for n in rest)
    name = str(dtype).removeprefix("torch.")
    print(f"{len(cast)} of {len(rest)} untargeted tensors are the base cast to {name}, bit for bit")
    print(f"{moved:,} of {elements:,} of their elements differ from the base")
    return 0 if len(cast) == len(rest) else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
