"""Batched gradient descent with a fixed step: y ← y − lr ∇f(y)."""

from collections.abc import Callable

from torch import Tensor

from amortized.solvers._common import SolverSolution, _inf_norm, drive, value_and_grad


def gradient_descent(
    f: Callable[..., Tensor],
    y0: Tensor,
    *params,
    lr: float = 1e-2,
    tol: float | None = None,
    max_iter: int = 1000,
    check_every: int = 10,
    grad: str = "implicit",
    truncate: int = 1,
    solve=None,
    callback: Callable | None = None,
) -> SolverSolution:
    """Minimize f(y, *params) over y for B independent problems by gradient descent.

    f(y (B, n), *params) -> (B,), row b depending only on problem b; params batched or
    shared. Stops per problem when ‖∇f‖∞ ≤ tol (default `default_tol(dtype)`). Converges
    for lr < 2/L on an L-smooth convex f. grad/truncate/solve: see `solvers.drive`.
    """
    if lr <= 0:
        raise ValueError("lr must be positive")

    def init(y, ps):
        v, g = value_and_grad(f, ps)(y)
        return {"y": y, "f": v, "g": g, "res": _inf_norm(g)}

    def step(s, ps):
        a = s["active"].unsqueeze(-1)
        y = s["y"] - a * (lr * s["g"])
        v, g = value_and_grad(f, ps)(y)
        return {**s, "y": y, "f": v, "g": g, "res": _inf_norm(g)}

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
