#!/usr/bin/env python
"""Read every byte of the *.safetensors files in the given folders once, sequentially, in 64 MiB reads.

This is the I/O floor for `loratv extract`, which has to read both checkpoints. Prints one JSON line.

    python benchmarks/read_all.py BASE_DIR FINETUNED_DIR
"""

import json
import sys
import time
from pathlib import Path

BLOCK = 64 * 1024 * 1024


def main(argv=None) -> int:
    dirs = [Path(d) for d in (argv if argv is not None else sys.argv[1:])]
    if not dirs:
        print(__doc__, file=sys.stderr)
        return 2
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    total, files = 0, 0
    t = time.perf_counter()
    for d in dirs:
        for path in sorted(d.glob("*.safetensors")):
            files += 1
            with open(path, "rb", buffering=0) as f:
                while True:
                    n = f.readinto(view)
                    if not n:
                        break
                    total += n
    dt = time.perf_counter() - t
    print(json.dumps({"files": files, "bytes": total, "seconds": round(dt, 3), "GB_per_s": round(total / 1e9 / dt, 3) if dt else None}))
    return 0 if files else 1


if __name__ == "__main__":
    sys.exit(main())
