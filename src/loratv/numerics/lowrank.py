"""Inner products and norms of LoRA deltas computed from their factors, never materialising the m×n matrix.

Every module is written in the stored orientation of its base tensor as ΔW = s·L@R, L (m, r), R (r, n):
L = B, R = A for nn.Linear; L = Aᵀ, R = Bᵀ for Conv1D and embeddings (their ΔW is stored transposed). Then

    <s·L@R, T>_F = s · sum((Lᵀ T) ⊙ R)                    accumulated over row blocks of T: Lᵀ T = Σ L[i:j]ᵀ T[i:j]
    ‖Σ_i s_i L_i@R_i‖_F² = Σ_ij s_i s_j · sum((L_iᵀL_j) ⊙ (R_i R_jᵀ))    r×r Gram matrices, O(r²·(m+n))

All in float64 (the stored factors are upcast exactly).
"""

from dataclasses import dataclass, field

import torch


@dataclass
class Factors:
    """ΔW = scale · left @ right in the base tensor's stored orientation, float64."""

    left: torch.Tensor  # (m, r)
    right: torch.Tensor  # (r, n)
    scale: float
    exact_products: bool = False  # stored with ≤ 26 significant bits: every product is exact in float64
    _abs: tuple | None = field(default=None, repr=False)  # |L| and |s|·|R|, made on first use

    @classmethod
    def from_lora(cls, a: torch.Tensor, b: torch.Tensor, scale: float, transposed: bool) -> "Factors":
        """The factors of a LoRA pair in the base tensor's stored orientation, upcast exactly to float64.

        Args:
            a: lora_A, (r, in), any float dtype.
            b: lora_B, (out, r), any float dtype.
            scale: the LoRA scale s (alpha / r, or what the adapter config says).
            transposed: the base tensor is stored (in, out) (Conv1D, embeddings): then L = Aᵀ, R = Bᵀ; else L = B, R = A.

        Returns:
            The Factors; `exact_products` is True when neither input was float64 (≤ 26 significant bits each).
        """
        exact = torch.float64 not in (a.dtype, b.dtype)
        a64, b64 = a.to(torch.float64), b.to(torch.float64)
        return cls(a64.T, b64.T, scale, exact) if transposed else cls(b64, a64, scale, exact)

    @property
    def rank(self) -> int:
        """The LoRA rank r: the number of columns of `left`."""
        return self.left.shape[1]

    def to(self, device: torch.device | str) -> "Factors":
        """A copy with both factors moved to `device` (the `_abs` cache is not carried over).

        Args:
            device: the target device.

        Returns:
            A new Factors with the same scale and `exact_products`.
        """
        return Factors(self.left.to(device), self.right.to(device), self.scale, self.exact_products)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of s·L@R, dense, float64.

        Args:
            start: first row (inclusive), in the base tensor's stored orientation.
            stop: last row (exclusive).

        Returns:
            A (stop - start, n) float64 tensor on the factors' device.
        """
        return (self.left[start:stop] @ self.right).mul_(self.scale)

    def rows_compensated_pair(self, start: int, stop: int) -> tuple:
        """Rows of s·L@R as an unevaluated sum high + low (Dot2's pair, then Dekker's exact product by s):
        |high + low − s·Σ_k L_ik R_kj| ≤ γ_r(u)²·|s|·Σ_k |L_ik R_kj| + 2u·(|low| + |s·e|), e the pair's low part
        before the multiply by s (returned as the third element, already multiplied by s).

        Args:
            start: first row (inclusive), in the base tensor's stored orientation.
            stop: last row (exclusive).

        Returns:
            (high, low, s·e), each a (stop - start, n) float64 tensor on the factors' device.
        """
        total = torch.zeros((stop - start, self.right.shape[1]), dtype=torch.float64, device=self.left.device)
        error = torch.zeros_like(total)
        for k in range(self.rank):
            column, row = self.left[start:stop, k], self.right[k]
            product = torch.outer(column, row)
            if not self.exact_products:
                error += _product_error(column, row, product)
            total, step_error = two_sum(total, product)
            error += step_error
        scale = torch.tensor(float(self.scale), dtype=torch.float64, device=total.device)
        high = total * scale
        sh, sl = _split(scale)
        th, tl = _split(total)
        product_error = ((th * sh - high) + th * sl + tl * sh) + tl * sl  # Dekker: high + this == s·total exactly
        scaled_error = error * scale
        return high, product_error + scaled_error, scaled_error

    def abs_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows of |s|·(|L|@|R|): the scale of the rounding error of any evaluation of those rows.

        |L| and |s|·|R| are computed on the first call and cached.

        Args:
            start: first row (inclusive).
            stop: last row (exclusive).

        Returns:
            A (stop - start, n) non-negative float64 tensor.
        """
        if self._abs is None:
            self._abs = (self.left.abs(), self.right.abs().mul_(abs(self.scale)))
        return self._abs[0][start:stop] @ self._abs[1]


