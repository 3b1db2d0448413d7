"""Block elimination of the regularized saddle-point (KKT) system

    [ H   Cᵀ ] [x]   [r1]
    [ C  −δI ] [y] = [r2]

with H symmetric positive definite. Eliminating x gives the Schur complement
S = C H⁻¹ Cᵀ + δI, also positive definite, so two batched Choleskys solve the system and a
rank-deficient C only needs δ > 0. A diagonal H (given as its diagonal) needs no
factorization: then only the k × k Schur complement is factored. When the last rows of S
stay fixed while the others' diagonal changes (the equality rows of an interior point
method), they are eliminated once (`FixedRows`) and each new S factors only the rest.
This is the only linear algebra an interior point QP solver and its implicit backward need
(OptNet, Amos & Kolter 2017, sec. 3).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from amortized.linalg.cholesky import cholesky, cholesky_solve, col_major
from amortized.linalg.matvec import bmv, brmv


@dataclass(frozen=True)
class FixedRows:
    """The last q rows of S = [[S₁₁, S₁₂], [S₂₁, N]] (k + q rows), eliminated once for all
    the S₁₁ they will meet: L_N = chol(N) (B, q, q), S₁₂ (B, k, q), W = N⁻¹S₂₁ (B, q, k).
    Each S then needs only the Cholesky of its k × k complement T = S₁₁ − S₁₂W."""

    L_N: Tensor
    S12: Tensor
    W: Tensor

    def index(self, idx: Tensor) -> "FixedRows":
        return FixedRows(self.L_N[idx], self.S12[idx], self.W[idx])

    def solve(self, L_T: Tensor, r: Tensor, keep: Tensor | None) -> Tensor:
        """S⁻¹r for r (B, k + q), given L_T = chol(T); `keep` (B, k) zeroes the first
        block's rows that are left out of the system."""
        k = L_T.shape[-1]
        u = cholesky_solve(self.L_N, r[..., k:])
        r1 = r[..., :k] - bmv(self.S12, u)
        y1 = cholesky_solve(L_T, r1 if keep is None else r1 * keep)
        return torch.cat([y1, u - bmv(self.W, y1)], -1)


def fix_rows(S: Tensor, k: int) -> tuple[FixedRows, Tensor, Tensor]:
    """Eliminate the rows after the first k of S (B, k + q, k + q), whose N block must be
    positive definite (regularized by the caller). Returns the `FixedRows`, T = S₁₁ − S₁₂W
    (B, k, k), whose diagonal the caller adds to before factoring it, and ok (B,)."""
    L_N, ok = cholesky(S[..., k:, k:])
    S12 = S[..., :k, k:].contiguous()
    W = cholesky_solve(L_N, S[..., k:, :k])
    return FixedRows(L_N, S12, W), S[..., :k, :k] - S12 @ W, ok


@dataclass(frozen=True)
class SaddleFactor:
    """Factors of the saddle system. L_H: (B, n, n) the Cholesky factor of H, or (B, n) the
    diagonal of a diagonal H; HinvCt: (B, n, k); L_S: (B, k, k), or with `fixed` rows the
    factor of S's complement onto its first rows; ok: (B,) whether the factorizations
    succeeded."""

    L_H: Tensor
    HinvCt: Tensor
    L_S: Tensor
    ok: Tensor
    fixed: FixedRows | None = None

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
        `prepared` = self.prepare(r1) if already computed; `keep` (B, ·) bool zeroes y on
        rows of L_S that are left out of the system."""
        x0, CHr = self.prepare(r1) if prepared is None else prepared
        if r2.shape[-1] == 0:
            return x0, r2
        rhs = CHr - r2
        if self.fixed is not None:
            y = self.fixed.solve(self.L_S, rhs, keep)
        else:
            y = cholesky_solve(self.L_S, rhs if keep is None else rhs * keep)
        return x0 - bmv(self.HinvCt, y), y


def factor_saddle(
    H: Tensor | None, C: Tensor, delta: float | Tensor, grow: bool = False, L_H: Tensor | None = None
) -> SaddleFactor:
    """Factor the saddle system for H positive definite, (B, n, n) or its diagonal (B, n),
    C (B, k, n) and δ a scalar or (B, k). `grow`: where S fails to factor, grow δ by up to
    (30k)³·ε·max diag(S) instead of reporting the failure. L_H: H's Cholesky factor when
    the caller has it (H is then None).

    A dense H is consumed: it is factored in place (`col_major`), as is S."""
    if L_H is not None:
        ok = torch.ones(C.shape[:-2], dtype=torch.bool, device=C.device)
    elif H.dim() == C.dim() - 1:
        L_H, ok = H, (H > 0).all(-1)
    else:
        L_H, ok = cholesky(col_major(H, copy=False), overwrite=True)
    if L_H.dim() == C.dim() - 1:
        HinvCt = C.mT / L_H.unsqueeze(-1)
    else:
        HinvCt = cholesky_solve(L_H, C.mT) if C.shape[-2] else C.mT
    if C.shape[-2] == 0:
        return SaddleFactor(L_H, HinvCt, C.new_zeros(C.shape[:-2] + (0, 0)), ok)

    def schur(floor: Tensor | float = 0.0) -> Tensor:
        S = C @ HinvCt
        S.diagonal(dim1=-2, dim2=-1).add_(delta + floor)  # in place: no diagonal matrix
        return S

    L_S, ok_S = cholesky(col_major(schur(), copy=False), overwrite=True)
    if grow and not bool(ok_S.all()):
        # where rows of C are (nearly) dependent (e.g. more active rows than unknowns),
        # rounding of the size ε·max diag(S) can leave S indefinite despite a tiny δ; the
        # failed factorization destroyed S (its diagonal is read off C and H⁻¹Cᵀ), formed
        # again for each try
        diag = (C * HinvCt.mT).sum(-1) + delta
        floor = torch.finfo(diag.dtype).eps * diag.abs().amax(-1, keepdim=True)
        growth = torch.zeros_like(floor)
        for _ in range(3):
            floor = floor * 30 * C.shape[-2]
            growth = torch.where(ok_S.unsqueeze(-1), growth, growth + floor)
            L_S, ok_S = cholesky(col_major(schur(growth), copy=False), overwrite=True)
            if bool(ok_S.all()):
                break
    return SaddleFactor(L_H, HinvCt, L_S, ok & ok_S)
