#!/usr/bin/env python
"""Benchmark `loratv merge` of HRA and BOFT against a LoRA merge, on a StarCoder2-3B-shaped base.

    python benchmarks/bench_peft_backed.py --workdir /tmp/loratv-bench-peft                # 30 layers, ~12.1 GB
    python benchmarks/bench_peft_backed.py --workdir /tmp/loratv-bench-peft --layers 2     # quick check

One run:
  1. writes a random fp32 StarCoder2-3B-shaped base and an r=16 LoRA adapter on q/k/v/o_proj (make_starcoder2_3b.py),
     an HRA adapter (r=8) and a BOFT adapter (block size 32, one butterfly factor) on the same modules, their
     tensors laid out by PEFT itself (get_peft_model on one layer of the real shapes) and filled with seeded values;
  2. times, each in a fresh subprocess after `sync` and dropping the page cache (when permitted), `--repeat` times
     interleaved, keeping the fastest: `cp -r BASE COPY` (the I/O floor), `loratv merge` of the LoRA, HRA and BOFT
     adapters, and of HRA again with --peft-arithmetic (PEFT's own program, PEFT's bits), recording wall seconds
     (+ the `sync` after) and peak RSS as bench_merge_extract.py does;
  3. checks, untimed (--no-verify skips), layer 0's q_proj and k_proj: BOFT's and `hra_peft`'s bit for bit against
     PEFT's merge of that module; HRA's default (the compact WY form in float64, rounded once) and PEFT's merge
     against the product of the reflections in float64, as the largest error in half-ulps of the output;
     with --with-peft, also times PEFT itself (peft_merge_reference.py: transformers load, merge_and_unload,
     save_pretrained) on each adapter and compares the whole outputs tensor by tensor;
  4. prints a Markdown report (ratios against the LoRA merge measured in the same run) and writes results.json.

Goal (issue 17): a BOFT or HRA merge within 2× the LoRA merge's time, peak RSS < 2 GB.
"""

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

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
from make_starcoder2_3b import HIDDEN, KV_DIM, LORA_TARGETS, config_json, make_adapter, make_model  # noqa: E402

TUNERS = {"HRA": {"r": 8}, "BOFT": {"boft_block_size": 32, "boft_n_butterfly_factor": 1}}
OUT_FEATURES = {"q_proj": HIDDEN, "k_proj": KV_DIM, "v_proj": KV_DIM, "o_proj": HIDDEN}
GOALS = {"time_vs_lora_max": 2.0, "rss_max_mb": 2000.0}


