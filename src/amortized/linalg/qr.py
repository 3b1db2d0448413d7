"""The complete QR factorization of a batch of tall matrices."""

import torch
from torch import Tensor


def complete_qr(M: Tensor) -> tuple[Tensor, Tensor]:
    """U (B, n, n) orthogonal and R (B, k, k) upper triangular with M = U[..., :k] R, for
    M (B, n, k), n ≥ k: torch.linalg.qr(M, mode="complete") with its R trimmed to k rows.

    LAPACK's geqrf leaves U as k Householder reflectors H_i = I − τ_i v_i v_iᵀ; torch forms
    it by orgqr, which for a batch of small matrices costs twice the factorization. Their
    compact WY form U = I − V T Vᵀ (Schreiber & Van Loan 1989) forms it with three batched
    products instead, T upper triangular with T⁻¹ = diag(1/τ) + strictly-upper(VᵀV) (Joffrain
    et al. 2006). A reflector that geqrf skips (τ_i = 0, a column already reduced) is the
    identity: its v_i is dropped and its diagonal entry set to 1."""
    a, tau = torch.geqrf(M)
    n, k = M.shape[-2:]
    skipped = tau == 0
    V = a.tril(-1)
    V.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    V.masked_fill_(skipped.unsqueeze(-2), 0.0)
    T_inv = (V.mT @ V).triu_(1)
    T_inv.diagonal(dim1=-2, dim2=-1).copy_(torch.where(skipped, 1.0, 1 / tau))
    eye = torch.eye(k, dtype=M.dtype, device=M.device).expand(T_inv.shape)
    T = torch.linalg.solve_triangular(T_inv, eye, upper=True)
    U = torch.baddbmm(torch.eye(n, dtype=M.dtype, device=M.device), V @ T, V.mT, alpha=-1)
    return U, a[..., :k, :].triu()  # a contiguous copy: every iteration solves with R
