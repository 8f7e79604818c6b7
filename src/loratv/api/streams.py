"""In-memory streams: the merged model and the task vector, one (name, tensor) at a time, nothing written.

`merge` and `extract` write what these compute (the same per-tensor code), so a streamed tensor equals the
corresponding tensor of the written files bit for bit. Memory: one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from loratv.adapters import adapter as _adapters
from loratv.adapters.registry import kind_for
from loratv.adapters.structures import LoraModule
from loratv.api.functions import ModelSource, PathLike, _named, _source
from loratv.common import dtypes
from loratv.common.devices import resolve_device
from loratv.errors import UnsupportedAdapterError
from loratv.io.state_dict import source_name
from loratv.ops import extract as _extract
from loratv.ops import merge as _merge


def iter_merged(
    base: ModelSource,
    adapter: PathLike,
    *,
    precision: str = "auto",
    compute_dtype: str = "fp32",
    device: str = "cpu",
    adapter_name: str | None = None,
    cast_base_first: bool = False,
    autocast_adapter_dtype: bool = True,
    peft_arithmetic: bool = False,
    base_config: Mapping[str, object] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model, one (name, tensor) at a time, in the order `merge` writes it; nothing is written.

    Each tensor equals the one `merge` writes with the same arguments, bit for bit (PEFT's `merge_and_unload`).
    Feed it to `model.load_state_dict(dict(iter_merged(...)))`, or consume it tensor by tensor.

    Args:
        base: base model folder, weights file, hub id, or a state dict.
        adapter: PEFT adapter folder or single LoRA file.
        precision: "auto", "fp32", "fp16" or "bf16".
        compute_dtype: "fp32" or "fp64".
        device: where ΔW and the sums are computed (tensors are yielded on the CPU).
        adapter_name: one of several named adapters in one folder.
        cast_base_first: PEFT on a model loaded in the output dtype (see `merge`).
        autocast_adapter_dtype: PEFT's parameter of that name, with `cast_base_first`.
        peft_arithmetic: PEFT's own merge where loratv has a faster evaluation (HRA; see `merge`).
        base_config: for a state-dict base, its config.json as a dict (optional).

    Returns:
        An iterator of (tensor name, CPU tensor) pairs; the inputs are opened and checked on the first `next()`.

    Raises:
        BadInputError: a parameter out of range, or an unusable input (raised while iterating).
        UnsupportedAdapterError: an adapter the merge is not defined for.
        LoratvError: any other refusal.
    """
    return _merge.iter_merged(_source(base), _named(adapter, adapter_name), precision=precision,
                              compute_dtype=compute_dtype, device=device, cast_base_first=cast_base_first,
                              autocast_adapter_dtype=autocast_adapter_dtype, peft_arithmetic=peft_arithmetic,
                              base_config=dict(base_config) if base_config is not None else None)


