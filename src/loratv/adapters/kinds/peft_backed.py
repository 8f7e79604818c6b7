"""Tuners merged by PEFT's own layer code (adapters/peft_backed.py), one base module at a time: BOFT, HRA,
FourierFT, VBLoRA, RandLoRA, C3A, DeLoRA, GLoRA, GraLoRA, HiRA, MiSS, PSOFT, PVeRA, RoAd, SHiRA, TinyLoRA, WaveFT,
LN Tuning, BEFT, DEFT, PEANuT and SuperTuning (FRoD and UniLoRA are refused by name: registry.REFUSED_TUNERS).

Each module's stored tensors are the ones under PEFT's tuner prefix (`hra_u`, `boft_R`, …); tensors outside
`base_model.model.` are shared (VBLoRA's bank, RandLoRA's bases). A module merges into its Linear layer's weight and
bias together (BEFT and LN Tuning change the bias), computed by PEFT in the base tensors' dtype, exactly as
`merge_and_unload` does on a model loaded in that dtype, then rounded once to the output dtype. Only nn.Linear
targets are merged so far; Conv1D, ConvNd, Embedding and MultiheadAttention targets are refused by name, and so is
compare (no rounding bound is derived for these tuners yet).
"""

from dataclasses import fields

import torch
from torch import nn

from loratv.adapters.kind import PREFIX, AdapterKind, TunerModule, TunerTerms
from loratv.adapters.peft_backed import EXTRA, peft_merged_module
from loratv.adapters.settings import LoraSettings, check_bias, modules_to_save
from loratv.adapters.structures import CONV1D_MODEL_TYPES, CONV1D_MODULES
from loratv.errors import LoratvError, UnsupportedAdapterError

# peft_type -> how messages name it
TUNERS = {
    "BOFT": "BOFT", "HRA": "HRA", "FOURIERFT": "FourierFT", "VBLORA": "VBLoRA", "RANDLORA": "RandLoRA", "C3A": "C3A",
    "DELORA": "DeLoRA", "GLORA": "GLoRA", "GRALORA": "GraLoRA", "HIRA": "HiRA", "MISS": "MiSS", "PSOFT": "PSOFT",
    "PVERA": "PVeRA", "ROAD": "RoAd", "SHIRA": "SHiRA", "TINYLORA": "TinyLoRA",
    "WAVEFT": "WaveFT", "LN_TUNING": "LN Tuning", "BEFT": "BEFT", "DEFT": "DEFT", "PEANUT": "PEANuT",
    "SUPERTUNING": "SuperTuning",
}
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "shared")


def _peft_tuner(peft_type: str, path):
    """(config class, tuner prefix) of PEFT's tuner, or the sentence naming the extra to install."""
    try:
        from peft import PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    except ImportError:
        raise UnsupportedAdapterError(f"{path}: {TUNERS[peft_type]} adapters are merged by PEFT's own layer code; "
                                      f"install it with `{EXTRA}`.") from None
    try:
        key = PeftType(peft_type)
        return PEFT_TYPE_TO_CONFIG_MAPPING[key], PEFT_TYPE_TO_TUNER_MAPPING[key].prefix
    except (ValueError, KeyError):
        raise UnsupportedAdapterError(f"{path}: the installed PEFT has no {TUNERS[peft_type]} tuner; upgrade it.") from None


