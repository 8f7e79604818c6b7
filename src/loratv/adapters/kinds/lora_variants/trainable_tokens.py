"""Trainable tokens (trainable_token_indices, PEFT's TrainableTokensLayer): chosen rows of an embedding are
replaced by trained ones (`<module>.token_adapter.trainable_tokens_delta`). It works on the adapter as a whole, not on
a LoRA module: `Adapter.token_rows` maps the base tensor to (adapter key, row indices), and the merge plan marks the
tensor `TOKEN_ROWS` (its replacement is `token_replacement`)."""

from typing import Any

import torch

from loratv.adapters.kinds.lora_variants.base import LoraVariant
from loratv.adapters.structures import TOKEN_ROWS, Adapter
from loratv.errors import LoratvError
from loratv.io.checkpoint import Checkpoint

TOKEN_SUFFIX = ".token_adapter.trainable_tokens_delta"


def _token_indices(adapter: Adapter, module: str, key: str) -> list:
    """The rows `trainable_token_indices` names for this module: a list (the input embedding) or {module: list}."""
    spec: Any = adapter.settings.raw.get("trainable_token_indices")
    if isinstance(spec, dict):
        spec = next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    try:
        indices = [int(i) for i in spec]
    except (TypeError, ValueError):
        raise LoratvError(f"{adapter.config_path}: trainable_token_indices gives no row list for '{module}', which "
                          f"{adapter.tensors.path.name} trains.") from None
    rows = adapter.tensors.entry(key).shape
    if len(rows) != 2 or rows[0] != len(indices) or len(set(indices)) != len(indices):
        raise LoratvError(f"{adapter.tensors.path}: '{key}' holds {list(rows)} values for {len(indices)} token indices "
                          f"({'repeated' if len(set(indices)) != len(indices) else 'different counts'}).")
    return indices


def token_replacement(adapter: Adapter, base: Checkpoint, name: str) -> torch.Tensor:
    """The tensor with its trained token rows copied in, as PEFT's TrainableTokensLayer.merge does (index_copy of
    the trained rows cast to the base dtype): a whole-tensor replacement in the base dtype.

    Args:
        adapter: the adapter.
        base: the base checkpoint.
        name: the base tensor whose rows are trained (a key of `adapter.token_rows`).

    Returns:
        The whole tensor, trained rows copied in, in the base dtype.

    Raises:
        LoratvError: the trained rows hold NaN or Inf.
    """
    key, indices = adapter.token_rows[name]
    w = base.read(name)
    return w.index_copy(0, torch.tensor(indices), adapter.factor(key).to(w.dtype))


def record_token_rows(adapter: Adapter, name: str, key: str) -> bool:
    """Key mapping: record a trainable-tokens tensor in `adapter.token_rows`.

    Args:
        adapter: the adapter being mapped.
        name: the tensor name without PEFT's prefix.
        key: the full adapter key.

    Returns:
        True when the tensor was a trainable-tokens tensor (and is recorded), False otherwise.

    Raises:
        LoratvError: the config gives no row list for it, or the row counts differ.
    """
    if not name.endswith(TOKEN_SUFFIX):
        return False
    module = name[: -len(TOKEN_SUFFIX)]
    adapter.token_rows[module + ".weight"] = (key, _token_indices(adapter, module, key))
    return True


def bind_token_rows(adapter: Adapter, base: Checkpoint, deltas: dict, replacements: dict) -> None:
    """Binding: every trained-rows tensor must fit its base matrix and be its only update; it is marked TOKEN_ROWS.

    Args:
        adapter: the adapter.
        base: the base checkpoint.
        deltas: the plan's base tensor -> modules so far.
        replacements: the plan's base tensor -> adapter key so far (updated).

    Raises:
        LoratvError: the base lacks the matrix, the rows do not fit, or the tensor has another update.
    """
    for name, (key, indices) in adapter.token_rows.items():
        if name not in base or len(base.entry(name).shape) != 2:
            raise LoratvError(f"{adapter.tensors.path}: '{key}' trains rows of '{name}', which the base {base.path} "
                              "lacks or which is not a matrix.")
        rows, dim = base.entry(name).shape
        if adapter.tensors.entry(key).shape[1] != dim or max(indices) >= rows or min(indices) < 0:
            raise LoratvError(f"{adapter.tensors.path}: '{key}' does not fit '{name}' {[rows, dim]} (token indices "
                              f"{min(indices)}–{max(indices)}, rows of {adapter.tensors.entry(key).shape[1]}).")
        if name in deltas or name in replacements:
            raise LoratvError(f"{adapter.tensors.path}: '{name}' has trained token rows and another update; their "
                              "combined merge is not defined.")
        replacements[name] = TOKEN_ROWS  # the shared tensor itself: a tied head follows it, as in PEFT


class TrainableTokensVariant(LoraVariant):
    """Trainable tokens: rows of a base matrix replaced (adapter-wide, `Adapter.token_rows`; no LoRA module)."""

    name = "trainable_tokens"
    display_name = "trainable tokens"
    config_field = "trainable_token_indices"
    per_module = False

    def in_use(self, adapter) -> bool:
        """Whether the adapter replaces token rows.

        Args:
            adapter: the loaded adapter.

        Returns:
            True when `adapter.token_rows` is not empty.
        """
        return bool(adapter.token_rows)


TRAINABLE_TOKENS = TrainableTokensVariant()
