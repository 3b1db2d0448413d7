"""Batched limited-memory BFGS (Liu & Nocedal 1989) with an Armijo line search."""

from collections.abc import Callable

import torch
from torch import Tensor

from amortized.solvers._common import SolverSolution, _inf_norm, armijo, drive, value_and_grad


def _two_loop(g: Tensor, S: list[Tensor], Y: list[Tensor], valid: list[Tensor]) -> Tensor:
    """−H_k g by the two-loop recursion, per problem; pairs with valid False are skipped
    (their curvature sᵀy was not positive)."""
    q = g
    alphas = []
    rhos = []
    for s, y, ok in zip(reversed(S), reversed(Y), reversed(valid), strict=False):
        sy = (s * y).sum(-1)
        rho = torch.where(ok, 1 / torch.where(ok, sy, torch.ones_like(sy)), 0.0)
        a = rho * (s * q).sum(-1)
        q = q - a.unsqueeze(-1) * y
        alphas.append(a)
        rhos.append(rho)
    # Initial scaling sᵀy / yᵀy from the newest valid pair of each problem.
    gamma = torch.ones_like(g[:, 0])
    found = torch.zeros_like(gamma, dtype=torch.bool)
    for s, y, ok in zip(reversed(S), reversed(Y), reversed(valid), strict=False):
        yy = (y * y).sum(-1)
        cand = (s * y).sum(-1) / torch.where(yy > 0, yy, torch.ones_like(yy))
        gamma = torch.where(ok & ~found, cand, gamma)
        found = found | ok
    r = gamma.unsqueeze(-1) * q
    for s, y, a, rho in zip(S, Y, reversed(alphas), reversed(rhos), strict=False):
        b = rho * (y * r).sum(-1)
        r = r + (a - b).unsqueeze(-1) * s
    return -r


def lbfgs(
    f: Callable[..., Tensor],
    y0: Tensor,
    *params,
    history: int = 10,
    tol: float | None = None,
    max_iter: int = 500,
    check_every: int = 5,
    grad: str = "implicit",
    truncate: int = 1,
    solve=None,
    callback: Callable | None = None,
) -> SolverSolution:
    """Minimize f(y, *params) -> (B,) over y (B, n) by L-BFGS with `history` curvature pairs
    per problem and a backtracking Armijo line search (first step scaled to unit length).
    grad/truncate/solve: see `solvers.drive`."""
    if history < 1:
        raise ValueError("history must be at least 1")

    def init(y, ps):
        v, g = value_and_grad(f, ps)(y)
        return {"y": y, "f": v, "g": g, "res": _inf_norm(g), "S": [], "Y": [], "V": []}

    def step(s, ps):
        d = _two_loop(s["g"], s["S"], s["Y"], s["V"])
        if not s["S"]:  # no curvature yet: a unit-length steepest-descent step
            d = d / (1 + d.norm(dim=-1, keepdim=True))
        t, ok = armijo(lambda z: f(z, *ps), s["y"], s["f"], s["g"], d, s["active"])
        a = (s["active"] & ok).unsqueeze(-1)
        y = torch.where(a, s["y"] + t.unsqueeze(-1) * d, s["y"])
        v, g = value_and_grad(f, ps)(y)
        sk, yk = y - s["y"], g - s["g"]
        sy = (sk * yk).sum(-1)
        valid = a.squeeze(-1) & (sy > torch.finfo(y.dtype).eps * (sk.norm(dim=-1) * yk.norm(dim=-1)))
        S, Y, V = (
            (s["S"] + [sk])[-history:],
            (s["Y"] + [yk])[-history:],
            (s["V"] + [valid])[-history:],
        )
        stalled = s["active"] & ~(y != s["y"]).any(-1)  # the step vanished in rounding
        return {
            **s,
            "y": y,
            "f": v,
            "g": g,
            "res": _inf_norm(g),
            "S": S,
            "Y": Y,
            "V": V,
            "failed": s["active"] & (~ok | stalled),
        }

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
