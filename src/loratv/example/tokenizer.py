"""A small, real byte-level BPE tokenizer for the embedded StarCoder2 miniature.

Real StarCoder2 checkpoints carry five tokenizer files (tokenizer.json, tokenizer_config.json,
special_tokens_map.json, vocab.json, merges.txt); a training checkpoint folder is expected to carry them too.
This module writes the same five files for the miniature's vocabulary size: StarCoder2's special tokens first
(``<|endoftext|>`` is id 0, the miniature's bos/eos id), then the 256 GPT-2 byte-level symbols, then merges learnt
by a tiny BPE trainer on a fixed Python-source corpus embedded below, until the vocabulary is exactly full.

Everything is pure Python and the standard library (the ``tokenizers`` library is not a core dependency), and the
output is byte-stable: the same vocabulary size gives byte-identical files on every run and machine.
"""

import functools
import json
import re
from collections import Counter
from pathlib import Path

# StarCoder2's special tokens in StarCoder2's id order (bigcode/starcoder2-*: ids 0..37).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<repo_name>",
    "<file_sep>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
    "<code_to_intermediate>",
    "<intermediate_to_code>",
    "<pr>",
    "<pr_status>",
    "<pr_is_merged>",
    "<pr_base>",
    "<pr_file>",
    "<pr_base_code>",
    "<pr_diff>",
    "<pr_diff_hunk>",
    "<pr_comment>",
    "<pr_event_id>",
    "<pr_review>",
    "<pr_review_state>",
    "<pr_review_comment>",
    "<pr_in_reply_to_review_id>",
    "<pr_in_reply_to_comment_id>",
    "<pr_diff_hunk_comment_line>",
    "<NAME>",
    "<EMAIL>",
    "<KEY>",
    "<PASSWORD>",
)
EOS_TOKEN = SPECIAL_TOKENS[0]
FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
MERGES_HEADER = "#version: 0.2"

# GPT-2's pre-tokenization regex, spelled with ASCII classes: the stdlib re has no \p{L}/\p{N}, and the corpus is
# ASCII-only (checked), where these classes and the tokenizers library's Unicode ones split text identically.
_WS = r" \t\n\r\x0b\x0c"  # inside a character class
_PRETOKENIZE = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)

