"""Fuzzing (issue 7, item 2): hypothesis mutates valid inputs (truncation, bit flips, byte splices, header-length
changes, JSON field changes, duplicated keys) and runs the CLI on each, in-process through `loratv.cli.main`.

Every case must end in one of two ways: a correct read (exit 0 and an output that agrees with an independent
oracle: safetensors + torch for tensors, the unmutated run for inputs that still mean the same) or exit 2 with one
`loratv: error:` line and nothing at the output path. An exception escaping main (a traceback for a user), a case
running past 30 s (a hang) or a peak RSS 256 MiB above the start (a memory blow-up) fails.

Targets: a safetensors model file (extract), an index (extract of a sharded model), an adapter's safetensors file
and adapter_config.json (merge), a model's config.json (merge, which rewrites it) and a YAML options file
(extract --config). CI runs LORATV_FUZZ_EXAMPLES cases per target (default 40); see docs/reliability.md for the
longer campaign.
"""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from helpers_io import assert_nothing_at, assert_one_line_error, load_folder, tensors_equal
from helpers_reliability import ADAPTER_CONFIG, CONFIG, run_guarded_case, write_tiny

EXAMPLES = int(os.environ.get("LORATV_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("LORATV_FUZZ_RANDOM") is None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large], database=None)
TALLY = {}  # target -> {"accepted", "refused"}: printed by the campaign (pytest -s)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    folders = write_tiny(root / "inputs")
    reference = root / "reference-merge"
    from loratv.ops.merge import merge

    merge(folders["base"], folders["adapter"], reference, precision="fp16")
    return {"root": root, "reference_merge": reference, **folders}


@pytest.fixture(scope="module", autouse=True)
def report_tally():
    yield
    for target, t in sorted(TALLY.items()):
        print(f"\nfuzz {target}: {t['accepted'] + t['refused']} cases, {t['accepted']} read correctly, "
              f"{t['refused']} refused (exit 2)")


# ---- mutations -----------------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-3, 4096)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "F4", "../x", "/etc/passwd",
                       "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "LORA", "q_proj",
                       "LOHA", "LOKR", "ADALORA", "VERA", "IA3", "OFT", "lora_only", "all", "gaussian", "pissa"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _path_edit(value, path, new, delete):
    """A copy of a JSON value with the item at `path` (keys, or indices taken modulo the length) set to `new`, or
    deleted; where the path leaves the containers, the value there is replaced."""
    if not path or not isinstance(value, (dict, list)) or (isinstance(value, list) and not value):
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    if isinstance(copy, dict):
        key = list(copy)[path[0] % len(copy)] if isinstance(path[0], int) and copy else str(path[0])
    else:
        key = path[0] % len(copy) if isinstance(path[0], int) else 0
    if len(path) == 1 and delete:
        if isinstance(copy, dict):
            copy.pop(key, None)
        else:
            del copy[key]
        return copy
    current = copy.get(key) if isinstance(copy, dict) else copy[key]
    copy[key] = new if len(path) == 1 else _path_edit(current, path[1:], new, delete)
    return copy


@st.composite
def json_edit(draw, text: str):
    """Valid JSON with one field changed, deleted or added, or a key duplicated (raw text)."""
    value = json.loads(text)
    kind = draw(st.sampled_from(["change", "delete", "add", "duplicate"]))
    if kind == "duplicate" and isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        body = json.dumps(value)
        return "{" + json.dumps(key) + ":" + json.dumps(draw(JSON_VALUES)) + "," + body[1:]
    path = draw(st.lists(st.integers(0, 50) | st.text(max_size=6), min_size=1, max_size=4))
    if kind == "add":
        path = path + [draw(st.text(min_size=1, max_size=6))]
    return json.dumps(_path_edit(value, path, draw(JSON_VALUES), kind == "delete"))


@st.composite
def byte_mutation(draw, data: bytes, hot: int):
    """Truncation, 1-8 bit flips (half of them within the first `hot` bytes), a splice or a deletion."""
    n = len(data)
    if not n:
        return draw(st.binary(max_size=16))
    kind = draw(st.sampled_from(["truncate", "flip", "flip", "splice", "delete"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(0, n - 1)))]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, max(0, min(hot, n) - 1)) | st.integers(0, n - 1))
            out[pos] ^= 1 << draw(st.integers(0, 7))
        return bytes(out)
    pos = draw(st.integers(0, n))
    if kind == "splice":
        return data[:pos] + draw(st.binary(min_size=1, max_size=16)) + data[pos:]
    return data[:pos] + data[pos + draw(st.integers(1, 64)):]


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return data[8:8 + n], data[8 + n:]


