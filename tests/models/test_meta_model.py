"""Config-only `loratv inspect` for any architecture transformers knows (src/loratv/meta_model.py).

The oracle is the file transformers itself writes: a tiny random model of each architecture is saved with
save_pretrained, loaded back with from_pretrained in the case's dtype (so the load-time conversions, and the modules
kept in float32, run as they do for a published checkpoint) and saved again. The inventory computed from that
folder's config.json alone must equal the saved file's header: every name, shape and dtype, and so the tensor and
parameter counts. The hand-written families (architectures.py) must agree with it on the configs the docs quote.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers_io import run_cli

transformers = pytest.importorskip("transformers")

from loratv.models.meta_model import handwritten_inventory, saved_inventory  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"

LM = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SEQ2SEQ = dict(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
ENCODER = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
               max_position_embeddings=34, pad_token_id=0)
TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=4)
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32

# id: (group, config class, model class, config keys, dtype of the saved checkpoint)
CASES = {
    "llama": ("decoder", "LlamaConfig", "LlamaForCausalLM", LM, BF16),
    "mistral": ("decoder", "MistralConfig", "MistralForCausalLM", LM, F16),
    "qwen2": ("decoder", "Qwen2Config", "Qwen2ForCausalLM", dict(LM, tie_word_embeddings=True), F32),
    "qwen3": ("decoder", "Qwen3Config", "Qwen3ForCausalLM", dict(LM, head_dim=8), BF16),
    "gemma": ("decoder", "GemmaConfig", "GemmaForCausalLM", dict(LM, head_dim=8), F16),
    "gemma2": ("decoder", "Gemma2Config", "Gemma2ForCausalLM", dict(LM, head_dim=8), F32),
    "phi": ("decoder", "PhiConfig", "PhiForCausalLM", LM, BF16),
    "phi3": ("decoder", "Phi3Config", "Phi3ForCausalLM", LM, F16),
    "starcoder2": ("decoder", "Starcoder2Config", "Starcoder2ForCausalLM", LM, F32),
    "gpt2": ("decoder", "GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=1, eos_token_id=2),
             BF16),
    "gpt_neox": ("decoder", "GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(LM, num_key_value_heads=None, tie_word_embeddings=False), F16),
    "opt": ("decoder", "OPTConfig", "OPTForCausalLM",
            dict(vocab_size=64, hidden_size=16, ffn_dim=24, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32, word_embed_proj_dim=16, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2), F32),
    "bloom": ("decoder", "BloomConfig", "BloomForCausalLM",
              dict(vocab_size=64, hidden_size=16, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2), BF16),
    "falcon": ("decoder", "FalconConfig", "FalconForCausalLM",
               dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1,
                    eos_token_id=2), F16),
    "gpt_bigcode": ("decoder", "GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                    dict(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32, bos_token_id=1,
                         eos_token_id=2), F32),
    "olmo2": ("decoder", "Olmo2Config", "Olmo2ForCausalLM", LM, BF16),
    "cohere": ("decoder", "CohereConfig", "CohereForCausalLM", LM, F16),
    "mixtral": ("moe", "MixtralConfig", "MixtralForCausalLM", dict(LM, num_local_experts=4, num_experts_per_tok=2),
                F32),
    "qwen2_moe": ("moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                       shared_expert_intermediate_size=12), BF16),
    "qwen3_moe": ("moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(LM, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8), F16),
    "olmoe": ("moe", "OlmoeConfig", "OlmoeForCausalLM", dict(LM, num_experts=4, num_experts_per_tok=2), F32),
    "deepseek_v3": ("moe", "DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(LM, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                         topk_group=1, first_k_dense_replace=1, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=4), BF16),  # its router bias stays float32
    "granitemoe": ("moe", "GraniteMoeConfig", "GraniteMoeForCausalLM",
                   dict(LM, num_local_experts=4, num_experts_per_tok=2), F16),
    "switch_transformers": ("moe", "SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
                            dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2,
                                 num_heads=4, num_experts=4, encoder_sparse_step=2, decoder_sparse_step=2), F32),
    "t5": ("encoder-decoder", "T5Config", "T5ForConditionalGeneration",
           dict(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4), F16),  # wo kept float32
    "bart": ("encoder-decoder", "BartConfig", "BartForConditionalGeneration", SEQ2SEQ, F16),
    "marian": ("encoder-decoder", "MarianConfig", "MarianMTModel", SEQ2SEQ, F32),  # sinusoids not saved
    "pegasus": ("encoder-decoder", "PegasusConfig", "PegasusForConditionalGeneration", SEQ2SEQ, BF16),
    "whisper": ("encoder-decoder", "WhisperConfig", "WhisperForConditionalGeneration",
                dict(SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
                     suppress_tokens=None, begin_suppress_tokens=None), BF16),
    "bert": ("encoder", "BertConfig", "BertForMaskedLM", ENCODER, F32),
    "roberta": ("encoder", "RobertaConfig", "RobertaForSequenceClassification", dict(ENCODER, num_labels=3), BF16),
    "distilbert": ("encoder", "DistilBertConfig", "DistilBertForMaskedLM",
                   dict(vocab_size=64, dim=16, n_layers=2, n_heads=4, hidden_dim=24, max_position_embeddings=32),
                   F16),
    "deberta-v2": ("encoder", "DebertaV2Config", "DebertaV2ForTokenClassification", dict(ENCODER, num_labels=2),
                   F32),
    "albert": ("encoder", "AlbertConfig", "AlbertForMaskedLM", dict(ENCODER, embedding_size=8), BF16),
    "electra": ("encoder", "ElectraConfig", "ElectraForPreTraining", dict(ENCODER, embedding_size=8), F16),
    "modernbert": ("encoder", "ModernBertConfig", "ModernBertForMaskedLM",
                   dict(ENCODER, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), F32),
    "vit": ("vision", "ViTConfig", "ViTForImageClassification", dict(VISION, num_labels=3), BF16),
    "convnext": ("vision", "ConvNextConfig", "ConvNextForImageClassification",
                 dict(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), F16),
    "swin": ("vision", "SwinConfig", "SwinForImageClassification",
             dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=4,
                  num_labels=3), F32),
    "resnet": ("vision", "ResNetConfig", "ResNetForImageClassification",
               dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3), BF16),  # int64 buffers
    "detr": ("vision", "DetrConfig", "DetrForObjectDetection",
             dict(use_timm_backbone=False, use_pretrained_backbone=False, d_model=16, encoder_layers=1,
                  decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                  decoder_ffn_dim=24, num_queries=4,
                  backbone_config={"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [16, 32],
                                   "depths": [1, 1], "out_features": ["stage2"]}), F16),
    "clip": ("vision-language", "CLIPConfig", "CLIPModel",
             dict(text_config=TEXT, vision_config=VISION, projection_dim=8), F32),
    "siglip": ("vision-language", "SiglipConfig", "SiglipModel", dict(text_config=TEXT, vision_config=VISION), BF16),
    "llava": ("vision-language", "LlavaConfig", "LlavaForConditionalGeneration",
              dict(text_config=dict(LM, model_type="llama"), image_token_index=63,
                   vision_config=dict(VISION, model_type="clip_vision_model", projection_dim=16)), F16),
    "paligemma": ("vision-language", "PaliGemmaConfig", "PaliGemmaForConditionalGeneration",
                  dict(text_config=dict(LM, head_dim=8, model_type="gemma"), image_token_index=63, projection_dim=16,
                       vision_config=dict(VISION, projection_dim=16)), F32),
    "qwen2_vl": ("vision-language", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
                 dict(text_config=dict(LM, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 0]}),
                      vision_config=dict(depth=2, embed_dim=16, hidden_size=16, num_heads=4, mlp_ratio=2,
                                         patch_size=2, spatial_merge_size=1, temporal_patch_size=1),
                      image_token_id=60, video_token_id=61, vision_start_token_id=62), BF16),
}


@pytest.fixture(autouse=True)
def quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # tiny vocabularies make it warn about token ids
    yield
    transformers.logging.set_verbosity(verbosity)


def save_tiny(case: str, folder: Path) -> Path:
    """A random tiny model of the case saved by transformers, reloaded in the case's dtype and saved again."""
    _, config_class, model_class, keys, dtype = CASES[case]
    config = getattr(transformers, config_class)(**keys)
    cls = getattr(transformers, model_class)
    torch.manual_seed(0)
    cls._from_config(config).save_pretrained(folder / "fp32")
    cls.from_pretrained(folder / "fp32", dtype=dtype).save_pretrained(folder / "saved")
    return folder / "saved"


