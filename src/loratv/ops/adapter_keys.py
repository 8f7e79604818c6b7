"""`loratv inspect ADAPTER --keys`: an adapter dumped for debugging, from headers alone.

Every stored key with its shape, dtype and element count and what it is (which module's lora_A, a replaced tensor,
…); per module the rank, alpha and the scaling loratv applies, where each came from (r or a rank_pattern key,
lora_alpha or an alpha_pattern key, α/r or rsLoRA's α/√r), its orientation and, with a base, the base tensor it
changes. Nothing is re-derived: the modules are load_adapter()'s and the orientations bind()'s.
"""

from pathlib import Path

from loratv.adapters.adapter import CONV1D_MODEL_TYPES, CONV1D_MODULES, OUTPUT_EMBEDDING_NAMES, bind, load_adapter
from loratv.adapters.config import match_pattern_key
from loratv.adapters.registry import kind_for
from loratv.io.checkpoint import Checkpoint
from loratv.ops.inspect import describe_adapter

ORIENTATION = {
    "linear": "Linear: W (out, in), ΔW = s·B@A",
    "conv1d": "Conv1D / fan_in_fan_out: W stored (in, out), ΔW = s·(B@A)ᵀ",
    "embedding": "Embedding: W (num_embeddings, dim), ΔW = s·(B@A)ᵀ from lora_embedding_A (r, num_embeddings)",
    "conv": "ConvNd: A (r, in, *kernel), B (out, r, 1, …), ΔW (out, in, *kernel)",
    "experts": "MoE experts (E, out, in): ΔW per expert from A (r·E, in), B (out, r·E)",
    "experts_t": "MoE experts stored transposed (E, in, out): ΔW per expert from A (r·E, in), B (out, r·E)",
}
ROLE_NAMES = {"a_key": "lora_A", "b_key": "lora_B", "bias_key": "lora_B.bias", "magnitude_key": "DoRA magnitude"}


def _unresolved_kind(adapter, m) -> str:
    """Orientation without a base: what the file and config alone say (a square Conv1D needs the base's model
    type, so it is marked as assumed)."""
    if m.kind != "linear":
        return m.kind
    if adapter.settings.fan_in_fan_out:
        return "conv1d"
    return "linear"


def _why_conv1d(adapter, m, model_type) -> str:

    if adapter.settings.fan_in_fan_out:
        return "fan_in_fan_out = true in adapter_config.json"
    leaf = m.module.rsplit(".", 1)[-1]
    if model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_MODULES:
        return f"transformers Conv1D layer ({model_type} {leaf}): PEFT forces fan_in_fan_out"
    return "the base tensor's shape is (in, out)"


def _sources(adapter, m) -> tuple:
    """(where the rank came from, where alpha came from): the config key PEFT's get_pattern_key would pick."""
    s = adapter.settings
    if getattr(adapter, "format", "peft") != "peft":
        return "factor shapes", "the file's .alpha"
    rank_key = match_pattern_key(s.rank_pattern, m.module) if s.rank_pattern else None
    alpha_key = match_pattern_key(s.alpha_pattern, m.module) if s.alpha_pattern else None
    rank = f"rank_pattern[{rank_key!r}]" if rank_key is not None else "r"
    alpha = f"alpha_pattern[{alpha_key!r}]" if alpha_key is not None else "lora_alpha"
    return rank, alpha


def _entry(ckpt, key) -> dict:
    e = ckpt.entry(key)
    return {"key": key, "shape": list(e.shape), "dtype": e.dtype, "numel": e.numel}