@st.composite
def safetensors_mutation(draw, data: bytes):
    """1-3 mutations of a safetensors file: raw bytes, the length prefix, or the header's JSON."""
    for _ in range(draw(st.integers(1, 3))):
        header, body = _split(data) if len(data) >= 8 else (b"", b"")
        try:
            text = header.decode("utf-8")
            json.loads(text)
            json_ok = len(data) >= 8 + len(header)
        except (UnicodeDecodeError, ValueError, RecursionError):
            json_ok = False
        kind = draw(st.sampled_from(["bytes", "prefix", "json", "json"] if json_ok else ["bytes", "prefix"]))
        if kind == "bytes":
            data = draw(byte_mutation(data, 8 + len(header)))
        elif kind == "prefix":
            length = draw(st.integers(0, 2**64 - 1) | st.integers(-16, 16).map(lambda d: max(0, len(header) + d)))
            data = struct.pack("<Q", length) + data[8:]
        else:
            raw = draw(json_edit(text)).encode("utf-8")
            data = struct.pack("<Q", len(raw)) + raw + body
    return data


# ---- oracles -------------------------------------------------------------------------------------------------


def _refused(rc, err, out, tally):
    assert_one_line_error(rc, err)
    assert_nothing_at(out)
    tally["refused"] += 1


def _tally(name):
    return TALLY.setdefault(name, {"accepted": 0, "refused": 0})


def _expected_task_vector(base_file: Path, ft_file: Path):
    """T per tensor by safetensors + torch: the storage dtype's correctly rounded f − b (float64 if an input is),
    int64 differences for integer tensors; None when T is undefined (a non-finite input or overflow)."""
    out = {}
    with safe_open(base_file, "pt") as b, safe_open(ft_file, "pt") as f:
        for name in b.keys():
            x, y = b.get_tensor(name), f.get_tensor(name)
            if x.is_floating_point() != y.is_floating_point():
                return None
            if x.is_floating_point():
                wide = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
                d = y.to(wide) - x.to(wide)
                if d.numel() and not torch.isfinite(d).all():
                    return None
            else:
                d = y.to(torch.int64) - x.to(torch.int64)
            if d.numel() and torch.count_nonzero(d):
                out[name] = d
    return out


