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
    definite; a constant Q need only be positive semidefinite.

    `feasible=True` keeps the QP strictly feasible during training: the learned right-hand
    sides are built from a point z0 (n,) with G z0 < h, namely h = G z0 + s0 and b = A z0,
    so z0 is always a feasible point with slack s0 > 0. How z0 is parametrized depends on
    what is learned:

    - h learned: z0 is a free parameter and s0 = softplus(s0_raw) (both learned);
    - h constant, b learned, G constant and square invertible (G = −I, h = 0 is z ≥ 0):
      z0 = G⁻¹(h − exp(log_s0)), log_s0 learned; for z ≥ 0 this is OptNet Sudoku's
      b = A exp(log z0);
    - h constant, b learned, G constant, any other shape (boxes, …): z0 = z_c + d/κ(d)
      with z_c a strictly feasible point found at construction (a phase-1 QP, slack
      s_c = h − G z_c > 0), d learned, and κ = max(1, maxᵢ (G d)ᵢ / (0.99 s_c,ᵢ)) pulling
      z_c + d radially back inside: G z0 ≤ h − 0.01 s_c;
    - no inequalities: z0 is a free parameter.
    h constant with G learned and b learned cannot be kept feasible this way (ValueError).

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
        if Q is None:
            self.L = nn.Parameter(torch.eye(n, **kw))
            self.Q = None
        else:  # a constant Q only needs to be PSD (Q = 0 is an LP): kept as it is
            const_or_param("Q", Q, (n, n), None)
            self.L = None
        const_or_param("G", G, (n_ineq, n), randn)
        const_or_param("A", A, (n_eq, n), randn)
        learn_h, learn_b = h is None and n_ineq > 0, b is None and n_eq > 0
        # how z0 is parametrized (see the docstring): "free", "slack" or "gauge"
        self.z0_mode = None
        if feasible and learn_h:
            self.z0_mode = "free"
            self.z0 = nn.Parameter(torch.zeros(n, **kw))
            self.s0 = nn.Parameter(torch.ones(n_ineq, **kw))
            self.h = None
        else:
            const_or_param("h", h, (n_ineq,), lambda s: torch.ones(s, **kw))
        if feasible and learn_b:
            self.b = None
            if self.z0_mode is None:
                self._init_z0_for_constant_h(kw)
        else:
            const_or_param("b", b, (n_eq,), lambda s: torch.zeros(s, **kw))

    def _init_z0_for_constant_h(self, kw: dict) -> None:
        """Parametrize z0 inside the constant {z : Gz < h} (b = A z0 learned, h given)."""
        n, m = self.n, self.n_ineq
        if m == 0:
            self.z0_mode = "free"
            self.z0 = nn.Parameter(torch.zeros(n, **kw))
            return
        if isinstance(self.G, nn.Parameter):
            raise ValueError(
                "feasible=True with a learned G, a constant h and a learned b cannot keep G z0 < h; "
                "learn h too (h=None), give G or b as constants, or pass feasible=False"
            )
        G, h = self.G.detach(), self.h.detach()
        if G.dim() != 2 or h.dim() != 1:
            raise ValueError("feasible=True with constant G, h needs them unbatched: G (m, n), h (m,)")
        G64 = G.double()
        if m == n and torch.linalg.cond(G64) < 1e8:
            # slack coordinates: G z0 = h − exp(log_s0) exactly (z ≥ 0: z0 = exp(log_s0))
            self.z0_mode = "slack"
            self.register_buffer("G_inv", torch.linalg.inv(G64).to(**kw), persistent=False)
            self.log_s0 = nn.Parameter(torch.zeros(m, **kw))
            return
        z_c, s_c = strictly_feasible_point(G64, h.double())
        self.z0_mode = "gauge"
        self.register_buffer("z_c", z_c.to(**kw), persistent=False)
        self.register_buffer("s_c", s_c.to(**kw), persistent=False)
        self.d0 = nn.Parameter(torch.zeros(n, **kw))

    def interior_point(self) -> Tensor | None:
        """z0 (n,): the strictly feasible point the learned h and/or b are built from (None
        when feasible=False or nothing needs it)."""
        mode = self.z0_mode
        if mode == "free":
            return self.z0
        if mode == "slack":
            return self.G_inv @ (self.h - self.log_s0.exp())
        if mode == "gauge":
            kappa = ((self.G @ self.d0) / (0.99 * self.s_c)).amax().clamp(min=1)
            return self.z_c + self.d0 / kappa
        return None

    def data(self) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """The current Q, G, h, A, b."""
        Q = self.Q
        if Q is None:
            Q = self.L @ self.L.mT + self.eps_Q * torch.eye(self.n, dtype=self.L.dtype, device=self.L.device)
        z0 = self.interior_point()
        h = self.h if self.h is not None or not self.n_ineq else self.G @ z0 + softplus(self.s0)
        b = self.b if self.b is not None or not self.n_eq else self.A @ z0
        return Q, self.G, h, self.A, b

    def solve(self, p: Tensor) -> QPSolution:
        Q, G, h, A, b = self.data()
        return solve_qp(Q, p, G, h, A, b, **self.solver_options)

    def forward(self, p: Tensor) -> Tensor:
        return self.solve(p).z


def strictly_feasible_point(G: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """A point z_c (n,) with G z_c < h for G (m, n), h (m,), and its slack h − G z_c (m,).

    Phase 1 as a QP in (z, t): maximize the common margin t ≤ 1 of Gz + t ≤ h, with a small
    ridge ½ε‖(z, t)‖² so that the QP is strictly convex and z stays near the origin.
    Raises ValueError when the best margin is not positive (no strictly feasible point)."""
    m, n = G.shape
    one = G.new_ones(m, 1)
    G1 = torch.cat([torch.cat([G, one], 1), torch.cat([G.new_zeros(1, n), one[:1]], 1)])
    h1 = torch.cat([h, h.new_ones(1)])
    p1 = torch.cat([G.new_zeros(n), G.new_full((1,), -1.0)])
    with torch.no_grad():
        sol = solve_qp(1e-3 * torch.eye(n + 1, dtype=G.dtype, device=G.device), p1, G1, h1)
    z_c = sol.z[0, :n]
    s_c = h - G @ z_c
    if not bool(sol.solved.all()) or not s_c.amin() > 1e-9 * (1 + h.abs().amax()):
        raise ValueError(
            "feasible=True: the constant constraints G z ≤ h have no strictly feasible point "
            f"(best margin {float(s_c.amin()):.3g})"
        )
    return z_c, s_c
