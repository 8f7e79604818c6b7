"""`--executor ray` against the local executor: a real local Ray cluster (started once for this module with
`ray.init(num_cpus=2)`) runs merge, extract, merge-models and similarity on the embedded StarCoder2 miniature, and
every output file must equal the local run's byte for byte (shards, index, manifest, JSON records). A worker killed
in the middle of its task is rerun by Ray and the output is still the local one; a task's refusal reaches the
command line as the local one does (one sentence, exit 2, nothing written)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_io import assert_nothing_at, assert_one_line_error, run_cli, tree_digest

ray = pytest.importorskip("ray", reason="the Ray executor tests need Ray: pip install 'loratv[ray]'")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local Ray instance for the module (loratv's RayExecutor uses a session this process holds)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 object_store_memory=100 * 2**20)
    yield
    if started:
        ray.shutdown()


def _same_tree(local: Path, distributed: Path) -> None:
    a, b = tree_digest(local), tree_digest(distributed)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"files that differ from the local run's: {different}"


def _merged(example_dir, tmp_path, capsys, *flags) -> tuple[Path, Path]:
    local, distributed = tmp_path / "local", tmp_path / "ray"
    common = ["merge", "--base", example_dir / "base", "--adapter", example_dir / "adapter", *flags, "--quiet"]
    assert run_cli(capsys, *common, "-o", local)[0] == 0
    rc, out, err = run_cli(capsys, *common, "-o", distributed, "--executor", "ray")
    assert rc == 0, err
    return local, distributed


@pytest.mark.parametrize("flags", [("--precision", "bf16", "--max-shard-size", "300KB"),
                                   ("--precision", "fp32", "--max-shard-size", "1MB", "--compute-dtype", "fp64")])
def test_merge_on_ray_writes_the_local_files(flags, example_dir, tmp_path, capsys):
    local, distributed = _merged(example_dir, tmp_path, capsys, *flags)
    assert len(list(local.glob("*.safetensors"))) > 3  # several shards, so several tasks
    _same_tree(local, distributed)


@pytest.mark.parametrize("dense", [False, True])
def test_extract_on_ray_writes_the_local_files(dense, example_dir, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", "--base", example_dir / "base", "--adapter", example_dir / "adapter",
                   "--precision", "fp16", "-o", merged, "--quiet")[0] == 0
    common = ["extract", "--base", example_dir / "base", "--finetuned", merged, "--quiet",
              *(["--dense"] if dense else [])]
    assert run_cli(capsys, *common, "-o", tmp_path / "local")[0] == 0
    rc, _, err = run_cli(capsys, *common, "-o", tmp_path / "ray", "--executor", "ray", "--task-bytes", "500KB")
    assert rc == 0, err
    _same_tree(tmp_path / "local", tmp_path / "ray")
    assert not (tmp_path / "ray" / ".parts").exists()


def _finetunes(example_dir, root: Path) -> list[Path]:
    """Two fine-tunes of the example base: the base plus seeded noise."""
    state = load_file(str(example_dir / "base" / "model.safetensors"))
    folders = []
    for i in (1, 2):
        gen = torch.Generator().manual_seed(i)
        folder = root / f"ft{i}"
        shutil.copytree(example_dir / "base", folder)
        save_file({k: (v + 0.01 * i * torch.randn(v.shape, generator=gen)).to(v.dtype) for k, v in state.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders


@pytest.mark.parametrize("method,parameters", [
    ("ties", {"density": 0.5, "weight": 0.7}),
    ("dare_ties", {"density": 0.6, "weight": 0.5}),  # random masks: keyed by the seed, not by the task
    ("slerp", None),
])
def test_merge_models_on_ray_writes_the_local_files(method, parameters, example_dir, tmp_path, capsys):
    ft1, ft2 = _finetunes(example_dir, tmp_path)
    if method == "slerp":
        recipe = {"merge_method": "slerp", "base_model": str(ft1), "parameters": {"t": 0.3},
                  "models": [{"model": str(ft1)}, {"model": str(ft2)}], "dtype": "float32"}
    else:
        recipe = {"merge_method": method, "base_model": str(example_dir / "base"), "dtype": "float32",
                  "models": [{"model": str(ft), "parameters": parameters} for ft in (ft1, ft2)]}
    config = tmp_path / "recipe.yaml"
    config.write_text(json.dumps(recipe))  # JSON is YAML
    common = ["merge-models", config, "--max-shard-size", "400KB", "--quiet"]
    assert run_cli(capsys, *common, "-o", tmp_path / "local")[0] == 0
    rc, _, err = run_cli(capsys, *common, "-o", tmp_path / "ray", "--executor", "ray")
    assert rc == 0, err
    _same_tree(tmp_path / "local", tmp_path / "ray")


def test_similarity_on_ray_records_the_local_numbers(example_dir, tmp_path, capsys):
    import loratv

    adapters = []
    for i, weight in enumerate((0.5, -1.0, 2.0)):
        loratv.combine([example_dir / "adapter"], tmp_path / f"a{i}", weights=[weight])
        adapters.append(tmp_path / f"a{i}")
    merged = tmp_path / "merged"
    loratv.merge(example_dir / "base", example_dir / "adapter", merged, precision="fp32")
    loratv.extract(example_dir / "base", merged, tmp_path / "tv")
    common = ["similarity", example_dir / "adapter", *adapters, "--base", example_dir / "base", "--task-vectors",
              tmp_path / "tv", "--sign-conflicts", "--no-plots", "--quiet"]
    assert run_cli(capsys, *common, "-o", tmp_path / "local")[0] == 0
    rc, _, err = run_cli(capsys, *common, "-o", tmp_path / "ray", "--executor", "ray", "--task-bytes", "2MB")
    assert rc == 0, err
    # every number, including float64 sums over tensors, is the local run's: the file is the same bytes
    _same_tree(tmp_path / "local", tmp_path / "ray")


def test_a_worker_killed_midway_is_rerun_and_the_output_is_unchanged(example_dir, tmp_path, monkeypatch):
    import loratv
    from loratv.exec import executor

    marker = tmp_path / "killed"

    def die_once(task):
        def run(*job):
            options, max_shard_size, file, folder, metadata = job
            if file.startswith("model-00003-of-") and not os.path.exists(marker):
                # what a worker killed halfway through its shard leaves behind: the file, cut short
                with open(os.path.join(folder, file), "wb") as half:
                    half.write(b"\0" * 100_000)
                open(marker, "w").close()
                os._exit(1)
            return task(*job)
        return run

    monkeypatch.setattr(executor, "task_wrapper", die_once)
    options = {"precision": "bf16", "max_shard_size": 300_000}
    loratv.merge(example_dir / "base", example_dir / "adapter", tmp_path / "local", **options)
    assert len(list((tmp_path / "local").glob("*.safetensors"))) > 3
    loratv.merge(example_dir / "base", example_dir / "adapter", tmp_path / "ray", executor="ray", **options)
    assert marker.exists(), "no worker was killed"
    _same_tree(tmp_path / "local", tmp_path / "ray")


def test_a_refusal_inside_a_task_is_one_sentence_and_nothing_is_written(example_dir, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(example_dir / "base", base)
    state = load_file(str(base / "model.safetensors"))
    name = "model.layers.17.self_attn.q_proj.weight"
    state[name][3, 5] = float("nan")
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "merged"
    rc, _, err = run_cli(capsys, "merge", "--base", base, "--adapter", example_dir / "adapter", "--max-shard-size",
                         "300KB", "-o", out, "--executor", "ray", "--quiet")
    assert_one_line_error(rc, err, "model.safetensors", name, "NaN")
    assert_nothing_at(out)


def test_bad_executors_are_refused(example_dir, tmp_path, capsys, monkeypatch):
    import loratv

    out = tmp_path / "merged"
    rc, _, err = run_cli(capsys, "merge", "--base", example_dir / "base", "--adapter", example_dir / "adapter",
                         "-o", out, "--executor", "spark")
    assert_one_line_error(rc, err, "--executor spark", "ray=ADDRESS")
    assert_nothing_at(out)
    with pytest.raises(loratv.BadInputError, match="state dict"):
        loratv.merge(load_file(str(example_dir / "base" / "model.safetensors")), example_dir / "adapter", out,
                     executor="ray")
    assert_nothing_at(out)
    with pytest.raises(loratv.BadInputError, match="CPUs"):
        loratv.merge(example_dir / "base", example_dir / "adapter", out, executor="ray", device="cuda")
    assert_nothing_at(out)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    rc, _, err = run_cli(capsys, "extract", "--base", example_dir / "base", "--finetuned", example_dir / "base",
                         "-o", out, "--executor", "ray")
    assert_one_line_error(rc, err, "pip install 'loratv[ray]'")
    assert_nothing_at(out)


@pytest.mark.parametrize("source", ["finetuned", "task_vector"])
def test_compare_on_ray_writes_the_local_record_and_deltas(source, example_dir, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", "--base", example_dir / "base", "--adapter", example_dir / "adapter",
                   "--precision", "bf16", "-o", merged, "--quiet")[0] == 0
    given = merged
    if source == "task_vector":
        assert run_cli(capsys, "extract", "--base", example_dir / "base", "--finetuned", merged, "-o",
                       tmp_path / "tv", "--quiet")[0] == 0
        given = tmp_path / "tv"
    common = ["compare", "--base", example_dir / "base", "--adapter", example_dir / "adapter",
              f"--{source.replace('_', '-')}", given, "--no-plots", "--quiet"]
    assert run_cli(capsys, *common, "-o", tmp_path / "local")[0] == 0
    rc, _, err = run_cli(capsys, *common, "-o", tmp_path / "ray", "--executor", "ray", "--task-bytes", "1MB")
    assert rc == 0, err
    record = json.loads((tmp_path / "ray" / "comparison_results.json").read_text())
    assert record["summary"]["verdict"] == "EQUIVALENT (certified)"
    _same_tree(tmp_path / "local", tmp_path / "ray")


def test_to_lora_on_ray_writes_the_local_adapter(example_dir, tmp_path, capsys):
    merged = tmp_path / "merged"
    assert run_cli(capsys, "merge", "--base", example_dir / "base", "--adapter", example_dir / "adapter",
                   "--precision", "fp32", "-o", merged, "--quiet")[0] == 0
    common = ["to-lora", "--base", example_dir / "base", "--finetuned", merged, "--rank", "4", "--quiet"]
    assert run_cli(capsys, *common, "-o", tmp_path / "local")[0] == 0
    rc, _, err = run_cli(capsys, *common, "-o", tmp_path / "ray", "--executor", "ray", "--task-bytes", "1MB")
    assert rc == 0, err
    _same_tree(tmp_path / "local", tmp_path / "ray")
