"""Object-store paths (s3:// through fsspec): an S3 server on the loopback address (moto's, started once per session)
holds inputs and outputs, and merge, extract and compare run against s3:// URLs.

Every remote result is checked against the same command run on local folders: downloaded and compared file by file.
The only differences allowed are the input paths a file records (safetensors `__metadata__`, the manifest's sources,
the comparison's `inputs` and command line): those strings are mapped back to the local paths, and tensors are
compared bit for bit. Bytes fetched are counted by wrapping io.storage.read_range, the one function that fetches.
"""

import hashlib
import json
import logging
import socket
import struct
import uuid
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers_io import assert_one_line_error, run_cli, shard_model

pytest.importorskip("s3fs", reason="the object-store tests need s3fs (pip install 'loratv[s3]')")
moto_server = pytest.importorskip("moto.server", reason="the object-store tests need moto's server (pip install "
                                  "'moto[server]')")

from loratv.errors import ObjectStoreError  # noqa: E402 - after the skips
from loratv.io import remote_output, storage  # noqa: E402
from loratv.io.checkpoint import Checkpoint  # noqa: E402

MARKER = ".loratv-complete"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, a free port, for the whole session."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _s3_env(endpoint: str) -> dict:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def _fresh_s3fs():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance keeps the endpoint and credentials it was made with
    return s3fs.S3FileSystem()


@pytest.fixture(scope="module")
def seeded(s3_endpoint, example_dir, tmp_path_factory):
    """A bucket holding the example base and adapter and the local merge of them (the fine-tuned model), with the
    local merge and extraction beside them as references."""
    local = tmp_path_factory.mktemp("object-store-local")
    base, adapter = example_dir / "base", example_dir / "adapter"
    from loratv.cli.app import main

    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "-o", str(local / "merged"), "--quiet"]) == 0
    assert main(["extract", "--base", str(base), "--finetuned", str(local / "merged"), "-o", str(local / "tv"),
                 "--quiet"]) == 0
    bucket = f"inputs-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as mp:
        for key, value in _s3_env(s3_endpoint).items():
            mp.setenv(key, value)
        fs = _fresh_s3fs()
        fs.mkdir(bucket)
        fs.put(str(base), f"{bucket}/base", recursive=True)
        fs.put(str(adapter), f"{bucket}/adapter", recursive=True)
        fs.put(str(local / "merged"), f"{bucket}/finetuned", recursive=True)
        _fresh_s3fs()
    urls = {"base": f"s3://{bucket}/base", "adapter": f"s3://{bucket}/adapter", "finetuned": f"s3://{bucket}/finetuned"}
    paths = {"base": str(base), "adapter": str(adapter), "finetuned": str(local / "merged")}
    return {"bucket": bucket, "urls": urls, "paths": paths, "local": local}


@pytest.fixture
def s3(s3_endpoint, monkeypatch, seeded):
    """The endpoint and test credentials in the environment, a fresh s3fs, and an empty bucket for this test."""
    for key, value in _s3_env(s3_endpoint).items():
        monkeypatch.setenv(key, value)
    fs = _fresh_s3fs()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket
    _fresh_s3fs()


def _download(fs, prefix: str, to: Path) -> dict:
    """Every object under prefix, written under `to`; returns {relative name: bytes}."""
    fs.invalidate_cache()
    out = {}
    for key in fs.find(prefix):
        rel = key[len(prefix):].lstrip("/")
        out[rel] = fs.cat_file(key)
        (to / rel).parent.mkdir(parents=True, exist_ok=True)
        (to / rel).write_bytes(out[rel])
    return out


