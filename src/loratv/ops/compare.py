"""Compare a LoRA adapter with a task vector, tensor by tensor, and certify their equivalence.

Every base tensor gets one category (shared, adapter-only, cast-artifact, unexplained, unchanged). For a targeted
tensor, T − ΔW is measured against the per-element rounding bound of docs/math.md §6; inner products and norms of
ΔW come from the LoRA factors (loratv/lowrank.py). Streaming: one tensor chunk at a time, read one chunk ahead.
The result is a plain record (schema in docs/comparison-results.md) that reports and plots are rendered from.
"""

import math
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratv.adapters.adapter import TOKEN_ROWS, bind, load_adapter, token_replacement
from loratv.adapters.kinds.lora_variants.dora import DoraTerms
from loratv.adapters.kinds.peft_backed import TOLERANCE_FACTOR
from loratv.adapters.layouts import piece_factors
from loratv.adapters.tuner_bounds import TunerTerms, tuner_terms
from loratv.adapters.tuners import TunerModule
from loratv.common import dtypes
from loratv.common.devices import resolve_device
from loratv.common.names import LAYER
from loratv.common.progress import progress_bar
from loratv.common.streaming import row_chunks
from loratv.errors import BadInputError, LoratvError, param
from loratv.exec.executor import ExecutorSpec, byte_groups, parse_executor, run_tasks
from loratv.exec.parts import PARTS_FOLDER, PartWriter
from loratv.io import storage
from loratv.io.checkpoint import Checkpoint
from loratv.io.outputs import output_path, remove_task_files, task_file, task_folder
from loratv.io.safetensors_format import SafetensorsWriter, tensor_to_bytes
from loratv.io.state_dict import open_checkpoint, source_name
from loratv.io.writer import finished
from loratv.numerics.lowrank import ExpertFactors, Factors, InnerProduct, norm_sq, two_sum
from loratv.numerics.precision import FLOAT_DTYPES, compute_dtype_for, gamma, merge_error_bound, ulp, unit_roundoff
from loratv.ops.task_vector_input import LiveTaskVector, StoredTaskVector
from loratv.report.plots import write_comparison_plots
from loratv.report.records import write_record_files
from loratv.report.text import render_comparison_text
from loratv.version import __version__

SCHEMA = "loratv.comparison"
SCHEMA_VERSION = 1
CATEGORIES = ("shared", "adapter-only", "tv-only", "cast-artifact", "unexplained", "unchanged")
CERTIFIED = "EQUIVALENT (certified)"
WITHIN_TOLERANCE = "EQUIVALENT within tolerance"
NOT_EQUIVALENT = "NOT EQUIVALENT"
PERFECT_MATCH = 0.9999
DEFAULT_TOLERANCE = 1e-5
RESULTS_FILE = "comparison_results.json"
REPORT_FILE = "detailed_comparison_report.txt"
DELTAS_FILE = "lora_deltas.safetensors"
READ_BYTES = 64 << 20  # per input and read
WORKERS = 2  # tensors compared at once (one per core)
TASK_BYTES = 2 << 30  # with an executor: input bytes per task (each task also opens every input once)
BLOCK_ELEMENTS = 1 << 17  # float64 work arrays of 1 MB: the fastest size measured (docs/benchmarks.md)
# |T − ΔW| is evaluated in float64 (one subtraction, relative error ≤ 2^-53); the margin covers it
DIFF_MARGIN = 1 + 2 * unit_roundoff(torch.float64)


@dataclass
class ExpectedDelta:
    """What the adapter adds to one base tensor: LoRA parts, a replacement value, a scaled lora_B.bias."""

    parts: list  # Factors
    modules: list  # module names
    replacement: torch.Tensor | None = None  # the adapter's tensor cast to the base dtype (what PEFT loads)
    bias: torch.Tensor | None = None  # s·lora_B.bias in float64
    dora: DoraTerms | None = None  # DoRA: M = f ⊙ (W + ΔW), not additive
    tuner: TunerTerms | None = None  # LoHa, LoKr, AdaLoRA, VeRA, IA³, OFT: computed whole (tuner_bounds.py)

    @property
    def additions(self) -> int:
        """How many deltas are added one after another: one per LoRA part, plus one for a lora_B.bias."""
        return len(self.parts) + (self.bias is not None)

    @property
    def rank(self) -> int | None:
        """The adapter rank on this tensor: the tuner module's r, else the summed ranks of the parts (None if 0)."""
        if self.tuner is not None:
            return self.tuner.module.r  # AdaLoRA's kept rank, VeRA's shared r, OFT's blocks; None for IA³
        return sum(p.rank for p in self.parts) or None

    @property
    def k(self) -> int:
        """The k of the bound's γ_k: the largest part rank + 2 (the dot product, the multiply by s, one more)."""
        return max([p.rank for p in self.parts] + [0]) + 2

    def to(self, device) -> "ExpectedDelta":
        """A copy with every tensor (parts, replacement, bias, DoRA and tuner terms) moved to `device`.

        Args:
            device: the torch device (or its name).

        Returns:
            The moved ExpectedDelta (module names shared with this one).
        """
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        parts = [p.to(device) for p in self.parts]
        dora = None if self.dora is None else self.dora.to(device)
        tuner = None if self.tuner is None else self.tuner.to(device)
        return ExpectedDelta(parts, self.modules, move(self.replacement), move(self.bias), dora, tuner)


