"""LoHa, LoKr, AdaLoRA, VeRA, IA³ and OFT in compare: the exact merged-minus-base delta and its rounding bound.

Each tuner's update is a program of +, × and division by a constant (its kind module), so (docs/math.md §12)

    |computed − exact| ≤ γ_N(u)·G,   G = the same program on absolute values, N = AdapterKind.depth

for PEFT's evaluation in the compute dtype c (u = u_c) and for loratv's float64 reference (u = 2⁻⁵³) alike.
Additive tuners then round like LoRA (precision.merge_error_bound with that G and k = N). IA³ and OFT are linear in
W: M = cast_d(fl_c(f(W))), so |M − f(W)| ≤ ½ulp_d(M) + γ_N(u_c)·G; a merge that first casts W to a narrower d (PEFT
on a model loaded in d) adds |f(cast_d(W) − W)| ≤ (1 + γ_N(u_c))·f_abs(½ulp_d(W)). The terms are built by each
kind's `bound_terms` (loratv/adapters/kind.py).
"""

from loratv.adapters import registry
from loratv.adapters.kind import TunerModule, TunerTerms  # noqa: F401  (re-exported)


def tuner_terms(adapter, module: TunerModule, shape: tuple) -> TunerTerms:
    """compare's view of one tuner module on a base tensor of `shape` (AdapterKind.bound_terms).

    Args:
        adapter: the adapter.
        module: the bound module.
        shape: the base tensor's shape.

    Returns:
        Its TunerTerms.

    Raises:
        LoratvError: the kind has no certified bound for this module.
    """
    return registry.kind_for(module.peft_type).bound_terms(adapter, module, shape)
