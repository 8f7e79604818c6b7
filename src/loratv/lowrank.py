"""Inner products and norms of a LoRA delta s·B@A computed from its factors, never materialising the m×n matrix.

    <s·B@A, T>_F = s · sum((Bᵀ T) ⊙ A)            O(r·m·n) instead of building B@A
    ||s·B@A||_F² = s² · sum((BᵀB) ⊙ (A Aᵀ))        r×r Gram matrices, O(r²·(m+n))

All in float64 (the factors are upcast exactly); used by compare to build cosines from summed dot products.
"""

import torch


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64)


def factored_inner(a: torch.Tensor, b: torch.Tensor, scale: float, t: torch.Tensor) -> float:
    """<scale·B@A, T> for A (r, n), B (m, r), T (m, n), in float64."""
    return float(scale * ((_f64(b).T @ _f64(t)) * _f64(a)).sum())


def factored_norm_sq(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """||scale·B@A||_F² from the r×r Grams BᵀB and A·Aᵀ, in float64."""
    a64, b64 = _f64(a), _f64(b)
    return float(scale * scale * ((b64.T @ b64) * (a64 @ a64.T)).sum())