def _local_tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _unmap(value, mapping: dict):
    """Strings recorded by the remote run, with each URL (and output URL) replaced by the local run's path."""
    if isinstance(value, str):
        for url, path in sorted(mapping.items(), key=lambda kv: -len(kv[0])):
            value = value.replace(url, path)
        return value
    if isinstance(value, dict):
        return {_unmap(k, mapping): _unmap(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_unmap(v, mapping) for v in value]
    return value


def _split_safetensors(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    return header.pop("__metadata__", {}), header, raw[8 + n:]


def _assert_same_output(remote: dict, local: dict, mapping: dict):
    """remote (downloaded, marker included) against local, file by file, as the module docstring says."""
    marker = json.loads(remote.pop(MARKER))
    assert marker["files"] == {name: len(data) for name, data in remote.items()}, "the marker lists every file"
    assert sorted(remote) == sorted(local)
    for name, data in remote.items():
        if name.endswith(".safetensors"):
            meta, header, tensors = _split_safetensors(data)
            local_meta, local_header, local_tensors = _split_safetensors(local[name])
            assert header == local_header and tensors == local_tensors, f"{name}: tensors differ"
            assert _unmap(meta, mapping) == local_meta, f"{name}: metadata differs beyond the recorded inputs"
        elif name == "loratv_manifest.json":
            manifest, local_manifest = json.loads(data), json.loads(local[name])
            for files, tree in ((manifest["files"], remote), (local_manifest["files"], local)):
                for file, record in files.items():  # each file's record is true of its own folder
                    assert record == {"size": len(tree[file]), "sha256": hashlib.sha256(tree[file]).hexdigest()}
                    if remote[file] != local[file]:  # a file that records input paths: compared on its own
                        del record["size"], record["sha256"]
            assert _unmap(manifest, mapping) == local_manifest
        elif name.endswith(".json"):
            assert _unmap(json.loads(data), mapping) == json.loads(local[name]), name
        elif name.endswith((".txt", ".md")) and any(url.encode() in data for url in mapping):
            assert _unmap(data.decode(), mapping) == local[name].decode(), name
        else:
            assert data == local[name], f"{name} is not byte-identical"


def _assert_nothing_at(fs, bucket: str, prefix: str):
    fs.invalidate_cache()
    keys = fs.find(bucket)
    assert not [k for k in keys if k.startswith(f"{bucket}/{prefix}/") or k == f"{bucket}/{prefix}"], keys
    assert not [k for k in keys if ".loratv-tmp-" in k], f"temporary prefix left behind: {keys}"


def test_merge_from_and_to_s3_matches_the_local_merge(s3, seeded, capsys, tmp_path, fetched):
    fs, bucket = s3
    urls, paths = seeded["urls"], seeded["paths"]
    out = f"s3://{bucket}/merged"
    rc, _, err = run_cli(capsys, "merge", "--base", urls["base"], "--adapter", urls["adapter"], "-o", out, "--quiet")
    assert rc == 0, err
    # unchanged tensors are byte-copied by ranged reads and hashed from the same bytes: each byte of the base is
    # fetched once at most (the header twice: once to index it, once for the manifest)
    base_file = Path(paths["base"]) / "model.safetensors"
    (header_len,) = struct.unpack("<Q", base_file.read_bytes()[:8])
    assert fetched[urls["base"] + "/model.safetensors"] <= base_file.stat().st_size + 8 + header_len
    remote = _download(fs, f"{bucket}/merged", tmp_path / "merged")
    _assert_same_output(remote, _local_tree(seeded["local"] / "merged"),
                        {urls["base"]: paths["base"], urls["adapter"]: paths["adapter"]})
    fs.invalidate_cache()
    assert not [k for k in fs.find(bucket) if ".loratv-tmp-" in k], "the temporary prefix is removed"


def test_extract_and_compare_from_s3_match_the_local_runs(s3, seeded, capsys, tmp_path):
    fs, bucket = s3
    urls, paths, local = seeded["urls"], seeded["paths"], seeded["local"]
    tv = f"s3://{bucket}/tv"
    rc, _, err = run_cli(capsys, "extract", "--base", urls["base"], "--finetuned", urls["finetuned"], "-o", tv,
                         "--quiet")
    assert rc == 0, err
    mapping = {urls["base"]: paths["base"], urls["finetuned"]: paths["finetuned"]}
    _assert_same_output(_download(fs, f"{bucket}/tv", tmp_path / "tv"), _local_tree(local / "tv"), mapping)

    # compare reads the s3 base, adapter and task vector and writes its output to s3; the local run, local files
    cmp_url, cmp_local = f"s3://{bucket}/cmp", tmp_path / "cmp-local"
    rc, remote_json, err = run_cli(capsys, "compare", "--base", urls["base"], "--adapter", urls["adapter"],
                                   "--task-vector", tv, "-o", cmp_url, "--no-plots", "--json")
    assert rc == 0, err
    rc, local_json, err = run_cli(capsys, "compare", "--base", paths["base"], "--adapter", paths["adapter"],
                                  "--task-vector", str(local / "tv"), "-o", str(cmp_local), "--no-plots", "--json")
    assert rc == 0, err
    mapping.update({urls["adapter"]: paths["adapter"], tv: str(local / "tv"), cmp_url: str(cmp_local)})
    remote_record, local_record = json.loads(remote_json), json.loads(local_json)
    assert remote_record["summary"]["verdict"] == local_record["summary"]["verdict"] == "EQUIVALENT (certified)"
    assert _unmap(remote_record, mapping) == local_record
    _assert_same_output(_download(fs, f"{bucket}/cmp", tmp_path / "cmp"), _local_tree(cmp_local), mapping)


def test_merge_models_similarity_and_to_lora_on_s3_match_the_local_runs(s3, seeded, capsys, tmp_path):
    fs, bucket = s3
    urls, paths, local = seeded["urls"], seeded["paths"], seeded["local"]
    mapping = {url: paths[key] for key, url in urls.items()}
    runs = {}
    # merge-models: a TIES recipe over the s3 base and fine-tuned model (the recipe itself is a local file)
    for where, models in (("s3", urls), ("local", paths)):
        recipe = tmp_path / f"recipe-{where}.yaml"
        recipe.write_text(json.dumps({"merge_method": "ties", "base_model": models["base"], "dtype": "float32",
                                      "models": [{"model": models["finetuned"],
                                                  "parameters": {"weight": 0.8, "density": 0.5}}]}))
        runs[where] = recipe
    out = f"s3://{bucket}/mm"
    assert run_cli(capsys, "merge-models", runs["s3"], "-o", out, "--quiet")[0] == 0
    assert run_cli(capsys, "merge-models", runs["local"], "-o", tmp_path / "mm-local", "--quiet")[0] == 0
    mm_mapping = {**mapping, str(runs["s3"]): str(runs["local"])}
    _assert_same_output(_download(fs, f"{bucket}/mm", tmp_path / "mm"), _local_tree(tmp_path / "mm-local"),
                        mm_mapping)
    # similarity of the s3 adapter and task vector against the s3 base
    tv = f"s3://{bucket}/tv"
    fs.put(str(local / "tv"), f"{bucket}/tv", recursive=True)
    common = ["similarity", "--duplicate-cosine", "0.5", "--no-plots", "--quiet"]
    rc, _, err = run_cli(capsys, *common, urls["adapter"], "--base", urls["base"], "--task-vectors", tv, "-o",
                         f"s3://{bucket}/sim")
    assert rc == 0, err
    assert run_cli(capsys, *common, paths["adapter"], "--base", paths["base"], "--task-vectors", local / "tv",
                   "-o", tmp_path / "sim-local")[0] == 0
    remote = _download(fs, f"{bucket}/sim", tmp_path / "sim")
    records = [json.loads(remote["similarity.json"]), json.loads((tmp_path / "sim-local" / "similarity.json").read_text())]
    assert records[0]["cosine"] == records[1]["cosine"] and records[0]["cosine"][0][1] > 1 - 1e-6
    # to-lora from the s3 base and fine-tuned model into an s3 adapter
    out = f"s3://{bucket}/lora"
    assert run_cli(capsys, "to-lora", "--base", urls["base"], "--finetuned", urls["finetuned"], "--rank", "8",
                   "-o", out, "--quiet")[0] == 0
    assert run_cli(capsys, "to-lora", "--base", paths["base"], "--finetuned", paths["finetuned"], "--rank", "8",
                   "-o", tmp_path / "lora-local", "--quiet")[0] == 0
    remote = _download(fs, f"{bucket}/lora", tmp_path / "lora")
    remote.pop(MARKER)
    local_tree = _local_tree(tmp_path / "lora-local")
    assert sorted(remote) == sorted(local_tree)
    assert _split_safetensors(remote["adapter_model.safetensors"])[1:] == \
        _split_safetensors(local_tree["adapter_model.safetensors"])[1:], "the factors are the local run's bit for bit"


@pytest.fixture
def ray_with_s3(s3_endpoint):
    """A local Ray instance whose workers see the S3 endpoint and credentials (a worker reads and writes the store
    itself, so it needs them in its own environment)."""
    ray = pytest.importorskip("ray", reason="needs Ray: pip install 'loratv[ray]'")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=100 * 2**20, runtime_env={"env_vars": _s3_env(s3_endpoint)})
    yield
    ray.shutdown()


def test_ray_tasks_read_and_write_s3_as_the_local_executor_does(s3, seeded, ray_with_s3, capsys, tmp_path):
    """Ray tasks open s3:// inputs themselves and upload their shards and part files under the output's temporary
    prefix; the published outputs are the local executor's byte for byte, and nothing temporary is left."""
    fs, bucket = s3
    urls = seeded["urls"]
    for executor in ("local", "ray"):
        runs = (
            ["merge", "--base", urls["base"], "--adapter", urls["adapter"], "--max-shard-size", "300KB"],
            ["extract", "--base", urls["base"], "--finetuned", urls["finetuned"], "--task-bytes", "1MB"],
            ["compare", "--base", urls["base"], "--adapter", urls["adapter"], "--finetuned", urls["finetuned"],
             "--task-bytes", "1MB", "--no-plots"],
        )
        for argv in runs:
            out = f"s3://{bucket}/{argv[0]}-{executor}"
            rc, _, err = run_cli(capsys, *argv, "-o", out, "--executor", executor, "--quiet")
            assert rc == 0, err
    for command in ("merge", "extract", "compare"):
        local = _download(fs, f"{bucket}/{command}-local", tmp_path / f"{command}-local")
        distributed = _download(fs, f"{bucket}/{command}-ray", tmp_path / f"{command}-ray")
        assert len(local) > 2 and sorted(local) == sorted(distributed)
        assert [name for name in local if local[name] != distributed[name]] == [], command
    fs.invalidate_cache()
    assert not [k for k in fs.find(bucket) if ".loratv-tmp-" in k or "/.parts/" in k], "temporary objects left"


@pytest.fixture
def fetched(monkeypatch):
    """{url: bytes fetched} for every ranged read made through io.storage."""
    counts: dict = {}
    original = storage.read_range

    def counting(url, start, nbytes):
        data = original(url, start, nbytes)
        counts[str(url)] = counts.get(str(url), 0) + len(data)
        return data

    monkeypatch.setattr(storage, "read_range", counting)
    return counts


def test_a_tensor_read_fetches_only_its_bytes(s3, seeded, fetched):
    url = seeded["urls"]["base"] + "/model.safetensors"
    local_file = Path(seeded["paths"]["base"]) / "model.safetensors"
    raw = local_file.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])

    ckpt = Checkpoint(seeded["urls"]["base"])
    assert fetched == {url: 8 + header_len}, "opening reads the 8-byte length and the header only"

    oracle = load_file(local_file)
    name = max(ckpt.names(), key=lambda n: ckpt.entry(n).nbytes)
    entry = ckpt.entry(name)
    fetched.clear()
    assert ckpt.read(name).equal(oracle[name])
    assert fetched == {url: entry.nbytes} and entry.nbytes < len(raw) / 10

    fetched.clear()
    row_bytes = entry.nbytes // entry.shape[0]
    assert ckpt.read_rows(name, 3, 7).equal(oracle[name][3:7])
    assert fetched == {url: 4 * row_bytes}


