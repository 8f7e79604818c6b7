#!/usr/bin/env python
"""Benchmark `loratv combine` on StarCoder2-3B shapes: ten rank-16 LoRA adapters on q/k/v/o_proj of 30 layers.

    python benchmarks/bench_combine.py --workdir /tmp/loratv-bench-combine              # 10 adapters, 30 layers
    python benchmarks/bench_combine.py --workdir /tmp/loratv-bench-combine --layers 2   # quick check

One run:
  1. writes N random adapters (make_starcoder2_3b.make_adapter, seeds 1…N; 37 MB each in fp32);
  2. times, each in a fresh subprocess after dropping the page cache (when permitted): reading every adapter once
     (read_all.py, the I/O floor); `loratv combine` exact (ranks concatenated: 16·N per module); `loratv combine
     --max-rank 16` (QR + SVD of the factors); and the dense approach a tool without factored algebra takes (each
     ΔW materialised in float32 and summed, then a truncated SVD of the m×n sum), on the first --dense-modules
     modules, extrapolated to all of them by their m·n·min(m, n);
  3. checks the recompressed adapter's dropped error against the dense SVD's on those modules (Eckart–Young: equal);
  4. prints a Markdown report with ratios measured in the same run and writes results.json.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_merge_extract import loratv_runner, machine_info, measure, prepare_workdir, rmtree  # noqa: E402
from make_starcoder2_3b import make_adapter  # noqa: E402


def weights_for(n: int) -> list[float]:
    return [round(1.0 / n * (1 + 0.5 * math.sin(i)), 4) for i in range(n)]


def dense_reference(adapters: list[Path], weights: list[float], modules: int, rank: int, out: Path) -> None:
    """The dense approach on the first `modules` modules: ΔW summed in float32, then a truncated SVD (float32)."""
    import torch
    from safetensors.torch import load_file

    states = [load_file(str(a / "adapter_model.safetensors")) for a in adapters]
    configs = [json.loads((a / "adapter_config.json").read_text()) for a in adapters]
    names = sorted(k[: -len(".lora_A.weight")] for k in states[0] if k.endswith(".lora_A.weight"))[:modules]
    rows, started = [], time.perf_counter()
    for name in names:
        total = None
        for state, config, w in zip(states, configs, weights, strict=True):
            a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
            delta = (w * config["lora_alpha"] / config["r"]) * (b @ a)
            total = delta if total is None else total + delta
        s = torch.linalg.svdvals(total.double())
        rows.append({"module": name, "shape": list(total.shape),
                     "dropped_error": float(torch.linalg.vector_norm(s[rank:]))})
    out.write_text(json.dumps({"seconds": time.perf_counter() - started, "modules": rows}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch folder outside the repository")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--adapters", type=int, default=10)
    ap.add_argument("--dense-modules", type=int, default=8, help="modules the dense reference runs on")
    ap.add_argument("--snapshot", help="run loratv from `git archive` of this commit (e.g. HEAD)")
    ap.add_argument("--dense-reference", nargs=4, metavar=("LIST", "MODULES", "RANK", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dense_reference:
        listing, modules, rank, out = args.dense_reference
        spec = json.loads(Path(listing).read_text())
        dense_reference([Path(a) for a in spec["adapters"]], spec["weights"], int(modules), int(rank), Path(out))
        return 0
    wd, logdir = prepare_workdir(ap, args.workdir)
    loratv, env, commit = loratv_runner(wd, args.snapshot)
    adapters = [wd / f"adapter{i:03d}" for i in range(1, args.adapters + 1)]
    for i, folder in enumerate(adapters, start=1):
        if not (folder / "adapter_model.safetensors").exists():
            make_adapter(folder, Path("bigcode/starcoder2-3b"), args.layers, seed=1000 + i)
    weights = weights_for(len(adapters))
    listing = wd / "adapters.json"
    listing.write_text(json.dumps({"adapters": [str(a) for a in adapters], "weights": weights}))
    runs = {"read_all": measure("read_all", [sys.executable, HERE / "read_all.py", *adapters], logdir)}
    outputs = {"exact": [], "max_rank_16": ["--max-rank", "16"]}
    records = {}
    for label, extra in outputs.items():
        out = wd / f"combined-{label}"
        rmtree(out)
        step = measure(f"combine_{label}", [*loratv, "combine", *adapters, "--weights", *map(str, weights), "-o", out,
                                            "--quiet", *extra], logdir, env=env)
        if step["rc"] != 0:
            print(step["output_tail"], file=sys.stderr)
            return 1
        runs[f"combine_{label}"] = step
        records[label] = json.loads((out / "combine_fidelity.json").read_text())
        rmtree(out)
    dense_out = wd / "dense.json"
    runs["dense"] = measure("dense", [sys.executable, __file__, "--workdir", wd, "--dense-reference", listing,
                                      args.dense_modules, 16, dense_out], logdir)
    dense = json.loads(dense_out.read_text())
    ours = {m["module"]: m for m in records["max_rank_16"]["modules"]}

    def work(shape) -> float:  # a dense SVD of an m×n matrix costs ~ m·n·min(m, n)
        return shape[0] * shape[1] * min(shape[0], shape[1])

    all_work = sum(work(m["shape"]) for m in records["exact"]["modules"])
    measured_work = sum(work(r["shape"]) for r in dense["modules"])
    extrapolated = dense["seconds"] * all_work / measured_work if measured_work else None
    agreement = max(abs(ours[r["module"][len("base_model.model."):]]["dropped_error"] - r["dropped_error"]) /
                    max(r["dropped_error"], 1e-300) for r in dense["modules"])
    results = {"layers": args.layers, "adapters": len(adapters), "weights": weights, "snapshot": commit, "runs": runs,
               "dense_seconds_measured": dense["seconds"], "dense_modules": len(dense["modules"]),
               "dense_seconds_extrapolated": extrapolated, "dropped_error_max_relative_difference": agreement,
               "summaries": {k: r["summary"] for k, r in records.items()}, "machine": machine_info(wd, loratv)}
    (wd / "results.json").write_text(json.dumps(results, indent=2))
    floor = runs["read_all"]["total_s"]
    lines = ["| step | wall + sync (s) | × reading the adapters | peak RSS (MB) |", "|---|---:|---:|---:|"]
    for name, row in runs.items():
        lines.append(f"| {name} | {row['total_s']:.2f} | {row['total_s'] / floor:.1f} | {row['peak_rss_mb']:.0f} |")
    lines += ["", f"dense approach: {dense['seconds']:.1f} s on {len(dense['modules'])} modules, "
                  f"~{extrapolated:.0f} s extrapolated to all {len(records['exact']['modules'])}" if extrapolated else "",
              f"dropped error, loratv (factored) vs dense SVD: largest relative difference {agreement:.2e}",
              f"exact: rank {records['exact']['summary']['input_rank']} -> {records['exact']['summary']['rank']}, "
              f"stored error {records['exact']['summary']['relative_stored_error']:.2e} relative",
              f"max-rank 16: dropped {records['max_rank_16']['summary']['relative_dropped_error']:.3f} relative"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
