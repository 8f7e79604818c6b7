"""Untrusted files (issue 7, item 1): every hostile header, index, config and options file is refused in one
sentence naming the file and the problem (exit 2, nothing written), before anything is allocated from its claims,
and nothing in a file is ever executed. The cases test_bad_input.py and test_checkpoint.py already cover (header
length beyond the file, non-JSON, offsets past the end or disagreeing with the shape, overlaps, shards outside the
folder by `..`, absolute path or symlink, malicious pickles) are not repeated here.
"""

import json
import os
import shutil
import struct

import pytest
import torch
import yaml

from helpers_io import (  # noqa: F401 - fixtures are found by name
    assert_nothing_at,
    assert_one_line_error,
    loratv_cache,
    run_cli,
    write_raw_safetensors,
)
from helpers_reliability import write_tiny

pytestmark = pytest.mark.usefixtures("loratv_cache")

W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path / "tiny")


def merge_refuses(capsys, tiny, tmp_path, *names, base=None, adapter=None):
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "merge", "--base", base or tiny["base"], "--adapter", adapter or tiny["adapter"],
                         "-o", out, "--quiet")
    line = assert_one_line_error(rc, err, *names)
    assert_nothing_at(out)
    return line


# ---- safetensors headers -------------------------------------------------------------------------------------

