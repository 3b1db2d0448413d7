"""Batched limited-memory ("good") Broyden method for fixed points y = T(y) (Broyden 1965),
as used for deep equilibrium models (Bai et al. 2019)."""

from collections.abc import Callable

import torch
from torch import Tensor

from amortized.solvers._common import SolverSolution, drive, fixed_point_residual


def _apply(U: list[Tensor], V: list[Tensor], x: Tensor, transpose: bool = False) -> Tensor:
    """J⁻¹x with J⁻¹ = −I + Σ u_i v_iᵀ (or its transpose), per problem."""
    out = -x
    for u, v in zip(U, V, strict=False):
        a, b = (u, v) if not transpose else (v, u)
        out = out + a * (b * x).sum(-1, keepdim=True)
    return out


def broyden(
    T: Callable[..., Tensor],
    y0: Tensor,
    *params,
    memory: int = 30,
    tol: float | None = None,
    max_iter: int = 100,
    check_every: int = 5,
    grad: str = "implicit",
    truncate: int = 1,
    solve=None,
    callback: Callable | None = None,
) -> SolverSolution:
    """Solve g(y) = T(y, *params) − y = 0, y (B, n), by Broyden's good method.

    Keeps J⁻¹ ≈ −I + Σ u_i v_iᵀ (the −I start is exact for T = 0) as at most `memory`
    rank-one Sherman–Morrison updates per problem, then restarts from −I. Step y ← y − J⁻¹g.
    Stops per problem when ‖g‖∞ ≤ tol (1 + ‖y‖∞). grad/truncate/solve: see `solvers.drive`.
    """
    if memory < 1:
        raise ValueError("memory must be at least 1")

    def init(y, ps):
        Ty = T(y, *ps)
        return {"y": y, "g": Ty - y, "res": fixed_point_residual(y, Ty), "U": [], "V": []}

    def step(s, ps):
        act = s["active"].unsqueeze(-1)
        dx = torch.where(act, -_apply(s["U"], s["V"], s["g"]), 0.0)
        y = s["y"] + dx
        Ty = T(y, *ps)
        g = torch.where(act, Ty - y, s["g"])
        dg = g - s["g"]
        vT = _apply(s["U"], s["V"], dx, transpose=True)  # dxᵀ J⁻¹
        Jdg = _apply(s["U"], s["V"], dg)
        den = (vT * dg).sum(-1, keepdim=True)
        ok = act & (
            den.abs()
            > torch.finfo(y.dtype).eps * (vT.norm(dim=-1, keepdim=True) * dg.norm(dim=-1, keepdim=True))
        )
        u = torch.where(ok, (dx - Jdg) / torch.where(ok, den, torch.ones_like(den)), 0.0)
        U, V = s["U"] + [u], s["V"] + [torch.where(ok, vT, 0.0)]
        if len(U) > memory:
            U, V = [], []
        res = torch.where(s["active"], fixed_point_residual(y, Ty), s["res"])
        return {**s, "y": y, "g": g, "res": res, "U": U, "V": V}

    return drive(
        "fixed",
        T,
        y0,
        params,
        init,
        step,
        tol=tol,
        max_iter=max_iter,
        check_every=check_every,
        grad=grad,
        truncate=truncate,
        solve=solve,
        callback=callback,
    )
