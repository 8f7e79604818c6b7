"""`adapter_config.json` semantics: which adapters loratv merges, and each module's rank, alpha and scaling.

Everything here follows PEFT (summarised in docs/peft-format.md §1 and §3, from PEFT's LoraConfig in
src/peft/tuners/lora/config.py and get_pattern_key in src/peft/utils/other.py). Where PEFT would
silently do something else (drop unknown keys, re-run an SVD), loratv refuses instead.
"""

import math
import re
from dataclasses import dataclass

from loratv.errors import LoratvError

# Fields of PEFT's LoraConfig (0.21) and what a value that changes nothing looks like.
KNOWN_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config",
    "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens",
    "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication", "lora_bias", "target_parameters",
    "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying", "runtime_config",
}
NEUTRAL_VALUES = (None, False, {}, [], "", 0)

COMMON_FIELDS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode"}
LYCORIS_FIELDS = {"r", "alpha", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "init_weights",
                  "layers_to_transform", "layers_pattern", "module_dropout", "modules_to_save", "rank_dropout",
                  "use_effective_conv2d"}
# Fields of PEFT 0.21's other tuner configs whose merge loratv computes from the file (loratv/tuners.py)
TUNER_FIELDS = {
    "LOHA": LYCORIS_FIELDS,
    "LOKR": LYCORIS_FIELDS | {"decompose_both", "decompose_factor", "rank_dropout_scale"},
    "ADALORA": KNOWN_FIELDS | {"target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                               "total_step"},
    "VERA": {"r", "target_modules", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
             "fan_in_fan_out", "bias", "modules_to_save", "init_weights", "layers_to_transform", "layers_pattern"},
    "IA3": {"target_modules", "exclude_modules", "feedforward_modules", "fan_in_fan_out", "modules_to_save",
            "init_ia3_weights"},
    "OFT": {"r", "oft_block_size", "module_dropout", "target_modules", "fan_in_fan_out", "bias", "exclude_modules",
            "init_weights", "layers_to_transform", "layers_pattern", "modules_to_save", "coft", "eps", "block_share",
            "use_cayley_neumann", "num_cayley_neumann_terms"},
}
TUNER_NAMES = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr", "VERA": "VeRA", "OFT": "OFT",
               "IA3": "IA³"}
OTHER_TUNERS = {
    "BOFT": "BOFT (butterfly OFT; its permutations are not rebuilt by loratv)",
    "PROMPT_TUNING": "prompt tuning (no weights to merge)", "PREFIX_TUNING": "prefix tuning (no weights to merge)",
    "P_TUNING": "p-tuning (no weights to merge)", "ADAPTION_PROMPT": "adaption prompt (no weights to merge)",
}
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# (config field, value that is harmless, why a merge from the file alone is impossible or not yet supported)
REFUSED_FIELDS = [
    ("use_bdlora", None, "block-diagonal LoRA (BD-LoRA, use_bdlora) is not merged by loratv: its lora_A or lora_B "
                         "stores only the diagonal blocks, which PEFT's BdLoraLinearVariant expands with block_diag "
                         "and whose delta it rounds to the base dtype before adding; loratv does not rebuild either"),
    ("alora_invocation_tokens", None, "aLoRA adapters cannot be merged (PEFT refuses too)"),
    ("arrow_config", None, "Arrow routing adapters cannot be merged"),
    ("kasa_config", None, "KaSA truncates the base weight by SVD, so the merge needs more than the adapter file"),
    ("megatron_config", None, "Megatron tensor-parallel adapters are sharded; gather them first"),
    ("layer_replication", None, "layer_replication changes the model's structure; PEFT refuses to merge it too"),
    ("use_qalora", False, "QALoRA adapters belong to GPTQ-quantized bases, which cannot be merged exactly"),
]