HOSTILE_HEADERS = {
    "duplicate tensor names": (b'{"w":' + json.dumps(W).encode() + b',"w":' + json.dumps(W).encode() + b"}", 8,
                               "duplicate key 'w'"),
    "invalid UTF-8": (b'{"w\xff":' + json.dumps(W).encode() + b"}", 8, "not UTF-8"),
    "unknown dtype": ({"w": {**W, "dtype": "F128"}}, 8, 'dtype "F128"'),
    "dtype that is not a string": ({"w": {**W, "dtype": ["F32"]}}, 8, "dtype"),
    "offsets that leave a gap": ({"a": W, "b": {**W, "data_offsets": [12, 20]}}, 20, "leave a gap"),
    "byte size that disagrees with the shape": ({"w": {**W, "shape": [3]}}, 8, "needs 12 bytes"),
    "absurd element count": ({"w": {**W, "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 2**122]}}, 8, "absurd"),
    "absurd count hidden by a zero dim": ({"w": {**W, "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, 0,
                                          "absurd"),
    "too many dimensions": ({"w": {**W, "shape": [1] * 65, "data_offsets": [0, 4]}}, 4, "65 dimensions"),
    "an integer of 5000 digits": (b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', 8,
                                  "too many digits"),
    "nesting 100000 deep": (b'{"w":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 8, "nested too deeply"),
    "NaN in a shape": (b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', 8, "NaN is not JSON"),
    "a lone surrogate in a name": (b'{"\\ud800":' + json.dumps(W).encode() + b"}", 8, "lone surrogate"),
    "a line break in a name": ({"a\nb": W}, 8, "control characters"),
    "metadata that is not strings": ({"__metadata__": {"format": 1}, "w": W}, 8, "__metadata__"),
    "a header that is not an object": (b"[1, 2]", 0, "not a JSON object"),
    "negative offsets": ({"w": {**W, "data_offsets": [-8, 0]}}, 8, "invalid data_offsets"),
    # the fuzzer found this one: tuple({}) is (), so an object for a shape read as a 0-d tensor
    "a shape that is an object": ({"w": {**W, "shape": {}, "data_offsets": [0, 4]}}, 4, "a shape list"),
    "three offsets": ({"w": {**W, "data_offsets": [0, 4, 8]}}, 8, "data_offsets pair"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_header(capsys, tiny, tmp_path, case):
    header, data_len, words = HOSTILE_HEADERS[case]
    file = write_raw_safetensors(tiny["base"] / "model.safetensors", header, b"\0" * data_len)
    line = merge_refuses(capsys, tiny, tmp_path, file)
    assert words in line


def test_header_above_the_cap_is_refused_without_reading_it(capsys, tiny, tmp_path):
    """A header length within the file but above 100 MiB (a sparse file: no disk is used)."""
    from loratv.io.safetensors_format import MAX_HEADER_BYTES

    file = tiny["base"] / "model.safetensors"
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 8))
        f.truncate(8 + MAX_HEADER_BYTES + 64)
    line = merge_refuses(capsys, tiny, tmp_path, file)
    assert "above the 100 MiB cap" in line


def test_absurd_claims_are_refused_before_any_allocation(capsys, tiny, tmp_path, monkeypatch):
    """Claims of 2^40 and 2^62 elements (consistent offsets, data missing): refused while only Python integers
    exist; any tensor allocation on the way would raise here instead."""

    def no_allocation(*args, **kwargs):
        raise AssertionError("a tensor was allocated from an unchecked header")

    for case in ({"w": {**W, "shape": [2**40], "data_offsets": [0, 2**42]}},
                 {"w": {**W, "shape": [2**31, 2**31], "data_offsets": [0, 2**64]}}):
        write_raw_safetensors(tiny["base"] / "model.safetensors", case, b"\0" * 8)
        with monkeypatch.context() as m:
            for func in ("empty", "zeros", "frombuffer", "ones"):
                m.setattr(torch, func, no_allocation)
            line = merge_refuses(capsys, tiny, tmp_path, tiny["base"] / "model.safetensors")
        assert "truncated" in line or "absurd" in line


# ---- index files ---------------------------------------------------------------------------------------------


def _index(tiny):
    path = tiny["sharded"] / "model.safetensors.index.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("shard", ["model-00001\x00-of-00002.safetensors", "model-00001\n.safetensors"])
def test_index_shard_name_with_control_characters(capsys, tiny, tmp_path, shard):
    path, index = _index(tiny)
    index["weight_map"]["model.norm.weight"] = shard
    path.write_text(json.dumps(index))
    line = merge_refuses(capsys, tiny, tmp_path, path, "invalid shard name", base=tiny["sharded"])
    assert "\\u0000" in line or "\\n" in line


def test_index_that_escapes_through_a_symlinked_subfolder(capsys, tiny, tmp_path):
    """`sub/x.safetensors` looks relative and has no `..`, but `sub` is a symlink to a folder outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(tiny["sharded"] / "model-00002-of-00002.safetensors", outside / "model-00002-of-00002.safetensors")
    os.symlink(outside, tiny["sharded"] / "sub")
    path, index = _index(tiny)
    index["weight_map"] = {k: ("sub/model-00002-of-00002.safetensors" if v.startswith("model-00002") else v)
                           for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))
    line = merge_refuses(capsys, tiny, tmp_path, "sub/model-00002-of-00002.safetensors", base=tiny["sharded"])
    assert "outside the model folder" in line


@pytest.mark.parametrize("brk, shown", [("\n", "\\n"), ("\x1e", "\\x1e"), ("\u2028", "\\u2028")])
def test_tensor_name_with_a_line_break_stays_on_one_line(capsys, tiny, tmp_path, brk, shown):
    """Any character str.splitlines() breaks on (the fuzzer found \\x1e, a record separator, in a config key)."""
    path, index = _index(tiny)
    index["weight_map"][f"evil{brk}name"] = "model-00001-of-00002.safetensors"
    path.write_text(json.dumps(index))
    line = merge_refuses(capsys, tiny, tmp_path, path, base=tiny["sharded"])
    assert f"evil{shown}name" in line


def test_index_with_duplicate_keys(capsys, tiny, tmp_path):
    path, index = _index(tiny)
    text = json.dumps(index)
    path.write_text(text[:-1] + ', "weight_map": {}}')
    line = merge_refuses(capsys, tiny, tmp_path, path, base=tiny["sharded"])
    assert "duplicate key 'weight_map'" in line


# ---- configs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, words", [
    ("[1, 2]", "not a model config"),
    ('{"model_type": ["gpt2"]}', "'model_type' must be a string"),
    ('{"tie_word_embeddings": "no"}', "'tie_word_embeddings' must be true or false"),
    ('{"model_type": "llama", "model_type": "gpt2"}', "duplicate key 'model_type'"),
])
def test_model_config_read_as_checked_data(capsys, tiny, tmp_path, config, words):
    (tiny["base"] / "config.json").write_text(config)
    line = merge_refuses(capsys, tiny, tmp_path, tiny["base"] / "config.json")
    assert words in line


@pytest.mark.parametrize("change, words", [
    ({"modules_to_save": True}, "modules_to_save must be a list of strings, not True"),  # found by the fuzzer
    ({"target_modules": {"q_proj": 1}}, "target_modules must be a string or a list of strings"),
    ({"r": 0}, "not a positive number"),
    ({"r": True}, "r must be an integer"),
    ({"layers_to_transform": "0"}, "layers_to_transform must be an integer or a list of integers"),
])
def test_adapter_config_field_types(capsys, tiny, tmp_path, change, words):
    path = tiny["adapter"] / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    line = merge_refuses(capsys, tiny, tmp_path, path)
    assert words in line


def test_adapter_config_with_duplicate_keys(capsys, tiny, tmp_path):
    """Two parsers could read `r` differently (Python's json keeps the last); loratv reads neither."""
    path = tiny["adapter"] / "adapter_config.json"
    path.write_text(path.read_text()[:-1] + ', "r": 64}')
    line = merge_refuses(capsys, tiny, tmp_path, path)
    assert "duplicate key 'r'" in line


def test_yaml_options_never_run_code(capsys, tiny, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"base: !!python/object/apply:os.system ['touch {marker}']\n"
    yaml.unsafe_load(payload)  # control: an unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    options = tmp_path / "options.yml"
    options.write_text(payload)
    rc, _, err = run_cli(capsys, "extract", "--config", options)
    line = assert_one_line_error(rc, err, options)
    assert "not plain data" in line
    assert not marker.exists()


@pytest.mark.parametrize("text, words", [
    ("dense: 'no'\n", "'dense' is a switch"),
    ("base: [1, 2]\n", "'base' must be a single value"),
    ("storage-dtype: fp8\n", "must be one of auto, fp32, fp64"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("base: \xff\n", "not UTF-8"),
])
def test_yaml_option_values_are_checked_like_flags(capsys, tiny, tmp_path, text, words):
    options = tmp_path / "options.yml"
    options.write_bytes(text.encode("latin-1"))
    rc, _, err = run_cli(capsys, "extract", "--config", options, "--base", tiny["base"], "--finetuned",
                         tiny["finetuned"], "-o", tmp_path / "tv")
    line = assert_one_line_error(rc, err, options)
    assert words in line
    assert_nothing_at(tmp_path / "tv")


# ---- values a header cannot be blamed for -------------------------------------------------------------------


def test_difference_that_overflows_float32_names_the_cause(capsys, tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([-3e38, 1.0])}, tmp_path / "base.safetensors")
    save_file({"w": torch.tensor([3e38, 1.0])}, tmp_path / "ft.safetensors")
    rc, _, err = run_cli(capsys, "extract", "--base", tmp_path / "base.safetensors", "--finetuned",
                         tmp_path / "ft.safetensors", "-o", tmp_path / "tv", "--quiet")
    line = assert_one_line_error(rc, err, "ft.safetensors", "'w'")
    assert "more than float32 can hold" in line and "--storage-dtype fp64" in line
    rc, _, err = run_cli(capsys, "extract", "--base", tmp_path / "base.safetensors", "--finetuned",
                         tmp_path / "ft.safetensors", "-o", tmp_path / "tv", "--quiet", "--storage-dtype", "fp64")
    assert rc == 0, err


def test_float_and_integer_versions_of_a_tensor_are_refused(capsys, tiny, tmp_path):
    """Same byte size, F32 reinterpreted as I32 by an edited header: the difference would be meaningless."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny["finetuned"] / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].view(torch.int32)
    save_file(tensors, tiny["finetuned"] / "model.safetensors")
    rc, _, err = run_cli(capsys, "extract", "--base", tiny["base"], "--finetuned", tiny["finetuned"], "-o",
                         tmp_path / "tv", "--quiet")
    line = assert_one_line_error(rc, err, "model.embed_tokens.weight")
    assert "I32 but F32" in line
