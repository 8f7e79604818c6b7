"""The miniature's byte-level BPE tokenizer, checked against the `tokenizers` library and transformers as oracles."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.implementations import ByteLevelBPETokenizer
from tokenizers.models import BPE

from loratv.example import tokenizer as et
from loratv.example.tokenizer import CORPUS, FILE_NAMES, SPECIAL_TOKENS, write_tokenizer_files

VOCAB = 512  # the miniature's vocab_size (example.VOCAB)
MAX_LENGTH = 512  # its max_position_embeddings

TEXTS = [
    "",
    "def add(a, b):\n    return a + b\n",
    "class Foo(Bar):\n\tdef __init__(self, x=1.5e-3):\n\t\tself.x = x  # keep x\n",
    "   leading, trailing and   inner   runs of spaces   ",
    "\n\n\n\t\t\t\r\n \t \n",
    "if x != y and not z: print(f'{x!r} , {y} . done !')\n",
    "don't won't it's we're they've I'm you'll he'd",
    "café naïve Ünïcödé — “quotes” ½ ∑ x² ≠ ∞",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji: 😀🚀👩‍💻🇫🇷 and a ZWJ 👨‍👩‍👧",
    "null\x00byte\x01ctrl\x7f\x1b[0m",
    "<not_special> <fim_prefix lookalike> <|endoftext",
    CORPUS,
]

CODE_SAMPLE = '''import os


def walk(root):
    """Yield every file path under root, sorted."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            yield os.path.join(folder, name)
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    assert write_tokenizer_files(path, VOCAB, MAX_LENGTH) == list(FILE_NAMES)
    return path


@pytest.fixture(scope="module")
def raw(folder) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _read_merges(folder: Path) -> list[tuple[str, str]]:
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2" and lines[-1] == ""  # header, and a trailing newline
    return [tuple(line.split(" ")) for line in lines[1:-1]]


def test_writes_the_five_starcoder2_files(folder):
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILE_NAMES)
    for name in FILE_NAMES:
        data = (folder / name).read_bytes()
        assert data.endswith(b"\n") and b"\r" not in data
        if name.endswith(".json"):
            json.loads(data.decode("utf-8"))


def test_vocab_layout_and_merges_are_consistent(folder):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert len(vocab) == VOCAB and sorted(vocab.values()) == list(range(VOCAB))
    assert model["type"] == "BPE" and model["vocab"] == vocab
    by_id = sorted(vocab, key=vocab.get)
    assert by_id[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS) and by_id[0] == "<|endoftext|>"
    # Then the 256 byte-level symbols, in byte order.
    table = et.bytes_to_unicode()
    assert by_id[len(SPECIAL_TOKENS) : len(SPECIAL_TOKENS) + 256] == [table[b] for b in range(256)]
    assert len(set(table.values())) == 256
    merges = _read_merges(folder)
    assert [" ".join(m) for m in merges] == model["merges"]
    assert len(merges) == len(set(merges)) > 0
    for a, b in merges:
        assert a in vocab and b in vocab and a + b in vocab
    # Every learnt token is the result of some merge.
    assert set(by_id[len(SPECIAL_TOKENS) + 256 :]) <= {a + b for a, b in merges}


def test_tokenizer_json_pipeline(folder):
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["pre_tokenizer"]["type"] == "ByteLevel"
    assert data["pre_tokenizer"]["add_prefix_space"] is False and data["pre_tokenizer"]["use_regex"] is True
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["post_processor"]["type"] == "ByteLevel" and data["post_processor"]["trim_offsets"] is False
    assert [(t["id"], t["content"], t["special"]) for t in data["added_tokens"]] == [
        (i, s, True) for i, s in enumerate(SPECIAL_TOKENS)
    ]
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "GPT2Tokenizer" and config["add_prefix_space"] is False
    assert config["bos_token"] == config["eos_token"] == config["unk_token"] == "<|endoftext|>"
    assert config["additional_special_tokens"] == list(SPECIAL_TOKENS)
    assert config["added_tokens_decoder"]["0"]["content"] == "<|endoftext|>"


def test_raw_tokenizer_loads(raw):
    assert raw.get_vocab_size() == VOCAB
    assert raw.token_to_id("<|endoftext|>") == 0
    assert raw.encode("<fim_prefix>x<fim_suffix>y<fim_middle><|endoftext|>").ids[-1] == 0


