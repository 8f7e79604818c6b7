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

import torch


def _whitener(gram: torch.Tensor, length: int) -> torch.Tensor:
    """W with Wᵀ·gram·W = I on gram's numerical range: V·Λ^{-1/2} over the eigenvalues above √length·eps·λ₁."""
    values, vectors = torch.linalg.eigh(gram)
    if not values.numel() or float(values[-1]) <= 0:
        return gram.new_zeros((gram.shape[0], 0))
    keep = values > (length ** 0.5) * torch.finfo(torch.float64).eps * float(values[-1])
    return vectors[:, keep] / torch.sqrt(values[keep])


GRAM_CHUNK = 256  # columns per block of a Gram matrix: only the blocks on and above the diagonal are multiplied


def _gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx for x (m, R), computing the blocks on and above the diagonal only (about half the work of x.T @ x for
    R ≫ GRAM_CHUNK) and mirroring the rest."""
    r = x.shape[1]
    if r <= GRAM_CHUNK:
        return x.T @ x
    out = torch.empty(r, r, dtype=x.dtype)
    for start in range(0, r, GRAM_CHUNK):
        stop = min(r, start + GRAM_CHUNK)
        block = x[:, start:stop].T @ x[:, start:]
        out[start:stop, start:] = block
        out[start:, start:stop] = block.T
    return (out + out.T) / 2  # the diagonal blocks' own products need not be bitwise symmetric


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
            lefts = torch.cat([left for _, left, _, _ in self.lora], dim=1)
            rights = torch.cat([right for _, _, right, _ in self.lora], dim=0)
            scales = torch.cat([torch.full((left.shape[1],), scale, dtype=torch.float64)
                                for _, left, _, scale in self.lora])
            gram_left, gram_right = _gram(lefts), _gram(rights.T)  # the two passes over m and n
            gram += _block_sums(gram_left * gram_right * torch.outer(scales, scales), owners, k)
            for item, delta in self.dense:
                # <T, sLR> = sum((sL)ᵀT ⊙ R), per rank-one term, then per owner
                per_rank = (((lefts * scales).T @ delta) * rights).sum(1)
                cross = torch.zeros(k, dtype=torch.float64).index_add_(0, owners, per_rank)
                gram[item] += cross
                gram[:, item] += cross
            items = torch.unique(owners)  # an item may hold several modules here (pieces of one tensor)
            for target, blocks, length in ((column, gram_left, lefts.shape[0]), (row, gram_right, rights.shape[1])):
                positions = [torch.nonzero(owners == item).flatten() for item in items.tolist()]
                whiteners = [_whitener(blocks[p][:, p], length) for p in positions]
                ranks = torch.tensor([w.shape[1] for w in whiteners], dtype=torch.float64)
                # Qᵢ = LᵢWᵢ for all items at once: W (R, Σ ranks) holds each Wᵢ on its item's rows
                whiten = torch.zeros(owners.numel(), int(ranks.sum()), dtype=torch.float64)
                basis_owners, column_at = [], 0
                for i, (p, w) in enumerate(zip(positions, whiteners, strict=True)):
                    whiten[p.unsqueeze(1), torch.arange(column_at, column_at + w.shape[1]).unsqueeze(0)] = w
                    basis_owners += [i] * w.shape[1]
                    column_at += w.shape[1]
                products = whiten.T @ blocks @ whiten
                squared = _block_sums(products * products, torch.tensor(basis_owners, dtype=torch.long),
                                      len(whiteners))
                smaller = torch.minimum(ranks.unsqueeze(1), ranks.unsqueeze(0))
                overlap = torch.where(smaller > 0, squared / smaller.clamp(min=1), 0.0)
                target[items.unsqueeze(1), items.unsqueeze(0)] = overlap
            present[items.unsqueeze(1), items.unsqueeze(0)] = 1.0
        if self.dense:
            dense_items = torch.tensor([item for item, _ in self.dense])
            flat = torch.stack([delta.reshape(-1) for _, delta in self.dense])
            gram[dense_items.unsqueeze(1), dense_items.unsqueeze(0)] += flat @ flat.T
        return (gram + gram.T) / 2, column, row, present  # exactly symmetric