# The training corpus: short, typical Python source (imports, classes, docstrings, 4-space indentation, comments).
# Changing one character changes the merges, and so every written file; it is part of the format.
CORPUS = r'''"""Utilities for loading, merging and saving model weights."""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch


class ModelConfig:
    """The configuration of a model: sizes, layers and the data type."""

    def __init__(self, hidden_size: int = 64, num_layers: int = 30, dtype: str = "float32") -> None:
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.dtype = dtype

    def to_dict(self) -> Dict[str, object]:
        return {"hidden_size": self.hidden_size, "num_layers": self.num_layers, "dtype": self.dtype}

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        with open(path, "r", encoding="utf-8") as handle:
            data = json.load(handle)
        return cls(**data)


def load_tensors(folder: Path, names: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    """Load the named tensors from a folder; all of them when names is None."""
    tensors = {}
    for file in sorted(folder.glob("*.pt")):
        name = file.stem
        if names is not None and name not in names:
            continue
        tensors[name] = torch.load(file, map_location="cpu")
    return tensors


def merge_lora(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Return weight + scale * (lora_b @ lora_a), computed in float32."""
    delta = (lora_b.float() @ lora_a.float()) * scale
    return (weight.float() + delta).to(weight.dtype)


def save_tensors(tensors: Dict[str, torch.Tensor], folder: Path) -> None:
    # Write to a temporary name first, so that a crash never leaves a half-written file.
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensor in tensors.items():
        path = folder / (name + ".pt")
        tmp = path.with_suffix(".tmp")
        torch.save(tensor, tmp)
        os.replace(tmp, path)


class Trainer:
    def __init__(self, model, optimizer, config: ModelConfig, steps: int = 1000) -> None:
        self.model = model
        self.optimizer = optimizer
        self.config = config
        self.steps = steps
        self.step = 0
        self.history: List[float] = []

    def train_step(self, batch: Dict[str, torch.Tensor]) -> float:
        self.model.train()
        self.optimizer.zero_grad()
        outputs = self.model(**batch)
        loss = outputs.loss
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.history.append(float(loss.item()))
        return float(loss.item())

    def train(self, batches) -> List[float]:
        for batch in batches:
            if self.step >= self.steps:
                break
            self.train_step(batch)
        return self.history

    def evaluate(self, batches) -> float:
        self.model.eval()
        total = 0.0
        count = 0
        with torch.no_grad():
            for batch in batches:
                outputs = self.model(**batch)
                total += float(outputs.loss.item())
                count += 1
        if count == 0:
            raise ValueError("no batches to evaluate")
        return total / count


def parse_args(argv: Optional[List[str]] = None):
    import argparse

    parser = argparse.ArgumentParser(description="Merge a LoRA adapter into its base model.")
    parser.add_argument("base", type=Path, help="the base model folder")
    parser.add_argument("adapter", type=Path, help="the adapter folder")
    parser.add_argument("--output", type=Path, default=Path("merged"), help="where to write the result")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    base = load_tensors(args.base)
    adapter = load_tensors(args.adapter)
    merged = {}
    for name, weight in base.items():
        key = name.replace(".weight", "")
        if key + ".lora_A" in adapter and key + ".lora_B" in adapter:
            merged[name] = merge_lora(weight, adapter[key + ".lora_A"], adapter[key + ".lora_B"], args.scale)
        else:
            merged[name] = weight
    save_tensors(merged, args.output)
    print(f"merged {len(merged)} tensors into {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
'''


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-symbol table: each byte maps to one printable character, so every text has a spelling.

    Returns:
        A dict from each byte value 0..255 to its one-character symbol; the printable Latin-1 bytes map to
        themselves, the rest to code points from 256 upwards, in byte order (as in GPT-2 and ``tokenizers``).
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_SYMBOLS = tuple(bytes_to_unicode()[b] for b in range(256))


def _byte_level(text: str) -> str:
    return "".join(_SYMBOLS[b] for b in text.encode("utf-8"))


def _pretokenize(text: str) -> list[str]:
    """Split ASCII text as the ByteLevel pre-tokenizer does, and spell each piece in byte-level symbols."""
    return [_byte_level(piece) for piece in _PRETOKENIZE.findall(text)]


def train_bpe(vocab_size: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Learn the vocabulary and merges for ``vocab_size`` entries from the embedded corpus.

    Each step merges the most frequent adjacent pair of symbols; ties go to the smallest pair in code-point order,
    so the result never depends on hash seeds or dict order. A merge whose result is already in the vocabulary
    (two ways to spell one token) is kept as a merge but takes no new id.

    Args:
        vocab_size: the total number of entries, special tokens and the 256 byte symbols included.

    Returns:
        The tokens in id order and the merges in rank order.

    Raises:
        ValueError: if ``vocab_size`` is too small for the special tokens and the 256 byte symbols, or larger than
            the corpus has pairs to merge.
    """
    base = len(SPECIAL_TOKENS) + 256
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < base:
        raise ValueError(f"vocab_size must be an integer of at least {base} (specials + 256 bytes), got {vocab_size!r}")
    if not CORPUS.isascii():
        raise ValueError("the tokenizer corpus must be ASCII (the pre-tokenizer regex spells ASCII classes)")
    return _train(vocab_size)


@functools.lru_cache(maxsize=8)  # keyed after validation: the cache would take 512.0 or True for a valid size
def _train(vocab_size: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """train_bpe's work, for a vocab_size already checked; tuples, as the cached result is shared."""
    tokens = list(SPECIAL_TOKENS) + list(_SYMBOLS)
    known = set(tokens)
    # Each distinct pre-token once, with its count: merges never cross pre-token boundaries.
    words: list[list] = [[list(word), count] for word, count in sorted(Counter(_pretokenize(CORPUS)).items())]
    merges: list[tuple[str, str]] = []
    while len(tokens) < vocab_size:
        pairs: Counter = Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"the corpus supports at most {len(tokens)} vocabulary entries, asked for {vocab_size}")
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merged = best[0] + best[1]
        merges.append(best)
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        for entry in words:
            symbols = entry[0]
            out = []
            i = 0
            while i < len(symbols):
                # Left to right and non-overlapping, as BPE applies one merge to "aaa".
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            entry[0] = out
    return tuple(tokens), tuple(merges)


