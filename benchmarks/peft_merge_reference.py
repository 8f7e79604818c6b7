#!/usr/bin/env python
"""The transformers + PEFT way to merge a LoRA adapter, used as the reference in bench_merge_extract.py.

    python benchmarks/peft_merge_reference.py --base BASE --adapter ADAPTER -o OUT

Loads the base in fp32, applies the adapter, merge_and_unload(), save_pretrained(OUT, max_shard_size="5GB").
Prints one JSON line with the seconds spent in each phase (import, load, peft, merge, save).
"""

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--max-shard-size", default="5GB")
    args = ap.parse_args(argv)

    phases = {}
    t = time.perf_counter()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    phases["import"] = time.perf_counter() - t

    t = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    except TypeError:  # transformers < 4.56 only knows torch_dtype
        model = AutoModelForCausalLM.from_pretrained(args.base, torch_dtype=torch.float32)
    phases["load_base"] = time.perf_counter() - t

    t = time.perf_counter()
    model = PeftModel.from_pretrained(model, args.adapter)
    phases["load_adapter"] = time.perf_counter() - t

    t = time.perf_counter()
    model = model.merge_and_unload()
    phases["merge"] = time.perf_counter() - t

    t = time.perf_counter()
    model.save_pretrained(args.out, max_shard_size=args.max_shard_size)
    phases["save"] = time.perf_counter() - t

    print(json.dumps({"peft_reference_phases_s": {k: round(v, 3) for k, v in phases.items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
