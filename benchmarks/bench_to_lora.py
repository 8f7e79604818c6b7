#!/usr/bin/env python
"""Benchmark `loratv to-lora` against `mergekit-extract-lora` on a StarCoder2-3B-shaped base and a LoRA-merged fine-tune.

    python benchmarks/bench_to_lora.py --workdir /tmp/loratv-bench-tolora --snapshot HEAD          # full: 30 layers
    python benchmarks/bench_to_lora.py --workdir /tmp/loratv-bench-tolora-small --layers 2 --skip-loratv  # quick check

mergekit runs from its own virtual environment (it pins transformers/torch versions of its own). Unless
--mergekit-python names one, the script creates it at --mergekit-venv (default /tmp/venv-mergekit) when missing:

    python3 -m venv /tmp/venv-mergekit
    /tmp/venv-mergekit/bin/pip install torch==2.13.0        # first, so that pip keeps the CPU wheel (no CUDA torch)
    /tmp/venv-mergekit/bin/pip install mergekit==0.1.5

One run:
  1. writes the random fp32 StarCoder2-3B-shaped base and its r=16 q/k/v/o adapter (make_starcoder2_3b.py) and
     merges them with `loratv merge --precision fp32` into FINETUNED (untimed; --reuse keeps them from a --keep run);
  2. times, each in a fresh subprocess after `sync` and dropping the page cache (when permitted), with the
     measurement of bench_merge_extract.py (wall + sync after, peak RSS of the process tree, CPU, block I/O):
       mergekit-extract-lora --model FINETUNED --base-model BASE --out-path OUT --max-rank R --device cpu
       loratv to-lora --base BASE --finetuned FINETUNED -o OUT --rank R
     with R = the adapter's r (16) unless --rank; --repeat N runs both N times, interleaved (fastest run reported);
  3. evaluates every adapter independently of both tools (safetensors + torch float64, row chunks of one tensor at a
     time): for each base tensor T = FINETUNED - BASE against the ΔW the adapter encodes (PEFT semantics: B @ A
     scaled by alpha/r or alpha/sqrt(r), rank/alpha patterns, embeddings and fan_in_fan_out transposed, full
     tensors as stored - BASE, lora_B.bias as a bias delta). The original adapter is evaluated too: a sanity row
     whose error must be at rounding level;
  4. prints a Markdown report and writes results.json / results.md to --workdir.

Targets (issue): to-lora at least 10x faster than mergekit, at an error no larger than mergekit's, under 2 GB RSS.
Everything generated is deleted at the end unless --keep.
"""

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_merge_extract import (  # noqa: E402  (shared measurement code)
    dir_bytes,
    fmt,
    log,
    loratv_runner,
    machine_info,
    measure,
    prepare_workdir,
    ratio,
    rmtree,
    summarize,
)

TARGETS = {"speedup_min": 10.0, "rss_max_mb": 2000.0}
MERGEKIT_PINS = ["torch==2.13.0", "mergekit==0.1.5"]  # installed in this order, one pip call each
STEPS = ["mergekit", "loratv"]
LABELS = {
    "mergekit": "`mergekit-extract-lora`",
    "loratv": "`loratv to-lora`",
    "original": "original adapter (sanity: rounding level)",
}
PREFIX = "base_model.model."
CHUNK_ELEMS = 4 * 1024 * 1024  # rows per evaluation chunk: ~32 MB per float64 array


# -------------------------------------------------------------------------------------------------------- mergekit


