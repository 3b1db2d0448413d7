"""Elimination of the equality rows by a basis of A's null space (the null-space method,
Nocedal & Wright, Numerical Optimization, sec. 16.2).

With Aᵀ = Y R (QR, Y: n × q orthonormal, R: q × q upper triangular) and N (n × (n − q)) an
orthonormal basis of the null space of A, so that U = [Y N] is orthogonal, every x is
x = Y x_Y + N x_N and Ax = Rᵀx_Y: the equality rows fix x_Y, and what is left is a system
in x_N with the reduced matrices Q̃ = NᵀQN, G̃ = GN and no equality rows. Applied to the
QP's own KKT conditions this is the reduced QP

    minimize ½ wᵀQ̃w + p̃ᵀw   subject to   G̃w ≤ h̃,    z = z₀ + Nw,  z₀ = Y R⁻ᵀb,

p̃ = Nᵀ(Qz₀ + p), h̃ = h − Gz₀, whose interior point iterations factor (n − q) × (n − q)
instead of a system with all m + q rows: it pays when there are many equality rows.
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from amortized.linalg import bmv, brmv, comfortable_cholesky, complete_qr
from amortized.qp.problem import QPData


@dataclass(frozen=True)
class Nullspace:
    """The elimination for a batch: U = [Y N] (B, n, n), R (B, q, q), QY (B, n, q), its
    block NᵀQY (B, n − q, q) and GY (B, m, q), which carry x_Y into the reduced system and
    take x back to the Y rows, the reduced QP d
    (Q̃ (B, n − q, n − q), p̃, G̃ (B, m, n − q), h̃, no equality rows), and what `lift`
    needs of the full problem's right sides."""

    U: Tensor
    R: Tensor
    QY: Tensor
    NtQY: Tensor
    GY: Tensor
    d: QPData
    z_Y: Tensor  # (B, q) R⁻ᵀb: z₀ = Y z_Y
    Ut_p: Tensor  # (B, n) Uᵀp

    def index(self, idx: Tensor) -> "Nullspace":
        U, R, QY, NtQY, GY, z_Y, Ut_p = (
            x[idx] for x in (self.U, self.R, self.QY, self.NtQY, self.GY, self.z_Y, self.Ut_p)
        )
        return Nullspace(U, R, QY, NtQY, GY, self.d.index(idx), z_Y, Ut_p)

    def split(self, r1: Tensor, r_e: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the system Qx + Gᵀy_i + Aᵀy_e = r1, Gx − D∘y_i = r_i, Ax = r_e: x_Y = R⁻ᵀr_e,
        Uᵀr1 (B, n), the reduced first right side Nᵀ(r1 − QYx_Y) and GYx_Y, which the
        reduced second right side r_i − GYx_Y subtracts (none depends on r_i, so the
        predictor and corrector share them)."""
        q = self.R.shape[-1]
        x_Y = torch.linalg.solve_triangular(self.R.mT, r_e.unsqueeze(-1), upper=False).squeeze(-1)
        Ut_r1 = brmv(self.U, r1)
        return x_Y, Ut_r1, Ut_r1[..., q:] - bmv(self.NtQY, x_Y), bmv(self.GY, x_Y)

    def join(self, x_Y: Tensor, Ut_r1: Tensor, x_N: Tensor, y_i: Tensor) -> tuple[Tensor, Tensor]:
        """x = U [x_Y; x_N] and y_e from the first block's Y rows, R y_e = Yᵀr1 − YᵀQx − (GY)ᵀy_i."""
        q = self.R.shape[-1]
        x = bmv(self.U, torch.cat([x_Y, x_N], -1))
        rhs = Ut_r1[..., :q] - brmv(self.QY, x) - brmv(self.GY, y_i)
        y_e = torch.linalg.solve_triangular(self.R, rhs.unsqueeze(-1), upper=True).squeeze(-1)
        return x, y_e

    def lift(self, w: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
        """(z, ν) of the full QP from the reduced one's (w, λ): the join for the QP's own right
        sides r1 = −p, r_e = b, so that ν solves the Y rows of Qz + p + Gᵀλ + Aᵀν = 0."""
        return self.join(self.z_Y, -self.Ut_p, w, lam)


def nullspace(d: QPData, active: Tensor, rho: float) -> Nullspace | None:
    """The null-space elimination of d's equality rows, or None where it does not apply to
    every `active` problem (B,) of the batch: A not of full row rank with a margin (a
    diagonal entry of R below ε^⅓ of its largest), or Q̃ not comfortably positive definite
    (the reduced problem is then factored without a safeguard against a singular Q̃). The
    other problems get U = I, R = I: finite data whose answers the caller discards."""
    B, n, m, q = d.shape
    U, R = complete_qr(d.A.mT)
    r = R.diagonal(dim1=-2, dim2=-1).abs()
    full_rank = r.amin(-1) > torch.finfo(r.dtype).eps ** (1 / 3) * r.amax(-1)
    if not bool((full_rank | ~active).all()):
        return None
    all_active = bool(active.all())
    if not all_active:
        keep = active[:, None, None]
        U = torch.where(keep, U, torch.eye(n, dtype=U.dtype, device=U.device))
        R = torch.where(keep, R, torch.eye(q, dtype=R.dtype, device=R.device))
    # only the blocks used: QY, NᵀQY and Q̃ = NᵀQN, not all of UᵀQU
    QU = d.Q @ U
    N = U[..., q:]
    QY, NtQY, Q_N = QU[..., :q].contiguous(), N.mT @ QU[..., :q], N.mT @ QU[..., q:]
    eye = torch.eye(n - q, dtype=U.dtype, device=U.device)
    L_N, comfortable = comfortable_cholesky(
        Q_N if all_active else torch.where(active[:, None, None], Q_N, eye), rho
    )
    if not bool(comfortable.all()):
        return None
    ns = Nullspace(U, R, QY, NtQY, d.G @ U[..., :q], None, None, None)
    z_Y, neg_Ut_p, neg_p_N, Gz0 = ns.split(-d.p, d.b)
    G_N = d.G @ N
    reduced = QPData(Q_N, -neg_p_N, G_N, d.h - Gz0, d.A[..., :0, q:], d.b[..., :0])
    if all_active:
        reduced.factor_Q(rho, L_N)  # what the reduced problem's factorizations will ask for
    return replace(ns, d=reduced, z_Y=z_Y, Ut_p=-neg_Ut_p)