def _upload_bytes(fs, key: str, data: bytes):
    fs.pipe_file(key, data)
    fs.invalidate_cache()


def test_a_truncated_object_is_one_sentence_and_nothing_is_written(s3, seeded, capsys):
    fs, bucket = s3
    base = Path(seeded["paths"]["base"])
    _upload_bytes(fs, f"{bucket}/trunc/config.json", (base / "config.json").read_bytes())
    _upload_bytes(fs, f"{bucket}/trunc/model.safetensors", (base / "model.safetensors").read_bytes()[:-1000])
    url = f"s3://{bucket}/trunc/model.safetensors"
    rc, _, err = run_cli(capsys, "merge", "--base", f"s3://{bucket}/trunc", "--adapter", seeded["urls"]["adapter"],
                         "-o", f"s3://{bucket}/out", "--quiet")
    assert_one_line_error(rc, err, url, "truncated")
    _assert_nothing_at(fs, bucket, "out")


def test_an_object_truncated_after_it_was_opened_is_one_sentence(s3, seeded):
    fs, bucket = s3
    data = (Path(seeded["paths"]["base"]) / "model.safetensors").read_bytes()
    _upload_bytes(fs, f"{bucket}/later/model.safetensors", data)
    ckpt = Checkpoint(f"s3://{bucket}/later")
    last = ckpt.names()[-1]
    _upload_bytes(fs, f"{bucket}/later/model.safetensors", data[:-4])
    with pytest.raises(ObjectStoreError, match=rf"^s3://{bucket}/later/model.safetensors: truncated object .*'{last}'"):
        ckpt.read(last)


