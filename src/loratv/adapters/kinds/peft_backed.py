"""Tuners merged by PEFT's own layer code (adapters/peft_backed.py), one base module at a time: BOFT, HRA,
FourierFT, VBLoRA, RandLoRA, C3A, DeLoRA, GLoRA, GraLoRA, HiRA, MiSS, PSOFT, PVeRA, RoAd, SHiRA, TinyLoRA, WaveFT,
LN Tuning, BEFT, DEFT, PEANuT, SuperTuning, OSF and standalone TrainableTokens, and the cases of native kinds with no
loratv formula (ROUTED: constrained OFT, OFT on Embedding, LoHa/LoKr Tucker factors). FRoD and UniLoRA are refused by
name (registry.REFUSED_TUNERS).

Each module's stored tensors are the ones under PEFT's tuner prefix (`hra_u`, `boft_R`, …); tensors outside
`base_model.model.` are shared (VBLoRA's bank, RandLoRA's bases). A module's layer is the base architecture's own
(transformers builds the model from config.json on the meta device: Linear, Conv1D, Embedding, ConvNd, LayerNorm …);
without a config transformers can build, it is told from the stored shapes and names (layer_template). Every
parameter of the layer the base stores (weight, bias) comes out of one PEFT merge in the base tensors' dtype, exactly
as `merge_and_unload` does on a model loaded in that dtype, and is rounded once to the output dtype.

compare evaluates PEFT's same program in float64 on float64 inputs as its reference. No rounding bound is derived
for these tuners, so they are never certified: each tensor is checked against a stated tolerance built from the
error PEFT's own merge makes on it (PeftTerms).
"""

import threading
from dataclasses import dataclass, fields

import torch

from loratv.adapters.kind import PREFIX, ROUTED_KEY, AdapterKind, TunerModule, TunerTerms
from loratv.adapters.peft_backed import EXTRA, PeftMerger
from loratv.adapters.peft_layers import layer_template
from loratv.adapters.settings import LoraSettings, check_bias, modules_to_save
from loratv.errors import LoratvError, UnsupportedAdapterError
from loratv.numerics.precision import unit_roundoff

# peft_type -> how messages name it
TUNERS = {
    "BOFT": "BOFT", "HRA": "HRA", "FOURIERFT": "FourierFT", "VBLORA": "VBLoRA", "RANDLORA": "RandLoRA", "C3A": "C3A",
    "DELORA": "DeLoRA", "GLORA": "GLoRA", "GRALORA": "GraLoRA", "HIRA": "HiRA", "MISS": "MiSS", "PSOFT": "PSOFT",
    "PVERA": "PVeRA", "ROAD": "RoAd", "SHIRA": "SHiRA", "TINYLORA": "TinyLoRA",
    "WAVEFT": "WaveFT", "LN_TUNING": "LN Tuning", "BEFT": "BEFT", "DEFT": "DEFT", "PEANUT": "PEANuT",
    "SUPERTUNING": "SuperTuning", "TRAINABLE_TOKENS": "TrainableTokens", "OSF": "OSF",
}
# tuners whose shared state PEFT sizes from every targeted layer: PEFT's model is built once around all of them
WHOLE_MODEL = ("RANDLORA", "PVERA", "TINYLORA")
HELD_MODULES = 2  # modules whose merged tensors are kept (compare works on two tensors at once)
TOLERANCE_FACTOR = 4  # compare's tolerance: ½ulp of the output plus this many times PEFT's own largest error


def _peft_tuner(peft_type: str, name: str, path):
    """(config class, tuner prefix) of PEFT's tuner, or the sentence naming the extra to install."""
    try:
        from peft import PeftType
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    except ImportError:
        raise UnsupportedAdapterError(f"{path}: {name} adapters are merged by PEFT's own layer code; "
                                      f"install it with `{EXTRA}`.") from None
    try:
        key = PeftType(peft_type)
        return PEFT_TYPE_TO_CONFIG_MAPPING[key], PEFT_TYPE_TO_TUNER_MAPPING[key].prefix
    except (ValueError, KeyError):
        raise UnsupportedAdapterError(f"{path}: the installed PEFT has no {name} tuner; upgrade it.") from None


