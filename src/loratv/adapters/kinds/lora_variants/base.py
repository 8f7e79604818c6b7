"""The interface of a LoRA variant: what PEFT's `LoraVariant` (peft/tuners/lora/variants.py) is to its LoRA layers.

PEFT chooses a variant per module from the config when it builds the layer (`resolve_lora_variant`: DoRA for
`use_dora`, …) and the layer calls the variant's `init`, `merge_safe`/`merge_unsafe`, `unmerge` and `forward`
instead of its own. loratv never runs a forward pass or unmerges, so its variants have the hooks of loratv's
pipeline instead: `applies` (chosen when the `LoraModule` is built, kept in `LoraModule.variants`), `check_bound`
(bind), `product` and `delta_rows` (ΔW, merge and compare), `merge` (a non-additive merge of the whole tensor) and
`bound_terms` (compare). The defaults are plain LoRA's: nothing to check, ΔW = s·B@A, W' = W + ΔW.
docs/adapter-kinds.md lists the variants and walks through adding one.
"""

import torch

from loratv.errors import LoratvError


class LoraVariant:
    """One LoRA variant (DoRA, rsLoRA, trainable tokens, target_parameters, ConvNd, lora_bias).

    Variants are stateless singletons; a `LoraModule` keeps the ones chosen for it in `variants` (several may
    apply: rsLoRA with DoRA on a ConvNd, say).

    Attributes:
        name: the variant's name, as `LoraModule.has_variant` and inspect use it ("dora", "rslora", …).
        display_name: how messages name it ("DoRA").
        config_field: the LoraConfig field that enables it ("" when the stored tensors decide, as for ConvNd).
        additive: whether the merge is W + ΔW (False: DoRA rescales W + ΔW per output feature).
        per_module: whether it is chosen per LoRA module (False: it works on the adapter as a whole, as trainable
            tokens do).
    """

    name: str = ""
    display_name: str = ""
    config_field: str = ""
    additive: bool = True
    per_module: bool = True

    def applies(self, adapter, module) -> bool:
        """Whether this variant is one of `module`'s, decided when the module is built (PEFT: from the config).

        Args:
            adapter: the adapter (settings and tensors set).
            module: the LoraModule just built.

        Returns:
            True when the module uses the variant.
        """
        return False

    def in_use(self, adapter) -> bool:
        """Whether the adapter uses this variant anywhere (any module, or the adapter as a whole).

        Args:
            adapter: the loaded adapter.

        Returns:
            True when it does.
        """
        return any(self in getattr(m, "variants", ()) for m in adapter.modules.values())

    def check_bound(self, adapter, module, base, target: str) -> None:
        """Variant-specific checks once the module is bound to the base tensor `target` (its orientation set).

        Args:
            adapter: the adapter.
            module: the bound LoraModule.
            base: the base checkpoint.
            target: the base tensor the module merges into.

        Raises:
            LoratvError: a stored tensor of the variant does not fit the base tensor.
        """

    def product(self, module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """The whole ΔW from the factors when the variant computes it differently from s·B@A, else None.

        Args:
            module: the bound LoraModule.
            a: lora_A in the compute dtype.
            b: lora_B in the compute dtype.

        Returns:
            ΔW in the stored orientation, or None for plain LoRA's product.
        """
        return None

    def delta_rows(self, adapter, module, start: int, stop: int, dtype: torch.dtype, device,
                   factor_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Rows [start, stop) of ΔW when the variant computes them itself (not from one cached whole product).

        Args:
            adapter: the adapter.
            module: the bound LoraModule.
            start: first stored row.
            stop: one past the last stored row.
            dtype: the compute dtype.
            device: the compute device.
            factor_dtype: when given, the factors are first rounded to it.

        Returns:
            The rows, or None to use LoRA's cached whole product.
        """
        return None

    def merge(self, adapter, module, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The merged tensor from the whole base tensor `w` and the whole ΔW, both in the compute dtype.

        Args:
            adapter: the adapter.
            module: the bound LoraModule.
            w: the base tensor (or the saved base layer) in the compute dtype.
            delta: ΔW in the stored orientation, same dtype.

        Returns:
            The merged tensor in the compute dtype (plain LoRA: W + ΔW).
        """
        return w + delta

    def __repr__(self) -> str:
        return f"<LoRA variant {self.name}>"


def lora_factors(adapter, module, dtype: torch.dtype, device, factor_dtype: torch.dtype | None) -> tuple:
    """(A, B) in `dtype` on `device`, rounded to `factor_dtype` first when given.

    Args:
        adapter: the adapter.
        module: the LoraModule.
        dtype: the compute dtype.
        device: the compute device.
        factor_dtype: a dtype to round the factors to first, or None.

    Returns:
        (A, B).

    Raises:
        LoratvError: a factor holds NaN or Inf.
    """
    a = adapter.factor(module.a_key)
    b = adapter.factor(module.b_key)
    if factor_dtype is not None:
        a, b = a.to(factor_dtype), b.to(factor_dtype)
    return a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


def check_shape(adapter, key: str, shape, target: str) -> None:
    """An adapter tensor must have the shape of the base tensor it replaces or adds to.

    Args:
        adapter: the adapter.
        key: the adapter key.
        shape: the base tensor's shape.
        target: the base tensor's name, for the message.

    Raises:
        LoratvError: the shapes differ.
    """
    got = adapter.tensors.entry(key).shape
    if tuple(got) != tuple(shape):
        raise LoratvError(
            f"{adapter.tensors.path}: tensor '{key}' has shape {list(got)} but base tensor '{target}' has {list(shape)}."
        )