@dataclass(frozen=True)
class LoraSettings:
    """The parsed, validated configuration of one PEFT LoRA adapter."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict
    alpha_pattern: dict
    fan_in_fan_out: bool
    bias: str
    lora_bias: bool
    use_dora: bool
    modules_to_save: tuple
    peft_version: str | None
    base_model_name_or_path: str | None
    raw: dict
    peft_type: str = "LORA"

    @property
    def tuner_name(self) -> str:
        return TUNER_NAMES.get(self.peft_type, self.peft_type)

    def rank_for(self, module: str) -> int:
        key = match_pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else int(self.r)

    def alpha_for(self, module: str) -> float:
        key = match_pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scale(self, r: int, alpha: float) -> float:
        """PEFT's `scaling`: a Python float multiplied after B@A."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def match_pattern_key(patterns: dict, module: str):
    """PEFT >= 0.15 (get_pattern_key): the first key, in JSON order, with re.match(r"(.*\\.)?(key)$", module)."""
    for key in patterns:
        try:
            if re.match(r"(.*\.)?(" + key + r")$", module):
                return key
        except re.error:
            raise LoratvError(f"rank/alpha pattern '{key}' is not a valid regular expression.") from None
    return None


def _strs(v):
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def _ints(v):
    return _int(v) or (isinstance(v, list) and all(_int(x) for x in v))


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pattern(v):  # numbers; AdaLoRA's rank_pattern holds boolean masks
    return isinstance(v, dict) and all(
        _number(x) or (isinstance(x, list) and all(isinstance(y, bool) for y in x)) for x in v.values())


def _token_indices(v):
    return _ints(v) or (isinstance(v, dict) and all(isinstance(x, list) and _ints(x) for x in v.values()))


