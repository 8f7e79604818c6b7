"""Describe a model or an adapter from headers alone: tensors and parameters per layer, module kind, dtype, shard."""

import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from .adapter import CONFIG_NAME, bind, load_adapter
from .checkpoint import Checkpoint, resolve_path

LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
KIND_RULES = [
    ("head", re.compile(r"(^|\.)(lm_head|embed_out|score|classifier)(\.|$)")),
    ("embedding", re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings)")),
    ("norm", re.compile(r"(norm|(^|\.)ln_|layernorm)")),
    ("attention", re.compile(r"(attn|attention|(^|\.)[qkvo]_proj\.|query|key|value)")),
    ("mlp", re.compile(r"(mlp|ffn|feed_forward|(^|\.)fc\d*\.|up_proj|down_proj|gate_proj|experts)")),
]


def module_kind(name: str) -> str:
    for kind, rule in KIND_RULES:
        if rule.search(name):
            return kind
    return "other"


def layer_of(name: str):
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def describe(source, base=None) -> dict:
    path = resolve_path(source)
    if (path if path.is_dir() else path.parent).joinpath(CONFIG_NAME).is_file():
        return describe_adapter(source, base)
    if path.is_file() and path.suffix == ".safetensors":
        from .kohya import is_lora_file

        if is_lora_file(path):  # a kohya / diffusers LoRA file
            return describe_adapter(source, base)
    return describe_model(source)


def describe_model(source) -> dict:
    ckpt = Checkpoint(source)
    layers = defaultdict(lambda: {"tensors": 0, "parameters": 0})
    kinds = defaultdict(lambda: {"tensors": 0, "parameters": 0})
    dtype_counts = Counter()
    shards = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    global_tensors = []
    for name, e in ckpt.entries.items():
        layer = layer_of(name)
        if layer is None:
            global_tensors.append(name)
        else:
            layers[layer]["tensors"] += 1
            layers[layer]["parameters"] += e.numel
        kind = module_kind(name)
        kinds[kind]["tensors"] += 1
        kinds[kind]["parameters"] += e.numel
        dtype_counts[e.dtype] += 1
        shards[e.file.name]["tensors"] += 1
        shards[e.file.name]["bytes"] += e.nbytes
    config = ckpt.config or {}
    per_layer = sorted({v["tensors"] for v in layers.values()})
    tied = bool(config.get("tie_word_embeddings", True)) and not any(
        n in ckpt for n in ("lm_head.weight", "embed_out.weight")
    )
    return {
        "kind": "model",
        "path": str(ckpt.path),
        "format": ckpt.format,
        "model_type": config.get("model_type"),
        "total_tensors": len(ckpt),
        "total_parameters": ckpt.total_parameters(),
        "layers": len(layers),
        "tensors_per_layer": per_layer[0] if len(per_layer) == 1 else per_layer,
        "global_tensors": global_tensors,
        "tied_embeddings": tied,
        "dtypes": dict(dtype_counts),
        "per_layer": {str(k): v for k, v in sorted(layers.items())},
        "per_kind": dict(kinds),
        "shards": dict(shards),
    }


