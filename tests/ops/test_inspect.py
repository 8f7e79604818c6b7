"""`loratv inspect`: counts from headers alone, checked against independently parsed headers."""

import json
import shutil

import pytest

from helpers_io import (  # noqa: F401 - fixtures are found by name
    example,
    loratv_cache,
    read_header_json,
    run_cli,
    write_raw_safetensors,
)

pytestmark = pytest.mark.usefixtures("loratv_cache")


def inspect_json(capsys, *argv):
    rc, out, err = run_cli(capsys, "inspect", *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


def test_base_model(capsys, example):
    r = inspect_json(capsys, example["base"])
    assert r["kind"] == "model"
    assert r["model_type"] == "starcoder2"
    assert r["total_tensors"] == 483
    assert r["layers"] == 30
    assert r["tensors_per_layer"] == 16
    assert r["global_tensors"] == ["model.embed_tokens.weight", "model.norm.weight", "model.norm.bias"]
    assert r["tied_embeddings"] is True
    assert r["dtypes"] == {"F32": 483}

    header = read_header_json(example["base"] / "model.safetensors")
    header.pop("__metadata__", None)
    numel = {k: _prod(v["shape"]) for k, v in header.items()}
    assert r["total_parameters"] == sum(numel.values())
    assert sum(v["parameters"] for v in r["per_kind"].values()) == r["total_parameters"]
    assert sum(v["tensors"] for v in r["per_kind"].values()) == 483
    per_layer = sum(v["parameters"] for v in r["per_layer"].values())
    assert per_layer + sum(numel[n] for n in r["global_tensors"]) == r["total_parameters"]
    assert all(v["tensors"] == 16 for v in r["per_layer"].values())
    assert r["shards"] == {"model.safetensors": {"tensors": 483, "bytes": 4 * r["total_parameters"]}}


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_adapter_against_its_base(capsys, example):
    r = inspect_json(capsys, example["adapter"], "--base", example["base"])
    assert r["kind"] == "adapter"
    assert r["lora_modules"] == 120
    assert r["base_tensors"] == 483
    assert r["touched_tensors"] == 120
    assert r["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert r["ranks"] == {"8": 120}

    # independently: r*(m+n) per module, from the adapter's own header
    header = read_header_json(example["adapter"] / "adapter_model.safetensors")
    header.pop("__metadata__", None)
    modules = {}
    for key, spec in header.items():
        module, _, part = key.rpartition(".lora_")
        modules.setdefault(module, {})[part] = spec["shape"]
    expected = 0
    for parts in modules.values():
        (r_a, n), (m, r_b) = parts["A.weight"], parts["B.weight"]
        assert r_a == r_b == 8
        expected += r_a * (m + n)
    assert r["stored_parameters"] == expected
    assert sum(m["stored_parameters"] for m in r["modules"]) == expected

    base_header = read_header_json(example["base"] / "model.safetensors")
    touched = [k.removeprefix("base_model.model.") + ".weight" for k in modules]
    assert sorted(r["touched"]) == sorted(touched)
    assert r["touched_parameters"] == sum(_prod(base_header[t]["shape"]) for t in touched)


def test_default_inspects_the_example(capsys):
    reports = inspect_json(capsys)
    assert [r["kind"] for r in reports] == ["model", "adapter"]
    assert reports[0]["total_tensors"] == 483
    assert reports[1]["touched_tensors"] == 120


def test_text_report(capsys, example):
    rc, out, err = run_cli(capsys, "inspect", example["base"])
    assert rc == 0, err
    assert "483 tensors = 30 layers x 16 + 3 global" in out
    assert "tied embeddings: yes" in out
    rc, out, err = run_cli(capsys, "inspect", example["adapter"], "--base", example["base"])
    assert rc == 0, err
    assert "touches 120 of 483 base tensors" in out


def test_inspect_reads_headers_only(capsys, example, tmp_path, monkeypatch):
    """A model whose data section is garbage (of the right length) inspects exactly like the real one."""
    folder = tmp_path / "garbage"
    folder.mkdir()
    shutil.copy(example["base"] / "config.json", folder)
    src = example["base"] / "model.safetensors"
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    write_raw_safetensors(folder / "model.safetensors", header, b"\xff" * (len(raw) - 8 - n))  # every float a NaN

    import loratv.io.checkpoint
    import loratv.io.safetensors_format

    def no_data(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(loratv.io.safetensors_format, "read_bytes", no_data)
    monkeypatch.setattr(loratv.io.checkpoint.Checkpoint, "read", no_data)
    monkeypatch.setattr(loratv.io.checkpoint.Checkpoint, "read_rows", no_data)
    garbage = inspect_json(capsys, folder)
    real = inspect_json(capsys, example["base"])
    for key in ("total_tensors", "total_parameters", "layers", "tensors_per_layer", "global_tensors",
                "tied_embeddings", "dtypes", "per_layer", "per_kind", "shards"):
        assert garbage[key] == real[key], key
    adapter = inspect_json(capsys, example["adapter"], "--base", folder)
    assert adapter["touched_tensors"] == 120


def test_inspect_of_a_corrupt_file_fails_cleanly(capsys, tmp_path):
    bad = write_raw_safetensors(tmp_path / "bad.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})
    rc, out, err = run_cli(capsys, "inspect", bad)
    assert rc == 2 and err.startswith("loratv: error:") and str(bad) in err and len(err.splitlines()) == 1


def test_adapter_finds_its_recorded_local_base(capsys, example, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(example["adapter"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(example["base"])
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    r = inspect_json(capsys, adapter)
    assert (r["touched_tensors"], r["base_tensors"]) == (120, 483)

    config["base_model_name_or_path"] = "bigcode/starcoder2-3b"  # a hub id is never downloaded by inspect
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "touched_tensors" not in inspect_json(capsys, adapter)
