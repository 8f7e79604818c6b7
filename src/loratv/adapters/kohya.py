"""kohya / diffusers LoRA single files read as loratv adapters (reference §6; docs/kohya.md).

kohya:     `<lora_name>.lora_down.weight` (A), `.lora_up.weight` (B) and an optional scalar `.alpha`; scale = alpha / r,
           alpha = r when absent. `lora_name` is `lora_<prefix>_` + the module path with its dots turned into
           underscores, which only the base's own tensor names can undo (`resolve`, called by bind).
diffusers: `[<component>.]<module>.lora_A.weight` / `.lora_B.weight` (or the kohya-derived `.lora.down/up.weight`,
           `.lora_linear_layer.down/up.weight`), no `base_model.model.`. Alpha is folded into the factors (scale 1)
           unless the file has `<module>.alpha` keys (diffusers' network alphas: scale alpha / r) or a serialized
           LoraConfig in the safetensors metadata key `lora_adapter_metadata`.
"""

import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace

from loratv.adapters.config import parse_config
from loratv.adapters.kinds.lora_variants import choose_variants
from loratv.adapters.registry import kind_for
from loratv.adapters.structures import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING_NAMES, PREFIX, Adapter, LoraModule
from loratv.errors import LoratvError
from loratv.io import safe_json, storage
from loratv.io.checkpoint import Checkpoint
from loratv.io.safetensors_format import read_header

KOHYA = "kohya"
DIFFUSERS = "diffusers"
METADATA_KEY = "lora_adapter_metadata"
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
DIFFUSERS_ROLES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_embedding_A", "down"), (".lora_embedding_B", "up"),
    (".alpha", "alpha"),
)
# diffusers pipeline components whose name prefixes the module path (`unet.…`, `text_encoder.…`)
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")
# (marker in a key, what it is): LoRA relatives loratv does not read from single files
REFUSED = (
    ("hada_", "LyCORIS LoHa (hada_*)"),
    ("lokr_", "LyCORIS LoKr (lokr_*)"),
    ("dora_scale", "DoRA (dora_scale), whose magnitude convention differs between LyCORIS and PEFT"),
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
    ("lora_mid", "LoCon with a Tucker-decomposed kernel (lora_mid)"),
    ("lora_B.bias", "a LoRA bias (lora_B.bias)"),
)
# any key with one of these is a LoRA relative, not a model tensor (inspect routes such files to the adapter view)
LORA_MARKERS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.",
                ".lora_embedding_", ".hada_", ".lokr_", ".dora_scale", ".lora_magnitude_vector", "_lora.down.")


@dataclass
class SingleFileAdapter(Adapter):
    """An Adapter read from one kohya or diffusers file; `modules` holds the file's own names until resolved."""

    format: str = KOHYA
    use_rslora: bool = False
    file_modules: dict = field(default_factory=dict)  # name in the file -> LoraModule, as read
    file_entries: dict = field(default_factory=dict)  # the file's tensor entries, before any 1×1 squeeze
    file_names: dict = field(default_factory=dict)  # resolved module -> its name in the file


def is_lora_file(path) -> bool:
    """True when a .safetensors file holds LoRA-style tensors (of any kind, supported or not), not a model.

    Args:
        path: the .safetensors file (only its header is read).

    Returns:
        Whether any tensor name contains one of LORA_MARKERS.

    Raises:
        LoratvError: the file cannot be read or its header is corrupt (read_header).
    """

    entries, _ = read_header(storage.as_path(path))  # an object-store URL stays one
    return any(marker in e.name for e in entries for marker in LORA_MARKERS)


