"""What PEFT's LyCORIS tuners (LoHa, LoKr) share: their config fields and how an update fits a base tensor."""

import math

LYCORIS_FIELDS = frozenset({
    "r", "alpha", "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "init_weights",
    "layers_to_transform", "layers_pattern", "module_dropout", "modules_to_save", "rank_dropout",
    "use_effective_conv2d"})


def reshape_problem(module, shape: tuple) -> str | None:
    """Why a LyCORIS update (LoHa, LoKr) does not fit a base tensor: PEFT reshapes the delta to the weight, so only
    the element counts must agree.

    Args:
        module: the TunerModule, with its update's shape in options["delta_shape"].
        shape: the base tensor's shape.

    Returns:
        The problem as a sentence fragment, or None when the counts agree.
    """
    update = math.prod(module.options["delta_shape"])
    if update != math.prod(shape):
        return f"has {math.prod(shape)} elements but the update has {update}"
    return None
