"""Amortization losses (the tutorial's ch. 2 taxonomy).

regression   ℒ_reg(θ) = E_x ‖ŷ_θ(x) − y*(x)‖²                (needs labels y*)
objective    ℒ_obj(θ) = E_x f(ŷ_θ(x); x) + ρ · E_x P(ŷ_θ(x); x)
             with the soft penalty P = Σ_j |A y − b|_j² + Σ_i max(G y − h, 0)_i²
mixed        a · ℒ_reg + b · ℒ_obj
iterate sum  ℒ^Σ = Σ_{k=0..K} w_k ℒ(y_k) over the refinement iterates y_0 = ŷ_θ(x), …, y_K,
             with w constant (1/(K+1)), increasing (k+1, normalized), or only the last
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from amortized.amortize.problem import violations

LOSSES = ("regression", "objective", "mixed")


def regression_loss(y: Tensor, y_star: Tensor) -> Tensor:
    """Mean over the batch of ‖y − y*‖²; y, y_star (B, n)."""
    if y_star is None:
        raise ValueError("the regression loss needs reference solutions y* (pass data=(x, y_star))")
    return (y - y_star).flatten(1).square().sum(1).mean()


def penalty(problem, y: Tensor, x: Tensor) -> Tensor:
    """(B,) soft penalty Σ eq violation² + Σ ineq violation²."""
    v = violations(problem, y, x)
    return v["eq"].square().sum(1) + v["ineq"].square().sum(1)


def objective_loss(problem, y: Tensor, x: Tensor, penalty_weight: float = 0.0) -> Tensor:
    """Mean over the batch of f(y; x) + ρ P(y; x)."""
    f = problem.objective(y, x)
    if penalty_weight:
        f = f + penalty_weight * penalty(problem, y, x)
    return f.mean()


def iterate_weights(kind: str | Sequence[float], K: int, like: Tensor) -> Tensor:
    """(K+1,) weights over iterates y_0..y_K: 'last', 'constant', 'increasing' or explicit."""
    if isinstance(kind, str):
        if kind == "last":
            w = torch.zeros(K + 1)
            w[-1] = 1.0
        elif kind == "constant":
            w = torch.ones(K + 1)
        elif kind == "increasing":
            w = torch.arange(1, K + 2, dtype=torch.float64)
        else:
            raise ValueError(
                f"iterate weights must be 'last', 'constant', 'increasing' or a list, got {kind!r}"
            )
    else:
        w = torch.as_tensor(list(kind), dtype=torch.float64)
        if w.shape != (K + 1,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"explicit iterate weights must be {K + 1} non-negative numbers, not all zero")
    return (w / w.sum()).to(like)