def describe_adapter(source, base=None) -> dict:
    adapter = load_adapter(source)
    s = adapter.settings
    if base is None and s.base_model_name_or_path and Path(s.base_model_name_or_path).expanduser().is_dir():
        base = s.base_model_name_or_path  # the recorded base, when it is a local folder (never a download)
    base_ckpt = Checkpoint(base) if base is not None else None
    # binding resolves kohya's flattened names and target_parameters' nesting, and each module's orientation
    plan = bind(adapter, base_ckpt) if base_ckpt is not None else None
    modules = []
    for m in adapter.modules.values():
        if s.peft_type != "LORA":
            modules.append(_tuner_entry(adapter, m))
            continue
        a = adapter.tensors.entry(m.a_key).shape
        b = adapter.tensors.entry(m.b_key).shape
        stored = math.prod(a) + math.prod(b)
        if m.magnitude_key:  # DoRA's m: one value per output feature
            stored += adapter.tensors.entry(m.magnitude_key).numel
        modules.append({
            "module": m.module, "target": m.target, "kind": m.kind, "rank": m.r, "alpha": m.alpha,
            "scale": m.scale, "stored_parameters": stored, "dora": m.magnitude_key is not None,
            "delta_shape": ([a[1], b[0]] if m.kind == "embedding" else
                            [a[0] // m.r, b[0], a[1]] if m.kind == "experts" else
                            [a[0] // m.r, a[1], b[0]] if m.kind == "experts_t" else [b[0], *a[1:]]),
        })
    report = {
        "kind": "adapter",
        "path": str(adapter.path),
        "format": getattr(adapter, "format", "peft"),
        "peft_type": s.peft_type,
        "tuner": s.tuner_name,
        "peft_version": s.peft_version,
        "base_model_name_or_path": s.base_model_name_or_path,
        "use_rslora": s.use_rslora,
        "use_dora": s.use_dora,
        "ranks": dict(Counter(m["rank"] for m in modules)),
        "scales": dict(Counter(m["scale"] for m in modules)),
        "target_modules": sorted({m["module"].rsplit(".", 1)[-1] for m in modules}),
        "lora_modules": len(modules),
        "replaced_tensors": sorted(adapter.replacements),
        "stored_tensors": len(adapter.tensors),
        "stored_parameters": adapter.stored_parameters(),
        "modules": modules,
    }
    if adapter.param_groups and adapter.resolve_names is not None:
        report["notes"] = [f"{len(adapter.param_groups)} target_parameters LoRAs are named by nesting depth, not "
                           "by parameter; give --base to resolve them."]
    if plan is not None:
        touched = sorted(plan.touched())
        report["base"] = str(base_ckpt.path)
        report["base_tensors"] = len(base_ckpt)
        report["base_parameters"] = base_ckpt.total_parameters()
        report["touched_tensors"] = len(touched)
        report["touched_parameters"] = sum(base_ckpt.entry(n).numel for n in touched if n in base_ckpt)
        report["touched"] = touched
        report["notes"] = plan.notes
    return report


def _tuner_entry(adapter, m) -> dict:
    """A LoHa/LoKr/AdaLoRA/VeRA/IA³/OFT module: its own stored tensors (VeRA's shared projections counted once, in
    stored_parameters) and what its update does."""
    from .tuners import VERA_SHARED

    own = [k for k in m.keys.values() if k not in VERA_SHARED]
    return {
        "module": m.module, "target": m.target, "kind": m.kind, "rank": m.r, "alpha": m.alpha, "scale": m.scale,
        "stored_parameters": sum(adapter.tensors.entry(k).numel for k in own), "dora": False,
        "update": TUNER_UPDATES[m.peft_type], "tensors": sorted(k.rpartition(m.module + ".")[2] for k in own),
    }


TUNER_UPDATES = {
    "LOHA": "additive: ΔW = s·(w1a@w1b) ⊙ (w2a@w2b)",
    "LOKR": "additive: ΔW = s·kron(w1, w2)",
    "ADALORA": "additive: ΔW = B@(A ⊙ E)·α/(init_r + 1e-5)",
    "VERA": "additive: ΔW = (λ_b ⊙ B)@(λ_d ⊙ A) with shared A, B",
    "IA3": "multiplicative: W' = W ⊙ l (and b' = b ⊙ l outside feedforward modules)",
    "OFT": "multiplicative: W' = W @ Rᵀ, R block-diagonal orthogonal (Cayley)",
}


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(part, whole):
    return f"{100.0 * part / whole:.2f}%" if whole else "n/a"


def render_text(r: dict) -> str:
    if r["kind"] == "adapter":
        return _render_adapter(r)
    lines = [f"model {r['path']} ({r['format']}, model_type {r['model_type']})"]
    tpl = r["tensors_per_layer"]
    if r["layers"] and isinstance(tpl, int):
        lines.append(
            f"{r['total_tensors']} tensors = {r['layers']} layers x {tpl} + {len(r['global_tensors'])} global; "
            f"{r['total_parameters']:,} parameters"
        )
    else:
        lines.append(f"{r['total_tensors']} tensors in {r['layers']} layers; {r['total_parameters']:,} parameters")
    lines.append(f"global tensors: {', '.join(r['global_tensors'])}")
    lines.append(f"tied embeddings: {'yes' if r['tied_embeddings'] else 'no'}")
    lines.append("dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(r["dtypes"].items())))
    lines.append("")
    lines.append(f"{'module kind':<12} {'tensors':>8} {'parameters':>15} {'share':>8}")
    for kind, v in sorted(r["per_kind"].items(), key=lambda kv: -kv[1]["parameters"]):
        lines.append(f"{kind:<12} {v['tensors']:>8} {v['parameters']:>15,} {_pct(v['parameters'], r['total_parameters']):>8}")
    if r["per_layer"]:
        lines.append("")
        lines.append(f"{'layer':<6} {'tensors':>8} {'parameters':>15}")
        for layer, v in r["per_layer"].items():
            lines.append(f"{layer:<6} {v['tensors']:>8} {v['parameters']:>15,}")
    lines.append("")
    lines.append(f"{'shard':<40} {'tensors':>8} {'bytes':>15}")
    for shard, v in r["shards"].items():
        lines.append(f"{shard:<40} {v['tensors']:>8} {v['bytes']:>15,}")
    return "\n".join(lines)


def _render_adapter(r: dict) -> str:
    tuner = r.get("tuner", "LoRA")
    variant = f"PEFT {tuner} with DoRA magnitudes" if r.get("use_dora") else f"PEFT {tuner}"
    lines = [f"adapter {r['path']} ({variant}, peft_version {r['peft_version'] or '<0.18 (not recorded)'})"]
    if r.get("format", "peft") != "peft":
        lines = [f"adapter {r['path']} ({r['format']} LoRA file)"]
    if r.get("use_dora"):
        lines.append("DoRA: merged weight = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output feature (not additive)")
    if r["peft_type"] != "LORA":
        ranks = f"ranks {r['ranks']}; " if any(k is not None for k in r["ranks"]) else ""
        lines.append(f"{r['lora_modules']} {tuner} modules on {', '.join(r['target_modules'])}; {ranks}"
                     f"{r['modules'][0]['update'] if r['modules'] else ''}")
    else:
        lines.append(
            f"{r['lora_modules']} LoRA modules on {', '.join(r['target_modules'])}; ranks {r['ranks']}; "
            f"scaling {'alpha/sqrt(r)' if r['use_rslora'] else 'alpha/r'} = {r['scales']}"
        )
    what = " (r*(m+n) per module)" if r["peft_type"] == "LORA" else ""
    lines.append(f"stores {r['stored_tensors']} tensors, {r['stored_parameters']:,} parameters{what}")
    if r["replaced_tensors"]:
        lines.append(f"replaces {len(r['replaced_tensors'])} base tensors: {', '.join(r['replaced_tensors'])}")
    if "base_tensors" in r:
        lines.append(
            f"touches {r['touched_tensors']} of {r['base_tensors']} base tensors "
            f"({r['touched_parameters']:,} of {r['base_parameters']:,} parameters, {_pct(r['touched_parameters'], r['base_parameters'])}); "
            f"stores {_pct(r['stored_parameters'], r['touched_parameters'])} of the touched parameters"
        )
        for note in r.get("notes", []):
            lines.append(f"note: {note}")
    lines.append("")
    lines.append(f"{'module':<48} {'kind':<9} {'r':>4} {'alpha':>7} {'scale':>8} {'stored':>10}")
    for m in r["modules"]:
        lines.append(
            f"{m['module']:<48} {m['kind']:<9} {_num(m['rank'], 'd'):>4} {_num(m['alpha'], 'g'):>7} "
            f"{_num(m['scale'], '.4g'):>8} {m['stored_parameters']:>10,}"
        )
    return "\n".join(lines)