def describe_adapter_keys(source, base=None) -> dict:
    """Every stored key of an adapter and every module's rank, alpha, scaling and orientation.

    Args:
        source: a PEFT adapter folder (or its adapter_config.json), or a kohya / diffusers .safetensors file.
        base: the base model; adds each module's base tensor (name, shape, dtype) and resolves orientations
            (a square Conv1D weight, kohya names). Defaults to the adapter's recorded base when that is a local
            folder, as `inspect` does.

    Returns:
        describe_adapter()'s report plus "keys" (every stored key: key, shape, dtype, numel, role, module),
        "scaling_rule", "config" (r, lora_alpha, use_rslora, fan_in_fan_out, rank_pattern, alpha_pattern) and, per
        module, "rank_source", "alpha_source", "scaling", "orientation", "orientation_reason", "factors" and
        "base_tensor" (with a base).

    Raises:
        LoratvError: the adapter or the base is missing or malformed, or they do not fit each other.
    """


    report = describe_adapter(source, base)  # the summary inspect prints, and the same recorded-base default
    adapter = load_adapter(source)
    base_source = report.get("base")
    base_ckpt = Checkpoint(base_source) if base_source is not None else None
    plan = bind(adapter, base_ckpt) if base_ckpt is not None else None  # sets each module's orientation
    model_type = (base_ckpt.config or {}).get("model_type") if base_ckpt is not None else None
    s = adapter.settings
    adapter_kind = kind_for(s.peft_type, adapter.config_path)
    factored = adapter_kind.factored  # LoRA: rank/alpha per module from the file and the patterns, s = α/r or α/√r
    rule = "alpha/sqrt(r) (rsLoRA)" if s.use_rslora else "alpha/r"
    if not factored:
        rule = f"{s.tuner_name}: see each module's scaling"

    summary = {m["module"]: m for m in report["modules"]}  # describe_adapter's per-module counts and shapes
    roles: dict[str, tuple] = {}
    modules = []
    for m in adapter.modules.values():
        keys = getattr(m, "keys", None)  # tuners: role -> key
        own = dict(keys) if isinstance(keys, dict) else {
            ROLE_NAMES[attr]: getattr(m, attr) for attr in ROLE_NAMES if getattr(m, attr, None)}
        for role, key in own.items():
            roles[key] = (role, m.module)
        kind = m.kind if plan is not None else _unresolved_kind(adapter, m)
        rank_source, alpha_source = _sources(adapter, m) if factored else ("config", "config")
        entry = {
            "module": m.module,
            "rank": m.r,
            "rank_source": rank_source,
            "alpha": m.alpha,
            "alpha_source": alpha_source,
            "scaling": m.scale,
            "scaling_formula": _formula(m, s.use_rslora) if factored else None,
            "orientation": kind,
            "orientation_detail": ORIENTATION.get(kind, kind) + ("" if plan is not None or kind != "linear" else
                                                                 " (assumed: give --base to tell a Conv1D weight)"),
            "orientation_reason": _why_conv1d(adapter, m, model_type) if kind == "conv1d" else None,
            "factors": {role: _entry(adapter.tensors, key) for role, key in own.items()},
            "target": m.target,
        }
        if plan is not None and base_ckpt is not None:  # a plan is made exactly when there is a base
            # a module's delta may land under another name: a tied partner, or transformers' on-disk name or
            # pieces (layouts.py: the plan holds one copy of the module per piece)
            hits = [n for n, ms in plan.deltas.items()
                    if any(x is m or (getattr(x, "piece", None) is not None and x.module == m.module) for x in ms)]
            target = hits[0] if hits else m.target
            e = base_ckpt.entry(target)
            entry["base_tensor"] = {"name": target, "shape": list(e.shape), "dtype": e.dtype, "numel": e.numel}
            if len(hits) > 1:
                entry["base_tensor"]["note"] = (f"{m.target} is stored in {len(hits)} pieces on disk "
                                                f"(transformers' layout): {hits[0]}, …, {hits[-1]}")
            elif target != m.target and m.target.endswith(OUTPUT_EMBEDDING_NAMES):
                entry["base_tensor"]["note"] = f"{m.target} is tied to {target}"
            elif target != m.target:
                entry["base_tensor"]["note"] = f"{m.target} is stored as {target} on disk (transformers' layout)"
        modules.append({**summary.get(m.module, {}), **entry})
    for nested, pair in adapter.param_groups.items():  # target_parameters left unresolved (no base)
        for role, key in zip(("lora_A", "lora_B"), pair or ()):
            roles.setdefault(key, (f"{role} (target_parameters: --base names the parameter)", nested))
    for name, key in adapter.replacements.items():
        roles.setdefault(key, (f"replaces {name}", name))
    for name, (key, _) in adapter.token_rows.items():
        roles.setdefault(key, (f"trainable token rows of {name}", name))
    by_prefix = {m["factors"]["lora_A"]["key"].rsplit(".lora_", 1)[0]: m["module"] for m in modules
                 if "lora_A" in m["factors"]}
    keys = []
    for key in adapter.tensors.names():
        role, module = roles.get(key, (None, None))
        if role is None and key.endswith(".alpha"):  # kohya: one scalar alpha per module, scale = alpha/r
            role, module = "alpha", by_prefix.get(key[: -len(".alpha")])
        if role is None:
            wrapper = ".modules_to_save." in key or ".original_module." in key
            role = "wrapper copy (ignored: the canonical key carries the value)" if wrapper else \
                "shared tensor" if key in adapter_kind.shared_tensors else "not used by the merge"
        keys.append({**_entry(adapter.tensors, key), "role": role, "module": module})
    report.update({
        "kind": "adapter-keys",
        "file": str(adapter.tensors.path),
        "scaling_rule": rule,
        "config": {"r": s.r, "lora_alpha": s.lora_alpha, "use_rslora": s.use_rslora,
                   "fan_in_fan_out": s.fan_in_fan_out, "rank_pattern": s.rank_pattern,
                   "alpha_pattern": s.alpha_pattern, "config_file": str(Path(adapter.config_path))},
        "keys": keys,
        "modules": modules,
    })
    return report


