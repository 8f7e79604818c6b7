"""Spectra and ranks of weight deltas (groundwork for `loratv analyze --spectrum` and `to-lora`).

- A LoRA delta ΔW = Σ s_i L_i R_i has rank ≤ Σ r_i; its singular values and vectors come exactly (to float64
  rounding) from its factors: with L = [s_1 L_1 … ] = Q_L K_L and Rᵀ = [R_1ᵀ …] = Q_R K_R (thin QR), ΔW = Q_L (K_L K_Rᵀ)
  Q_Rᵀ, so the SVD of the small core K_L K_Rᵀ gives everything in O((m + n)·r²), never forming the m×n matrix.
- A dense matrix (a task vector) gets a randomized SVD (Halko, Martinsson & Tropp 2011: Gaussian sketch with
  oversampling, power iterations with re-orthonormalisation), and the Frobenius norm of what it leaves out,
  computed exactly from the residual, not estimated.
- Rank summaries: numerical rank above a noise floor, stable rank ‖A‖²_F / σ₁², effective rank (Roy & Vetterli's
  exp of the spectral entropy), energy in the top k; principal angles between subspaces.
- `truncate`: the smallest truncated SVD meeting a rank, energy or relative-error criterion, as balanced LoRA
  factors, with the error measured on the residual (and again after rounding the factors to their storage dtype).
All in float64.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class Spectrum:
    """Leading singular triplets: A ≈ U diag(S) Vᵀ, U (m, k), S (k,) descending, V (n, k)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    frobenius: float  # ‖A‖_F
    residual: float  # ‖A − U diag(S) Vᵀ‖_F (0 for an exact low-rank spectrum)

    @property
    def energy(self) -> float:
        """Fraction of ‖A‖²_F in the kept triplets."""
        total = self.frobenius**2
        return float((self.s**2).sum()) / total if total > 0 else 1.0


def lora_spectrum(parts: list) -> Spectrum:
    """Exact SVD of Σ s_i L_i R_i (lowrank.Factors in one orientation) from the factors alone.

    Args:
        parts: lowrank.Factors of the same (m, n) matrix, float64, on one device.

    Returns:
        The Spectrum with every triplet (at most Σ r_i, zeros included), `frobenius` from the singular values and
        `residual` 0.
    """
    left = torch.cat([p.left * p.scale for p in parts], dim=1)  # (m, Σr)
    right = torch.cat([p.right for p in parts], dim=0)  # (Σr, n)
    q_left, k_left = torch.linalg.qr(left)
    q_right, k_right = torch.linalg.qr(right.T)
    u_core, s, vh_core = torch.linalg.svd(k_left @ k_right.T)
    frobenius = float(torch.linalg.vector_norm(s))
    return Spectrum(q_left @ u_core, s, q_right @ vh_core.T, frobenius, 0.0)


def randomized_spectrum(a: torch.Tensor, k: int, *, oversample: int = 10, power_iterations: int = 2,
                        seed: int = 0) -> Spectrum:
    """The k leading singular triplets of a dense matrix by randomized SVD, with the exact residual norm.

    Args:
        a: the (m, n) matrix, any float dtype (computed in float64 on its device).
        k: how many triplets to keep.
        oversample: extra sketch columns beyond k (the sketch is min(m, n, k + oversample) wide).
        power_iterations: passes of A Aᵀ applied to the sketch.
        seed: seed of the CPU generator for the Gaussian sketch (results are reproducible).

    Returns:
        The Spectrum with min(k, sketch width) triplets, ‖A‖_F, and the residual ‖A − U diag(S) Vᵀ‖_F computed exactly.
    """
    a = a.to(torch.float64)
    m, n = a.shape
    width = min(m, n, k + oversample)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, dtype=torch.float64).to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iterations):  # (A Aᵀ)^q sharpens the decay; orthonormalise each half step for stability
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    u_small, s, vh = torch.linalg.svd(q.T @ a, full_matrices=False)
    keep = min(k, s.numel())
    u, s, v = q @ u_small[:, :keep], s[:keep], vh[:keep].T
    return Spectrum(u, s, v, float(torch.linalg.matrix_norm(a)), residual_norm(a, u * s, v.T))


