"""Batched Cholesky that reports failure per matrix instead of raising.

torch 2.13's batched LU is unreliable with several MKL threads for n ≳ 150 (DESIGN.md);
every system we factor is symmetric positive definite after elimination, so Cholesky is
both the fast and the safe choice.
"""

import torch
from torch import Tensor

from amortized.linalg.matvec import inf_norm


def cholesky(M: Tensor, *, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """Factor M = L Lᵀ for a batch of symmetric matrices (only the lower triangle is read).

    M: (..., n, n). Returns L (..., n, n) and ok (...,) bool. Where ok is False the
    factorization failed (M not numerically positive definite or not finite); that L is the
    identity so that solves with it stay finite and the caller decides what to do.
    overwrite=True factors in place, into M's memory, which must be column-major per
    matrix (see `col_major`): no second n × n matrix is allocated, and L is bitwise the
    same. M is then destroyed, also where the factorization fails.
    """
    if overwrite:
        if not M.mT.is_contiguous():
            raise ValueError("cholesky(overwrite=True) needs a column-major M (col_major)")
        info = torch.empty(M.shape[:-2], dtype=torch.int32, device=M.device)
        L, info = torch.linalg.cholesky_ex(M, out=(M, info))  # LAPACK's potrf is in place
    else:
        L, info = torch.linalg.cholesky_ex(M)
    # a NaN or Inf anywhere reaches the diagonal, so checking it is enough (and cheap)
    ok = (info == 0) & torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all(-1)
    if not bool(ok.all()):
        eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
        L = torch.where(ok[..., None, None], L, eye)
    return L, ok


def col_major(M: Tensor, *, copy: bool = True) -> Tensor:
    """A symmetric M (..., n, n) laid out column-major per matrix, the layout in which
    `cholesky(·, overwrite=True)` factors without a second matrix: a copy, or with
    copy=False M itself where it has that layout or is row-major (its transpose is the same
    matrix: the factorization then reads M's upper triangle, equal up to rounding where M is
    formed by products)."""
    if M.mT.is_contiguous():
        return M.clone() if copy else M
    if M.is_contiguous():
        return M.clone().mT if copy else M.mT  # a plain copy is 2–3× faster than a transposing one
    return M.mT.contiguous().mT


def cholesky_solve(L: Tensor, r: Tensor) -> Tensor:
    """Solve L Lᵀ x = r. L: (..., n, n); r: (..., n) or (..., n, k) with k columns.

    Two triangular solves with U = Lᵀ, which is contiguous for the column-major factors
    LAPACK returns: about 3× faster than torch.cholesky_solve, which copies the factor."""
    vec = r.dim() == L.dim() - 1
    R = r.unsqueeze(-1) if vec else r
    U = L.mT
    x = torch.linalg.solve_triangular(U, torch.linalg.solve_triangular(U.mT, R, upper=False), upper=True)
    return x.squeeze(-1) if vec else x


def shifted_cholesky(Q: Tensor, shift: float | Tensor) -> tuple[Tensor, Tensor]:
    """`cholesky` of Q + shift·I for a symmetric Q (..., n, n) and one shift or one per
    matrix (...,), factored in place in a column-major copy (Q is left as it is)."""
    H = col_major(Q)
    H.diagonal(dim1=-2, dim2=-1).add_(shift.unsqueeze(-1) if isinstance(shift, Tensor) else shift)
    return cholesky(H, overwrite=True)


def comfortable_cholesky(Q: Tensor, rho: float) -> tuple[Tensor, Tensor]:
    """L = chol(Q + ρI) (..., n, n) and (...,) whether Q is comfortably positive definite:
    factored, with a smallest pivot of at least √ε·(1 + max|Q|)."""
    scale = 1 + inf_norm(Q, (-2, -1))
    L, ok = shifted_cholesky(Q, rho)
    pivot = L.diagonal(dim1=-2, dim2=-1).amin(-1) ** 2
    return L, ok & (pivot >= torch.finfo(Q.dtype).eps ** 0.5 * scale)