def _formula(m, rslora: bool) -> str:
    if rslora:
        return f"{m.alpha:g}/sqrt({m.r}) = {m.scale:.6g}"
    return f"{m.alpha:g}/{m.r} = {m.scale:.6g}"


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def render_keys_text(r: dict) -> str:
    """The key dump as text: a header, every key, then every module.

    Args:
        r: describe_adapter_keys()'s report.

    Returns:
        Lines of text (no trailing newline).
    """
    c = r["config"]
    fmt = r.get("format", "peft")
    lines = [f"adapter {r['path']} ({'PEFT' if fmt == 'peft' else fmt} {r.get('tuner', 'LoRA')}); weights {r['file']}",
             f"{len(r['keys'])} stored keys, {sum(k['numel'] for k in r['keys']):,} parameters; "
             f"scaling {r['scaling_rule']}; r={c['r']}, lora_alpha={c['lora_alpha']:g}, use_rslora={c['use_rslora']}, "
             f"fan_in_fan_out={c['fan_in_fan_out']}"
             + (", use_dora=True (DoRA: not additive)" if r.get("use_dora") else "")]
    if c["rank_pattern"]:
        lines.append(f"rank_pattern {c['rank_pattern']}")
    if c["alpha_pattern"]:
        lines.append(f"alpha_pattern {c['alpha_pattern']}")
    if "base" in r:
        lines.append(f"base {r['base']}: touches {r['touched_tensors']} of {r['base_tensors']} tensors")
    for note in r.get("notes") or []:
        lines.append(f"note: {note}")
    width = max([len(k["key"]) for k in r["keys"]] + [3])
    lines += ["", f"{'key':<{width}}  {'dtype':<5} {'shape':>14} {'numel':>10}  role"]
    for k in r["keys"]:
        role = f"{k['role']} of {k['module']}" if k["module"] and not k["role"].startswith(("replaces", "trainable")) \
            else k["role"]
        lines.append(f"{k['key']:<{width}}  {k['dtype']:<5} {_shape(k['shape']):>14} {k['numel']:>10,}  {role}")
    mwidth = max([len(m["module"]) for m in r["modules"]] + [6])
    lines += ["", f"{'module':<{mwidth}} {'r':>4} {'alpha':>7} {'scaling':>10}  {'from':<28} {'orientation':<10} "
              f"base tensor"]
    for m in r["modules"]:
        base = m.get("base_tensor")
        where = (f"{base['name']} {_shape(base['shape'])} {base['dtype']}" if base else "(give --base)")
        source = f"{m['rank_source']}, {m['alpha_source']}"
        rank = "-" if m["rank"] is None else str(m["rank"])
        alpha = "-" if m["alpha"] is None else f"{m['alpha']:g}"
        lines.append(f"{m['module']:<{mwidth}} {rank:>4} {alpha:>7} {m['scaling']:>10.6g}  {source:<28} "
                     f"{m['orientation']:<10} {where}")
        if m["orientation_reason"]:
            lines.append(f"{'':<{mwidth}}   {m['orientation']}: {m['orientation_reason']}")
    return "\n".join(lines)