@dataclass
class TensorComparison:
    name: str
    shape: tuple
    base_dtype: str
    finetuned_dtype: str | None
    targeted: bool
    modules: list = field(default_factory=list)
    rank: int | None = None
    dot: float = 0.0
    t_sumsq: float = 0.0
    d_sumsq: float = 0.0
    diff_sumsq: float = 0.0
    w_sumsq: float = 0.0
    max_abs_t: float = 0.0
    max_abs_diff: float = 0.0
    certificate_ratio: float | None = None
    tolerance_ratio: float | None = None  # tensors with no derived bound (PEFT-backed tuners): max |T − ΔW| / tolerance
    reference_error: float | None = None  # their E: the largest error of PEFT's own merge against the reference
    worst_element: list | None = None
    worst_element_diff: float | None = None  # |T − ΔW| at worst_element
    max_error_ulps: float | None = None
    changed_elements: int = 0
    vanished_elements: int = 0
    cast_dtype: str | None = None
    cast_possible: bool = True
    w_read: bool = False
    category: str = "unchanged"

    @property
    def parameters(self) -> int:
        """The tensor's element count."""
        return math.prod(self.shape)

    @property
    def changed(self) -> bool:
        """Whether the task vector is nonzero anywhere in this tensor."""
        return self.changed_elements > 0

    @property
    def cosine(self) -> float | None:
        """cos(T, ΔW), clamped to [−1, 1]; None when either is zero."""
        if self.t_sumsq <= 0 or self.d_sumsq <= 0:
            return None
        # Cauchy–Schwarz: |cos| ≤ 1; the factored dot and norms round independently, so clamp the last ulp
        return max(-1.0, min(1.0, self.dot / math.sqrt(self.t_sumsq * self.d_sumsq)))

    def record(self) -> dict:
        """The tensor's entry in the comparison record (docs/comparison-results.md).

        Returns:
            Name, shape, layer and kind, category, dtypes, modules and rank, cosine, norms, the largest differences,
            the certificate ratio with its worst element, and the changed, vanished and cast facts.
        """
        layer = LAYER.search(self.name)
        t_norm = math.sqrt(self.t_sumsq)
        return {
            "name": self.name,
            "shape": list(self.shape),
            "parameters": self.parameters,
            "layer": int(layer.group(1)) if layer else None,
            "kind": self.name[layer.end():] if layer else self.name,
            "category": self.category,
            "targeted": self.targeted,
            "changed": self.changed,
            "base_dtype": self.base_dtype,
            "finetuned_dtype": self.finetuned_dtype,
            "adapter_modules": list(self.modules),
            "rank": self.rank,
            "cosine": self.cosine,
            "dot": self.dot,
            "task_vector_norm": t_norm,
            "lora_delta_norm": math.sqrt(self.d_sumsq),
            "base_norm": math.sqrt(self.w_sumsq) if self.w_read or self.targeted else None,
            "max_abs_task_vector": self.max_abs_t,
            "max_abs_diff": self.max_abs_diff,
            "relative_frobenius_error": math.sqrt(self.diff_sumsq) / t_norm if self.targeted and t_norm > 0 else None,
            "certificate_ratio": self.certificate_ratio,
            "tolerance_ratio": self.tolerance_ratio,
            "reference_error": self.reference_error,
            "worst_element": self.worst_element,
            "worst_element_diff": self.worst_element_diff,
            "max_error_ulps": self.max_error_ulps,
            "changed_elements": self.changed_elements,
            "vanished_elements": self.vanished_elements if self.targeted else None,
            "cast_dtype": self.cast_dtype,
        }


def expected_delta(adapter, plan, base: Checkpoint, name: str, compute: torch.dtype = torch.float32) -> ExpectedDelta:
    """The adapter's contribution to base tensor `name`, factors in float64 and in its stored orientation (for DoRA
    also the per-feature factors, from the whole tensor, for a merge computed in `compute`).

    Args:
        adapter: the loaded adapter.
        plan: its MergePlan, bound to `base` (adapter.bind).
        base: the base model.
        name: the base tensor.
        compute: the merge's compute dtype (used for DoRA's terms only).

    Returns:
        The LoRA parts (one Factors or ExpertFactors per module), module names, and the replacement, scaled bias,
        DoRA or tuner terms where the adapter has them.

    Raises:
        LoratvError: a DoRA module lands on the tensor with another module or a lora_B.bias, or a tuner (LoHa, LoKr,
            ...) module with another update: their combined merge is not defined.
    """
    modules = plan.deltas.get(name, [])
    if any(isinstance(m, TunerModule) for m in modules):
        return _tuner_delta(adapter, plan, base, name, modules)
    parts = [
        piece_factors(adapter, m) if getattr(m, "piece", None) is not None else  # an on-disk piece of a fused parameter
        ExpertFactors.from_lora(adapter.factor(m.a_key), adapter.factor(m.b_key), m.r, m.scale, m.kind == "experts_t")
        if m.kind in ("experts", "experts_t") else
        Factors.from_lora(adapter.factor(m.a_key).flatten(1), adapter.factor(m.b_key).flatten(1), m.scale,
                          transposed=m.kind not in ("linear", "conv"))  # ConvNd: (out, in·k…) rows
        for m in modules
    ]
    delta = ExpectedDelta(parts, [m.module for m in modules])
    if plan.replacements.get(name) == TOKEN_ROWS:
        delta.replacement = token_replacement(adapter, base, name)
    elif name in plan.replacements:
        delta.replacement = adapter.factor(plan.replacements[name]).to(base.entry(name).torch_dtype)
    bias_module = plan.bias_additions.get(name)
    if bias_module is not None:
        bias = adapter.factor(bias_module.bias_key).to(torch.float64) * bias_module.scale
        delta.bias = bias
        delta.modules.append(bias_module.module + " (lora_bias)")
    dora = [m for m in modules if not m.additive]  # a variant that is not W + ΔW (DoRA)
    if dora:
        if len(modules) > 1 or delta.bias is not None:
            raise LoratvError(f"{adapter.tensors.path}: '{name}' carries a DoRA module with other updates; their "
                              "combined merge is not defined.")
        part, shape = parts[0], base.entry(name).shape
        # a saved base layer (PEFT saves targeted embeddings) is what the DoRA merge starts from
        w = (delta.replacement if delta.replacement is not None else base.read(name)).to(torch.float64)
        # DoRA's f* and δf (adapters/kinds/lora_variants/dora.py)
        delta.dora = dora[0].merge_variant.bound_terms(adapter, dora[0], w, part, shape, compute)
        delta.modules[0] += " (DoRA)"
    return delta


