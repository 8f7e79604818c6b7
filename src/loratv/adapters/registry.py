"""The one registry of adapter kinds: each PEFT `peft_type` loratv merges is registered here once.

Adding a kind: write `loratv/adapters/kinds/<kind>.py` (an AdapterKind subclass and its instance `KIND`), add its
tests, and add one line to KINDS below (docs/adapter-kinds.md walks through it).
"""

from loratv.adapters.kind import AdapterKind
from loratv.adapters.kinds import adalora, hra, ia3, loha, lokr, lora, oft, peft_backed, vera
from loratv.errors import UnsupportedAdapterError

# PEFT tuners loratv refuses by name, with the reason (anything else unknown gets its peft_type only)
REFUSED_TUNERS = {
    "FROD": "FRoD (its bases come from a joint decomposition of every targeted base weight, not one module at a time)",
    "UNILORA": "UniLoRA (it stores one shared vector and no tensor per module, so its modules cannot be read "
               "from the file)",
    "PROMPT_TUNING": "prompt tuning (no weights to merge)", "PREFIX_TUNING": "prefix tuning (no weights to merge)",
    "P_TUNING": "p-tuning (no weights to merge)", "ADAPTION_PROMPT": "adaption prompt (no weights to merge)",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning (no weights to merge)", "CPT": "CPT (a prompt method: no "
    "weights to merge)", "CARTRIDGE": "Cartridges (a trained KV prefix: no weights to merge)",
    "LILY": "Lily (its shared projectors are mixed per input by a router: PEFT itself cannot merge it)",
    "XLORA": "X-LoRA (a learned mixture of LoRAs chosen per token: nothing static to merge)",
    "POLY": "Poly (a routed mixture of LoRA skills per task: nothing static to merge)",
    "SHADOW": "ShadowPEFT (an input-dependent trajectory: PEFT itself cannot merge it)",
    "ADAMSS": "AdaMSS (its initialisation clusters each base weight with scikit-learn; not supported yet)",
}

_KINDS: dict[str, AdapterKind] = {}


def register(kind: AdapterKind) -> AdapterKind:
    """Register an adapter kind under its `peft_type`.

    Args:
        kind: the kind (an AdapterKind instance with `peft_type` and `display_name` set).

    Returns:
        The kind (so a module may write `KIND = register(MyKind())`).

    Raises:
        ValueError: the peft_type is empty, already registered, or refused by name.
    """
    peft_type = kind.peft_type
    if not peft_type or peft_type != peft_type.upper():
        raise ValueError(f"adapter kind {type(kind).__name__} needs an upper-case peft_type, not {peft_type!r}")
    if peft_type in _KINDS:
        raise ValueError(f"peft_type {peft_type} is already registered ({type(_KINDS[peft_type]).__name__})")
    if peft_type in REFUSED_TUNERS:
        raise ValueError(f"peft_type {peft_type} is refused by name (REFUSED_TUNERS); remove it there first")
    _KINDS[peft_type] = kind
    return kind


def unregister(peft_type: str) -> AdapterKind:
    """Remove a registered kind (tests register toy kinds and remove them afterwards).

    Args:
        peft_type: the kind's peft_type.

    Returns:
        The kind removed.

    Raises:
        KeyError: no kind has that peft_type.
    """
    return _KINDS.pop(peft_type)


def kind_for(peft_type: str, path=None) -> AdapterKind:
    """The kind that merges adapters of `peft_type`.

    Args:
        peft_type: the `peft_type` of adapter_config.json (any case).
        path: the adapter_config.json, for the message.

    Returns:
        The registered kind.

    Raises:
        UnsupportedAdapterError: naming the file and the peft_type (and the reason, for a tuner refused by name).
    """
    key = str(peft_type).upper()
    kind = _KINDS.get(key)
    if kind is None:
        name = REFUSED_TUNERS.get(key, key)
        where = f"{path}: " if path is not None else ""
        raise UnsupportedAdapterError(f"{where}{name} adapters (peft_type {key}) cannot be merged by loratv.")
    return kind


def all_kinds() -> list[AdapterKind]:
    """Every registered kind, in registration order.

    Returns:
        The kinds.
    """
    return list(_KINDS.values())


def display_names() -> dict[str, str]:
    """peft_type -> display name, for every registered kind.

    Returns:
        The map.
    """
    return {k.peft_type: k.display_name for k in _KINDS.values()}


def kind_for_adapter(adapter) -> AdapterKind:
    """The kind that maps and merges a loaded adapter: its peft_type's, unless that kind routes this adapter's case
    to another registered kind (AdapterKind.routed), whose settings then replace the adapter's.

    Args:
        adapter: the adapter, with `settings` and `tensors` set.

    Returns:
        The kind.

    Raises:
        UnsupportedAdapterError: the peft_type (or the kind routed to) is not registered.
        LoratvError: the kind routed to refuses the config.
    """
    kind = kind_for(adapter.settings.peft_type, adapter.config_path)
    key = kind.routed(adapter)
    if key is not None:
        kind = kind_for(key, adapter.config_path)
        adapter.settings = kind.parse_settings(adapter.settings.raw, adapter.config_path)
    return kind


# --- the registrations: one line per kind ---
KINDS = (
    lora.KIND,
    adalora.KIND,
    loha.KIND,
    lokr.KIND,
    vera.KIND,
    oft.KIND,
    ia3.KIND,
    *peft_backed.KINDS,  # 23 tuners merged by PEFT's own layer code (adapters/kinds/peft_backed.py)
    hra.KIND,  # PEFT's HRA, merged through the compact WY form of its reflections (PEFT's merge on request)
    *peft_backed.ROUTED.values(),  # native tuners' cases with no loratv formula (coft, Tucker), through PEFT
)
for _kind in KINDS:
    register(_kind)
