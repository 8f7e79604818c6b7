"""Describe a model or an adapter from headers alone: tensors and parameters per layer, module kind, dtype, shard."""

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

from loratv.adapters.adapter import CONFIG_NAME, bind, load_adapter
from loratv.adapters.kohya import is_lora_file
from loratv.adapters.registry import kind_for
from loratv.common.dtypes import itemsize
from loratv.common.names import KIND_RULES, LAYER, layer_of, module_kind  # noqa: F401  (inspect's names)
from loratv.errors import BadInputError, LoratvError, param
from loratv.io import hub
from loratv.io.checkpoint import Checkpoint, resolve_path
from loratv.models.architectures import FAMILIES
from loratv.models.meta_model import config_inventory, peft_default_targets


def describe(source, base=None, *, config_only=False, lora_targets=None, lora_ranks=None) -> dict:
    """The report for a model, an adapter, or (config_only, or a config.json / a folder holding no weights) the
    model a config.json describes. lora_targets/lora_ranks add, for a model, what a LoRA on those modules would
    touch and store.

    Args:
        source: a model (folder, file or hub id), an adapter (a folder or file with adapter_config.json beside it, or
            a kohya / diffusers LoRA .safetensors file), or a config.json / a folder holding one but no weights.
        base: for an adapter, the base model to bind it to (touched tensors, resolved names); optional.
        config_only: describe the model from its config.json alone, reading no weights.
        lora_targets: module names for the LoRA footprint (PEFT's list semantics, or ["all-linear"]); None: the
            model type's defaults (default_lora_targets) when lora_ranks is given.
        lora_ranks: the ranks of the LoRA footprint; None: [8] when lora_targets is given.

    Returns:
        The report from describe_config, describe_model or describe_adapter, with "lora" (lora_footprint) added
        when lora_targets or lora_ranks is given.

    Raises:
        LoratvError: lora_targets or lora_ranks given for an adapter (BadInputError); or as describe_config,
            describe_model, describe_adapter and lora_footprint.
    """
    if config_only or _is_config_source(source):
        report = describe_config(source)
    else:
        path = resolve_path(source)
        if (path if path.is_dir() else path.parent).joinpath(CONFIG_NAME).is_file():
            report = describe_adapter(source, base)
        elif path.is_file() and path.suffix == ".safetensors" and _is_lora_file(path):
            report = describe_adapter(source, base)  # a kohya / diffusers LoRA file
        else:
            report = describe_model(source)
    if lora_targets is not None or lora_ranks is not None:
        if report["kind"] != "model":
            raise BadInputError(f"{report['path']}: {param('lora_targets')}/{param('lora_ranks', flag='--lora-rank')} "
                                f"describe a LoRA for a model; this is an "
                              "adapter (inspect it without them).")
        targets = lora_targets or default_lora_targets(report.get("model_type"))
        report["lora"] = lora_footprint(report, targets, lora_ranks or [8])
    return report


def _is_lora_file(path) -> bool:

    return is_lora_file(path)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt")


