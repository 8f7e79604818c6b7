"""What every adapter kind's parsed configuration holds (`LoraSettings`) and the checks every kind shares.

The kind-specific parts of `adapter_config.json` (which fields a kind accepts, which it refuses, how its rank and
alpha are read) live with each kind in `loratv/adapters/kinds/`; `loratv/adapters/config.py` dispatches to them.
Everything here follows PEFT (docs/peft-format.md §1 and §3; get_pattern_key in src/peft/utils/other.py).
"""

import math
import re
from dataclasses import dataclass

from loratv.errors import LoratvError, UnsupportedAdapterError

NEUTRAL_VALUES: tuple[object, ...] = (None, False, {}, [], "", 0)
# fields PEFT's PeftConfig writes for every kind
COMMON_FIELDS = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode"}


@dataclass(frozen=True)
class LoraSettings:
    """The parsed, validated configuration of one PEFT adapter (LoRA, or another kind's shared fields)."""

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
    tuner_name: str = "LoRA"  # the kind's display name (AdapterKind.display_name)

    @property
    def peft_type_name(self) -> str:
        """PEFT's peft_type of the adapter (upper case): `peft_type` less a routing suffix such as "+PEFT"."""
        return self.peft_type.split("+", 1)[0]

    def rank_for(self, module: str) -> int:
        """The rank of `module`: its rank_pattern entry (PEFT's matcher), else `r`.

        Args:
            module: the module name.

        Returns:
            The rank, as an int.

        Raises:
            LoratvError: a rank_pattern key is not a valid regular expression (match_pattern_key).
        """
        key = match_pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else int(self.r)

    def alpha_for(self, module: str) -> float:
        """The alpha of `module`: its alpha_pattern entry (PEFT's matcher), else `lora_alpha`.

        Args:
            module: the module name.

        Returns:
            The alpha, as a float.

        Raises:
            LoratvError: an alpha_pattern key is not a valid regular expression (match_pattern_key).
        """
        key = match_pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scale(self, r: int, alpha: float) -> float:
        """PEFT's `scaling`: a Python float multiplied after B@A.

        Args:
            r: the module's rank.
            alpha: the module's alpha.

        Returns:
            alpha / √r with use_rslora, else alpha / r.
        """
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def match_pattern_key(patterns: dict, module: str):
    """PEFT >= 0.15 (get_pattern_key): the first key, in JSON order, with re.match(r"(.*\\.)?(key)$", module).

    Args:
        patterns: a rank_pattern or alpha_pattern dict (regex key -> value).
        module: the module name.

    Returns:
        The matching key, or None when none matches.

    Raises:
        LoratvError: a key tried before the match is not a valid regular expression.
    """
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


def number(v) -> bool:
    """Whether `v` is a JSON number (not a boolean).

    Args:
        v: a parsed JSON value.

    Returns:
        True for an int or float that is not a bool.
    """
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_number = number


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
    """Refuse a field loratv reads whose value has the wrong JSON type.

    Args:
        config: the adapter_config.json dict.
        path: the file, for the message.

    Raises:
        LoratvError: naming the field and the type it must have.
    """
    for field, (ok, what) in FIELD_TYPES.items():
        value = config.get(field)
        if value is not None and not ok(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "…"
            raise LoratvError(f"{path}: {field} must be {what}, not {shown}.")


def check_refused_fields(config: dict, path, refused) -> None:
    """Refuse the first field of `refused` ((field, harmless value, why) triples) set to a value that matters.

    Args:
        config: the adapter_config.json dict.
        path: the file, for the message.
        refused: (field, harmless value, why) triples.

    Raises:
        UnsupportedAdapterError: `why`, with the field and its value.
    """
    for field, harmless, why in refused:
        value = config.get(field, harmless)
        if value not in NEUTRAL_VALUES and value != harmless:
            raise UnsupportedAdapterError(f"{path}: {why} ({field} = {value!r}).")


def check_bias(config: dict, path) -> str:
    """The `bias` field, checked.

    Args:
        config: the adapter_config.json dict.
        path: the file, for the message.

    Returns:
        "none", "all" or "lora_only".

    Raises:
        LoratvError: any other value.
    """
    bias = config.get("bias", "none") or "none"
    if bias not in ("none", "all", "lora_only"):
        raise LoratvError(f"{path}: bias = '{bias}' is not one of none, all, lora_only.")
    return bias


def modules_to_save(config: dict) -> tuple:
    """`modules_to_save` as a tuple (PEFT accepts one string too).

    Args:
        config: the adapter_config.json dict.

    Returns:
        The module names.
    """
    saved = config.get("modules_to_save") or ()
    if isinstance(saved, str):
        saved = (saved,)
    return tuple(saved)
