"""Sparsification of one task vector as mergekit 0.1.5 defines it (`mergekit/sparsify.py`): magnitude top-k (TIES's
trim), magnitude with outliers removed (Model Breadcrumbs), DARE's random drop and DELLA's magnitude-ranked random
drop (each element of rank ρ by increasing |δ| in its row kept with probability density − ε + 2ε·(ρ − 1)/(len − 1)),
each optionally rescaled to the L1 norm it had (×‖δ‖₁/‖kept‖₁, skipped when either is below 1e-7). The random drops
draw from random_masks (keyed by seed, tensor and input, not from a global generator), so they are not mergekit's
draws.

The kept set is "the k largest |δ|" (breadcrumbs: the elements ranked n_bottom … n_bottom + k − 1 by increasing
|δ|), found by selection (a histogram of the top 16 bits, then one bin sorted) rather than a sort. Where elements of
equal |δ| straddle a cut, which of them are kept is torch's CPU sort order, as in mergekit, for tensors of up to
SORT_LIMIT elements (the sort is run; torch's CPU sort is not stable, so nothing cheaper reproduces it), and the
lowest indices first above that (equal magnitudes straddle the cut of most large float32 tensors, and sorting each
one, as mergekit does, is what makes its TIES slow). docs/merging.md states this; with no tie at a cut the set is
unique.
"""

from dataclasses import dataclass

import torch

from loratv.merging import random_masks

RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps


def _magnitudes(magnitude: torch.Tensor) -> torch.Tensor:
    flat = magnitude.reshape(-1)
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
    tied: torch.Tensor | None = None  # elements equal to a cut that equal values straddle (either choice is valid)

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


SELECT_CHUNK = 1 << 24  # elements per step of the passes of the selection
SORT_LIMIT = 1 << 20  # up to this many elements a straddled cut is resolved by torch's sort, as mergekit does


def _order_statistics(values: torch.Tensor, ranks: list[int]) -> list[tuple[torch.Tensor, int, int]]:
    """For each 0-based rank r in increasing order: (the value of rank r, how many values are smaller, how many are
    larger), for non-negative finite values. The bits of a non-negative float32 order like the float, so one pass
    counts the top 16 bits of every value, and only each rank's bin is gathered and sorted."""
    n = values.numel()
    if values.dtype != torch.float32:  # float64 magnitudes (fp64 compute off the CPU path): a selection per rank
        out = []
        for r in ranks:
            value = torch.kthvalue(values, r + 1).values
            out.append((value, _count(values, lambda c, v=value: c < v), _count(values, lambda c, v=value: c > v)))
        return out
    keys = values.view(torch.int32)
    histogram = torch.zeros(1 << 16, dtype=torch.int64, device=values.device)
    for i in range(0, n, SELECT_CHUNK):
        histogram += torch.bincount(keys[i:i + SELECT_CHUNK] >> 16, minlength=1 << 16)  # int32 keys: 2.5× faster
    cumulative = histogram.cumsum(0)
    out = []
    for r in ranks:
        bin_ = int(torch.searchsorted(cumulative, torch.tensor(r, device=values.device), right=True))
        before = int(cumulative[bin_ - 1]) if bin_ else 0
        members = torch.cat([values[i:i + SELECT_CHUNK][(keys[i:i + SELECT_CHUNK] >> 16) == bin_]
                             for i in range(0, n, SELECT_CHUNK)])
        ordered = torch.sort(members).values
        value = ordered[r - before]
        smaller = before + int((ordered < value).sum())
        larger = n - before - members.numel() + int((ordered > value).sum())
        out.append((value, smaller, larger))
    return out


def _count(values: torch.Tensor, test) -> int:
    return sum(int(test(values[i:i + SELECT_CHUNK]).sum()) for i in range(0, values.numel(), SELECT_CHUNK))