def one_layer_state(tuner: str) -> dict:
    """PEFT's adapter tensors for one layer's q/k/v/o_proj (names under model.layers.0), seeded random values."""
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import get_peft_model_state_dict
    from torch import nn

    root = nn.Module()
    attn = nn.Module()
    root.add_module("model", nn.Module())
    root.model.add_module("layers", nn.ModuleList([nn.Module()]))
    root.model.layers[0].add_module("self_attn", attn)
    for name, out in OUT_FEATURES.items():
        layer = nn.Linear(HIDDEN, out, device="meta")
        layer.weight = nn.Parameter(torch.zeros(1).expand(out, HIDDEN), requires_grad=False)
        layer.bias = nn.Parameter(torch.zeros(1).expand(out), requires_grad=False)
        attn.add_module(name, layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = PEFT_TYPE_TO_CONFIG_MAPPING[tuner](target_modules=list(LORA_TARGETS), **TUNERS[tuner])
        model = get_peft_model(root, config)
    state = get_peft_model_state_dict(model)
    return state, config.to_dict()


def make_tuner_adapter(tuner: str, out: Path, base: Path, layers: int, seed: int) -> dict:
    state, config = one_layer_state(tuner)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for key, value in state.items():
            if value.is_floating_point():
                tensors[key.replace("layers.0.", f"layers.{layer}.")] = 0.02 * torch.randn(value.shape, generator=gen)
            else:
                tensors[key.replace("layers.0.", f"layers.{layer}.")] = value.clone()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config.update(peft_type=tuner, base_model_name_or_path=str(base), task_type=None)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
    return {"tensors": len(tensors), "params": sum(t.numel() for t in tensors.values())}


def verify(tuner: str, base: Path, adapter: Path, merged: Path, exact: bool = False) -> dict:
    """One module (layer 0's q_proj and k_proj) merged by PEFT itself, against loratv's output: True when bit for
    bit; with `exact` (HRA), the largest error of loratv's and of PEFT's merge instead, in half-ulps of their value,
    against the float64 product of the module's reflections."""
    from torch import nn

    from loratv.adapters.peft_backed import peft_merged_module

    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"] \
        if (base / "model.safetensors.index.json").exists() else None
    merged_index = json.loads((merged / "model.safetensors.index.json").read_text())["weight_map"] \
        if (merged / "model.safetensors.index.json").exists() else None

    def read(folder, idx, name):
        with safe_open(str(folder / (idx[name] if idx else "model.safetensors")), "pt") as f:
            return f.get_tensor(name)

    checked = {}
    for leaf in ("q_proj", "k_proj"):
        module = f"model.layers.0.self_attn.{leaf}"
        layers = {}
        for layer_index in range(config_layers(base)):
            for name, out in OUT_FEATURES.items():
                layers[f"model.layers.{layer_index}.self_attn.{name}"] = nn.Linear(HIDDEN, out, device="meta")
        real = nn.Linear(HIDDEN, OUT_FEATURES[leaf])
        with torch.no_grad():
            real.weight.copy_(read(base, index, f"{module}.weight"))
            real.bias.copy_(read(base, index, f"{module}.bias"))
        got = read(merged, merged_index, f"{module}.weight")
        truth = hra_exact(real.weight.detach(), tensors[f"base_model.model.{module}.hra_u"]) if exact else None
        layers[module] = real
        want = peft_merged_module(config, layers, module, tensors)
        if truth is not None:
            checked[module] = {"loratv_half_ulps": round(half_ulps(got, truth), 3),
                               "peft_half_ulps": round(half_ulps(want["weight"], truth), 3)}
        else:
            checked[module] = bool(torch.equal(got, want["weight"]))
    return checked


def hra_exact(weight: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """W·H₁⋯H_r in float64, the reflections applied one at a time (an evaluation independent of the WY form)."""
    w = weight.double()
    for i in range(u.shape[1]):
        unit = u[:, i].double() / u[:, i].double().norm()
        w = w - 2 * torch.outer(w @ unit, unit)
    return w


def half_ulps(got: torch.Tensor, exact: torch.Tensor) -> float:
    """max |got − exact| / (½ ulp(got)) for a float32 tensor."""
    spacing = (torch.nextafter(got.abs(), torch.tensor(float("inf"))) - got.abs()).double()
    return float(((got.double() - exact).abs() / (0.5 * spacing)).max())


def config_layers(base: Path) -> int:
    return json.loads((base / "config.json").read_text())["num_hidden_layers"]


def report(results: dict) -> str:
    best = results["best"]
    lora = best["merge_lora"]
    lines = [
        f"StarCoder2-3B-shaped base, {results['layers']} layers, fp32; fastest of {results['repeat']} run(s).",
        "",
        "| step | wall + sync (s) | × LoRA merge | peak RSS (MB) | goal |",
        "|---|---|---|---|---|",
    ]
    for name, row in best.items():
        ratio = row["total_s"] / lora["total_s"]
        goal = ""
        if name in ("merge_hra", "merge_boft", "merge_hra_peft"):
            ok = ratio <= GOALS["time_vs_lora_max"] and row["peak_rss_mb"] < GOALS["rss_max_mb"]
            goal = f"≤ {GOALS['time_vs_lora_max']}×, < {GOALS['rss_max_mb']:.0f} MB: {'met' if ok else 'MISSED'}"
        lines.append(f"| {name} | {row['total_s']:.1f} | {ratio:.2f} | {row['peak_rss_mb']:.0f} | {goal} |")
    for name in ("lora", "hra", "boft"):
        if f"peft_{name}" in best:
            speed = best[f"peft_{name}"]["total_s"] / best[f"merge_{name}"]["total_s"]
            lines.append(f"\nPEFT's own merge of the {name.upper()} adapter / loratv merge: {speed:.2f}×")
    if results.get("verified"):
        lines += ["", "checks (BOFT, hra_peft: bit-identical to PEFT's merge of the module; HRA: loratv's and PEFT's "
                  f"largest error in half-ulps against the float64 product): {json.dumps(results['verified'])}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="scratch folder outside the repository (tens of GB)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--snapshot", help="run loratv from `git archive` of this commit (e.g. HEAD)")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--with-peft", action="store_true", help="also time PEFT's own merge (needs ~2× the model in RAM)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = ap.parse_args(argv)
    wd, logdir = prepare_workdir(ap, args.workdir)
    loratv, env, commit = loratv_runner(wd, args.snapshot)
    base = wd / "base"
    adapters = {"lora": wd / "adapter-lora", "hra": wd / "adapter-hra", "boft": wd / "adapter-boft"}
    if not (base / "config.json").exists() or config_layers(base) != args.layers:
        rmtree(base)
        make_model(base, args.layers, seed=0)
    assert json.loads((base / "config.json").read_text()) == config_json(args.layers)
    rmtree(adapters["lora"])
    make_adapter(adapters["lora"], base, args.layers, seed=0)
    for tuner in ("HRA", "BOFT"):
        rmtree(adapters[tuner.lower()])
        make_tuner_adapter(tuner, adapters[tuner.lower()], base, args.layers, seed=1)

    # timed merges: name -> (adapter folder, extra flags)
    merges = {**{name: (folder, []) for name, folder in adapters.items()},
              "hra_peft": (adapters["hra"], ["--peft-arithmetic"])}
    runs: dict = {}
    verified = {}
    for attempt in range(args.repeat):
        copy = wd / "copy"
        rmtree(copy)
        runs.setdefault("cp_floor", []).append(measure("cp_floor", ["cp", "-r", base, copy], logdir))
        rmtree(copy)
        for name, (adapter, flags) in merges.items():
            out = wd / f"merged-{name}"
            rmtree(out)
            step = measure(f"merge_{name}", [*loratv, "merge", "--base", base, "--adapter", adapter, "-o", out,
                                             "--quiet", *flags], logdir, env=env)
            if step["rc"] != 0:
                print(step["output_tail"], file=sys.stderr)
                return 1
            runs.setdefault(f"merge_{name}", []).append(step)
            if attempt == 0 and name != "lora" and not args.no_verify:
                verified[name] = verify(name.split("_")[0].upper(), base, adapter, out, exact=name == "hra")
            if args.with_peft and name in adapters:
                peft_out = wd / f"peft-{name}"
                rmtree(peft_out)
                step = measure(f"peft_{name}", [sys.executable, HERE / "peft_merge_reference.py", "--base", base,
                                                "--adapter", adapter, "-o", peft_out], logdir, env=env)
                runs.setdefault(f"peft_{name}", []).append(step)
                if attempt == 0 and step["rc"] == 0 and not args.no_verify:
                    verified[f"{name} whole model vs PEFT"] = compare_merges(out, peft_out, base)
                rmtree(peft_out)
            rmtree(out)
    best = {name: min(rows, key=lambda r: r["total_s"]) for name, rows in runs.items()}
    results = {"layers": args.layers, "repeat": args.repeat, "snapshot": commit, "best": best, "runs": runs,
               "verified": verified, "machine": machine_info(wd, loratv)}
    (wd / "results.json").write_text(json.dumps(results, indent=2, default=str))
    text = report(results)
    (wd / "results.md").write_text(text + "\n")
    print(text)
    if not args.keep:
        for path in (base, *adapters.values()):
            rmtree(path)
    shutil.rmtree(wd / "loratv-src", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