@pytest.mark.parametrize("what", ["key", "bucket"])
def test_a_missing_key_or_bucket_is_one_sentence(s3, seeded, capsys, what):
    fs, bucket = s3
    missing = f"s3://{bucket}/no-such-model" if what == "key" else f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/m"
    rc, _, err = run_cli(capsys, "merge", "--base", missing, "--adapter", seeded["urls"]["adapter"],
                         "-o", f"s3://{bucket}/out", "--quiet")
    assert_one_line_error(rc, err, missing, "no such object")
    _assert_nothing_at(fs, bucket, "out")


def test_an_adapter_folder_without_weights_names_the_folder(s3, seeded, capsys):
    fs, bucket = s3
    config = (Path(seeded["paths"]["adapter"]) / "adapter_config.json").read_bytes()
    _upload_bytes(fs, f"{bucket}/adapter/adapter_config.json", config)
    rc, _, err = run_cli(capsys, "merge", "--base", seeded["urls"]["base"], "--adapter", f"s3://{bucket}/adapter",
                         "-o", f"s3://{bucket}/out", "--quiet")
    assert_one_line_error(rc, err, f"s3://{bucket}/adapter", "adapter_model.safetensors")


def test_an_index_pointing_outside_its_folder_is_refused(s3, seeded, tmp_path):
    fs, bucket = s3
    folder = tmp_path / "sharded"
    shard_model(Path(seeded["paths"]["base"]) / "model.safetensors", folder,
                ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere/model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    fs.put(str(folder), f"{bucket}/sharded", recursive=True)
    fs.put(str(folder / "model-00001-of-00002.safetensors"), f"{bucket}/elsewhere/model-00001-of-00002.safetensors")
    fs.invalidate_cache()
    with pytest.raises(Exception, match="lies outside the model folder"):
        Checkpoint(f"s3://{bucket}/sharded")


def test_an_existing_output_is_refused_without_force_and_replaced_with_it(s3, seeded, capsys, tmp_path):
    fs, bucket = s3
    paths = seeded["paths"]
    args = ["extract", "--base", paths["base"], "--finetuned", paths["finetuned"], "-o", f"s3://{bucket}/tv", "--quiet"]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    _upload_bytes(fs, f"{bucket}/tv/stale.txt", b"from an older run")
    rc, _, err = run_cli(capsys, *args)
    assert_one_line_error(rc, err, f"s3://{bucket}/tv", "already exists", "--force")
    assert fs.cat_file(f"{bucket}/tv/stale.txt") == b"from an older run", "a refused run changes nothing"

    rc, _, err = run_cli(capsys, *args, "--force")
    assert rc == 0, err
    remote = _download(fs, f"{bucket}/tv", tmp_path / "tv")
    assert "stale.txt" not in remote, "the replaced output is gone entirely"
    _assert_same_output(remote, _local_tree(seeded["local"] / "tv"), {})


def test_an_output_inside_an_input_is_refused(s3, seeded, capsys):
    urls = seeded["urls"]
    rc, _, err = run_cli(capsys, "extract", "--base", urls["base"], "--finetuned", urls["finetuned"],
                         "-o", urls["base"] + "/tv", "--quiet")
    assert_one_line_error(rc, err, urls["base"] + "/tv", "into the input")


def _failing_after(monkeypatch, name: str, count: int, exc: BaseException):
    original = getattr(remote_output, name)
    calls = []

    def failing(*args):
        calls.append(args)
        if len(calls) > count:
            raise exc
        return original(*args)

    monkeypatch.setattr(remote_output, name, failing)
    return calls


def test_an_interrupted_upload_leaves_no_output(s3, seeded, capsys, monkeypatch):
    fs, bucket = s3
    paths = seeded["paths"]
    calls = _failing_after(monkeypatch, "_upload", 2, KeyboardInterrupt())
    rc, _, err = run_cli(capsys, "extract", "--base", paths["base"], "--finetuned", paths["finetuned"],
                         "-o", f"s3://{bucket}/tv", "--quiet")
    assert rc == 130, err
    assert len(calls) == 3, "two files were uploaded before the interruption"
    _assert_nothing_at(fs, bucket, "tv")


def test_a_failed_publish_leaves_no_output_and_says_so(s3, seeded, capsys, monkeypatch):
    fs, bucket = s3
    paths = seeded["paths"]
    _failing_after(monkeypatch, "_copy", 1, ObjectStoreError(f"s3://{bucket}/tv/x: cannot be written (boom)."))
    rc, _, err = run_cli(capsys, "extract", "--base", paths["base"], "--finetuned", paths["finetuned"],
                         "-o", f"s3://{bucket}/tv", "--quiet")
    assert_one_line_error(rc, err, f"s3://{bucket}/tv", "cannot be written", "nothing was left")
    _assert_nothing_at(fs, bucket, "tv")


def test_local_paths_never_touch_the_object_store(seeded, monkeypatch):
    def refuse(*args):
        raise AssertionError("a local read went through io.storage")

    monkeypatch.setattr(storage, "read_range", refuse)
    monkeypatch.setattr(storage, "filesystem", refuse)
    ckpt = Checkpoint(seeded["paths"]["base"])
    name = ckpt.names()[0]
    assert ckpt.read(name).numel() > 0


def test_without_fsspec_a_url_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "fsspec", None)
    rc, _, err = run_cli(capsys, "merge", "--base", "s3://bucket/base", "--adapter", "s3://bucket/adapter",
                         "-o", str(tmp_path / "out"), "--quiet")
    assert_one_line_error(rc, err, "s3://bucket/base", "pip install 'loratv[s3]'")
    assert not (tmp_path / "out").exists()
