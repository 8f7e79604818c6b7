"""Inner products, norms and subspace overlaps of many weight deltas of one tensor at once, from their factors.

For K items (LoRA deltas ΔWᵢ = sᵢ·Lᵢ@Rᵢ, Lᵢ (m, rᵢ), Rᵢ (rᵢ, n), and dense deltas Tᵢ, all in one orientation):

    <sᵢLᵢRᵢ, sⱼLⱼRⱼ>_F = sᵢsⱼ·sum((LᵢᵀLⱼ) ⊙ (RᵢRⱼᵀ))

for every pair at once: with L = [s₁L₁ … s_KL_K] (m, R) and Rs = [R₁; …; R_K] (R, n), R = Σrᵢ, the R×R matrix
(LᵀL) ⊙ (Rs·Rsᵀ) summed over the (i, j) blocks is the K×K Gram matrix; O((m + n)·R²), never an m×n matrix.
A dense item meets a LoRA item through <T, sLR> = s·sum((LᵀT) ⊙ R), and two dense items through their flattened dot
product. The subspace overlap of two LoRA items' column spaces is ‖QᵢᵀQⱼ‖²_F / min(rᵢ, rⱼ) (1 for nested
subspaces, 0 for orthogonal ones), with Qᵢ an orthonormal basis of Lᵢ's columns (rank by SVD, singular values
below max(m, rᵢ)·eps·σ₁ dropped); the same with Rᵢᵀ for the row spaces. All in float64.
"""

import torch


def _basis(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the column space of x (m, r), float64, of its numerical rank."""
    if x.numel() == 0:
        return x.new_zeros((x.shape[0], 0))
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    tol = max(x.shape) * torch.finfo(torch.float64).eps * float(s[0]) if s.numel() else 0.0
    return u[:, s > tol]


def _block_sums(matrix: torch.Tensor, owners: torch.Tensor, k: int) -> torch.Tensor:
    """Σ over the (i, j) blocks of an R×R matrix whose rows and columns belong to items `owners` (R,)."""
    one_hot = torch.zeros(owners.numel(), k, dtype=torch.float64)
    one_hot[torch.arange(owners.numel()), owners] = 1.0
    return one_hot.T @ matrix @ one_hot


class TensorGram:
    """The K×K inner products (and LoRA subspace overlaps) of the items' deltas of one tensor.

    Args:
        k: the number of items.
    """

    def __init__(self, k: int) -> None:
        self.k = k
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
        gram = torch.zeros(self.k, self.k, dtype=torch.float64)
        if self.lora:
            owners = torch.cat([torch.full((left.shape[1],), item, dtype=torch.long)
                                for item, left, _, _ in self.lora])
            lefts = torch.cat([left * scale for _, left, _, scale in self.lora], dim=1)
            rights = torch.cat([right for _, _, right, _ in self.lora], dim=0)
            gram += _block_sums((lefts.T @ lefts) * (rights @ rights.T), owners, self.k)
            for item, delta in self.dense:
                # <T, sLR> = sum((sL)ᵀT ⊙ R), per rank-one term, then per owner
                per_rank = ((lefts.T @ delta) * rights).sum(1)
                cross = torch.zeros(self.k, dtype=torch.float64).index_add_(0, owners, per_rank)
                gram[item] += cross
                gram[:, item] += cross
        if self.dense:
            items = torch.tensor([item for item, _ in self.dense])
            flat = torch.stack([delta.reshape(-1) for _, delta in self.dense])
            gram[items.unsqueeze(1), items.unsqueeze(0)] += flat @ flat.T
        return (gram + gram.T) / 2  # exactly symmetric

    def overlaps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The column- and row-space overlaps of every pair of LoRA items here, and which pairs have both.

        Returns:
            (column overlap, row overlap, present), each (K, K) float64; present is 1 where both items have a LoRA
            delta of this tensor, else 0 (and the overlaps 0).
        """
        column = torch.zeros(self.k, self.k, dtype=torch.float64)
        row = torch.zeros_like(column)
        present = torch.zeros_like(column)
        if not self.lora:
            return column, row, present
        items = torch.tensor([item for item, _, _, _ in self.lora])
        for side, target in ((0, column), (1, row)):
            bases = [_basis(left if side == 0 else right.T) for _, left, right, _ in self.lora]
            ranks = torch.tensor([b.shape[1] for b in bases], dtype=torch.float64)
            owners = torch.cat([torch.full((b.shape[1],), i, dtype=torch.long) for i, b in enumerate(bases)])
            stacked = torch.cat(bases, dim=1)
            products = stacked.T @ stacked
            squared = _block_sums(products * products, owners, len(bases))
            smaller = torch.minimum(ranks.unsqueeze(1), ranks.unsqueeze(0)).clamp(min=1)
            target[items.unsqueeze(1), items.unsqueeze(0)] = squared / smaller
        present[items.unsqueeze(1), items.unsqueeze(0)] = 1.0
        return column, row, present
