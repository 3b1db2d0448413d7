"""Batched matrix-vector products in torch on this CPU: the two ways `bmm` can form Mx.

`amortized.linalg.bmv` forms Mx as the row vector xᵀMᵀ (a (B, 1, n) by (B, n, m) bmm)
rather than as M times a column (B, m, n) by (B, n, 1): torch 2.13's CPU bmm is several
times slower in the second layout once matrices are 50 × 50 or larger. This prints both,
median of `--reps` calls each, alternated, for the matrix shapes the QP benchmark meets.

    python benchmarks/matvec.py --threads 2
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import alternate  # noqa: E402

SHAPES = [(128, 10, 10), (128, 50, 50), (128, 100, 100), (128, 150, 100), (32, 200, 200), (8, 500, 500)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}; median ms per call")
    print(f"{'dtype':8} {'(B, m, n)':>16} {'bmm(M, x col)':>14} {'bmm(xᵀ, Mᵀ)':>12} {'ratio':>6}")
    for dtype in (torch.float64, torch.float32):
        for B, m, n in SHAPES:
            M, x = torch.randn(B, m, n, dtype=dtype), torch.randn(B, n, dtype=dtype)
            col_fn = lambda M=M, x=x: torch.bmm(M, x.unsqueeze(-1)).squeeze(-1)  # noqa: E731
            row_fn = lambda M=M, x=x: torch.bmm(x.unsqueeze(-2), M.mT).squeeze(-2)  # noqa: E731
            # the same product, to the rounding of a sum of n terms
            bound = n * torch.finfo(dtype).eps * torch.bmm(M.abs(), x.abs().unsqueeze(-1)).squeeze(-1)
            assert ((col_fn() - row_fn()).abs() <= bound).all()
            t = alternate({"col": col_fn, "row": row_fn}, reps=args.reps)
            col, row = 1e3 * t["col"], 1e3 * t["row"]
            print(f"{str(dtype)[6:]:8} {str((B, m, n)):>16} {col:14.3f} {row:12.3f} {col / row:6.1f}")


if __name__ == "__main__":
    main()
