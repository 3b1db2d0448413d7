"""Where one forward+backward of a batched QP layer spends its time: ours and qpth's on the
same random_qp inputs (OptNet's protocol, float64), split into factorizations (Cholesky,
LU), triangular and LU solves, matrix products, and the rest (elementwise ops, dispatch,
Python), with the number of aten ops dispatched.

"wall" is the median of unprofiled runs (alternated); the split comes from one run under
torch.profiler ("profiled": its wall time, which the profiler's per-op cost inflates):
each category's CPU time, children included (e.g. the tril inside torch's Cholesky), and
"rest", that run's wall time minus the three. It tells what is
left to gain: when the kernels alone exceed a target time, trimming ops cannot reach it.

    python benchmarks/qp_profile.py --sizes 10,10,0,128 100,100,50,128 --threads 2
"""

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
import amortized as am  # noqa: E402
from amortized.problems.random_qp import random_qp  # noqa: E402
from timing import alternate, versions  # noqa: E402

CATEGORIES = {
    "factor": ("aten::linalg_cholesky_ex", "aten::linalg_lu_factor_ex"),
    "solve": ("aten::linalg_solve_triangular", "aten::linalg_lu_solve", "aten::cholesky_solve"),
    "matmul": ("aten::bmm", "aten::mm", "aten::baddbmm", "aten::addmm", "aten::mv"),
}


def layers(data: list[torch.Tensor]) -> dict:
    """Zero-argument forward+backward of each tool on fresh leaves of `data`."""
    q = data[4].shape[-2]

    def ours():
        args = [x.clone().requires_grad_() for x in data]
        A, b = (args[4], args[5]) if q else (None, None)
        am.solve_qp(*args[:4], A, b).z.sum().backward()

    fns = {"amortized": ours}
    try:
        from qpth.qp import QPFunction

        def qpth():
            args = [x.clone().requires_grad_() for x in data]
            if not q:
                args[4:] = [torch.empty(0, dtype=x.dtype) for x in args[4:]]
            QPFunction(verbose=-1)(*args).sum().backward()

        fns["qpth"] = qpth
    except ImportError:
        print("qpth not installed: ours only", file=sys.stderr)
    return fns


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def split(fn) -> tuple[float, dict[str, tuple[float, int]], int]:
    """The profiled run's wall time (s), category -> (CPU seconds incl. children, calls),
    and the number of aten ops dispatched."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
    stats = {e.key: e for e in prof.key_averages()}
    out = {}
    for cat, names in CATEGORIES.items():
        hit = [stats[k] for k in names if k in stats]
        out[cat] = (sum(e.cpu_time_total for e in hit) * 1e-6, sum(e.count for e in hit))
    with _Count() as c:
        fn()
    return wall, out, c.ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["10,10,0,128", "100,100,50,128"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"threads {a.threads}; " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    cols = " ".join(f"{c + ' ms (calls)':>18s}" for c in CATEGORIES)
    head = f"{'size':>18s} {'tool':10s} {'wall ms':>8s} {'profiled':>8s}"
    print(f"{head} {cols} {'rest ms':>8s} {'aten ops':>8s}")
    for size in a.sizes:
        n, m, q, B = map(int, size.split(","))
        data = list(random_qp(B, n, m, q, generator=torch.Generator().manual_seed(0)))
        fns = layers(data)
        wall = alternate(fns, reps=a.reps)
        for name, fn in fns.items():
            profiled, cats, ops = split(fn)
            rest = profiled - sum(t for t, _ in cats.values())
            cells = " ".join(f"{1e3 * t:10.1f} ({k:4d})" for t, k in cats.values())
            times = f"{1e3 * wall[name]:8.1f} {1e3 * profiled:8.1f}"
            print(f"{str((n, m, q, B)):>18s} {name:10s} {times} {cells} {1e3 * rest:8.1f} {ops:8d}")


if __name__ == "__main__":
    main()
