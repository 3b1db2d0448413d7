"""The KKT conditions of the QP as an optimality function, and their transposed Jacobian
solve at a solution, for implicit differentiation (OptNet, Amos & Kolter 2017, eq. 6-8).

    F(z, λ, ν) = [ Qz + p + Gᵀλ + Aᵀν ;  λ ∘ (Gz − h) ;  Az − b ] = 0
"""

import torch
from torch import Tensor

from amortized.qp.kkt_system import mv as _mv
from amortized.qp.kkt_system import rmv as _rmv
from amortized.qp.pdipm import PDIPMResult


def kkt_conditions(z, lam, nu, Q, p, G, h, A, b) -> tuple[Tensor, Tensor, Tensor]:
    """F above for z (B,n), λ (B,m), ν (B,q); every parameter batched or shared.
    Q enters through its symmetric part, so dF/dQ is symmetric."""
    Qs = 0.5 * (Q + Q.mT)
    r_d = _mv(Qs, z) + p + _rmv(G, lam) + _rmv(A, nu)
    r_c = lam * (_mv(G, z) - h)
    r_e = _mv(A, z) - b
    return r_d, r_c, r_e


def transpose_solver(result: PDIPMResult, s: Tensor, lam: Tensor, solved: Tensor):
    """u ↦ solution of (∂F/∂(z,λ,ν))ᵀ u = v at the returned solution, reusing the forward's
    factorization at that point (`result.kkt`, factored on first use if the forward left
    none that fits every problem):

        Q u_z + Gᵀ(λ∘u_λ) + Aᵀu_ν = v_z
        G u_z − s∘u_λ             = v_λ      (Gz − h = −s at the solution)
        A u_z                     = v_ν

    In w = λ∘u_λ this is the forward's KKT system with compliance D = s/λ (the interior
    point factor), or D = 0 on active and ∞ on inactive rows (the polish factor), solved
    on the scaled problem (u_z = D ũ_z, w = E_G w̃ / c, u_ν = E_A ũ_ν / c). Then
    u_λ = w/λ where λ > s and (G u_z − v_λ)/s elsewhere. At weakly active constraints
    (s ≈ λ ≈ 0) the Jacobian is singular; the regularized factor gives a finite
    (least-change) answer instead of a NaN. Problems that are not `solved` (B,) get
    u = 0, hence zero gradients.
    """
    G = result.G
    sc = result.scaling
    E_G, E_A = sc.split(G.shape[-2])
    c = sc.c.unsqueeze(-1)
    keep = solved.unsqueeze(-1)
    big = lam > s
    lam_safe = torch.where(big, lam, 1.0)
    s_safe = torch.where(big, 1.0, s.clamp(min=torch.finfo(s.dtype).eps))

    def solve(v):
        v_z, v_lam, v_nu = v
        u_z, w, u_nu = result.kkt.solve(c * sc.D * v_z, E_G * v_lam, E_A * v_nu, refine=0)
        u_z, w, u_nu = sc.D * u_z, E_G * w / c, E_A * u_nu / c
        u_lam = torch.where(big, w / lam_safe, (_mv(G, u_z) - v_lam) / s_safe)
        return tuple(torch.where(keep, u, 0.0) for u in (u_z, u_lam, u_nu))

    return solve