def _tied_by_index(values: torch.Tensor, cut: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """Of the elements equal to `cut`, those whose position among them (in index order, from 0) lies in
    [first, last]: a stable sort's choice among equal values."""
    equal = torch.cat([torch.nonzero(values[i:i + SELECT_CHUNK] == cut).flatten() + i
                       for i in range(0, values.numel(), SELECT_CHUNK)])
    keep = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    keep[equal[max(first, 0):last + 1]] = True
    return keep


def rank_window(values: torch.Tensor, low_rank: int, count: int,
                top_k: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The elements ranked low_rank … low_rank + count − 1 by increasing value, and the elements whose value equals
    a cut that equal values straddle (None when the window is the same for every sort order).

    A straddled cut is resolved as mergekit's torch sort resolves it for tensors of up to SORT_LIMIT elements (the
    sort is run: the same bits as mergekit), and above that as a stable sort would (equal values in index order:
    the lowest indices first for the largest, the highest first at the low end of an ascending window), without
    sorting the whole tensor (a histogram pass, then the cut values' bins).

    Args:
        values: 1-D non-negative finite values (float32 on the CPU, as mergekit sorts them).
        low_rank: the first rank kept (0-based, increasing order).
        count: how many are kept.
        top_k: the window is the `count` largest (TIES): mergekit takes them from a descending argsort, whose order
            among equal values differs from the ascending sort breadcrumbs uses.

    Returns:
        (kept mask, tied-at-a-straddled-cut mask or None).
    """
    n = values.numel()
    if count <= 0:
        return torch.zeros(n, dtype=torch.bool, device=values.device), None
    top = low_rank + count - 1
    (low, below_low, _), (high, below_high, above_high) = _order_statistics(values, [low_rank, top])
    low_straddled, high_straddled = below_low < low_rank, n - above_high - 1 > top
    if not (low_straddled or high_straddled):
        return (values >= low) & (values <= high), None
    tied = torch.zeros(n, dtype=torch.bool, device=values.device)
    if low_straddled:
        tied |= values == low
    if high_straddled:
        tied |= values == high
    if n <= SORT_LIMIT:
        kept = torch.zeros(n, dtype=torch.bool, device=values.device)
        if top_k:
            kept[torch.argsort(values, descending=True)[:count]] = True
        else:
            kept[torch.sort(values, descending=False).indices[low_rank:top + 1]] = True
        return kept, tied
    if top_k:  # a stable descending order: among the values equal to the cut, the lowest indices come first
        kept = values > low
        return kept | _tied_by_index(values, low, 0, count - _count(values, lambda c: c > low) - 1), tied
    kept = (values > low) & (values < high)
    if bool(low == high):
        kept |= _tied_by_index(values, low, low_rank - below_low, top - below_low)
    else:
        kept |= _tied_by_index(values, low, low_rank - below_low, n)
        kept |= _tied_by_index(values, high, 0, top - below_high)
    return kept, tied


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

    Raises:
        ValueError: an unknown kind.
    """
    if density >= 1:
        return None
    shape, n = magnitude.shape, magnitude.numel()
    flat = magnitude.reshape(-1)
    tied = None
    if kind == "magnitude":
        if density <= 0 or n == 0:
            mask = torch.zeros(n, dtype=torch.bool, device=magnitude.device)
        else:
            k = max(1, int(density * n))
            mask, tied = rank_window(_magnitudes(magnitude), n - k, k, top_k=True)
    elif kind == "magnitude_outliers":
        target, n_top = int(density * n), int(gamma * n)
        n_bottom = max(0, n - target - n_top)
        mask, tied = rank_window(_magnitudes(magnitude), n_bottom, target)
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
    tied = None if tied is None else tied.reshape(shape)
    factor = None
    if rescale:
        before = flat.sum()
        after = (magnitude * mask.to(magnitude.dtype)).sum()
        if not (before < RESCALE_EPS or after < RESCALE_EPS):
            factor = before / after
    return Trim(mask, factor, tied)
