"""The interface every adapter kind implements, and what the native (non-LoRA) kinds share.

An adapter kind is one PEFT `peft_type` (LoRA, LoHa, LoKr, AdaLoRA, VeRA, IA³, OFT, …). Each lives in one module of
`loratv/adapters/kinds/` and is registered once in `loratv/adapters/registry.py`; generic code (config parsing, key
mapping, binding, merge, compare, inspect) asks the registry for the kind and calls the methods below, never
comparing `peft_type` strings. docs/adapter-kinds.md describes the interface and walks through adding a kind.

Non-LoRA modules are `TunerModule`s: the merge computes each one's merged tensor whole with `merged_value`, and
compare certifies it with `bound_terms` (docs/math.md §12: a program of +, × and division by a constant that rounds
at most N = `depth` times along any path satisfies |computed − exact| ≤ γ_N(u)·(the program on |inputs|)).
LoRA (`LoraModule`s, merged row block by row block from their factors) is the kind with `factored = True`.
"""

import re
from dataclasses import dataclass, field

import torch

from loratv.adapters.settings import (
    COMMON_FIELDS,
    NEUTRAL_VALUES,
    LoraSettings,
    check_bias,
    modules_to_save,
)
from loratv.adapters.structures import CONV1D_MODEL_TYPES, CONV1D_MODULES
from loratv.errors import LoratvError, UnsupportedAdapterError
from loratv.numerics.precision import compute_dtype_for, gamma, merge_error_bound, ulp, unit_roundoff

PREFIX = "base_model.model."
FOREIGN = re.compile(r"\.(lora_|hada_|lokr_|vera_|ia3_|oft_|boft_)")
U64 = unit_roundoff(torch.float64)


ROUTED_KEY = "{}+PEFT"  # registry key of a native tuner's cases merged by PEFT's code (kinds/peft_backed.ROUTED)


@dataclass
class TunerModule:
    """One non-LoRA module: the tensors that make its update and how they combine (kind-specific `options`)."""

    module: str
    target: str
    peft_type: str
    keys: dict  # role -> adapter key
    r: int | None = None
    alpha: float | None = None
    scale: float = 1.0
    options: dict = field(default_factory=dict)
    kind: str = "linear"  # orientation of the base tensor: "linear" (out, in) or "conv1d" (in, out)
    magnitude_key = None  # the LoRA-only attributes generic code asks about
    bias_key = None
    multiplicative: bool = False  # set from the module's AdapterKind by its builder

    @property
    def is_bias(self) -> bool:
        """Whether the module's update targets a bias (its `options` set "bias"), not a weight."""
        return bool(self.options.get("bias"))


