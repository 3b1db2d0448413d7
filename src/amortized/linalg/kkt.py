"""Block elimination of the regularized saddle-point (KKT) system

    [ H   Cᵀ ] [x]   [r1]
    [ C  −δI ] [y] = [r2]

with H symmetric positive definite. Eliminating x gives the Schur complement
S = C H⁻¹ Cᵀ + δI, also positive definite, so two batched Choleskys solve the system and a
rank-deficient C only needs δ > 0. A diagonal H (given as its diagonal) needs no
factorization: then only the k × k Schur complement is factored. This is the only linear
algebra an interior point QP solver and its implicit backward need (OptNet, Amos & Kolter
2017, sec. 3).
"""

from dataclasses import dataclass

from torch import Tensor

from amortized.linalg.cholesky import cholesky, cholesky_solve
from amortized.linalg.matvec import bmv, brmv


@dataclass(frozen=True)
class SaddleFactor:
    """Factors of the saddle system. L_H: (B, n, n) the Cholesky factor of H, or (B, n) the
    diagonal of a diagonal H; HinvCt: (B, n, k); L_S: (B, k, k); ok: (B,) whether both
    factorizations succeeded."""

    L_H: Tensor
    HinvCt: Tensor
    L_S: Tensor
    ok: Tensor

    def prepare(self, r1: Tensor) -> tuple[Tensor, Tensor]:
        """H⁻¹r1 and C H⁻¹r1, the part of a solve that depends on r1 alone (so several
        right-hand sides r2 with one r1 share it)."""
        x0 = r1 / self.L_H if self.L_H.dim() == r1.dim() else cholesky_solve(self.L_H, r1)
        return x0, brmv(self.HinvCt, r1)  # (H⁻¹Cᵀ)ᵀr1 = C H⁻¹r1: H⁻¹ is symmetric

    def solve(
        self,
        r1: Tensor,
        r2: Tensor,
        prepared: tuple[Tensor, Tensor] | None = None,
        keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x (B, n), y (B, k) of the regularized system for right-hand sides r1, r2.
        `prepared` = self.prepare(r1) if already computed; `keep` (B, k) bool zeroes y on
        rows that are left out of the system."""
        x0, CHr = self.prepare(r1) if prepared is None else prepared
        if r2.shape[-1] == 0:
            return x0, r2
        rhs = CHr - r2
        y = cholesky_solve(self.L_S, rhs if keep is None else rhs * keep)
        return x0 - bmv(self.HinvCt, y), y


def factor_saddle(H: Tensor, C: Tensor, delta: float | Tensor) -> SaddleFactor:
    """Factor the saddle system for H positive definite, (B, n, n) or its diagonal (B, n),
    C (B, k, n) and δ a scalar or (B, k)."""
    if H.dim() == C.dim() - 1:
        L_H, ok = H, (H > 0).all(-1)
        HinvCt = C.mT / H.unsqueeze(-1)
    else:
        L_H, ok = cholesky(H)
        HinvCt = cholesky_solve(L_H, C.mT) if C.shape[-2] else C.mT
    if C.shape[-2] == 0:
        return SaddleFactor(L_H, HinvCt, C.new_zeros(C.shape[:-2] + (0, 0)), ok)
    S = C @ HinvCt
    S.diagonal(dim1=-2, dim2=-1).add_(delta)  # in place: no diagonal matrix, no second S
    L_S, ok_S = cholesky(S)
    return SaddleFactor(L_H, HinvCt, L_S, ok & ok_S)
