"""Adam (Kingma & Ba 2015) used as a batched solver of min_y f(y)."""

from collections.abc import Callable

import torch
from torch import Tensor

from amortized.solvers._common import SolverSolution, _inf_norm, drive, value_and_grad


def adam(
    f: Callable[..., Tensor],
    y0: Tensor,
    *params,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    tol: float | None = None,
    max_iter: int = 1000,
    check_every: int = 10,
    grad: str = "implicit",
    truncate: int = 1,
    solve=None,
    callback: Callable | None = None,
) -> SolverSolution:
    """Minimize f(y, *params) -> (B,) over y (B, n) with Adam; moments are per problem and
    a converged problem (‖∇f‖∞ ≤ tol) stops moving. Adam with a constant lr only reaches a
    neighbourhood of the minimizer: use it for its robustness, and a tolerance to match.
    grad/truncate/solve: see `solvers.drive`."""
    b1, b2 = betas

    def init(y, ps):
        v, g = value_and_grad(f, ps)(y)
        z = torch.zeros_like(y)
        return {"y": y, "f": v, "g": g, "res": _inf_norm(g), "m": z, "v": z, "t": 0}

    def step(s, ps):
        a = s["active"].unsqueeze(-1)
        t = s["t"] + 1
        m = torch.where(a, b1 * s["m"] + (1 - b1) * s["g"], s["m"])
        v = torch.where(a, b2 * s["v"] + (1 - b2) * s["g"].square(), s["v"])
        upd = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        y = s["y"] - a * upd
        fv, g = value_and_grad(f, ps)(y)
        return {**s, "y": y, "f": fv, "g": g, "res": _inf_norm(g), "m": m, "v": v, "t": t}

    return drive(
        "min",
        f,
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