class AdapterKind:
    """One adapter kind (one PEFT `peft_type`): its config, its stored tensors, its merge and its bound.

    Subclasses set the class attributes and override the methods marked "kind-specific"; the defaults implement
    the shared behaviour of PEFT's non-LoRA tuners (one group of `<module>.<role>` tensors per module, merged whole).

    Attributes:
        peft_type: the `peft_type` of adapter_config.json (upper case), e.g. "LOHA".
        display_name: how messages and inspect name it, e.g. "LoHa".
        config_fields: every config field PEFT writes for this kind besides COMMON_FIELDS; an unknown field with a
            value that is not neutral is refused.
        refused_fields: (field, harmless value, why) triples: fields whose effect loratv cannot reproduce.
        stored_tensor_roles: the tensor names PEFT saves after `<module>.` (the roles of TunerModule.keys).
        shared_tensors: adapter-wide tensors (full key -> role) added to every module's keys (VeRA's projections).
        multiplicative: the merged weight is f(W), not W + ΔW (IA³, OFT): `apply_rows` instead of `additive_delta`.
        supports_conv: whether the kind merges into ConvNd weights (more than 2-D).
        fixed_orientation: the update is reshaped to the stored weight whatever its layout (LoHa, LoKr), so a 2-D
            weight is always "linear".
        refuses_conv1d: the kind refuses Conv1D (fan_in_fan_out) weights; orientation checks its fit transposed.
        factored: the modules are LoRA factors (LoraModule), merged by rows from B and A (kinds/lora.delta_rows) and
            certified from their factors; the TunerModule methods below do not apply.
        rank_field: the config field holding the rank.
        alpha_field: the config field holding alpha.
        update: inspect's one-line description of the update.
        compared: whether compare (and validate, precision) can check its merges; False refuses them by name.
    """

    peft_type: str = ""
    display_name: str = ""
    config_fields: frozenset = frozenset()
    refused_fields: tuple = ()
    stored_tensor_roles: tuple = ()
    shared_tensors: dict = {}
    multiplicative: bool = False
    supports_conv: bool = False
    fixed_orientation: bool = False
    refuses_conv1d: bool = False
    factored: bool = False
    rank_field: str = "r"
    alpha_field: str = "alpha"
    update: str = ""
    compared: bool = True  # compare (and validate, precision) can check its merges

    # --- configuration ---

    def routed(self, adapter) -> str | None:
        """The registry key of the kind that merges this adapter instead, for a case this kind has no formula for
        (kind-specific; default: None, this kind merges it).

        Args:
            adapter: the adapter, with `settings` and `tensors` set (before its keys are mapped).

        Returns:
            A registered key, or None.
        """
        return None

    def routed_on_base(self, adapter, base) -> str | None:
        """Like `routed`, for a case only the base reveals (kind-specific; default: None).

        Args:
            adapter: the adapter, its keys mapped by this kind.
            base: the base checkpoint it is about to be bound to.

        Returns:
            A registered key, or None.
        """
        return None

    def check_config(self, config: dict, path) -> None:
        """Kind-specific: refuse a configuration whose merge loratv cannot reproduce (after the unknown-field check).

        Args:
            config: the adapter_config.json dict.
            path: the file, for messages.

        Raises:
            LoratvError: naming the field and why.
        """

    def parse_settings(self, config: dict, path) -> LoraSettings:
        """Validate an adapter_config.json of this kind: unknown fields, refusals, bias, rank and alpha.

        Args:
            config: the adapter_config.json dict (field types already checked).
            path: the file, for messages.

        Returns:
            The settings; kind-specific fields are read later from `raw`.

        Raises:
            UnsupportedAdapterError: an unknown or refused field.
            LoratvError: an invalid value.
        """
        name = self.display_name
        known = set(self.config_fields) | COMMON_FIELDS
        unknown = sorted(k for k, v in config.items() if k not in known and v not in NEUTRAL_VALUES)
        if unknown:
            raise UnsupportedAdapterError(f"{path}: unknown {name} config field '{unknown[0]}' = {config[unknown[0]]!r} (written "
                              "by a newer PEFT?); refusing to guess its effect.")
        self.check_config(config, path)
        bias = check_bias(config, path)
        try:
            r = int(config.get(self.rank_field, 8) or 0)
            alpha = float(config.get(self.alpha_field, r) or 0)
            rank_pattern = dict(config.get("rank_pattern") or {})
            alpha_pattern = dict(config.get("alpha_pattern") or {})
        except (TypeError, ValueError):
            raise LoratvError(f"{path}: r, alpha, rank_pattern or alpha_pattern has an invalid value.") from None
        return LoraSettings(
            r=r, lora_alpha=alpha, use_rslora=False, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)), bias=bias, lora_bias=False, use_dora=False,
            modules_to_save=modules_to_save(config), peft_version=config.get("peft_version"),
            base_model_name_or_path=config.get("base_model_name_or_path"), raw=config, peft_type=self.peft_type,
            tuner_name=self.display_name,
        )

    # --- stored tensors ---

    def check_key(self, adapter, key: str, name: str) -> None:
        """Kind-specific: refuse a stored tensor this kind's merge does not cover (called for every key).

        Args:
            adapter: the adapter being mapped.
            key: the full adapter key.
            name: the key without PEFT's prefix.

        Raises:
            LoratvError: naming the tensor and why.
        """

    def check_groups(self, adapter, groups: dict, shared: dict) -> None:
        """Kind-specific: check the grouped tensors as a whole (e.g. VeRA's shared projections are present).

        Args:
            adapter: the adapter being mapped.
            groups: module -> {role: key}.
            shared: role -> key of the adapter-wide tensors found.

        Raises:
            LoratvError: a missing or inconsistent tensor.
        """

    def map_keys(self, adapter) -> None:
        """Group the file's tensors by module into `adapter.modules`; other tensors become replacements (saved
        biases, modules_to_save), as for LoRA.

        Args:
            adapter: the adapter, with `settings` and `tensors` set.

        Raises:
            LoratvError: a tensor without PEFT's prefix, a tensor of another kind, or a module that does not build.
        """
        file = adapter.tensors.path
        groups: dict[str, dict] = {}
        shared = {}
        for key in adapter.tensors.names():
            if key in self.shared_tensors:
                shared[self.shared_tensors[key]] = key
                continue
            if not key.startswith(PREFIX):
                raise LoratvError(f"{file}: tensor '{key}' lacks PEFT's '{PREFIX}' prefix; is this a PEFT adapter?")
            name = key[len(PREFIX):]
            if ".modules_to_save." in name or ".original_module." in name:
                continue
            role = next((p for p in self.stored_tensor_roles if name.endswith("." + p)), None)
            self.check_key(adapter, key, name)
            if role is not None:
                groups.setdefault(name[: -len(role) - 1], {})[role] = key
            elif FOREIGN.search(name):
                raise LoratvError(f"{file}: tensor '{key}' is not a {adapter.settings.tuner_name} tensor loratv knows.")
            else:
                adapter.replacements[name] = key
        self.check_groups(adapter, groups, shared)
        for module, keys in groups.items():
            built = self.build_module(adapter, module, {**keys, **shared})
            built.multiplicative = self.multiplicative
            adapter.modules[module] = built

    def build_module(self, adapter, module: str, keys: dict) -> TunerModule:
        """Kind-specific: one module from its tensors (shapes checked, rank and scale resolved).

        Args:
            adapter: the adapter.
            module: the module name (without PEFT's prefix).
            keys: role -> adapter key, shared tensors included.

        Returns:
            The module, targeting `<module>.weight`.

        Raises:
            LoratvError: a missing tensor or shapes that do not chain.
        """
        raise NotImplementedError(f"{type(self).__name__}.build_module")

    # --- binding ---

    def resolve_target(self, adapter, module: TunerModule, base, target: str) -> tuple:
        """Where a module whose target the base lacks lands instead (LoRA: a MultiheadAttention); the default keeps
        it (bind then reports the missing tensor).

        Args:
            adapter: the adapter.
            module: the module.
            base: the base checkpoint.
            target: the base tensor name tried so far.

        Returns:
            (base tensor name, how many times the update is applied).
        """
        return target, 1

    def bind_module(self, adapter, module: TunerModule, base, target: str, model_type, deltas: dict,
                    copies: int = 1) -> None:
        """Bind one module to its base tensor `target`: orientation from fan_in_fan_out (PEFT forces it for Conv1D),
        shapes checked (`check_fits`); IA³ also scales the bias of a non-feedforward module (`bias_module`).

        Args:
            adapter: the adapter.
            module: the module.
            base: the base checkpoint.
            target: the base tensor it merges into.
            model_type: the base's config model_type, or None.
            deltas: the plan's base tensor -> modules (updated).
            copies: how many times the update is applied (1 for every non-LoRA kind).

        Raises:
            LoratvError: the update does not fit the base tensor.
        """
        shape = tuple(base.entry(target).shape)
        if len(shape) > 2:
            module.kind = "conv"
        elif self.fixed_orientation:
            module.kind = "linear"  # PEFT reshapes their delta to the stored weight whatever its layout
        else:
            module.kind = self.orientation(adapter, module, shape, model_type)
        self.check_fits(adapter, module, shape)
        deltas.setdefault(target, []).append(module)
        bias = module.module + ".bias"
        bias_module = self.bias_module(module)
        if bias_module is not None and bias in base:
            deltas.setdefault(bias, []).append(bias_module)

    def orientation(self, adapter, module: TunerModule, shape: tuple, model_type) -> str:
        """"linear" (out, in) or "conv1d" (in, out) for an AdaLoRA/VeRA/IA³/OFT module on a 2-D weight, layer by layer.

        The saved `fan_in_fan_out` cannot decide: PEFT switches it per layer while it builds the model (ia3/model.py
        `_create_new_module`: True for a Conv1D, False for a Linear) and saves the value the last layer left, so a model
        mixing Conv1D and Linear layers (GPT-2's `c_attn` and its `lm_head`/`score` head) saves one flag for both kinds.
        So: GPT-2-family Conv1D modules are Conv1D; otherwise the orientation the adapter's shapes fit; only when both fit
        (a square weight) does the flag decide, outside the GPT-2 family.

        Args:
            adapter: the adapter.
            module: the module (its `kind` is tried both ways).
            shape: the base tensor's shape (2-D).
            model_type: the base's config model_type, or None.

        Returns:
            "linear" or "conv1d".
        """
        leaf = module.module.rsplit(".", 1)[-1]
        if model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_MODULES:
            return "conv1d"
        fitting = []
        for kind in ("linear", "conv1d"):
            # OFT refuses Conv1D outright; its fit is that of the transposed weight, so a refusal stays a refusal
            oft_conv1d = kind == "conv1d" and self.refuses_conv1d
            module.kind = "linear" if oft_conv1d else kind
            try:
                self.check_fits(adapter, module, shape[::-1] if oft_conv1d else shape)
                fitting.append(kind)
            except LoratvError:
                pass
        if len(fitting) == 1:
            return fitting[0]
        if model_type in CONV1D_MODEL_TYPES:
            return "linear"
        return "conv1d" if adapter.settings.fan_in_fan_out else "linear"  # none fits: check_fits says why

    def check_fits(self, adapter, module: TunerModule, shape: tuple) -> None:
        """The module's update must fit the base tensor of `shape` (in `module.kind`'s orientation).

        Args:
            adapter: the adapter.
            module: the module, its `kind` set.
            shape: the base tensor's shape.

        Raises:
            LoratvError: naming the module, the base tensor and what does not fit.
        """
        conv = len(shape) > 2
        fail: str | None
        if (conv and not self.supports_conv) or len(shape) < 2:
            fail = f"is {len(shape)}-D; loratv merges {adapter.settings.tuner_name} into Linear/Conv1D weights only"
        else:
            fail = self.fit_problem(adapter, module, shape)
        if fail:
            raise LoratvError(f"{adapter.tensors.path}: {adapter.settings.tuner_name} module '{module.module}': base "
                              f"tensor '{module.target}' {list(shape)} {fail}.")

    def fit_problem(self, adapter, module: TunerModule, shape: tuple) -> str | None:
        """Kind-specific: why the update does not fit a base tensor of `shape`, or None when it does.

        Args:
            adapter: the adapter.
            module: the module, its `kind` set.
            shape: the base tensor's shape (at least 2-D; more only when `supports_conv`).

        Returns:
            The end of a sentence ("does not fit …"), or None.
        """
        return None

    def bias_module(self, module: TunerModule) -> TunerModule | None:
        """Kind-specific: a second module the merge applies to `<module>.bias` when the base stores it (IA³).

        Args:
            module: the bound weight module.

        Returns:
            The bias module, or None.
        """
        return None

    # --- merge ---

    def additive_delta(self, adapter, module: TunerModule, shape: tuple, dtype: torch.dtype, device,
                       absolute: bool = False, exact_scale: bool = False) -> torch.Tensor:
        """Kind-specific (additive kinds): ΔW in the base tensor's stored orientation and shape.

        Args:
            adapter: the adapter.
            module: the bound module.
            shape: the base tensor's shape.
            dtype: the dtype it is computed in.
            device: the device it is computed on.
            absolute: evaluate the same program on absolute values (compare's G).
            exact_scale: use the float64 scale (compare's reference) instead of the one PEFT applies.

        Returns:
            ΔW.

        Raises:
            NotImplementedError: a multiplicative kind (it has no additive delta).
        """
        raise NotImplementedError(f"{self.display_name} is multiplicative: it has no additive delta")

    def apply_rows(self, adapter, module: TunerModule, x: torch.Tensor, start: int, stop: int,
                   absolute: bool = False, cache: dict | None = None) -> torch.Tensor:
        """Kind-specific (multiplicative kinds): the module applied to rows [start, stop) of `x` in float64.

        Args:
            adapter: the adapter.
            module: the bound module.
            x: rows [start, stop) of a tensor of the base's shape.
            start: first row.
            stop: one past the last row.
            absolute: evaluate on absolute values.
            cache: per-module memo of what does not depend on the rows.

        Returns:
            f(x) for these rows.

        Raises:
            NotImplementedError: an additive kind.
        """
        raise NotImplementedError(f"{self.display_name} is additive: use additive_delta")

    def merged_value(self, adapter, module: TunerModule, w: torch.Tensor) -> torch.Tensor:
        """The merged tensor from `w` (the whole base tensor, already in the compute dtype), as PEFT's merge
        computes it; the default adds `additive_delta`.

        Args:
            adapter: the adapter.
            module: the bound module.
            w: the base tensor in the compute dtype.

        Returns:
            The merged tensor, in the compute dtype.
        """
        return w + self.additive_delta(adapter, module, tuple(w.shape), w.dtype, w.device)

    # --- compare ---

    def depth(self, module: TunerModule, shape: tuple) -> int:
        """Kind-specific: N of γ_N, the roundings along any path of the evaluation (scales' rounding included).

        Args:
            module: the bound module.
            shape: the base tensor's shape.

        Returns:
            N.

        Raises:
            NotImplementedError: a kind that does not override it.
        """
        raise NotImplementedError(f"{type(self).__name__}.depth")

    def check_certifiable(self, adapter, module: TunerModule) -> None:
        """Kind-specific: refuse to certify a module whose merge has no derived bound.

        Args:
            adapter: the adapter.
            module: the bound module.

        Raises:
            LoratvError: why compare cannot certify it.
        """

    def bound_terms(self, adapter, module: TunerModule, shape: tuple) -> "TunerTerms":
        """compare's view of one module on a base tensor of `shape`: the exact delta and its rounding bound.

        Args:
            adapter: the adapter.
            module: the bound module.
            shape: the base tensor's shape.

        Returns:
            The module's TunerTerms.

        Raises:
            LoratvError: the module has no certified bound (check_certifiable).
        """
        self.check_certifiable(adapter, module)
        n = self.depth(module, shape)
        if self.multiplicative:
            return TunerTerms(adapter, module, n, kind=self)
        value = self.additive_delta(adapter, module, shape, torch.float64, "cpu", exact_scale=True)
        abs_value = self.additive_delta(adapter, module, shape, torch.float64, "cpu", absolute=True, exact_scale=True)
        rows = shape[0] if shape else 1
        return TunerTerms(adapter, module, n, value.reshape(rows, -1), abs_value.reshape(rows, -1), kind=self)

    # --- inspect ---

    def own_keys(self, module: TunerModule) -> list:
        """The module's own stored tensors (adapter-wide shared tensors excluded).

        Args:
            module: a module of this kind.

        Returns:
            Adapter keys.
        """
        return [k for k in module.keys.values() if k not in self.shared_tensors]

    def describe(self, adapter, module: TunerModule) -> dict:
        """inspect's entry for one module: its own stored tensors and what its update does.

        Args:
            adapter: the adapter.
            module: a module of this kind.

        Returns:
            A JSON-ready dict.
        """
        own = self.own_keys(module)
        return {
            "module": module.module, "target": module.target, "kind": module.kind, "rank": module.r,
            "alpha": module.alpha, "scale": module.scale,
            "stored_parameters": sum(adapter.tensors.entry(k).numel for k in own), "dora": False,
            "update": self.update, "tensors": sorted(k.rpartition(module.module + ".")[2] for k in own),
        }