@dataclass
class ExpertFactors:
    """ΔW of a 3-D expert stack (target_parameters): per expert e, s·B_e@A_e with A (E, r, in), B (out, r, E),
    stored (E, out, in), or (E, in, out) when `transposed`. Rows are experts; float64."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transposed: bool

    @classmethod
    def from_lora(cls, a: torch.Tensor, b: torch.Tensor, r: int, scale: float, transposed: bool) -> "ExpertFactors":
        """The per-expert factors of a stacked LoRA pair, upcast to float64 and reshaped to A (E, r, in), B (out, r, E).

        Args:
            a: lora_A, (E·r, in): expert e's rows are e·r … e·r + r - 1.
            b: lora_B, (out, r·E): column k·E + e belongs to expert e.
            r: the rank per expert (E = a.shape[0] // r).
            scale: the LoRA scale s.
            transposed: the base stack is stored (E, in, out) rather than (E, out, in).

        Returns:
            The ExpertFactors.
        """
        experts = a.shape[0] // r
        a64 = a.to(torch.float64).reshape(experts, r, a.shape[-1])
        return cls(a64, b.to(torch.float64).reshape(b.shape[0], r, experts), scale, transposed)

    @property
    def rank(self) -> int:
        """The LoRA rank r per expert."""
        return self.a.shape[1]

    def to(self, device: torch.device | str) -> "ExpertFactors":
        """A copy with both factors moved to `device`.

        Args:
            device: the target device.

        Returns:
            A new ExpertFactors with the same scale and orientation.
        """
        return ExpertFactors(self.a.to(device), self.b.to(device), self.scale, self.transposed)

    def _product(self, a, b, start, stop):
        pattern = "o r e, e r i -> e i o" if self.transposed else "o r e, e r i -> e o i"
        return torch.einsum(pattern, b[:, :, start:stop], a[start:stop])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """ΔW of experts [start, stop), dense, float64.

        Args:
            start: first expert (inclusive).
            stop: last expert (exclusive).

        Returns:
            A (stop - start, out, in) tensor, or (stop - start, in, out) when `transposed`.
        """
        return self._product(self.a, self.b, start, stop).mul_(self.scale)

    def abs_rows(self, start: int, stop: int) -> torch.Tensor:
        """|s|·(|B_e|@|A_e|) for experts [start, stop): the scale of the rounding error of any evaluation of them.

        Args:
            start: first expert (inclusive).
            stop: last expert (exclusive).

        Returns:
            A non-negative float64 tensor shaped as `rows(start, stop)`.
        """
        return self._product(self.a.abs(), self.b.abs(), start, stop).mul_(abs(self.scale))


def two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """Knuth's TwoSum: (fl(a + b), the exact error of that addition).

    Args:
        a: a float tensor.
        b: a float tensor of a's shape.

    Returns:
        (sum, error) with sum + error == a + b exactly (barring overflow).
    """
    total = a + b
    virtual = total - a
    return total, (a - (total - virtual)) + (b - virtual)


def _split(x: torch.Tensor):
    """Veltkamp's split: x = high + low, each with at most 26 significant bits."""
    c = x * 134217729.0  # 2^27 + 1
    high = c - (c - x)
    return high, x - high


def _product_error(column: torch.Tensor, row: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """Dekker's TwoProduct: the exact error of the rounded outer product column ⊗ row."""
    ch, cl = _split(column)
    rh, rl = _split(row)
    return ((torch.outer(ch, rh) - product) + torch.outer(ch, rl) + torch.outer(cl, rh)) + torch.outer(cl, rl)


class InnerProduct:
    """<s·L@R, T>_F accumulated over row blocks of T: only the r×n matrix Lᵀ T is kept."""

    def __init__(self, factors: Factors):
        self.factors = factors
        self.lt = torch.zeros_like(factors.right)

    def add_rows(self, t_rows: torch.Tensor, start: int, stop: int) -> None:
        """Accumulate Lᵀ T for one row block of T.

        Args:
            t_rows: rows [start, stop) of T, (stop - start, n), in the factors' orientation and device; upcast to float64.
            start: first row (inclusive).
            stop: last row (exclusive).
        """
        self.lt.addmm_(self.factors.left[start:stop].T, t_rows.to(torch.float64))

    def value(self) -> float:
        """The inner product so far.

        Returns:
            s · sum((Lᵀ T) ⊙ R) over the rows added, as a Python float.
        """
        return float(self.factors.scale * (self.lt * self.factors.right).sum())


def norm_sq(parts: list) -> float:
    """‖Σ s_i L_i@R_i‖_F² from the Gram matrices of every pair of parts (cross terms included).

    Args:
        parts: Factors of the same (m, n) matrix, on one device.

    Returns:
        The squared Frobenius norm, clamped at 0 (a negative sum can only be rounding of a zero norm).
    """
    total = 0.0
    for p in parts:
        for q in parts:
            total += p.scale * q.scale * float(((p.left.T @ q.left) * (p.right @ q.right.T)).sum())
    return max(total, 0.0)  # a sum of squares: a negative value can only be rounding of a zero norm


def factored_inner(a: torch.Tensor, b: torch.Tensor, scale: float, t: torch.Tensor) -> float:
    """<scale·B@A, T> for A (r, n), B (m, r), T (m, n), in float64.

    Args:
        a: lora_A, (r, n).
        b: lora_B, (m, r).
        scale: the LoRA scale.
        t: the (m, n) tensor, same device as the factors.

    Returns:
        The Frobenius inner product as a Python float.
    """
    inner = InnerProduct(Factors.from_lora(a, b, scale, transposed=False))
    inner.add_rows(t, 0, t.shape[0])
    return inner.value()


def factored_norm_sq(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """‖scale·B@A‖_F² from the r×r Grams BᵀB and A·Aᵀ, in float64.

    Args:
        a: lora_A, (r, n).
        b: lora_B, (m, r).
        scale: the LoRA scale.

    Returns:
        The squared Frobenius norm (≥ 0) as a Python float.
    """
    return norm_sq([Factors.from_lora(a, b, scale, transposed=False)])