class PeftBackedKind(AdapterKind):
    """A tuner whose merge is PEFT's layer `merge()`, run on one module at a time."""

    multiplicative = True  # the merged tensor comes whole from the base tensor, not as W + ΔW
    fixed_orientation = True

    def __init__(self, tuner: str, display_name: str, key: str | None = None):
        self.tuner = tuner  # PEFT's peft_type
        self.peft_type = key or tuner  # the registry's key
        self.display_name = display_name
        self.update = f"PEFT's own {tuner} layer merge(), one module at a time (loratv/adapters/peft_backed.py)"

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
        config_class, _ = _peft_tuner(self.tuner, self.display_name, path)
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
        _, prefix = _peft_tuner(self.tuner, self.display_name, adapter.config_path)
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
        # shared by the adapter's modules: their own and the shared tensor keys, layers, PEFT's model
        state: dict = {"templates": {}, "owned": groups, "shared": shared, "lock": threading.Lock()}
        for module, keys in groups.items():
            built = TunerModule(module, module + ".weight", self.peft_type, {**keys, **shared},
                                r=adapter.settings.r or None,
                                options={"state": state})
            built.multiplicative = True
            adapter.modules[module] = built

    def bind_module(self, adapter, module: TunerModule, base, target: str, model_type, deltas: dict,
                    copies: int = 1) -> None:
        """Bind to every parameter of the module's layer that the base stores (weight, and bias where there is
        one): all of them come out of PEFT's merge together.

        Args:
            adapter: the adapter.
            module: the module.
            base: the base checkpoint.
            target: `<module>.weight`.
            model_type: the base's config model_type, or None.
            deltas: the plan's base tensor -> modules (updated).
            copies: unused (1).

        Raises:
            LoratvError: the layer's stored tensors do not have the shapes of its layer.
        """
        state = module.options["state"]
        template = layer_template(state, base, module.module, model_type)
        state["templates"][module.module] = template
        state["base"] = base
        module.kind = type(template).__name__
        params = [name for name, _ in template.named_parameters(recurse=False) if f"{module.module}.{name}" in base]
        module.options["params"] = params
        for name in params:
            bound = module if name == "weight" else TunerModule(module.module, f"{module.module}.{name}",
                                                                 self.peft_type, module.keys, options=module.options)
            bound.multiplicative = True
            bound.kind = module.kind
            deltas.setdefault(bound.target, []).append(bound)

    def merged_params(self, adapter, module: TunerModule, dtype: torch.dtype | None = None, *,
                      reference: bool = False) -> dict:
        """The module's merged parameters from PEFT's merge: in the base tensors' dtype (as `merge` writes), in
        `dtype` (the base cast first, as PEFT on a model loaded in that dtype), or (reference) PEFT's program
        evaluated in float64 on float64 base and adapter tensors. The last two modules' results are kept, so a
        module's weight and bias come from one merge.

        Args:
            adapter: the adapter.
            module: a bound module.
            dtype: the dtype the merge runs in (None: the base tensors' own).
            reference: evaluate in float64, adapter tensors included (compare's reference).

        Returns:
            Parameter name -> merged tensor.

        Raises:
            LoratvError: PEFT cannot merge the module, or a stored tensor does not fit it.
        """
        options = module.options
        state = options["state"]
        with state["lock"]:  # compare works on two tensors at once; PEFT's model is shared
            results = state.setdefault("results", {})
            key = (module.module, dtype, reference)
            if key in results:
                return results[key]
            base = state["base"]
            params = {name: base.read(f"{module.module}.{name}") for name in options["params"]}
            if dtype is None or reference:
                dtype = params["weight"].dtype if "weight" in params else next(iter(params.values())).dtype
            params = {name: value.to(dtype) for name, value in params.items()}
            if state.get("merger") is None:
                state["merger"] = self._merger(adapter, state)
            merged = state["merger"].merge(module.module, params, reference=reference)
            recent = state.setdefault("recent", [])  # modules whose results are held, most recent last
            if module.module in recent:
                recent.remove(module.module)
            recent.append(module.module)
            for old in recent[:-HELD_MODULES]:
                for stale in [k for k in results if k[0] == old]:
                    del results[stale]
            del recent[:-HELD_MODULES]
            results[key] = merged
            return merged

    def _merger(self, adapter, state: dict) -> PeftMerger:
        owned, shared = state["owned"], state["shared"]

        def load(name):
            keys = [k for m in ([name] if name is not None else owned) for k in owned[m].values()]
            return {k: adapter.factor(k) for k in [*keys, *shared.values()]}

        config = {**adapter.settings.raw, "task_type": None, "modules_to_save": None}
        return PeftMerger(config, state["templates"], load, whole_model=self.tuner in WHOLE_MODEL,
                          source=str(adapter.tensors.path))

    def merged_value(self, adapter, module: TunerModule, w: torch.Tensor) -> torch.Tensor:
        """The merged weight or bias of the module, from PEFT's merge in the base dtype.

        Args:
            adapter: the adapter.
            module: the bound module (its target one of the layer's parameters).
            w: the base tensor in the compute dtype (its value is read again in the base dtype).

        Returns:
            The merged tensor, in the compute dtype.

        Raises:
            LoratvError: PEFT cannot merge the module, or a stored tensor does not fit it.
        """
        merged = self.merged_params(adapter, module)
        return merged[module.target[len(module.module) + 1:]].to(device=w.device, dtype=w.dtype)

    def own_keys(self, module: TunerModule) -> list:
        """The module's own stored tensors (the shared ones excluded).

        Args:
            module: a module of this kind.

        Returns:
            Adapter keys.
        """
        return list(module.options["state"]["owned"][module.module].values())

    def bound_terms(self, adapter, module: TunerModule, shape: tuple) -> "PeftTerms":
        """compare's terms: PEFT's program in float64 as the reference, with a stated tolerance (no derived bound).

        Args:
            adapter: the adapter.
            module: the bound module.
            shape: the base tensor's shape.

        Returns:
            The module's PeftTerms.
        """
        return PeftTerms(adapter, module, 0, kind=self)


