#!/usr/bin/env python
"""Benchmark `loratv merge` and `loratv extract` on a StarCoder2-3B-shaped checkpoint against their floors.

    python benchmarks/bench_merge_extract.py --workdir /tmp/loratv-bench            # full: 30 layers, ~12.1 GB
    python benchmarks/bench_merge_extract.py --workdir /tmp/loratv-bench --layers 2 # quick check, ~1.4 GB
    python benchmarks/bench_merge_extract.py --workdir /tmp/loratv-bench --repeat 3 --snapshot HEAD  # docs/benchmarks.md

One run:
  1. writes a random fp32 StarCoder2-3B-shaped base and an r=16 LoRA adapter (make_starcoder2_3b.py);
  2. times, each in a fresh subprocess after `sync` and dropping the page cache (when permitted):
       cp -r BASE COPY                                      the I/O floor of a merge
       loratv merge --base BASE --adapter ADAPTER -o MERGED --quiet
       python peft_merge_reference.py (transformers + PEFT merge_and_unload + save_pretrained)
       python read_all.py BASE MERGED                       the I/O floor of an extract
       loratv extract --base BASE --finetuned MERGED -o TV
     recording wall seconds, the seconds of a `sync` right after (so that writers that fsync and writers that
     leave dirty pages are compared on equal terms), peak RSS (summed VmRSS of the process tree every 50 ms, VmHWM,
     GNU time's max RSS), CPU seconds, block I/O, and the CPU that other processes used meanwhile (noise);
     with --repeat N the five steps run N times, interleaved, and the report takes the fastest run of each;
  3. checks loratv's merge against PEFT's and the task vector against MERGED - BASE (untimed; --no-verify skips);
  4. prints a Markdown report and writes results.json / results.md to --workdir.

Generated checkpoints live under --workdir, are deleted as soon as they are no longer needed (at most three 12 GB
copies at once) and all of them are removed at the end unless --keep is given.
"""

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
REPO = HERE.parent

TARGETS = {
    "merge_vs_copy_max": 1.25,
    "peft_vs_merge_min": 3.0,
    "merge_rss_max_mb": 1500.0,
    "extract_vs_read_max": 1.5,
    "extract_rss_max_mb": 1500.0,
}


# ----------------------------------------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def drop_caches() -> bool:
    """sync, then ask the kernel to drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cached_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1]) / 1024
    return float("nan")


CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_jiffies() -> dict:
    """Machine-wide busy and steal time from /proc/stat, in seconds."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return {}
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return {"busy": (user + nice + system + irq + softirq) / CLK_TCK, "steal": steal / CLK_TCK}


def cpu_by_process(exclude: set) -> dict:
    """pid -> (name, user+sys seconds so far) for every process but `exclude` (and kernel threads)."""
    out = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        if p.info["pid"] in exclude or not p.info["cmdline"] or p.info["cpu_times"] is None:
            continue
        t = p.info["cpu_times"]
        out[p.info["pid"]] = (" ".join(p.info["cmdline"])[:80], t.user + t.system + t.children_user + t.children_system)
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def rmtree(path: Path) -> None:
    if Path(path).exists():
        shutil.rmtree(path)


def _status_kb(pid: int, keys=("VmRSS:", "VmHWM:")) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                for k in keys:
                    if line.startswith(k):
                        out[k] = int(line.split()[1])
    except OSError:
        pass
    return out


