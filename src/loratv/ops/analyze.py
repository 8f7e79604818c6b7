"""`loratv analyze`: what the LoRA delta ΔW, the task vector T and their residual R = T − ΔW look like, tensor by tensor.

Per tensor (and pooled per module kind): distribution statistics of ΔW, T and R (moments.py), R in ulps of the stored
fine-tuned weight, norms, cosine; with `spectrum=True` the leading singular values of T (randomized, with the exact
residual, or exact SVD on request) and of ΔW (exact from its factors when the adapter is given), the numerical rank
of T above the rounding-noise floor φ = ‖ulp(F)‖_F (docs/math.md §8), stable and effective ranks, the energy in the
top r, and the principal angles between T's and ΔW's leading column and row spaces.

One tensor at a time: T is held whole in float64 (the SVD needs it), everything else goes by row blocks.
"""

import json
import math
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratv.adapters.adapter import bind, load_adapter, refuse_dora, refuse_non_lora
from loratv.common.devices import resolve_device
from loratv.common.dtypes import torch_dtype_of
from loratv.common.names import LAYER
from loratv.common.progress import progress_bar
from loratv.errors import BadInputError, LoratvError, param
from loratv.io.checkpoint import Checkpoint, resolve_path
from loratv.io.hub import available_locally
from loratv.io.outputs import atomic_output_dir, guarded_inputs
from loratv.numerics.lowrank import Factors
from loratv.numerics.moments import QUANTILES, Moments, quantiles, ulp_histogram
from loratv.numerics.precision import merge_error_bound, ulp, unit_roundoff
from loratv.numerics.spectrum import (
    effective_rank,
    exact_spectrum,
    lora_spectrum,
    principal_angles,
    randomized_spectrum,
    stable_rank,
)
from loratv.ops.compare import DELTAS_FILE, RESULTS_FILE, expected_delta
from loratv.ops.task_vector_input import StoredTaskVector, open_task_vector, read_difference
from loratv.report.analysis_plots import write_analysis_plots
from loratv.report.analysis_text import render_analysis_markdown
from loratv.report.records import write_record_files
from loratv.version import __version__

SCHEMA = "loratv.analysis"
SCHEMA_VERSION = 1
RESULTS_NAME = "analysis_results.json"
REPORT_NAME = "analysis_report.md"
SCATTER_PER_TENSOR = 400  # (ΔW, T) pairs sampled per tensor for the scatter plot
SAMPLE_PER_TENSOR = 4096  # values per tensor pooled into the per-kind quantiles and histograms
MIN_SPECTRUM = 16  # leading singular values computed at least
BLOCK_ELEMENTS = 1 << 22
QUANTITIES = ("delta", "task_vector", "residual")


class DeltaFromAdapter:
    """ΔW computed from the adapter's factors (exact spectra from the r×r core)."""

    def __init__(self, adapter_source, base: Checkpoint):
        self.adapter = load_adapter(adapter_source)
        refuse_non_lora(self.adapter, "analyze")
        refuse_dora(self.adapter, "analyze")
        self.base = base
        self.plan = bind(self.adapter, base)
        self.source = str(self.adapter.source)

    def names(self) -> list:
        """The base tensors the adapter touches, in base order.

        Returns:
            Their names.
        """
        return [n for n in self.base.names() if n in self.plan.touched()]

    def load(self, name: str):
        """(dense ΔW in float64, list of Factors or None when ΔW is not purely low rank, adapter rank, the
        ExpectedDelta that compare's rounding bound reads).

        Args:
            name: a touched base tensor.

        Returns:
            The 4-tuple above; the factors only for a 2-D tensor whose ΔW is LoRA parts alone (no bias, no
            replacement).
        """
        delta = expected_delta(self.adapter, self.plan, self.base, name)
        shape = tuple(self.base.entry(name).shape)
        dense = torch.zeros(shape, dtype=torch.float64)
        for part in delta.parts:
            dense += part.rows(0, shape[0]).view(shape)
        if delta.bias is not None:
            dense += delta.bias
        if delta.replacement is not None:  # a saved base value (PEFT's base_layer copy) under the LoRA parts
            dense += delta.replacement.to(torch.float64) - self.base.read(name).to(torch.float64)
        pure = (delta.parts and delta.bias is None and delta.replacement is None
                and all(isinstance(p, Factors) and len(shape) == 2 for p in delta.parts))
        return dense, (delta.parts if pure else None), delta.rank, delta


