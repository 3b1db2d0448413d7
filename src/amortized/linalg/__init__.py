"""Batched dense linear algebra: Cholesky with failure flags and block elimination of KKT systems."""

from amortized.linalg.cholesky import cholesky, cholesky_solve
from amortized.linalg.kkt import SaddleFactor, factor_saddle

__all__ = ["cholesky", "cholesky_solve", "SaddleFactor", "factor_saddle"]