class TreeRssSampler(threading.Thread):
    """Every `interval` s: the summed VmRSS of a process and all its descendants, and each one's VmHWM.

    `peak_sum` is the largest sampled sum; `peak_hwm` the largest high-water mark of any single process in the tree
    (exact for that process, since the kernel keeps it, as long as it was sampled at least once near its end).
    """

    def __init__(self, pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_sum = 0
        self.peak_hwm = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self):
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            try:
                pids = [self.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                pids = [self.pid]
            total = 0
            for pid in pids:
                st = _status_kb(pid)
                total += st.get("VmRSS:", 0)
                self.peak_hwm = max(self.peak_hwm, st.get("VmHWM:", 0))
            self.peak_sum = max(self.peak_sum, total)
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


def measure(name: str, cmd, logdir: Path, env=None, drop=True, timeout=None) -> dict:
    """Run `cmd` in a fresh subprocess and measure it (see the module docstring)."""
    dropped = drop_caches() if drop else None
    cache_before = cached_mb()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    logfile = logdir / f"{name}.log"
    log(f"{name}: {shlex.join(str(c) for c in cmd)}")
    # The child's own ru_maxrss would include this (large) process's RSS at fork time: the kernel carries the old
    # mm's high-water mark over exec. GNU time, being small, gives the command a clean one; %M is its max RSS in KiB.
    timefile = logdir / f"{name}.maxrss"
    timefile.unlink(missing_ok=True)
    wrapper = [GNU_TIME, "-f", "%M", "-o", str(timefile)] if GNU_TIME else []
    me = os.getpid()
    others_before = cpu_by_process({me})
    stat_before = cpu_jiffies()
    self_before = os.times()
    with open(logfile, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapper + [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = TreeRssSampler(proc.pid)
        sampler.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                timed_out = True
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    stat_after = cpu_jiffies()
    others_after = cpu_by_process({me})
    # CPU that other processes on the machine used while this step ran (a shared machine makes timings noisy)
    self_after = os.times()
    own_cpu = ru.ru_utime + ru.ru_stime  # the command's, plus this process's sampling below
    own_cpu += (self_after.user - self_before.user) + (self_after.system - self_before.system)
    background = None
    if stat_before and stat_after:
        background = max(0.0, stat_after["busy"] - stat_before["busy"] - own_cpu)
    busiest = sorted(
        ((others_after[p][1] - others_before.get(p, ("", 0.0))[1], others_after[p][0]) for p in others_after),
        reverse=True,
    )
    busiest = [{"cpu_s": round(c, 1), "cmd": n} for c, n in busiest[:3] if c >= 1.0]
    t1 = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t1
    tail = logfile.read_bytes()[-4000:].decode("utf-8", "replace")
    maxrss_time = None
    try:
        maxrss_time = round(int(timefile.read_text().split()[-1]) * 1024 / 1e6, 1)
    except (OSError, ValueError, IndexError):
        pass
    res = {
        "name": name,
        "cmd": shlex.join(str(c) for c in cmd),
        "rc": proc.returncode,
        "timed_out": timed_out,
        "wall_s": round(wall, 3),
        "sync_after_s": round(sync_s, 3),
        "total_s": round(wall + sync_s, 3),
        "peak_rss_tree_sum_mb": round(sampler.peak_sum * 1024 / 1e6, 1),
        "peak_hwm_single_process_mb": round(sampler.peak_hwm * 1024 / 1e6, 1),
        "rss_samples": sampler.samples,
        "maxrss_gnu_time_mb": maxrss_time,
        "user_s": round(ru.ru_utime, 2),
        "sys_s": round(ru.ru_stime, 2),
        "disk_read_gb": round(ru.ru_inblock * 512 / 1e9, 3),
        "disk_write_gb": round(ru.ru_oublock * 512 / 1e9, 3),
        "background_cpu_s": None if background is None else round(background, 1),
        "steal_s": round(stat_after["steal"] - stat_before["steal"], 1) if stat_before and stat_after else None,
        "busiest_other_processes": busiest,
        "loadavg_at_start": load_at_start,
        "caches_dropped": dropped,
        "page_cache_mb_at_start": round(cache_before, 1),
        "log": str(logfile),
        "output_tail": tail[-1500:],
    }
    res["peak_rss_mb"] = max(res["peak_rss_tree_sum_mb"], res["peak_hwm_single_process_mb"], maxrss_time or 0.0)
    status_txt = "ok" if res["rc"] == 0 else f"FAILED rc={res['rc']}"
    log(
        f"{name}: {status_txt}; wall {res['wall_s']:.1f} s + sync {sync_s:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB, "
        f"cpu {res['user_s'] + res['sys_s']:.1f} s, read {res['disk_read_gb']:.2f} GB, wrote {res['disk_write_gb']:.2f} GB, "
        f"other processes' CPU {res['background_cpu_s']} s"
    )
    if res["rc"] != 0:
        log(f"{name}: output tail:\n{tail[-1500:]}")
    return res


# ------------------------------------------------------------------------------------------------------ verification


def safetensors_index(folder: Path) -> dict:
    """name -> (file, dtype, shape, absolute start, nbytes) for every tensor in folder/*.safetensors."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, spec in header.items():
            b, e = spec["data_offsets"]
            out[name] = (path, spec["dtype"], tuple(spec["shape"]), 8 + n + b, e - b)
    return out


def load_tensor(entry):
    import torch

    path, code, shape, start, nbytes = entry
    dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[code]
    buf = bytearray(nbytes)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        f.readinto(buf)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


def compare_merges(loratv_dir: Path, peft_dir: Path, base_dir: Path) -> dict:
    """Tensor-by-tensor: loratv's merged checkpoint vs PEFT's (names, dtypes, max |diff|, bit-identical count)."""
    a, b, base = safetensors_index(loratv_dir), safetensors_index(peft_dir), safetensors_index(base_dir)
    res = {
        "tensors_loratv": len(a),
        "tensors_peft": len(b),
        "only_in_loratv": sorted(set(a) - set(b))[:10],
        "only_in_peft": sorted(set(b) - set(a))[:10],
        "dtypes_loratv": sorted({e[1] for e in a.values()}),
        "dtypes_peft": sorted({e[1] for e in b.values()}),
    }
    max_diff, max_rel, identical, changed_vs_base = 0.0, 0.0, 0, 0
    for name in sorted(set(a) & set(b)):
        x, y = load_tensor(a[name]).float(), load_tensor(b[name]).float()
        if x.shape != y.shape:
            res.setdefault("shape_mismatch", []).append(name)
            continue
        d = (x - y).abs().max().item() if x.numel() else 0.0
        identical += int(d == 0.0)
        if name in base:
            delta = (y - load_tensor(base[name]).float()).abs().max().item() if y.numel() else 0.0
            if delta:
                changed_vs_base += 1
                max_rel = max(max_rel, d / delta)
        max_diff = max(max_diff, d)
    res.update(
        {
            "compared": len(set(a) & set(b)),
            "bit_identical": identical,
            "changed_by_peft": changed_vs_base,
            "max_abs_diff": max_diff,
            "max_diff_relative_to_delta": max_rel,
        }
    )
    return res


def check_task_vector(tv_dir: Path, base_dir: Path, ft_dir: Path) -> dict:
    """Every tensor in the task vector that names a base tensor must equal FT - BASE."""
    tv, base, ft = safetensors_index(tv_dir), safetensors_index(base_dir), safetensors_index(ft_dir)
    changed = 0
    for name in base:
        if name in ft and ft[name][4] == base[name][4]:
            x, y = load_tensor(ft[name]), load_tensor(base[name])
            changed += int(not bool((x == y).all()))
    res = {"tensors_in_tv": len(tv), "tensors_changed_ft_vs_base": changed, "dtypes_tv": sorted({e[1] for e in tv.values()})}
    matched, max_diff, unknown = 0, 0.0, []
    for name, entry in tv.items():
        if name not in base or name not in ft:
            unknown.append(name)
            continue
        expect = load_tensor(ft[name]).double() - load_tensor(base[name]).double()
        got = load_tensor(entry).double()
        if got.shape != expect.shape:
            unknown.append(name)
            continue
        matched += 1
        max_diff = max(max_diff, (got - expect).abs().max().item() if got.numel() else 0.0)
    res.update({"matched_names": matched, "unmatched_names": unknown[:10], "max_abs_diff_vs_ft_minus_base": max_diff})
    return res


# ----------------------------------------------------------------------------------------------------------- machine


def machine_info(workdir: Path, loratv: list) -> dict:
    import peft
    import safetensors
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    du = shutil.disk_usage(workdir)
    fs = ""
    try:
        fs = subprocess.run(["df", "-T", str(workdir)], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    except Exception:
        pass
    git = ""
    try:
        git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
        git += " (uncommitted changes under src/)" if dirty.strip() else " (src/ as committed)"
    except Exception:
        pass
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "workdir": str(workdir),
        "workdir_fs": fs,
        "workdir_free_gb": round(du.free / 1e9, 1),
        "loratv_cmd": shlex.join(loratv),
        "repo_git": git,
    }


# ------------------------------------------------------------------------------------------------------------ report


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def fmt(x, nd=1):
    return "n/a" if x is None else f"{x:.{nd}f}"


def build_report(r: dict) -> str:
    m = r["machine"]
    steps = r["steps"]
    lines = []
    lines.append(f"## loratv merge/extract benchmark ({r['model']['layers']} layers, {r['model']['params'] / 1e9:.3f} B params, "
                 f"{r['model']['bytes'] / 1e9:.2f} GB fp32 in {r['model']['shards']} shard(s))")
    lines.append("")
    lines.append(f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']} GiB RAM, Linux {m['kernel']}, Python {m['python']}, "
                 f"torch {m['torch']} ({m['torch_threads']} threads), transformers {m['transformers']}, peft {m['peft']}, "
                 f"workdir on {m['workdir_fs'] or '?'}; loratv: `{m['loratv_cmd']}` at {m['repo_git'] or '?'}.")
    cache = r["page_cache"]
    lines.append(f"Page cache: {cache}.")
    lines.append("")
    n = max((st.get("repetitions", 1) for st in steps.values()), default=1)
    best = f"fastest of {n} runs" if n > 1 else "one run"
    lines.append(f"Figures per step: {best}" + (", with the median of wall+sync beside it" if n > 1 else "") + ".")
    lines.append("")
    med_h = " median wall+sync s |" if n > 1 else ""
    lines.append(f"| step | wall s | sync after s | wall+sync s |{med_h} peak RSS MB | CPU user+sys s | disk read GB | disk write GB | other processes' CPU s | rc |")
    lines.append("|---|---:|---:|---:|" + ("---:|" if n > 1 else "") + "---:|---:|---:|---:|---:|---:|")
    labels = {
        "cp": "`cp -r BASE COPY` (merge I/O floor)",
        "loratv_merge": "`loratv merge`",
        "peft_reference": "transformers+PEFT merge_and_unload + save_pretrained",
        "read_both": "read BASE + MERGED once (extract I/O floor)",
        "loratv_extract": "`loratv extract`",
    }
    for key in STEP_ORDER:
        s = steps.get(key)
        if not s:
            lines.append(f"| {labels[key]} | skipped |" + " |" * (9 if n > 1 else 8))
            continue
        med = f" {fmt(s.get('median_total_s'))} |" if n > 1 else ""
        lines.append(
            f"| {labels[key]} | {fmt(s['wall_s'])} | {fmt(s['sync_after_s'])} | {fmt(s['total_s'])} |{med} {fmt(s['peak_rss_mb'], 0)} | "
            f"{fmt(s['user_s'] + s['sys_s'])} | {fmt(s['disk_read_gb'], 2)} | {fmt(s['disk_write_gb'], 2)} | "
            f"{fmt(s.get('background_cpu_s'))} | {s['rc']} |"
        )
    lines.append("")
    lines.append("Peak RSS = max(summed VmRSS of the process tree sampled every 50 ms, VmHWM of any process in it, GNU time's %M), "
                 "the largest over all runs; MB = 10^6 bytes. Other processes' CPU = machine-wide busy CPU seconds during the step "
                 "minus the step's own (noise from whatever else ran on the machine).")
    lines.append("Ratios use wall+sync (cp and save_pretrained leave dirty pages behind, loratv fsyncs its shards); "
                 "the met column judges the fastest runs.")
    lines.append("")
    lines.append("| check | fastest runs | median runs | wall only (fastest) | target | met |")
    lines.append("|---|---:|---:|---:|---:|:---:|")
    for c in r["checks"]:
        met = {True: "yes", False: "**NO**", None: "n/a"}[c["met"]]
        lines.append(f"| {c['check']} | {c['measured']} | {c.get('median_measured', '')} | {c.get('wall_measured', '')} | {c['target']} | {met} |")
    v = r.get("verify") or {}
    if v:
        lines.append("")
        if "merge_vs_peft" in v:
            mv = v["merge_vs_peft"]
            lines.append(
                f"Merge check vs PEFT: {mv.get('compared')} tensors compared ({mv.get('tensors_loratv')} in loratv's output, "
                f"{mv.get('tensors_peft')} in PEFT's), {mv.get('bit_identical')} bit-identical, max |diff| {mv.get('max_abs_diff', float('nan')):.3g} "
                f"(= {mv.get('max_diff_relative_to_delta', float('nan')):.3g} of the largest LoRA delta), dtypes {mv.get('dtypes_loratv')} vs {mv.get('dtypes_peft')}"
                + (f", only in loratv: {mv['only_in_loratv']}" if mv.get("only_in_loratv") else "")
                + (f", only in PEFT: {mv['only_in_peft']}" if mv.get("only_in_peft") else "")
                + "."
            )
        if "task_vector" in v:
            tv = v["task_vector"]
            lines.append(
                f"Task vector check: {tv.get('tensors_in_tv')} tensors in TV ({tv.get('tensors_changed_ft_vs_base')} tensors differ between "
                f"MERGED and BASE), {tv.get('matched_names')} matched by name, max |TV - (MERGED - BASE)| {tv.get('max_abs_diff_vs_ft_minus_base', float('nan')):.3g}, "
                f"dtypes {tv.get('dtypes_tv')}" + (f"; unmatched names: {tv['unmatched_names']}" if tv.get("unmatched_names") else "") + "."
            )
        for k, e in v.items():
            if k.endswith("_error"):
                lines.append(f"Verification {k}: {e}")
    if r.get("peft_phases"):
        lines.append("")
        lines.append("PEFT reference phases (s): " + ", ".join(f"{k} {v}" for k, v in r["peft_phases"].items()) + ".")
    if r.get("notes"):
        lines.append("")
        for n in r["notes"]:
            lines.append(f"- {n}")
    return "\n".join(lines) + "\n"


def evaluate(steps: dict) -> list:
    def get(k, field):
        s = steps.get(k)
        return s[field] if s and s["rc"] == 0 else None

    checks = []
    t = TARGETS

    def add(check, key_a, key_b, target, ok):
        best = ratio(get(key_a, "total_s"), get(key_b, "total_s"))
        med = ratio(get(key_a, "median_total_s"), get(key_b, "median_total_s"))
        wall = ratio(get(key_a, "wall_s"), get(key_b, "wall_s"))
        f = lambda v: "n/a" if v is None else f"{v:.2f}×"
        checks.append({"check": check, "value": best, "median_value": med, "wall_value": wall, "measured": f(best),
                       "median_measured": f(med), "wall_measured": f(wall), "target": target,
                       "met": None if best is None else ok(best)})

    def add_rss(check, key, target, ok):
        v = get(key, "peak_rss_mb")
        checks.append({"check": check, "value": v, "measured": "n/a" if v is None else f"{v:.0f} MB", "target": target,
                       "met": None if v is None or ok is None else ok(v)})

    add("loratv merge / cp -r", "loratv_merge", "cp", f"≤ {t['merge_vs_copy_max']}×", lambda v: v <= t["merge_vs_copy_max"])
    add("PEFT / loratv merge (speed-up)", "peft_reference", "loratv_merge", f"≥ {t['peft_vs_merge_min']}×",
        lambda v: v >= t["peft_vs_merge_min"])
    add_rss("loratv merge peak RSS", "loratv_merge", f"< {t['merge_rss_max_mb']:.0f} MB", lambda v: v < t["merge_rss_max_mb"])
    add("loratv extract / read both", "loratv_extract", "read_both", f"≤ {t['extract_vs_read_max']}×",
        lambda v: v <= t["extract_vs_read_max"])
    add_rss("loratv extract peak RSS", "loratv_extract", f"< {t['extract_rss_max_mb']:.0f} MB", lambda v: v < t["extract_rss_max_mb"])
    add_rss("PEFT reference peak RSS (for scale)", "peft_reference", "-", None)
    return checks


STEP_ORDER = ["cp", "loratv_merge", "peft_reference", "read_both", "loratv_extract"]


def summarize(runs: list) -> dict:
    """One step over its repetitions: the fastest successful run's figures, plus min/median/all of wall+sync."""
    ok = [r for r in runs if r["rc"] == 0]
    best = dict(min(ok, key=lambda r: r["total_s"]) if ok else runs[-1])
    totals = sorted(r["total_s"] for r in ok)
    best.update(
        {
            "repetitions": len(runs),
            "failed_repetitions": len(runs) - len(ok),
            "rc": best["rc"] if ok and len(ok) == len(runs) else next(r["rc"] for r in runs if r["rc"] != 0),
            "all_total_s": [r["total_s"] for r in runs],
            "min_total_s": totals[0] if totals else None,
            "median_total_s": statistics.median(totals) if totals else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "max_background_cpu_s": max((r["background_cpu_s"] or 0.0) for r in runs),
        }
    )
    return best


# -------------------------------------------------------------------------------------------------------------- main


def resolve_loratv(override: str | None):
    env = dict(os.environ)
    if override:
        return shlex.split(override), env
    exe = shutil.which("loratv")
    if exe:
        return [exe], env
    # not installed: run the package from this checkout
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-m", "loratv.cli"], env


def prepare_workdir(ap, workdir: Path):
    """The resolved --workdir (refused inside the repository) and its logs/ folder, both created."""
    wd = workdir.resolve()
    if wd == REPO or REPO in wd.parents:
        ap.error(f"--workdir must be outside the repository ({REPO}); generated checkpoints are many GB")
    wd.mkdir(parents=True, exist_ok=True)
    logdir = wd / "logs"
    logdir.mkdir(exist_ok=True)
    return wd, logdir


def loratv_runner(wd: Path, snapshot: str | None, override: str | None = None):
    """(command, environment, snapshot commit or None): loratv from a `git archive` of src/ at `snapshot` (immune
    to edits during the run), else as resolve_loratv finds it."""
    if not snapshot:
        return (*resolve_loratv(override), None)
    snap = wd / "loratv-src"
    commit = snapshot_source(snapshot, snap)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(snap / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-m", "loratv.cli"], env, commit


def snapshot_source(rev: str, dest: Path) -> str:
    """Extract src/ of commit `rev` into dest (git archive, read-only on the repository); returns the full commit id."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True,
                            text=True, check=True).stdout.strip()
    rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return commit


def package_fingerprint(loratv: list, env: dict) -> dict:
    """Where the loratv package that the benchmark runs lives, and a hash of its .py files (to catch edits mid-run)."""
    import hashlib

    probe = subprocess.run(loratv[:-2] + ["-c", "import loratv, os; print(os.path.dirname(loratv.__file__))"]
                           if loratv[-2:] == ["-m", "loratv.cli"] else
                           [sys.executable, "-c", "import loratv, os; print(os.path.dirname(loratv.__file__))"],
                           capture_output=True, text=True, env=env)
    folder = probe.stdout.strip()
    if not folder:
        return {"package_dir": None, "sha256": None}
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*.py")):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes() + b"\0")
    return {"package_dir": folder, "sha256": h.hexdigest()[:16]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/loratv-bench"), help="where data and results go (default %(default)s)")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers of the synthetic model (30 = StarCoder2-3B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints and outputs")
    ap.add_argument("--reuse", action="store_true", help="reuse BASE/ADAPTER already in --workdir if they match --layers/--seed")
    ap.add_argument("--skip-peft", action="store_true", help="skip the transformers+PEFT reference (needs ~2.5x the model in RAM)")
    ap.add_argument("--no-verify", action="store_true", help="skip the untimed correctness checks")
    ap.add_argument("--loratv", help="command that runs loratv (default: `loratv` on PATH, else python -m loratv.cli from this repo)")
    ap.add_argument("--snapshot", metavar="REV",
                    help="run loratv from a copy of src/ at git commit REV (e.g. HEAD), immune to edits made during the run")
    ap.add_argument("--precision", help="pass --precision to loratv merge")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the timed steps N times, interleaved; figures are the fastest run, medians in results.json")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="per-step timeout in seconds")
    args = ap.parse_args(argv)

    wd, logdir = prepare_workdir(ap, args.workdir)
    base, adapter = wd / "base", wd / "adapter"
    copy, merged, peft_out, tv = wd / "copy", wd / "merged", wd / "peft-merged", wd / "task-vector"
    for p in (copy, merged, peft_out, tv):
        rmtree(p)

    if args.snapshot and args.loratv:
        ap.error("--snapshot and --loratv exclude each other")
    loratv, env, snapshot_commit = loratv_runner(wd, args.snapshot, args.loratv)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(wd, loratv), "steps": {}, "notes": []}
    if snapshot_commit:
        results["machine"]["repo_git"] = f"{snapshot_commit[:7]} (snapshot of src/ via git archive)"
    results["loratv_package_at_start"] = package_fingerprint(loratv, env)
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    steps = results["steps"]
    log(f"machine: {json.dumps(results['machine'])}")

    probe = subprocess.run(loratv + ["--help"], capture_output=True, text=True, env=env)
    results["loratv_help_rc"] = probe.returncode
    if probe.returncode != 0:
        results["notes"].append(f"`{shlex.join(loratv)} --help` failed (rc {probe.returncode}): {(probe.stderr or probe.stdout).strip()[-300:]}")
        log(results["notes"][-1])

    try:
        # 1. data
        sys.path.insert(0, str(HERE))
        import make_starcoder2_3b as gen

        marker = wd / "generated.json"
        want = {"layers": args.layers, "seed": args.seed, "generator": "make_starcoder2_3b.py"}
        if args.reuse and marker.exists() and json.loads(marker.read_text()).get("want") == want and base.exists() and adapter.exists():
            info = json.loads(marker.read_text())["info"]
            log(f"reusing {base} and {adapter}")
        else:
            rmtree(base), rmtree(adapter), marker.unlink(missing_ok=True)
            g = measure("generate", [sys.executable, HERE / "make_starcoder2_3b.py", "--out", base, "--adapter-out", adapter,
                                     "--layers", args.layers, "--seed", args.seed], logdir, drop=False, timeout=args.timeout)
            if g["rc"] != 0:
                raise SystemExit(f"generation failed:\n{g['output_tail']}")
            results["generate"] = g
            tensors = gen.model_tensors(args.layers)
            params = sum(math.prod(t[1]) for t in tensors)
            info = {"layers": args.layers, "tensors": len(tensors), "params": params, "bytes": dir_bytes(base),
                    "shards": len(list(base.glob("*.safetensors"))), "adapter_bytes": dir_bytes(adapter)}
            marker.write_text(json.dumps({"want": want, "info": info}))
        results["model"] = info

        runs = results["runs"] = {k: [] for k in STEP_ORDER}
        results["verify"] = {}
        for rep in range(1, args.repeat + 1):
            tag = f"-{rep}" if args.repeat > 1 else ""
            if args.repeat > 1:
                log(f"repetition {rep} of {args.repeat}")
            for p in (copy, merged, peft_out, tv):
                rmtree(p)

            # 2a. I/O floor of a merge
            runs["cp"].append(measure("cp" + tag, ["cp", "-r", base, copy], logdir, timeout=args.timeout))
            rmtree(copy)

            # 2b. loratv merge
            cmd = loratv + ["merge", "--base", base, "--adapter", adapter, "-o", merged, "--quiet"]
            if args.precision:
                cmd += ["--precision", args.precision]
            m = measure("loratv_merge" + tag, cmd, logdir, env=env, timeout=args.timeout)
            if m["rc"] == 0:
                m["output_gb"] = round(dir_bytes(merged) / 1e9, 3)
                m["output_files"] = sorted(p.name for p in merged.iterdir())
            runs["loratv_merge"].append(m)

            # 2c. transformers + PEFT
            peft_ok = False
            if not args.skip_peft:
                pr = measure("peft_reference" + tag,
                             [sys.executable, HERE / "peft_merge_reference.py", "--base", base, "--adapter", adapter, "-o", peft_out],
                             logdir, timeout=args.timeout)
                for line in pr["output_tail"].splitlines():
                    if line.startswith('{"peft_reference_phases_s"'):
                        pr["phases_s"] = json.loads(line)["peft_reference_phases_s"]
                if pr["rc"] == 0:
                    pr["output_gb"] = round(dir_bytes(peft_out) / 1e9, 3)
                    peft_ok = True
                runs["peft_reference"].append(pr)

            # 3a. correctness of the merge (untimed, once)
            if rep == 1 and not args.no_verify and peft_ok and m["rc"] == 0:
                log("verify: loratv merge vs PEFT merge")
                try:
                    results["verify"]["merge_vs_peft"] = compare_merges(merged, peft_out, base)
                    log(f"verify: {results['verify']['merge_vs_peft']}")
                except Exception as exc:  # report, never hide
                    results["verify"]["merge_vs_peft_error"] = repr(exc)

            # the fine-tuned checkpoint for extract: loratv's merge, or PEFT's when loratv's failed
            finetuned = merged
            if m["rc"] != 0 or not merged.exists():
                finetuned = peft_out if peft_ok else None
                note = ("loratv merge failed, so read-both and loratv extract used PEFT's merged checkpoint as FINETUNED."
                        if peft_ok else "no merged checkpoint (loratv merge failed and the PEFT reference failed or was skipped): extract not run.")
                if note not in results["notes"]:
                    results["notes"].append(note)
            if finetuned == merged:
                rmtree(peft_out)  # at most three checkpoints on disk at once
            if finetuned is None:
                continue

            # 2d. I/O floor of an extract
            runs["read_both"].append(measure("read_both" + tag, [sys.executable, HERE / "read_all.py", base, finetuned], logdir,
                                             timeout=args.timeout))
            # 2e. loratv extract
            e = measure("loratv_extract" + tag, loratv + ["extract", "--base", base, "--finetuned", finetuned, "-o", tv],
                        logdir, env=env, timeout=args.timeout)
            if e["rc"] == 0:
                e["output_gb"] = round(dir_bytes(tv) / 1e9, 3)
                e["output_files"] = sorted(str(p.relative_to(tv)) for p in tv.rglob("*") if p.is_file())
                if rep == 1 and not args.no_verify:
                    log("verify: task vector vs FINETUNED - BASE")
                    try:
                        results["verify"]["task_vector"] = check_task_vector(tv, base, finetuned)
                        log(f"verify: {results['verify']['task_vector']}")
                    except Exception as exc:
                        results["verify"]["task_vector_error"] = repr(exc)
            runs["loratv_extract"].append(e)
            if not args.keep or rep < args.repeat:
                rmtree(tv)
        for key, lst in runs.items():
            if lst:
                steps[key] = summarize(lst)
        if runs["peft_reference"] and "phases_s" in steps.get("peft_reference", {}):
            results["peft_phases"] = steps["peft_reference"]["phases_s"]
        results["loratv_package_at_end"] = package_fingerprint(loratv, env)
    finally:
        if not args.keep:
            for p in (copy, merged, peft_out, tv, base, adapter, wd / "loratv-src"):
                rmtree(p)
            (wd / "generated.json").unlink(missing_ok=True)

    drops = [r["caches_dropped"] for lst in results.get("runs", {}).values() for r in lst]
    if drops and all(drops):
        results["page_cache"] = "cold: `sync; echo 3 > /proc/sys/vm/drop_caches` succeeded before every timed step"
    elif any(drops):
        results["page_cache"] = "mixed: dropping the page cache succeeded before some steps only (see results.json)"
    else:
        results["page_cache"] = "warm: dropping the page cache was not permitted, so runs saw whatever the previous step left cached"
    if results.get("loratv_package_at_end", results["loratv_package_at_start"]) != results["loratv_package_at_start"]:
        results["notes"].append(
            f"the loratv sources changed during the run ({results['loratv_package_at_start']} -> {results['loratv_package_at_end']}): "
            "the figures may mix versions; rerun, or use --snapshot HEAD"
        )
    results["checks"] = evaluate(steps)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report = build_report(results)
    (wd / "results.json").write_text(json.dumps(results, indent=2))
    (wd / "results.md").write_text(report)
    print()
    print(report)
    log(f"wrote {wd / 'results.json'} and {wd / 'results.md'}")
    failed = [k for k, s in steps.items() if s["rc"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