# PEFT's types for the fields loratv reads (None, or the field absent, always allowed): a hostile or corrupt file
# gets one sentence here instead of a TypeError deep in the key mapping
FIELD_TYPES = {
    "r": (_int, "an integer"), "lora_alpha": (_number, "a number"), "alpha": (_number, "a number"),
    "init_r": (_int, "an integer"), "target_modules": (_strs, "a string or a list of strings"),
    "exclude_modules": (_strs, "a string or a list of strings"), "modules_to_save": (_strs, "a list of strings"),
    "layers_to_transform": (_ints, "an integer or a list of integers"),
    "layers_pattern": (_strs, "a string or a list of strings"), "rank_pattern": (_pattern, "a map to ranks"),
    "alpha_pattern": (_pattern, "a map to numbers"), "target_parameters": (_strs, "a list of strings"),
    "feedforward_modules": (_strs, "a string or a list of strings"),
    "trainable_token_indices": (_token_indices, "a list of integers or a map to lists of integers"),
    "peft_type": (lambda v: isinstance(v, str), "a string"), "bias": (lambda v: isinstance(v, str), "a string"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or a method name"),
    "num_cayley_neumann_terms": (_int, "an integer"), "oft_block_size": (_int, "an integer"),
}


def check_field_types(config: dict, path) -> None:
    for field, (ok, what) in FIELD_TYPES.items():
        value = config.get(field)
        if value is not None and not ok(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "…"
            raise LoratvError(f"{path}: {field} must be {what}, not {shown}.")


def parse_config(config: dict, path) -> LoraSettings:
    """Validate an adapter_config.json dict; refuse by name every kind this version cannot merge exactly."""
    if not isinstance(config, dict):
        raise LoratvError(f"{path}: adapter config is not a JSON object.")
    check_field_types(config, path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type in TUNER_FIELDS:
        return _parse_tuner_config(config, path, peft_type)
    if peft_type != "LORA":
        name = OTHER_TUNERS.get(peft_type, peft_type)
        raise LoratvError(f"{path}: {name} adapters (peft_type {peft_type}) cannot be merged by loratv.")
    if "enable_lora" in config and config["enable_lora"] not in NEUTRAL_VALUES:
        raise LoratvError(f"{path}: legacy fused-QKV LoRA (enable_lora, PEFT <= 0.2) is not supported.")
    for field, harmless, why in REFUSED_FIELDS:
        value = config.get(field, harmless)
        if value not in NEUTRAL_VALUES and value != harmless:
            raise LoratvError(f"{path}: {why} ({field} = {value!r}).")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise LoratvError(
            f"{path}: init_lora_weights = '{init}' modified the base weights during training, so base + adapter is "
            "not the trained model; convert it with PEFT's path_initial_model_for_weight_conversion first."
        )
    unknown = {k: v for k, v in config.items() if k not in KNOWN_FIELDS and k != "enable_lora" and v not in NEUTRAL_VALUES}
    if unknown:
        key = sorted(unknown)[0]
        raise LoratvError(
            f"{path}: unknown config field '{key}' = {unknown[key]!r} (written by a newer PEFT?); refusing to guess its effect."
        )
    if config.get("target_parameters") and (config.get("use_dora") or config.get("lora_bias")
                                            or config.get("fan_in_fan_out")):
        raise LoratvError(f"{path}: target_parameters with use_dora, lora_bias or fan_in_fan_out is not a valid PEFT "
                          "configuration (PEFT's ParamWrapper rejects them).")
    if config.get("use_dora") and config.get("lora_bias"):
        raise LoratvError(f"{path}: use_dora with lora_bias is not a valid PEFT configuration (PEFT refuses it too).")
    bias = config.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise LoratvError(f"{path}: bias = '{bias}' is not one of none, all, lora_only.")
    try:
        r = int(config.get("r", 8))
        alpha = float(config.get("lora_alpha", 8))
        rank_pattern = dict(config.get("rank_pattern") or {})
        alpha_pattern = dict(config.get("alpha_pattern") or {})
    except (TypeError, ValueError):
        raise LoratvError(f"{path}: r, lora_alpha, rank_pattern or alpha_pattern has an invalid value.") from None
    if r <= 0 or not all(_number(v) and v > 0 for v in rank_pattern.values()):
        raise LoratvError(f"{path}: a LoRA rank (r or a rank_pattern value) is not a positive number.")
    modules_to_save = config.get("modules_to_save") or ()
    if isinstance(modules_to_save, str):
        modules_to_save = (modules_to_save,)
    return LoraSettings(
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        bias=bias,
        lora_bias=bool(config.get("lora_bias", False)),
        use_dora=bool(config.get("use_dora", False)),
        modules_to_save=tuple(modules_to_save),
        peft_version=config.get("peft_version"),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        raw=config,
    )


def _parse_tuner_config(config: dict, path, peft_type: str) -> LoraSettings:
    """LoHa, LoKr, AdaLoRA, VeRA, IA³, OFT: the fields every kind shares; tuners.py reads the rest from `raw`."""
    name = TUNER_NAMES[peft_type]
    known = TUNER_FIELDS[peft_type] | COMMON_FIELDS
    unknown = sorted(k for k, v in config.items() if k not in known and v not in NEUTRAL_VALUES)
    if unknown:
        raise LoratvError(f"{path}: unknown {name} config field '{unknown[0]}' = {config[unknown[0]]!r} (written by a "
                          "newer PEFT?); refusing to guess its effect.")
    if peft_type == "ADALORA":
        for field, harmless, why in REFUSED_FIELDS:
            value = config.get(field, harmless)
            if value not in NEUTRAL_VALUES and value != harmless:
                raise LoratvError(f"{path}: {why} ({field} = {value!r}).")
        if config.get("use_dora") or config.get("lora_bias") or config.get("use_rslora"):
            raise LoratvError(f"{path}: AdaLoRA with use_dora, lora_bias or use_rslora is not a PEFT configuration.")
    if peft_type == "VERA" and config.get("save_projection") is False:
        raise LoratvError(f"{path}: VeRA with save_projection = false regenerates its shared projections from torch's "
                          "CPU random generator; loratv merges only adapters that store them (save_projection = true).")
    if peft_type == "OFT" and config.get("coft"):
        raise LoratvError(f"{path}: constrained OFT (coft = true) projects its parameters at merge time; loratv does "
                          "not merge it.")
    bias = config.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise LoratvError(f"{path}: bias = '{bias}' is not one of none, all, lora_only.")
    try:
        r = int(config.get("init_r" if peft_type == "ADALORA" else "r", 8) or 0)
        alpha = float(config.get("lora_alpha" if peft_type == "ADALORA" else "alpha", r) or 0)
        rank_pattern = dict(config.get("rank_pattern") or {})
        alpha_pattern = dict(config.get("alpha_pattern") or {})
    except (TypeError, ValueError):
        raise LoratvError(f"{path}: r, alpha, rank_pattern or alpha_pattern has an invalid value.") from None
    modules_to_save = config.get("modules_to_save") or ()
    if isinstance(modules_to_save, str):
        modules_to_save = (modules_to_save,)
    return LoraSettings(
        r=r, lora_alpha=alpha, use_rslora=False, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)), bias=bias, lora_bias=False, use_dora=False,
        modules_to_save=tuple(modules_to_save), peft_version=config.get("peft_version"),
        base_model_name_or_path=config.get("base_model_name_or_path"), raw=config, peft_type=peft_type,
    )
