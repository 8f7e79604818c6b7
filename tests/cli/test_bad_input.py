"""Bad input: exit code 2, one `loratv: error:` sentence naming the file or tensor, no traceback, nothing written."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_io import (  # noqa: F401 - fixtures are found by name
    assert_nothing_at,
    assert_one_line_error,
    edit_adapter_config,
    ex,
    example,
    loratv_cache,
    rewrite_adapter,
    run_cli,
    run_subprocess,
    shard_model,
    tree_digest,
    write_raw_safetensors,
)

pytestmark = pytest.mark.usefixtures("loratv_cache")

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def merge_fails(capsys, ex, out, *names, base=None, adapter=None, extra=()):
    rc, _, err = run_cli(capsys, "merge", "--base", base or ex["base"], "--adapter", adapter or ex["adapter"],
                         "-o", out, "--quiet", *extra)
    line = assert_one_line_error(rc, err, *names)
    assert_nothing_at(out)
    return line


# ---- the base model ----------------------------------------------------------------------------------------


def test_missing_base_path_in_a_fresh_interpreter(ex, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    proc = run_subprocess(["merge", "--base", missing, "--adapter", ex["adapter"], "-o", out], cwd=tmp_path)
    line = assert_one_line_error(proc.returncode, proc.stderr, missing)
    assert "no such file" in line
    assert_nothing_at(out)


def test_folder_without_weights(capsys, ex, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    shutil.copy(ex["base"] / "config.json", empty)
    line = merge_fails(capsys, ex, tmp_path / "out", empty, base=empty)
    assert "no model weights" in line


def test_truncated_safetensors_in_a_fresh_interpreter(ex, tmp_path):
    file = ex["base"] / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    proc = run_subprocess(["merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", out], cwd=tmp_path)
    line = assert_one_line_error(proc.returncode, proc.stderr, file)
    assert "truncated" in line
    assert_nothing_at(out)


def test_header_length_beyond_the_file(capsys, ex, tmp_path):
    file = ex["base"] / "model.safetensors"
    write_raw_safetensors(file, b"{}", header_len=10**12)
    line = merge_fails(capsys, ex, tmp_path / "out", file)
    assert "header length 1000000000000" in line


def test_header_that_is_not_json(capsys, ex, tmp_path):
    file = ex["base"] / "model.safetensors"
    write_raw_safetensors(file, b"not json!!")
    line = merge_fails(capsys, ex, tmp_path / "out", file)
    assert "JSON" in line


def test_offsets_beyond_the_file(capsys, ex, tmp_path):
    file = ex["base"] / "model.safetensors"
    header = {"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}
    write_raw_safetensors(file, header, b"\0" * 16)
    line = merge_fails(capsys, ex, tmp_path / "out", file)
    assert "truncated" in line


def test_offsets_that_disagree_with_the_shape(capsys, ex, tmp_path):
    file = ex["base"] / "model.safetensors"
    header = {"model.norm.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    write_raw_safetensors(file, header, b"\0" * 8)
    line = merge_fails(capsys, ex, tmp_path / "out", file, "model.norm.weight")
    assert "needs 16 bytes" in line


def test_overlapping_offsets(capsys, ex, tmp_path):
    file = ex["base"] / "model.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    write_raw_safetensors(file, header, b"\0" * 12)
    line = merge_fails(capsys, ex, tmp_path / "out", file, "'b'")
    assert "overlap" in line


def _sharded_base(ex, tmp_path):
    folder = tmp_path / "sharded"
    weight_map = shard_model(ex["base"] / "model.safetensors", folder,
                             ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    shutil.copy(ex["base"] / "config.json", folder)
    return folder, weight_map


def _rewrite_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_index_naming_a_shard_outside_the_folder(capsys, ex, tmp_path, how):
    folder, weight_map = _sharded_base(ex, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / "model-00002-of-00002.safetensors", outside)
    shard = "../outside.safetensors" if how == "dotdot" else str(outside)
    _rewrite_index(folder, {k: (shard if v.startswith("model-00002") else v) for k, v in weight_map.items()})
    line = merge_fails(capsys, ex, tmp_path / "out", folder / "model.safetensors.index.json", shard, base=folder)
    assert "outside the model folder" in line


def test_symlinked_shard_pointing_outside_the_folder(capsys, ex, tmp_path):
    folder, _ = _sharded_base(ex, tmp_path)
    outside = tmp_path / "elsewhere" / "model-00002-of-00002.safetensors"
    outside.parent.mkdir()
    shutil.move(folder / "model-00002-of-00002.safetensors", outside)
    os.symlink(outside, folder / "model-00002-of-00002.safetensors")
    line = merge_fails(capsys, ex, tmp_path / "out", "model-00002-of-00002.safetensors", base=folder)
    assert "outside the model folder" in line


# ---- the adapter -------------------------------------------------------------------------------------------


def test_lora_b_that_does_not_fit_the_base(capsys, ex, tmp_path):
    rewrite_adapter(ex["adapter"], lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(65, 8)}))
    line = merge_fails(capsys, ex, tmp_path / "out", "adapter_model.safetensors", "model.layers.0.self_attn.q_proj")
    assert "does not fit" in line


def test_adapter_targeting_a_module_the_base_lacks(capsys, ex, tmp_path):
    def rename(t):
        for part in ("lora_A", "lora_B"):
            t[f"base_model.model.model.layers.0.self_attn.z_proj.{part}.weight"] = t.pop(f"{Q0}.{part}.weight")

    rewrite_adapter(ex["adapter"], rename)
    line = merge_fails(capsys, ex, tmp_path / "out", "adapter_model.safetensors", "model.layers.0.self_attn.z_proj.weight")
    assert f"the base model {ex['base']} lacks" in line


def test_nan_in_an_adapter_tensor(capsys, ex, tmp_path):
    key = "base_model.model.model.layers.7.self_attn.v_proj.lora_A.weight"

    def poison(t):
        t[key] = t[key].clone()
        t[key][3, 5] = float("nan")

    rewrite_adapter(ex["adapter"], poison)
    line = merge_fails(capsys, ex, tmp_path / "out", "adapter_model.safetensors", key)
    assert "NaN" in line


def test_inf_produced_by_the_merge_in_a_fresh_interpreter(ex, tmp_path):
    key = f"{Q0}.lora_B.weight"
    rewrite_adapter(ex["adapter"], lambda t: t.update({key: t[key] * 1e8}))  # |ΔW| ~ 1e7 > fp16's 65504
    out = tmp_path / "out"
    proc = run_subprocess(["merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", out, "--precision", "fp16"],
                          cwd=tmp_path)
    line = assert_one_line_error(proc.returncode, proc.stderr, "model.layers.0.self_attn.q_proj.weight")
    assert "Inf" in line
    assert_nothing_at(out)


def test_inf_in_the_base_names_the_base_shard(capsys, ex, tmp_path):
    """A non-finite base value in a targeted tensor is blamed on the base file that holds it, not on an overflow."""
    name = "model.layers.3.self_attn.k_proj.weight"
    file = ex["base"] / "model.safetensors"
    tensors = load_file(file)
    tensors[name] = tensors[name].clone()
    tensors[name][2, 1] = float("inf")
    save_file(tensors, file, metadata={"format": "pt"})
    for precision in ("auto", "fp16"):
        out = tmp_path / f"out-{precision}"
        line = merge_fails(capsys, ex, out, f"{file}: base tensor '{name}' contains NaN or Inf",
                           extra=("--precision", precision))
        assert "overflow" not in line, line
        assert "adapter" not in line, line


def test_overflow_of_finite_inputs_names_the_inputs_and_the_dtype(capsys, ex, tmp_path):
    """Finite base and adapter whose product exceeds fp16's 65504: the inputs are cleared and the dtype named."""
    key = f"{Q0}.lora_B.weight"
    rewrite_adapter(ex["adapter"], lambda t: t.update({key: t[key] * 1e8}))
    line = merge_fails(capsys, ex, tmp_path / "out", "model.layers.0.self_attn.q_proj.weight",
                       "overflows float16", str(ex["base"] / "model.safetensors"),
                       str(ex["adapter"] / "adapter_model.safetensors"), "are finite", "--precision fp32",
                       extra=("--precision", "fp16"))
    assert "contains NaN" not in line, line


