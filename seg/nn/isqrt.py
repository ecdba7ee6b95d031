"""Inverse matrix square root by Newton–Schulz iterations, for (batches of) SPD matrices."""

from __future__ import annotations

import torch


def isqrt_newton_schulz(a: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``a^{-1/2}`` of ``(..., d, d)`` SPD matrices, differentiable through the iterations.

    ``Y = A/‖A‖_F, Z = I``; repeat ``T = ½(3I − ZY), Y = YT, Z = TZ``; return ``Z/√‖A‖_F``
    (Frobenius norm per matrix).
    """
    norm = torch.linalg.matrix_norm(a, keepdim=True)
    y = a / norm
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    z = eye
    for _ in range(n_iter):
        t = 0.5 * (3.0 * eye - z @ y)
        y = y @ t
        z = t @ z
    return z / norm.sqrt()


def isqrt(a: torch.Tensor, n_iter: int) -> torch.Tensor:
    """The inverse square root used by the deconvolution layers."""
    return isqrt_newton_schulz(a, n_iter)
