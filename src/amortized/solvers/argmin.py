"""`argmin` and `fixed_point`: one entry point per problem kind, solver chosen by name."""

from collections.abc import Callable

from torch import Tensor

from amortized.solvers._common import SolverSolution
from amortized.solvers.adam import adam
from amortized.solvers.anderson import anderson
from amortized.solvers.broyden import broyden
from amortized.solvers.fixed_point_iteration import fixed_point_iteration
from amortized.solvers.gradient_descent import gradient_descent
from amortized.solvers.lbfgs import lbfgs
from amortized.solvers.newton import newton

MINIMIZERS: dict[str, Callable[..., SolverSolution]] = {
    "lbfgs": lbfgs,
    "newton": newton,
    "gd": gradient_descent,
    "adam": adam,
}
FIXED_POINT_SOLVERS: dict[str, Callable[..., SolverSolution]] = {
    "anderson": anderson,
    "broyden": broyden,
    "iteration": fixed_point_iteration,
}


def argmin(f: Callable[..., Tensor], y0: Tensor, *params, solver: str = "lbfgs", **options) -> SolverSolution:
    """y*(θ) = argmin_y f(y, θ) for B independent smooth unconstrained problems.

    f(y (B, n), *params) -> (B,); row b depends only on problem b; params batched or shared
    (gradients of shared ones are summed over the batch). solver: "lbfgs" (default),
    "newton", "gd", "adam". options go to the solver (tol, max_iter, grad="implicit" |
    "unroll" | "truncated", truncate, solve (backward linear solve, "cg" by default), …).
    In the default implicit mode, sol.y is differentiable w.r.t. every tensor in params
    through the optimality condition ∇_y f(y*, θ) = 0:
    ∂y*/∂θ = −(∇²_yy f)⁻¹ ∇²_yθ f (Blondel et al. 2022).
    """
    if solver not in MINIMIZERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(MINIMIZERS)}")
    return MINIMIZERS[solver](f, y0, *params, **options)


def fixed_point(
    T: Callable[..., Tensor], y0: Tensor, *params, solver: str = "anderson", **options
) -> SolverSolution:
    """y*(θ) = T(y*, θ) for B independent problems, y (B, n); row b of T depends only on
    problem b. solver: "anderson" (default), "broyden", "iteration". In the default implicit
    mode sol.y is differentiable w.r.t. the params through y − T(y, θ) = 0:
    ∂y*/∂θ = (I − ∂T/∂y)⁻¹ ∂T/∂θ."""
    if solver not in FIXED_POINT_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {sorted(FIXED_POINT_SOLVERS)}")
    return FIXED_POINT_SOLVERS[solver](T, y0, *params, **options)
