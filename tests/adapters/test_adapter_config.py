"""adapter_config semantics against PEFT's own functions (the oracle) and the refusal rules."""

import math

import pytest
from peft.utils.other import get_pattern_key

from loratv.adapters.config import match_pattern_key, parse_config
from loratv.errors import LoratvError

MODULES = [
    "model.layers.1.self_attn.q_proj",
    "model.layers.11.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.mlp.c_fc",
    "foo",
    "transformer.h.3.attn.c_attn",
]
PATTERNS = [
    {"model.layers.1.self_attn.q_proj": 2},
    {"1.self_attn.q_proj": 2},
    {"v_proj": 32, "q_proj": 4},
    {"q_proj": 4, "layers.1.self_attn.q_proj": 2},
    {"^foo": 3},
    {"layers\\.\\d+\\.self_attn\\.(q|v)_proj": 6},
    {"c_.*": 5},
]


@pytest.mark.parametrize("patterns", PATTERNS)
@pytest.mark.parametrize("module", MODULES)
def test_pattern_matching_equals_peft(patterns, module):
    # PEFT returns the module name itself when nothing matches, then looks it up in the dict
    peft_key = get_pattern_key(list(patterns), module)
    expected = peft_key if peft_key in patterns else None
    assert match_pattern_key(patterns, module) == expected


def test_rank_and_alpha_resolved_independently():
    s = parse_config(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 32}},
        "cfg",
    )
    assert (s.rank_for("a.q_proj"), s.alpha_for("a.q_proj")) == (4, 16.0)
    assert (s.rank_for("a.v_proj"), s.alpha_for("a.v_proj")) == (8, 32.0)


def test_scaling_plain_and_rslora():
    plain = parse_config({"r": 8, "lora_alpha": 16}, "cfg")
    rs = parse_config({"r": 8, "lora_alpha": 16, "use_rslora": True}, "cfg")
    assert plain.scale(8, 16.0) == 2.0
    assert rs.scale(8, 16.0) == 16 / math.sqrt(8)


@pytest.mark.parametrize(
    "config, word",
    [
        ({"peft_type": "FROD"}, "FRoD"),
        ({"peft_type": "PROMPT_TUNING"}, "no weights to merge"),
        ({"peft_type": "VERA", "save_projection": False}, "save_projection"),
        ({"peft_type": "LILY"}, "Lily"),
        ({"peft_type": "IA3", "lora_alpha": 8}, "unknown IA³ config field"),
        ({"peft_type": "ADALORA", "use_dora": True}, "AdaLoRA"),
        ({"target_parameters": ["experts.down_proj"], "use_dora": True}, "ParamWrapper"),
        ({"use_dora": True, "lora_bias": True}, "lora_bias"),
        ({"init_lora_weights": "pissa_niter_4"}, "pissa"),
        ({"init_lora_weights": "olora"}, "olora"),
        ({"init_lora_weights": "loftq"}, "loftq"),
        ({"alora_invocation_tokens": [1, 2]}, "aLoRA"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"brand_new_option": 3}, "brand_new_option"),
    ],
)
def test_refused_kinds_are_named(config, word):
    with pytest.raises(LoratvError, match=word):
        base = {"r": 8} if config.get("peft_type") in ("VERA", "OFT", "ADALORA") else {"r": 8, "lora_alpha": 8}
        parse_config({**base, **config}, "adapter_config.json")


def test_unknown_key_with_default_value_is_accepted():
    parse_config({"r": 8, "lora_alpha": 8, "brand_new_option": None}, "cfg")
