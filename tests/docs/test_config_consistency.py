"""layers_to_transform / layers_pattern and exclude_modules are checked against the file: an adapter PEFT made with
them merges exactly as PEFT merges it; a file whose modules break them is refused by name."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tiny_models import build_adapter, build_base, peft_merged_state


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv] + ["--quiet"])


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    dict(target_modules=["q_proj", "v_proj"], layers_to_transform=1),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
    dict(target_modules=r".*\.(q|v)_proj", exclude_modules=r".*layers\.1\.self_attn\.q_proj"),
], ids=["layers-list-pattern", "layers-int", "exclude-list", "exclude-regex"])
def test_peft_adapters_with_these_options_merge_like_peft(tmp_path, kwargs):
    base = build_base("llama", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, **kwargs)
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 0
    ours = load_file(str(tmp_path / "m" / "model.safetensors"))
    want = peft_merged_state(base, adapter)
    w = load_file(str(base / "model.safetensors"))
    assert any(not torch.equal(ours[n], w[n]) for n in ours)
    for n in ours:
        assert torch.equal(ours[n], want[n]), n


@pytest.mark.parametrize("edit, words", [
    ({"layers_to_transform": [0]}, ["layer 1", "layers_to_transform"]),
    ({"exclude_modules": ["model.layers.1.self_attn.q_proj"]}, ["model.layers.1.self_attn.q_proj", "exclude_modules"]),
    ({"exclude_modules": r".*\.v_proj"}, ["v_proj", "exclude_modules"]),
    ({"layers_to_transform": ["one"]}, ["adapter_config.json", "layers_to_transform"]),
])
def test_a_file_that_breaks_its_config_is_refused(tmp_path, capsys, edit, words):
    base = build_base("llama", tmp_path / "base")
    adapter = build_adapter(base, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                            layers_to_transform=[1])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(edit)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli("merge", "--base", base, "--adapter", adapter, "-o", tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "m").exists()
