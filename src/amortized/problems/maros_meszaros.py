"""The Maros–Meszaros QP test set (../shared/data/maros_meszaros), converted to

    minimize ½ zᵀQz + pᵀz   subject to   Gz ≤ h,  Az = b.

The files store min ½xᵀPx + qᵀx + r s.t. l ≤ Ax ≤ u (|value| > 9e19 meaning infinite).
Rows with u − l < 1e-10 become equalities; each finite side of the other rows becomes one
row of (G, h). Reading the .mat files needs scipy.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

# the checkout's ../shared (as laid out for developers and CI), or $AMORTIZED_MAROS_MESZAROS
DATA = Path(
    os.environ.get(
        "AMORTIZED_MAROS_MESZAROS",
        Path(__file__).resolve().parents[3].parent / "shared" / "data" / "maros_meszaros",
    )
)
INF = 9e19


@dataclass(frozen=True)
class MarosMeszaros:
    name: str
    Q: Tensor
    p: Tensor
    G: Tensor
    h: Tensor
    A: Tensor
    b: Tensor
    r: float  # constant term of the objective

    @property
    def data(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        return self.Q, self.p, self.G, self.h, self.A, self.b


def data_dir() -> Path:
    if not DATA.is_dir():
        raise FileNotFoundError(
            f"Maros–Meszaros data not found at {DATA}; set AMORTIZED_MAROS_MESZAROS to its folder"
        )
    return DATA


def dense_subset() -> list[str]:
    """The 62 problems with n ≤ 1000 and inequality rows + equalities + n ≤ 1000."""
    index = json.loads((data_dir() / "index.json").read_text())
    return sorted(k for k, v in index.items() if v["dense_subset"])


def load(name: str, dtype=torch.float64) -> MarosMeszaros:
    from scipy.io import loadmat

    mat = loadmat(data_dir() / f"{name}.mat")
    P = mat["P"].toarray()
    Araw = mat["A"].toarray()
    l, u = mat["l"].ravel().astype(float), mat["u"].ravel().astype(float)
    eq = (u - l) < 1e-10
    lo = ~eq & (l > -INF)
    hi = ~eq & (u < INF)
    G = np.concatenate([Araw[hi], -Araw[lo]])
    h = np.concatenate([u[hi], -l[lo]])
    # P may be stored as its upper (or lower) triangle only
    if not np.allclose(P, P.T):
        P = np.triu(P) + np.triu(P, 1).T if np.allclose(np.tril(P, -1), 0) else P
    t = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=dtype)
    return MarosMeszaros(
        name,
        t(P),
        t(mat["q"].ravel()),
        t(G),
        t(h),
        t(Araw[eq]),
        t(l[eq]),
        float(np.ravel(mat.get("r", 0.0))[0]),
    )


def residuals(prob: MarosMeszaros, z: Tensor, lam: Tensor, nu: Tensor) -> dict[str, float]:
    """qpbenchmark's absolute checks in the ∞-norm: primal residual (constraint violation),
    dual residual ‖Qz + p + Gᵀλ + Aᵀν‖ and the duality gap |zᵀQz + pᵀz + hᵀλ + bᵀν|."""
    Q, p, G, h, A, b = (x.double() for x in prob.data)
    z, lam, nu = z.double(), lam.double(), nu.double()
    primal = torch.cat([(G @ z - h).clamp(min=0), (A @ z - b).abs(), torch.zeros(1, dtype=z.dtype)]).max()
    dual = (Q @ z + p + G.T @ lam + A.T @ nu).abs().max()
    gap = (z @ Q @ z + p @ z + h @ lam + b @ nu).abs()
    return {"primal": float(primal), "dual": float(dual), "gap": float(gap)}
