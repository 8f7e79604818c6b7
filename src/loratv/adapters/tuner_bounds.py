"""LoHa, LoKr, AdaLoRA, VeRA, IA³ and OFT in compare: the exact merged-minus-base delta and its rounding bound.

Each tuner's update is a program of +, × and division by a constant (tuners.py), so (docs/math.md §12)

    |computed − exact| ≤ γ_N(u)·G,   G = the same program on absolute values, N = tuners.depth

for PEFT's evaluation in the compute dtype c (u = u_c) and for loratv's float64 reference (u = 2⁻⁵³) alike.
Additive tuners then round like LoRA (precision.merge_error_bound with that G and k = N). IA³ and OFT are linear in
W: M = cast_d(fl_c(f(W))), so |M − f(W)| ≤ ½ulp_d(M) + γ_N(u_c)·G; a merge that first casts W to a narrower d (PEFT
on a model loaded in d) adds |f(cast_d(W) − W)| ≤ (1 + γ_N(u_c))·f_abs(½ulp_d(W)).
"""

from dataclasses import dataclass, field

import torch

from loratv.adapters.tuners import TunerModule, additive_delta, apply_rows, depth
from loratv.errors import LoratvError
from loratv.numerics.precision import compute_dtype_for, gamma, merge_error_bound, ulp, unit_roundoff

U64 = unit_roundoff(torch.float64)


@dataclass
class TunerTerms:
    adapter: object
    module: TunerModule
    depth: int
    value: torch.Tensor | None = None  # additive: ΔW in float64, whole tensor, stored orientation
    abs_value: torch.Tensor | None = None  # additive: G
    cache: dict = field(default_factory=dict)  # multiplicative: the float64 vector or rotations, per device

    def to(self, device) -> "TunerTerms":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return TunerTerms(self.adapter, self.module, self.depth, move(self.value), move(self.abs_value))

    def delta_and_bound(self, w: torch.Tensor, start: int, stop: int, base_dtype, out_dtype):
        """Rows of D = merged − W (float64), the bound on D's own float64 evaluation error, and a function of
        (M, ulp_d(M)) giving the merge bound of these rows."""
        c = compute_dtype_for(base_dtype, out_dtype)
        if not self.module.multiplicative:
            d = self.value[start:stop].reshape(w.shape).clone()
            g = self.abs_value[start:stop].reshape(w.shape)

            def additive_bound(m, ulp_m):
                return merge_error_bound(w, m, g, additions=1, k=self.depth, base_dtype=base_dtype,
                                         out_dtype=out_dtype, ulp_m=ulp_m)

            return d, gamma(self.depth, torch.float64) * g, additive_bound
        merged = apply_rows(self.adapter, self.module, w, start, stop, cache=self.cache)
        g = apply_rows(self.adapter, self.module, w.abs(), start, stop, absolute=True, cache=self.cache)
        d = merged - w
        evaluation = gamma(self.depth, torch.float64) * g + 2 * U64 * (merged.abs() + w.abs())

        def multiplicative_bound(m, ulp_m):
            bound = torch.add(0.5 * ulp_m, g, alpha=gamma(self.depth, c))
            if unit_roundoff(out_dtype) > unit_roundoff(c) and base_dtype != out_dtype:
                shift = apply_rows(self.adapter, self.module, 0.5 * ulp(w, out_dtype), start, stop, absolute=True,
                                   cache=self.cache)
                bound.add_(shift, alpha=1 + gamma(self.depth, c))
            return bound

        return d, evaluation, multiplicative_bound


def tuner_terms(adapter, module: TunerModule, shape: tuple) -> TunerTerms:
    """compare's view of one tuner module on a base tensor of `shape`."""
    if module.peft_type == "OFT" and not module.options["neumann"]:
        raise LoratvError(f"{adapter.config_path}: OFT with use_cayley_neumann = false inverts I + Q per block; loratv "
                          "merges it (as PEFT does) but has no certified bound for the inverse, so compare refuses it.")
    n = depth(module, shape)
    if module.multiplicative:
        return TunerTerms(adapter, module, n)
    value = additive_delta(adapter, module, shape, torch.float64, "cpu", exact_scale=True)
    abs_value = additive_delta(adapter, module, shape, torch.float64, "cpu", absolute=True, exact_scale=True)
    rows = shape[0] if shape else 1
    return TunerTerms(adapter, module, n, value.reshape(rows, -1), abs_value.reshape(rows, -1))
