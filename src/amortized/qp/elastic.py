"""Elastic mode: the closest feasible QP under an exact ℓ1 penalty,

    minimize ½ zᵀQz + pᵀz + w·(1ᵀt + 1ᵀu)   over z, t ≥ 0, u
    subject to   Gz − t ≤ h,   −u ≤ Az − b ≤ u,

which is feasible for any data. When the original QP is feasible and w exceeds its largest
multiplier (‖λ‖∞, ‖ν‖∞), t = u = 0 and z is its solution; otherwise t and |Az − b| are
the least ℓ1 relaxation of the constraints. Written as an ordinary QP in x = (z, t, u), so
its solution is differentiated by the same implicit backward: a layer whose learned
constraints turn infeasible keeps getting gradients that shrink the violation.
"""

import torch
from torch import Tensor

from amortized.qp.problem import QPData


def elastic_qp(d: QPData, weight: float) -> QPData:
    """The elastic QP of `d` (shapes as in QPData) in x = (z, t, u) ∈ R^(n+m+q), with
    inequalities [Gz − t ≤ h; −t ≤ 0; Az − u ≤ b; −Az − u ≤ −b] and no equalities."""
    B, n, m, q = d.shape
    zeros = lambda *s: d.p.new_zeros(B, *s)
    I_m = torch.eye(m, dtype=d.p.dtype, device=d.p.device).expand(B, m, m)
    I_q = torch.eye(q, dtype=d.p.dtype, device=d.p.device).expand(B, q, q)
    Q = torch.cat([torch.cat([d.Q, zeros(n, m + q)], -1), zeros(m + q, n + m + q)], -2)
    p = torch.cat([d.p, d.p.new_full((B, m + q), weight)], -1)
    G = torch.cat(
        [
            torch.cat([d.G, -I_m, zeros(m, q)], -1),
            torch.cat([zeros(m, n), -I_m, zeros(m, q)], -1),
            torch.cat([d.A, zeros(q, m), -I_q], -1),
            torch.cat([-d.A, zeros(q, m), -I_q], -1),
        ],
        -2,
    )
    h = torch.cat([d.h, zeros(m), d.b, -d.b], -1)
    return QPData(Q, p, G, h, zeros(0, n + m + q), zeros(0))


def split_elastic(x: Tensor, lam_e: Tensor, n: int, m: int, q: int):
    """The original problem's z (B, n), λ (B, m), ν (B, q) (stationarity
    Qz + p + Gᵀλ + Aᵀν = 0 holds with them) and the inequality relaxation t (B, m), from
    the elastic solution x and its multipliers lam_e (B, 2m + 2q)."""
    z, t = x[..., :n], x[..., n : n + m]
    lam = lam_e[..., :m]
    nu = lam_e[..., 2 * m : 2 * m + q] - lam_e[..., 2 * m + q :]
    return z, lam, nu, t
