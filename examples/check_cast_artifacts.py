#!/usr/bin/env python
"""Check, without loratv, which tensors of a merged model are the base merely cast to the merged dtype.

    python examples/check_cast_artifacts.py BASE_DIR ADAPTER_DIR MERGED_DIR

BASE_DIR and MERGED_DIR hold a single `model.safetensors` (this script loads both whole: it is meant for the
embedded example and small models; `loratv compare` does the same test streaming, on any size). ADAPTER_DIR holds
a PEFT `adapter_config.json` whose `target_modules` is a list. For every base tensor the adapter does not target it
prints whether the merged tensor equals the base cast to the merged tensor's dtype, bit for bit, and how many
elements differ from the base. Needs torch only (what `pip install -e .` installs): the safetensors files are read
by the dozen lines below, straight from the format's specification (an 8-byte little-endian header length, a JSON
header of dtype, shape and byte offsets, then the raw little-endian data), so the check shares no code with loratv.
"""

import json
import struct
import sys
from pathlib import Path

try:
    import torch
except ImportError:  # one line, not a traceback: the script's only dependency is missing
    sys.exit("check_cast_artifacts.py: needs torch; install it with `pip install torch` (or `pip install -e .`).")

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
          "BOOL": torch.bool}
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}


def load_file(path) -> dict:
    """Every tensor of a .safetensors file, by name (little-endian data, as the format prescribes)."""
    data = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + length:]
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = bytearray(body[begin:end])
        flat = torch.frombuffer(raw, dtype=DTYPES[info["dtype"]]) if raw else torch.empty(0, dtype=DTYPES[info["dtype"]])
        tensors[name] = flat.reshape(info["shape"])
    return tensors


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
