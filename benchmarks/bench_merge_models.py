#!/usr/bin/env python
"""Benchmark `loratv merge-models` (task arithmetic and TIES) against `mergekit-yaml` on StarCoder2-3B shapes.

    python benchmarks/bench_merge_models.py --workdir /tmp/loratv-bench-mm               # 30 layers, ~48 GB of inputs
    python benchmarks/bench_merge_models.py --workdir /tmp/loratv-bench-mm --layers 2    # quick check

One run:
  1. writes a random fp32 StarCoder2-3B-shaped base and three "fine-tunes" of the same shapes (make_starcoder2_3b.py,
     other seeds: their task vectors are as large as the weights, which changes no cost);
  2. times, each in a fresh subprocess after `sync` and dropping the page cache (when permitted): the I/O floor
     (`cp -r BASE COPY`, reading and writing one model, plus read_all.py over the fine-tunes: every input read once
     and one output written once); `loratv merge-models` with task_arithmetic and TIES (density 0.5) on two and on
     three fine-tunes; mergekit 0.1.5 (`mergekit-yaml`, in its own virtual environment) on the two-input recipes;
  3. compares loratv's and mergekit's outputs tensor by tensor (both compute in fp32: `dtype: float32`);
  4. prints a Markdown report with ratios measured in the same run and writes results.json.

Goals (issue 18): task arithmetic within 1.3× of the I/O floor; TIES at most a quarter of mergekit's time; peak RSS
≤ 2.5 GB for both; the largest difference between the two tools' outputs (zero where both compute in fp32).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_merge_extract import (  # noqa: E402
    compare_merges,
    loratv_runner,
    machine_info,
    measure,
    prepare_workdir,
    rmtree,
)
from make_starcoder2_3b import config_json, make_model  # noqa: E402

MERGEKIT = "mergekit==0.1.5"
DEFAULT_MERGEKIT_VENV = Path.home() / ".cache" / "loratv" / "mergekit-0.1.5"
GOALS = {"task_arithmetic_vs_floor_max": 1.3, "ties_vs_mergekit_max": 0.25, "rss_max_mb": 2500.0}


def mergekit_python(venv: Path) -> Path:
    """mergekit's interpreter, its virtual environment created on first use (torch 2.13.0 first, then mergekit)."""
    python = venv / "bin" / "python"
    if python.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", MERGEKIT], check=True)
    return python


def recipe(method: str, base: Path, inputs: list) -> dict:
    weights = [0.6, 0.4, 0.3][: len(inputs)]
    params = [{"weight": w} if method == "task_arithmetic" else {"weight": w, "density": 0.5} for w in weights]
    return {"merge_method": method, "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(m), "parameters": p} for m, p in zip(inputs, params, strict=True)]}


def report(results: dict) -> str:
    best = results["best"]
    floor = {k: best["cp_floor"]["total_s"] + best[f"read_fts_{k}"]["total_s"] for k in (2, 3)}
    lines = [f"StarCoder2-3B-shaped fp32 models, {results['layers']} layers; one run per step, cold cache.", "",
             "| step | wall + sync (s) | × I/O floor (same inputs) | × mergekit | peak RSS (MB) |",
             "|---|---:|---:|---:|---:|"]
    for name, row in best.items():
        k = 3 if name.endswith("_3") else 2
        vs_floor = row["total_s"] / floor[k] if name.startswith("loratv") or name.startswith("mergekit") else None
        other = best.get(name.replace("loratv", "mergekit"))
        vs_mk = row["total_s"] / other["total_s"] if other and name.startswith("loratv") else None
        lines.append(f"| {name} | {row['total_s']:.1f} | {'' if vs_floor is None else f'{vs_floor:.2f}'} | "
                     f"{'' if vs_mk is None else f'{vs_mk:.2f}'} | {row['peak_rss_mb']:.0f} |")
    lines += ["", f"I/O floor: cp -r of one model + reading the fine-tunes: {floor[2]:.1f} s (2 inputs), "
                  f"{floor[3]:.1f} s (3 inputs)."]
    for name, check in results["compared"].items():
        lines.append(f"{name}: {check.get('bit_identical')} of {check.get('compared')} tensors bit-identical, "
                     f"max |diff| {check.get('max_abs_diff')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch folder outside the repository (~75 GB)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--snapshot", help="run loratv from `git archive` of this commit (e.g. HEAD)")
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_MERGEKIT_VENV)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args(argv)
    wd, logdir = prepare_workdir(ap, args.workdir)
    loratv, env, commit = loratv_runner(wd, args.snapshot)
    models = [wd / "base", wd / "ft1", wd / "ft2", wd / "ft3"]
    for seed, folder in enumerate(models):
        if not (folder / "config.json").exists() or json.loads((folder / "config.json").read_text()) != \
                config_json(args.layers):
            rmtree(folder)
            make_model(folder, args.layers, seed=seed)
    base, fts = models[0], models[1:]
    runs: dict = {}
    compared = {}
    copy = wd / "copy"
    rmtree(copy)
    runs["cp_floor"] = measure("cp_floor", ["cp", "-r", base, copy], logdir)
    rmtree(copy)
    for k in (2, 3):
        runs[f"read_fts_{k}"] = measure(f"read_fts_{k}", [sys.executable, HERE / "read_all.py", *fts[:k]], logdir)
    python = None if args.skip_mergekit else mergekit_python(args.mergekit_venv)
    mk_env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    mk_env.pop("PYTHONPATH", None)
    for method in ("task_arithmetic", "ties"):
        for k in (2, 3):
            config = wd / f"{method}_{k}.yml"
            config.write_text(yaml.safe_dump(recipe(method, base, fts[:k])))
            out = wd / f"loratv-{method}-{k}"
            rmtree(out)
            step = measure(f"loratv_{method}_{k}", [*loratv, "merge-models", config, "-o", out, "--quiet"], logdir,
                           env=env)
            if step["rc"] != 0:
                print(step["output_tail"], file=sys.stderr)
                return 1
            runs[f"loratv_{method}_{k}"] = step
            if k == 2 and python is not None:
                mk_out = wd / f"mergekit-{method}-{k}"
                rmtree(mk_out)
                step = measure(f"mergekit_{method}_{k}", [python, "-m", "mergekit.scripts.run_yaml", config, mk_out,
                                                          "--no-write-model-card", "--random-seed", "0"],
                               logdir, env=mk_env)
                runs[f"mergekit_{method}_{k}"] = step
                if step["rc"] == 0:
                    compared[f"{method} ({k} inputs): loratv vs mergekit"] = compare_merges(out, mk_out, base)
                rmtree(mk_out)
            rmtree(out)
    results = {"layers": args.layers, "snapshot": commit, "best": runs, "compared": compared,
               "machine": machine_info(wd, loratv)}
    (wd / "results.json").write_text(json.dumps(results, indent=2, default=str))
    text = report(results)
    (wd / "results.md").write_text(text + "\n")
    print(text)
    if not args.keep:
        for path in models:
            rmtree(path)
    shutil.rmtree(wd / "loratv-src", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
