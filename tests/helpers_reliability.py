"""Shared pieces of the reliability tests (issue 7): a tiny hand-made model with every dtype, its LoRA and a
fine-tuned copy; running the CLI in-process as a fuzz target (no exception may escape, no hang, bounded memory);
and peak-RSS readings.
"""

import contextlib
import io
import json
import signal
from pathlib import Path

import torch
from safetensors.torch import save_file

Q = "model.layers.0.self_attn.q_proj"
CONFIG = {"model_type": "llama", "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_size": 8}
ADAPTER_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "none",
                  "task_type": "CAUSAL_LM", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
                  "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}


def tiny_base_tensors(seed: int = 0) -> dict:
    """One tensor of each kind a parser must handle: 2-D float32, float16, bfloat16, float64, a 0-d int64, bool,
    uint8 and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g),
        f"{Q}.weight": torch.randn(8, 8, generator=g),
        f"{Q}.bias": torch.randn(8, generator=g).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).bfloat16(),
        "model.norm.weight": torch.randn(8, generator=g).double(),
        "model.step": torch.tensor(7, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
        "model.codes": torch.arange(5, dtype=torch.uint8),
        "model.empty": torch.zeros(0, 4),
    }


def write_tiny(root: Path) -> dict:
    """root/base (model.safetensors + config.json), root/adapter (PEFT LoRA r=2 on q_proj), root/finetuned (a few
    tensors changed), root/sharded (the base as two shards and an index). Returns the four folders."""
    root = Path(root)
    base = tiny_base_tensors()
    folders = {k: root / k for k in ("base", "adapter", "finetuned", "sharded")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    save_file(base, folders["base"] / "model.safetensors", metadata={"format": "pt"})
    (folders["base"] / "config.json").write_text(json.dumps(CONFIG, indent=2))
    ft = {k: v.clone() for k, v in base.items()}
    ft[f"{Q}.weight"] += 0.01
    ft[f"{Q}.bias"] += 1
    ft["model.step"] += 1
    save_file(ft, folders["finetuned"] / "model.safetensors", metadata={"format": "pt"})
    g = torch.Generator().manual_seed(1)
    save_file({f"base_model.model.{Q}.lora_A.weight": torch.randn(2, 8, generator=g),
               f"base_model.model.{Q}.lora_B.weight": torch.randn(8, 2, generator=g)},
              folders["adapter"] / "adapter_model.safetensors", metadata={"format": "pt"})
    (folders["adapter"] / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG, indent=2))
    names = list(base)
    weight_map = {}
    for i, part in enumerate((names[:4], names[4:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: base[k] for k in part}, folders["sharded"] / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in base.values())},
             "weight_map": weight_map}
    (folders["sharded"] / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folders


# ---- the CLI as an in-process fuzz target -------------------------------------------------------------------


class Hang(Exception):
    """Raised by SIGALRM in the main thread: a case ran past its time limit."""


class Escaped(AssertionError):
    """An exception other than the CLI's own escaped `loratv.cli.main`: a traceback for a user."""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (peak RSS) so that the next reading is the peak of what follows (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_guarded_case(argv, *, seconds: float = 30, max_rss_growth: int = 256 << 20):
    """`loratv.cli.main(argv)` in-process: (rc, stdout, stderr). Any escaping exception, a run longer than `seconds`
    or a peak RSS more than `max_rss_growth` above the starting RSS fails the test."""
    from loratv.cli import app as cli

    out, err = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    resettable = reset_peak_rss()
    start_rss = _status_kib("VmRSS") << 10
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main([str(a) for a in argv])
    except Hang:
        raise
    except BaseException as exc:  # noqa: BLE001 - anything here would be a traceback on the user's screen
        raise Escaped(f"{type(exc).__name__} escaped loratv {' '.join(map(str, argv))}: {exc}") from exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if resettable:
        growth = (_status_kib("VmHWM") << 10) - start_rss
        assert growth < max_rss_growth, f"peak RSS grew by {growth >> 20} MiB on {argv}"
    return rc, out.getvalue(), err.getvalue()
