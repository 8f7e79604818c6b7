#!/usr/bin/env python
"""Benchmark `--executor ray` against the local executor on StarCoder2-3B shapes (docs/scaling.md).

    python benchmarks/bench_scaling.py --workdir /tmp/loratv-bench-scaling                  # 12 GB model, 100 adapters
    python benchmarks/bench_scaling.py --workdir /tmp/loratv-bench-scaling --layers 2 --adapters 10   # quick check

One run:
  1. writes a synthetic StarCoder2-3B-shaped fp32 model and its rank-16 q/k/v/o adapter (make_starcoder2_3b.py), and
     --adapters more adapters of the same shape for similarity;
  2. for each executor — local; a Ray cluster of 1 CPU; of 2 CPUs (`ray start --head --num-cpus N`, joined with
     `--executor ray=auto`, as a real cluster is) — times `loratv merge --max-shard-size 1GB` (one Ray task per
     shard) and `loratv similarity` of the adapters, each in a fresh subprocess (page cache dropped where
     permitted), and samples the summed RSS of the Ray worker processes beside the driver's own;
  3. checks that every Ray output file equals the local one byte for byte;
  4. measures the Ray overheads on their own: connecting to the cluster, one empty task's round trip, and what a
     merge task spends opening its inputs (prepare_merge);
  5. prints a Markdown table and writes results.json.
"""

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_merge_extract import loratv_runner, machine_info, measure, prepare_workdir, rmtree  # noqa: E402
from make_starcoder2_3b import make_adapter, make_model  # noqa: E402

OVERHEADS = r"""
import json, sys, time
t0 = time.perf_counter()
from loratv.exec.executor import RayExecutor
executor = RayExecutor("auto")
connected = time.perf_counter() - t0
executor.map(abs, [(-1,)])  # warm: the workers start and import the task
t0 = time.perf_counter()
executor.map(abs, [(-i,) for i in range(200)])
per_task = (time.perf_counter() - t0) / 200
from loratv.ops.merge import prepare_merge
t0 = time.perf_counter()
prepare_merge(sys.argv[1], sys.argv[2])
prepare = time.perf_counter() - t0
print(json.dumps({"connect_s": connected, "empty_task_s": per_task, "open_inputs_s": prepare,
                  "workers": executor.workers}))
"""


class RayWorkerSampler(threading.Thread):
    """Every 0.1 s: the summed RSS of the Ray worker processes (`ray::…`), which are not the driver's children."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            total = 0
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if cmd.startswith("ray::") or "default_worker.py" in cmd:
                    total += proc.info["memory_info"].rss if proc.info["memory_info"] else 0
            self.peak = max(self.peak, total)
            self._halt.wait(0.1)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return round(self.peak / 1e6, 1)


def ray_cluster(cpus: int, env: dict, logdir: Path) -> None:
    subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
    out = subprocess.run(["ray", "start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false",
                          "--object-store-memory=200000000", "--disable-usage-stats"], env=env,
                         capture_output=True, text=True)
    (logdir / f"ray-start-{cpus}.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"ray start failed:\n{out.stdout}{out.stderr}")


def same_files(a: Path, b: Path) -> bool:
    """Every file byte for byte, except a JSON record's `command` (the command line, which names -o and
    --executor): the rest of the record must be equal, every number included."""
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    for n in names:
        if filecmp.cmp(a / n, b / n, shallow=False):
            continue
        if not n.endswith(".json"):
            return False
        left, right = json.loads((a / n).read_text()), json.loads((b / n).read_text())
        left.pop("command", None)
        right.pop("command", None)
        if left != right:
            return False
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="scratch folder outside the repository (~30 GB)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--shard-size", default="1GB", help="merge's --max-shard-size: one Ray task per shard")
    ap.add_argument("--snapshot", help="run loratv from `git archive` of this commit (e.g. HEAD)")
    ap.add_argument("--keep", action="store_true", help="keep the generated model and adapters")
    args = ap.parse_args(argv)
    if shutil.which("ray") is None:
        ap.error("the ray command is not installed: pip install 'loratv[ray]'")
    wd, logdir = prepare_workdir(ap, args.workdir)
    loratv, env, commit = loratv_runner(wd, args.snapshot)
    env = dict(env, RAY_USAGE_STATS_ENABLED="0")
    base, adapter = wd / "base", wd / "adapter"
    if not (base / "config.json").exists():
        make_model(base, args.layers, seed=0)
    if not (adapter / "adapter_model.safetensors").exists():
        make_adapter(adapter, base, args.layers, seed=1)
    adapters = [wd / f"adapter{i:03d}" for i in range(1, args.adapters + 1)]
    for i, folder in enumerate(adapters, start=1):
        if not (folder / "adapter_model.safetensors").exists():
            make_adapter(folder, Path("bigcode/starcoder2-3b"), args.layers, seed=2000 + i)
    listing = wd / "adapters.txt"
    listing.write_text("\n".join(str(a) for a in adapters) + "\n")

    runs, overheads = {}, {}
    for executor, cpus in (("local", None), ("ray-1", 1), ("ray-2", 2)):
        flags = [] if cpus is None else ["--executor", "ray=auto"]
        if cpus is not None:
            ray_cluster(cpus, env, logdir)
            probe = subprocess.run([sys.executable, "-c", OVERHEADS, base, adapter], env=env, capture_output=True,
                                   text=True)
            overheads[executor] = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else \
                {"error": probe.stderr[-800:]}
        for command, argv_ in (
            ("merge", ["merge", "--base", base, "--adapter", adapter, "--max-shard-size", args.shard_size]),
            ("similarity", ["similarity", "--list", listing, "--no-plots"]),
        ):
            out = wd / f"{command}-{executor}"
            rmtree(out)
            sampler = RayWorkerSampler()
            sampler.start()
            step = measure(f"{command}-{executor}", [*loratv, *argv_, "-o", out, "--quiet", *flags], logdir, env=env)
            step["ray_workers_peak_rss_mb"] = sampler.stop()
            if step["rc"] != 0:
                print(step["output_tail"], file=sys.stderr)
                return 1
            if cpus is not None:
                step["identical_to_local"] = same_files(wd / f"{command}-local", out)
                rmtree(out)
            runs[f"{command}-{executor}"] = step
        if cpus is not None:
            subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)
    shards = len(list((wd / "merge-local").glob("*.safetensors")))
    results = {"layers": args.layers, "adapters": len(adapters), "shard_size": args.shard_size, "shards": shards,
               "snapshot": commit, "runs": runs, "ray_overheads": overheads, "machine": machine_info(wd, loratv)}
    (wd / "results.json").write_text(json.dumps(results, indent=2))
    lines = ["| step | wall + sync (s) | × local | driver peak RSS (MB) | Ray workers' peak RSS (MB) | same files |",
             "|---|---:|---:|---:|---:|---|"]
    for name, row in runs.items():
        local = runs[name.split("-")[0] + "-local"]["total_s"]
        lines.append(f"| {name} | {row['total_s']:.2f} | {row['total_s'] / local:.2f} | {row['peak_rss_mb']:.0f} | "
                     f"{row['ray_workers_peak_rss_mb']:.0f} | {row.get('identical_to_local', '—')} |")
    lines += ["", f"merge: {shards} shards of at most {args.shard_size}; overheads: {json.dumps(overheads)}"]
    print("\n".join(lines))
    rmtree(wd / "merge-local")
    rmtree(wd / "similarity-local")
    if not args.keep:
        for folder in [base, adapter, *adapters]:
            rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
