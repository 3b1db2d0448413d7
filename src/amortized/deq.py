"""Deep equilibrium layer (Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS 2019).

The layer's output is the fixed point z* = f(z*, x) of a module f, found by a batched
fixed-point solver (Anderson by default) with autograd off, and differentiated implicitly:
the backward solves (I − ∂f/∂z)ᵀ u = v per sample, so memory does not grow with the number
of forward iterations.
"""

import torch
from torch import Tensor, nn

from amortized.solvers import SolverSolution, fixed_point


class DEQ(nn.Module):
    """z* = f(z*, x), differentiable w.r.t. x and the parameters of f.

    f: a module mapping (z (B, d), x (B, ...)) -> (B, d), with row b depending only on
    sample b (no batch statistics: LayerNorm is fine, BatchNorm is not). It should be a
    contraction in z (or at least have a stable fixed point) for the solver to converge.
    d: the state size; z starts at zero unless z0 (B, d) is given to forward.
    solver: "anderson" | "broyden" | "iteration"; grad: "implicit" (default) | "unroll" |
    "truncated" (with `truncate` steps; truncate=1 is Jacobian-free backprop);
    backward_solve: the linear solve of the implicit backward ("gmres", "neumann", ...).
    Other keyword options (max_iter, tol, memory, ...) go to the solver.

    After each forward, `last_solution` holds the SolverSolution (status, iters and the
    residual history (iters, B) of the solve), detached.
    """

    def __init__(
        self,
        f: nn.Module,
        d: int,
        *,
        solver: str = "anderson",
        grad: str = "implicit",
        backward_solve: str = "gmres",
        truncate: int = 1,
        max_iter: int = 50,
        tol: float | None = None,
        **solver_options,
    ) -> None:
        super().__init__()
        if d < 1:
            raise ValueError("d must be a positive state size")
        self.f, self.d = f, d
        self.solver, self.grad, self.backward_solve, self.truncate = (
            solver,
            grad,
            backward_solve,
            truncate,
        )
        self.max_iter, self.tol, self.solver_options = max_iter, tol, solver_options
        self.last_solution: SolverSolution | None = None

    def forward(self, x: Tensor, z0: Tensor | None = None) -> Tensor:
        names = [n for n, _ in self.f.named_parameters()]
        values = tuple(p for _, p in self.f.named_parameters())

        def T(z, x_, *ps):
            return torch.func.functional_call(self.f, dict(zip(names, ps, strict=False)), (z, x_))

        if z0 is None:
            z0 = x.new_zeros(x.shape[0], self.d)
        sol = fixed_point(
            T,
            z0,
            x,
            *values,
            solver=self.solver,
            grad=self.grad,
            truncate=self.truncate,
            solve=self.backward_solve,
            max_iter=self.max_iter,
            tol=self.tol,
            **self.solver_options,
        )
        self.last_solution = SolverSolution(
            sol.y.detach(), sol.status, sol.iters, sol.residual, sol.value, sol.history
        )
        return sol.y

    def extra_repr(self) -> str:
        return f"d={self.d}, solver={self.solver!r}, grad={self.grad!r}, max_iter={self.max_iter}"