def _json_bytes(value: object) -> bytes:
    # Insertion-ordered keys, fixed separators, real UTF-8 (as the hub's files) and a trailing newline.
    return (json.dumps(value, indent=2, ensure_ascii=False, separators=(",", ": ")) + "\n").encode("utf-8")


def _added_token(token_id: int, content: str) -> dict:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def tokenizer_files(vocab_size: int, model_max_length: int) -> dict[str, bytes]:
    """The five tokenizer files' exact bytes, by file name.

    Args:
        vocab_size: the total number of entries (512 for the miniature).
        model_max_length: the longest input the model takes (its max_position_embeddings).

    Returns:
        A dict from each of FILE_NAMES to that file's bytes.

    Raises:
        ValueError: if ``vocab_size`` cannot be filled (see ``train_bpe``).
    """
    tokens, merges = train_bpe(vocab_size)
    vocab = {token: i for i, token in enumerate(tokens)}
    merge_lines = [f"{a} {b}" for a, b in merges]  # byte-level symbols never contain a space
    specials = list(SPECIAL_TOKENS)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, s) for i, s in enumerate(specials)],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        # trim_offsets false: offsets keep the leading space of "Ġtoken", as StarCoder2's post-processor does.
        "post_processor": dict(byte_level, trim_offsets=False),
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,  # every byte has a symbol, so nothing is unknown
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merge_lines,
        },
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): dict(_token_entry(s), special=True) for i, s in enumerate(specials)},
        "additional_special_tokens": specials,
        "bos_token": EOS_TOKEN,
        # False (StarCoder2's file says true): the clean-up deletes spaces before "," "." "!" "?" "'", which
        # changes code, so decode(encode(text)) would not give the text back.
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": EOS_TOKEN,
        "vocab_size": vocab_size,
    }
    special_map = {
        "additional_special_tokens": specials,
        "bos_token": _token_entry(EOS_TOKEN),
        "eos_token": _token_entry(EOS_TOKEN),
        "unk_token": _token_entry(EOS_TOKEN),
    }
    return {
        "tokenizer.json": _json_bytes(tokenizer),
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special_map),
        "vocab.json": _json_bytes(vocab),
        # The trailing newline matters: GPT-2 style readers drop the last line of the split.
        "merges.txt": ("\n".join([MERGES_HEADER, *merge_lines]) + "\n").encode("utf-8"),
    }


def write_tokenizer_files(folder: Path, vocab_size: int, model_max_length: int) -> list[str]:
    """Write the miniature's tokenizer (StarCoder2's five files) into ``folder``.

    Args:
        folder: an existing folder; files of the same names in it are replaced.
        vocab_size: the model's vocab_size; the tokenizer has exactly this many entries.
        model_max_length: the model's max_position_embeddings, recorded in tokenizer_config.json.

    Returns:
        The names of the files written, in FILE_NAMES order.

    Raises:
        ValueError: if ``vocab_size`` cannot be filled (see ``train_bpe``).
        OSError: if a file cannot be written.
    """
    files = tokenizer_files(vocab_size, model_max_length)
    folder = Path(folder)
    for name in FILE_NAMES:
        # Bytes, not text: write_text would turn "\n" into "\r\n" on Windows and break byte-stability.
        (folder / name).write_bytes(files[name])
    return list(FILE_NAMES)
