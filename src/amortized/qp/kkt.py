"""The KKT conditions of the QP as an optimality function, and their transposed Jacobian
solve at a solution, for implicit differentiation (OptNet, Amos & Kolter 2017, eq. 6-8).

    F(z, λ, ν) = [ Qz + p + Gᵀλ + Aᵀν ;  λ ∘ (Gz − h) ;  Az − b ] = 0
"""

import torch
from torch import Tensor

from amortized.qp.pdipm import KKT, _mv, _rmv


def kkt_conditions(z, lam, nu, Q, p, G, h, A, b) -> tuple[Tensor, Tensor, Tensor]:
    """F above for z (B,n), λ (B,m), ν (B,q); every parameter batched or shared.
    Q enters through its symmetric part, so dF/dQ is symmetric."""
    Qs = 0.5 * (Q + Q.mT)
    r_d = _mv(Qs, z) + p + _rmv(G, lam) + _rmv(A, nu)
    r_c = lam * (_mv(G, z) - h)
    r_e = _mv(A, z) - b
    return r_d, r_c, r_e


def transpose_solver(kkt: KKT, s: Tensor, lam: Tensor, solved: Tensor):
    """u ↦ solution of (∂F/∂(z,λ,ν))ᵀ u = v at an interior point solution, reusing the
    factorization of Q + GᵀWG (W = λ/s) that the last forward iteration computed.

        Q u_z + Gᵀ(λ∘u_λ) + Aᵀu_ν = v_z
        G u_z − s∘u_λ             = v_λ      (Gz − h = −s at the solution)
        A u_z                     = v_ν

    With w = λ∘u_λ = W(G u_z − v_λ) the first two rows reduce to the forward's saddle
    system. At weakly active constraints (s ≈ λ ≈ 0) the exact Jacobian is singular; the
    regularized factor then returns the least-change solution instead of a NaN. Problems
    that are not `solved` (B,) get u = 0, hence zero gradients.
    """
    G = kkt.d.G
    keep = solved.unsqueeze(-1)

    def solve(v):
        v_z, v_lam, v_nu = v
        W_vlam = kkt.W * v_lam
        u_z, u_nu = kkt.solve(v_z + _rmv(G, W_vlam), v_nu, refine=0)
        u_lam = (_mv(G, u_z) - v_lam) / s
        zero = torch.zeros((), dtype=u_z.dtype, device=u_z.device)
        return tuple(torch.where(keep, u, zero) for u in (u_z, u_lam, u_nu))

    return solve
