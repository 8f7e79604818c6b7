"""`loratv convert`: a LoRA rewritten in another file format with every factor's bytes copied unchanged (docs/kohya.md).

--to peft:  a kohya or diffusers file -> a PEFT adapter folder: `base_model.model.<module>.lora_A/B.weight` (or
            lora_embedding_A/B), r / lora_alpha the most common values and exact rank_pattern / alpha_pattern keys for
            the rest; PEFT's scale for every module is checked to equal the source's bit for bit.
--to kohya: a PEFT LoRA (or a diffusers file) -> one kohya file: `lora_te_<module with dots as underscores>` with
            lora_down = lora_A, lora_up = lora_B and a float32 `.alpha` whose alpha / r is the source's scale bit for
            bit. `lora_te_` is kohya's prefix for a transformers text model addressed by its own module paths, which
            is what an LLM is; kohya's other prefixes (lora_unet_, …) name diffusion components.
"""

import json
import math
from collections import Counter
from pathlib import Path

import torch

from loratv.adapters.adapter import CONFIG_NAME, PREFIX, bind, load_adapter, refuse_non_lora
from loratv.adapters.config import parse_config
from loratv.adapters.kohya import (
    COMPONENTS,
    DIFFUSERS,
    KOHYA,
    SingleFileAdapter,
    flat_lookup,
    kohya_module,
    lora_config,
)
from loratv.adapters.registry import kind_for
from loratv.errors import BadInputError, LoratvError, param
from loratv.io.checkpoint import Checkpoint
from loratv.io.outputs import atomic_output_dir, atomic_output_file
from loratv.io.safetensors_format import SafetensorsWriter
from loratv.io.writer import finished
from loratv.version import __version__

TARGETS = ("peft", "kohya")
FORMAT_NAMES = {"peft": "PEFT", KOHYA: "kohya", DIFFUSERS: "diffusers"}
KOHYA_PREFIX = "lora_te_"
WEIGHTS_NAME = "adapter_model.safetensors"
ALPHA_SEARCH_ULPS = 4  # float32 neighbours of α·√r tried for an rsLoRA alpha that divides back exactly


def convert(source, out, *, to: str, base=None, force: bool = False) -> dict:
    """Write `source` as a PEFT adapter folder (to="peft") or a kohya file (to="kohya"); returns a summary record.

    Args:
        source: the LoRA to convert: a PEFT adapter folder, or a single kohya or diffusers .safetensors file.
        out: the output: a folder for to="peft", a file whose name ends in .safetensors for to="kohya" (written
            atomically).
        to: "peft" or "kohya" (TARGETS); must differ from the source's own format.
        base: the base model (folder, file or hub id), optional: binds the adapter to it (module names resolved,
            shapes checked). Needed for a kohya source and for diffusers names with a component prefix; with
            to="kohya" it proves flattened names map back and lets whole saved tensors that repeat the base be left
            out. Its path is also recorded as base_model in a PEFT config.
        force: replace an existing output.

    Returns:
        source, source_format, to, output, base, the number of modules, the count of modules per rank and per
        scale, and kohya_prefix (None unless to="kohya").

    Raises:
        LoratvError: `to` is not a target (BadInputError); the source is already in that format; a factor holds a
            NaN or Inf; or the conversion cannot be exact (see the module docstring: names, scales, DoRA, biases,
            token rows and whole replaced tensors are refused where the target cannot hold them).
    """
    if to not in TARGETS:
        raise BadInputError(f"{param('to', to)}: choose one of {', '.join(TARGETS)}.")
    adapter = load_adapter(source)
    refuse_non_lora(adapter, "convert")  # only LoRA factors have a kohya form
    kind = adapter.format if isinstance(adapter, SingleFileAdapter) else "peft"
    if kind == to:
        raise LoratvError(f"{adapter.path}: is already a {FORMAT_NAMES[kind]} LoRA; nothing to convert.")
    base_ckpt = Checkpoint(base, label=f"base {base}") if base is not None else None
    modules = _modules(adapter, kind, base_ckpt)
    for m in modules.values():  # NaN/Inf refused before anything is written
        adapter.factor(m.a_key), adapter.factor(m.b_key)
    inputs = [adapter.path, base_ckpt.path if base_ckpt is not None else None]
    if to == "peft":
        _to_peft(adapter, modules, out, base, inputs, force)
    else:
        _to_kohya(adapter, modules, out, base_ckpt, inputs, force)
    return {
        "source": str(adapter.path),
        "source_format": kind,
        "to": to,
        "output": str(out),
        "base": str(base_ckpt.path) if base_ckpt is not None else None,
        "modules": len(modules),
        "ranks": {str(r): n for r, n in sorted(Counter(m.r for m in modules.values()).items())},
        "scales": {repr(s): n for s, n in sorted(Counter(m.scale for m in modules.values()).items())},
        "kohya_prefix": KOHYA_PREFIX if to == "kohya" else None,
    }


