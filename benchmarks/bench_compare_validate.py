#!/usr/bin/env python
"""Benchmark `loratv compare` and `loratv validate` on a StarCoder2-3B-shaped checkpoint against their I/O floors.

    python benchmarks/bench_compare_validate.py --workdir /tmp/loratv-bench-compare --repeat 3 --snapshot HEAD
    python benchmarks/bench_compare_validate.py --workdir /tmp/loratv-bench-compare --layers 2   # quick check

One run:
  1. writes the random fp32 StarCoder2-3B-shaped base and its r=16 q/k/v/o adapter (make_starcoder2_3b.py), merges
     it with loratv (fp32) and extracts the task vector: the inputs of compare (untimed);
  2. times, each in a fresh subprocess after `sync` and dropping the page cache (when permitted), with the same
     measurement as bench_merge_extract.py (wall + sync after, peak RSS of the process tree, CPU, block I/O):
       read_all.py BASE TV ADAPTER              compare's floor: read its inputs (base, task vector, adapter) once
       loratv compare --task-vector TV          (writes the JSON, the text report, lora_deltas and the four plots)
       read_all.py BASE MERGED ADAPTER          the floor of compare with --finetuned
       loratv compare --finetuned MERGED        (the task vector computed on the fly)
       cp -r BASE COPY                          validate's reference: copy the base once
       loratv validate                          merge + extract + compare + report, end to end
     with --repeat N the steps run N times, interleaved; the report takes the fastest run of each and the median;
  3. checks every verdict (EQUIVALENT (certified), 120 shared, 363 unchanged) and prints a Markdown report; writes
     results.json and results.md to --workdir.

Disk: at most base + merged + task vector + copy or validate output (about 41 GB for 30 layers). Everything generated
is deleted at the end unless --keep.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_merge_extract import (  # noqa: E402  (shared measurement code)
    dir_bytes,
    log,
    loratv_runner,
    machine_info,
    measure,
    prepare_workdir,
    rmtree,
    summarize,
)

TARGETS = {"compare_vs_read_max": 1.3, "compare_rss_max_mb": 1500.0, "validate_vs_copy_max": 3.0}
STEPS = ["read_tv_inputs", "compare_tv", "read_live_inputs", "compare_live", "cp", "validate"]
LABELS = {
    "read_tv_inputs": "read BASE + TV + ADAPTER once (compare floor)",
    "compare_tv": "`loratv compare --task-vector TV`",
    "read_live_inputs": "read BASE + MERGED + ADAPTER once (floor with --finetuned)",
    "compare_live": "`loratv compare --finetuned MERGED`",
    "cp": "`cp -r BASE COPY` (validate reference)",
    "validate": "`loratv validate` (merge + extract + compare + report)",
}


def verdict_of(folder: Path) -> dict:
    record = json.loads((folder / "comparison_results.json").read_text())
    s = record["summary"]
    return {"verdict": s["verdict"], "shared": s["counts"]["shared"], "unchanged": s["counts"]["unchanged"],
            "tv-only": s["counts"]["tv-only"], "max_certificate_ratio": s["max_certificate_ratio"],
            "global_cosine": s["global_cosine"], "files": sorted(p.name for p in folder.iterdir())}


def ratio(a, b):
    return None if not a or not b else a / b


def report(results: dict) -> str:
    s = results["steps"]
    lines = [
        f"# compare / validate benchmark ({results['model']['layers']} layers, {results['model']['bytes'] / 1e9:.2f} GB fp32 base)",
        "",
        "| step | wall + sync s (fastest) | median s | all runs s | peak RSS MB | CPU user + sys s | disk read GB | disk write GB |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for name in STEPS:
        r = s.get(name)
        if not r:
            continue
        lines.append(
            f"| {LABELS[name]} | {r['min_total_s']:.1f} | {r['median_total_s']:.1f} | "
            f"{', '.join(f'{x:.1f}' for x in r['all_total_s'])} | {r['peak_rss_mb']:.0f} | "
            f"{r['user_s'] + r['sys_s']:.1f} | {r['disk_read_gb']:.2f} | {r['disk_write_gb']:.2f} |"
        )
    checks = [
        ("compare --task-vector / read its inputs", "compare_tv", "read_tv_inputs", TARGETS["compare_vs_read_max"]),
        ("compare --finetuned / read its inputs", "compare_live", "read_live_inputs", TARGETS["compare_vs_read_max"]),
        ("validate / cp -r BASE", "validate", "cp", TARGETS["validate_vs_copy_max"]),
    ]
    lines += ["", "| check | fastest runs | median runs | target | met |", "|---|---:|---:|---:|:---:|"]
    for label, a, b, target in checks:
        if a in s and b in s:
            fast = ratio(s[a]["min_total_s"], s[b]["min_total_s"])
            med = ratio(s[a]["median_total_s"], s[b]["median_total_s"])
            lines.append(f"| {label} | {fast:.2f}× | {med:.2f}× | ≤ {target}× | {'yes' if fast <= target else '**no**'} |")
    for name in ("compare_tv", "compare_live", "validate"):
        if name in s:
            rss = s[name]["peak_rss_mb"]
            lines.append(f"| {name} peak RSS | {rss:.0f} MB | | < 1.5 GB | {'yes' if rss < TARGETS['compare_rss_max_mb'] else '**no**'} |")
    lines += ["", "Verdicts: " + json.dumps(results["verify"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratv-bench-compare"))
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (30 = StarCoder2-3B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="run the timed steps N times, interleaved")
    ap.add_argument("--snapshot", metavar="REV", help="run loratv from a git archive of src/ at REV (e.g. HEAD)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    ap.add_argument("--timeout", type=float, default=3600, help="per-step timeout in seconds")
    args = ap.parse_args(argv)

    wd, logdir = prepare_workdir(ap, args.workdir)
    base, adapter, merged, tv = wd / "base", wd / "adapter", wd / "merged", wd / "task-vector"
    copy, cmp_tv, cmp_live, val = wd / "copy", wd / "cmp-tv", wd / "cmp-live", wd / "validate"

    loratv, env, commit = loratv_runner(wd, args.snapshot)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(wd, loratv),
               "snapshot": commit, "args": {k: str(v) for k, v in vars(args).items()}, "verify": {}}
    try:
        for p in (base, adapter, merged, tv, copy, cmp_tv, cmp_live, val):
            rmtree(p)
        g = measure("generate", [sys.executable, HERE / "make_starcoder2_3b.py", "--out", base, "--adapter-out", adapter,
                                 "--layers", args.layers, "--seed", args.seed], logdir, drop=False, timeout=args.timeout)
        if g["rc"] != 0:
            raise SystemExit(f"generation failed:\n{g['output_tail']}")
        for name, cmd in (("setup_merge", ["merge", "--base", base, "--adapter", adapter, "-o", merged, "--quiet"]),
                          ("setup_extract", ["extract", "--base", base, "--finetuned", merged, "-o", tv, "--quiet"])):
            r = measure(name, loratv + cmd, logdir, env=env, drop=False, timeout=args.timeout)
            if r["rc"] != 0:
                raise SystemExit(f"{name} failed:\n{r['output_tail']}")
        results["model"] = {"layers": args.layers, "bytes": dir_bytes(base), "task_vector_bytes": dir_bytes(tv),
                            "adapter_bytes": dir_bytes(adapter)}

        runs = {k: [] for k in STEPS}
        for rep in range(1, args.repeat + 1):
            tag = f"-{rep}" if args.repeat > 1 else ""
            for p in (copy, cmp_tv, cmp_live, val):
                rmtree(p)
            runs["read_tv_inputs"].append(measure("read_tv_inputs" + tag, [sys.executable, HERE / "read_all.py", base, tv, adapter], logdir))
            runs["compare_tv"].append(measure("compare_tv" + tag, loratv + ["compare", "--base", base, "--adapter", adapter,
                                              "--task-vector", tv, "-o", cmp_tv, "--quiet"], logdir, env=env, timeout=args.timeout))
            runs["read_live_inputs"].append(measure("read_live_inputs" + tag, [sys.executable, HERE / "read_all.py", base, merged, adapter], logdir))
            runs["compare_live"].append(measure("compare_live" + tag, loratv + ["compare", "--base", base, "--adapter", adapter,
                                                "--finetuned", merged, "-o", cmp_live, "--quiet"], logdir, env=env, timeout=args.timeout))
            runs["cp"].append(measure("cp" + tag, ["cp", "-r", base, copy], logdir, timeout=args.timeout))
            rmtree(copy)
            runs["validate"].append(measure("validate" + tag, loratv + ["validate", "--base", base, "--adapter", adapter,
                                            "-o", val, "--quiet"], logdir, env=env, timeout=args.timeout))
            if rep == 1:
                for name, folder in (("compare_tv", cmp_tv), ("compare_live", cmp_live), ("validate", val)):
                    try:
                        results["verify"][name] = verdict_of(folder)
                    except (OSError, ValueError, KeyError) as exc:
                        results["verify"][name] = f"unreadable: {exc!r}"
            rmtree(val)
        results["runs"] = runs
        results["steps"] = {k: summarize(v) for k, v in runs.items() if v}
        text = report(results)
        (wd / "results.md").write_text(text)
        (wd / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print(text)
        log(f"wrote {wd / 'results.md'} and {wd / 'results.json'}")
        failed = [k for k, v in results["steps"].items() if v["rc"] != 0]
        return 1 if failed else 0
    finally:
        if not args.keep:
            for p in (base, adapter, merged, tv, copy, cmp_tv, cmp_live, val):
                rmtree(p)


if __name__ == "__main__":
    sys.exit(main())
