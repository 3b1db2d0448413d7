"""Batched matrix-vector products and ∞-norms."""

import torch
from torch import Tensor


def bmv(M: Tensor, x: Tensor) -> Tensor:
    """Mx for M (B, m, n) or (m, n), x (B, n). torch.bmm when both are batched alike: `@`
    dispatches five more ops (expand, view) per call, most of a small solve's time. As the
    row vector xᵀMᵀ: torch 2.13's CPU bmm of a matrix by a column is 2-6× slower than that
    of a row by a (transposed) matrix from n = 50 on (`benchmarks/matvec.py`)."""
    if M.dim() == 3 and x.dim() == 2 and M.shape[0] == x.shape[0]:
        return torch.bmm(x.unsqueeze(-2), M.mT).squeeze(-2)
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def brmv(M: Tensor, y: Tensor) -> Tensor:
    """Mᵀy for M (B, m, n) or (m, n), y (B, m)."""
    if M.dim() == 3 and y.dim() == 2 and M.shape[0] == y.shape[0]:
        return torch.bmm(y.unsqueeze(-2), M).squeeze(-2)
    return (y.unsqueeze(-2) @ M).squeeze(-2)


def inf_norm(M: Tensor, dim: int | tuple[int, ...]) -> Tensor:
    """max |M| along dim. Two reductions and no |M| copy: linalg.vector_norm(M, inf) took
    3–10× longer on CPU, from (128, 10, 10) to (8, 500, 500)."""
    return torch.maximum(M.amax(dim), -M.amin(dim))