def load_single_file(path) -> SingleFileAdapter:
    """Read a kohya or diffusers LoRA file: group its tensors by module, check ranks, compute each module's scale.

    Args:
        path: the .safetensors file.

    Returns:
        The SingleFileAdapter, its modules named as in the file until `resolve` renames them against a base.

    Raises:
        LoratvError: naming the file, when its lora_adapter_metadata sets use_rslora for some components but not
            others; or when a tensor, a module's factors, an alpha or the metadata config is refused (no LoRA
            tensors, PEFT keys, LyCORIS / DoRA / bias tensors, mixed key styles, mismatched ranks, alpha 0, ...).
    """
    path = storage.as_path(path)  # an object-store URL stays one
    ckpt = Checkpoint(path)
    fmt, groups = _group_keys(ckpt)
    configs = _metadata_configs(ckpt, groups) if fmt == DIFFUSERS else {}
    modules, rslora = {}, set()
    for name, parts in groups.items():
        module, uses_rslora = _read_module(ckpt, name, parts, configs)
        modules[name] = module
        if uses_rslora:
            rslora.add(name)
    if rslora and len(rslora) != len(modules):
        raise LoratvError(f"{path}: {METADATA_KEY} sets use_rslora for some components but not others; loratv keeps "
                          "one scaling rule per adapter.")
    settings = parse_config(lora_config(_ranks_alphas(modules), bool(rslora)), path)
    return SingleFileAdapter(
        path=path, config_path=path, settings=settings, tensors=ckpt, resolve_names=resolve, format=fmt,
        modules={n: replace(m) for n, m in modules.items()}, use_rslora=bool(rslora), file_modules=modules,
        file_entries=dict(ckpt.entries), file_names={n: n for n in modules},
    )


def _group_keys(ckpt: Checkpoint):
    """(format, {module name in the file: {role: key}}), refusing anything that is not a plain LoRA factor."""
    file = ckpt.path
    if not any(marker in key for key in ckpt.names() for marker in LORA_MARKERS):
        first = next(iter(ckpt.names()), None)
        raise LoratvError(f"{file}: holds no LoRA tensors ({f'the first is {first!r}' if first else 'none at all'}); "
                          "is it a model rather than an adapter?")
    groups: dict[str, dict] = {}
    formats = set()
    for key in ckpt.names():
        if key.startswith(PREFIX):
            raise LoratvError(f"{file}: tensor '{key}' is a PEFT adapter key; keep the file beside its "
                              "adapter_config.json and give loratv that folder.")
        for marker, what in REFUSED:
            if marker in key:
                raise LoratvError(f"{file}: tensor '{key}' belongs to {what}, which loratv does not read from "
                                  "kohya or diffusers files.")
        head, dot, suffix = key.partition(".")
        if dot and head.startswith("lora_") and suffix in KOHYA_ROLES:
            formats.add(KOHYA)
            name, role = head, KOHYA_ROLES[suffix]
        else:
            found = next(((key[: -len(s)], r) for s, r in DIFFUSERS_ROLES if key.endswith(s) and len(key) > len(s)), None)
            if found is None:
                hint = ("; older diffusers attention-processor files (to_q_lora…) need converting with diffusers first"
                        if "_lora." in key else "")
                raise LoratvError(f"{file}: tensor '{key}' is not a LoRA factor loratv reads (kohya lora_down/lora_up/"
                                  f"alpha, diffusers lora_A/lora_B){hint}.")
            formats.add(DIFFUSERS)
            name, role = found
            if key.endswith(("lora_embedding_A", "lora_embedding_B")):
                groups.setdefault(name, {})["embedding"] = key
        parts = groups.setdefault(name, {})
        if role in parts:
            raise LoratvError(f"{file}: module '{name}' has two {role} tensors ('{parts[role]}' and '{key}').")
        parts[role] = key
    if len(formats) > 1:
        raise LoratvError(f"{file}: mixes kohya (lora_<prefix>_…) and diffusers (dotted module paths) key styles.")
    return formats.pop(), groups