def saved_header(folder: Path) -> dict:
    """{name: (shape, safetensors dtype)} as the saved file states it (read by safetensors, not loratv)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


def inspect_json(capsys, *argv):
    rc, out, err = run_cli(capsys, "inspect", *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_the_cases_cover_every_kind_of_model():
    groups = {}
    for case, (group, *_) in CASES.items():
        groups.setdefault(group, []).append(case)
    assert len(CASES) >= 30
    assert {g: len(v) >= 3 for g, v in groups.items()} == dict.fromkeys(
        ["decoder", "moe", "encoder-decoder", "encoder", "vision", "vision-language"], True)


@pytest.mark.parametrize("case", list(CASES))
def test_config_inventory_equals_the_saved_file(case, tmp_path, capsys):
    saved = save_tiny(case, tmp_path)
    header = saved_header(saved)
    config = json.loads((saved / "config.json").read_text())
    inventory = saved_inventory(config, "config.json")
    assert {name: (shape, dtype) for name, shape, dtype in inventory.tensors} == header
    assert len(inventory.tensors) == len(header)
    assert (sum(math.prod(shape) for _, shape, _ in inventory.tensors)
            == sum(math.prod(shape) for shape, _ in header.values()))
    for copy, kept in inventory.tied.items():  # a tied weight is saved once, under the name transformers keeps
        assert copy not in header and kept in header

    # the CLI on the config.json alone reports what `inspect` of the saved headers reports
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(saved / "config.json", alone)
    from_config = inspect_json(capsys, alone)
    from_headers = inspect_json(capsys, saved)
    assert from_config["format"] == "config" and from_config["model_class"] == config["architectures"][0]
    for key in ("total_tensors", "total_parameters", "layers", "tensors_per_layer", "dtypes", "per_layer",
                "per_kind", "shapes"):
        assert from_config[key] == from_headers[key], key
    assert sorted(from_config["global_tensors"]) == sorted(from_headers["global_tensors"])
    assert from_config["data_bytes"] == sum(v["bytes"] for v in from_headers["shards"].values())


@pytest.mark.parametrize("name", ["starcoder2-3b", "llama-3-8b", "qwen2.5-7b"])
def test_both_paths_agree_on_the_documented_configs(name, capsys, monkeypatch):
    """docs/starcoder2-architecture.md's figures come out the same with transformers (meta device, full size) and
    without it (the hand-written formulas): same names in the same order, shapes, dtypes, tied head, text."""
    path = CONFIGS / f"{name}.json"
    config = json.loads(path.read_text())
    meta = saved_inventory(config, name)
    hand = handwritten_inventory(config, name)
    assert meta.tensors == hand.tensors
    assert (meta.tied, meta.head) == (hand.tied, hand.head)

    with_transformers = inspect_json(capsys, path, "--lora-rank", "8,16,64")
    rc, text, _ = run_cli(capsys, "inspect", path, "--lora-rank", "8,16,64")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    without = inspect_json(capsys, path, "--lora-rank", "8,16,64")
    rc2, text2, _ = run_cli(capsys, "inspect", path, "--lora-rank", "8,16,64")
    assert with_transformers["inventory_source"].startswith("transformers ")
    assert without["inventory_source"] == "architectures.py"
    differ = {"inventory_source", "model_class", "notes", "linear_tensors"}
    assert {k: v for k, v in with_transformers.items() if k not in differ} == \
        {k: v for k, v in without.items() if k not in differ}
    assert rc == rc2 == 0
    assert text2.replace(f"\nnote: {without['notes'][0]}\n", "", 1) == text  # the same text but the note


def test_missing_transformers_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    mixtral = tmp_path / "mixtral.json"
    mixtral.write_text(json.dumps({"model_type": "mixtral", "hidden_size": 16}))
    rc, out, err = run_cli(capsys, "inspect", mixtral)
    assert rc == 2 and len(err.splitlines()) == 1
    assert "pip install 'loratv[transformers]'" in err and str(mixtral) in err and "starcoder2" in err

    # a hand-written family still works, says so, and still requires its shape keys
    rc, out, err = run_cli(capsys, "inspect", CONFIGS / "llama-3-8b.json")
    assert rc == 0 and "note: shapes from loratv's hand-written llama rules" in out
    assert "transformers, which is not installed (pip install 'loratv[transformers]')" in out
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2}))
    rc, out, err = run_cli(capsys, "inspect", partial)
    assert rc == 2 and "'intermediate_size'" in err


def test_refusals_and_class_choice(capsys, tmp_path):
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"model_type": "no-such-model", "hidden_size": 8}))
    rc, out, err = run_cli(capsys, "inspect", unknown)
    assert rc == 2 and "'no-such-model'" in err and "transformers" in err and len(err.splitlines()) == 1

    broken = tmp_path / "broken.json"  # 8 / 32 default heads: a zero head_dim transformers cannot build
    broken.write_text(json.dumps({"model_type": "mixtral", "hidden_size": 8}))
    rc, out, err = run_cli(capsys, "inspect", broken)
    assert rc == 2 and "cannot build MixtralForCausalLM" in err and len(err.splitlines()) == 1

    # no architectures: the causal LM (as the hand-written families assume); an unknown one: the same, with a note
    config = dict(LM, model_type="mixtral", num_local_experts=2)
    plain = saved_inventory(config, "c")
    assert plain.model_class == "MixtralForCausalLM" and "names no architectures" in plain.notes[0]
    custom = saved_inventory(dict(config, architectures=["MyMixtral"], auto_map={"AutoModel": "x.MyMixtral"}), "c")
    assert custom.model_class == "MixtralForCausalLM" and "MyMixtral" in custom.notes[0]
    assert custom.tensors == plain.tensors
    base = saved_inventory(dict(config, architectures=["MixtralModel"]), "c")
    assert [n for n, _, _ in base.tensors] == [n.removeprefix("model.") for n, _, _ in plain.tensors
                                                if n != "lm_head.weight"]


@pytest.mark.parametrize("case,targets", [
    ("t5", None),  # PEFT's default for t5: q, v
    ("mixtral", None),  # PEFT's default: q_proj, v_proj (the fused experts are no nn.Linear)
    ("bert", "all-linear"),  # the tied MLM decoder is the output embedding: left out
    ("llava", "all-linear"),
    ("vit", ["q_proj", "v_proj"]),  # the names in memory: the file says attention.attention.query / value
])
def test_lora_footprint_on_new_inventories_against_peft(case, targets, capsys, tmp_path):
    """What inspect says a LoRA would store is PEFT's count of LoRA parameters on the model transformers loads."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    saved = save_tiny(case, tmp_path)
    argv = ["--lora-rank", "4"] + (["--lora-targets", targets if isinstance(targets, str) else ",".join(targets)]
                                   if targets else [])
    report = inspect_json(capsys, saved, "--config-only", *argv)
    lora = report["lora"]
    if targets is None:  # PEFT's defaults for the type, from the config and from the weights' headers alike
        assert lora["targets"] == list(peft_defaults[report["model_type"]])
        assert sorted(inspect_json(capsys, saved, "--lora-rank", "4")["lora"]["touched"]) == sorted(lora["touched"])
    model = getattr(transformers, CASES[case][2]).from_pretrained(saved)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=targets or lora["targets"]))
    stored = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora["per_rank"][0]["stored_parameters"] == stored
    assert lora["modules"] == sum(1 for n, _ in peft_model.named_parameters() if n.endswith("lora_A.default.weight"))
    assert lora["touched_parameters"] == sum(math.prod(report["shapes"][n]) for n in lora["touched"])
    if case == "vit":  # the file's names select the same modules
        by_file_names = inspect_json(capsys, saved, "--config-only", "--lora-rank", "4", "--lora-targets",
                                     "query,value")["lora"]
        assert by_file_names["touched"] == lora["touched"]