def _is_config_source(source) -> bool:
    """A config.json file, or a local folder with a config.json but no weights and no adapter."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix == ".json" and not path.name.endswith(".index.json") and path.name != CONFIG_NAME
    return (path.is_dir() and (path / "config.json").is_file() and not (path / CONFIG_NAME).is_file()
            and not any(p.is_file() for pattern in WEIGHT_FILES for p in path.glob(pattern)))


def _tensor_table(rows) -> list:
    """Tensors grouped by name with the layer index replaced by `*` (and by shape): one row per tensor kind."""
    groups: dict[tuple, dict] = {}  # (pattern, shape) -> row
    for name, shape, _ in rows:
        pattern = LAYER.sub(lambda m: m.group(0).replace(m.group(1), "*"), name, count=1)
        g = groups.setdefault((pattern, tuple(shape)), {"name": pattern, "shape": list(shape), "count": 0,
                                                         "parameters": 0})
        g["count"] += 1
        g["parameters"] += math.prod(shape)
    return list(groups.values())


def _summary(rows) -> dict:
    """Counts shared by the header and the config reports; rows are (name, shape, dtype)."""
    layers: defaultdict[int, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0})
    kinds: defaultdict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0})
    dtype_counts: Counter[str] = Counter()
    global_tensors = []
    for name, shape, dtype in rows:
        numel = math.prod(shape)
        layer = layer_of(name)
        if layer is None:
            global_tensors.append(name)
        else:
            layers[layer]["tensors"] += 1
            layers[layer]["parameters"] += numel
        kind = module_kind(name)
        kinds[kind]["tensors"] += 1
        kinds[kind]["parameters"] += numel
        if dtype is not None:
            dtype_counts[dtype] += 1
    per_layer = sorted({v["tensors"] for v in layers.values()})
    return {
        "total_tensors": len(rows),
        "total_parameters": sum(math.prod(shape) for _, shape, _ in rows),
        "layers": len(layers),
        "tensors_per_layer": per_layer[0] if len(per_layer) == 1 else per_layer,
        "global_tensors": global_tensors,
        "dtypes": dict(dtype_counts),
        "per_layer": {str(k): v for k, v in sorted(layers.items())},
        "per_kind": dict(kinds),
    }


def describe_model(source) -> dict:
    """The report for a model checkpoint, from its headers (and config.json) alone: no tensor data is read.

    Args:
        source: the model (folder, file or hub id).

    Returns:
        The model report (kind "model"): totals, layers, global tensors, tied embeddings, dtype counts, per-layer,
        per-kind and per-shard counts, one row per tensor kind, and every tensor's shape.
    """
    ckpt = Checkpoint(source)
    shards: defaultdict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
    rows = []
    for name, e in ckpt.entries.items():
        rows.append((name, tuple(e.shape), e.dtype))
        shards[e.file.name]["tensors"] += 1
        shards[e.file.name]["bytes"] += e.nbytes
    config = ckpt.config or {}
    summary = _summary(rows)
    tied = bool(config.get("tie_word_embeddings", True)) and not any(
        n in ckpt for n in ("lm_head.weight", "embed_out.weight")
    )
    return {
        "kind": "model",
        "path": str(ckpt.path),
        "format": ckpt.format,
        "model_type": config.get("model_type"),
        "total_tensors": summary["total_tensors"],
        "total_parameters": summary["total_parameters"],
        "layers": summary["layers"],
        "tensors_per_layer": summary["tensors_per_layer"],
        "global_tensors": summary["global_tensors"],
        "tied_embeddings": tied,
        "dtypes": summary["dtypes"],
        "per_layer": summary["per_layer"],
        "per_kind": summary["per_kind"],
        "shards": dict(shards),
        "per_tensor_kind": _tensor_table(rows),
        "shapes": {name: list(shape) for name, shape, _ in rows},
    }


def _read_config(source):
    """(path, dict) of a config.json given as the file, a folder holding it, or a hub id (config.json only)."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    elif not path.exists():
        path = hub.resolve(source, _download_config)
    if not path.is_file():
        raise LoratvError(f"{path}: no such file (a config-only inspect reads config.json).")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoratvError(f"{path}: not valid JSON.") from None
    except OSError as exc:
        raise LoratvError(f"{path}: cannot be read ({exc.strerror}).") from None
    return path, config


def _download_config(hub_id: str) -> Path:
    return hub.single_file(hub_id, "config.json")


def describe_config(source) -> dict:
    """What the checkpoint a config.json describes holds, computed from the config alone.

    The model is built by transformers on the meta device and read as save_pretrained would write it
    (meta_model.py); without transformers, the hand-written families of architectures.py answer.

    Args:
        source: a config.json, a folder holding one, or a hub id (config.json alone is fetched).

    Returns:
        The model report (format "config"): the saved tensors' names, shapes and dtypes, tied copies, the
        transformers class and where the inventory came from (`inventory_source`).

    Raises:
        LoratvError: an unreadable config, an unknown architecture, or transformers missing for a family loratv has
            no formulas for (the sentence names the `loratv[transformers]` extra).
    """

    path, config = _read_config(source)
    inventory, inventory_source = config_inventory(config, str(path))
    rows = inventory.tensors
    summary = _summary(rows)
    model_type = config.get("model_type")
    known = all(dtype is not None for _, _, dtype in rows)
    return {
        "kind": "model",
        "path": str(source) if Path(source).expanduser().is_file() else str(path),
        "format": "config",
        "model_type": model_type,
        "model_class": inventory.model_class or None,
        "inventory_source": inventory_source,
        **summary,
        "tied_embeddings": bool(inventory.tied),
        "tied_tensors": inventory.tied,
        "head_tensors": inventory.head,
        "linear_tensors": inventory.linear,
        "memory_names": inventory.memory_names,
        "shards": {},
        "data_bytes": sum(math.prod(shape) * itemsize(dtype) for _, shape, dtype in rows) if known else None,
        "per_tensor_kind": _tensor_table(rows),
        "shapes": {name: list(shape) for name, shape, _ in rows},
        "tensor_dtypes": {name: dtype for name, _, dtype in rows},
        "default_lora_targets": default_lora_targets(model_type),
        "notes": inventory.notes,
    }


DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def default_lora_targets(model_type) -> list:
    """The targets of --lora-rank without --lora-targets.

    Args:
        model_type: config.json's model_type (None when unknown).

    Returns:
        q/k/v/o for the hand-written families (the seed study's LoRA, docs/starcoder2-architecture.md's figures)
        and for model types PEFT has no default for (or without PEFT); else PEFT's default targets for the type
        (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, e.g. q and v for t5).
    """

    if model_type in FAMILIES:
        return list(DEFAULT_LORA_TARGETS)
    return peft_default_targets(model_type) or list(DEFAULT_LORA_TARGETS)


def lora_footprint(report: dict, targets, ranks) -> dict:
    """What a LoRA of each rank on `targets` (PEFT's list semantics: a module named T or ending in `.T`;
    `all-linear`: PEFT's rule, the nn.Linear / Conv1D weights but the output embedding's, where the report has them
    from transformers (`linear_tensors`), else every 2-D weight but the embeddings and the output head) touches and
    stores: one module per matched weight of shape (m, n, ...), stored r·(m + n·...) parameters (lora_B (m, r) and
    lora_A (r, n·...); Conv1D and embedding weights are stored transposed, which leaves the sum unchanged).

    Args:
        report: a model report (describe_model or describe_config).
        targets: the target module names, or ["all-linear"].
        ranks: the LoRA ranks to count (each converted to int).

    Returns:
        The matched modules' counts and shares of tensors and parameters, one row per target module name and
        shape, one row per rank (stored parameters and their shares of the model and of the touched weights), and
        the touched tensor names.

    Raises:
        LoratvError: BadInputError, when `ranks` is empty or holds a rank ≤ 0, or `targets` match no weight
            matrix of the model.
    """
    ranks = [int(r) for r in ranks]
    if not ranks or any(r <= 0 for r in ranks):
        raise BadInputError(f"{param('lora_ranks', flag='--lora-rank')} must be positive integers, not {ranks}.")
    targets = list(targets)
    linear = set(report.get("linear_tensors") or ())
    # PEFT matches targets against the model in memory, which transformers may name otherwise than the file
    memory_names = report.get("memory_names") or {}
    modules = []
    for name, shape in report["shapes"].items():
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        module = name[: -len(".weight")]
        if targets == ["all-linear"] and report.get("linear_tensors") is not None:
            hit = name in linear  # from transformers' modules: nn.Linear / Conv1D weights, not the output embedding
        elif targets == ["all-linear"]:
            hit = module_kind(name) not in ("embedding", "head") and len(shape) == 2
        else:
            names = {module, memory_names.get(name, name).removesuffix(".weight")}
            hit = any(m == t or m.endswith("." + t) for m in names for t in targets)
        if hit:
            modules.append((module, name, shape))
    if not modules:
        tied = " (a tied lm_head is not a stored tensor)" if report.get("tied_embeddings") else ""
        given = param("lora_targets", targets, flag_value=",".join(targets))
        raise BadInputError(f"{report['path']}: {given} matches no weight matrix of this "
                          f"model{tied}.")
    touched = sum(math.prod(shape) for _, _, shape in modules)
    per_target: dict[tuple, dict] = {}  # (module, shape) -> row
    for module, _, shape in modules:
        key = (module.rsplit(".", 1)[-1], tuple(shape))
        entry = per_target.setdefault(key, {"module": key[0], "shape": list(shape), "modules": 0})
        entry["modules"] += 1
    sides = [shape[0] + math.prod(shape[1:]) for _, _, shape in modules]
    per_rank = []
    for r in ranks:
        stored = r * sum(sides)
        per_rank.append({
            "rank": r,
            "stored_parameters": stored,
            "share_of_model": stored / report["total_parameters"],
            "share_of_touched": stored / touched,
        })
    return {
        "targets": targets,
        "modules": len(modules),
        "touched_tensors": len(modules),
        "total_tensors": report["total_tensors"],
        "touched_parameters": touched,
        "total_parameters": report["total_parameters"],
        "share_of_tensors": len(modules) / report["total_tensors"],
        "share_of_parameters": touched / report["total_parameters"],
        "per_target": [
            {**v, "parameters_each": math.prod(v["shape"]), "stored_per_rank_each": v["shape"][0] + math.prod(v["shape"][1:])}
            for v in per_target.values()
        ],
        "per_rank": per_rank,
        "touched": [name for _, name, _ in modules],
    }