@dataclass
class PeftTerms(TunerTerms):
    """compare's view of a PEFT-backed module: the reference is PEFT's own program evaluated in float64 on float64
    inputs; with no derived rounding bound, each element is held to a tolerance of

        ½·ulp_d(M) + TOLERANCE_FACTOR · E,   E = max |PEFT's merge of this tensor − reference|

    where PEFT's merge runs in the base dtype (what `loratv merge` and `merge_and_unload` on a model loaded in it
    compute) and, for an output dtype narrower than the base, also in the output dtype (the base cast first). A
    tensor within it is `EQUIVALENT within tolerance`, never certified."""

    certified = False

    def to(self, device) -> "PeftTerms":
        """A copy for `device` (the reference is computed there on first use).

        Args:
            device: the torch device.

        Returns:
            The new PeftTerms.
        """
        return PeftTerms(self.adapter, self.module, self.depth, kind=self.kind)

    def reference_and_error(self, base_dtype: torch.dtype, out_dtype: torch.dtype, device) -> tuple:
        """The float64 reference of the whole tensor and E, the largest error of PEFT's own merges of it.

        Args:
            base_dtype: the base tensor's stored dtype.
            out_dtype: the dtype of the model compared.
            device: where the reference is wanted.

        Returns:
            (reference tensor, E as a float).
        """
        key = ("reference", str(device))
        if key not in self.cache:
            kind, leaf = self.kind, self.module.target[len(self.module.module) + 1:]
            assert isinstance(kind, PeftBackedKind)
            reference = kind.merged_params(self.adapter, self.module, reference=True)[leaf]
            dtypes = [base_dtype] + ([out_dtype] if unit_roundoff(out_dtype) > unit_roundoff(base_dtype) else [])
            error = max(float((kind.merged_params(self.adapter, self.module, dtype)[leaf].to(torch.float64)
                               - reference).abs().max()) for dtype in dtypes)
            self.cache[key] = (reference.to(device), error)
        reference, self.reference_error = self.cache[key]
        return reference, self.reference_error

    def delta_and_bound(self, w: torch.Tensor, start: int, stop: int, base_dtype, out_dtype):
        """Rows of D = reference − W (float64), the bound on the float64 subtraction, and the tolerance function.

        Args:
            w: rows [start, stop) of the base tensor, float64, on the device of the terms.
            start: first row.
            stop: one past the last row.
            base_dtype: the base tensor's stored dtype.
            out_dtype: the dtype the merge writes.

        Returns:
            (D, its evaluation error, tolerance(m, ulp_m)), shaped like `w`.
        """
        reference, error = self.reference_and_error(base_dtype, out_dtype, w.device)
        rows = reference[start:stop].reshape(w.shape)
        d = rows - w
        evaluation = 2 * unit_roundoff(torch.float64) * (rows.abs() + w.abs())

        def tolerance(m, ulp_m):
            return torch.add(0.5 * ulp_m, TOLERANCE_FACTOR * error)

        return d, evaluation, tolerance


# tuners with a PeftBackedKind subclass of their own (a faster evaluation of the same product): kinds/hra.py
OWN_HOME = ("HRA",)
KINDS = tuple(PeftBackedKind(peft_type, name) for peft_type, name in TUNERS.items() if peft_type not in OWN_HOME)
# the cases of natively merged tuners that loratv has no formula for, merged by PEFT's code instead (AdapterKind.routed)
ROUTED = {
    "OFT": PeftBackedKind("OFT", "OFT (constrained or on Embedding, through PEFT)", ROUTED_KEY.format("OFT")),
    "LOHA": PeftBackedKind("LOHA", "LoHa (Tucker factors, through PEFT)", ROUTED_KEY.format("LOHA")),
    "LOKR": PeftBackedKind("LOKR", "LoKr (Tucker factors, through PEFT)", ROUTED_KEY.format("LOKR")),
    "ADALORA": PeftBackedKind("ADALORA", "AdaLoRA (on a convolution, through PEFT)", ROUTED_KEY.format("ADALORA")),
}
