"""Batched unconstrained and fixed-point solvers with per-problem convergence masks and status,
each differentiable implicitly ("implicit"), by unrolling ("unroll") or through the last
iterations ("truncated")."""

from amortized.solvers._common import GRAD_MODES, SolverSolution, SolverStatus, default_tol, hessian
from amortized.solvers.adam import adam
from amortized.solvers.anderson import anderson
from amortized.solvers.argmin import FIXED_POINT_SOLVERS, MINIMIZERS, argmin, fixed_point
from amortized.solvers.broyden import broyden
from amortized.solvers.fixed_point_iteration import fixed_point_iteration
from amortized.solvers.gradient_descent import gradient_descent
from amortized.solvers.lbfgs import lbfgs
from amortized.solvers.newton import newton

__all__ = [
    "FIXED_POINT_SOLVERS",
    "GRAD_MODES",
    "MINIMIZERS",
    "SolverSolution",
    "SolverStatus",
    "adam",
    "anderson",
    "argmin",
    "broyden",
    "default_tol",
    "fixed_point",
    "fixed_point_iteration",
    "gradient_descent",
    "hessian",
    "lbfgs",
    "newton",
]
