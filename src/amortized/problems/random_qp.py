"""Random feasible QP families (the OptNet benchmark protocol and harder variants)."""

import torch
from torch import Tensor


def random_qp(B: int, n: int, m: int, q: int, *, dtype=torch.float64, device=None,
              generator: torch.Generator | None = None, Q_reg: float = 1e-3
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """B random strictly feasible QPs: Q = LLᵀ/n + Q_reg·I, p, G, A ~ N(0, 1), and a point
    z0 with Gz0 < h, Az0 = b (h = Gz0 + U[0,1], b = Az0), as in OptNet's timing protocol.
    Returns Q (B,n,n), p (B,n), G (B,m,n), h (B,m), A (B,q,n), b (B,q)."""
    kw = {"dtype": dtype, "device": device}
    r = lambda *s: torch.randn(*s, generator=generator, dtype=dtype).to(device)
    L = r(B, n, n)
    Q = L @ L.mT / n + Q_reg * torch.eye(n, **kw)
    p, G, A, z0 = r(B, n), r(B, m, n), r(B, q, n), r(B, n)
    s0 = torch.rand(B, m, generator=generator, dtype=dtype).to(device)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return Q, p, G, h, A, b
