"""Reading checkpoints (single file, folder, shards, .bin, hub cache) and writing safetensors, against safetensors."""
# ruff: noqa: F811 - the fixtures imported from helpers_io are found by name, then taken as arguments

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers_io import (  # noqa: F401 - fixtures are found by name
    assert_nothing_at,
    assert_one_line_error,
    example,
    loratv_cache,
    read_header_json,
    run_cli,
    run_subprocess,
    shard_model,
    tensors_equal,
)
from loratv.errors import LoratvError
from loratv.io.checkpoint import Checkpoint
from loratv.io.safetensors_format import SafetensorsWriter

pytestmark = pytest.mark.usefixtures("loratv_cache")

SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]


@pytest.fixture(scope="module")
def oracle(example):
    """The example base as safetensors itself reads it."""
    return load_file(example["base"] / "model.safetensors")


def assert_agrees(ckpt: Checkpoint, oracle: dict):
    assert set(ckpt.names()) == set(oracle)
    assert len(ckpt) == len(oracle)
    for name, want in oracle.items():
        got = ckpt.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), name
        assert ckpt.entry(name).numel == want.numel()
    assert ckpt.total_parameters() == sum(t.numel() for t in oracle.values())


def test_folder_with_model_safetensors(example, oracle):
    ckpt = Checkpoint(example["base"])
    assert ckpt.format == "safetensors" and ckpt.index_file is None
    assert ckpt.files == [example["base"] / "model.safetensors"]
    assert ckpt.config["model_type"] == "starcoder2"
    assert [p.name for p in ckpt.aux_files()] == ["config.json", "generation_config.json", "merges.txt",
                                                  "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                                                  "vocab.json"]
    assert_agrees(ckpt, oracle)


def test_file_order_is_data_order(example):
    header = read_header_json(example["base"] / "model.safetensors")
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert Checkpoint(example["base"]).names() == by_offset


def test_single_safetensors_file(example, oracle):
    ckpt = Checkpoint(example["base"] / "model.safetensors")
    assert ckpt.root == example["base"]
    assert_agrees(ckpt, oracle)


def test_sharded_folder(example, oracle, tmp_path):
    folder = tmp_path / "sharded"
    weight_map = shard_model(example["base"] / "model.safetensors", folder, SHARDS)
    ckpt = Checkpoint(folder)
    assert ckpt.index_file == folder / "model.safetensors.index.json"
    assert [f.name for f in ckpt.files] == SHARDS
    for name, shard in weight_map.items():
        assert ckpt.shard_of(name).name == shard
    assert_agrees(ckpt, oracle)
    # the index file itself may be given
    assert_agrees(Checkpoint(folder / "model.safetensors.index.json"), oracle)


def test_index_that_disagrees_with_the_shards(example, tmp_path):
    folder = tmp_path / "sharded"
    weight_map = shard_model(example["base"] / "model.safetensors", folder, SHARDS)
    name = next(iter(weight_map))
    weight_map[name] = SHARDS[2]
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(LoratvError, match=rf"model.safetensors.index.json: tensor '{name}' is not in shard"):
        Checkpoint(folder)


def test_read_rows_raw_and_iter_raw_agree_with_safetensors(example, oracle):
    ckpt = Checkpoint(example["base"])
    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.bias"]:
        want = oracle[name]
        raw = want.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert ckpt.read_raw(name) == raw
        assert b"".join(bytes(p) for p in ckpt.iter_raw(name, chunk_bytes=1000)) == raw
        assert max(len(p) for p in ckpt.iter_raw(name, chunk_bytes=1000)) <= 1000
        rows = want.shape[0]
        for start, stop in [(0, 1), (3, 7), (rows - 2, rows), (0, rows)]:
            assert torch.equal(ckpt.read_rows(name, start, stop), want[start:stop])


def test_pytorch_model_bin(example, oracle, tmp_path):
    folder = tmp_path / "bin-model"
    folder.mkdir()
    shutil.copy(example["base"] / "config.json", folder)
    torch.save(oracle, folder / "pytorch_model.bin")
    ckpt = Checkpoint(folder)
    assert ckpt.format == "bin"
    assert_agrees(ckpt, oracle)
    name = "model.layers.2.mlp.c_fc.weight"
    assert torch.equal(ckpt.read_rows(name, 5, 9), oracle[name][5:9])
    assert ckpt.read_raw(name) == oracle[name].reshape(-1).view(torch.uint8).numpy().tobytes()


class _Evil:
    """Unpickling this calls open(marker, "w"), i.e. creates a file: code execution by pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_bin(path, marker):
    torch.save({"w": torch.zeros(3), "payload": _Evil(marker)}, path)


def test_malicious_pickle_is_refused(tmp_path):
    # control: the payload really runs when a checkpoint is unpickled without weights_only
    control_marker = tmp_path / "control-marker"
    _evil_bin(tmp_path / "control.bin", control_marker)
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert control_marker.exists(), "the payload should run when unpickled unsafely"

    marker = tmp_path / "pwned"
    folder = tmp_path / "evil-model"
    folder.mkdir()
    _evil_bin(folder / "pytorch_model.bin", marker)
    proc = run_subprocess(["inspect", folder], cwd=tmp_path)
    line = assert_one_line_error(proc.returncode, proc.stderr, folder / "pytorch_model.bin")
    assert "weights-only" in line
    assert not marker.exists()


def test_malicious_pickle_refused_by_merge(capsys, example, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil-model"
    folder.mkdir()
    _evil_bin(folder / "pytorch_model.bin", marker)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "merge", "--base", folder, "--adapter", example["adapter"], "-o", out)
    assert_one_line_error(rc, err, folder / "pytorch_model.bin")
    assert not marker.exists()
    assert_nothing_at(out)


# ---- writing -----------------------------------------------------------------------------------------------


def test_safetensors_writer_output_loads_with_safetensors(tmp_path):
    tensors = {
        "f32": torch.randn(5, 7),
        "f16": torch.randn(3, 2).half(),
        "bf16": torch.randn(4).bfloat16(),
        "f64": torch.randn(2, 2, 2, dtype=torch.float64),
        "i64": torch.arange(6).reshape(2, 3),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "w.safetensors"
    candidates = [(k, tuple(v.shape)) for k, v in tensors.items()] + [("never-written", (100, 100))]
    writer = SafetensorsWriter(path, candidates, {"format": "pt", "note": "ünïcode"})
    for name, t in tensors.items():
        if name == "f32":  # in pieces
            writer.begin(name, "F32", t.shape)
            writer.write(t[:2].contiguous().numpy().tobytes())
            writer.write(t[2:].contiguous().numpy().tobytes())
            writer.end()
        else:
            writer.add(name, t)
    writer.close()
    assert tensors_equal(load_file(path), tensors)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "ünïcode"}
        assert list(f.keys()) == sorted(tensors)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert n % 8 == 0  # data section aligned
    ckpt = Checkpoint(path)
    assert tensors_equal({k: ckpt.read(k) for k in ckpt.names()}, tensors)


def test_merge_with_max_shard_size(capsys, example, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    rc, _, err = run_cli(capsys, "merge", "-o", out, "--precision", "fp32", "--max-shard-size", "2MB", "--quiet")
    assert rc == 0, err
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n == 3  # 5.6 MB of fp32 in shards of at most 2 MB
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    merged = {}
    for shard in shards:
        part = load_file(out / shard)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 2_000_000
        for name in part:
            assert index["weight_map"][name] == shard
        merged.update(part)
    base = load_file(example["base"] / "model.safetensors")
    assert set(index["weight_map"]) == set(base) == set(merged)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    # the same tensors as an unsharded merge
    single = tmp_path / "single"
    assert run_cli(capsys, "merge", "-o", single, "--precision", "fp32", "--quiet")[0] == 0
    assert tensors_equal(merged, load_file(single / "model.safetensors"))
    # and transformers loads the sharded folder
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = model.state_dict()
    for name, t in merged.items():
        assert torch.equal(state[name], t), name
    assert torch.equal(state["lm_head.weight"], merged["model.embed_tokens.weight"])


def test_merge_of_a_sharded_base_keeps_its_shard_names(capsys, example, tmp_path):
    base = tmp_path / "base"
    names = ["part-a.safetensors", "part-b.safetensors", "part-c.safetensors"]
    weight_map = shard_model(example["base"] / "model.safetensors", base, names)
    shutil.copy(example["base"] / "config.json", base)
    out = tmp_path / "merged"
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", example["adapter"], "-o", out, "--quiet")
    assert rc == 0, err
    assert sorted(p.name for p in out.glob("*.safetensors")) == names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    for shard in names:
        assert set(load_file(out / shard)) == set(load_file(base / shard))
    # same values as the merge of the unsharded base
    ref = tmp_path / "ref"
    assert run_cli(capsys, "merge", "--base", example["base"], "--adapter", example["adapter"], "-o", ref, "--quiet")[0] == 0
    merged = {}
    for shard in names:
        merged.update(load_file(out / shard))
    assert tensors_equal(merged, load_file(ref / "model.safetensors"))


def test_merge_of_a_standard_sharded_base_keeps_its_layout(capsys, example, tmp_path):
    base = tmp_path / "base"
    weight_map = shard_model(example["base"] / "model.safetensors", base,
                             ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    shutil.copy(example["base"] / "config.json", base)
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", "--base", base, "--adapter", example["adapter"], "-o", out, "--quiet")[0] == 0
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] == weight_map


# ---- the hub cache -----------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An offline hub cache under tmp_path/hub; the working directory is elsewhere, so ids are not local paths."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


def _cache_repo(cache, example, org_name, *, sharded=False):
    """models--org--name/{refs/main, blobs/, snapshots/<commit>/...} with snapshot files symlinked to blobs."""
    repo = cache / f"models--{org_name.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    blobs = repo / "blobs"
    blobs.mkdir()
    shutil.copy(example["base"] / "config.json", blobs / "cfg")
    os.symlink("../../blobs/cfg", snap / "config.json")
    if sharded:
        shard_model(example["base"] / "model.safetensors", snap, SHARDS, blobs=blobs)
    else:
        shutil.copy(example["base"] / "model.safetensors", blobs / "weights")
        os.symlink("../../blobs/weights", snap / "model.safetensors")
    return snap


def test_hub_id_resolves_offline_from_the_cache(hub, example, oracle):
    snap = _cache_repo(hub, example, "org/name")
    for source in ["org/name", f"org/name@{COMMIT}", "org/name@main"]:
        ckpt = Checkpoint(source)
        assert os.path.realpath(ckpt.path) == os.path.realpath(snap), source
        assert ckpt.config["model_type"] == "starcoder2"
        assert_agrees(ckpt, oracle)


def test_sharded_hub_snapshot_with_blob_symlinks(hub, example, oracle):
    snap = _cache_repo(hub, example, "org/sharded", sharded=True)
    ckpt = Checkpoint("org/sharded")
    assert os.path.realpath(ckpt.path) == os.path.realpath(snap)
    assert [f.name for f in ckpt.files] == SHARDS
    assert_agrees(ckpt, oracle)


def test_hub_snapshot_symlink_outside_the_repo_is_refused(hub, example, tmp_path):
    snap = _cache_repo(hub, example, "org/sharded", sharded=True)
    stray = tmp_path / "stray.safetensors"
    shutil.copy(os.path.realpath(snap / SHARDS[1]), stray)
    os.remove(snap / SHARDS[1])
    os.symlink(stray, snap / SHARDS[1])
    with pytest.raises(LoratvError, match="lies outside the model folder"):
        Checkpoint("org/sharded")


def test_hub_id_merges_through_the_cli(hub, capsys, example, tmp_path):
    _cache_repo(hub, example, "org/name")
    out = tmp_path / "merged"
    rc, _, err = run_cli(capsys, "merge", "--base", "org/name", "--adapter", example["adapter"], "-o", out, "--quiet")
    assert rc == 0, err
    assert len(load_file(out / "model.safetensors")) == 483


def test_uncached_hub_id_fails_cleanly(hub, capsys, example, tmp_path):
    _cache_repo(hub, example, "org/name")
    for source in ["org/missing", f"org/name@{'f' * 40}", "org/name@no-such-branch"]:
        out = tmp_path / "out"
        rc, _, err = run_cli(capsys, "inspect", source)
        line = assert_one_line_error(rc, err, source)
        assert "HF_HUB_OFFLINE" in line and "cache" in line
        rc, _, err = run_cli(capsys, "merge", "--base", source, "--adapter", example["adapter"], "-o", out)
        assert_one_line_error(rc, err, source)
        assert_nothing_at(out)
