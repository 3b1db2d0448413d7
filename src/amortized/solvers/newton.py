"""Batched Newton's method with a damped Cholesky solve and an Armijo line search."""

from collections.abc import Callable

import torch
from torch import Tensor

from amortized.implicit import cholesky_preconditioner
from amortized.linalg.linear_solve import any_true
from amortized.solvers._common import (
    SolverSolution,
    _inf_norm,
    armijo,
    drive,
    hessian,
    value_and_grad,
)


def _damped_newton_direction(H: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """d = −(H + μI)⁻¹ g with the smallest μ ∈ {0, 1e-8·s, 1e-7·s, …} (s = 1 + max|H_ii|)
    that makes H + μI numerically positive definite, chosen per problem (Cholesky only).
    Returns d and the factors L used (B, n, n); the identity where none was definite."""
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    scale = 1 + H.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    mu = torch.zeros_like(scale)
    d = torch.zeros_like(g)
    factor = eye.expand_as(H)
    todo = torch.ones_like(scale, dtype=torch.bool)
    for k in range(12):
        L, info = torch.linalg.cholesky_ex(H + mu[:, None, None] * eye)
        ok = todo & (info == 0)
        factor = torch.where(ok[:, None, None], L, factor)
        d_k = -torch.cholesky_solve(g.unsqueeze(-1), factor).squeeze(-1)
        d = torch.where(ok.unsqueeze(-1), d_k, d)
        todo = todo & ~ok
        if not any_true(todo):
            break
        mu = torch.where(todo, scale * 10.0 ** (k - 8), mu)
    # Rows still indefinite after the largest damping fall back to steepest descent.
    return torch.where(todo.unsqueeze(-1), -g, d), factor


def newton(
    f: Callable[..., Tensor],
    y0: Tensor,
    *params,
    tol: float | None = None,
    max_iter: int = 50,
    check_every: int = 1,
    grad: str = "implicit",
    truncate: int = 1,
    solve=None,
    callback: Callable | None = None,
    precondition: bool = True,
) -> SolverSolution:
    """Minimize f(y, *params) -> (B,) over y (B, n) by Newton's method.

    Per-problem Hessians (B, n, n) come from torch.func (forward-over-reverse, see
    `hessian`); the step solves (H + μI) d = −∇f by Cholesky with the least damping μ that
    makes it definite, then backtracks (Armijo). Quadratic convergence near a minimizer
    with a positive definite Hessian. grad/truncate/solve: see `solvers.drive`.

    precondition: keep the last step's Cholesky factors (B, n, n) as sol.precond; the
    implicit backward's CG is preconditioned by them (the Hessian one step before the
    solution, so one or two matvecs instead of tens) at the cost of holding them until
    the backward.
    """

    def init(y, ps):
        v, g = value_and_grad(f, ps)(y)
        return {"y": y, "f": v, "g": g, "res": _inf_norm(g)}

    def step(s, ps):
        H = hessian(f, ps, s["y"])
        d, L = _damped_newton_direction(H, s["g"])
        fval = lambda z: f(z, *ps)
        t, ok = armijo(fval, s["y"], s["f"], s["g"], d, s["active"])
        a = (s["active"] & ok).unsqueeze(-1)
        y = torch.where(a, s["y"] + t.unsqueeze(-1) * d, s["y"])
        v, g = value_and_grad(f, ps)(y)
        return {**s, "y": y, "f": v, "g": g, "res": _inf_norm(g), "failed": s["active"] & ~ok, "L": L}

    def curvature(s):  # the driver always takes a step, frozen rows refactor at their y
        return cholesky_preconditioner(s["L"].detach())

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
        curvature=curvature if precondition else None,
    )
