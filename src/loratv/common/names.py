"""Layer-name parsing shared by every command: which block a tensor is in and what role it plays."""

import re

LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")
KIND_RULES = [
    ("head", re.compile(r"(^|\.)(lm_head|embed_out|score|classifier)(\.|$)")),
    ("embedding", re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings)")),
    ("norm", re.compile(r"(norm|(^|\.)ln_|layernorm)")),
    ("attention", re.compile(r"(attn|attention|(^|\.)[qkvo]_proj\.|query|key|value)")),
    ("mlp", re.compile(r"(mlp|ffn|feed_forward|(^|\.)fc\d*\.|up_proj|down_proj|gate_proj|experts)")),
]


def module_kind(name: str) -> str:
    """The role of a tensor in a transformer, from its name alone.

    Args:
        name: a tensor or module name, e.g. "model.layers.3.self_attn.q_proj.weight".

    Returns:
        "head", "embedding", "norm", "attention", "mlp" or "other" (the first rule that matches).
    """
    for kind, rule in KIND_RULES:
        if rule.search(name):
            return kind
    return "other"


def layer_of(name: str) -> int | None:
    """The transformer block a tensor belongs to.

    Args:
        name: a tensor or module name.

    Returns:
        The block index (the number after `.layers.`, `.h.`, `.blocks.` or `.layer.`), or None outside the blocks.
    """
    m = LAYER.search(name)
    return int(m.group(1)) if m else None
