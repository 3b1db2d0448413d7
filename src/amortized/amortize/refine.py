"""Refinement: K differentiable solver steps from the model's prediction (semi-amortization).

A refiner is any callable

    refiner(objective, y0, x, steps, *, create_graph) -> [y0, y1, …, y_K]   each (B, n)

where objective(y, x) -> (B,). With create_graph=True the steps are unrolled: the iterates
stay differentiable w.r.t. y0 (hence the model's parameters) and the objective's own
parameters. With create_graph=False the iterates are detached (test-time fine-tuning).
A solver of `amortized.solvers` plugs in by wrapping it in this signature.

A refiner that also has `optimality(objective) -> F` and `symmetric` can be trained through
implicitly (`Amortizer(..., refine_grad="implicit")`): F(y, x, *θ) (B, n) vanishes at the
refiner's fixed points (θ the objective's parameters), and `amortized.custom_root`
differentiates y_K through F(y_K, x, θ) = 0 instead of through the K steps. F must use
torch.func (not torch.autograd.grad), as the implicit backward linearizes it with
torch.func.vjp.

Rows of the batch are independent problems, so ∇_y Σ_b f(y_b; x_b) gives every row's own
gradient in one backward pass.
"""

from collections.abc import Callable

import torch
from torch import Tensor

Objective = Callable[[Tensor, Tensor], Tensor]
Refiner = Callable[..., list[Tensor]]


def _grad(objective: Objective, y: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    with torch.enable_grad():
        if not y.requires_grad:
            y = y.detach().requires_grad_()
        (g,) = torch.autograd.grad(objective(y, x).sum(), y, create_graph=create_graph)
    return g


def _func_grad(objective: Callable[..., Tensor], y: Tensor, *args) -> Tensor:
    """∇_y Σ_b f(y_b; …) with torch.func, composable with torch.func.vjp (implicit backward)."""
    return torch.func.grad(lambda y_: objective(y_, *args).sum())(y)


def _stationarity(objective: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """F(y, *args) = ∇_y f(y; …), the optimality function of a refiner that descends f."""

    def F(y, *args):
        return _func_grad(objective, y, *args)

    return F


class GradientRefiner:
    """y_{k+1} = retract(y_k − lr ∇_y f(y_k; x)), K steps.

    lr: a float or a tensor broadcastable to y (per-coordinate step sizes).
    retract: optional map back onto the domain after each step, e.g. normalization onto the
    sphere (then the step uses the Riemannian gradient (I − y yᵀ)∇f when `riemannian`).
    """

    def __init__(
        self,
        lr: float | Tensor,
        retract: Callable[[Tensor], Tensor] | None = None,
        riemannian: bool = False,
    ):
        self.lr, self.retract, self.riemannian = lr, retract, riemannian
        # y − T(y) = lr ∇f(y) has the symmetric Jacobian lr ∇²f unless a retraction or the
        # tangent projection enters the step.
        self.symmetric = retract is None and not riemannian

    def step(self, g: Tensor, y: Tensor) -> Tensor:
        """One step from y (B, n) with Euclidean gradient g (B, n)."""
        if self.riemannian:
            g = g - (g * y).sum(-1, keepdim=True) * y
        y = y - self.lr * g
        return y if self.retract is None else self.retract(y)

    def optimality(self, objective: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """F(y, *args) = y − T(y): zero exactly at the fixed points of the step map T."""

        def F(y, *args):
            return y - self.step(_func_grad(objective, y, *args), y)

        return F

    def __call__(
        self, objective: Objective, y0: Tensor, x: Tensor, steps: int, *, create_graph: bool = True
    ) -> list[Tensor]:
        ys = [y0 if create_graph else y0.detach()]
        y = ys[0]
        for _ in range(steps):
            y = self.step(_grad(objective, y, x, create_graph), y)
            ys.append(y if create_graph else y.detach())
        return ys


class AdamRefiner:
    """K steps of Adam (Kingma & Ba) on f(·; x), written with tensor ops so it unrolls.

    lr, betas, eps as in torch.optim.Adam; the state starts fresh at y0 every call.
    """

    def __init__(self, lr: float | Tensor, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.symmetric = True  # the optimality function ∇f has the Hessian as its Jacobian

    def optimality(self, objective: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """∇_y f(y; …) = 0: Adam's fixed points are the stationary points of f."""
        return _stationarity(objective)

    def __call__(
        self, objective: Objective, y0: Tensor, x: Tensor, steps: int, *, create_graph: bool = True
    ) -> list[Tensor]:
        b1, b2 = self.betas
        ys = [y0 if create_graph else y0.detach()]
        y = ys[0]
        m = torch.zeros_like(y)
        v = torch.zeros_like(y)
        for k in range(1, steps + 1):
            g = _grad(objective, y, x, create_graph)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            y = y - self.lr * (m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + self.eps)
            ys.append(y if create_graph else y.detach())
        return ys


class SolverRefiner:
    """At most K iterations of a solver of `amortized.solvers` (`am.argmin`: "lbfgs",
    "newton", "gd", "adam") from the prediction; returns [y0, y_K] only (the solver keeps
    its iterates to itself, so ℒ^Σ pools the weights of y_1..y_K onto y_K).

    create_graph=True differentiates the iterations by unrolling (the solver's
    grad="unroll"); implicit training goes through `optimality` (∇f = 0, symmetric) like the
    other refiners. options go to the solver (lr, tol, …); the solver may stop before K
    iterations on the problems it has solved.
    """

    def __init__(self, solver: str = "lbfgs", **options):
        self.solver, self.options = solver, options
        self.symmetric = True

    def optimality(self, objective: Callable[..., Tensor]) -> Callable[..., Tensor]:
        return _stationarity(objective)

    def __call__(
        self, objective: Objective, y0: Tensor, x: Tensor, steps: int, *, create_graph: bool = True
    ) -> list[Tensor]:
        from amortized.solvers import argmin

        start = y0 if create_graph else y0.detach()
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            sol = argmin(
                objective, start, x, solver=self.solver, max_iter=steps, grad="unroll", **self.options
            )
        return [start, sol.y if create_graph else sol.y.detach()]