def exact_spectrum(a: torch.Tensor, k: int | None = None) -> Spectrum:
    """Full SVD (for small matrices, or on request), truncated to k triplets.

    Args:
        a: the (m, n) matrix, any float dtype (computed in float64).
        k: how many triplets to keep; None keeps all min(m, n).

    Returns:
        The Spectrum; `residual` is the norm of the dropped singular values.
    """
    a = a.to(torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    keep = s.numel() if k is None else min(k, s.numel())
    tail = float(torch.linalg.vector_norm(s[keep:]))
    return Spectrum(u[:, :keep], s[:keep], vh[:keep].T, float(torch.linalg.vector_norm(s)), tail)


def residual_norm(a: torch.Tensor, left: torch.Tensor, right: torch.Tensor, block_rows: int | None = None) -> float:
    """‖A − left @ right‖_F in float64, a row block at a time, so no second m×n matrix is ever formed.

    Args:
        a: the (m, n) matrix, any float dtype (each block is upcast to float64).
        left: (m, k), float64, same device as a.
        right: (k, n), float64.
        block_rows: rows per block; None picks about 32 MB of float64 per block.

    Returns:
        The Frobenius norm of the residual.
    """
    m, n = a.shape
    step = block_rows or max(1, (1 << 22) // max(1, n))  # 32 MB of float64 per block
    total = 0.0
    for start in range(0, m, step):
        block = a[start:start + step].to(torch.float64) - left[start:start + step] @ right
        total += float(torch.dot(block.reshape(-1), block.reshape(-1)))
    return math.sqrt(total)


def numerical_rank(s: torch.Tensor, floor: float) -> int:
    """How many singular values exceed the noise floor (e.g. the Frobenius norm of the merge's rounding).

    Args:
        s: singular values, (k,).
        floor: the noise floor; values strictly above it count.

    Returns:
        The count.
    """
    return int((s > floor).sum())


def stable_rank(s: torch.Tensor, frobenius: float | None = None) -> float:
    """‖A‖²_F / σ₁² (≤ rank; insensitive to tiny singular values).

    Args:
        s: singular values, descending (s[0] is σ₁).
        frobenius: ‖A‖_F when s is truncated; None uses Σ s².

    Returns:
        The stable rank, or 0.0 for an empty or zero spectrum.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    total = float((s**2).sum()) if frobenius is None else frobenius**2
    return total / float(s[0]) ** 2


def effective_rank(s: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp(−Σ p_i log p_i) with p_i = σ_i / Σσ.

    Args:
        s: singular values (non-negative).

    Returns:
        The effective rank (between 1 and the number of non-zero values), or 0.0 when Σσ is 0.
    """
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * torch.log(p)).sum()))


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of a and b (each orthonormalised first).

    Args:
        a: (m, p), the columns spanning the first subspace.
        b: (m, q), the second; same device.

    Returns:
        min(p, q) angles in [0, π/2], float64.
    """
    qa, _ = torch.linalg.qr(a.to(torch.float64))
    qb, _ = torch.linalg.qr(b.to(torch.float64))
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(-1.0, 1.0)
    return torch.arccos(cosines)



@dataclass
class Truncation:
    """ΔW ≈ B @ A (PEFT's lora_B, lora_A with scaling 1, i.e. lora_alpha = r), balanced: B = U√S, A = √S Vᵀ."""

    a: torch.Tensor  # (k, n), float64
    b: torch.Tensor  # (m, k), float64
    rank: int
    frobenius: float  # ‖T‖_F
    error: float  # ‖T − B A‖_F with the float64 factors, computed from the residual itself
    stored_error: float  # the same with the factors rounded to the storage dtype, as PEFT will load them
    method: str = "exact"  # "exact" SVD or "randomized" (Halko et al., checked on the exact residual)

    @property
    def relative_error(self) -> float:
        """‖T − B A‖_F / ‖T‖_F with the float64 factors (0.0 for a zero T)."""
        return self.error / self.frobenius if self.frobenius > 0 else 0.0

    @property
    def energy(self) -> float:
        """Fraction of ‖T‖²_F the factors keep (1 − relative_error²: B A is T's projection)."""
        return 1.0 - self.relative_error**2


def truncate(t: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
             max_error: float | None = None, max_rank: int | None = None,
             storage_dtype: torch.dtype = torch.float32, exact_max_dim: int = 2048, seed: int = 0) -> Truncation:
    """The smallest truncated SVD of t meeting exactly one criterion: a given rank, a kept fraction of ‖T‖²_F
    (`energy`), or a relative Frobenius error ‖T − BA‖_F / ‖T‖_F ≤ `max_error`; never above `max_rank`. Exact SVD
    when min(m, n) ≤ exact_max_dim, else randomized with the rank doubled until the criterion holds on the exact
    residual.

    Args:
        t: the (m, n) matrix, any float dtype (computed in float64).
        rank: keep exactly this many triplets (capped at min(m, n) and max_rank).
        energy: keep the fewest triplets whose share of ‖T‖²_F is at least this.
        max_error: keep the fewest triplets with relative Frobenius error at most this.
        max_rank: an upper limit on the rank, whatever the criterion; None: min(m, n).
        storage_dtype: the dtype the factors will be stored in, for `stored_error`.
        exact_max_dim: the largest min(m, n) that gets an exact SVD.
        seed: seed of the randomized SVD.

    Returns:
        The Truncation: balanced factors, the rank reached, and the errors measured on the residual.

    Raises:
        ValueError: not exactly one of rank, energy and max_error given.
    """
    if sum(c is not None for c in (rank, energy, max_error)) != 1:
        raise ValueError("give exactly one of rank, energy, max_error")
    t = t.to(torch.float64)
    m, n = t.shape
    total = float(torch.linalg.matrix_norm(t))
    full = min(m, n) if max_rank is None else min(m, n, max_rank)

    def meets(k: int, residual: float) -> bool:
        if k >= full:
            return True
        if rank is not None:
            return k >= min(rank, full)
        if total == 0:
            return True
        if energy is not None:
            return 1.0 - (residual / total) ** 2 >= energy
        assert max_error is not None  # exactly one criterion was given, checked above
        return residual / total <= max_error

    method = "exact" if min(m, n) <= exact_max_dim else "randomized"
    if method == "exact":
        spec = exact_spectrum(t)
        tails = torch.sqrt(torch.flip(torch.cumsum(torch.flip(spec.s**2, [0]), 0), [0]))  # tails[k] = ‖s[k:]‖
        tails = torch.cat([tails, torch.zeros(1, dtype=torch.float64)])
        k = next(k for k in range(full + 1) if meets(k, float(tails[k])))
        u, s, v = spec.u[:, :k], spec.s[:k], spec.v[:, :k]
    else:
        k = min(full, rank if rank is not None else 16)
        while True:
            spec = randomized_spectrum(t, k, seed=seed)
            if meets(k, spec.residual) or k >= full:
                break
            k = min(full, 2 * k)
        # the smallest prefix of the sketch's triplets that meets the criterion: ‖T − U_j S_j V_jᵀ‖² = ‖T‖² − Σ_{i<j}
        # s_i² picks it, the residual itself confirms it (the subtraction can cancel)
        kept = torch.cumsum(spec.s**2, 0)
        k = next((j for j in range(1, k + 1) if meets(j, math.sqrt(max(total**2 - float(kept[j - 1]), 0.0)))), k)
        while k < spec.s.numel() and not meets(k, _residual(t, spec, k)):
            k += 1
        u, s, v = spec.u[:, :k], spec.s[:k], spec.v[:, :k]
    root = torch.sqrt(s)
    b, a = u * root, (v * root).T
    error = residual_norm(t, b, a) if k else total
    stored_error = residual_norm(t, b.to(storage_dtype).double(), a.to(storage_dtype).double()) if k else total
    return Truncation(a, b, k, total, error, stored_error, method)


def _residual(t: torch.Tensor, spec: Spectrum, k: int) -> float:
    return residual_norm(t, spec.u[:, :k] * spec.s[:k], spec.v[:, :k].T)
