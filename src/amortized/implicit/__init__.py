"""Implicit differentiation of solutions defined by optimality conditions F(y, θ) = 0."""

from amortized.implicit.root import implicit_root

__all__ = ["implicit_root"]