@dataclass
class TunerTerms:
    """compare's terms of one TunerModule: the float64 delta (additive) or the module itself (multiplicative)."""

    adapter: object
    module: TunerModule
    depth: int
    value: torch.Tensor | None = None  # additive: ΔW in float64, whole tensor, stored orientation
    abs_value: torch.Tensor | None = None  # additive: G
    cache: dict = field(default_factory=dict)  # multiplicative: the float64 vector or rotations, per device
    kind: AdapterKind | None = None  # the module's kind (its apply_rows)
    certified = True  # delta_and_bound gives a derived rounding bound (PEFT-backed kinds: a stated tolerance)
    reference_error: float | None = None  # uncertified terms: the error the tolerance is built from

    def to(self, device) -> "TunerTerms":
        """A copy with the float64 delta tensors on `device` (the per-device cache starts empty).

        Args:
            device: the torch device to move to.

        Returns:
            The new TunerTerms.
        """
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TunerTerms(self.adapter, self.module, self.depth, move(self.value), move(self.abs_value),
                          kind=self.kind)

    def delta_and_bound(self, w: torch.Tensor, start: int, stop: int, base_dtype, out_dtype):
        """Rows of D = merged − W (float64), the bound on D's own float64 evaluation error, and a function of
        (M, ulp_d(M)) giving the merge bound of these rows.

        Args:
            w: rows [start, stop) of the base tensor, float64, on the device of the terms.
            start: first row.
            stop: one past the last row.
            base_dtype: the base tensor's stored dtype.
            out_dtype: the dtype the merge writes.

        Returns:
            (D, the bound on D's evaluation error, bound(m, ulp_m) giving the per-element merge error bound), all
            shaped like `w`.
        """
        c = compute_dtype_for(base_dtype, out_dtype)
        if not self.module.multiplicative:
            assert self.value is not None and self.abs_value is not None  # set for every additive module
            d = self.value[start:stop].reshape(w.shape).clone()
            g = self.abs_value[start:stop].reshape(w.shape)

            def additive_bound(m, ulp_m):
                return merge_error_bound(w, m, g, additions=1, k=self.depth, base_dtype=base_dtype,
                                         out_dtype=out_dtype, ulp_m=ulp_m)

            return d, gamma(self.depth, torch.float64) * g, additive_bound
        assert self.kind is not None  # set for every multiplicative module
        apply_rows = self.kind.apply_rows
        merged = apply_rows(self.adapter, self.module, w, start, stop, cache=self.cache)
        g = apply_rows(self.adapter, self.module, w.abs(), start, stop, absolute=True, cache=self.cache)
        d = merged - w
        evaluation = gamma(self.depth, torch.float64) * g + 2 * U64 * (merged.abs() + w.abs())

        def multiplicative_bound(m, ulp_m):
            bound = torch.add(0.5 * ulp_m, g, alpha=gamma(self.depth, c))
            if unit_roundoff(out_dtype) > unit_roundoff(c) and base_dtype != out_dtype:
                shift = apply_rows(self.adapter, self.module, 0.5 * ulp(w, out_dtype), start, stop, absolute=True,
                                   cache=self.cache)
                bound.add_(shift, alpha=1 + gamma(self.depth, c))
            return bound

        return d, evaluation, multiplicative_bound


