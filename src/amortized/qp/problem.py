"""Validation and broadcasting of QP data

    minimize ½ zᵀQz + pᵀz   subject to   Gz ≤ h,  Az = b.

Every argument may carry a leading batch dimension or omit it (shared by the batch).
"""

from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor

from amortized.linalg import bmv, brmv, comfortable_cholesky, inf_norm, shifted_cholesky


@dataclass(frozen=True)
class Separable:
    """The structure of separable data (bounds, z ≥ 0 with a diagonal Q): Q = diag(q) and
    row i of G is g_i at column col_i. q (B, n), g (B, m), col (B, m) long."""

    q: Tensor
    g: Tensor
    col: Tensor

    def index(self, idx: Tensor) -> "Separable":
        return Separable(self.q[idx], self.g[idx], self.col[idx])


@dataclass(frozen=True)
class QPData:
    """Validated QP data, every tensor expanded (as a view) to the batch size B.
    Q (B,n,n) symmetrized, p (B,n), G (B,m,n), h (B,m), A (B,q,n), b (B,q); `sep` the
    structure of separable data once detected (`separated`), used by the products."""

    Q: Tensor
    p: Tensor
    G: Tensor
    h: Tensor
    A: Tensor
    b: Tensor
    sep: Separable | None = None

    def index(self, idx: Tensor) -> "QPData":
        """The problems idx (a LongTensor of batch indices), with the factors of Q known."""
        sep = None if self.sep is None else self.sep.index(idx)
        sub = QPData(*(x[idx] for x in (self.Q, self.p, self.G, self.h, self.A, self.b)), sep=sep)
        if "_factors_Q" in vars(self):
            # a subset keeps its batch's answer, None included: the same KKT form throughout
            vars(sub)["_factors_Q"] = {
                rho: (L if L is None else L[idx], comfortable[idx])
                for rho, (L, comfortable) in vars(self)["_factors_Q"].items()
            }
        return sub

    def factor_Q(self, rho: float, L: Tensor | None = None) -> Tensor | None:
        """chol(Q + ρI) (B, n, n), or None when Q is not comfortably positive definite in
        every problem (`comfortable_cholesky`): computed once per ρ (or given as L by a
        caller that factored Q) and kept, since the choice of the KKT form, each factorization
        of an active set (the polish, the backward) and the dual form's base all ask."""
        factors = vars(self).setdefault("_factors_Q", {})
        if L is not None:
            factors[rho] = (L, torch.ones(L.shape[0], dtype=torch.bool, device=L.device))
        if rho not in factors:
            L, comfortable = comfortable_cholesky(self.Q, rho)
            factors[rho] = (L if bool(comfortable.all()) else None, comfortable)
        return factors[rho][0]

    def comfortable(self, rho: float) -> Tensor:
        """(B,) whether Q is comfortably positive definite, problem by problem (`factor_Q`)."""
        self.factor_Q(rho)
        return vars(self)["_factors_Q"][rho][1]

    def to(self, dtype: torch.dtype) -> "QPData":
        """The same data in another dtype."""
        sep = self.sep and Separable(self.sep.q.to(dtype), self.sep.g.to(dtype), self.sep.col)
        return QPData(*(x.to(dtype) for x in (self.Q, self.p, self.G, self.h, self.A, self.b)), sep=sep)

    def separated(self) -> "QPData":
        """The same data with `sep` set when Q is diagonal and every row of G has at most
        one nonzero in every problem (so Q + GᵀWG is diagonal for any W). The first problem
        is tested alone first: dense data fail there at the cost of one problem."""
        for Q, G in ((self.Q[:1], self.G[:1]), (self.Q, self.G)):
            if bool((torch.count_nonzero(G, dim=-1) > 1).any()):
                return self
            if bool((torch.count_nonzero(Q, dim=-1) - (Q.diagonal(dim1=-2, dim2=-1) != 0).long() > 0).any()):
                return self
        col = self.G.abs().argmax(-1)
        g = self.G.gather(-1, col.unsqueeze(-1)).squeeze(-1)
        return replace(self, sep=Separable(self.Q.diagonal(dim1=-2, dim2=-1), g, col))

    def Qx(self, x: Tensor) -> Tensor:
        """Qx for x (B, n)."""
        return self.sep.q * x if self.sep is not None else bmv(self.Q, x)

    def Gx(self, x: Tensor) -> Tensor:
        """Gx for x (B, n)."""
        if self.sep is not None:
            return self.sep.g * x.gather(-1, self.sep.col)
        return bmv(self.G, x)

    def Gty(self, y: Tensor) -> Tensor:
        """Gᵀy for y (B, m)."""
        if self.sep is not None:
            return y.new_zeros(self.p.shape).scatter_add(-1, self.sep.col, self.sep.g * y)
        return brmv(self.G, y)

    @cached_property
    def hb(self) -> Tensor:
        """[h; b] (B, m + q): the right sides of all constraint rows."""
        return torch.cat([self.h, self.b], dim=-1)

    @cached_property
    def C(self) -> Tensor:
        """[G; A] (B, m + q, n): all constraint rows, for single-pass products."""
        return torch.cat([self.G, self.A], dim=-2)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, n, m, q): batch size, variables, inequalities, equalities."""
        B, n = self.p.shape
        return B, n, self.G.shape[-2], self.A.shape[-2]


def _check(name: str, x: Tensor, core: tuple[int, ...], expected: str) -> int | None:
    """Check x has shape core or (B, *core); return B (None when no batch dimension)."""
    if x.shape == core:
        return None
    if x.dim() == len(core) + 1 and tuple(x.shape[1:]) == core:
        return x.shape[0]
    raise ValueError(f"{name} has shape {tuple(x.shape)}; expected {expected}")


def _is_empty(x: Tensor | None, rows: int) -> bool:
    """No constraints: None, qpth's empty tensor, or no rows (dimension `rows`); a batch of
    no problems (B = 0) with rows is not empty."""
    return x is None or x.numel() == 0 and (x.dim() <= 1 or x.shape[rows] == 0)


def qp_data(Q, p, G=None, h=None, A=None, b=None) -> tuple[QPData, Tensor]:
    """Validate and broadcast. Returns the data and a (B,) bool mask of problems whose data
    are all finite (the others must be reported NUMERICAL by the caller).

    Empty tensors count as absent constraints (qpth's convention)."""
    if not isinstance(Q, Tensor) or not isinstance(p, Tensor):
        raise TypeError("Q and p must be torch tensors")
    if p.dim() not in (1, 2):
        raise ValueError(f"p has shape {tuple(p.shape)}; expected (n,) or (B, n)")
    n = p.shape[-1]
    if n == 0:
        raise ValueError("p has zero variables")
    tensors = {"Q": Q, "p": p}
    for name, (M, r) in {"G/h": (G, h), "A/b": (A, b)}.items():
        if _is_empty(M, -2) != _is_empty(r, -1):
            raise ValueError(f"{name}: give both or neither (got only one of them)")
        if not _is_empty(M, -2):
            tensors[name[0]], tensors[name[2]] = M, r
    for name, x in tensors.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch tensor, got {type(x).__name__}")
    dtype, device = p.dtype, p.device
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"p has dtype {dtype}; expected torch.float32 or torch.float64")
    for name, x in tensors.items():
        if x.dtype != dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but p has {dtype}; use one dtype for all")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but p is on {device}; use one device")

    batch = {"p": _check("p", p, (n,), f"(n,) or (B, n) with n = {n}")}
    batch["Q"] = _check("Q", Q, (n, n), f"(n, n) or (B, n, n) with n = {n}")
    rows = {}
    for M, r in (("G", "h"), ("A", "b")):
        if M not in tensors:
            continue
        m = tensors[r].shape[-1]
        rows[M] = m
        batch[M] = _check(M, tensors[M], (m, n), f"(m, n) or (B, m, n) with m = {m} (from {r}), n = {n}")
        batch[r] = _check(r, tensors[r], (m,), f"(m,) or (B, m) with m = {tensors[M].shape[-2]} (from {M})")
    sizes = {k: v for k, v in batch.items() if v is not None and v != 1}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inconsistent batch sizes {sizes}; each argument has batch size B, 1, or none")
    B = next(iter(sizes.values()), 1)

    def full(x: Tensor, core: int) -> Tensor:
        return x.expand((B,) + x.shape[-core:])

    # only the symmetric part of Q enters zᵀQz; symmetrized before broadcasting, and not
    # copied at all when already symmetric (a shared or large Q stays one tensor)
    Q = Q if torch.equal(Q, Q.mT) else (Q + Q.mT).mul_(0.5)  # in place: one (B, n, n) less
    out = {"Q": full(Q, 2), "p": full(p, 1)}
    for M, r in (("G", "h"), ("A", "b")):
        if M in tensors:
            out[M], out[r] = full(tensors[M], 2), full(tensors[r], 1)
        else:
            out[M], out[r] = p.new_zeros(B, 0, n), p.new_zeros(B, 0)
    data = QPData(**out)
    finite = torch.ones(B, dtype=torch.bool, device=device)
    for x in out.values():
        if x.numel():
            # max|x| is finite exactly where every entry is (NaN and ±Inf reach it): two
            # reductions, without the mask of torch.isfinite(x), 4 ms for a (128, 100, 100) Q
            finite &= torch.isfinite(inf_norm(x, tuple(range(1, x.dim()))))
    return data, finite


def check_convex(Q: Tensor) -> None:
    """Raise ValueError when a Q (..., n, n) is clearly not positive semidefinite.

    'Clearly' means Q + τI has no Cholesky factor for τ = √ε·(1 + max|Q|): rounding-level
    negative eigenvalues of a PSD-singular Q (an LP has Q = 0) pass."""
    Q = Q.detach()
    tau = torch.finfo(Q.dtype).eps ** 0.5 * (1 + inf_norm(Q, (-2, -1)))
    bad = ~shifted_cholesky(Q, tau)[1].reshape(-1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()[:10]
        lo = torch.linalg.eigvalsh(Q.reshape(-1, *Q.shape[-2:])[bad]).amin().item()
        raise ValueError(
            f"Q is not positive semidefinite for problem(s) {idx} (smallest eigenvalue {lo:.3g}); "
            "the QP must be convex"
        )
