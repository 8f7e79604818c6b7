"""LoRA's variants, hanging off the LoRA kind (loratv/adapters/kinds/lora.py) as PEFT's `LoraVariant`s hang off its
LoRA layers (peft/tuners/lora/variants.py): one module each, one `LoraVariant` instance each, listed once in
`VARIANTS`. `choose_variants` picks a module's variants when LoRA builds the module (`LoraModule.variants`); the
merge, compare and bind then ask the module's variants (`LoraModule.has_variant`, `.additive`, `.merge_variant`)
instead of testing tensor keys or `kind` strings. docs/adapter-kinds.md, "LoRA and its variants", lists them and
walks through adding one.
"""

from loratv.adapters.kinds.lora_variants.base import LoraVariant
from loratv.adapters.kinds.lora_variants.conv import CONV
from loratv.adapters.kinds.lora_variants.dora import DORA
from loratv.adapters.kinds.lora_variants.lora_bias import LORA_BIAS
from loratv.adapters.kinds.lora_variants.rslora import RSLORA
from loratv.adapters.kinds.lora_variants.target_parameters import TARGET_PARAMETERS
from loratv.adapters.kinds.lora_variants.trainable_tokens import TRAINABLE_TOKENS

# --- the variants: one line each (order: the order `LoraModule.variants` lists them in) ---
VARIANTS: tuple[LoraVariant, ...] = (
    RSLORA,
    DORA,
    CONV,
    TARGET_PARAMETERS,
    LORA_BIAS,
    TRAINABLE_TOKENS,
)


def choose_variants(adapter, module) -> tuple:
    """The variants of a LoRA module just built (PEFT's `resolve_lora_variant`, per module, from the config).

    Args:
        adapter: the adapter (settings and tensors set).
        module: the LoraModule.

    Returns:
        The per-module variants that apply, in `VARIANTS` order.
    """
    return tuple(v for v in VARIANTS if v.per_module and v.applies(adapter, module))


def adapter_variants(adapter) -> list[str]:
    """The names of the variants an adapter uses anywhere (its modules' and adapter-wide ones).

    Args:
        adapter: the loaded adapter.

    Returns:
        Variant names, in `VARIANTS` order.
    """
    return [v.name for v in VARIANTS if v.in_use(adapter)]


def variant_named(name: str) -> LoraVariant:
    """The variant called `name`.

    Args:
        name: a variant's `name` ("dora", "rslora", …).

    Returns:
        The variant.

    Raises:
        KeyError: no variant has that name.
    """
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(name)