def _tuner_delta(adapter, plan, base, name, modules) -> ExpectedDelta:
    if len(modules) > 1 or name in plan.replacements or name in plan.bias_additions:
        raise LoratvError(f"{adapter.tensors.path}: '{name}' carries a {adapter.settings.tuner_name} module and another "
                          "update; their combined merge is not defined.")
    module = modules[0]
    label = f"{module.module} ({adapter.settings.tuner_name}{', bias' if module.is_bias else ''})"
    return ExpectedDelta([], [label], tuner=tuner_terms(adapter, module, tuple(base.entry(name).shape)))


class _TargetedAccumulator:
    """Per-element comparison of T with ΔW for one targeted tensor, fed row block by row block."""

    def __init__(self, stats: TensorComparison, delta: ExpectedDelta, base_dtype, out_dtype, t_rounding, device):
        self.stats, self.delta = stats, delta
        self.base_dtype, self.out_dtype, self.t_rounding = base_dtype, out_dtype, t_rounding
        self.device = device
        factored = delta.dora is None and delta.tuner is None and all(isinstance(p, Factors) for p in delta.parts)
        self.inner = [InnerProduct(p) for p in delta.parts] if factored else []
        self.dense_only = not self.inner or delta.replacement is not None or delta.bias is not None
        # a float64 merge rounds as finely as a float64 evaluation of ΔW: evaluate it twice as precisely then
        self.compensated = compute_dtype_for(base_dtype, out_dtype) == torch.float64
        self.delta_dtype = torch.float64 if base_dtype == torch.float64 else torch.float32
        self.ratio = 0.0
        self.ulps = 0.0
        self.worst: int | None = None
        self.worst_diff: float | None = None
        self.certified = delta.tuner is None or delta.tuner.certified

    def add_rows(self, w_rows: torch.Tensor, raw_rows: torch.Tensor | None, start: int, stop: int, tv) -> torch.Tensor:
        """Rows [start, stop) of the base and of the task vector input as read (None: T = 0); returns the rows of
        ΔW in the dtype lora_deltas.safetensors stores."""
        w64 = w_rows.to(device=self.device, dtype=torch.float64)
        raw_rows = None if raw_rows is None else raw_rows.to(self.device)
        # a fine-tuned model read as such gives M exactly, whatever rounding the float64 T = F − W carries (a copy:
        # the difference may be taken in place in a float64 input)
        m_exact = (raw_rows.to(torch.float64, copy=True).view(w64.shape)
                   if tv.live and raw_rows is not None else None)
        t = None if raw_rows is None else tv.difference(raw_rows, w64, w64)
        nonzero = 0 if t is None else _measure_t(self.stats, t, tv)
        return self.add(w64, t, start, stop, nonzero, m_exact).to(self.delta_dtype).cpu()

    def add(self, w: torch.Tensor, t: torch.Tensor | None, start: int, stop: int, nonzero: int,
            m_exact: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of W and T (None: T = 0) as float64 on the device, with T's nonzero count (and the
        stored fine-tuned rows when known); returns the rows of ΔW."""
        s, delta, out_dtype = self.stats, self.delta, self.out_dtype
        s.w_sumsq += float(torch.dot(w.reshape(-1), w.reshape(-1)))
        w_eff = w if delta.replacement is None else _rows(delta.replacement, start, stop).to(torch.float64)
        dora_bound = tuner_bound = low = None
        if delta.tuner is not None:
            d, evaluation_error, tuner_bound = delta.tuner.delta_and_bound(w, start, stop, self.base_dtype, out_dtype)
        elif delta.dora is not None:
            part = delta.parts[0]
            d, evaluation_error, dora_bound = delta.dora.delta_and_bound(
                w_eff, w, part.rows(start, stop).view(w.shape), part.abs_rows(start, stop).view(w.shape), start, stop)
        else:
            d, low, g, ge, extra = self._delta_rows(w, w_eff, start, stop)
            evaluation_error = g * ge if extra is None else extra.add_(g, alpha=ge)
        if t is not None:
            for inner in self.inner:
                inner.add_rows(t.view(stop - start, -1), start, stop)
        else:
            t = torch.zeros_like(w)
        # T − (high + low) where ΔW is a pair: (T − high) is small, so both subtractions round at its scale
        diff = torch.sub(t, d).abs_() if low is None else torch.sub(t, d).sub_(low).abs_()
        m = w + t  # the fine-tuned value: exact when T is stored exactly
        if self.t_rounding is None:
            t_error = None
            ulp_m = ulp(m, out_dtype)
        elif m_exact is not None:
            m = m_exact
            t_error = t.abs().mul_(unit_roundoff(self.t_rounding))  # T = fl64(F − W): one rounding at most
            ulp_m = ulp(m, out_dtype)
        else:
            # the stored T was rounded: |T − T_exact| ≤ ½·ulp(T) ≤ u·|T| + a subnormal spacing (sound, cheaper than
            # ulp(T)); M itself is then only known to that accuracy, so its ulp is taken at the low end
            u_t = unit_roundoff(self.t_rounding)
            t_error = t.abs().mul_(u_t).add_(torch.finfo(self.t_rounding).smallest_normal * 2 * u_t)
            ulp_m = _stored_ulp(m, t_error, out_dtype)
        if tuner_bound is not None:
            bound = tuner_bound(m, ulp_m)
        elif dora_bound is not None:
            bound = dora_bound(ulp_m)
        else:
            bound = merge_error_bound(w_eff, m, g, additions=delta.additions, k=delta.k, base_dtype=self.base_dtype,
                                      out_dtype=out_dtype, ulp_m=ulp_m)
        if t_error is not None:
            bound.add_(t_error)
        ratio = torch.add(evaluation_error, diff, alpha=DIFF_MARGIN).div_(bound).reshape(-1)
        block_max = float(ratio.max())
        if block_max > self.ratio or self.worst is None:  # argmax is slow: only where the maximum moves
            at = int(torch.argmax(ratio))
            self.ratio, self.worst = max(self.ratio, block_max), start * _row_length(s.shape) + at
            self.worst_diff = float(diff.reshape(-1)[at])
        # in ulps of the weight being updated (near cancellation, ulps of a tiny M would say nothing)
        self.ulps = max(self.ulps, float(diff.div(torch.maximum(ulp_m, ulp(w_eff, out_dtype), out=ulp_m)).max()))
        flat_diff = diff.reshape(-1)
        s.max_abs_diff = max(s.max_abs_diff, float(flat_diff.max()))
        s.diff_sumsq += float(torch.dot(flat_diff, flat_diff))
        # an update vanished where the stored weight is the base as that dtype stores it, although ΔW ≠ 0
        if out_dtype == self.base_dtype and delta.replacement is None:
            if nonzero < t.numel():  # only where T = 0
                s.vanished_elements += int((t == 0).logical_and_(d != 0).sum())
        else:
            s.vanished_elements += int((m == w_eff.to(out_dtype).to(torch.float64)).logical_and_(d != 0).sum())
        if self.dense_only:
            s.dot += float(torch.dot(t.reshape(-1), d.reshape(-1)))
            s.d_sumsq += float(torch.dot(d.reshape(-1), d.reshape(-1)))
        return d

    def _delta_rows(self, w, w_eff, start, stop):
        """Rows of ΔW (float64; with its low part where ΔW is evaluated as a pair, for float64 merges, else None)
        and of G = Σ|s|·|L|@|R| (+|s·bias|), and the bound ge·G + extra (extra may be None) on the error of this
        float64 evaluation of ΔW. `w` is the base rows, `w_eff` the value the deltas are added
        to (the replacement, if the adapter saved one), both float64."""
        delta, u = self.delta, unit_roundoff(torch.float64)
        shape = (stop - start, *self.stats.shape[1:]) if self.stats.shape else ()
        d = g = extra = low = None
        ge = 0.0
        for part in delta.parts:
            part_g = part.abs_rows(start, stop).view(shape)
            if self.compensated and isinstance(part, Factors):
                # ΔW as high + low (twice float64's precision): T − ΔW is then measured against the pair
                part_d, part_low, scaled_error = (x.view(shape) for x in part.rows_compensated_pair(start, stop))
                part_extra = part_low.abs().add_(scaled_error.abs()).mul_(2 * u)
                extra = part_extra if extra is None else extra.add_(part_extra)
                low = part_low if low is None else low.add_(part_low)
                ge = max(ge, gamma(part.rank, torch.float64) ** 2)
            else:
                part_d = part.rows(start, stop).view(shape)
                ge = max(ge, gamma(part.rank + 2, torch.float64))
            if d is None:
                d = part_d
            elif low is not None:
                d, sum_error = two_sum(d, part_d)
                low.add_(sum_error)
            else:
                d = d.add_(part_d)
            g = part_g if g is None else g.add_(part_g)
        if d is None:
            d = torch.zeros(shape, dtype=torch.float64, device=self.device)
            g = torch.zeros_like(d)
        if delta.replacement is not None:
            d.add_(w_eff - w)  # exact: both ≤ 24-bit values
        if delta.bias is not None:
            bias = _rows(delta.bias, start, stop)
            magnitude = bias.abs()
            if low is not None:
                d, sum_error = two_sum(d, bias)
                low.add_(sum_error)
            else:
                d.add_(bias)
            g.add_(magnitude)
            extra = magnitude * (2 * u) if extra is None else extra.add_(magnitude, alpha=2 * u)
        if low is not None:  # each addition into low rounds (≤ u·|low| each), and so does T − high − low once
            extra.add_(low.abs(), alpha=(2 * len(delta.parts) + 3) * u)
        return d, low, g, ge, extra

    def finish(self) -> None:
        s = self.stats
        if not self.dense_only:
            s.dot = sum(i.value() for i in self.inner)
            s.d_sumsq = norm_sq(self.delta.parts)
        if self.certified:
            s.certificate_ratio = self.ratio
        elif self.delta.tuner is not None:  # held to a stated tolerance, not a derived bound (PeftTerms)
            s.tolerance_ratio = self.ratio
            s.reference_error = self.delta.tuner.reference_error
        s.max_error_ulps = self.ulps
        s.worst_element = list(_unravel(self.worst, s.shape)) if self.worst is not None else None
        s.worst_element_diff = self.worst_diff


def _stored_ulp(m: torch.Tensor, t_error: torch.Tensor, out_dtype) -> torch.Tensor:
    """ulp_d of the stored M, known only to lie within t_error of m. Where that interval is narrower than the spacing
    at its low end it holds one float of d at most, so M is m rounded to d when that lies inside (a power of two then
    keeps its own ulp); elsewhere the spacing at the low end, which no M in the interval is below."""
    low = ulp(m.abs().sub_(t_error).clamp_(min=0), out_dtype)
    nearest = m.to(out_dtype).to(torch.float64)
    known = ((nearest - m).abs() <= t_error) & (2 * t_error < low)
    return torch.where(known, ulp(nearest, out_dtype), low)


def _rows(tensor, start, stop):
    return tensor if tensor.dim() == 0 else tensor[start:stop]


def _row_length(shape) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def _unravel(flat: int, shape) -> tuple:
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))


def _blocks(start: int, stop: int, shape):
    """Row sub-ranges of [start, stop) holding about BLOCK_ELEMENTS elements each."""
    step = max(1, BLOCK_ELEMENTS // max(1, _row_length(shape)))
    for i in range(start, stop, step):
        yield i, min(stop, i + step)


def _float_dtype(code: str | None) -> torch.dtype | None:
    if code is None or not dtypes.is_float(code):
        return None
    dtype = dtypes.torch_dtype_of(code)
    return dtype if dtype in FLOAT_DTYPES else None


def compare(
    base_source,
    adapter_source,
    *,
    task_vector=None,
    finetuned=None,
    tolerance: float = DEFAULT_TOLERANCE,
    device: str = "cpu",
    deltas_path=None,
    progress: bool = False,
    command: str | None = None,
    executor: "str | ExecutorSpec" = "local",
    task_bytes: int = TASK_BYTES,
) -> dict:
    """Compare and return the record (docs/comparison-results.md); write ΔW to `deltas_path` when given.

    Args:
        base_source: the base model (path, hub id or state dict).
        adapter_source: the adapter (PEFT folder or single LoRA file), bound to the base.
        task_vector: a folder or file written by `loratv extract` (exactly one of this and `finetuned`).
        finetuned: a fine-tuned model; T = fine-tuned − base is computed while streaming.
        tolerance: the largest |T − ΔW| (on targeted and unexplained tensors) still "EQUIVALENT within tolerance"
            when the certificate fails; finite and ≥ 0.
        device: where ΔW and the bounds are computed ("cpu", "cuda", ...).
        deltas_path: a file to write ΔW of each targeted tensor to (lora_deltas.safetensors, float32, or float64
            for a float64 base); None writes nothing.
        progress: show a progress bar.
        command: the command line, recorded in the record.
        executor: "local", or "ray" / "ray=ADDRESS": one Ray task per group of tensors of at most `task_bytes` of
            input, each opening the inputs itself (deltas_path's folder must be reachable from every worker); the
            record and the ΔW file are the local run's, bit for bit.
        task_bytes: with Ray, the input bytes (base + task vector) one task reads at most.

    Returns:
        The comparison record (schema loratv.comparison): inputs, tolerance, summary with the verdict, one record
        per base tensor, and notes.

    Raises:
        LoratvError: both or neither of `task_vector` and `finetuned`, or a bad tolerance (BadInputError); the
            adapter adds a tensor the base does not store, or targets a non-float tensor; the task vector does not
            belong to the base; a base tensor or T holds a NaN or Inf.
    """
    if (task_vector is None) == (finetuned is None):
        raise BadInputError(f"compare needs exactly one of {param('task_vector')} and {param('finetuned')}.")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise BadInputError(f"{param('tolerance', tolerance)}: must be a finite number ≥ 0.")
    run_on = parse_executor(executor, device)
    dev = resolve_device(device)
    base, adapter, plan, tv, targeted, comparisons = _open_inputs(base_source, adapter_source, task_vector, finetuned)
    if run_on.kind == "local":
        writer = _deltas_writer(base, adapter, targeted, deltas_path) if deltas_path is not None else None
        _stream(base, adapter, plan, tv, comparisons, targeted, dev, writer, progress)
    else:
        _stream_as_tasks(run_on, (base_source, adapter_source, task_vector, finetuned, device), base, adapter, tv,
                         comparisons, targeted, deltas_path, task_bytes)
    for stats in comparisons.values():
        _categorise(stats)
    return build_record(base, adapter, tv, plan, comparisons, tolerance, command)


def _open_inputs(base_source, adapter_source, task_vector, finetuned) -> tuple:
    """The base, the adapter bound to it, the task vector (stored or live), the targeted tensors and a fresh
    TensorComparison per base tensor."""
    base = open_checkpoint(base_source, label=f"base {source_name(base_source)}")
    adapter = load_adapter(adapter_source)
    plan = bind(adapter, base)
    if plan.new_tensors:
        name = next(iter(plan.new_tensors))
        raise LoratvError(
            f"{adapter.path}: the adapter adds '{name}', which the base does not store (an untied head); "
            "compare works on the base's tensors and cannot compare it."
        )
    tv = StoredTaskVector(task_vector) if task_vector is not None else LiveTaskVector(finetuned, base)
    tv.check_against(base)
    for name in base.names():
        if not dtypes.is_float(base.entry(name).dtype) and name in plan.touched():
            raise LoratvError(f"{base.path}: tensor '{name}' is {base.entry(name).dtype}; the adapter cannot change it.")

    targeted = [n for n in base.names() if n in plan.touched()]
    comparisons = {}
    for name in base.names():
        entry = base.entry(name)
        comparisons[name] = TensorComparison(name, tuple(entry.shape), entry.dtype, tv.finetuned_dtype(name), name in targeted)
    return base, adapter, plan, tv, targeted, comparisons


def _deltas_writer(base, adapter, targeted: list, deltas_path) -> SafetensorsWriter:
    """The writer of lora_deltas.safetensors: ΔW of each targeted tensor under its base name."""
    metadata = {"format": "pt", "loratv_version": __version__, "loratv_operation": "compare",
                "base": str(base.source), "adapter": str(adapter.source),
                "content": "ΔW per targeted tensor under base names, float64 value rounded once"}
    return SafetensorsWriter(deltas_path, [(n, base.entry(n).shape) for n in targeted], metadata)


def compare_group_task(sources: tuple, names: list, part: str | None) -> tuple[list, dict, dict]:
    """A group of tensors of a comparison, as a unit of work for an executor: opens every input itself, compares the
    named tensors as `compare` does and appends their ΔW to the file `part` (when given).

    Args:
        sources: (base, adapter, task_vector, finetuned, device), as `compare` got them.
        names: the tensors of this group, in base order.
        part: the part file for ΔW, a local path or a URL (None: ΔW is not kept).

    Returns:
        (the TensorComparison of each named tensor, {tensor: (offset, nbytes)} and {tensor: dtype code} of the ΔW
        written to the part file).

    Raises:
        LoratvError: as `compare`, for these tensors.
    """
    base_source, adapter_source, task_vector, finetuned, device = sources
    base, adapter, plan, tv, targeted, comparisons = _open_inputs(base_source, adapter_source, task_vector, finetuned)
    if part is None:
        _stream(base, adapter, plan, tv, comparisons, targeted, resolve_device(device), None, False, names)
        return [comparisons[n] for n in names], {}, {}
    with task_file(part) as local:
        writer = PartWriter(local)  # closed by _stream
        _stream(base, adapter, plan, tv, comparisons, targeted, resolve_device(device), writer, False, names)
    return [comparisons[n] for n in names], writer.spans, writer.codes


def _stream_as_tasks(run_on: ExecutorSpec, sources: tuple, base, adapter, tv, comparisons: dict, targeted: list,
                     deltas_path, task_bytes: int) -> None:
    """One executor task per group of at most task_bytes of input; the driver takes their comparisons in base
    order and copies their ΔW into lora_deltas.safetensors, which is then the local run's bit for bit."""
    if any(isinstance(s, Mapping) for s in sources[:4]):
        raise BadInputError(f"{param('executor', str(run_on))} sends paths to its tasks, not tensors: give the models "
                            "as folders, files or hub ids, not state dicts.")
    names = [n for n in base.names() if n in targeted or tv.needs_read(n)]
    groups = byte_groups([2 * base.entry(n).nbytes for n in names], task_bytes)
    folder = task_folder(Path(deltas_path).parent) if deltas_path is not None else None
    parts = storage.as_path(folder) / PARTS_FOLDER if folder is not None else None
    jobs = [(tuple(str(s) if s is not None else None for s in sources[:4]) + (sources[4],),
             [names[i] for i in group], str(parts / f"compare-{g:05d}.part") if parts is not None else None)
            for g, group in enumerate(groups)]
    outcomes = run_tasks(run_on, compare_group_task, jobs)
    writer = _deltas_writer(base, adapter, targeted, deltas_path) if deltas_path is not None else None
    try:
        with finished(writer):
            for job, (group, spans, codes) in zip(jobs, outcomes):
                for stats in group:
                    comparisons[stats.name] = stats
                    if writer is not None and stats.name in spans:
                        offset, nbytes = spans[stats.name]
                        writer.begin(stats.name, codes[stats.name], base.entry(stats.name).shape)
                        writer.copy_from(output_path(str(job[2])), offset, nbytes)
                        writer.end()
    finally:
        if folder is not None:
            remove_task_files(folder, PARTS_FOLDER)


def _stream(base, adapter, plan, tv, comparisons, targeted, dev, writer, progress, only: list | None = None) -> None:
    """One pass over the tensors that need reading (of `only`, when given), WORKERS tensors at a time, results taken
    in base order; ΔW of each targeted tensor goes to `writer` when there is one (closed here, or aborted)."""
    names = [n for n in base.names() if n in targeted or tv.needs_read(n)]
    if only is not None:
        wanted = set(only)
        names = [n for n in names if n in wanted]
    keep_deltas = writer is not None
    local = threading.local()

    def run(name):
        """Compare one tensor, chunk by chunk, with this worker's read buffers; returns its ΔW pieces if kept."""
        if not hasattr(local, "buffers"):
            local.buffers = [torch.empty(READ_BYTES, dtype=torch.uint8) for _ in range(2)]
        stats = comparisons[name]
        state = _start(stats, base, adapter, plan, tv, dev)
        pieces = []
        for start, stop in row_chunks(base.entry(name).shape, 8, READ_BYTES):
            w_raw = base.read_rows(name, start, stop, local.buffers[0])
            raw = tv.read_raw(name, start, stop, local.buffers[1]) if tv.needs_read(name) else None
            if not dtypes.all_finite(w_raw):
                raise LoratvError(f"{base.entry(name).file}: tensor '{name}' contains NaN or Inf.")
            pieces += _chunk(stats, state, tv, w_raw, raw, start, stop, dev)
        _finish(stats, state, base)
        return pieces if keep_deltas and stats.targeted else None

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread per tensor: its many small operations parallelise badly within
    try:
        with finished(writer), \
                progress_bar(sum(base.entry(n).nbytes for n in names), "compare", enabled=progress) as bar, \
                ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="loratv-compare") as pool:
            pending: deque = deque()

            def collect():
                name, future = pending.popleft()
                pieces = future.result()
                if pieces is not None:
                    writer.begin(name, dtypes.code_of(pieces[0].dtype) if pieces else "F32", base.entry(name).shape)
                    for piece in pieces:
                        writer.write(tensor_to_bytes(piece))
                    writer.end()
                bar.update(base.entry(name).nbytes)

            try:
                for name in names:
                    pending.append((name, pool.submit(run, name)))
                    if len(pending) > WORKERS:
                        collect()
                while pending:
                    collect()
            except BaseException:
                for _, future in pending:
                    future.cancel()
                raise
    finally:
        torch.set_num_threads(threads)


