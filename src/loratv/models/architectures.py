"""Tensor names and shapes of a causal LM from its config.json alone, no weights (`loratv inspect --config-only`).

One function per architecture family writes the state dict that transformers' `*ForCausalLM` saves for that
config: the same names in the same order, the same shapes, buffers left out (none of these families has a
persistent one) and a tied `lm_head` left out (save_pretrained stores only the embedding). With transformers
installed, meta_model.py answers for every architecture instead; these formulas are what explains the figures of
docs/starcoder2-architecture.md, and the fallback without transformers (tests/models/test_meta_model.py checks that both
agree on the configs the docs quote). Missing optional keys take the defaults of the family's transformers config
class, written out here; the shape-defining keys are required. tests/models/test_architectures.py checks every family
against transformers instantiating the same config on the meta device, and against models saved by transformers.
"""

from loratv.errors import BadInputError

REQUIRED = object()


class _Config:
    """Typed reads from a config dict, each failure one sentence naming the file and the key."""

    def __init__(self, config: dict, where: str, model_type: str):
        self.config = config
        self.where = where
        self.model_type = model_type

    def _value(self, key, default):
        if key in self.config:
            return self.config[key]
        if default is REQUIRED:
            raise BadInputError(f"{self.where}: model_type {self.model_type} needs '{key}', which config.json lacks.")
        return default

    def int(self, key, default=REQUIRED, *, none_means=None):
        value = self._value(key, default)
        if value is None and none_means is not None:
            value = none_means
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise BadInputError(f"{self.where}: '{key}' must be a positive integer, not {value!r}.")
        return value

    def bool(self, key, default):
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise BadInputError(f"{self.where}: '{key}' must be true or false, not {value!r}.")
        return value