class DeltaFromFile:
    """`lora_deltas.safetensors` written by compare: ΔW per targeted tensor (float64 rounded once to float32)."""

    def __init__(self, source):
        path = resolve_path(source)
        file = path / DELTAS_FILE if path.is_dir() else path
        if not file.is_file():
            raise LoratvError(f"{path}: no {DELTAS_FILE} here; pass the file or folder written by `loratv compare`.")
        self.tensors = Checkpoint(file, label=f"LoRA deltas {source}")
        self.source = str(file)
        self.ranks = {}
        results = file.parent / RESULTS_FILE
        if results.is_file():  # compare's record beside it knows each tensor's adapter rank
            try:
                record = json.loads(results.read_text(encoding="utf-8"))
                self.ranks = {t["name"]: t.get("rank") for t in record.get("tensors", [])}
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, AttributeError):
                raise LoratvError(f"{results}: not a loratv comparison record.") from None

    @property
    def recorded_base(self) -> str | None:
        """The base that compare recorded in the file's metadata, or None."""
        metadata = next(iter(self.tensors.file_metadata.values()), None) or {}
        return metadata.get("base")

    def names(self) -> list:
        """The tensors the file stores ΔW for.

        Returns:
            Their names, in file order.
        """
        return self.tensors.names()

    def load(self, name: str):
        """ΔW of one tensor from the file, with the adapter rank compare recorded beside it.

        Args:
            name: a tensor the file stores.

        Returns:
            (dense ΔW in float64, None (no factors), the rank from comparison_results.json or None, None (no
            ExpectedDelta)).

        Raises:
            LoratvError: naming the file, when the tensor holds a NaN or Inf.
        """
        dense = self.tensors.read(name).to(torch.float64)
        if not torch.isfinite(dense).all():
            raise LoratvError(f"{self.source}: tensor '{name}' contains NaN or Inf.")
        return dense, None, self.ranks.get(name), None


@dataclass
class KindSummary:
    """Per module kind: exact moments of every element, pooled samples for quantiles, summed ulp histogram."""

    moments: dict = field(default_factory=lambda: {q: Moments() for q in QUANTITIES})
    samples: dict = field(default_factory=lambda: {q: [] for q in QUANTITIES})
    ulp_counts: dict | None = None  # {"edges", "counts"}, summed over the kind's tensors
    tensors: int = 0

    def record(self) -> dict:
        """The kind's entry in the analysis record.

        Returns:
            The tensor count; per quantity (delta, task_vector, residual) its moments and sampled quantiles; and the
            summed residual ulp histogram (None without a base).
        """
        out: dict[str, object] = {"tensors": self.tensors}
        for q in QUANTITIES:
            pooled = torch.cat(self.samples[q]) if self.samples[q] else torch.zeros(0, dtype=torch.float64)
            out[q] = {**self.moments[q].record(), "quantiles_sampled": quantiles(pooled)["values"]}
        out["residual_ulp_histogram"] = self.ulp_counts
        return out


def _picks(numel: int, count: int, name: str) -> torch.Tensor:
    """At most `count` deterministic element indices (seeded by the tensor name), without an index of every element."""
    if numel <= count:
        return torch.arange(numel)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randint(numel, (count,), generator=gen)


def _sample(values: torch.Tensor, count: int, name: str) -> torch.Tensor:
    flat = values.reshape(-1)
    return flat[_picks(flat.numel(), count, name)]


def _norm(x: torch.Tensor | None) -> float:
    return 0.0 if x is None else float(torch.linalg.vector_norm(x.reshape(-1)))


