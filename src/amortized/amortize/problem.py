"""The `Problem` protocol: a parametric optimization problem y*(x) ∈ argmin_y f(y; x).

A problem is any object with the attributes and methods below; nothing is inherited. The
required part is what amortization needs (an objective and a context distribution p(x));
the optional part is detected with `hasattr` and unlocks more of the evaluation report.

Required
    context_dim: int, solution_dim: int
    objective(y, x) -> (B,)           f(y; x) for y (B, solution_dim), x (B, context_dim),
                                      differentiable w.r.t. y (and any learnable parameter)
    sample(n, generator) -> (n, context_dim)   n contexts x ~ p(x)

Optional
    solve(x) -> (B, solution_dim)     a reference solver (timed by `Amortizer.evaluate`)
    constraint_violation(y, x) -> dict {"eq": (B, q), "ineq": (B, m)}
                                      per-constraint violations |Ay − b| and max(Gy − h, 0)
    project(y, x) -> (B, solution_dim)   output projection onto the feasible set
    distance(y, y_ref) -> (B,)        a problem-specific distance (default: Euclidean)
"""

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Problem(Protocol):
    """Structural type of a parametric optimization problem (see the module docstring)."""

    context_dim: int
    solution_dim: int

    def objective(self, y: Tensor, x: Tensor) -> Tensor: ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor: ...


def check_problem(problem: object) -> None:
    """Raise TypeError naming what is missing when `problem` is not a `Problem`."""
    missing = [a for a in ("context_dim", "solution_dim", "objective", "sample") if not hasattr(problem, a)]
    if missing:
        raise TypeError(f"{type(problem).__name__} is not a Problem: missing {', '.join(missing)}")


def distance(problem: object, y: Tensor, y_ref: Tensor) -> Tensor:
    """(B,) distance between solutions: the problem's own `distance`, else Euclidean."""
    if hasattr(problem, "distance"):
        return problem.distance(y, y_ref)
    return (y - y_ref).flatten(1).norm(dim=1)


def violations(problem: object, y: Tensor, x: Tensor) -> dict[str, Tensor]:
    """{"eq": (B, q), "ineq": (B, m)} non-negative violations; empty when unconstrained."""
    out = {"eq": y.new_zeros(y.shape[0], 0), "ineq": y.new_zeros(y.shape[0], 0)}
    if hasattr(problem, "constraint_violation"):
        out.update(problem.constraint_violation(y, x))
    return out
