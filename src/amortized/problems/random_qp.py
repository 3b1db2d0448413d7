"""Random feasible QP families: the OptNet benchmark protocol and harder variants used by
the tests, the benchmarks and the demo. Each returns Q (B,n,n), p (B,n), G (B,m,n),
h (B,m), A (B,q,n), b (B,q); absent blocks have zero rows."""

import torch
from torch import Tensor

from amortized.linalg import bmv

QP = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _randn(generator, dtype, *shape):
    return torch.randn(*shape, generator=generator, dtype=dtype)


def random_qp(
    B: int,
    n: int,
    m: int,
    q: int,
    *,
    dtype=torch.float64,
    generator: torch.Generator | None = None,
    Q_reg: float = 1e-3,
) -> QP:
    """OptNet's protocol: Q = LLᵀ/n + Q_reg·I, p, G, A ~ N(0, 1), and a point z0 with
    Gz0 < h, Az0 = b (h = Gz0 + U[0,1], b = Az0)."""
    L = _randn(generator, dtype, B, n, n)
    Q = L @ L.mT / n + Q_reg * torch.eye(n, dtype=dtype)
    p, G, A, z0 = (_randn(generator, dtype, *s) for s in ((B, n), (B, m, n), (B, q, n), (B, n)))
    h = bmv(G, z0) + torch.rand(B, m, generator=generator, dtype=dtype)
    return Q, p, G, h, A, bmv(A, z0)


def box_qp(B: int, n: int, *, dtype=torch.float64, generator=None) -> QP:
    """Box constraints only, −1 ≤ z ≤ 1, written as G = [I; −I], h = 1; many active."""
    Q, p, *_ = random_qp(B, n, 0, 0, dtype=dtype, generator=generator)
    eye = torch.eye(n, dtype=dtype)
    G = torch.cat([eye, -eye]).expand(B, 2 * n, n)
    empty = Q.new_zeros(B, 0, n), Q.new_zeros(B, 0)
    return Q, 3 * p, G, Q.new_ones(B, 2 * n), *empty


def equality_qp(B: int, n: int, q: int, *, dtype=torch.float64, generator=None) -> QP:
    """Equality constraints only."""
    Q, p, _, _, A, b = random_qp(B, n, 0, q, dtype=dtype, generator=generator)
    return Q, p, Q.new_zeros(B, 0, n), Q.new_zeros(B, 0), A, b


def degenerate_qp(B: int, n: int, m: int, q: int, *, dtype=torch.float64, generator=None) -> QP:
    """Redundant rows: every inequality and equality appears twice (A rank-deficient with a
    consistent b), and a third of the inequalities are tight at the feasible point."""
    Q, p, G, h, A, b = random_qp(B, n, m, q, dtype=dtype, generator=generator)
    z0 = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1) if q else None
    if z0 is not None:
        tight = bmv(G, z0)
        h = torch.where(torch.arange(m) % 3 == 0, tight, h)
    return (
        Q,
        p,
        torch.cat([G, G], 1),
        torch.cat([h, h], 1),
        torch.cat([A, A], 1),
        torch.cat([b, b], 1),
    )


def lp_box(B: int, n: int, m: int, *, dtype=torch.float64, generator=None) -> QP:
    """An LP (Q = 0) with a box −1 ≤ z ≤ 1 and m random inequalities feasible at 0."""
    _, p, G, _, _, _ = random_qp(B, n, m, 0, dtype=dtype, generator=generator)
    eye = torch.eye(n, dtype=dtype).expand(B, n, n)
    G = torch.cat([G, eye, -eye], 1)
    h = torch.cat([torch.rand(B, m, generator=generator, dtype=dtype) + 0.1, p.new_ones(B, 2 * n)], 1)
    return p.new_zeros(B, n, n), p, G, h, p.new_zeros(B, 0, n), p.new_zeros(B, 0)


def separable_qp(B: int, n: int, q: int, *, fixed: bool = False, dtype=torch.float64, generator=None) -> QP:
    """Bounds only, with a diagonal Q (a third of it zero: PSD-singular) and q equalities:
    the structure of OptNet's Sudoku layer. Rows c·z_j ≤ c·u_j and −c·z_j ≤ −c·l_j with
    row scales c ∈ [0.5, 2], l < z0 < u (`fixed`: z_0 fixed by l = u, two active rows on
    one variable and no interior point), every other variable also has z ≥ 0 written as a
    third row; b = A z0."""
    r = lambda *s: torch.rand(*s, generator=generator, dtype=dtype)
    Q = torch.diag_embed(r(B, n) * (torch.arange(n) % 3 != 0))
    z0 = 1 + r(B, n)
    lo, up = z0 - r(B, n), z0 + r(B, n)
    if fixed:
        lo[:, 0] = up[:, 0] = z0[:, 0]
    eye = torch.eye(n, dtype=dtype)
    rows = torch.cat([eye, -eye, -eye[1::2]])
    c = 0.5 + 1.5 * r(B, rows.shape[0])
    G = c.unsqueeze(-1) * rows
    h = c * torch.cat([up, -lo, torch.zeros(B, rows.shape[0] - 2 * n, dtype=dtype)], 1)
    p, A = (torch.randn(*s, generator=generator, dtype=dtype) for s in ((B, n), (B, q, n)))
    return Q, 2 * p, G, h, A, bmv(A, z0)


FAMILIES = {
    "optnet": lambda B, dtype, g: random_qp(B, 30, 30, 15, dtype=dtype, generator=g),
    "box": lambda B, dtype, g: box_qp(B, 25, dtype=dtype, generator=g),
    "equality": lambda B, dtype, g: equality_qp(B, 30, 12, dtype=dtype, generator=g),
    "degenerate": lambda B, dtype, g: degenerate_qp(B, 20, 15, 6, dtype=dtype, generator=g),
    "tall": lambda B, dtype, g: random_qp(B, 10, 200, 2, dtype=dtype, generator=g),
    "lp_box": lambda B, dtype, g: lp_box(B, 20, 10, dtype=dtype, generator=g),
    "separable": lambda B, dtype, g: separable_qp(B, 24, 6, dtype=dtype, generator=g),
}