@dataclass
class _State:
    accumulator: _TargetedAccumulator | None
    out_dtype: torch.dtype | None
    cast_candidates: list
    unchanged_chunks: list = field(default_factory=list)


def _start(stats, base, adapter, plan, tv, dev) -> _State:
    base_dtype = base.entry(stats.name).torch_dtype
    out_dtype = _float_dtype(stats.finetuned_dtype)
    if stats.targeted:
        if out_dtype is None:  # no record of the fine-tuned dtype: assume the base's (the usual merge)
            out_dtype = base_dtype
        delta = expected_delta(adapter, plan, base, stats.name, compute_dtype_for(base_dtype, out_dtype)).to(dev)
        stats.modules, stats.rank = delta.modules, delta.rank
        accumulator = _TargetedAccumulator(stats, delta, base_dtype, out_dtype, tv.storage_rounding(stats.name), dev)
        return _State(accumulator, out_dtype, [])
    if out_dtype is not None:
        candidates = [out_dtype] if out_dtype != base_dtype else []
    elif base.entry(stats.name).torch_dtype in (torch.float32, torch.float64):
        # no record of the fine-tuned dtype: the casts that could have produced it
        candidates = [d for d in (torch.float32, torch.float16, torch.bfloat16) if d != base_dtype]
    else:
        candidates = []
    return _State(None, out_dtype, candidates)


