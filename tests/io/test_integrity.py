"""Integrity (issue 7, item 5): merge and extract record the sha256 of every input shard's header and of every
output file in loratv_manifest.json, and `loratv verify OUT` re-checks a folder: exit 0 when sound, 1 with every
problem listed (a flipped byte, a missing or extra file, a bad header, NaN), 2 when OUT is not a loratv output.
Hashes are recomputed here with hashlib, independently of loratv.
"""

import hashlib
import json
import struct

import pytest
from safetensors.torch import load_file, save_file

from helpers_io import assert_one_line_error, run_cli
from helpers_reliability import write_tiny

MANIFEST = "loratv_manifest.json"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header_sha256(path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[: 8 + n]).hexdigest()


@pytest.fixture
def outputs(capsys, tmp_path):
    """A merge of a sharded base (two shards and an index) and an extraction."""
    tiny = write_tiny(tmp_path / "tiny")
    merged, tv = tmp_path / "merged", tmp_path / "tv"
    rc, _, err = run_cli(capsys, "merge", "--base", tiny["sharded"], "--adapter", tiny["adapter"], "-o", merged,
                         "--quiet")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "extract", "--base", tiny["base"], "--finetuned", tiny["finetuned"], "-o", tv,
                         "--quiet")
    assert rc == 0, err
    return {"tiny": tiny, "merged": merged, "tv": tv}


def test_manifest_records_input_headers_and_output_files(outputs):
    tiny = outputs["tiny"]
    manifest = json.loads((outputs["merged"] / MANIFEST).read_text())
    assert manifest["schema"] == "loratv.manifest" and manifest["operation"] == "merge"
    base_files = manifest["inputs"]["base"]["files"]
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert base_files[shard]["header_sha256"] == header_sha256(tiny["sharded"] / shard)
    assert base_files["model.safetensors.index.json"]["sha256"] == sha256(tiny["sharded"] / "model.safetensors.index.json")
    adapter_files = manifest["inputs"]["adapter"]["files"]
    assert adapter_files["adapter_model.safetensors"]["header_sha256"] == header_sha256(
        tiny["adapter"] / "adapter_model.safetensors")
    assert adapter_files["adapter_config.json"]["sha256"] == sha256(tiny["adapter"] / "adapter_config.json")
    written = sorted(p.name for p in outputs["merged"].iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == written
    for name, record in manifest["files"].items():
        path = outputs["merged"] / name
        assert record == {"size": path.stat().st_size, "sha256": sha256(path)}, name

    manifest = json.loads((outputs["tv"] / MANIFEST).read_text())
    assert manifest["operation"] == "extract"
    assert manifest["inputs"]["finetuned"]["files"]["model.safetensors"]["header_sha256"] == header_sha256(
        tiny["finetuned"] / "model.safetensors")
    assert sorted(manifest["files"]) == ["task_vector.json", "task_vector.safetensors"]
    for name, record in manifest["files"].items():
        assert record["sha256"] == sha256(outputs["tv"] / name)


def test_verify_accepts_sound_outputs(capsys, outputs):
    for key, tensors in (("merged", 9), ("tv", 3)):
        rc, out, err = run_cli(capsys, "verify", outputs[key])
        assert rc == 0, out + err
        assert f"{tensors} tensors read" in out and "every tensor finite" in out
    rc, out, _ = run_cli(capsys, "verify", outputs["merged"], "--json")
    record = json.loads(out)
    assert rc == 0 and record["ok"] and record["problems"] == [] and record["files_checked"] == 3


def _verify_problems(capsys, folder):
    rc, out, err = run_cli(capsys, "verify", folder)
    assert rc == 1, out + err
    assert "Traceback" not in err
    return out


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_data_is_caught(capsys, outputs):
    shard = outputs["merged"] / "model-00002-of-00002.safetensors"
    _flip(shard, shard.stat().st_size - 3)  # inside the last tensor's data: a valid file, other values
    out = _verify_problems(capsys, outputs["merged"])
    assert "1 problem:" in out and f"{shard}: sha256 differs" in out


def test_a_flipped_byte_in_a_header_is_caught(capsys, outputs):
    shard = outputs["tv"] / "task_vector.safetensors"
    _flip(shard, 9)  # '{' of the JSON header
    out = _verify_problems(capsys, outputs["tv"])
    assert "sha256 differs" in out and "not valid UTF-8 JSON" in out


def test_missing_truncated_and_unrecorded_files(capsys, outputs):
    merged = outputs["merged"]
    (merged / "model-00001-of-00002.safetensors").unlink()
    data = (merged / "model-00002-of-00002.safetensors").read_bytes()
    (merged / "model-00002-of-00002.safetensors").write_bytes(data[:-100])
    (merged / "notes.txt").write_text("added later")
    out = _verify_problems(capsys, merged)
    assert "model-00001-of-00002.safetensors: missing" in out
    assert f"{len(data) - 100} bytes, but {len(data)} were written" in out
    assert "notes.txt: not recorded in the manifest" in out
    assert "truncated" in out


def test_nan_is_caught_even_with_a_matching_manifest(capsys, outputs):
    """A NaN written and then re-hashed (as a tool that rewrote the folder would): only the value check sees it."""
    file = outputs["tv"] / "task_vector.safetensors"
    tensors = load_file(file)
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, file)
    manifest_path = outputs["tv"] / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["task_vector.safetensors"] = {"size": file.stat().st_size, "sha256": sha256(file)}
    manifest_path.write_text(json.dumps(manifest))
    out = _verify_problems(capsys, outputs["tv"])
    assert "1 problem:" in out and f"tensor '{name}' contains NaN or Inf" in out


def test_a_corrupt_manifest_is_a_problem_not_a_crash(capsys, outputs):
    (outputs["merged"] / MANIFEST).write_text('{"schema": "loratv.manifest", "files": ')
    out = _verify_problems(capsys, outputs["merged"])
    assert "not valid JSON" in out


def test_verify_on_what_is_not_a_loratv_output(capsys, outputs, tmp_path):
    rc, _, err = run_cli(capsys, "verify", outputs["tiny"]["base"])
    line = assert_one_line_error(rc, err, outputs["tiny"]["base"])
    assert "has no loratv_manifest.json" in line
    rc, _, err = run_cli(capsys, "verify", tmp_path / "nowhere")
    assert_one_line_error(rc, err, tmp_path / "nowhere")


def test_merge_of_a_merge_does_not_copy_the_old_manifest(capsys, outputs, tmp_path):
    """A merged folder used as a base: its manifest describes it, not the new output, and is not carried over."""
    again = tmp_path / "again"
    rc, _, err = run_cli(capsys, "merge", "--base", outputs["merged"], "--adapter", outputs["tiny"]["adapter"], "-o",
                         again, "--quiet")
    assert rc == 0, err
    manifest = json.loads((again / MANIFEST).read_text())
    assert manifest["inputs"]["base"]["source"] == str(outputs["merged"])
    assert manifest["inputs"]["base"]["files"]["model.safetensors.index.json"]["sha256"] == sha256(
        outputs["merged"] / "model.safetensors.index.json")
    rc, out, err = run_cli(capsys, "verify", again)
    assert rc == 0, out + err
