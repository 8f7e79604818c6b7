"""Inner products, norms and subspace overlaps of many weight deltas of one tensor at once, from their factors.

For K items (LoRA deltas ΔWᵢ = sᵢ·Lᵢ@Rᵢ, Lᵢ (m, rᵢ), Rᵢ (rᵢ, n), and dense deltas Tᵢ, all in one orientation):

    <sᵢLᵢRᵢ, sⱼLⱼRⱼ>_F = sᵢsⱼ·sum((LᵢᵀLⱼ) ⊙ (RᵢRⱼᵀ))

for every pair at once: with L = [s₁L₁ … s_KL_K] (m, R) and Rs = [R₁; …; R_K] (R, n), R = Σrᵢ, the R×R matrix
(LᵀL) ⊙ (Rs·Rsᵀ) summed over the (i, j) blocks is the K×K Gram matrix; O((m + n)·R²), never an m×n matrix.
A dense item meets a LoRA item through <T, sLR> = s·sum((LᵀT) ⊙ R), and two dense items through their flattened dot
product. The subspace overlap of two LoRA items' column spaces is ‖QᵢᵀQⱼ‖²_F / min(rᵢ, rⱼ) (1 for nested
subspaces, 0 for orthogonal ones), with Qᵢ an orthonormal basis of Lᵢ's columns; the same with Rᵢᵀ for the row
spaces. It reuses the Gram blocks: with LᵢᵀLᵢ = VΛVᵀ and Wᵢ = VΛ^{-1/2} on the eigenvalues above √m·eps·λ₁ (the
Gram's own rounding; smaller directions are noise), Qᵢ = LᵢWᵢ and QᵢᵀQⱼ = Wᵢᵀ(LᵢᵀLⱼ)Wⱼ — O(R²·r) more, no second
pass over m or n. All in float64.
"""

from dataclasses import dataclass

import torch


def _whitener(gram: torch.Tensor, length: int) -> torch.Tensor:
    """W with Wᵀ·gram·W = I on gram's numerical range: V·Λ^{-1/2} over the eigenvalues above √length·eps·λ₁."""
    values, vectors = torch.linalg.eigh(gram)
    if not values.numel() or float(values[-1]) <= 0:
        return gram.new_zeros((gram.shape[0], 0))
    keep = values > (length ** 0.5) * torch.finfo(torch.float64).eps * float(values[-1])
    return vectors[:, keep] / torch.sqrt(values[keep])


GRAM_CHUNK = 256  # columns per block of a Gram matrix: only the blocks on and above the diagonal are multiplied