def test_the_same_adapter_merges_in_fp32(capsys, ex, tmp_path):
    """Control for the Inf case: the huge lora_B is finite in fp32, so only the fp16 cast overflows."""
    key = f"{Q0}.lora_B.weight"
    rewrite_adapter(ex["adapter"], lambda t: t.update({key: t[key] * 1e8}))
    rc, _, err = run_cli(capsys, "merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", tmp_path / "out",
                         "--precision", "fp32", "--quiet")
    assert rc == 0, err


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"use_dora": True}, ["DoRA", "use_dora"]),
        ({"peft_type": "LOHA"}, ["LoHa"]),
        ({"init_lora_weights": "pissa"}, ["pissa"]),
        ({"frobnicate_level": 3}, ["frobnicate_level"]),
    ],
    ids=["dora", "loha", "pissa", "unknown-key"],
)
def test_adapter_kinds_refused_by_name(capsys, ex, tmp_path, changes, words):
    edit_adapter_config(ex["adapter"], **changes)
    merge_fails(capsys, ex, tmp_path / "out", "adapter_config.json", *words)


def test_dora_tensor_refused_by_name(capsys, ex, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    rewrite_adapter(ex["adapter"], lambda t: t.update({key: torch.ones(64)}))
    merge_fails(capsys, ex, tmp_path / "out", "adapter_model.safetensors", key, "DoRA")


def test_unknown_config_key_with_a_default_value_is_accepted(capsys, ex, tmp_path):
    edit_adapter_config(ex["adapter"], frobnicate_level=None)
    rc, _, err = run_cli(capsys, "merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", tmp_path / "out", "--quiet")
    assert rc == 0, err


# ---- the output --------------------------------------------------------------------------------------------


def test_output_equal_to_an_input(capsys, ex, tmp_path):
    before = tree_digest(ex["base"])
    rc, _, err = run_cli(capsys, "merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", ex["base"], "--force")
    assert_one_line_error(rc, err, ex["base"])
    assert tree_digest(ex["base"]) == before
    assert not [p for p in ex["base"].parent.iterdir() if ".loratv-" in p.name]


def test_output_inside_an_input(capsys, ex, tmp_path):
    before = tree_digest(ex["adapter"])
    out = ex["adapter"] / "merged"
    merge_fails(capsys, ex, out, out)
    assert tree_digest(ex["adapter"]) == before


def test_output_that_contains_an_input(capsys, ex, tmp_path):
    before = tree_digest(ex["base"])
    rc, _, err = run_cli(capsys, "merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", tmp_path, "--force")
    assert_one_line_error(rc, err, tmp_path)
    assert tree_digest(ex["base"]) == before


def test_existing_output_without_and_with_force(capsys, ex, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, _, err = run_cli(capsys, "merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", out, "--quiet")
    line = assert_one_line_error(rc, err, out)
    assert "--force" in line
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"

    rc, _, err = run_cli(capsys, "merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", out, "--quiet", "--force")
    assert rc == 0, err
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if ".loratv-" in p.name]


def test_failed_merge_with_force_keeps_the_existing_output(capsys, ex, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    key = f"{Q0}.lora_A.weight"
    rewrite_adapter(ex["adapter"], lambda t: t.update({key: torch.full_like(t[key], float("inf"))}))
    rc, _, err = run_cli(capsys, "merge", "--base", ex["base"], "--adapter", ex["adapter"], "-o", out, "--force")
    assert_one_line_error(rc, err, key)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".loratv-" in p.name]


# ---- extract -----------------------------------------------------------------------------------------------


def _finetuned_copy(ex, tmp_path, edit):
    ft = tmp_path / "ft"
    ft.mkdir()
    shutil.copy(ex["base"] / "config.json", ft)
    tensors = dict(load_file(ex["base"] / "model.safetensors"))
    edit(tensors)
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    return ft


def test_extract_with_a_missing_tensor(capsys, ex, tmp_path):
    name = "model.layers.12.mlp.c_fc.bias"
    ft = _finetuned_copy(ex, tmp_path, lambda t: t.pop(name))
    out = tmp_path / "tv"
    rc, _, err = run_cli(capsys, "extract", "--base", ex["base"], "--finetuned", ft, "-o", out, "--quiet")
    assert_one_line_error(rc, err, name, ft)
    assert_nothing_at(out)


def test_extract_with_an_extra_tensor(capsys, ex, tmp_path):
    ft = _finetuned_copy(ex, tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    out = tmp_path / "tv"
    rc, _, err = run_cli(capsys, "extract", "--base", ex["base"], "--finetuned", ft, "-o", out, "--quiet")
    assert_one_line_error(rc, err, "lm_head.weight", ex["base"])
    assert_nothing_at(out)


def test_extract_with_a_shape_mismatch(capsys, ex, tmp_path):
    name = "model.layers.3.self_attn.k_proj.weight"
    ft = _finetuned_copy(ex, tmp_path, lambda t: t.update({name: t[name].reshape(64, 32).contiguous()}))
    out = tmp_path / "tv"
    rc, _, err = run_cli(capsys, "extract", "--base", ex["base"], "--finetuned", ft, "-o", out, "--quiet")
    line = assert_one_line_error(rc, err, name, ft)
    assert "[64, 32]" in line and "[32, 64]" in line
    assert_nothing_at(out)


def test_extract_with_nan_in_the_finetuned_model(capsys, ex, tmp_path):
    name = "model.layers.5.mlp.c_proj.weight"

    def poison(t):
        t[name] = t[name].clone()
        t[name][0, 0] = float("nan")

    ft = _finetuned_copy(ex, tmp_path, poison)
    out = tmp_path / "tv"
    rc, _, err = run_cli(capsys, "extract", "--base", ex["base"], "--finetuned", ft, "-o", out, "--quiet")
    assert_one_line_error(rc, err, name, ft, "NaN")
    assert_nothing_at(out)


def test_extract_needs_both_models(capsys, ex, tmp_path):
    rc, _, err = run_cli(capsys, "extract", "--base", ex["base"], "-o", tmp_path / "tv")
    assert_one_line_error(rc, err, "--finetuned")
    assert_nothing_at(tmp_path / "tv")
