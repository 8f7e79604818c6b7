"""Where a tensor sits in a model: its layer, its kind (the name without the layer prefix) and its module group.

Shared by `loratv summarize` and `loratv diff`, so that their per-layer and per-kind tables group tensors the same
way as compare's and analyze's records (`kind` = the name after `…layers.N.`; outside layers, the whole name).
"""

from collections.abc import Callable, Iterable

from loratv.common.names import LAYER, module_kind


def place(name: str) -> tuple[int | None, str, str]:
    """The layer, kind and module group of a tensor name.

    Args:
        name: a tensor name, e.g. `model.layers.3.self_attn.q_proj.weight`.

    Returns:
        (layer index or None outside numbered layers, kind e.g. `self_attn.q_proj.weight`, group e.g. `attention`
        as `inspect.module_kind` names it).
    """
    match = LAYER.search(name)
    layer = int(match.group(1)) if match else None
    kind = name[match.end():] if match else name
    return layer, kind, module_kind(name)


def group_rows(rows: Iterable[dict], key: str, fold: Callable[[dict, dict], None], start: Callable[[], dict]) -> list:
    """Fold per-tensor rows into one row per value of `key` (layer, kind or group), in first-seen order except that
    layers are numeric and the tensors outside layers (layer None) come last.

    Args:
        rows: per-tensor records holding `key`.
        key: the field to group by.
        fold: adds one tensor row into a group's accumulator (mutates it).
        start: makes an empty accumulator.

    Returns:
        One accumulator per group, each with `key` set.
    """
    groups: dict = {}
    for row in rows:
        value = row[key]
        if value not in groups:
            groups[value] = {key: value, **start()}
        fold(groups[value], row)
    order = list(groups)
    if key == "layer":
        order.sort(key=lambda v: (v is None, v if v is not None else 0))
    return [groups[v] for v in order]
