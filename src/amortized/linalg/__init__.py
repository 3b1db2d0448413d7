"""Batched linear algebra: Cholesky with failure flags, the complete QR, block elimination of
KKT systems, and matrix-free iterative solves (CG, GMRES, BiCGStab, Neumann) for implicit
backward passes."""

from amortized.linalg.cholesky import (
    cholesky,
    cholesky_solve,
    col_major,
    comfortable_cholesky,
    shifted_cholesky,
)
from amortized.linalg.kkt import FixedRows, SaddleFactor, factor_saddle, fix_rows
from amortized.linalg.matvec import bmv, brmv, inf_norm
from amortized.linalg.qr import complete_qr

__all__ = [
    "cholesky",
    "cholesky_solve",
    "col_major",
    "comfortable_cholesky",
    "shifted_cholesky",
    "complete_qr",
    "FixedRows",
    "SaddleFactor",
    "factor_saddle",
    "fix_rows",
    "bmv",
    "brmv",
    "inf_norm",
]