def describe_adapter(source, base=None) -> dict:
    """The report for an adapter: its settings, ranks, scales and modules, and with a base what it touches.

    Args:
        source: a PEFT adapter folder or a single kohya / diffusers LoRA file.
        base: the base model to bind the adapter to (optional; without it, the adapter's recorded
            base_model_name_or_path is used when that is a local folder).

    Returns:
        The adapter report (kind "adapter"): format, PEFT type and tuner, version, ranks and scales counted over
        the modules, target modules, replaced tensors, stored tensors and parameters, one record per module; with a
        base also the base's totals, the touched tensors and parameters, and the binding's notes.
    """
    adapter = load_adapter(source)
    s = adapter.settings
    if base is None and s.base_model_name_or_path and Path(s.base_model_name_or_path).expanduser().is_dir():
        base = s.base_model_name_or_path  # the recorded base, when it is a local folder (never a download)
    base_ckpt = Checkpoint(base) if base is not None else None
    # binding resolves kohya's flattened names and target_parameters' nesting, and each module's orientation
    plan = bind(adapter, base_ckpt) if base_ckpt is not None else None
    kind = kind_for(s.peft_type, adapter.config_path)  # each kind describes its own modules
    modules = [kind.describe(adapter, m) for m in adapter.modules.values()]
    report = {
        "kind": "adapter",
        "path": str(adapter.path),
        "format": getattr(adapter, "format", "peft"),
        "peft_type": s.peft_type_name,
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
    if plan is not None and base_ckpt is not None:  # a plan is made exactly when there is a base
        touched = sorted(plan.touched())
        report["base"] = str(base_ckpt.path)
        report["base_tensors"] = len(base_ckpt)
        report["base_parameters"] = base_ckpt.total_parameters()
        report["touched_tensors"] = len(touched)
        report["touched_parameters"] = sum(base_ckpt.entry(n).numel for n in touched if n in base_ckpt)
        report["touched"] = touched
        report["notes"] = plan.notes
    return report


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(part, whole):
    return f"{100.0 * part / whole:.2f}%" if whole else "n/a"


def _count(n: int) -> str:
    """1,407,616 -> 1.41 M; 3,030,371,328 -> 3.03 B."""
    for size, unit in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "k")):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _shape(shape) -> str:
    return " x ".join(str(d) for d in shape)


def _layer_runs(per_layer: dict) -> list:
    """Consecutive layers with equal counts as (first, last, counts)."""
    runs: list[list] = []  # [first, last, counts]
    for layer, v in per_layer.items():
        layer = int(layer)
        if runs and runs[-1][1] == layer - 1 and runs[-1][2] == v:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer, v])
    return runs