class Workspace:
    """Buffers reused from one tensor to the next: the stacked factors and their R×R Grams are tens of MB each, and
    allocating them afresh for every tensor costs more in page faults than their arithmetic in places."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple) -> torch.Tensor:
        """An uninitialised float64 tensor of `shape`, the same memory as the last call with `name` when it fits.

        Args:
            name: the buffer's role.
            shape: the shape wanted.

        Returns:
            The tensor (its contents are undefined).
        """
        size = 1
        for d in shape:
            size *= int(d)
        held = self._buffers.get(name)
        if held is None or held.numel() < size:
            held = self._buffers[name] = torch.empty(size, dtype=torch.float64)
        return held[:size].view(shape)


def _gram(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """xᵀx for x (m, R), computing the blocks on and above the diagonal only (about half the work of x.T @ x for
    R ≫ GRAM_CHUNK) and mirroring the rest; into `out` (R, R) when given."""
    r = x.shape[1]
    if r <= GRAM_CHUNK:
        return torch.matmul(x.T, x, out=out) if out is not None else x.T @ x
    out = torch.empty(r, r, dtype=x.dtype) if out is None else out
    for start in range(0, r, GRAM_CHUNK):
        stop = min(r, start + GRAM_CHUNK)
        block = x[:, start:stop].T @ x[:, start:]
        out[start:stop, start:] = block
        out[start:, start:stop] = block.T
        diagonal = out[start:stop, start:stop]
        diagonal.copy_((diagonal + diagonal.T) / 2)  # its own product need not be bitwise symmetric
    return out


def _positions(owners: torch.Tensor, item: int) -> slice | torch.Tensor:
    """The rows of `item` among the stacked factors: a slice when they are contiguous (the usual case), a view
    instead of a gather."""
    where = torch.nonzero(owners == item).flatten()
    first, last = int(where[0]), int(where[-1])
    return slice(first, last + 1) if last - first + 1 == where.numel() else where


def _block_sums(matrix: torch.Tensor, owners: torch.Tensor, k: int) -> torch.Tensor:
    """Σ over the (i, j) blocks of an R×R matrix whose rows and columns belong to items `owners` (R,): two
    index_add passes, O(R²)."""
    rows = torch.zeros(k, matrix.shape[1], dtype=matrix.dtype).index_add_(0, owners, matrix)
    return torch.zeros(k, k, dtype=matrix.dtype).index_add_(1, owners, rows)


class TensorGram:
    """The K×K inner products (and LoRA subspace overlaps) of the items' deltas of one tensor.

    Args:
        k: the number of items.
        workspace: buffers shared with the other tensors' TensorGrams (None: its own).
    """

    def __init__(self, k: int, workspace: Workspace | None = None) -> None:
        self.k = k
        self.workspace = workspace or Workspace()
        self.lora: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []  # (item, L, R, s)
        self.dense: list[tuple[int, torch.Tensor]] = []  # (item, T)

    def add_lora(self, item: int, left: torch.Tensor, right: torch.Tensor, scale: float) -> None:
        """Item `item`'s delta is scale·left@right.

        Args:
            item: the item's position.
            left: (m, r).
            right: (r, n).
            scale: the LoRA scale s.
        """
        self.lora.append((item, left.to(torch.float64), right.to(torch.float64), float(scale)))

    def add_dense(self, item: int, delta: torch.Tensor) -> None:
        """Item `item`'s delta is the dense (m, n) tensor `delta`.

        Args:
            item: the item's position.
            delta: the delta, in the LoRA items' orientation.
        """
        self.dense.append((item, delta.to(torch.float64).reshape(delta.shape[0], -1)))

    def inner_products(self) -> torch.Tensor:
        """The K×K Gram matrix of the items' deltas (an item without a delta here: zero row and column).

        Returns:
            A symmetric (K, K) float64 tensor.
        """
        return self.compute()[0]

    def overlaps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The column- and row-space overlaps of every pair of LoRA items here, and which pairs have both.

        Returns:
            (column overlap, row overlap, present), each (K, K) float64; present is 1 where both items have a LoRA
            delta of this tensor, else 0 (and the overlaps 0).
        """
        return self.compute()[1:]

    def compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything at once (computed on the first call, then kept): the K×K inner products, the column and row
        overlaps, and the pairs present.

        Returns:
            (inner products, column overlap, row overlap, present), each (K, K) float64.
        """
        if getattr(self, "_computed", None) is None:
            self._computed = self._compute()
        return self._computed

    def _compute(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        k = self.k
        gram = torch.zeros(k, k, dtype=torch.float64)
        column = torch.zeros_like(gram)
        row = torch.zeros_like(gram)
        present = torch.zeros_like(gram)
        if self.lora:
            owners = torch.cat([torch.full((left.shape[1],), item, dtype=torch.long)
                                for item, left, _, _ in self.lora])
            ws = self.workspace
            total = owners.numel()
            lefts = torch.cat([left for _, left, _, _ in self.lora], dim=1,
                              out=ws.get("lefts", (self.lora[0][1].shape[0], total)))
            rights_t = torch.cat([right.T for _, _, right, _ in self.lora], dim=1,
                                 out=ws.get("rights_t", (self.lora[0][2].shape[1], total)))
            rights = rights_t.T
            scales = torch.cat([torch.full((left.shape[1],), scale, dtype=torch.float64)
                                for _, left, _, scale in self.lora])
            # the two passes over m and n
            gram_left = _gram(lefts, ws.get("gram_left", (total, total)))
            gram_right = _gram(rights_t, ws.get("gram_right", (total, total)))
            weighted = torch.mul(gram_left, gram_right, out=ws.get("weighted", (total, total)))
            weighted.mul_(scales.unsqueeze(1)).mul_(scales.unsqueeze(0))
            gram += _block_sums(weighted, owners, k)
            for item, delta in self.dense:
                # <T, sLR> = sum((sL)ᵀT ⊙ R), per rank-one term, then per owner
                per_rank = (((lefts * scales).T @ delta) * rights).sum(1)
                cross = torch.zeros(k, dtype=torch.float64).index_add_(0, owners, per_rank)
                gram[item] += cross
                gram[:, item] += cross
            items = torch.unique(owners)  # an item may hold several modules here (pieces of one tensor)
            for target, blocks, length in ((column, gram_left, lefts.shape[0]), (row, gram_right, rights.shape[1])):
                positions = [_positions(owners, item) for item in items.tolist()]
                whiteners = [_whitener(blocks[p][:, p], length) for p in positions]  # slices: views
                ranks = torch.tensor([w.shape[1] for w in whiteners], dtype=torch.float64)
                # QᵢᵀQⱼ = Wᵢᵀ(LᵢᵀLⱼ)Wⱼ for all pairs: the block-diagonal W applied block by block, O(R²·r)
                basis_owners = torch.cat([torch.full((w.shape[1],), i, dtype=torch.long)
                                          for i, w in enumerate(whiteners)])
                bounds = torch.cumsum(torch.tensor([0] + [w.shape[1] for w in whiteners]), 0).tolist()
                right_applied = ws.get("right_applied", (owners.numel(), bounds[-1]))
                for p, w, a, b in zip(positions, whiteners, bounds, bounds[1:], strict=False):
                    right_applied[:, a:b] = blocks[:, p] @ w
                products = ws.get("products", (bounds[-1], bounds[-1]))
                for p, w, a, b in zip(positions, whiteners, bounds, bounds[1:], strict=False):
                    products[a:b] = w.T @ right_applied[p]
                squared = _block_sums(products.mul_(products), basis_owners, len(whiteners))
                smaller = torch.minimum(ranks.unsqueeze(1), ranks.unsqueeze(0))
                overlap = torch.where(smaller > 0, squared / smaller.clamp(min=1), 0.0)
                target[items.unsqueeze(1), items.unsqueeze(0)] = overlap
            present[items.unsqueeze(1), items.unsqueeze(0)] = 1.0
        if self.dense:
            dense_items = torch.tensor([item for item, _ in self.dense])
            flat = torch.stack([delta.reshape(-1) for _, delta in self.dense])
            gram[dense_items.unsqueeze(1), dense_items.unsqueeze(0)] += flat @ flat.T
        return (gram + gram.T) / 2, column, row, present  # exactly symmetric


SIGN_BLOCK = 1 << 20  # elements per item per step of the sign pass


@dataclass
class SignPartial:
    """One tensor's share of the sign statistics: conflict and common-support counts among its items, and the
    trimmed magnitude that agrees with the elected sign, of the total."""

    items: list
    conflicts: torch.Tensor
    common: torch.Tensor
    agreeing: float
    mass: float


class SignConflicts:
    """TIES's view of K deltas, accumulated tensor by tensor: each delta trimmed to its top-k support (the elements
    whose |ΔWᵢ| is at least its k-th largest, k = density·numel), then per pair the fraction of their common support
    where the signs differ, and over all items the share of trimmed magnitude whose sign agrees with the elected
    sign(Σᵢ trimmedᵢ) (TIES's election, ties to +): 1 means no conflict.

    Args:
        k: the number of items.
        density: the fraction of each tensor kept, in (0, 1].
    """

    def __init__(self, k: int, density: float) -> None:
        self.k, self.density = k, density
        self.conflicts = torch.zeros(k, k, dtype=torch.float64)
        self.common = torch.zeros(k, k, dtype=torch.float64)
        self.agreeing_mass = 0.0
        self.mass = 0.0

    def add(self, items: list[int], rows_of: list, shape: tuple) -> float | None:
        """One tensor, measured (see `measure`) and added to the totals.

        Args:
            items: the items' positions.
            rows_of: per item, a callable (start, stop) -> rows [start, stop) of its (m, n) delta, float64.
            shape: (m, n).

        Returns:
            This tensor's agreement ratio (None when no element is kept).
        """
        return self.accumulate(self.measure(items, rows_of, shape))

    def measure(self, items: list[int], rows_of: list, shape: tuple) -> "SignPartial":
        """One tensor's counts and masses, each item's delta given by rows, so that only one item's whole delta (for
        its cut) and one block of rows of every item are ever held.

        Args:
            items: the items' positions.
            rows_of: per item, a callable (start, stop) -> rows [start, stop) of its (m, n) delta, float64.
            shape: (m, n).

        Returns:
            The tensor's partial sums, to be added by `accumulate` (tensors in a fixed order).
        """
        m, n = shape
        keep = max(1, int(self.density * m * n))
        cuts = torch.stack([torch.kthvalue(rows(0, m).abs().reshape(-1), m * n - keep + 1).values for rows in rows_of])
        step = max(1, SIGN_BLOCK // max(1, n))
        conflicts = torch.zeros(len(items), len(items), dtype=torch.float64)
        common = torch.zeros(len(items), len(items), dtype=torch.float64)
        agreeing = mass = 0.0
        for start in range(0, m, step):
            stop = min(m, start + step)
            block = torch.stack([rows(start, stop).reshape(-1) for rows in rows_of])
            kept = block.abs() >= cuts.unsqueeze(1)
            trimmed = torch.where(kept, block, 0.0)
            positive, negative = (trimmed > 0).double(), (trimmed < 0).double()
            support = kept.double()
            # element counts: integers in float64, exact in any order
            conflicts += positive @ negative.T + negative @ positive.T
            common += support @ support.T
            elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
            magnitude = trimmed.abs()
            agreeing += float((magnitude * (torch.sign(trimmed) == elected)).sum())
            mass += float(magnitude.sum())
        return SignPartial(list(items), conflicts, common, agreeing, mass)

    def accumulate(self, partial: "SignPartial") -> float | None:
        """Add one tensor's partial sums to the totals.

        Args:
            partial: what `measure` returned for the tensor.

        Returns:
            The tensor's agreement ratio (None when no element is kept).
        """
        index = torch.tensor(partial.items)
        self.conflicts[index.unsqueeze(1), index.unsqueeze(0)] += partial.conflicts
        self.common[index.unsqueeze(1), index.unsqueeze(0)] += partial.common
        self.agreeing_mass += partial.agreeing
        self.mass += partial.mass
        return partial.agreeing / partial.mass if partial.mass > 0 else None

    def rates(self) -> torch.Tensor:
        """Per pair, conflicting elements over common support elements (NaN where they share none).

        Returns:
            (K, K) float64.
        """
        return torch.where(self.common > 0, self.conflicts / self.common.clamp(min=1), torch.nan)
