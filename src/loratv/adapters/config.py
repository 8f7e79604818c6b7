"""`adapter_config.json` semantics: which adapters loratv merges, and each module's rank, alpha and scaling.

`parse_config` checks the field types every kind shares, then hands the file to the registered kind of its
`peft_type` (loratv/adapters/registry.py); each kind's fields and refusals live in its module under
loratv/adapters/kinds/. Everything follows PEFT (docs/peft-format.md §1 and §3); where PEFT would silently do
something else (drop unknown keys, re-run an SVD), loratv refuses instead. The names below are re-exported for code
and tests that import them from here.
"""

from loratv.adapters import registry
from loratv.adapters.kinds.lora import BASE_MUTATING_INITS, REFUSED_FIELDS  # noqa: F401
from loratv.adapters.kinds.lora import LORA_FIELDS as KNOWN_FIELDS  # noqa: F401
from loratv.adapters.kinds.lycoris import LYCORIS_FIELDS  # noqa: F401
from loratv.adapters.registry import REFUSED_TUNERS as OTHER_TUNERS  # noqa: F401
from loratv.adapters.settings import (  # noqa: F401
    COMMON_FIELDS,
    FIELD_TYPES,
    NEUTRAL_VALUES,
    LoraSettings,
    check_field_types,
    match_pattern_key,
)
from loratv.errors import LoratvError


def parse_config(config: dict, path) -> LoraSettings:
    """Validate an adapter_config.json dict; refuse by name every kind this version cannot merge exactly.

    Args:
        config: the parsed JSON.
        path: the file, for messages.

    Returns:
        The settings, parsed by the kind registered for the file's peft_type.

    Raises:
        LoratvError: not a JSON object, a field of the wrong type, an unregistered or refused peft_type, or a field
            the kind refuses.
    """
    if not isinstance(config, dict):
        raise LoratvError(f"{path}: adapter config is not a JSON object.")
    check_field_types(config, path)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    return registry.kind_for(peft_type, path).parse_settings(config, path)