def _modules(adapter, kind: str, base) -> dict:
    """Module name -> LoraModule under the real module names: bound to the base when given (names resolved,
    orientation and shapes checked); kohya names cannot be resolved without one."""
    if base is not None:
        bind(adapter, base)
        return adapter.modules
    if kind == KOHYA:
        raise LoratvError(f"{adapter.path}: kohya module names are flattened (dots as underscores); give {param('base')} so "
                          "they can be mapped back to the base's module names.")
    if kind == DIFFUSERS and any(n.partition(".")[0] in COMPONENTS for n in adapter.modules):
        raise LoratvError(f"{adapter.path}: module names carry a diffusers component prefix; give {param('base')} to decide "
                          "whether it belongs to the module names.")
    return adapter.modules


# ---------------------------------------------------------------- to PEFT

def _to_peft(adapter, modules: dict, out, base, inputs, force: bool) -> None:
    config = lora_config({n: (m.r, m.alpha) for n, m in modules.items()}, adapter.use_rslora,
                         base_model=str(base) if base is not None else None,
                         fan_in_fan_out=any(m.kind == "conv1d" for m in modules.values()))
    _check_peft_scales(adapter, config, modules, Path(out) / CONFIG_NAME)
    copies = []
    for name, m in modules.items():
        a_name, b_name = (("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding"
                          else ("lora_A.weight", "lora_B.weight"))
        copies += [(f"{PREFIX}{name}.{a_name}", m.a_key), (f"{PREFIX}{name}.{b_name}", m.b_key)]
    with atomic_output_dir(out, inputs, force=force) as tmp:
        _write_copies(tmp / WEIGHTS_NAME, adapter, copies, {}, adapter.path)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_peft_scales(adapter, config: dict, modules: dict, where) -> None:
    """Read the config back as PEFT would (from JSON) and require each module's r and scale, bit for bit."""
    settings = parse_config(json.loads(json.dumps(config)), where)
    for name, m in modules.items():
        r = settings.rank_for(name)
        scale = settings.scale(r, settings.alpha_for(name))
        if r != m.r or scale != m.scale:
            raise LoratvError(f"{adapter.path}: module '{name}' would get r = {r}, scale {scale!r} from the PEFT config "
                              f"instead of r = {m.r}, scale {m.scale!r}; refusing an inexact conversion.")


# ---------------------------------------------------------------- to kohya

def _to_kohya(adapter, modules: dict, out, base, inputs, force: bool) -> None:
    if Path(out).suffix != ".safetensors":
        raise LoratvError(f"{out}: a kohya LoRA is one .safetensors file; give -o a name ending in .safetensors.")
    _refuse_for_kohya(adapter, modules, base)
    names = _kohya_names(adapter, modules, base)
    copies, alphas = [], {}
    for name, m in modules.items():
        lora_name = names[name]
        copies += [(f"{lora_name}.lora_down.weight", m.a_key), (f"{lora_name}.lora_up.weight", m.b_key)]
        alphas[f"{lora_name}.alpha"] = _kohya_alpha(adapter, m)
    with atomic_output_file(out, inputs, force=force) as tmp:
        _write_copies(tmp, adapter, copies, alphas, adapter.path)


def _refuse_for_kohya(adapter, modules: dict, base) -> None:
    """What a kohya file (factors and an alpha per module, nothing else) cannot hold. Whole tensors that only repeat
    the base (PEFT saves targeted embedding layers by default) are left out when --base proves it, bit for bit."""
    where = adapter.config_path
    peft_type = adapter.settings.peft_type
    if not kind_for(peft_type).factored:
        raise LoratvError(f"{where}: {peft_type} adapters have no lora_A/lora_B factors to write as kohya LoRA.")
    for name, m in modules.items():
        if m.has_variant("dora"):
            raise LoratvError(f"{where}: module '{name}' is DoRA (lora_magnitude_vector); a kohya LoRA cannot hold "
                              "its magnitudes, and LyCORIS' dora_scale follows another convention.")
        if m.has_variant("lora_bias"):
            raise LoratvError(f"{where}: module '{name}' has a LoRA bias (lora_bias), which a kohya LoRA cannot hold.")
    if adapter.token_rows:
        raise LoratvError(f"{where}: the adapter trains token rows of '{next(iter(adapter.token_rows))}' "
                          "(trainable_token_indices), which a kohya LoRA cannot hold.")
    for name, key in sorted(adapter.replacements.items()):
        if base is None or not _repeats_base(adapter, key, base, name):
            hint = "" if base is not None else "; if it only repeats the base, give --base to prove that"
            raise LoratvError(f"{where}: the adapter replaces the whole tensor '{name}' (modules_to_save, a saved bias "
                              f"or embedding), which a kohya LoRA cannot hold{hint}.")


def _repeats_base(adapter, key: str, base, name: str) -> bool:
    """Whether a saved whole tensor is the base tensor itself (same dtype, shape and bytes)."""
    if name not in base:
        return False
    mine, theirs = adapter.tensors.entry(key), base.entry(name)
    if (mine.dtype, tuple(mine.shape)) != (theirs.dtype, tuple(theirs.shape)):
        return False
    return adapter.tensors.read_raw(key) == base.read_raw(name)


def _kohya_names(adapter, modules: dict, base) -> dict:
    """module -> `lora_te_<flattened module>`; with a base, each name is proven to map back to its module alone."""
    names: dict[str, str] = {}
    seen: dict[str, str] = {}  # lora name -> the module that took it
    for name in modules:
        lora_name = KOHYA_PREFIX + name.replace(".", "_")
        if lora_name in seen:
            raise LoratvError(f"{adapter.path}: modules '{seen[lora_name]}' and '{name}' both flatten to "
                              f"'{lora_name}'; kohya names cannot tell them apart.")
        seen[lora_name] = name
        names[name] = lora_name
    if base is not None:
        lookup = flat_lookup(base)
        for name, lora_name in names.items():
            if kohya_module(adapter.path, lookup, lora_name, base) != name:
                raise LoratvError(f"{adapter.path}: kohya name '{lora_name}' would map back to another module of "
                                  f"the base than '{name}'.")
    return names


def _kohya_alpha(adapter, m) -> torch.Tensor:
    """A float32 alpha with alpha / r == the module's scale bit for bit (rsLoRA: near α·√r), or a refusal."""
    guess = torch.tensor(m.alpha * math.sqrt(m.r) if adapter.settings.use_rslora else m.alpha, dtype=torch.float32)
    candidates = [guess]
    for direction in (math.inf, -math.inf):
        c = guess
        for _ in range(ALPHA_SEARCH_ULPS):
            c = torch.nextafter(c, torch.tensor(direction, dtype=torch.float32))
            candidates.append(c)
    for c in candidates:
        value = float(c)
        if value != 0 and math.isfinite(value) and value / m.r == m.scale:
            return c.reshape(())
    rslora = adapter.settings.use_rslora
    rule = f"rsLoRA's alpha/√r (alpha {m.alpha:g}, r {m.r})" if rslora else f"alpha/r (alpha {m.alpha!r})"
    raise LoratvError(f"{adapter.config_path}: module '{m.module}' has scale {m.scale!r} from {rule}, and no float32 "
                      f"kohya alpha gives alpha / {m.r} equal to it bit for bit; refusing an inexact conversion.")


# ---------------------------------------------------------------- writing

def _write_copies(path: Path, adapter, copies, extra: dict, source) -> None:
    """One safetensors file: each (name, adapter key) copied byte for byte (dtype and shape as stored), then `extra`."""
    src = adapter.tensors
    specs = [(n, tuple(src.entry(k).shape)) for n, k in copies] + [(n, tuple(t.shape)) for n, t in extra.items()]
    metadata = {"format": "pt", "loratv_version": __version__, "loratv_operation": "convert", "source": str(source)}
    writer = SafetensorsWriter(path, specs, metadata)
    with finished(writer):
        for name, key in copies:
            entry = src.entry(key)
            writer.begin(name, entry.dtype, entry.shape)
            if src.format == "safetensors":
                writer.copy_from(entry.file, entry.start, entry.nbytes)
            else:
                for piece in src.iter_raw(key):
                    writer.write(piece)
            writer.end()
        for name, tensor in extra.items():
            writer.add(name, tensor)
