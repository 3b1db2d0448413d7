"""`QPLayer`: an OptNet layer with learnable QP data."""

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from amortized.qp.solve import QPSolution, solve_qp


class QPLayer(nn.Module):
    """z*(p) = argmin ½zᵀQz + pᵀz  s.t.  Gz ≤ h, Az = b, with p given per example and the
    rest learned or constant (OptNet, Amos & Kolter 2017).

    Each of Q, G, h, A, b passed as a tensor is a constant (a buffer); left as None it is a
    learned parameter (when its block has rows). Learned Q = LLᵀ + eps_Q·I stays positive
    definite. With `feasible=True` the learned right-hand sides are h = G z0 + s0 (s0 > 0
    through softplus) and b = A z0 for learned z0, so the QP always has the strictly
    feasible point z0 and never becomes infeasible during training.

    forward(p) with p (B, n) or (n,) returns z (B, n); `solve(p)` returns the full
    `QPSolution` (duals, status). Extra keyword arguments go to `solve_qp`.
    """

    def __init__(
        self,
        n: int,
        n_ineq: int = 0,
        n_eq: int = 0,
        *,
        Q: Tensor | None = None,
        G: Tensor | None = None,
        h: Tensor | None = None,
        A: Tensor | None = None,
        b: Tensor | None = None,
        feasible: bool = True,
        eps_Q: float = 1e-4,
        device=None,
        dtype=None,
        **solver_options,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        self.n, self.n_ineq, self.n_eq = n, n_ineq, n_eq
        self.feasible, self.eps_Q, self.solver_options = feasible, eps_Q, solver_options

        def const_or_param(name, value, shape, init):
            if value is not None:
                if tuple(value.shape[-len(shape) :]) != shape:
                    raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {shape}")
                self.register_buffer(name, value.to(**kw))
            elif 0 not in shape:
                setattr(self, name, nn.Parameter(init(shape)))
            else:
                setattr(self, name, None)

        randn = lambda s: torch.randn(s, **kw) / max(1, s[-1]) ** 0.5
        const_or_param(
            "L",
            None if Q is None else torch.linalg.cholesky(Q.to(**kw)),
            (n, n),
            lambda s: torch.eye(n, **kw),
        )
        const_or_param("G", G, (n_ineq, n), randn)
        const_or_param("A", A, (n_eq, n), randn)
        learn_h, learn_b = h is None and n_ineq > 0, b is None and n_eq > 0
        if feasible and (learn_h or learn_b):
            self.z0 = nn.Parameter(torch.zeros(n, **kw))
        if feasible and learn_h:
            self.s0 = nn.Parameter(torch.ones(n_ineq, **kw))
            self.h = None
        else:
            const_or_param("h", h, (n_ineq,), lambda s: torch.ones(s, **kw))
        if feasible and learn_b:
            self.b = None
        else:
            const_or_param("b", b, (n_eq,), lambda s: torch.zeros(s, **kw))

    def data(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """The current Q, G, h, A, b."""
        n = self.n
        Q = self.L @ self.L.mT
        if isinstance(self.L, nn.Parameter):
            Q = Q + self.eps_Q * torch.eye(n, dtype=Q.dtype, device=Q.device)
        h = self.h if self.h is not None or not self.n_ineq else self.G @ self.z0 + softplus(self.s0)
        b = self.b if self.b is not None or not self.n_eq else self.A @ self.z0
        return Q, self.G, h, self.A, b

    def solve(self, p: Tensor) -> QPSolution:
        Q, G, h, A, b = self.data()
        return solve_qp(Q, p, G, h, A, b, **self.solver_options)

    def forward(self, p: Tensor) -> Tensor:
        return self.solve(p).z
