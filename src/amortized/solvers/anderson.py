"""Batched Anderson acceleration for fixed points y = T(y) (Anderson 1965; Walker & Ni 2011)."""

from collections.abc import Callable

import torch
from torch import Tensor

from amortized.solvers._common import SolverSolution, drive, fixed_point_residual


def anderson(
    T: Callable[..., Tensor],
    y0: Tensor,
    *params,
    memory: int = 5,
    beta: float = 1.0,
    reg: float = 1e-8,
    tol: float | None = None,
    max_iter: int = 100,
    check_every: int = 5,
    grad: str = "implicit",
    truncate: int = 1,
    solve=None,
    callback: Callable | None = None,
) -> SolverSolution:
    """Solve y = T(y, *params) for B problems, y (B, n), with Anderson acceleration.

    With the last k ≤ memory iterates x_i and residuals g_i = T(x_i) − x_i of each problem,
    α = argmin ‖Σ α_i g_i‖² s.t. Σ α_i = 1, from the k×k system (GGᵀ + reg·tr/k·I) α̃ = 1
    solved by Cholesky (α = α̃ / Σα̃), and y ← β Σ α_i T(x_i) + (1 − β) Σ α_i x_i.
    Stops per problem when ‖T(y) − y‖∞ ≤ tol (1 + ‖y‖∞). One T evaluation per iteration.
    grad/truncate/solve: see `solvers.drive` (implicit backward: GMRES on I − ∂T by default).
    """
    if memory < 1:
        raise ValueError("memory must be at least 1")
    if not 0 < beta <= 1:
        raise ValueError("beta must be in (0, 1]")

    def init(y, ps):
        Ty = T(y, *ps)
        return {"y": y, "Ty": Ty, "res": fixed_point_residual(y, Ty), "X": [y], "F": [Ty]}

    def step(s, ps):
        X, F = torch.stack(s["X"], 1), torch.stack(s["F"], 1)  # (B, k, n)
        G = F - X
        GG = G @ G.mT
        k = GG.shape[-1]
        eye = torch.eye(k, dtype=GG.dtype, device=GG.device)
        lam = reg * GG.diagonal(dim1=-2, dim2=-1).sum(-1) / k + torch.finfo(GG.dtype).tiny
        L, _ = torch.linalg.cholesky_ex(GG + lam[:, None, None] * eye)
        a = torch.cholesky_solve(torch.ones_like(GG[..., :1]), L).squeeze(-1)
        a = a / a.sum(-1, keepdim=True)
        y_new = beta * (a.unsqueeze(-1) * F).sum(1) + (1 - beta) * (a.unsqueeze(-1) * X).sum(1)
        act = s["active"].unsqueeze(-1)
        y = torch.where(act, y_new, s["y"])
        Ty = torch.where(act, T(y, *ps), s["Ty"])
        return {
            **s,
            "y": y,
            "Ty": Ty,
            "res": fixed_point_residual(y, Ty),
            "X": (s["X"] + [y])[-memory:],
            "F": (s["F"] + [Ty])[-memory:],
        }

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
