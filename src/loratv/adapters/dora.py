"""Moved: DoRA is a LoRA variant, loratv/adapters/kinds/lora_variants/dora.py (its merge, magnitude check and
compare's bound). The names are re-exported here for code that imports them from this module."""

from loratv.adapters.kinds.lora_variants.dora import U64, DoraTerms, dora_terms  # noqa: F401
