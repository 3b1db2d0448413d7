"""Block elimination of the regularized saddle-point (KKT) system

    [ H   Aᵀ ] [x]   [r1]
    [ A  −δI ] [y] = [r2]

with H symmetric positive definite. Eliminating x gives the Schur complement
S = A H⁻¹ Aᵀ + δI, also positive definite, so two batched Choleskys solve the system and a
rank-deficient A only needs δ > 0. This is the only linear algebra an interior point QP
solver and its implicit backward need (OptNet, Amos & Kolter 2017, sec. 3).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from amortized.linalg.cholesky import cholesky, cholesky_solve


@dataclass(frozen=True)
class SaddleFactor:
    """Factors of the saddle system. L_H: (B, n, n); HinvAt: (B, n, p); L_S: (B, p, p);
    ok: (B,) whether both factorizations succeeded."""

    L_H: Tensor
    HinvAt: Tensor
    L_S: Tensor
    ok: Tensor

    def solve(self, r1: Tensor, r2: Tensor) -> tuple[Tensor, Tensor]:
        """x, y of the regularized system for right-hand sides r1 (B, n), r2 (B, p)."""
        x = cholesky_solve(self.L_H, r1)
        if r2.shape[-1] == 0:
            return x, r2
        At_x = torch.einsum("bnp,bn->bp", self.HinvAt, r1)  # A H⁻¹ r1, since H⁻¹ is symmetric
        y = cholesky_solve(self.L_S, At_x - r2)
        x = x - torch.einsum("bnp,bp->bn", self.HinvAt, y)
        return x, y


def factor_saddle(H: Tensor, A: Tensor, delta: float | Tensor) -> SaddleFactor:
    """Factor the saddle system for H (B, n, n) positive definite and A (B, p, n)."""
    L_H, ok = cholesky(H)
    if A.shape[-2] == 0:
        empty = H.new_zeros(H.shape[:-2] + (0, 0))
        return SaddleFactor(L_H, A.mT, empty, ok)
    HinvAt = cholesky_solve(L_H, A.mT)
    S = A @ HinvAt
    S = S + delta * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    L_S, ok_S = cholesky(S)
    return SaddleFactor(L_H, HinvAt, L_S, ok & ok_S)
