"""`adapter_config.json` semantics: which adapters loratv merges, and each module's rank, alpha and scaling.

Everything here follows PEFT (see ../shared/reference/peft-lora-format.md §1, §3.1, §3.4, §4.1). Where PEFT would
silently do something else (drop unknown keys, re-run an SVD), loratv refuses instead.
"""

import math
import re
from dataclasses import dataclass

from .errors import LoratvError

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

OTHER_TUNERS = {
    "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr", "VERA": "VeRA", "OFT": "OFT", "BOFT": "BOFT",
    "IA3": "IA3", "PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning",
    "P_TUNING": "p-tuning", "ADAPTION_PROMPT": "adaption prompt",
}
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# (config field, value that is harmless, why a merge from the file alone is impossible or not yet supported)
REFUSED_FIELDS = [
    ("target_parameters", None, "LoRA on raw parameters (target_parameters) is not supported yet"),
    ("use_bdlora", None, "block-diagonal LoRA (use_bdlora) is not supported yet"),
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


def parse_config(config: dict, path) -> LoraSettings:
    """Validate an adapter_config.json dict; refuse by name every kind this version cannot merge exactly."""
    if not isinstance(config, dict):
        raise LoratvError(f"{path}: adapter config is not a JSON object.")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        name = OTHER_TUNERS.get(peft_type, peft_type)
        raise LoratvError(f"{path}: {name} adapters (peft_type {peft_type}) are not supported by loratv yet; only LoRA is.")
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