def _read_module(ckpt, name, parts, configs):
    """(LoraModule named as in the file, whether its scale is rsLoRA's): factors checked, scale as the format defines."""
    file = ckpt.path
    down, up = parts.get("down"), parts.get("up")
    if down is None and up is None:
        raise LoratvError(f"{file}: module '{name}' has an alpha but no LoRA factors.")
    if down is None or up is None:
        raise LoratvError(f"{file}: module '{name}' has only its {'down' if up is None else 'up'} factor "
                          f"('{down or up}'); a LoRA needs both.")
    a, b = ckpt.entry(down).shape, ckpt.entry(up).shape
    if len(a) not in (2, 4) or len(b) != len(a) or (len(b) == 4 and tuple(b[2:]) != (1, 1)):
        raise LoratvError(f"{file}: module '{name}' has factors of shapes {list(a)} and {list(b)}; loratv reads 2-D "
                          "factors, or 4-D ones with a 1×1 up factor (conv).")
    if "embedding" in parts and len(a) != 2:
        raise LoratvError(f"{file}: embedding module '{name}' has {len(a)}-D factors.")
    r = a[0]
    if b[1] != r:
        raise LoratvError(f"{file}: module '{name}': the down factor has rank {r} but the up factor has {b[1]} "
                          "columns; the ranks must match.")
    if r == 0:
        raise LoratvError(f"{file}: module '{name}' has rank 0.")
    alpha, scale, rslora = _scale(ckpt, name, parts, r, configs)
    module = LoraModule(module=name, target=name + ".weight", kind="embedding" if "embedding" in parts else "linear",
                        a_key=down, b_key=up, r=r, alpha=alpha, scale=scale)
    return module, rslora


def _scale(ckpt, name, parts, r, configs):
    """(alpha, scale, rslora): an `.alpha` scalar gives alpha / r; a diffusers config its own rule; else alpha = r."""
    file = ckpt.path
    if "alpha" in parts:
        alpha = _alpha_value(ckpt, parts["alpha"])
        return alpha, alpha / r, False
    component, _, rest = name.partition(".")
    config = configs.get(component) if component in configs else configs.get(None)
    if config is None:
        return float(r), 1.0, False  # kohya: alpha defaults to r; diffusers: alpha folded into the factors
    settings, pattern_name = config, (rest if component in configs else name)
    configured = settings.rank_for(pattern_name)
    if configured != r:
        raise LoratvError(f"{file}: module '{name}' has rank {r} but {METADATA_KEY} gives {configured} (r / "
                          "rank_pattern).")
    alpha = settings.alpha_for(pattern_name)
    return alpha, settings.scale(r, alpha), settings.use_rslora


def _alpha_value(ckpt, key) -> float:
    entry = ckpt.entry(key)
    if entry.numel != 1:
        raise LoratvError(f"{ckpt.path}: alpha '{key}' has shape {list(entry.shape)}; it must be a single number.")
    value = float(ckpt.read(key).reshape(()).item())
    if not math.isfinite(value):
        raise LoratvError(f"{ckpt.path}: alpha '{key}' is {value}.")
    if value == 0:
        # kohya's trainer reads alpha 0 as alpha = r, its merge script and other tools as 0: ambiguous
        raise LoratvError(f"{ckpt.path}: alpha '{key}' is 0, which kohya's trainer reads as alpha = r and its merge "
                          "script as 0; loratv will not guess.")
    return value


def _metadata_configs(ckpt: Checkpoint, groups: dict) -> dict:
    """diffusers' serialized LoraConfig: {None: settings} when stored whole (a model's save_lora_adapter), or
    {component: settings} when packed as `<component>.<field>` (a pipeline's save_lora_weights)."""
    file = ckpt.path
    text = ckpt.file_metadata.get(file, {}).get(METADATA_KEY)
    if not text:
        return {}
    where = f"{file} ({METADATA_KEY})"

    data = safe_json.loads(text, file, f"safetensors metadata '{METADATA_KEY}' is not valid JSON")
    if not isinstance(data, dict):
        raise LoratvError(f"{file}: safetensors metadata '{METADATA_KEY}' is not a JSON object.")
    if any(p.get("alpha") for p in groups.values()):
        raise LoratvError(f"{file}: has both .alpha tensors and a LoraConfig in {METADATA_KEY}; diffusers refuses "
                          "that combination too.")
    configs: dict[str | None, dict]
    if all("." in k for k in data):
        packed: dict[str, dict] = {}
        for key, value in data.items():
            component, _, fieldname = key.partition(".")
            packed.setdefault(component, {})[fieldname] = value
        configs = {c: _checked_config(cfg, f"{file} ({METADATA_KEY}, {c})") for c, cfg in packed.items()}
    else:
        if any(n.partition(".")[0] in COMPONENTS for n in groups):
            raise LoratvError(f"{file}: {METADATA_KEY} holds one LoraConfig but the keys carry component prefixes; "
                              "diffusers' pipeline loader would ignore it and its model loader would not.")
        configs = {None: _checked_config(data, where)}
    return configs


