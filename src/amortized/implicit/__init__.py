"""Implicit differentiation of solutions defined by optimality conditions F(y, θ) = 0."""

from amortized.implicit.root import (
    Preconditioned,
    Preconditioner,
    cholesky_preconditioner,
    custom_fixed_point,
    custom_root,
    implicit_root,
    make_transpose_solve,
)
from amortized.linalg import linear_solve

__all__ = [
    "Preconditioned",
    "Preconditioner",
    "cholesky_preconditioner",
    "custom_fixed_point",
    "custom_root",
    "implicit_root",
    "linear_solve",
    "make_transpose_solve",
]