class PeftBackedKind(AdapterKind):
    """A tuner whose merge is PEFT's layer `merge()`, run on one module at a time."""

    multiplicative = True  # the merged tensor comes whole from the base tensor, not as W + ΔW
    compared = False  # no rounding bound derived yet: compare refuses (bound_terms)
    fixed_orientation = True

    def __init__(self, peft_type: str):
        self.peft_type = peft_type
        self.display_name = TUNERS[peft_type]
        self.update = "PEFT's own merge of the module (loratv/adapters/peft_backed.py)"

    def parse_settings(self, config: dict, path) -> LoraSettings:
        """Validate the config against PEFT's own config class of the tuner (its fields, and its checks).

        Args:
            config: the adapter_config.json dict.
            path: the file, for messages.

        Returns:
            The settings (the tuner's fields stay in `raw`).

        Raises:
            UnsupportedAdapterError: PEFT is not installed, or a field the installed PEFT does not know.
            LoratvError: PEFT's config class refuses a value.
        """
        config_class, _ = _peft_tuner(self.peft_type, path)
        known = {f.name for f in fields(config_class)}
        unknown = sorted(k for k in config if k not in known)
        if unknown:
            raise UnsupportedAdapterError(f"{path}: {self.display_name} config field '{unknown[0]}' is unknown to the "
                                          "installed PEFT (written by a newer one?); refusing to guess its effect.")
        try:
            config_class(**{k: v for k, v in config.items() if k != "peft_type"})
        except (TypeError, ValueError) as exc:
            raise LoratvError(f"{path}: PEFT refuses this {self.display_name} config: "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.") from None
        r = config.get("r")
        return LoraSettings(
            r=int(r) if isinstance(r, int) else 0, lora_alpha=0.0, use_rslora=False, rank_pattern={},
            alpha_pattern={}, fan_in_fan_out=bool(config.get("fan_in_fan_out", False)), bias=check_bias(config, path),
            lora_bias=False, use_dora=False, modules_to_save=modules_to_save(config),
            peft_version=config.get("peft_version"), base_model_name_or_path=config.get("base_model_name_or_path"),
            raw=config, peft_type=self.peft_type, tuner_name=self.display_name)

    def map_keys(self, adapter) -> None:
        """Group the tensors by module: a module's are those with a name part under PEFT's tuner prefix; tensors
        outside `base_model.model.` are shared by every module.

        Args:
            adapter: the adapter, with `settings` and `tensors` set.

        Raises:
            LoratvError: no module found.
        """
        _, prefix = _peft_tuner(self.peft_type, adapter.config_path)
        groups: dict[str, dict] = {}
        shared: dict[str, str] = {}
        for key in adapter.tensors.names():
            if not key.startswith(PREFIX):
                shared[key] = key
                continue
            name = key[len(PREFIX):]
            if ".modules_to_save." in name or ".original_module." in name:
                continue
            parts = name.split(".")
            at = next((i for i, part in enumerate(parts) if i and part.startswith(prefix)), None)
            if at is None:
                adapter.replacements[name] = key  # a saved base value, as for LoRA
                continue
            groups.setdefault(".".join(parts[:at]), {})[".".join(parts[at:])] = key
        if not groups:
            raise LoratvError(f"{adapter.tensors.path}: holds no {self.display_name} module tensor "
                              f"(no name part starting with '{prefix}').")
        layers: dict[str, tuple] = {}  # module -> (weight shape, has bias), filled as modules bind
        for module, keys in groups.items():
            built = TunerModule(module, module + ".weight", self.peft_type, {**keys, **shared},
                                r=adapter.settings.r or None,
                                options={"layers": layers, "shared": shared, "own": dict(keys)})
            built.multiplicative = True
            adapter.modules[module] = built

    def bind_module(self, adapter, module: TunerModule, base, target: str, model_type, deltas: dict,
                    copies: int = 1) -> None:
        """Bind to `<module>.weight` (and `<module>.bias` when the base stores it): both come out of PEFT's merge.

        Args:
            adapter: the adapter.
            module: the module.
            base: the base checkpoint.
            target: `<module>.weight`.
            model_type: the base's config model_type, or None.
            deltas: the plan's base tensor -> modules (updated).
            copies: unused (1).

        Raises:
            UnsupportedAdapterError: a target that is not a Linear layer (not merged by this kind yet).
        """
        shape = tuple(base.entry(target).shape)
        leaf = module.module.rsplit(".", 1)[-1]
        if len(shape) != 2 or leaf in INPUT_EMBEDDINGS or (model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_MODULES):
            raise UnsupportedAdapterError(
                f"{adapter.tensors.path}: {self.display_name} module '{module.module}' targets a layer that is not a "
                f"Linear ('{target}' {list(shape)}); loratv merges {self.display_name} into Linear layers only so far.")
        bias = module.module + ".bias"
        has_bias = bias in base
        module.kind = "linear"
        module.options["layers"][module.module] = (shape, has_bias)
        module.options["base"] = base
        deltas.setdefault(target, []).append(module)
        if has_bias:
            bias_module = TunerModule(module.module, bias, self.peft_type, module.keys, options=module.options)
            bias_module.multiplicative = True
            bias_module.kind = "linear"
            deltas.setdefault(bias, []).append(bias_module)

    def merged_value(self, adapter, module: TunerModule, w: torch.Tensor) -> torch.Tensor:
        """The merged weight or bias of the module, from PEFT's merge in the base dtype.

        Args:
            adapter: the adapter.
            module: the bound module (its target the weight or the bias).
            w: the base tensor in the compute dtype (its value is read again in the base dtype).

        Returns:
            The merged tensor, in the compute dtype.

        Raises:
            LoratvError: PEFT cannot merge the module, or a stored tensor does not fit it.
        """
        options = module.options
        base = options["base"]
        weight_name = module.module + ".weight"
        weight = base.read(weight_name)
        layers = {}
        for name, (shape, has_bias) in options["layers"].items():
            layers[name] = nn.Linear(shape[1], shape[0], bias=has_bias, dtype=weight.dtype, device="meta")
        (out_features, in_features), has_bias = options["layers"][module.module]
        real = nn.Linear(in_features, out_features, bias=has_bias, dtype=weight.dtype)
        with torch.no_grad():
            real.weight.copy_(weight)
            if has_bias:
                real.bias.copy_(base.read(module.module + ".bias").to(weight.dtype))
        layers[module.module] = real
        tensors = {key: adapter.factor(key) for key in {**options["own"], **options["shared"]}.values()}
        config = {**adapter.settings.raw, "task_type": None, "modules_to_save": None}
        merged = peft_merged_module(config, layers, module.module, tensors, source=str(adapter.tensors.path))
        leaf = "weight" if module.target == weight_name else "bias"
        return merged[leaf].to(device=w.device, dtype=w.dtype)

    def own_keys(self, module: TunerModule) -> list:
        """The module's own stored tensors (the shared ones excluded).

        Args:
            module: a module of this kind.

        Returns:
            Adapter keys.
        """
        return list(module.options["own"].values())

    def bound_terms(self, adapter, module: TunerModule, shape: tuple) -> TunerTerms:
        """Refused: no rounding bound is derived for PEFT-backed tuners yet.

        Args:
            adapter: the adapter.
            module: the bound module.
            shape: the base tensor's shape.

        Returns:
            Never.

        Raises:
            UnsupportedAdapterError: always, naming the tuner.
        """
        raise UnsupportedAdapterError(f"{adapter.config_path}: compare of {self.display_name} adapters is not "
                                      f"available yet (merge is: it runs PEFT's own {self.display_name} code).")


KINDS = tuple(PeftBackedKind(peft_type) for peft_type in TUNERS)
