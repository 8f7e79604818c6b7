"""The config fields PEFT's LyCORIS tuners (LoHa, LoKr) share."""

LYCORIS_FIELDS = frozenset({
    "r", "alpha", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "init_weights",
    "layers_to_transform", "layers_pattern", "module_dropout", "modules_to_save", "rank_dropout",
    "use_effective_conv2d"})