def iter_task_vector(
    base: ModelSource,
    finetuned: ModelSource,
    *,
    storage_dtype: str = "auto",
    dense: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The task vector finetuned − base, one (name, tensor) at a time in base order; nothing is written.

    Each value is the exact difference rounded once to the storage dtype (float32 by default; float64 for float64
    inputs or `storage_dtype="fp64"`; int64 for integer tensors): what `extract` stores.

    Args:
        base: base model (folder, file, hub id or state dict).
        finetuned: fine-tuned model with the same tensors (folder, file, hub id or state dict).
        storage_dtype: "auto", "fp32" or "fp64".
        dense: yield every tensor (zeros where unchanged); False yields only the changed ones.

    Returns:
        An iterator of (tensor name, tensor) pairs.

    Raises:
        BadInputError: a bad `storage_dtype`, or models that differ in tensors or shapes (raised while iterating).
        LoratvError: a NaN or Inf in an input, or any other refusal.
    """
    return _extract.iter_task_vector(_source(base), _source(finetuned), storage_dtype=storage_dtype, dense=dense)


@dataclass(frozen=True)
class Adapter:
    """An adapter on disk, opened (its config and tensor index read; no tensor data until asked).

    Attributes:
        path: where it was read from.
        peft_type: "LORA", "LOHA", "LOKR", … (PEFT's name).
        r: the configured rank (None for kinds without one).
    """

    path: Path
    peft_type: str
    r: int | None

    def bind(
        self,
        base: ModelSource,
        *,
        precision: str = "auto",
        compute_dtype: str = "fp32",
        device: str = "cpu",
        base_config: Mapping[str, object] | None = None,
    ) -> BoundAdapter:
        """The adapter matched to a base's tensors.

        Args:
            base: base model (folder, file, hub id or state dict).
            precision: the merged values' precision, as for `merge`.
            compute_dtype: "fp32" or "fp64".
            device: where ΔW is computed.
            base_config: for a state-dict base, its config.json as a dict (optional).

        Returns:
            BoundAdapter: per base tensor, its delta and merged value.

        Raises:
            LoratvError: an adapter that does not fit the base.
        """
        prepared = _merge.prepare_merge(_source(base), os.fspath(self.path), precision=precision,
                                        compute_dtype=compute_dtype, device=device,
                                        base_config=dict(base_config) if base_config is not None else None)
        return BoundAdapter(prepared, dtypes.PRECISION_NAMES[compute_dtype], resolve_device(device))

    def delta(self, base: ModelSource, name: str) -> torch.Tensor | None:
        """ΔW of one base tensor (see BoundAdapter.delta); binds to `base` on each call.

        Args:
            base: base model (folder, file, hub id or state dict).
            name: the base tensor's name.

        Returns:
            ΔW in float32 on the CPU, or None for a tensor the adapter does not change.

        Raises:
            UnsupportedAdapterError: the tensor is not changed additively (use `merged`).
            LoratvError: an adapter that does not fit the base, or a name the base lacks.
        """
        return self.bind(base).delta(name)

    def merged(self, base: ModelSource, name: str) -> torch.Tensor:
        """The merged value of one base tensor (see BoundAdapter.merged); binds to `base` on each call.

        Args:
            base: base model (folder, file, hub id or state dict).
            name: the base tensor's name.

        Returns:
            The tensor `merge` would write under `name`, bit for bit.

        Raises:
            LoratvError: an adapter that does not fit the base, or a name the merged model lacks.
        """
        return self.bind(base).merged(name)


class BoundAdapter:
    """An adapter bound to one base: which tensors it changes, and their deltas and merged values."""

    def __init__(self, prepared: _merge._Prepared, compute: torch.dtype, dev: torch.device):
        self._prepared = prepared
        self._compute = compute
        self._dev = dev

    @property
    def base_source(self) -> str:
        """The base this adapter is bound to, as messages and records name it."""
        return source_name(self._prepared.base.source)

    @property
    def targeted(self) -> tuple[str, ...]:
        """The base tensors the adapter changes (adds to, scales or replaces), in base order."""
        touched = self._prepared.plan.touched()
        return tuple(n for n in self._prepared.base.names() if n in touched)

    def delta(self, name: str) -> torch.Tensor | None:
        """ΔW of one base tensor in the compute dtype, as merge adds it: s·B@A (plus s·lora_B.bias for a bias) for LoRA,
        the kind's update for LoHa, LoKr, AdaLoRA and VeRA;
        None for a tensor the adapter does not change.

        Args:
            name: the base tensor's name.

        Returns:
            ΔW on the CPU in the compute dtype, or None.

        Raises:
            LoratvError: a name the base does not hold.
            UnsupportedAdapterError: a tensor changed other than additively (DoRA, IA³, OFT, a saved
                replacement): use `merged(name)`.
        """
        plan, adapter, base = self._prepared.plan, self._prepared.adapter, self._prepared.base
        if name not in plan.touched():
            base.entry(name)  # an unknown name is an error, not "unchanged"
            return None
        modules = plan.deltas.get(name, [])
        if name in plan.replacements or any(not m.additive if isinstance(m, LoraModule) else m.multiplicative
                                             for m in modules):
            raise UnsupportedAdapterError(f"{adapter.path}: '{name}' is not changed by an additive ΔW (a "
                                          "replacement, DoRA, IA³ or OFT); ask for its merged value instead.")
        shape = tuple(base.entry(name).shape)
        rows = shape[0] if shape else 1
        total = torch.zeros(shape, dtype=self._compute, device=self._dev)
        for module in modules:
            if isinstance(module, LoraModule):
                total += _adapters.delta_rows(adapter, module, 0, rows, self._compute, self._dev)
            else:  # LoHa, LoKr, AdaLoRA, VeRA: the kind's ΔW, as merge adds it
                total += kind_for(module.peft_type).additive_delta(adapter, module, shape, self._compute, self._dev)
        bias_module = plan.bias_additions.get(name)
        if bias_module is not None:
            total += _adapters.bias_delta(adapter, bias_module, self._compute, self._dev)
        return total.cpu()

    def merged(self, name: str) -> torch.Tensor:
        """The merged value of one tensor, as `merge` writes it (bit for bit).

        Args:
            name: the output tensor's name (a base tensor, changed or not, or one the adapter adds).

        Returns:
            The tensor in the output dtype, on the CPU.

        Raises:
            LoratvError: a name the merged model does not hold, or a NaN/Inf in the merged value.
        """
        return _merge.merged_tensor(self._prepared, name)


def load_adapter(path: PathLike, *, adapter_name: str | None = None) -> Adapter:
    """Open an adapter (PEFT folder, adapter_config.json, or a single kohya/diffusers LoRA file).

    Args:
        path: the adapter.
        adapter_name: one of several named adapters in one folder.

    Returns:
        Adapter: bind it to a base for per-tensor deltas and merged values.

    Raises:
        BadInputError: not an adapter.
        UnsupportedAdapterError: an adapter kind loratv refuses.
        LoratvError: any other refusal.
    """
    resolved = _named(path, adapter_name)
    loaded = _adapters.load_adapter(resolved)
    settings = loaded.settings
    return Adapter(path=Path(resolved), peft_type=str(settings.peft_type_name), r=settings.r)