def _checked_config(config: dict, where: str):
    settings = parse_config(config, where)
    peft_type = settings.peft_type
    if not kind_for(peft_type).factored:
        raise LoratvError(f"{where}: peft_type {peft_type} is not LoRA; loratv reads only LoRA single files.")
    for flag, what in ((settings.use_dora, "use_dora (DoRA)"), (settings.lora_bias, "lora_bias"),
                       (settings.bias != "none", f"bias = '{settings.bias}'"),
                       (bool(settings.modules_to_save), "modules_to_save")):
        if flag:
            raise LoratvError(f"{where}: sets {what}, whose extra tensors a diffusers LoRA file does not carry.")
    return settings


# ---------------------------------------------------------------- names, against a base

def resolve(adapter: SingleFileAdapter, base: Checkpoint) -> None:
    """Rename every module to the base's module (`<module>.weight` is a base tensor): kohya names through the base's
    names flattened the same way, diffusers names as they are or without their component prefix. Idempotent.

    Also squeezes 1×1 conv factors of 2-D base weights, marks input-embedding modules, rebuilds the settings and
    chooses each module's LoRA variants.

    Args:
        adapter: the single-file adapter; its modules, file_names and settings are replaced.
        base: the base checkpoint whose tensor names the modules are matched to.

    Raises:
        LoratvError: naming the file, when two of its modules map to the same base module, or a module matches no
            base module (or, for kohya, more than one).
    """
    adapter.tensors.entries = dict(adapter.file_entries)
    lookup = flat_lookup(base) if adapter.format == KOHYA else None
    modules: dict = {}
    origin: dict = {}
    for name, read in adapter.file_modules.items():
        if lookup is not None:
            real = kohya_module(adapter.path, lookup, name, base)
        else:
            real = _diffusers_module(adapter, base, name)
        if real in modules:
            raise LoratvError(f"{adapter.path}: modules '{origin[real]}' and '{name}' both map to '{real}' of the base "
                              f"{base.path}.")
        module = replace(read, module=real, target=real + ".weight")
        _squeeze_1x1(adapter, base, module)
        if module.kind == "linear" and module.target.endswith(INPUT_EMBEDDING_SUFFIXES):
            module.kind = "embedding"  # stored like PEFT's lora_embedding_A/B, so ΔW = (up @ down)ᵀ·s
        modules[real] = module
        origin[real] = name
    adapter.modules = modules
    adapter.file_names = origin
    adapter.settings = parse_config(lora_config(_ranks_alphas(modules), adapter.use_rslora), adapter.path)
    for module in modules.values():  # LoRA's variants (ConvNd, rsLoRA), chosen once the names and shapes are final
        module.variants = choose_variants(adapter, module)


def flat_lookup(base: Checkpoint) -> dict:
    """kohya's flattened name (dots as underscores) -> the base modules that flatten to it.

    Args:
        base: the base checkpoint; every `<module>.weight` counts, and the output embeddings it does not store.

    Returns:
        {flattened name: [base module names]}.
    """
    modules = [n[: -len(".weight")] for n in base.names() if n.endswith(".weight")]
    modules += [n[: -len(".weight")] for n in OUTPUT_EMBEDDING_NAMES if n not in base]  # a tied head (bind checks)
    table: dict[str, list] = {}
    for module in modules:
        table.setdefault(module.replace(".", "_"), []).append(module)
    return table


