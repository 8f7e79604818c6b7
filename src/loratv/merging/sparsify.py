"""Sparsification of one task vector as mergekit 0.1.5 defines it (`mergekit/sparsify.py`): magnitude top-k (TIES's
trim), magnitude with outliers removed (Model Breadcrumbs), DARE's random drop and DELLA's magnitude-ranked random
drop, each optionally rescaled to the L1 norm it had. The random drops draw from random_masks (keyed by seed,
tensor and input, not from a global generator), so they are not mergekit's draws.

The kept set is "the k largest |δ|" (breadcrumbs: the elements ranked n_bottom … n_bottom + k − 1 by increasing
|δ|). Where elements of equal |δ| straddle the cut, which of them are kept is torch's sort order on the CPU, as in
mergekit: deterministic for a given input (and thread count), not the lowest index (torch's CPU argsort is not stable
beyond a few hundred elements). docs/merging.md states this; with no tie at the cut the set is unique.
"""

import torch

from loratv.merging import random_masks

RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


def rescaled(tensor: torch.Tensor, kept: torch.Tensor, rescale: bool) -> torch.Tensor:
    """tensor·kept, times ‖tensor‖₁/‖tensor·kept‖₁ when `rescale` (mergekit's rescaled_masked_tensor, L1 norm),
    skipped when either norm is below 1e-7.

    Args:
        tensor: the task vector.
        kept: the mask, in the tensor's dtype (1 kept, 0 dropped), shaped like it.
        rescale: apply the L1 rescale.

    Returns:
        The sparsified tensor.
    """
    masked = tensor * kept
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def _magnitudes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.abs().reshape(-1)
    return flat.float() if flat.device.type == "cpu" else flat  # mergekit sorts float32 magnitudes on the CPU


def magnitude(tensor: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the max(1, int(density·numel)) largest |values| (TIES's trim); density ≤ 0 keeps none.

    Args:
        tensor: the task vector of one tensor.
        density: the fraction kept.
        rescale: the L1 rescale of the kept values.

    Returns:
        The sparsified tensor (the input itself when density ≥ 1).
    """
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    return rescaled(tensor, magnitude_mask(tensor, density).to(tensor.dtype), rescale)


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """The elements `magnitude` keeps, for 0 < density < 1.

    Args:
        tensor: the task vector of one tensor.
        density: the fraction kept.

    Returns:
        A boolean mask shaped like the tensor.
    """
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    mask[torch.argsort(_magnitudes(tensor), descending=True)[:k]] = True
    return mask.reshape(tensor.shape)


def magnitude_outliers(tensor: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Model Breadcrumbs: drop the int(gamma·numel) largest |values| and the smallest ones, keeping
    int(density·numel) (fewer outliers dropped when density + gamma > 1).

    Args:
        tensor: the task vector of one tensor.
        density: the fraction kept.
        gamma: the fraction of largest values dropped.
        rescale: the L1 rescale of the kept values.

    Returns:
        The sparsified tensor (the input itself when density ≥ 1).
    """
    if density >= 1:
        return tensor
    return rescaled(tensor, outliers_mask(tensor, density, gamma).to(tensor.dtype), rescale)


def outliers_mask(tensor: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The elements `magnitude_outliers` keeps, for density < 1.

    Args:
        tensor: the task vector of one tensor.
        density: the fraction kept.
        gamma: the fraction of largest values dropped.

    Returns:
        A boolean mask shaped like the tensor.
    """
    n = tensor.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    order = torch.sort(_magnitudes(tensor), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=tensor.device)
    mask[order[n_bottom:n_bottom + target]] = True
    return mask.reshape(tensor.shape)


def random_drop(tensor: torch.Tensor, density: float, rescale: bool, key: tuple, position: int) -> torch.Tensor:
    """DARE: keep each element with probability `density` (an independent draw per element, from the counter-based
    stream of random_masks keyed by the merge's seed, the tensor and the input's position), then the L1 rescale.

    Args:
        tensor: the task vector of one tensor.
        density: the keep probability.
        rescale: the L1 rescale of the kept values (DARE's default).
        key: (seed, tensor name).
        position: the input's position among the models.

    Returns:
        The sparsified tensor (the input itself when density ≥ 1: nothing is drawn).
    """
    if density >= 1:
        return tensor
    seed, name = key
    kept = random_masks.keep_mask(seed, name, position, float(density), tuple(tensor.shape))
    return rescaled(tensor, kept.to(device=tensor.device, dtype=tensor.dtype), rescale)


def della_drop(tensor: torch.Tensor, density: float, epsilon: float, rescale: bool, key: tuple,
               position: int) -> torch.Tensor:
    """DELLA's MAGPRUNE: within each row (mergekit ranks along dim 1; a 1-D tensor is one row), the element of rank
    ρ by increasing |δ| is kept with probability density − ε + 2ε·(ρ − 1)/(row length − 1); then the L1 rescale.
    A row of one element is kept with probability `density`.

    Args:
        tensor: the task vector of one tensor.
        density: the mean keep probability, with density ± epsilon inside (0, 1).
        epsilon: half the spread of the keep probabilities.
        rescale: the L1 rescale of the kept values (DELLA's default).
        key: (seed, tensor name).
        position: the input's position among the models.

    Returns:
        The sparsified tensor (the input itself when density ≥ 1).
    """
    if density >= 1:
        return tensor
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(torch.float64)
    spread = ranks.max(dim=1, keepdim=True).values - ranks.min(dim=1, keepdim=True).values
    rank_norm = torch.where(spread > 0, (ranks - ranks.min(dim=1, keepdim=True).values) / spread.clamp(min=1), 0.5)
    probability = (density - epsilon) + rank_norm.clamp(0, 1) * 2 * epsilon
    seed, name = key
    kept = random_masks.keep_mask(seed, name, position, probability, tuple(rows.shape))
    return rescaled(rows, kept.to(device=tensor.device, dtype=tensor.dtype), rescale).reshape(tensor.shape)