def _chunk(stats, state, tv, w_raw, raw, start, stop, dev) -> list:
    """Compare rows [start, stop); returns the rows of ΔW of a targeted tensor, in pieces ([] otherwise)."""
    if state.accumulator is not None:
        pieces = []
        for i, j in _blocks(start, stop, stats.shape):
            raw_rows = None if raw is None else _rows(raw, i - start, j - start)
            pieces.append(state.accumulator.add_rows(_rows(w_raw, i - start, j - start), raw_rows, i, j, tv))
        return pieces
    if raw is None:
        return []
    t = tv.difference(raw, w_raw)
    if t is None or _measure_t(stats, t, tv) == 0:
        state.unchanged_chunks.append((start, stop))  # its ‖W‖ is only needed if another chunk changed
        return []
    _add_base_norm(stats, w_raw)
    # a changed chunk: keep only the casts that reproduce it bit for bit
    state.cast_candidates = [d for d in state.cast_candidates if tv.cast_matches(raw, w_raw, d)]
    stats.cast_possible = stats.cast_possible and bool(state.cast_candidates)
    return []


def _measure_t(stats, t, tv) -> int:
    """Accumulate ‖T‖², max|T| and the nonzero count of these rows of T; returns their nonzero count."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return 0
    extremes = torch.aminmax(flat)
    low, high = float(extremes.min), float(extremes.max)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise LoratvError(f"{tv.path}: tensor '{stats.name}' contains NaN or Inf.")
    stats.max_abs_t = max(stats.max_abs_t, -low, high)
    stats.t_sumsq += float(torch.dot(flat, flat))
    nonzero = int(torch.count_nonzero(flat))
    stats.changed_elements += nonzero
    return nonzero


def _add_base_norm(stats, w_raw):
    if w_raw.is_floating_point():
        w64 = w_raw.reshape(-1).to(torch.float64)
        stats.w_sumsq += float(torch.dot(w64, w64))
        stats.w_read = True


def _finish(stats, state, base):
    if stats.changed and not stats.targeted:
        for start, stop in state.unchanged_chunks:  # rare: a large tensor changed in some chunks only
            _add_base_norm(stats, base.read_rows(stats.name, start, stop))
    if state.accumulator is not None:
        state.accumulator.finish()
    elif stats.changed:
        stats.max_abs_diff = stats.max_abs_t
        if stats.cast_possible and state.cast_candidates:
            stats.cast_dtype = dtypes.code_of(state.cast_candidates[0])


def _categorise(stats: TensorComparison) -> None:
    if stats.targeted:
        stats.category = "shared" if stats.changed else "adapter-only"
    elif not stats.changed:
        stats.category = "unchanged"
    else:
        stats.category = "cast-artifact" if stats.cast_dtype else "unexplained"
        if stats.cast_dtype is None:
            stats.max_abs_diff = stats.max_abs_t


def build_record(base, adapter, tv, plan, comparisons: dict, tolerance: float, command: str | None) -> dict:
    """The comparison record from the per-tensor results: verdict, reasons, counts, cosines and notes.

    The verdict is CERTIFIED when every targeted tensor is within its rounding bound and none is unexplained, else
    WITHIN_TOLERANCE when every targeted and unexplained tensor's max |T − ΔW| is ≤ tolerance, else NOT_EQUIVALENT.

    Args:
        base: the base model.
        adapter: the adapter.
        tv: the task vector (StoredTaskVector or LiveTaskVector).
        plan: the adapter's MergePlan on the base.
        comparisons: name → TensorComparison, measured and categorised, in base order.
        tolerance: the tolerance of the WITHIN_TOLERANCE verdict.
        command: the command line, recorded as is.

    Returns:
        The record (schema loratv.comparison, docs/comparison-results.md).
    """
    tensors = list(comparisons.values())
    by = {c: [t for t in tensors if t.category == c] for c in CATEGORIES}
    by["tv-only"] = by["cast-artifact"] + by["unexplained"]
    targeted = [t for t in tensors if t.targeted]
    shared = by["shared"]
    cosines = [t.cosine for t in shared if t.cosine is not None]
    sum_dot = sum(t.dot for t in targeted)
    t_all = sum(t.t_sumsq for t in tensors)
    t_targeted = sum(t.t_sumsq for t in targeted)
    d_all = sum(t.d_sumsq for t in targeted)

    bounded = [t for t in targeted if t.tolerance_ratio is None]
    held = [t for t in targeted if t.tolerance_ratio is not None]  # no derived bound: a stated tolerance
    certified = all(t.certificate_ratio <= 1 for t in bounded) and not held and not by["unexplained"]
    within = (all(t.max_abs_diff <= tolerance for t in bounded + by["unexplained"])
              and all(t.tolerance_ratio <= 1 for t in held))
    verdict = CERTIFIED if certified else WITHIN_TOLERANCE if within else NOT_EQUIVALENT
    worst = sorted((t for t in targeted if _ratio(t) > 1), key=lambda t: -_ratio(t))
    reasons = [_reason_targeted(t) for t in worst[:5]]
    if len(worst) > 5:
        reasons.append(f"… and {len(worst) - 5} more targeted tensors exceed their rounding bound or tolerance.")
    if held and not worst:
        reasons.append(_reason_held(held, adapter.settings.tuner_name))
    unexplained = sorted(by["unexplained"], key=lambda t: -t.max_abs_t)
    reasons += [_reason_unexplained(t) for t in unexplained[:5]]
    if len(unexplained) > 5:
        reasons.append(f"… and {len(unexplained) - 5} more unexplained tensors.")

    summary = {
        "verdict": verdict,
        "certified": certified,
        "within_tolerance": within,
        "reasons": reasons,
        "counts": {c: len(by[c]) for c in CATEGORIES},
        "parameters": {c: sum(t.parameters for t in by[c]) for c in CATEGORIES},
        "total_tensors": len(tensors),
        "total_parameters": sum(t.parameters for t in tensors),
        "targeted_tensors": len(targeted),
        "targeted_parameters": sum(t.parameters for t in targeted),
        "changed_tensors": len(shared) + len(by["tv-only"]),
        "changed_parameters": sum(t.parameters for t in shared + by["tv-only"]),
        "adapter_stored_parameters": adapter.stored_parameters(),
        "global_cosine": _cosine(sum_dot, t_all, d_all),
        "targeted_cosine": _cosine(sum_dot, t_targeted, d_all),
        "mean_cosine": sum(cosines) / len(cosines) if cosines else None,
        "min_cosine": min(cosines) if cosines else None,
        "perfect_matches": sum(c > PERFECT_MATCH for c in cosines),
        "perfect_match_threshold": PERFECT_MATCH,
        "max_abs_diff": max((t.max_abs_diff for t in targeted), default=0.0),
        "max_certificate_ratio": max((t.certificate_ratio for t in bounded), default=None),
        "uncertified_tensors": len(held),
        "max_tolerance_ratio": max((t.tolerance_ratio for t in held), default=None),
        "relative_frobenius_error": (
            math.sqrt(sum(t.diff_sumsq for t in targeted) / t_targeted) if t_targeted > 0 else None
        ),
        "worst_tensors": [t.name for t in (worst + unexplained)[:5]],
    }
    settings = adapter.settings
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "loratv_version": __version__,
        "inputs": {
            "base": str(base.source),
            "adapter": str(adapter.source),
            "task_vector": tv.source if not tv.live else None,
            "finetuned": tv.source if tv.live else None,
            "adapter_config": {
                "peft_type": settings.peft_type_name,
                "r": settings.r,
                "lora_alpha": settings.lora_alpha,
                "use_rslora": settings.use_rslora,
                "target_modules": _target_modules(adapter),
                "modules_to_save": list(settings.modules_to_save),
                "bias": settings.bias,
            },
        },
        "tolerance": tolerance,
        "command": command,
        "summary": summary,
        "tensors": [t.record() for t in tensors],
        "notes": _notes(base, tv, plan, tensors, by),
    }


def _target_modules(adapter):
    targets = adapter.settings.raw.get("target_modules")
    return sorted(targets) if isinstance(targets, (list, tuple, set)) else targets


def _cosine(dot: float, a: float, b: float) -> float | None:
    if a <= 0 or b <= 0:
        return None
    return max(-1.0, min(1.0, dot / math.sqrt(a * b)))


def _ratio(t: TensorComparison) -> float:
    """How far past its bound (or, with no derived bound, its tolerance) a targeted tensor is."""
    ratio = t.certificate_ratio if t.tolerance_ratio is None else t.tolerance_ratio
    return 0.0 if ratio is None else ratio


def _reason_targeted(t: TensorComparison) -> str:
    where = f" at element {t.worst_element}" if t.worst_element is not None else ""
    limit = "rounding bound" if t.tolerance_ratio is None else "tolerance (no rounding bound is derived)"
    text = f"{t.name}: max |T − ΔW| = {t.max_abs_diff:.3e}, {_ratio(t):.3g}× its {limit}{where}"
    if not t.changed:
        text += "; the adapter changes this tensor but the task vector does not"
    elif t.cosine is not None and t.cosine < PERFECT_MATCH:
        text += f"; cosine {t.cosine:.6f}"
    return text + "."


def _reason_held(held: list, tuner: str) -> str:
    worst = max(held, key=lambda t: t.tolerance_ratio)
    error = max(t.reference_error or 0.0 for t in held)
    return (f"{len(held)} tensors are merged by PEFT's own {tuner} code, for which loratv derives no rounding bound: "
            f"each is within its tolerance (½ ulp of the output dtype + {TOLERANCE_FACTOR} × the largest error of "
            f"PEFT's own merge of it against its float64 evaluation, at most {error:.3e}); the largest ratio is "
            f"{worst.tolerance_ratio:.3g} ({worst.name}). Not certified.")


def _reason_unexplained(t: TensorComparison) -> str:
    cast = "" if t.finetuned_dtype in (None, t.base_dtype) else f", and it is not the base cast to {t.finetuned_dtype}"
    return f"{t.name}: changed (max |T| = {t.max_abs_t:.3e}) although the adapter does not target it{cast}."


def _notes(base, tv, plan, tensors, by) -> list:
    notes = list(plan.notes)
    if tv.recorded_base is not None and str(tv.recorded_base) != str(base.source):
        notes.append(f"the task vector was extracted against {tv.recorded_base}; compared here with {base.source}.")
    casts = sorted({t.cast_dtype for t in by["cast-artifact"]})
    if casts:
        notes.append(
            f"{len(by['cast-artifact'])} untargeted tensors changed only because the fine-tuned model stores them as "
            f"{', '.join(casts)}: each equals the base cast to that dtype, bit for bit (rounding, not training)."
        )
    untargeted = [t for t in tensors if not t.targeted]
    if by["unexplained"] and len(by["unexplained"]) * 2 > len(untargeted):
        notes.append(
            f"{len(by['unexplained'])} of {len(untargeted)} untargeted tensors differ in ways no cast explains: "
            "the fine-tuned model was probably trained further or made from a different base."
        )
    if any(t.finetuned_dtype is None for t in tensors):
        notes.append("the task vector has no task_vector.json: fine-tuned dtypes were inferred (targeted tensors "
                     "assumed in the base dtype; untargeted ones tested against casts to fp32, fp16 and bf16).")
    return notes


def write_comparison_files(record: dict, folder: Path, *, plots: bool = True) -> list:
    """comparison_results.json, detailed_comparison_report.txt and (unless plots=False) the four PNGs and report.html.

    Args:
        record: the comparison record (`Comparison.to_dict()`).
        folder: an existing folder to write into.
        plots: False skips the PNGs and the page.

    Returns:
        The paths written.
    """
    return write_record_files(record, folder, RESULTS_FILE, REPORT_FILE, render_comparison_text,
                              write_comparison_plots, plots)
