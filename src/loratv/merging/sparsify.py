"""Sparsification of one task vector as mergekit 0.1.5 defines it (`mergekit/sparsify.py`): magnitude top-k (TIES's
trim), magnitude with outliers removed (Model Breadcrumbs), DARE's random drop and DELLA's magnitude-ranked random
drop (each element of rank ρ by increasing |δ| in its row kept with probability density − ε + 2ε·(ρ − 1)/(len − 1)),
each optionally rescaled to the L1 norm it had (×‖δ‖₁/‖kept‖₁, skipped when either is below 1e-7). The random drops
draw from random_masks (keyed by seed, tensor and input, not from a global generator), so they are not mergekit's
draws.

The kept set is "the k largest |δ|" (breadcrumbs: the elements ranked n_bottom … n_bottom + k − 1 by increasing
|δ|). Where elements of equal |δ| straddle the cut, which of them are kept is torch's sort order on the CPU, as in
mergekit: deterministic for a given input (and thread count), not the lowest index (torch's CPU argsort is not stable
beyond a few hundred elements). docs/merging.md states this; with no tie at the cut the set is unique.
"""

from dataclasses import dataclass

import torch

from loratv.merging import random_masks

RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


def _magnitudes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.abs().reshape(-1)
    return flat.float() if flat.device.type == "cpu" else flat  # mergekit sorts float32 magnitudes on the CPU


@dataclass
class Trim:
    """What a sparsification keeps of one input's task vector, computed once on the whole tensor so that the merge
    itself can run row block by row block.

    Attributes:
        mask: the kept elements (boolean, shaped like the tensor).
        factor: the L1 rescale ‖δ‖₁/‖kept‖₁ as mergekit computes it (a 0-d tensor), or None.
    """

    mask: torch.Tensor
    factor: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> "Trim":
        """The same trim restricted to rows [start, stop) of the first dimension.

        Args:
            start: first row.
            stop: one past the last row.

        Returns:
            The Trim of those rows.
        """
        return Trim(self.mask[start:stop] if self.mask.dim() else self.mask, self.factor)

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """δ·mask (times the rescale), in mergekit's order of operations.

        Args:
            delta: the task vector (or its rows).

        Returns:
            The trimmed task vector.
        """
        masked = delta * self.mask.to(delta.dtype)
        return masked if self.factor is None else masked * self.factor


def _unique_window(values: torch.Tensor, low_rank: int, count: int) -> torch.Tensor | None:
    """The elements ranked low_rank … low_rank + count − 1 by increasing value, when no equal values straddle either
    end of that window (then the set is the same for every sort order); None otherwise."""
    n = values.numel()
    if count <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    low = torch.kthvalue(values, low_rank + 1).values
    high = torch.kthvalue(values, low_rank + count).values
    window = (values >= low) & (values <= high)
    return window if int(window.sum()) == count else None


def trim_of(magnitude: torch.Tensor, kind: str, density: float, *, gamma: float = 0.0, epsilon: float = 0.0,
            rescale: bool = False, key: tuple = (0, ""), position: int = 0) -> Trim | None:
    """The Trim a sparsification makes of one task vector, from its magnitudes |δ| (the same sets as `magnitude`,
    `magnitude_outliers`, `random_drop` and `della_drop`; a unique top-k or rank window is found by selection, not by
    sorting the whole tensor, which is sorted only when equal magnitudes straddle a cut).

    Args:
        magnitude: |δ| of the whole tensor, in the task vector's dtype.
        kind: "magnitude", "magnitude_outliers", "random" or "della_magprune".
        density: the fraction (or probability) kept.
        gamma: breadcrumbs' fraction of outliers.
        epsilon: DELLA's spread.
        rescale: compute the L1 rescale.
        key: (seed, tensor name), for the random kinds.
        position: the input's position, for the random kinds.

    Returns:
        The Trim, or None when density ≥ 1 (nothing is dropped).
    """
    if density >= 1:
        return None
    shape, n = magnitude.shape, magnitude.numel()
    flat = magnitude.reshape(-1)
    if kind == "magnitude":
        if density <= 0 or n == 0:
            mask = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
        else:
            k = max(1, int(density * n))
            values = _magnitudes(magnitude)
            window = _unique_window(values, n - k, k)
            if window is None:
                window = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
                window[torch.argsort(values, descending=True)[:k]] = True
            mask = window
    elif kind == "magnitude_outliers":
        target, n_top = int(density * n), int(gamma * n)
        n_bottom = max(0, n - target - n_top)
        values = _magnitudes(magnitude)
        window = _unique_window(values, n_bottom, target)
        if window is None:
            window = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
            window[torch.sort(values, descending=False).indices[n_bottom:n_bottom + target]] = True
        mask = window
    elif kind == "random":
        seed, name = key
        mask = random_masks.keep_mask(seed, name, position, float(density), tuple(shape)).reshape(-1)
    elif kind == "della_magprune":
        rows = magnitude.unsqueeze(0) if magnitude.dim() < 2 else magnitude
        ranks = torch.argsort(torch.argsort(rows, dim=1), dim=1).to(torch.float64)
        lowest = ranks.min(dim=1, keepdim=True).values
        spread = ranks.max(dim=1, keepdim=True).values - lowest
        rank_norm = torch.where(spread > 0, (ranks - lowest) / spread.clamp(min=1), 0.5)
        probability = (density - epsilon) + rank_norm.clamp(0, 1) * 2 * epsilon
        seed, name = key
        mask = random_masks.keep_mask(seed, name, position, probability, tuple(rows.shape)).reshape(-1)
    else:
        raise ValueError(f"unknown sparsification {kind}")
    mask = mask.to(magnitude.device).reshape(shape)
    factor = None
    if rescale:
        before = flat.sum()
        after = (magnitude * mask.to(magnitude.dtype)).sum()
        if not (before < RESCALE_EPS or after < RESCALE_EPS):
            factor = before / after
    return Trim(mask, factor)