def _moments(x: torch.Tensor | None, numel: int) -> Moments:
    """Moments of every element, a chunk at a time (a whole-tensor pass would need several float64 copies)."""
    if x is None:
        return Moments(numel, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    m = Moments()
    for chunk in x.reshape(-1).split(BLOCK_ELEMENTS):
        m.add(chunk)
    return m


def _stats(x: torch.Tensor | None, m: Moments) -> dict:
    if x is None:
        q = {"exact": True, "values": {str(p): 0.0 for p in QUANTILES}}
    else:
        q = quantiles(x)
    return {**m.record(), "quantiles": q["values"], "quantiles_exact": q["exact"]}


def _floor_and_ulps(tv, base, name, t, r, ft_dtype, expected=None, targeted: bool = False):
    """The rounding-noise floor φ of the merge path and |R| in ulps of the stored weight (histogram, maximum).

    φ = ‖b‖_F, b the per-element bound of docs/math.md §6 (compare's certificate): with the adapter's factors for a
    targeted tensor, with no delta at all for an untargeted one (then b covers a cast of the base). For a targeted
    tensor known only as a dense ΔW the factors' evaluation error is unknown: φ is then one ulp of the stored weight
    per element, an estimate (`exact_floor` False). Ulps are those of the larger of the stored and the base weight, so
    that a near-cancellation (tiny F) does not inflate them. Row blocks throughout."""
    rows = t.shape[0] if t.dim() else 1
    as_rows = lambda x: x.reshape(rows, -1)  # noqa: E731
    flat_t, flat_r = as_rows(t), as_rows(r)
    step = max(1, BLOCK_ELEMENTS // max(1, flat_t.shape[1]))
    base_dtype = base.entry(name).torch_dtype
    t_rounding = tv.storage_rounding(name)
    exact_floor = expected is not None or not targeted
    phi_sq, counts, worst, edges = 0.0, None, 0.0, None
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = lambda x, n=stop - start: x.to(torch.float64).reshape(n, -1)  # noqa: E731
        w = block(base.read_rows(name, start, stop))
        if tv.live:
            f = block(tv.finetuned.read_rows(name, start, stop))
        else:
            f = (w + flat_t[start:stop]).to(ft_dtype).to(torch.float64)
        ulp_f = ulp(f, ft_dtype)
        spacing = torch.maximum(ulp_f, ulp(w, ft_dtype))
        in_ulps = flat_r[start:stop].abs() / spacing
        worst = max(worst, float(in_ulps.max()))
        hist = ulp_histogram(in_ulps)
        edges = hist["edges"]
        counts = hist["counts"] if counts is None else [a + b for a, b in zip(counts, hist["counts"])]
        if exact_floor:
            bound = _block_bound(expected, w, f, ulp_f, start, stop, base_dtype, ft_dtype)
            if t_rounding is not None:
                bound.add_(flat_t[start:stop].abs().mul_(unit_roundoff(t_rounding)))
        else:
            bound = ulp_f
        phi_sq += float((bound * bound).sum())
    return math.sqrt(phi_sq), exact_floor, {"edges": edges, "counts": counts}, worst


def _block_bound(expected, w, f, ulp_f, start, stop, base_dtype, ft_dtype):
    """Rows of compare's bound b for a targeted tensor (its factors known) or an untargeted one (expected None)."""
    if expected is None:
        return merge_error_bound(w, f, torch.zeros_like(w), additions=0, k=2, base_dtype=base_dtype,
                                 out_dtype=ft_dtype, ulp_m=ulp_f)
    g = torch.zeros_like(w)
    for part in expected.parts:
        g += part.abs_rows(start, stop).reshape(g.shape)
    if expected.bias is not None:
        g += expected.bias[start:stop].abs().reshape(g.shape)
    w_eff = w if expected.replacement is None else expected.replacement[start:stop].to(torch.float64).reshape(w.shape)
    return merge_error_bound(w_eff, f, g, additions=expected.additions, k=expected.k, base_dtype=base_dtype,
                             out_dtype=ft_dtype, ulp_m=ulp_f)


def _spectrum(t, delta, factors, rank, floor, *, exact: bool, device) -> dict:
    """Spectral record of T (and ΔW) for one 2-D tensor."""
    m, n = t.shape
    full = min(m, n)
    r = rank or 0
    k = min(full, max(MIN_SPECTRUM, 2 * r + 8))
    t_dev = t.to(device)
    spec_t = exact_spectrum(t_dev) if exact else randomized_spectrum(t_dev, k)
    if exact:
        k = full
    spec_d = None
    if factors:
        spec_d = lora_spectrum([_to(p, device) for p in factors])
    elif delta is not None and _norm(delta) > 0:
        spec_d = exact_spectrum(delta.to(device)) if exact else randomized_spectrum(delta.to(device), k)
    s_t = spec_t.s.cpu()
    above = int((s_t > floor).sum()) if floor is not None else None
    lower_bound = above is not None and above == s_t.numel() and s_t.numel() < full
    method = "exact" if exact else "randomized"
    record = {
        "method": method,
        "computed": int(s_t.numel()),
        "singular_values": [float(v) for v in s_t],
        "residual_norm": spec_t.residual,
        "noise_floor": floor,
        "numerical_rank": above,
        "numerical_rank_is_lower_bound": lower_bound,
        "stable_rank": stable_rank(s_t, spec_t.frobenius),
        "effective_rank_of_computed": effective_rank(s_t),
        "adapter_rank": rank,
        "energy_in_top_r": (float((s_t[:r] ** 2).sum()) / spec_t.frobenius**2) if r and spec_t.frobenius > 0 else None,
        "delta_singular_values": [float(v) for v in spec_d.s.cpu()[:k]] if spec_d is not None else None,
        "delta_spectrum": None if spec_d is None else ("exact from factors" if factors else method),
        "column_space_max_angle_deg": None,
        "row_space_max_angle_deg": None,
    }
    if spec_d is not None and r and s_t.numel() >= r and spec_d.s.numel() >= r:
        record["column_space_max_angle_deg"] = math.degrees(float(principal_angles(spec_t.u[:, :r], spec_d.u[:, :r]).max()))
        record["row_space_max_angle_deg"] = math.degrees(float(principal_angles(spec_t.v[:, :r], spec_d.v[:, :r]).max()))
    return record


def _to(part, device):
    return part.to(device)


def _open_inputs(base, adapter, lora_deltas, task_vector, finetuned):
    notes = []
    if (adapter is None) == (lora_deltas is None):
        raise BadInputError(f"analyze needs the LoRA side as one of {param('adapter')} (with {param('base')}) or "
                            f"{param('lora_deltas')}.")
    deltas_ckpt = DeltaFromFile(lora_deltas) if lora_deltas is not None else None
    if base is None:  # the base named by the inputs' own records, when it is still here (never a download)
        for recorded in (getattr(deltas_ckpt, "recorded_base", None), _tv_recorded_base(task_vector)):
            if available_locally(recorded):
                base = recorded
                notes.append(f"base taken from the inputs' records: {recorded}")
                break
    base_ckpt, tv = open_task_vector(base, task_vector=task_vector, finetuned=finetuned)
    if adapter is not None:
        if base_ckpt is None:
            raise LoratvError(f"{adapter}: computing ΔW from an adapter needs the base model ({param('base')}).")
        delta = DeltaFromAdapter(adapter, base_ckpt)
    else:
        delta = deltas_ckpt
    if base_ckpt is None:
        notes.append("no base model: residuals in ulps and the noise floor need it (pass --base).")
    return base_ckpt, tv, delta, notes


def _tv_recorded_base(task_vector):
    if task_vector is None:
        return None

    try:
        return StoredTaskVector(task_vector).recorded_base
    except LoratvError:
        return None


def analyze(*, base=None, adapter=None, lora_deltas=None, task_vector=None, finetuned=None, spectrum: bool = False,
            exact_svd: bool = False, device: str = "cpu", progress: bool = False, command: str | None = None) -> dict:
    """The analysis record (schema loratv.analysis, docs/analysis-results.md); plots and reports render from it.

    ΔW comes from `adapter` or `lora_deltas` (exactly one), T from `task_vector` or `finetuned` (exactly one).

    Args:
        base: the base model; needed with `adapter` or `finetuned`, and for residuals in ulps and the noise floor.
            When None, the base recorded by the lora_deltas or task-vector file is used if it is available locally.
        adapter: a LoRA adapter (PEFT folder or single file; not DoRA, not another tuner), ΔW from its factors.
        lora_deltas: lora_deltas.safetensors written by compare (or its folder), ΔW read as stored.
        task_vector: a folder or file written by `loratv extract`.
        finetuned: a fine-tuned model; T = fine-tuned − base is computed.
        spectrum: also compute singular values, numerical rank and principal angles per 2-D tensor with T ≠ 0.
        exact_svd: with `spectrum`, a full SVD instead of the randomized one.
        device: where the spectra are computed ("cpu", "cuda", ...).
        progress: show a progress bar.
        command: the command line, recorded in the record.

    Returns:
        The record: inputs, notes, summary, per-kind and per-layer tables, scatter samples and one row per tensor
        where T or ΔW is nonzero.

    Raises:
        LoratvError: not exactly one of `adapter` and `lora_deltas` (BadInputError), or of `task_vector` and
            `finetuned`; `adapter` or `finetuned` without a base; an input holding a NaN or Inf.
    """
    dev = resolve_device(device)
    base_ckpt, tv, delta_source, notes = _open_inputs(base, adapter, lora_deltas, task_vector, finetuned)
    delta_names = set(delta_source.names())
    if base_ckpt is not None:
        order = base_ckpt.names()
    else:
        order = list(dict.fromkeys(list(getattr(tv, "records", None) or tv.tensors.names()) + sorted(delta_names)))
    kinds: dict[str, KindSummary] = defaultdict(KindSummary)
    tensors, scatter = [], []
    with progress_bar(len(order), "analyze", enabled=progress) as bar:
        for name in order:
            bar.update(1)
            t = read_difference(tv, base_ckpt, name)
            targeted = name in delta_names
            d, factors, rank, expected = delta_source.load(name) if targeted else (None, None, None, None)
            if t is None and (d is None or _norm(d) == 0):
                continue
            source = t if t is not None else d
            assert source is not None  # neither: skipped just above
            shape = tuple(source.shape)
            numel = math.prod(shape)
            t_full = t if t is not None else torch.zeros(shape, dtype=torch.float64)
            r = t_full if d is None else t_full - d
            layer = LAYER.search(name)
            kind = name[layer.end():] if layer else name
            row = {
                "name": name, "shape": list(shape), "parameters": numel,
                "layer": int(layer.group(1)) if layer else None, "kind": kind,
                "category": "shared" if (t is not None and d is not None) else ("adapter-only" if t is None else "task-vector-only"),
                "adapter_rank": rank,
                "delta_norm": _norm(d), "task_vector_norm": _norm(t), "residual_norm": _norm(r),
            }
            dot = float(torch.dot(t_full.reshape(-1), d.reshape(-1))) if d is not None else 0.0
            row["cosine"] = (max(-1.0, min(1.0, dot / (row["delta_norm"] * row["task_vector_norm"])))
                             if row["delta_norm"] > 0 and row["task_vector_norm"] > 0 else None)
            row["relative_residual"] = row["residual_norm"] / row["task_vector_norm"] if row["task_vector_norm"] else None
            summary = kinds[kind]
            summary.tensors += 1
            row["stats"] = {}
            for q, x in (("delta", d), ("task_vector", t), ("residual", r)):
                moments = _moments(x, numel)
                row["stats"][q] = _stats(x, moments)
                summary.moments[q].merge(moments)
                summary.samples[q].append(_sample(x, SAMPLE_PER_TENSOR, name + q) if x is not None
                                          else torch.zeros(min(numel, SAMPLE_PER_TENSOR), dtype=torch.float64))
            floor = None
            row["residual_ulp_histogram"] = row["max_residual_ulps"] = row["ft_dtype"] = row["noise_floor"] = None
            row["noise_floor_is_bound"] = None
            if base_ckpt is not None:
                ft_code = tv.finetuned_dtype(name) or base_ckpt.entry(name).dtype
                row["ft_dtype"] = ft_code
                floor, exact_floor, hist, worst = _floor_and_ulps(tv, base_ckpt, name, t_full, r, torch_dtype_of(ft_code),
                                                                  expected, targeted)
                row["residual_ulp_histogram"], row["max_residual_ulps"], row["noise_floor"] = hist, worst, floor
                row["noise_floor_is_bound"] = exact_floor
                summary.ulp_counts = hist if summary.ulp_counts is None else {
                    "edges": hist["edges"], "counts": [a + b for a, b in zip(summary.ulp_counts["counts"], hist["counts"])]}
            picks = _picks(numel, SCATTER_PER_TENSOR, name)
            flat_d = d.reshape(-1)[picks] if d is not None else torch.zeros(picks.numel(), dtype=torch.float64)
            scatter.append({"kind": kind, "delta": flat_d.tolist(), "task_vector": t_full.reshape(-1)[picks].tolist()})
            if spectrum and len(shape) == 2 and row["task_vector_norm"] > 0:
                row["spectrum"] = _spectrum(t_full, d, factors, rank, floor, exact=exact_svd, device=dev)
            tensors.append(row)
    return _record(base_ckpt, tv, delta_source, tensors, kinds, scatter, notes, spectrum, exact_svd, command)


def _record(base, tv, delta_source, tensors, kinds, scatter, notes, spectrum, exact_svd, command) -> dict:
    t_sq = sum(t["task_vector_norm"] ** 2 for t in tensors)
    d_sq = sum(t["delta_norm"] ** 2 for t in tensors)
    r_sq = sum(t["residual_norm"] ** 2 for t in tensors)
    spectra = [t["spectrum"] for t in tensors if t.get("spectrum")]
    with_rank = [s for s in spectra if s["adapter_rank"] and s["numerical_rank"] is not None]
    hist = None
    for k in kinds.values():
        if k.ulp_counts:
            hist = k.ulp_counts if hist is None else {
                "edges": hist["edges"], "counts": [a + b for a, b in zip(hist["counts"], k.ulp_counts["counts"])]}
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "command": command,
        "inputs": {"base": str(base.source) if base is not None else None, "lora_delta": delta_source.source,
                   "task_vector": tv.source, "task_vector_kind": "fine-tuned minus base (computed)" if tv.live else "stored"},
        "notes": notes,
        "spectrum": spectrum,
        "svd": ("exact" if exact_svd else "randomized") if spectrum else None,
        "summary": {
            "tensors": len(tensors),
            "shared": sum(t["category"] == "shared" for t in tensors),
            "adapter_only": sum(t["category"] == "adapter-only" for t in tensors),
            "task_vector_only": sum(t["category"] == "task-vector-only" for t in tensors),
            "task_vector_norm": math.sqrt(t_sq),
            "delta_norm": math.sqrt(d_sq),
            "residual_norm": math.sqrt(r_sq),
            "relative_residual": math.sqrt(r_sq / t_sq) if t_sq > 0 else None,
            "max_residual_ulps": max((t["max_residual_ulps"] for t in tensors if t["max_residual_ulps"] is not None),
                                     default=None),
            "residual_ulp_histogram": hist,
            "spectra": len(spectra),
            "numerical_rank_equals_adapter_rank": sum(s["numerical_rank"] == s["adapter_rank"] for s in with_rank),
            "with_adapter_rank": len(with_rank),
            "numerical_rank_zero": sum(s["numerical_rank"] == 0 for s in spectra),
        },
        "kinds": {kind: k.record() for kind, k in kinds.items()},
        "layers": _layer_table(tensors),
        "scatter": scatter,
        "tensors": tensors,
    }


def _layer_table(tensors) -> list:
    """Per layer: summed norms, relative residual, and the worst cosine of its tensors."""
    rows: defaultdict[int | None, dict] = defaultdict(lambda: {"tensors": 0, "t_sq": 0.0, "d_sq": 0.0, "r_sq": 0.0,
                                                            "min_cosine": None})
    for t in tensors:
        row = rows[t["layer"]]
        row["tensors"] += 1
        row["t_sq"] += t["task_vector_norm"] ** 2
        row["d_sq"] += t["delta_norm"] ** 2
        row["r_sq"] += t["residual_norm"] ** 2
        if t["cosine"] is not None:
            row["min_cosine"] = t["cosine"] if row["min_cosine"] is None else min(row["min_cosine"], t["cosine"])
    out = []
    for layer in sorted(rows, key=lambda x: (x is None, x if x is not None else 0)):
        r = rows[layer]
        out.append({"layer": layer, "tensors": r["tensors"], "task_vector_norm": math.sqrt(r["t_sq"]),
                    "delta_norm": math.sqrt(r["d_sq"]), "residual_norm": math.sqrt(r["r_sq"]),
                    "relative_residual": math.sqrt(r["r_sq"] / r["t_sq"]) if r["t_sq"] > 0 else None,
                    "min_cosine": r["min_cosine"]})
    return out


def run_analysis(out, *, plots: bool = True, force: bool = False, **kwargs) -> dict:
    """analyze() written to the output folder, which appears only once complete.

    Args:
        out: the output folder (written atomically).
        plots: also write the PNGs and report.html.
        force: replace an existing output folder.
        **kwargs: analyze's arguments.

    Returns:
        The analysis record.
    """

    inputs = [kwargs.get(k) for k in ("base", "adapter", "lora_deltas", "task_vector", "finetuned")]
    with atomic_output_dir(out, guarded_inputs(inputs), force=force) as tmp:
        record = analyze(**kwargs)
        write_analysis_files(record, tmp, plots=plots)
    return record


def write_analysis_files(record: dict, folder: Path, *, plots: bool = True) -> list:
    """analysis_results.json, analysis_report.md and (unless plots=False) the analysis PNGs and report.html.

    Args:
        record: the analysis record.
        folder: an existing folder to write into.
        plots: False skips the PNGs and the page.

    Returns:
        The paths written.
    """
    return write_record_files(record, folder, RESULTS_NAME, REPORT_NAME, render_analysis_markdown,
                              write_analysis_plots, plots)
