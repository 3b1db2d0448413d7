"""Plain (damped) fixed-point iteration y ← (1 − β) y + β T(y), batched."""

from collections.abc import Callable

import torch
from torch import Tensor

from amortized.solvers._common import SolverSolution, drive, fixed_point_residual


def fixed_point_iteration(
    T: Callable[..., Tensor],
    y0: Tensor,
    *params,
    beta: float = 1.0,
    tol: float | None = None,
    max_iter: int = 1000,
    check_every: int = 10,
    grad: str = "implicit",
    truncate: int = 1,
    solve=None,
    callback: Callable | None = None,
) -> SolverSolution:
    """Solve y = T(y, *params), y (B, n), by y ← (1 − β) y + β T(y) (converges linearly
    for a contraction). Stops per problem when ‖T(y) − y‖∞ ≤ tol (1 + ‖y‖∞).
    grad/truncate/solve: see `solvers.drive`."""
    if not 0 < beta <= 1:
        raise ValueError("beta must be in (0, 1]")

    def init(y, ps):
        Ty = T(y, *ps)
        return {"y": y, "Ty": Ty, "res": fixed_point_residual(y, Ty)}

    def step(s, ps):
        act = s["active"].unsqueeze(-1)
        y = torch.where(act, (1 - beta) * s["y"] + beta * s["Ty"], s["y"])
        Ty = torch.where(act, T(y, *ps), s["Ty"])
        return {**s, "y": y, "Ty": Ty, "res": fixed_point_residual(y, Ty)}

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