def ensure_mergekit_venv(venv: Path) -> Path:
    """The venv's python, after creating the venv and installing MERGEKIT_PINS if its CLI is missing."""
    if not (venv / "bin" / "mergekit-extract-lora").exists():
        log(f"creating {venv} for mergekit: {', '.join(MERGEKIT_PINS)}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for pin in MERGEKIT_PINS:  # torch first: mergekit then finds its torch requirement met by the CPU wheel
            subprocess.run([str(venv / "bin" / "pip"), "install", pin], check=True)
    return venv / "bin" / "python"


def mergekit_command(python: Path) -> list:
    """The console script beside `python`, else the same entry point through `python -m`."""
    exe = python.parent / "mergekit-extract-lora"
    return [exe] if exe.exists() else [python, "-m", "mergekit.scripts.extract_lora"]


def mergekit_versions(python: Path) -> dict:
    code = ("import importlib.metadata as md, json, torch; print(json.dumps({p: md.version(p) for p in "
            "('mergekit', 'torch', 'transformers', 'safetensors')} | {'torch_cuda': torch.version.cuda}))")
    probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if probe.returncode != 0:
        raise SystemExit(f"cannot import mergekit with {python}:\n{probe.stderr[-1000:]}")
    return json.loads(probe.stdout)


def offline_env() -> dict:
    """mergekit's model card looks names up on the Hugging Face Hub; the benchmark must never touch the network."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return env


# ------------------------------------------------------------------------------------------------------ the inputs


def prepare_inputs(args, wd: Path, logdir: Path, loratv: list, env: dict) -> dict:
    """BASE and ADAPTER from make_starcoder2_3b.py and FINETUNED = their fp32 loratv merge (untimed), or the ones a
    --keep run left when --reuse is given and they were made with the same --layers/--seed."""
    base, adapter, finetuned, marker = wd / "base", wd / "adapter", wd / "finetuned", wd / "generated.json"
    want = {"layers": args.layers, "seed": args.seed, "generator": "make_starcoder2_3b.py", "finetuned": "loratv merge fp32"}
    if (args.reuse and marker.exists() and json.loads(marker.read_text()).get("want") == want
            and base.exists() and adapter.exists() and finetuned.exists()):
        log(f"reusing {base}, {adapter} and {finetuned}")
        return json.loads(marker.read_text())["info"]
    for p in (base, adapter, finetuned):
        rmtree(p)
    marker.unlink(missing_ok=True)
    g = measure("generate", [sys.executable, HERE / "make_starcoder2_3b.py", "--out", base, "--adapter-out", adapter,
                             "--layers", args.layers, "--seed", args.seed], logdir, drop=False, timeout=args.timeout)
    if g["rc"] != 0:
        raise SystemExit(f"generation failed:\n{g['output_tail']}")
    m = measure("setup_merge", loratv + ["merge", "--base", base, "--adapter", adapter, "-o", finetuned,
                                         "--precision", "fp32", "--quiet"], logdir, env=env, drop=False, timeout=args.timeout)
    if m["rc"] != 0:
        raise SystemExit(f"loratv merge failed:\n{m['output_tail']}")
    info = {"layers": args.layers, "base_bytes": dir_bytes(base), "finetuned_bytes": dir_bytes(finetuned),
            "adapter_bytes": dir_bytes(adapter)}
    marker.write_text(json.dumps({"want": want, "info": info}))
    return info


# ------------------------------------------------------------------------------------------------------ evaluation


class TensorFolder:
    """Read-only access to every tensor in folder/*.safetensors through safetensors' slices (rows on demand)."""

    def __init__(self, folder: Path, stack: ExitStack):
        from safetensors import safe_open

        self.where = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():
                self.where[name] = handle

    def shape(self, name: str) -> tuple:
        return tuple(self.where[name].get_slice(name).get_shape())

    def rows(self, name: str, a: int, b: int):
        """Rows a:b (the whole tensor when it is 0-d) as float64."""
        if not self.shape(name):
            return self.where[name].get_tensor(name).double()
        return self.where[name].get_slice(name)[a:b].double()

    def full(self, name: str):
        return self.where[name].get_tensor(name).double()


def pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the module name as a regex anchored at a dot."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict, module: str) -> tuple:
    """(configured rank, scaling) of one module: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    r = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


LORA_SUFFIXES = {  # key ending -> (factor, orientation): embeddings keep ΔW transposed, as PEFT's Embedding does
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}


class AdapterPlan:
    """What a PEFT adapter folder adds to each base tensor: LoRA factors, bias deltas, or full replacement values."""

    def __init__(self, folder: Path, stack: ExitStack):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "adapter_config.json").read_text())
        self.tensors = TensorFolder(self.folder, stack)
        self.lora, self.bias, self.full, self.unknown, self.notes = {}, {}, {}, [], []
        for key in self.tensors.where:
            self._classify(key)
        self._check_factors()

    def _classify(self, key: str) -> None:
        name = key.removeprefix(PREFIX)
        for suffix, (factor, kind) in LORA_SUFFIXES.items():
            if name.endswith(suffix):
                module = name.removesuffix(suffix)
                self.lora.setdefault(module, {"kind": kind})[factor] = key
                return
        if name.endswith(".lora_B.bias"):
            self.bias[name.removesuffix(".lora_B.bias")] = key
        elif "lora_" in name or "magnitude" in name:
            self.unknown.append(key)  # DoRA and other variants: not evaluated, reported
        else:  # modules_to_save or a stored full tensor: ΔW = stored - BASE
            self.full[name.replace(".modules_to_save.default", "")] = key

    def _check_factors(self) -> None:
        fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        for module, entry in list(self.lora.items()):
            if "A" not in entry or "B" not in entry:
                self.unknown.append(f"{module}: lora_A or lora_B missing")
                del self.lora[module]
                continue
            entry["rank"] = self.tensors.shape(entry["A"])[0]
            entry["configured_rank"], entry["scale"] = module_scale(self.config, module)
            entry["transpose"] = entry["kind"] == "embedding" or fan_in_fan_out
            if entry["configured_rank"] != entry["rank"]:
                self.notes.append(f"{module}: stored rank {entry['rank']} but adapter_config says {entry['configured_rank']}")
        if self.bias and not self.config.get("lora_bias"):
            self.notes.append(f"{len(self.bias)} lora_B.bias tensors but no `lora_bias: true` in adapter_config.json: PEFT "
                              "would not load them (they are evaluated here as the bias deltas they are meant to be)")

    def targets(self) -> set:
        """Names of the tensors this adapter changes."""
        return ({m + ".weight" for m in self.lora} | {m + ".bias" for m in self.bias if m in self.lora} | set(self.full))

    def delta(self, target: str, a: int, b: int, base_rows):
        """Rows a:b of the ΔW this adapter encodes for `target` (float64), or None when it leaves it alone;
        base_rows are the same rows of the base tensor the target stands for."""
        if target in self.full:  # modules_to_save replaces the whole tensor
            stored = self.tensors.rows(self.full[target], a, b) if base_rows.dim() else self.tensors.full(self.full[target])
            return stored - base_rows
        module, _, leaf = target.rpartition(".")
        entry = self.lora.get(module)
        if entry is None:
            return None
        if leaf == "bias":
            return self.tensors.rows(self.bias[module], a, b) * entry["scale"] if module in self.bias else None
        if leaf != "weight":
            return None
        if entry["transpose"]:  # ΔW = (B @ A)^T: rows of ΔW are columns of A
            A = self.tensors.full(entry["A"])[:, a:b]
            return (self.tensors.full(entry["B"]) @ A).T * entry["scale"]
        return (self.tensors.rows(entry["B"], a, b) @ self.tensors.full(entry["A"])) * entry["scale"]

    def summary(self) -> dict:
        ranks = Counter(e["rank"] for e in self.lora.values())
        params = sum(math.prod(self.tensors.shape(k)) for k in self.tensors.where)
        return {
            "lora_modules": len(self.lora),
            "embedding_lora_modules": sum(e["kind"] == "embedding" for e in self.lora.values()),
            "bias_deltas": len(self.bias),
            "full_tensors": sorted(self.full),
            "ranks": {str(r): n for r, n in sorted(ranks.items())},
            "rank_sum": sum(e["rank"] for e in self.lora.values()),
            "params": params,
            "adapter_bytes": dir_bytes(self.folder),
            "safetensors_bytes": sum(p.stat().st_size for p in self.folder.glob("*.safetensors")),
            "unknown_keys": self.unknown[:20],
            "config": {k: self.config.get(k) for k in ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "lora_bias",
                                                       "target_modules", "modules_to_save")}
                      | {"rank_pattern_entries": len(self.config.get("rank_pattern") or {}),
                         "alpha_pattern_entries": len(self.config.get("alpha_pattern") or {})},
            "notes": self.notes,
        }


def row_chunks(shape: tuple):
    """(a, b) row ranges of at most CHUNK_ELEMS elements each (one range for 0-d and 1-d tensors)."""
    if len(shape) < 2:
        yield 0, shape[0] if shape else 1
        return
    rows, cols = shape[0], math.prod(shape[1:])
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


def tied_embedding(base_dir: Path, base: TensorFolder):
    """The tensor lm_head.weight stands for when the base ties its embeddings and stores no lm_head, else None."""
    try:
        tied = json.loads((base_dir / "config.json").read_text()).get("tie_word_embeddings", True)
    except (OSError, ValueError):
        tied = False
    embed = next((n for n in base.where if n.endswith("embed_tokens.weight")), None)
    return embed if tied and "lm_head.weight" not in base.where else None


def compare_tensor(name: str, source: str, base: TensorFolder, ft: TensorFolder, plans: dict) -> dict:
    """‖T‖², and per adapter ‖T - ΔW‖², ‖ΔW‖² and whether it covers `name`, for T = FT[source] - BASE[source]."""
    out = {"t2": 0.0, "per": {label: {"e2": 0.0, "d2": 0.0, "covered": False, "error": None} for label in plans}}
    for a, b in row_chunks(base.shape(source)):
        w = base.rows(source, a, b)
        t = ft.rows(source, a, b) - w
        out["t2"] += float((t * t).sum())
        for label, plan in plans.items():
            acc = out["per"][label]
            try:
                d = plan.delta(name, a, b, w)
            except Exception as exc:  # a broken adapter is a finding, not a crash
                acc["error"] = repr(exc)[:300]
                d = None
            if d is not None and tuple(d.shape) != tuple(t.shape):
                acc["error"] = f"ΔW rows {tuple(d.shape)} vs T rows {tuple(t.shape)}"
                d = None
            if d is None:
                acc["e2"] += float((t * t).sum())
                continue
            acc["covered"] = True
            e = t - d
            acc["e2"] += float((e * e).sum())
            acc["d2"] += float((d * d).sum())
    return out


def evaluate_adapters(base_dir: Path, ft_dir: Path, adapters: dict) -> dict:
    """label -> reconstruction figures of each adapter folder, in one streaming pass over BASE and FINETUNED."""
    with ExitStack() as stack:
        base, ft = TensorFolder(base_dir, stack), TensorFolder(ft_dir, stack)
        plans = {label: AdapterPlan(folder, stack) for label, folder in adapters.items()}
        missing_in_ft = sorted(set(base.where) - set(ft.where))
        rows = {}
        for name in sorted(set(base.where) & set(ft.where)):
            rows[name] = compare_tensor(name, name, base, ft, plans)
        # adapter targets the base does not store: a tied lm_head stands for the embedding, anything else is unknown
        extra = {label: sorted(p.targets() - set(base.where)) for label, p in plans.items()}
        embed = tied_embedding(base_dir, base)
        extra_rows = {}
        if embed and any("lm_head.weight" in e for e in extra.values()):
            extra_rows["lm_head.weight"] = compare_tensor("lm_head.weight", embed, base, ft, plans)
        return {label: figures(label, plan, rows, extra_rows, extra[label], missing_in_ft, embed)
                for label, plan in plans.items()}


def figures(label: str, plan: AdapterPlan, rows: dict, extra_rows: dict, extra: list, missing_in_ft: list, embed) -> dict:
    """Overall and per-tensor relative errors of one adapter from compare_tensor's sums."""
    t2 = sum(r["t2"] for r in rows.values())
    e2 = sum(r["per"][label]["e2"] for r in rows.values())
    changed = [n for n, r in rows.items() if r["t2"] > 0]
    per_rel = {n: math.sqrt(rows[n]["per"][label]["e2"] / rows[n]["t2"]) for n in changed}
    worst = max(per_rel, key=per_rel.get) if per_rel else None
    spurious = {n: math.sqrt(r["per"][label]["d2"]) for n, r in rows.items() if r["t2"] == 0 and r["per"][label]["d2"] > 0}
    uncovered = [n for n in changed if not rows[n]["per"][label]["covered"]]
    res = {
        "tensors_compared": len(rows),
        "changed_tensors": len(changed),
        "covered_tensors": sum(r["per"][label]["covered"] for r in rows.values()),
        "relative_error": math.sqrt(e2 / t2) if t2 else None,
        "abs_error_fro": math.sqrt(e2),
        "task_vector_fro": math.sqrt(t2),
        "max_tensor_relative_error": per_rel[worst] if worst else None,
        "worst_tensor": worst,
        "uncovered_changed_tensors": len(uncovered),
        "uncovered_examples": uncovered[:10],
        "unchanged_tensors_given_nonzero_delta": len(spurious),
        "largest_spurious_delta_fro": max(spurious.values()) if spurious else 0.0,
        "tensors_missing_in_finetuned": missing_in_ft[:10],
        "errors": {n: r["per"][label]["error"] for n, r in rows.items() if r["per"][label]["error"]},
        "adapter": plan.summary(),
    }
    for name, r in extra_rows.items():
        if name in extra:
            acc = r["per"][label]
            rel = math.sqrt(acc["e2"] / r["t2"]) if r["t2"] else None
            res.setdefault("extra_targets", {})[name] = {"stands_for": embed, "relative_error": rel,
                                                         "abs_error_fro": math.sqrt(acc["e2"]), "delta_fro": math.sqrt(acc["d2"])}
    unknown = [n for n in extra if n not in extra_rows]
    if unknown:
        res["targets_not_in_base"] = unknown[:20]
    return res


# ---------------------------------------------------------------------------------------------------------- report


def sci(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def ranks_text(ranks: dict) -> str:
    return ", ".join(f"{r}×{n}" for r, n in ranks.items()) or "-"


def checks(results: dict) -> list:
    """The issue's three targets: speed-up over mergekit, error no larger than mergekit's, peak RSS."""
    s, ev = results["steps"], results.get("evaluation", {})
    ok = lambda k: k in s and s[k]["rc"] == 0  # noqa: E731
    speed = ratio(s["mergekit"]["total_s"], s["loratv"]["total_s"]) if ok("mergekit") and ok("loratv") else None
    speed_wall = ratio(s["mergekit"]["wall_s"], s["loratv"]["wall_s"]) if speed else None
    err_l = (ev.get("loratv") or {}).get("relative_error")
    err_m = (ev.get("mergekit") or {}).get("relative_error")
    rss = s["loratv"]["peak_rss_mb"] if ok("loratv") else None
    return [
        {"check": "mergekit / loratv, wall + sync (wall only)", "value": speed,
         "measured": "n/a" if speed is None else f"{speed:.1f}× ({speed_wall:.1f}×)",
         "target": f"≥ {TARGETS['speedup_min']:.0f}×", "met": None if speed is None else speed >= TARGETS["speedup_min"]},
        {"check": "loratv relative error vs mergekit's", "value": ratio(err_l, err_m),
         "measured": "n/a" if err_l is None or err_m is None else f"{sci(err_l)} vs {sci(err_m)}",
         "target": "≤ mergekit's", "met": None if err_l is None or err_m is None else err_l <= err_m},
        {"check": "loratv peak RSS", "value": rss, "measured": "n/a" if rss is None else f"{rss:.0f} MB",
         "target": f"< {TARGETS['rss_max_mb']:.0f} MB", "met": None if rss is None else rss < TARGETS["rss_max_mb"]},
    ]


def tool_row(label: str, step, ev) -> str:
    ev = ev or {}
    ad = ev.get("adapter", {})
    cols = [LABELS[label]]
    cols += ([fmt(step["wall_s"]), fmt(step["total_s"]), fmt(step["peak_rss_mb"], 0)] if step else ["-", "-", "-"])
    cols += [sci(ev.get("relative_error")), sci(ev.get("max_tensor_relative_error")),
             str(ev.get("uncovered_changed_tensors", "n/a")),
             fmt(ad["safetensors_bytes"] / 1e6) if ad else "n/a", ranks_text(ad.get("ranks", {})) if ad else "n/a",
             str(step["rc"]) if step else "-"]
    return "| " + " | ".join(cols) + " |"


def report(results: dict) -> str:
    m, mk, s, ev = results["machine"], results["mergekit_versions"], results["steps"], results.get("evaluation", {})
    info = results["model"]
    lines = [
        f"## to-lora vs mergekit-extract-lora ({info['layers']} layers, {info['base_bytes'] / 1e9:.2f} GB fp32 base, "
        f"max rank {results['rank']})",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']} GiB RAM, Linux {m['kernel']}, Python {m['python']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads); loratv: `{m['loratv_cmd']}` at {m['repo_git'] or '?'}; "
        f"mergekit {mk['mergekit']} (torch {mk['torch']}, transformers {mk['transformers']}) in `{results['mergekit_python']}`.",
        f"Page cache: {results['page_cache']}.",
        f"Command: `{results['command_line']}`",
        "",
        "| tool | wall s | wall + sync s | peak RSS MB | relative error | max per-tensor rel. error | changed tensors not covered "
        "| adapter MB | ranks (rank×modules) | rc |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for label in STEPS:
        if label in s or label in ev:
            lines.append(tool_row(label, s.get(label), ev.get(label)))
    if "original" in ev:
        lines.append(tool_row("original", None, ev["original"]))
    n = max((st.get("repetitions", 1) for st in s.values()), default=1)
    lines += [
        "",
        f"Timed figures: {'fastest of %d interleaved runs' % n if n > 1 else 'one run'}; peak RSS = largest of the process "
        "tree's summed VmRSS, any process's VmHWM and GNU time's max RSS (MB = 10^6 bytes). Relative error = "
        "sqrt(Σ‖T − ΔW‖²) / sqrt(Σ‖T‖²) over every base tensor, T = FINETUNED − BASE, in float64; per tensor the same "
        "over the changed tensors.",
        "",
        "| check | measured | target | met |",
        "|---|---:|---:|:---:|",
    ]
    for c in results["checks"]:
        lines.append(f"| {c['check']} | {c['measured']} | {c['target']} | {({True: 'yes', False: '**NO**', None: 'n/a'})[c['met']]} |")
    lines.append("")
    for label in STEPS:
        if label in s:
            lines.append(f"- {label}: `{s[label]['cmd']}`")
    for label, e in ev.items():
        ad = e.get("adapter", {})
        bits = [f"{e['covered_tensors']} of {e['tensors_compared']} base tensors covered ({e['changed_tensors']} changed)",
                f"{ad.get('lora_modules')} LoRA modules ({ad.get('embedding_lora_modules')} embedding), "
                f"{ad.get('bias_deltas')} bias deltas, {len(ad.get('full_tensors', []))} full tensors",
                f"worst tensor {e['worst_tensor']}"]
        if e["unchanged_tensors_given_nonzero_delta"]:
            bits.append(f"{e['unchanged_tensors_given_nonzero_delta']} unchanged tensors given a nonzero ΔW "
                        f"(largest ‖ΔW‖ {sci(e['largest_spurious_delta_fro'])})")
        for name, x in e.get("extra_targets", {}).items():
            err = (f"relative error {sci(x['relative_error'])}" if x["relative_error"] is not None
                   else f"unchanged, ‖ΔW‖ = {sci(x['delta_fro'])}")
            bits.append(f"also stores {name}, which the base ties to {x['stands_for']} ({err})")
        bits += ad.get("notes", []) + [f"error on {k}: {v}" for k, v in list(e["errors"].items())[:3]]
        if ad.get("unknown_keys"):
            bits.append(f"keys not evaluated: {ad['unknown_keys'][:5]}")
        lines.append(f"- {label} adapter: " + "; ".join(bits) + ".")
    fid = results.get("loratv_fidelity")
    if isinstance(fid, dict):
        scalars = {k: v for k, v in fid.items() if isinstance(v, (int, float, str, bool))}
        lines.append(f"- loratv's own to_lora_fidelity.json (top-level scalars): {json.dumps(scalars)}")
    for label, warnings in results.get("warnings", {}).items():
        lines.append(f"- {label} warnings: " + "; ".join(f"`{w}`" for w in warnings))
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def warnings_in(logfile: Path, limit: int = 10) -> list:
    """The distinct WARNING lines a tool logged (mergekit announces what it saves at full rank this way)."""
    try:
        text = Path(logfile).read_text(errors="replace")
    except OSError:
        return []
    lines = re.split(r"[\r\n]", text)  # progress bars redraw with \r: a warning may follow one on the same line
    found = dict.fromkeys(line[line.find("WARNING"):].strip() for line in lines if "WARNING" in line)
    return list(found)[:limit]


def page_cache_state(runs: dict) -> str:
    drops = [r["caches_dropped"] for lst in runs.values() for r in lst]
    if drops and all(drops):
        return "cold: dropped before every timed step"
    return "mixed: dropped before some steps only" if any(drops) else "warm: dropping the page cache was not permitted"


# -------------------------------------------------------------------------------------------------------------- main


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratv-bench-tolora"), help="data and results (default %(default)s)")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (30 = StarCoder2-3B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, help="max rank for both tools (default: the generated adapter's r, 16)")
    ap.add_argument("--repeat", type=int, default=1, help="run both tools N times, interleaved; the report takes the fastest")
    ap.add_argument("--snapshot", metavar="REV", help="run loratv from a git archive of src/ at REV (e.g. HEAD)")
    ap.add_argument("--loratv", help="command that runs loratv (default: `loratv` on PATH, else python -m loratv.cli)")
    ap.add_argument("--skip-loratv", action="store_true", help="time and evaluate mergekit only")
    ap.add_argument("--mergekit-venv", type=Path, default=Path("/tmp/venv-mergekit"),
                    help="virtual environment for mergekit, created with %s when missing" % " and ".join(MERGEKIT_PINS))
    ap.add_argument("--mergekit-python", type=Path, help="python of an existing mergekit environment (overrides --mergekit-venv)")
    ap.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-extract-lora, e.g. '--embed-lora'")
    ap.add_argument("--no-eval", action="store_true", help="skip the untimed reconstruction-error evaluation")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and adapters")
    ap.add_argument("--reuse", action="store_true", help="reuse BASE/ADAPTER/FINETUNED of a --keep run with the same --layers/--seed")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="per-step timeout in seconds")
    return ap, ap.parse_args(argv)


def timed_runs(args, paths: dict, rank: int, loratv: list, env: dict, mergekit: list, logdir: Path) -> dict:
    """Both tools, --repeat times interleaved, each output left in place for the evaluation."""
    base, ft = paths["base"], paths["finetuned"]
    runs = {k: [] for k in STEPS if not (k == "loratv" and args.skip_loratv)}
    for rep in range(1, args.repeat + 1):
        tag = f"-{rep}" if args.repeat > 1 else ""
        rmtree(paths["mergekit"])
        runs["mergekit"].append(measure("mergekit" + tag, mergekit + ["--model", ft, "--base-model", base, "--out-path",
                                        paths["mergekit"], "--max-rank", rank, "--device", "cpu"]
                                        + shlex.split(args.mergekit_args), logdir, env=offline_env(), timeout=args.timeout))
        if "loratv" in runs:
            rmtree(paths["loratv"])
            runs["loratv"].append(measure("loratv" + tag, loratv + ["to-lora", "--base", base, "--finetuned", ft, "-o",
                                          paths["loratv"], "--rank", rank], logdir, env=env, timeout=args.timeout))
    return runs


def main(argv=None) -> int:
    ap, args = parse_args(argv)
    if args.snapshot and args.loratv:
        ap.error("--snapshot and --loratv exclude each other")
    wd, logdir = prepare_workdir(ap, args.workdir)
    paths = {k: wd / k for k in ("base", "adapter", "finetuned", "mergekit", "loratv")}
    python = args.mergekit_python or ensure_mergekit_venv(args.mergekit_venv)
    mergekit = mergekit_command(python)
    loratv, env, commit = loratv_runner(wd, args.snapshot, args.loratv)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(wd, loratv), "snapshot": commit,
               "command_line": shlex.join(["python", *map(str, sys.argv)]), "mergekit_python": str(python),
               "mergekit_versions": mergekit_versions(python), "args": {k: str(v) for k, v in vars(args).items()},
               "notes": []}
    if commit:
        results["machine"]["repo_git"] = f"{commit[:7]} (snapshot of src/ via git archive)"
    if results["mergekit_versions"]["torch_cuda"]:
        results["notes"].append(f"mergekit's torch is a CUDA build ({results['mergekit_versions']['torch_cuda']}); it ran on --device cpu")
    if not args.skip_loratv:  # fail before mergekit's half hour, not after it
        probe = subprocess.run(loratv + ["to-lora", "--help"], capture_output=True, text=True, env=env)
        if probe.returncode != 0:
            ap.error(f"`{shlex.join(loratv)} to-lora --help` failed (use --skip-loratv to time mergekit alone):\n"
                     f"{(probe.stderr or probe.stdout)[-500:]}")
    try:
        results["model"] = prepare_inputs(args, wd, logdir, loratv, env)
        rank = args.rank or json.loads((paths["adapter"] / "adapter_config.json").read_text())["r"]
        results["rank"] = rank
        runs = timed_runs(args, paths, rank, loratv, env, mergekit, logdir)
        results["runs"] = runs
        results["steps"] = {k: summarize(v) for k, v in runs.items() if v}
        results["page_cache"] = page_cache_state(runs)
        results["warnings"] = {k: w for k, v in runs.items() if (w := warnings_in(v[-1]["log"]))}
        fidelity = paths["loratv"] / "to_lora_fidelity.json"
        if fidelity.exists():
            results["loratv_fidelity"] = json.loads(fidelity.read_text())
        if not args.no_eval:
            adapters = {k: paths[k] for k in STEPS if k in runs and runs[k][-1]["rc"] == 0}
            adapters["original"] = paths["adapter"]
            log(f"evaluating {', '.join(adapters)} against FINETUNED - BASE (untimed)")
            t0 = time.perf_counter()
            results["evaluation"] = evaluate_adapters(paths["base"], paths["finetuned"], adapters)
            log(f"evaluation took {time.perf_counter() - t0:.0f} s")
        results["checks"] = checks(results)
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        text = report(results)
        (wd / "results.json").write_text(json.dumps(results, indent=2, default=str))
        (wd / "results.md").write_text(text)
        print()
        print(text)
        log(f"wrote {wd / 'results.md'} and {wd / 'results.json'}")
        return 1 if any(st["rc"] != 0 for st in results["steps"].values()) else 0
    finally:
        if not args.keep:
            for p in (*paths.values(), wd / "loratv-src"):
                rmtree(p)
            (wd / "generated.json").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
