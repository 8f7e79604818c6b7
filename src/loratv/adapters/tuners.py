"""PEFT tuners other than LoRA, dispatched to their kinds: LoHa, LoKr, AdaLoRA, VeRA, IA³, OFT (and any kind
registered in loratv/adapters/registry.py).

Each kind's formulas and key layout live in its module under loratv/adapters/kinds/ (docs/peft-format.md §4,
docs/adapter-kinds.md). Each module's merged weight is computed whole, in PEFT's order of operations, so the merge is
bit-identical to merge_and_unload; for compare the same expression is evaluated in float64 and on absolute values
(docs/math.md §12). These functions keep the names the merge, compare and the tests call.
"""

import torch

from loratv.adapters import registry
from loratv.adapters.kind import FOREIGN, PREFIX, TunerModule  # noqa: F401  (re-exported)
from loratv.adapters.kinds.ia3 import ia3_bias_module, ia3_vector  # noqa: F401  (re-exported)
from loratv.adapters.kinds.oft import oft_rotation  # noqa: F401  (re-exported)
from loratv.adapters.kinds.vera import KIND as _VERA

VERA_SHARED = dict(_VERA.shared_tensors)


def map_tuner_keys(adapter) -> None:
    """Group the file's tensors by module with the adapter's kind (AdapterKind.map_keys).

    Args:
        adapter: the adapter, settings and tensors set.

    Raises:
        LoratvError: see AdapterKind.map_keys.
    """
    registry.kind_for_adapter(adapter).map_keys(adapter)


def check_fits(adapter, module: TunerModule, shape: tuple) -> None:
    """The module's update must have the base tensor's shape (AdapterKind.check_fits).

    Args:
        adapter: the adapter.
        module: the module, its orientation set.
        shape: the base tensor's shape.

    Raises:
        LoratvError: what does not fit.
    """
    registry.kind_for(module.peft_type).check_fits(adapter, module, shape)


def depth(module: TunerModule, shape: tuple) -> int:
    """N of γ_N: roundings along any path of the evaluation, scales' own rounding to float32 included.

    Args:
        module: the module.
        shape: the base tensor's shape.

    Returns:
        N.
    """
    return registry.kind_for(module.peft_type).depth(module, shape)


def additive_delta(adapter, module: TunerModule, shape, dtype, device, absolute=False, exact_scale=False):
    """ΔW in the base tensor's stored orientation and shape (AdapterKind.additive_delta).

    Args:
        adapter: the adapter.
        module: an additive module.
        shape: the base tensor's shape.
        dtype: the dtype.
        device: the device.
        absolute: on absolute values.
        exact_scale: the float64 scale (compare's reference) instead of PEFT's.

    Returns:
        ΔW.

    Raises:
        ValueError: a multiplicative module.
    """
    kind = registry.kind_for(module.peft_type)
    if kind.multiplicative:
        raise ValueError(module.peft_type)
    return kind.additive_delta(adapter, module, shape, dtype, device, absolute, exact_scale)


def merged_value(adapter, module: TunerModule, w: torch.Tensor) -> torch.Tensor:
    """The merged tensor from `w` (the base, already in the compute dtype), as PEFT's merge computes it.

    Args:
        adapter: the adapter.
        module: the module.
        w: the whole base tensor in the compute dtype.

    Returns:
        The merged tensor.
    """
    return registry.kind_for(module.peft_type).merged_value(adapter, module, w)


def apply_rows(adapter, module: TunerModule, x: torch.Tensor, start: int, stop: int, absolute=False,
               cache: dict | None = None) -> torch.Tensor:
    """A multiplicative module applied to rows [start, stop) of `x` in float64 (AdapterKind.apply_rows).

    Args:
        adapter: the adapter.
        module: a multiplicative module.
        x: the rows.
        start: first row.
        stop: one past the last row.
        absolute: on absolute values.
        cache: per-module memo.

    Returns:
        f(x).
    """
    return registry.kind_for(module.peft_type).apply_rows(adapter, module, x, start, stop, absolute, cache)