def test_transformers_loads_with_endoftext_as_bos_eos_unk(hf):
    assert len(hf) == VOCAB and hf.vocab_size == VOCAB
    assert hf.bos_token == hf.eos_token == hf.unk_token == "<|endoftext|>"
    assert hf.bos_token_id == hf.eos_token_id == hf.unk_token_id == 0
    assert hf.convert_tokens_to_ids("<fim_middle>") == 2


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_round_trip_and_oracles_agree(raw, hf, folder, text):
    ids = raw.encode(text).ids
    assert all(0 <= i < VOCAB for i in ids)
    assert raw.decode(ids) == text
    hf_ids = hf.encode(text, add_special_tokens=False)
    assert hf_ids == ids
    assert hf(text)["input_ids"] == ids  # no bos/eos added by default, as StarCoder2
    assert hf.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_vocab_and_merges_files_alone_give_the_same_ids(raw, folder, text):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = _read_merges(folder)
    rebuilt = Tokenizer(BPE(vocab, merges))
    rebuilt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    expected = raw.encode(text).ids
    assert rebuilt.encode(text).ids == expected
    files = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert files.encode(text).ids == expected


def test_transformers_from_vocab_and_merges_only(folder, raw, tmp_path):
    from transformers import AutoTokenizer

    for name in FILE_NAMES:
        if name != "tokenizer.json":
            (tmp_path / name).write_bytes((folder / name).read_bytes())
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == VOCAB and tok.eos_token_id == 0
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == raw.encode(text).ids


def _reference_bpe(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    """GPT-2's original BPE loop (lowest-rank pair first), on the module's ASCII pre-tokenizer."""
    ranks = {pair: i for i, pair in enumerate(merges)}
    ids = []
    for word in et._pretokenize(text):
        parts = list(word)
        while len(parts) > 1:
            pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == len(ranks):
                break
            first, second = merges[rank]
            out, j = [], 0
            while j < len(parts):
                if j + 1 < len(parts) and parts[j] == first and parts[j + 1] == second:
                    out.append(first + second)
                    j += 2
                else:
                    out.append(parts[j])
                    j += 1
            parts = out
        ids.extend(vocab[p] for p in parts)
    return ids


def test_pure_python_reference_bpe_matches(raw, folder):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = _read_merges(folder)
    for text in [t for t in TEXTS if t.isascii()] + [CODE_SAMPLE]:
        assert _reference_bpe(text, vocab, merges) == raw.encode(text).ids


def test_training_pretokenizer_matches_bytelevel():
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(CORPUS)
    assert [p for p, _ in pieces] == et._pretokenize(CORPUS)
    assert CORPUS.isascii() and len(CORPUS.encode()) > 2000


def test_merges_compress_code(raw, hf):
    for text in (CODE_SAMPLE, CORPUS):
        assert len(raw.encode(text).ids) < 0.75 * len(text.encode("utf-8"))
    assert len(hf.encode(CODE_SAMPLE, add_special_tokens=False)) < len(CODE_SAMPLE.encode("utf-8"))


def test_two_writes_are_byte_identical(tmp_path, folder):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    write_tokenizer_files(a, VOCAB, MAX_LENGTH)
    write_tokenizer_files(b, VOCAB, MAX_LENGTH)
    for name in FILE_NAMES:
        assert (a / name).read_bytes() == (b / name).read_bytes() == (folder / name).read_bytes()


def test_fresh_process_with_other_hash_seed_writes_the_same_bytes_using_only_the_stdlib(tmp_path, folder):
    script = (
        "import sys; from pathlib import Path\n"
        "from loratv.example.tokenizer import write_tokenizer_files\n"
        "write_tokenizer_files(Path(sys.argv[1]), 512, 512)\n"
        "heavy = {'torch', 'numpy', 'tokenizers', 'transformers'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env=env, timeout=120)
    for name in FILE_NAMES:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes()


def test_other_vocab_sizes_and_bad_sizes(tmp_path):
    smallest = len(SPECIAL_TOKENS) + 256
    assert write_tokenizer_files(tmp_path, smallest, MAX_LENGTH) == list(FILE_NAMES)
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab_size() == smallest
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8") == "#version: 0.2\n"
    for bad in (smallest - 1, 0, -5, 512.0, "512", True):
        with pytest.raises(ValueError):
            write_tokenizer_files(tmp_path, bad, MAX_LENGTH)
    with pytest.raises(ValueError, match="corpus supports at most"):
        et.train_bpe(100_000)
