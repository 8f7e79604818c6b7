"""Several adapters in one folder (PEFT saves 'default' at the top, the others in subfolders): --adapter-name picks
one, and each merges to what PEFT's merge_and_unload gives for that adapter."""

import json
import warnings

import torch
from safetensors.torch import load_file

from tiny_models import build_base, load_model, peft_merged_state, randomise_adapter


def run_cli(*argv) -> int:
    from loratv.cli.app import main

    return main([str(a) for a in argv])


def two_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = build_base("llama", tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_model(base, torch.float32), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
        model.add_adapter("other", LoraConfig(r=4, lora_alpha=4, target_modules=["v_proj"]))
        randomise_adapter(model, seed=5)
        model.save_pretrained(tmp_path / "adapters")
    return base, tmp_path / "adapters"


def test_each_named_adapter_merges_like_peft(tmp_path, capsys):
    base, folder = two_adapters(tmp_path)
    assert (folder / "other" / "adapter_config.json").is_file()
    for name, peft_folder, target in (("default", folder, "q_proj"), ("other", folder / "other", "v_proj")):
        out = tmp_path / f"m_{name}"
        assert run_cli("merge", "--base", base, "--adapter", folder, "--adapter-name", name, "-o", out, "--quiet") == 0
        ours = load_file(str(out / "model.safetensors"))
        want = peft_merged_state(base, peft_folder)
        w = load_file(str(base / "model.safetensors"))
        changed = {n for n in ours if not torch.equal(ours[n], w[n])}
        assert changed and all(target in n for n in changed), name
        for n in ours:
            assert torch.equal(ours[n], want[n]), (name, n)
    capsys.readouterr()
    assert run_cli("inspect", folder, "--adapter-name", "other", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ranks"] == {"4": 2}  # rank 4 on v_proj in both layers


def test_unknown_name_is_refused_with_the_names_found(tmp_path, capsys):
    base, folder = two_adapters(tmp_path)
    out = tmp_path / "m"
    assert run_cli("merge", "--base", base, "--adapter", folder, "--adapter-name", "missing", "-o", out) == 2
    err = capsys.readouterr().err
    assert "no adapter named 'missing'" in err and "default, other" in err and not out.exists()
    assert run_cli("merge", "--base", base, "--adapter", folder, "--adapter-name", "../base", "-o", out) == 2
    assert "not a path" in capsys.readouterr().err and not out.exists()