def render_text(r: dict) -> str:
    """A report of describe as the text `loratv inspect` prints.

    Args:
        r: a model or adapter report (with its "lora" footprint, if any).

    Returns:
        The text, lines joined by newlines (no trailing newline).
    """
    if r["kind"] == "adapter":
        return _render_adapter(r)
    config_only = r["format"] == "config"
    if config_only:
        lines = [f"model {r['path']} (config only: shapes from config.json, no weights read; "
                 f"model_type {r['model_type']})"]
    else:
        lines = [f"model {r['path']} ({r['format']}, model_type {r['model_type']})"]
    tpl = r["tensors_per_layer"]
    if r["layers"] and isinstance(tpl, int):
        lines.append(
            f"{r['total_tensors']} tensors = {r['layers']} layers x {tpl} + {len(r['global_tensors'])} global; "
            f"{r['total_parameters']:,} parameters ({_count(r['total_parameters'])})"
        )
    else:
        lines.append(f"{r['total_tensors']} tensors in {r['layers']} layers; {r['total_parameters']:,} parameters "
                     f"({_count(r['total_parameters'])})")
    lines.append(f"global tensors: {', '.join(r['global_tensors'])}")
    lines.append(f"tied embeddings: {'yes' if r['tied_embeddings'] else 'no'}")
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(r["dtypes"].items()))
    if config_only:
        lines.append(f"dtypes: {dtypes}; {r['data_bytes']:,} bytes of tensor data" if r["data_bytes"] is not None
                     else "dtypes: not stated in config.json")
    else:
        lines.append("dtypes: " + dtypes)
    lines.append("")
    lines.append(f"{'module kind':<12} {'tensors':>8} {'parameters':>15} {'share':>8}")
    for kind, v in sorted(r["per_kind"].items(), key=lambda kv: -kv[1]["parameters"]):
        lines.append(f"{kind:<12} {v['tensors']:>8} {v['parameters']:>15,} {_pct(v['parameters'], r['total_parameters']):>8}")
    if r.get("per_tensor_kind"):
        width = max(len(t["name"]) for t in r["per_tensor_kind"])
        lines.append("")
        lines.append(f"{'tensor':<{width}} {'shape':>14} {'count':>6} {'parameters':>15} {'share':>8}")
        for t in r["per_tensor_kind"]:
            lines.append(f"{t['name']:<{width}} {_shape(t['shape']):>14} {t['count']:>6} {t['parameters']:>15,} "
                         f"{_pct(t['parameters'], r['total_parameters']):>8}")
    if r["per_layer"]:
        lines.append("")
        lines.append(f"{'layers':<8} {'tensors':>8} {'parameters each':>16}")
        for first, last, v in _layer_runs(r["per_layer"]):
            label = str(first) if first == last else f"{first}-{last}"
            lines.append(f"{label:<8} {v['tensors']:>8} {v['parameters']:>16,}")
    if not config_only:
        lines.append("")
        lines.append(f"{'shard':<40} {'tensors':>8} {'bytes':>15}")
        for shard, v in r["shards"].items():
            lines.append(f"{shard:<40} {v['tensors']:>8} {v['bytes']:>15,}")
    if config_only and r.get("notes"):
        lines.append("")
        lines += [f"note: {note}" for note in r["notes"]]
    if "lora" in r:
        lines.append("")
        lines += _render_lora(r["lora"])
    return "\n".join(lines)


def _render_lora(f: dict) -> list:
    lines = [
        f"LoRA on {', '.join(f['targets'])}: {f['modules']} modules",
        f"touches {f['touched_tensors']} of {f['total_tensors']} tensors ({_pct(f['touched_tensors'], f['total_tensors'])}) "
        f"and {f['touched_parameters']:,} of {f['total_parameters']:,} parameters "
        f"({_pct(f['touched_parameters'], f['total_parameters'])})",
        "",
        f"{'module':<16} {'shape':>14} {'modules':>8} {'parameters each':>16}  stored per module",
    ]
    for t in f["per_target"]:
        m, n = t["shape"][0], t["stored_per_rank_each"] - t["shape"][0]
        lines.append(f"{t['module']:<16} {_shape(t['shape']):>14} {t['modules']:>8} {t['parameters_each']:>16,}  "
                     f"r*({m} + {n}) = r*{t['stored_per_rank_each']:,}")
    lines.append("")
    lines.append(f"{'rank':>4} {'stored parameters':>18} {'of the model':>13} {'of the touched':>15}")
    for p in f["per_rank"]:
        lines.append(f"{p['rank']:>4} {p['stored_parameters']:>18,} {100 * p['share_of_model']:>12.3f}% "
                     f"{100 * p['share_of_touched']:>14.3f}%")
    return lines


def _render_adapter(r: dict) -> str:
    tuner = r.get("tuner", "LoRA")
    variant = f"PEFT {tuner} with DoRA magnitudes" if r.get("use_dora") else f"PEFT {tuner}"
    lines = [f"adapter {r['path']} ({variant}, peft_version {r['peft_version'] or '<0.18 (not recorded)'})"]
    if r.get("format", "peft") != "peft":
        lines = [f"adapter {r['path']} ({r['format']} LoRA file)"]
    if r.get("use_dora"):
        lines.append("DoRA: merged weight = m ⊙ (W + ΔW) / ‖W + ΔW‖ per output feature (not additive)")
    factored = kind_for(r["peft_type"]).factored  # LoRA (factors B, A) or another tuner
    if not factored:
        ranks = f"ranks {r['ranks']}; " if any(k is not None for k in r["ranks"]) else ""
        lines.append(f"{r['lora_modules']} {tuner} modules on {', '.join(r['target_modules'])}; {ranks}"
                     f"{r['modules'][0]['update'] if r['modules'] else ''}")
    else:
        lines.append(
            f"{r['lora_modules']} LoRA modules on {', '.join(r['target_modules'])}; ranks {r['ranks']}; "
            f"scaling {'alpha/sqrt(r)' if r['use_rslora'] else 'alpha/r'} = {r['scales']}"
        )
    what = " (r*(m+n) per module)" if factored else ""
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