def _attention_dims(c: _Config, kv_default):
    """(hidden, heads, kv_heads, head_dim) as the attention module computes them."""
    hidden = c.int("hidden_size")
    heads = c.int("num_attention_heads")
    kv = c.int("num_key_value_heads", heads if kv_default is None else kv_default, none_means=heads)
    head_dim = c.int("head_dim", None, none_means=hidden // heads or None)  # an explicit head_dim wins
    return hidden, heads, kv, head_dim


def _decoder(c: _Config, *, kv_default, qkv_bias, o_bias, mlp, mlp_bias, norm_bias, tie_default):
    """The Llama-style decoder (model.embed_tokens, model.layers.N.{self_attn,mlp,norms}, model.norm, lm_head)."""
    hidden, heads, kv, head_dim = _attention_dims(c, kv_default)
    intermediate = c.int("intermediate_size")
    layers = c.int("num_hidden_layers")
    vocab = c.int("vocab_size")
    tied = c.bool("tie_word_embeddings", tie_default)

    def linear(prefix, out_features, in_features, bias):
        yield prefix + ".weight", (out_features, in_features)
        if bias:
            yield prefix + ".bias", (out_features,)

    def norm(prefix):
        yield prefix + ".weight", (hidden,)
        if norm_bias:
            yield prefix + ".bias", (hidden,)

    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += linear(p + "self_attn.q_proj", heads * head_dim, hidden, qkv_bias)
        out += linear(p + "self_attn.k_proj", kv * head_dim, hidden, qkv_bias)
        out += linear(p + "self_attn.v_proj", kv * head_dim, hidden, qkv_bias)
        out += linear(p + "self_attn.o_proj", hidden, heads * head_dim, o_bias)
        if mlp == "gated":
            out += linear(p + "mlp.gate_proj", intermediate, hidden, mlp_bias)
            out += linear(p + "mlp.up_proj", intermediate, hidden, mlp_bias)
            out += linear(p + "mlp.down_proj", hidden, intermediate, mlp_bias)
        else:
            out += linear(p + "mlp.c_fc", intermediate, hidden, mlp_bias)
            out += linear(p + "mlp.c_proj", hidden, intermediate, mlp_bias)
        out += norm(p + "input_layernorm")
        out += norm(p + "post_attention_layernorm")
    out += norm("model.norm")
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out, tied


def _starcoder2(c: _Config):
    # Starcoder2Config: num_key_value_heads 2, use_bias true, tie_word_embeddings true; nn.LayerNorm (with bias)
    bias = c.bool("use_bias", True)
    return _decoder(c, kv_default=2, qkv_bias=bias, o_bias=bias, mlp="plain", mlp_bias=bias, norm_bias=True,
                    tie_default=True)


def _llama(c: _Config):
    # LlamaConfig: num_key_value_heads = heads, attention_bias / mlp_bias false, untied; RMSNorm (weight only)
    attention_bias = c.bool("attention_bias", False)
    return _decoder(c, kv_default=None, qkv_bias=attention_bias, o_bias=attention_bias, mlp="gated",
                    mlp_bias=c.bool("mlp_bias", False), norm_bias=False, tie_default=False)


def _mistral(c: _Config):
    # MistralConfig: num_key_value_heads 8, no biases, untied
    return _decoder(c, kv_default=8, qkv_bias=False, o_bias=False, mlp="gated", mlp_bias=False, norm_bias=False,
                    tie_default=False)


def _qwen2(c: _Config):
    # Qwen2Config: num_key_value_heads 32; q/k/v with bias, o_proj and the MLP without; untied
    return _decoder(c, kv_default=32, qkv_bias=True, o_bias=False, mlp="gated", mlp_bias=False, norm_bias=False,
                    tie_default=False)


def _gpt2(c: _Config):
    # GPT2Config: n_inner = 4·n_embd when null, tied; Conv1D weights stored (in, out)
    if c.bool("add_cross_attention", False):
        raise BadInputError(f"{c.where}: GPT-2 with add_cross_attention is not supported without weights.")
    hidden = c.int("n_embd")
    layers = c.int("n_layer")
    c.int("n_head")
    vocab = c.int("vocab_size")
    positions = c.int("n_positions")
    inner = c.int("n_inner", None, none_means=4 * hidden)
    tied = c.bool("tie_word_embeddings", True)
    out: list[tuple[str, tuple[int, ...]]] = [
        ("transformer.wte.weight", (vocab, hidden)), ("transformer.wpe.weight", (positions, hidden))
    ]
    for i in range(layers):
        p = f"transformer.h.{i}."
        out += [
            (p + "ln_1.weight", (hidden,)), (p + "ln_1.bias", (hidden,)),
            (p + "attn.c_attn.weight", (hidden, 3 * hidden)), (p + "attn.c_attn.bias", (3 * hidden,)),
            (p + "attn.c_proj.weight", (hidden, hidden)), (p + "attn.c_proj.bias", (hidden,)),
            (p + "ln_2.weight", (hidden,)), (p + "ln_2.bias", (hidden,)),
            (p + "mlp.c_fc.weight", (hidden, inner)), (p + "mlp.c_fc.bias", (inner,)),
            (p + "mlp.c_proj.weight", (inner, hidden)), (p + "mlp.c_proj.bias", (hidden,)),
        ]
    out += [("transformer.ln_f.weight", (hidden,)), ("transformer.ln_f.bias", (hidden,))]
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out, tied


FAMILIES = {"starcoder2": _starcoder2, "llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "gpt2": _gpt2}

# config.json's dtype names (transformers 5 writes "dtype", earlier versions "torch_dtype") -> safetensors names
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def config_tensors(config: dict, where: str) -> tuple[list[tuple[str, tuple[int, ...]]], bool]:
    """([(name, shape)], tied) for the model a config.json describes; LoratvError for a family loratv does not know.

    Args:
        config: the parsed config.json.
        where: where the config came from (a path or repo id), used in error messages.

    Returns:
        Every weight's name and shape, in the checkpoint's stored orientation (GPT-2's Conv1D weights (in, out)), and
        whether the output head is tied to the input embedding (then no lm_head.weight is listed).

    Raises:
        LoratvError: the config is not a JSON object, its model_type is missing or not one of FAMILIES, a field the
            family needs is missing or invalid, or the model is a variant that cannot be shaped without weights.
    """
    if not isinstance(config, dict):
        raise BadInputError(f"{where}: config.json is not a JSON object.")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        what = f"model_type {model_type!r}" if model_type else "no model_type"
        raise BadInputError(f"{where}: {what}; shapes from config.json alone are known for {known} "
                          "(inspect the weights instead).")
    return FAMILIES[model_type](_Config(config, where, model_type))


def config_dtype(config: dict) -> str | None:
    """The safetensors dtype name the config says the weights are stored in, or None.

    Args:
        config: the parsed config.json (its `dtype`, or `torch_dtype` before transformers 5).

    Returns:
        "F32", "F16", "BF16" or "F64", or None when absent, "auto" or unknown.
    """
    name = config.get("dtype", config.get("torch_dtype"))
    return DTYPES.get(name) if isinstance(name, str) else None