# --- helpers the native kinds share ---

def tensor_shape(adapter, key: str) -> tuple:
    """The stored shape of adapter tensor `key`.

    Args:
        adapter: the adapter.
        key: an adapter key.

    Returns:
        Its shape.
    """
    return tuple(adapter.tensors.entry(key).shape)


def require(adapter, module: str, keys: dict, *roles: str) -> None:
    """Refuse a module lacking one of `roles`.

    Args:
        adapter: the adapter.
        module: the module name.
        keys: role -> key found.
        *roles: the roles it needs.

    Raises:
        LoratvError: naming the missing roles.
    """
    missing = [r for r in roles if r not in keys]
    if missing:
        raise LoratvError(f"{adapter.tensors.path}: {adapter.settings.tuner_name} module '{module}' lacks "
                          f"{', '.join(missing)}.")


def rank_and_scale(adapter, module: str, found_rank):
    """LoHa/LoKr: r and alpha from the config and its patterns (PEFT's matcher); scale = alpha / r.

    Args:
        adapter: the adapter.
        module: the module name.
        found_rank: the rank the stored factors have, or None (stored whole).

    Returns:
        (r, alpha, scale).

    Raises:
        LoratvError: the file's rank differs from the config's.
    """
    r = adapter.settings.rank_for(module)
    if found_rank is not None and found_rank != r:
        raise LoratvError(f"{adapter.config_path}: module '{module}' has rank {found_rank} in the file but {r} by the "
                          "config's r/rank_pattern.")
    alpha = adapter.settings.alpha_for(module)
    return r, alpha, alpha / r


def module_tensors(adapter, module: TunerModule, dtype, device, absolute: bool = False) -> dict:
    """Every tensor of `module` (role -> tensor) in `dtype` on `device`, absolute values when `absolute`.

    Args:
        adapter: the adapter.
        module: the module.
        dtype: the dtype.
        device: the device.
        absolute: take absolute values.

    Returns:
        role -> tensor.
    """
    out = {}
    for role, key in module.keys.items():
        t = adapter.factor(key).to(device=device, dtype=dtype)
        out[role] = t.abs() if absolute else t
    return out
