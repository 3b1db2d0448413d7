"""What every batched solver shares: status codes, the solution object, tolerances from the
dtype, batched derivatives via torch.func, the Armijo line search, and the iteration driver
that implements the gradient modes ("implicit", "unroll", "truncated").

A solver is written as two functions, init(y0, params) -> state and step(state, params) ->
state, over a dict state holding at least y (B, n), res (B,) (the convergence measure at y)
and active (B,) (rows still iterating; step must leave inactive rows unchanged). The driver
owns the loop, the per-problem masks, the status and the gradient mode, so no solver writes
its own backward.
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor

from amortized.implicit import Preconditioned, Preconditioner, custom_root
from amortized.linalg.linear_solve import any_true, materialize

GRAD_MODES = ("implicit", "unroll", "truncated")


class SolverStatus(IntEnum):
    """Per-problem outcome of a batched solve."""

    SOLVED = 0
    MAX_ITER = 1
    NUMERICAL = 2
    LINESEARCH_FAILED = 3

    @property
    def message(self) -> str:
        return {
            SolverStatus.SOLVED: "converged to the requested tolerance",
            SolverStatus.MAX_ITER: "stopped at max_iter before reaching the tolerance",
            SolverStatus.NUMERICAL: "a non-finite value appeared; the last finite iterate is kept",
            SolverStatus.LINESEARCH_FAILED: "the line search found no sufficient decrease",
        }[self]


@dataclass
class SolverSolution:
    """Solution of a batch of B problems.

    y (B, n): the solution, differentiable w.r.t. the params as the gradient mode says.
    status (B,) long SolverStatus codes; iters (B,) iterations each problem used;
    residual (B,) the final convergence measure (‖∇f‖∞ for minimizers, ‖T(y) − y‖∞ /
    (1 + ‖y‖∞) for fixed points); value (B,) f(y) for minimizers (None for fixed points);
    history (iters, B): the residual after every iteration (frozen rows repeat their value).
    precond: the solver's final curvature as a `Preconditioner` for an implicit backward
    (M ≈ (∇²f)⁻¹: Newton's last Cholesky factor), or None. The implicit mode already uses
    it; a caller that wraps the solver in its own `custom_root` can return
    `Preconditioned(sol.y, sol.precond)`.
    """

    y: Tensor
    status: Tensor
    iters: Tensor
    residual: Tensor
    value: Tensor | None
    history: Tensor
    precond: Preconditioner | None = None

    @property
    def solved(self) -> Tensor:
        return self.status == int(SolverStatus.SOLVED)


def default_tol(dtype: torch.dtype) -> float:
    """eps^0.6: about 4e-10 in float64, 7e-5 in float32."""
    return float(torch.finfo(dtype).eps ** 0.6)


def value_and_grad(f: Callable[..., Tensor], params: tuple) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """y ↦ (f(y) (B,), ∇_y f(y) (B, n)) for a batched objective f(y, *params) -> (B,).

    Rows are independent, so the gradient of the batch sum is the batch of gradients.
    torch.func.grad composes with outer autograd (unrolled mode) and ignores an outer
    no_grad (the implicit mode's forward)."""

    def total(y):
        v = f(y, *params)
        if v.shape != y.shape[:1]:
            raise ValueError(
                f"f must return one value per problem, shape ({y.shape[0]},); got {tuple(v.shape)}"
            )
        return v.sum(), v

    def vg(y):
        g, (_, v) = torch.func.grad_and_value(total, has_aux=True)(y)
        return v, g

    return vg


def gradient_fn(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The optimality function of argmin: (y, *params) ↦ ∇_y f(y, *params), (B, n)."""

    def grad(y, *params):
        return value_and_grad(f, params)(y)[1]

    return grad


def hessian(f: Callable[..., Tensor], params: tuple, y: Tensor) -> Tensor:
    """Per-problem Hessians (B, n, n) of f(y, *params) from reverse-over-reverse products
    with the n unit vectors, vmapped over one linearization of ∇f (the Hessian is symmetric,
    so vjp gives Hu; one (B·n)×(B·n) Hessian is never formed)."""
    grad = lambda z: value_and_grad(f, params)(z)[1]
    _, vjp_fn = torch.func.vjp(grad, y)
    return materialize(lambda u: vjp_fn(u)[0], y)


def armijo(
    fval: Callable[[Tensor], Tensor],
    y: Tensor,
    fy: Tensor,
    g: Tensor,
    d: Tensor,
    active: Tensor,
    *,
    c: float = 1e-4,
    max_halvings: int = 40,
) -> tuple[Tensor, Tensor]:
    """Backtracking line search per problem: the largest t = 2^-k with
    f(y + t d) ≤ f(y) + c t ∇f(y)ᵀd + 8 eps |f(y)|. The last term accepts steps whose change
    of f is below f's rounding error: near a minimizer the decrease g²/L falls under eps |f|
    long before the gradient reaches the tolerance, and the gradient still guides the step.
    Returns t (B,) and ok (B,) (False where no step was found)."""
    t = torch.ones_like(fy)
    slope = (g * d).sum(-1)
    slack = 8 * torch.finfo(fy.dtype).eps * fy.abs()
    ok = ~active
    for _ in range(max_halvings):
        f_new = fval(y + t.unsqueeze(-1) * d)
        good = (f_new <= fy + c * t * slope + slack) & torch.isfinite(f_new)
        t = torch.where(ok | good, t, 0.5 * t)
        ok = ok | good
        if not any_true(~ok):
            break
    return t, ok


def _inf_norm(x: Tensor) -> Tensor:
    return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])


def fixed_point_residual(y: Tensor, Ty: Tensor) -> Tensor:
    """‖T(y) − y‖∞ / (1 + ‖y‖∞), per problem (B,)."""
    return _inf_norm(Ty - y) / (1 + _inf_norm(y))


def drive(
    kind: str,
    fn: Callable,
    y0: Tensor,
    params: tuple,
    init: Callable,
    step: Callable,
    *,
    tol: float | None,
    max_iter: int,
    check_every: int,
    grad: str,
    truncate: int,
    solve: str | Callable | None,
    callback: Callable | None,
    curvature: Callable[[dict], Preconditioner | None] | None = None,
) -> SolverSolution:
    """Run init/step to convergence with per-problem masks, in the requested gradient mode.

    kind: "min" (fn = f, optimality ∇f = 0, backward with CG on the symmetric Hessian by
    default) or "fixed" (fn = T, optimality y − T(y) = 0, GMRES by default).
    grad: "implicit" runs the loop without autograd inside `custom_root`, gradients by the
    implicit function theorem; "unroll" backpropagates through every iteration;
    "truncated" solves without autograd, then backpropagates through `truncate` further
    iterations from the detached solution (truncated backprop; one step for a fixed point is
    the Jacobian-free backprop of Fung et al. 2022).
    curvature(final state) -> Preconditioner | None: the solver's final curvature, which
    preconditions the implicit backward's solve and is returned as sol.precond.
    """
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    if not isinstance(y0, Tensor) or y0.dim() != 2:
        raise ValueError(f"y0 must be a (B, n) tensor, got {getattr(y0, 'shape', type(y0))}")
    if not y0.is_floating_point():
        raise TypeError(f"y0 must be a floating point tensor, got {y0.dtype}")
    if max_iter < 1:
        raise ValueError("max_iter must be at least 1")
    if grad == "truncated" and truncate < 1:
        raise ValueError("truncate must be at least 1")
    tol = default_tol(y0.dtype) if tol is None else float(tol)
    info: dict = {}

    def loop(y_start, *ps):
        state = init(y_start, ps)
        B = y_start.shape[0]
        state["active"] = (state["res"] > tol) & torch.isfinite(state["res"])
        numerical = ~torch.isfinite(state["res"])
        iters = torch.zeros(B, dtype=torch.long, device=y_start.device)
        hist = []
        for k in range(max_iter):
            prev = state
            active = state["active"]
            state = step(dict(state), ps)
            bad = active & ~(torch.isfinite(state["y"]).all(-1) & torch.isfinite(state["res"]))
            if any_true(bad):  # keep the last finite iterate of a row that blew up
                state["y"] = torch.where(bad.unsqueeze(-1), prev["y"], state["y"])
                state["res"] = torch.where(bad, prev["res"], state["res"])
                numerical = numerical | bad
            iters = iters + active.long()
            state["active"] = active & ~bad & (state["res"] > tol) & ~state.get("failed", bad & False)
            hist.append(state["res"].detach())
            if callback is not None:
                callback(k, state["y"].detach(), state["res"].detach())
            if (k + 1) % check_every == 0 and not any_true(state["active"]):
                break
        status = torch.full_like(iters, int(SolverStatus.MAX_ITER))
        status = torch.where(state["res"] <= tol, int(SolverStatus.SOLVED), status)
        if "failed" in state:
            status = torch.where(
                state["failed"] & (state["res"] > tol), int(SolverStatus.LINESEARCH_FAILED), status
            )
        status = torch.where(numerical, int(SolverStatus.NUMERICAL), status)
        info.update(
            status=status,
            iters=iters,
            res=state["res"].detach(),
            value=state.get("f"),
            history=torch.stack(hist) if hist else state["res"][None],
            precond=None if curvature is None else curvature(state),
        )
        return state["y"]

    if grad == "implicit":
        optimality = gradient_fn(fn) if kind == "min" else (lambda y, *ps: y - fn(y, *ps))
        default = "cg" if kind == "min" else "gmres"
        y = custom_root(optimality, solve=solve or default, symmetric=kind == "min")(
            lambda y_start, *ps: Preconditioned(loop(y_start, *ps), info["precond"])
        )(y0, *params)
    elif grad == "unroll":
        y = loop(y0, *params)
    else:
        with torch.no_grad():
            y = loop(y0.detach(), *params)
        state = init(y.detach(), params)
        for _ in range(truncate):
            state["active"] = torch.ones_like(state["res"], dtype=torch.bool)
            state = step(dict(state), params)
        y = state["y"]
    value = info["value"]
    return SolverSolution(
        y,
        info["status"],
        info["iters"],
        info["res"],
        None if value is None else value.detach(),
        info["history"],
        info["precond"],
    )