def _reference_loads(file: Path) -> bool:
    try:
        with safe_open(file, "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:  # noqa: BLE001 - the reference parser's verdict, whatever its exception type
        return False


# ---- targets -------------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_fuzz_model_safetensors(tiny, tmp_path_factory, data):
    """A mutated fine-tuned model file: extract reads it correctly or refuses it."""
    tally = _tally("model safetensors (extract)")
    work = tmp_path_factory.mktemp("case")
    original = (tiny["finetuned"] / "model.safetensors").read_bytes()
    mutated = data.draw(safetensors_mutation(original))
    file = work / "ft" / "model.safetensors"
    file.parent.mkdir()
    file.write_bytes(mutated)
    out = work / "tv"
    rc, _, err = run_guarded_case(["extract", "--base", tiny["base"], "--finetuned", file.parent, "-o", out, "--quiet"])
    if rc == 2:
        return _refused(rc, err, out, tally)
    assert rc == 0, err
    assert _reference_loads(file), "loratv accepted a file that the safetensors library rejects"
    expected = _expected_task_vector(tiny["base"] / "model.safetensors", file)
    assert expected is not None, "extract accepted an undefined task vector"
    assert tensors_equal(load_folder(out), expected)
    tally["accepted"] += 1
    shutil.rmtree(work)


def _mutate_json_file(data, path, text: str) -> None:
    """Write `text` to `path` with either a JSON-aware edit or raw byte damage, as hypothesis chooses."""
    if data.draw(st.booleans()):
        path.write_text(data.draw(json_edit(text)))
    else:
        path.write_bytes(data.draw(byte_mutation(text.encode(), len(text))))


@FUZZ
@given(data=st.data())
def test_fuzz_index(tiny, tmp_path_factory, data):
    """A mutated model.safetensors.index.json: the shards read are still the model's, or it is refused."""
    tally = _tally("index json (extract)")
    work = tmp_path_factory.mktemp("case")
    folder = work / "sharded"
    shutil.copytree(tiny["sharded"], folder)
    index = folder / "model.safetensors.index.json"
    text = index.read_text()
    _mutate_json_file(data, index, text)
    out = work / "tv"
    rc, stdout, err = run_guarded_case(["extract", "--base", tiny["base"], "--finetuned", folder, "-o", out, "--quiet"])
    if rc == 2:
        return _refused(rc, err, out, tally)
    assert rc == 0, err
    report = json.loads((out / "task_vector.json").read_text())
    assert report["total_tensors"] == 9 and report["changed_tensors"] == 0  # the same tensors, read from the shards
    tally["accepted"] += 1
    shutil.rmtree(work)


def _merge_case(tiny, work, tally, extra=()):
    out = work / "merged"
    rc, _, err = run_guarded_case(["merge", "--base", work / "base", "--adapter", work / "adapter", "-o", out,
                                   "--precision", "fp16", "--quiet", *extra])
    if rc == 2:
        _refused(rc, err, out, tally)
        return None
    assert rc == 0, err
    from loratv.ops.verify import verify

    report = verify(out)
    assert report.ok, report.problems
    tally["accepted"] += 1
    return out


def _merge_inputs(tiny, work):
    shutil.copytree(tiny["base"], work / "base")
    shutil.copytree(tiny["adapter"], work / "adapter")


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_safetensors(tiny, tmp_path_factory, data):
    """A mutated adapter_model.safetensors: merge refuses it, or writes a sound model (the reference merge when
    the file still holds the same tensors)."""
    tally = _tally("adapter safetensors (merge)")
    work = tmp_path_factory.mktemp("case")
    _merge_inputs(tiny, work)
    file = work / "adapter" / "adapter_model.safetensors"
    original = file.read_bytes()
    file.write_bytes(data.draw(safetensors_mutation(original)))
    out = _merge_case(tiny, work, tally)
    if out is not None:
        assert _reference_loads(file), "loratv accepted a file that the safetensors library rejects"
        with safe_open(file, "pt") as f:
            got = {k: f.get_tensor(k) for k in f.keys()}
        with safe_open(tiny["adapter"] / "adapter_model.safetensors", "pt") as f:
            same = tensors_equal(got, {k: f.get_tensor(k) for k in f.keys()})
        if same:
            assert tensors_equal(load_folder(out), load_folder(tiny["reference_merge"]))
    shutil.rmtree(work)


@FUZZ
@given(data=st.data())
def test_fuzz_adapter_config(tiny, tmp_path_factory, data):
    """A mutated adapter_config.json: refused, or a sound merge (the reference one when it means the same)."""
    tally = _tally("adapter_config.json (merge)")
    work = tmp_path_factory.mktemp("case")
    _merge_inputs(tiny, work)
    config = work / "adapter" / "adapter_config.json"
    text = json.dumps(ADAPTER_CONFIG)
    _mutate_json_file(data, config, text)
    out = _merge_case(tiny, work, tally)
    if out is not None:
        try:
            same = json.loads(config.read_bytes()) == ADAPTER_CONFIG
        except ValueError:
            same = False
        if same:
            assert tensors_equal(load_folder(out), load_folder(tiny["reference_merge"]))
    shutil.rmtree(work)


@FUZZ
@given(data=st.data())
def test_fuzz_model_config(tiny, tmp_path_factory, data):
    """A mutated config.json of the base: merge --precision fp16 (which rewrites it) refuses it or writes a sound
    model whose tensors are the reference merge's (config.json does not change the arithmetic)."""
    tally = _tally("model config.json (merge)")
    work = tmp_path_factory.mktemp("case")
    _merge_inputs(tiny, work)
    config = work / "base" / "config.json"
    text = json.dumps(CONFIG)
    _mutate_json_file(data, config, text)
    out = _merge_case(tiny, work, tally)
    if out is not None:
        assert tensors_equal(load_folder(out), load_folder(tiny["reference_merge"]))
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    shutil.rmtree(work)


@FUZZ
@given(data=st.data())
def test_fuzz_yaml_options(tiny, tmp_path_factory, data):
    """A mutated YAML options file for extract --config: refused in one line, or run as the values say."""
    tally = _tally("YAML options (extract --config)")
    work = tmp_path_factory.mktemp("case")
    out = work / "tv"
    text = (f"base: {tiny['base']}\nfinetuned: {tiny['finetuned']}\noutput: {out}\ndense: false\n"
            "storage-dtype: auto\nquiet: true\n")
    raw = text.encode()
    if data.draw(st.booleans()):
        lines = text.splitlines()
        i = data.draw(st.integers(0, len(lines) - 1))
        value = data.draw(st.sampled_from(["!!python/object/apply:os.system ['touch PWNED']", "[1, 2]", "{a: 1}",
                                           "yes", "no", "null", "&a [*a]", "'fp64'", "1e400", "~", "\"\\ud800\""]))
        lines[i] = lines[i].split(":")[0] + ": " + value
        raw = ("\n".join(lines) + "\n").encode()
    else:
        raw = data.draw(byte_mutation(raw, len(raw)))
    options = work / "options.yml"
    options.write_bytes(raw)
    here = os.getcwd()
    os.chdir(work)  # a mutated output path lands in the case's folder
    try:
        rc, _, err = run_guarded_case(["extract", "--config", options], seconds=30)
    finally:
        os.chdir(here)
    assert not (work / "PWNED").exists()
    if rc == 2:
        assert_one_line_error(rc, err)
        tally["refused"] += 1
    else:
        assert rc == 0, err
        tally["accepted"] += 1
    shutil.rmtree(work)