def kohya_module(file, lookup: dict, name: str, base: Checkpoint) -> str:
    """The one base module whose flattened name follows `lora_<prefix>_` in `name`, for any prefix.

    Args:
        file: the adapter file, for messages.
        lookup: flat_lookup(base).
        name: the kohya module name (`lora_<prefix>_<flattened module>`).
        base: the base checkpoint, for messages.

    Returns:
        The base module name (without `.weight`).

    Raises:
        LoratvError: naming the file, when no base module matches or more than one does.
    """
    found: dict = {}
    for i in range(len("lora_") + 1, len(name)):
        if name[i] == "_":
            for module in lookup.get(name[i + 1:], ()):
                found.setdefault(module, name[: i + 1])
    if not found:
        raise LoratvError(f"{file}: kohya module '{name}' matches no module of the base {base.path} (no "
                          "'<module>.weight' there reads the same with its dots as underscores).")
    if len(found) > 1:
        raise LoratvError(f"{file}: kohya module '{name}' is ambiguous against the base {base.path}: it could be "
                          f"{' or '.join(sorted(found))}.")
    return next(iter(found))


def _diffusers_module(adapter, base: Checkpoint, name: str) -> str:
    def known(module):
        target = module + ".weight"
        return target in base or target in OUTPUT_EMBEDDING_NAMES

    if known(name):
        return name
    component, _, rest = name.partition(".")
    if component in COMPONENTS and rest and known(rest):
        return rest
    raise LoratvError(f"{adapter.path}: diffusers module '{name}' matches no tensor of the base {base.path} "
                      f"('{name}.weight'{f' or {rest!r}.weight' if component in COMPONENTS else ''}).")


def _squeeze_1x1(adapter, base: Checkpoint, module: LoraModule) -> None:
    """A 2-D base weight with 4-D 1×1 factors (kohya stores some Linear layers as 1×1 convs): read them as 2-D."""
    entries = adapter.tensors.entries
    a, b = entries[module.a_key], entries[module.b_key]
    if len(a.shape) != 4 or module.target not in base or len(base.entry(module.target).shape) != 2:
        return
    if tuple(a.shape[2:]) == (1, 1) and tuple(b.shape[2:]) == (1, 1):
        entries[module.a_key] = replace(a, shape=tuple(a.shape[:2]))
        entries[module.b_key] = replace(b, shape=tuple(b.shape[:2]))


# ---------------------------------------------------------------- the equivalent PEFT config

def _ranks_alphas(modules: dict) -> dict:
    return {name: (m.r, m.alpha) for name, m in modules.items()}


def _most_common(values):
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _number(x: float):
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def exact_pattern(module: str) -> str:
    """A rank/alpha pattern key that PEFT (≥ 0.15, re.match(r"(.*\\.)?(key)$", name)) matches to this module alone.

    Args:
        module: the module name.

    Returns:
        `^` + the module name regex-escaped.
    """
    return "^" + re.escape(module)


def lora_config(modules: dict, use_rslora: bool, *, base_model=None, fan_in_fan_out: bool = False) -> dict:
    """The adapter_config.json that gives each module {name: (r, alpha)} its r and alpha: the most common values as
    defaults, every other module by an exact rank_pattern / alpha_pattern key.

    Args:
        modules: {module name: (r, alpha)}; empty gives r = lora_alpha = 8.
        use_rslora: the config's use_rslora.
        base_model: the config's base_model_name_or_path.
        fan_in_fan_out: the config's fan_in_fan_out.

    Returns:
        The config dict of a plain LoRA targeting exactly these modules.
    """
    r0 = _most_common(r for r, _ in modules.values()) if modules else 8
    alpha0 = _most_common(a for _, a in modules.values()) if modules else 8
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model,
        "r": r0,
        "lora_alpha": _number(alpha0),
        "rank_pattern": {exact_pattern(m): r for m, (r, _) in modules.items() if r != r0},
        "alpha_pattern": {exact_pattern(m): _number(a) for m, (_, a) in modules.items() if a != alpha0},
        "target_modules": sorted(modules),
        "use_rslora": use_rslora,
        "use_dora": False,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
