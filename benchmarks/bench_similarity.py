#!/usr/bin/env python
"""Benchmark `loratv similarity` on StarCoder2-3B shapes: N rank-16 LoRA adapters on q/k/v/o_proj of 30 layers.

    python benchmarks/bench_similarity.py --workdir /tmp/loratv-bench-sim                 # 100 adapters, 3.6 GB
    python benchmarks/bench_similarity.py --workdir /tmp/loratv-bench-sim --adapters 10 --layers 2   # quick check

One run:
  1. writes N random adapters (make_starcoder2_3b.make_adapter, seeds 2001…; 36.5 MB each in fp32);
  2. times, each in a fresh subprocess after dropping the page cache (when permitted): reading every adapter once
     (read_all.py, the I/O floor); `loratv similarity` on all of them; and the dense approach published tools take
     (every ΔW materialised in float32, flattened and multiplied: a K×(m·n) matrix per module) on as many adapters
     as fit in --dense-budget-gb, on the first --dense-modules modules, extrapolated to N adapters (its Gram costs
     K²·m·n) and to all modules (by m·n);
  3. checks loratv's cosines on those adapters and modules against the dense ones;
  4. prints a Markdown report with ratios measured in the same run and writes results.json.

Goal (issue 19): at most 3× the time to read all adapters once, peak RSS ≤ 2 GB.
"""

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_merge_extract import loratv_runner, machine_info, measure, prepare_workdir, rmtree  # noqa: E402
from make_starcoder2_3b import make_adapter  # noqa: E402


def dense_reference(adapters: list[Path], modules: int, out: Path) -> None:
    """The dense approach on the first `modules` modules of these adapters: ΔW materialised, Gram of the flattened."""
    import torch
    from safetensors import safe_open

    handles = [safe_open(str(a / "adapter_model.safetensors"), "pt") for a in adapters]
    scales = [json.loads((a / "adapter_config.json").read_text()) for a in adapters]
    names = sorted(k[: -len(".lora_A.weight")] for k in handles[0].keys() if k.endswith(".lora_A.weight"))[:modules]
    started, grams = time.perf_counter(), {}
    for name in names:
        flat = torch.stack([(c["lora_alpha"] / c["r"]) * (h.get_tensor(f"{name}.lora_B.weight") @
                                                          h.get_tensor(f"{name}.lora_A.weight")).reshape(-1)
                            for h, c in zip(handles, scales, strict=True)])
        grams[name] = (flat.double() @ flat.double().T).tolist()
        shape = [handles[0].get_slice(f"{name}.lora_B.weight").get_shape()[0],
                 handles[0].get_slice(f"{name}.lora_A.weight").get_shape()[1]]
        grams[name] = {"gram": grams[name], "shape": shape}
    out.write_text(json.dumps({"seconds": time.perf_counter() - started, "modules": grams}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch folder outside the repository (~4 GB)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--dense-modules", type=int, default=4, help="modules the dense reference runs on")
    ap.add_argument("--dense-budget-gb", type=float, default=3.0, help="memory the dense reference may use")
    ap.add_argument("--snapshot", help="run loratv from `git archive` of this commit (e.g. HEAD)")
    ap.add_argument("--keep", action="store_true", help="keep the generated adapters")
    ap.add_argument("--dense-reference", nargs=3, metavar=("LIST", "MODULES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dense_reference:
        listing, modules, out = args.dense_reference
        dense_reference([Path(a) for a in json.loads(Path(listing).read_text())], int(modules), Path(out))
        return 0
    wd, logdir = prepare_workdir(ap, args.workdir)
    loratv, env, commit = loratv_runner(wd, args.snapshot)
    adapters = [wd / f"adapter{i:03d}" for i in range(1, args.adapters + 1)]
    for i, folder in enumerate(adapters, start=1):
        if not (folder / "adapter_model.safetensors").exists():
            make_adapter(folder, Path("bigcode/starcoder2-3b"), args.layers, seed=2000 + i)
    runs = {"read_all": measure("read_all", [sys.executable, HERE / "read_all.py", *adapters], logdir)}
    out = wd / "similarity"
    rmtree(out)
    listing = wd / "adapters.txt"
    listing.write_text("\n".join(str(a) for a in adapters) + "\n")
    step = measure("similarity", [*loratv, "similarity", "--list", listing, "-o", out, "--quiet"], logdir, env=env)
    if step["rc"] != 0:
        print(step["output_tail"], file=sys.stderr)
        return 1
    runs["similarity"] = step
    record = json.loads((out / "similarity.json").read_text())
    # the dense approach holds K float32 copies of the largest module (3072×3072: 37.7 MB each) at once
    fit = max(2, min(len(adapters), int(args.dense_budget_gb * 1e9 / (3072 * 3072 * 12))))  # float32 + float64 copies
    dense_list = wd / "dense_adapters.json"
    dense_list.write_text(json.dumps([str(a) for a in adapters[:fit]]))
    dense_out = wd / "dense.json"
    runs["dense"] = measure("dense", [sys.executable, __file__, "--workdir", wd, "--dense-reference", dense_list,
                                      args.dense_modules, dense_out], logdir)
    dense = json.loads(dense_out.read_text())
    # extrapolate: the Gram of K flattened deltas costs K²·m·n (and materialising them K·m·n·r); scale by K² and by
    # the modules' m·n
    measured_mn = sum(m["shape"][0] * m["shape"][1] for m in dense["modules"].values())
    all_mn = args.layers * (2 * 3072 * 3072 + 2 * 256 * 3072)
    extrapolated = dense["seconds"] * (len(adapters) / fit) ** 2 * all_mn / measured_mn
    worst = None
    # loratv's per-kind cosines sum over layers; compare module by module through one layer's per-layer matrix when
    # the dense modules are all in layer 0 (the first names sorted)
    layer0 = record["per_layer"]["cosine"][record["per_layer"]["layers"].index(0)] if 0 in \
        record["per_layer"]["layers"] else None
    if layer0 is not None and all(".layers.0." in n for n in dense["modules"]):
        total = [[sum(e["gram"][i][j] for e in dense["modules"].values()) for j in range(fit)] for i in range(fit)]
        worst = max(abs(layer0[i][j] - total[i][j] / (total[i][i] * total[j][j]) ** 0.5)
                    for i in range(fit) for j in range(fit))
    results = {"layers": args.layers, "adapters": len(adapters), "snapshot": commit, "runs": runs,
               "dense_adapters": fit, "dense_modules": len(dense["modules"]), "dense_seconds": dense["seconds"],
               "dense_seconds_extrapolated": extrapolated, "layer0_cosine_max_difference_vs_dense": worst,
               "machine": machine_info(wd, loratv)}
    (wd / "results.json").write_text(json.dumps(results, indent=2))
    floor = runs["read_all"]["total_s"]
    lines = ["| step | wall + sync (s) | × reading the adapters | peak RSS (MB) |", "|---|---:|---:|---:|"]
    for name, row in runs.items():
        lines.append(f"| {name} | {row['total_s']:.2f} | {row['total_s'] / floor:.1f} | {row['peak_rss_mb']:.0f} |")
    lines += ["", f"dense approach: {dense['seconds']:.1f} s for {fit} adapters on {len(dense['modules'])} modules; "
                  f"~{extrapolated:.0f} s extrapolated to {len(adapters)} adapters and all modules",
              f"layer-0 cosines, loratv vs dense (the dense modules' layer): largest difference "
              f"{'n/a' if worst is None else f'{worst:.2e}'}"]
    print("\n".join(lines))
    if not args.keep:
        for folder in adapters:
            rmtree(folder)
    rmtree(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
