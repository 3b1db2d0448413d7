"""Ruiz equilibration of a batch of QPs (Ruiz 2001; as in OSQP and ProxQP).

The solver works on the scaled problem

    Q̃ = c·DQD,  p̃ = c·Dp,  G̃ = E_G G D,  h̃ = E_G h,  Ã = E_A A D,  b̃ = E_A b,

with z = D z̃. Its Lagrangian's multipliers map back as λ = E_G λ̃ / c, ν = E_A ν̃ / c and
its slacks as s = s̃ / E_G. D (B, n) and E = [E_G, E_A] (B, m + q) make every column of
[Q; C] and every row of C = [G; A] of unit ∞-norm; c brings the cost to unit size. Badly
scaled problems (the Maros–Meszaros set) converge only on the scaled data, while the
residuals that decide convergence are measured on the original one.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from amortized.linalg import inf_norm
from amortized.qp.problem import QPData

# scale factors stay within these bounds (OSQP's), so empty rows or columns keep scale 1
_MIN, _MAX = 1e-4, 1e4


@dataclass(frozen=True)
class Scaling:
    """D (B, n), E (B, m + q), c (B,) as in the module docstring."""

    D: Tensor
    E: Tensor
    c: Tensor

    def index(self, idx: Tensor) -> "Scaling":
        return Scaling(self.D[idx], self.E[idx], self.c[idx])

    def split(self, m: int) -> tuple[Tensor, Tensor]:
        """E_G (B, m), E_A (B, q)."""
        return self.E[..., :m], self.E[..., m:]

    def scale(self, z: Tensor, s: Tensor, lam: Tensor, nu: Tensor):
        """The scaled problem's (z, s, λ, ν) from the original problem's."""
        E_G, E_A = self.split(s.shape[-1])
        c = self.c.unsqueeze(-1)
        return z / self.D, s * E_G, c * lam / E_G, c * nu / E_A

    def unscale(self, z: Tensor, s: Tensor, lam: Tensor, nu: Tensor):
        """The original problem's (z, s, λ, ν) from the scaled problem's."""
        E_G, E_A = self.split(s.shape[-1])
        c = self.c.unsqueeze(-1)
        return self.D * z, s / E_G, E_G * lam / c, E_A * nu / c


def _inv_sqrt_norm(norm: Tensor) -> Tensor:
    norm = torch.where(norm > 0, norm, 1.0)
    return norm.clamp(_MIN, _MAX).rsqrt()


def _deviation(norms: Tensor) -> float:
    return float((norms - 1).abs().amax()) if norms.numel() else 0.0


def ruiz(d: QPData, iters: int = 10, tol: float = 0.5) -> tuple[QPData, Scaling]:
    """Scale a batch by Ruiz equilibration of the KKT matrix [[Q, Cᵀ], [C, 0]] in the
    ∞-norm (at most `iters` sweeps, fewer once every norm is within 1 ± tol), then by the
    cost factor c = 1 / max(mean column norm of Q̃, ‖p̃‖∞)."""
    B, n = d.p.shape
    m = d.G.shape[-2]
    # one scaled copy of Q and C, rescaled in place
    Q, C = d.Q.clone(), torch.cat([d.G, d.A], -2)  # not d.C: it would stay cached on d
    D = d.p.new_ones(B, n)
    E = d.p.new_ones(B, C.shape[-2])
    for _ in range(iters):
        col = inf_norm(Q, -1)  # Q is symmetric: its row norms, the faster reduction
        if C.shape[-2]:
            col = torch.maximum(col, inf_norm(C, -2))
            row = inf_norm(C, -1)
        else:
            row = E
        if max(_deviation(col), _deviation(row)) <= tol:
            break
        dD, dE = _inv_sqrt_norm(col), _inv_sqrt_norm(row)
        Q.mul_(dD.unsqueeze(-1)).mul_(dD.unsqueeze(-2))
        C.mul_(dE.unsqueeze(-1)).mul_(dD.unsqueeze(-2))
        D, E = D * dD, E * dE
    p = D * d.p
    cost = torch.maximum(inf_norm(Q, -1).mean(-1), inf_norm(p, -1))
    c = 1 / torch.where(cost > 0, cost, 1.0).clamp(_MIN, _MAX)
    scaled = QPData(
        Q.mul_(c[:, None, None]),
        c[:, None] * p,
        C[..., :m, :],
        E[..., :m] * d.h,
        C[..., m:, :],
        E[..., m:] * d.b,
    )
    vars(scaled)["C"] = C  # G̃, Ã are views of C̃: spare QPData.C its concatenation
    return scaled, Scaling(D, E, c)
