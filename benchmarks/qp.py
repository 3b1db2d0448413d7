"""Batched dense QP layers side by side: amortized vs qpth vs proxsuite's QPLayer vs
cvxpylayers, on OptNet's random QP protocol (random_qp).

For each (n, m_ineq, p_eq, B) and dtype: forward and forward+backward median wall time
(alternating tools, same inputs, threads pinned), the ratio to ours, the backward's own
median time over the forward's (timed inside, after an untimed forward with gradients),
max |z − z_ref| against Clarabel at 1e-10 (first K instances), and the error of ⟨∇_p L, d⟩ against a
central difference of Clarabel solutions along a random d (L = Σ w·z on those K).
Peak memory (RSS growth of a fresh subprocess doing one forward+backward) with --memory.

    python benchmarks/qp.py                       # the full table of the QP core issue
    python benchmarks/qp.py --sizes 10,10,0,128 --tools amortized,qpth --reps 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import amortized as am  # noqa: E402
from amortized.problems.random_qp import random_qp  # noqa: E402
from timing import MALLOC_ENV, alternate, versions  # noqa: E402

SIZES = [
    (10, 10, 0, 128),
    (50, 50, 0, 128),
    (100, 100, 50, 128),
    (200, 200, 0, 32),
    (500, 500, 0, 8),
]
TOOLS = [
    "amortized",
    "amortized-admm",
    "qpth",
    "proxsuite",
    "cvxpylayers-scs",
    "cvxpylayers-clarabel",
]


def make_tool(name: str, n: int, m: int, q: int, dtype: torch.dtype):
    """A function (Q, p, G, h, A, b) -> z for one tool, or None when it cannot run here."""
    if name == "amortized":
        return lambda Q, p, G, h, A, b: am.solve_qp(Q, p, G, h, A, b).z
    if name == "amortized-admm":
        return lambda Q, p, G, h, A, b: am.solve_qp(Q, p, G, h, A, b, solver="admm").z
    if name == "qpth":
        from qpth.qp import QPFunction

        e = torch.empty(0, dtype=dtype)
        fn = QPFunction(verbose=-1)
        return lambda Q, p, G, h, A, b: fn(Q, p, G, h, A if q else e, b if q else e)
    if name == "proxsuite":
        if dtype != torch.float64:
            return None  # computes in float64 only
        from proxsuite.torch.qplayer import QPFunction

        def run(Q, p, G, h, A, b):
            l = torch.full_like(h, -1e20)
            zero_A, zero_b = A.new_zeros(A.shape[0], 0, n), b.new_zeros(b.shape[0], 0)
            out = QPFunction(eps=1e-9)(Q, p, A if q else zero_A, b if q else zero_b, G, l, h)
            return out[0]

        return run
    if name.startswith("cvxpylayers"):
        if dtype != torch.float64:
            return None
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        F, pp, G, h = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
        z = cp.Variable(n)
        cons = [G @ z <= h]
        params = [F, pp, G, h]
        if q:
            A, b = cp.Parameter((q, n)), cp.Parameter(q)
            cons.append(A @ z == b)
            params += [A, b]
        # ½‖Fz‖² with Q = FᵀF keeps the problem DPP
        layer = CvxpyLayer(cp.Problem(cp.Minimize(0.5 * cp.sum_squares(F @ z) + pp @ z), cons), params, [z])
        args = {"cvxpylayers-scs": {}, "cvxpylayers-clarabel": {"solve_method": "Clarabel"}}[name]
        # (cvxpylayers 1.2 hands solver_args to the solver itself, so diffcp's mode="dense"
        # of BENCHMARKING.md cannot be selected from here any more)

        def run(Q, p, G_, h_, A_, b_):
            Fm = torch.linalg.cholesky(Q).mT
            extra = [A_, b_] if q else []
            return layer(Fm, p, G_, h_, *extra, solver_args=args)[0]

        return run
    raise ValueError(name)


def clarabel(Q, p, G, h, A, b):
    """Clarabel at 1e-10, then polished on its active set by a dense KKT solve in numpy
    (Clarabel alone stops ~1e-8 from the solution; the polish makes the reference exact
    to ~1e-13 without using our solver)."""
    import cvxpy as cp

    z = cp.Variable(p.shape[0])
    cons = [G @ z <= h] + ([A @ z == b] if A.shape[0] else [])
    cp.Problem(cp.Minimize(0.5 * cp.quad_form(z, cp.psd_wrap(Q)) + p @ z), cons).solve(
        solver="CLARABEL", tol_feas=1e-10, tol_gap_abs=1e-10, tol_gap_rel=1e-10
    )
    lam = cons[0].dual_value
    act = lam > 1e-7 * (1 + np.abs(lam).max())
    C = np.concatenate([G[act], A])
    d = np.concatenate([h[act], b])
    n, k = p.shape[0], C.shape[0]
    K = np.block([[Q, C.T], [C, np.zeros((k, k))]])
    sol = np.linalg.lstsq(K, np.concatenate([-p, d]), rcond=None)[0]
    zp = sol[:n]
    return zp if (G @ zp <= h + 1e-9).all() and (sol[n : n + act.sum()] >= -1e-9).all() else z.value


def bench_size(n, m, q, B, dtype, tools, reps, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    data64 = random_qp(B, n, m, q, dtype=torch.float64, generator=g)
    data = [x.to(dtype) for x in data64]
    w = torch.zeros(B, n, dtype=dtype)
    w[:K] = torch.randn(K, n, generator=g, dtype=torch.float64).to(dtype)
    d = torch.randn(K, n, generator=g, dtype=torch.float64)
    np_data = [[x[k].numpy() for x in data64] for k in range(K)]
    z_ref = np.stack([clarabel(*args) for args in np_data])
    t = 1e-6
    fd = 0.0
    for k, args in enumerate(np_data):
        zp = clarabel(args[0], args[1] + t * d[k].numpy(), *args[2:])
        zm = clarabel(args[0], args[1] - t * d[k].numpy(), *args[2:])
        fd += float(w[k].double().numpy() @ (zp - zm) / (2 * t))

    fns, rows = {}, {}
    for name in tools:
        try:
            fn = make_tool(name, n, m, q, dtype)
        except ImportError:
            fn = None
        if fn is None:
            continue
        try:
            with torch.no_grad():
                z = fn(*data)
            p = data[1].clone().requires_grad_()
            zz = fn(data[0], p, *data[2:])
            (zz * w).sum().backward()
            g_dir = float((p.grad[:K].double() * d).sum())
            rows[name] = {
                "max_abs_err_z": float(np.abs(z[:K].detach().double().numpy() - z_ref).max()),
                "grad_rel_err_fd": abs(g_dir - fd) / max(abs(fd), 1e-12),
            }
        except Exception as ex:  # a peer that crashes is reported, not fatal
            rows[name] = {"error": f"{type(ex).__name__}: {str(ex)[:80]}"}
            continue

        def forward(fn=fn):
            with torch.no_grad():
                return fn(*data).sum().item()

        def forward_backward(fn=fn):
            args = [x.clone().requires_grad_() for x in data]
            out = fn(*args)
            (out * w).sum().backward()
            return out.detach().sum().item()

        def backward(fn=fn):
            """The backward alone: its own wall time after an untimed forward with gradients."""
            args = [x.clone().requires_grad_() for x in data]
            loss = (fn(*args) * w).sum()
            t0 = time.perf_counter()
            loss.backward()
            return time.perf_counter() - t0

        fns[name] = (forward, forward_backward, backward)
    n_reps = {k: (max(1, reps // 3) if k.startswith("cvxpylayers") else reps) for k in fns}
    for phase, idx in (("forward_s", 0), ("forward_backward_s", 1)):
        fast = {k: v[idx] for k, v in fns.items() if not k.startswith("cvxpylayers")}
        slow = {k: v[idx] for k, v in fns.items() if k.startswith("cvxpylayers")}
        for k, v in alternate(fast, reps=reps).items():
            rows[k][phase] = v
        if slow:
            for k, v in alternate(slow, reps=min(n_reps.values()), warmup=0).items():
                rows[k][phase] = v
    backward = {k: [] for k in fns}
    for r in range(1 + reps):  # the backward timed directly, tools alternated, after a warm-up
        for k, v in fns.items():
            dt = v[2]()
            if r:
                backward[k].append(dt)
    for k, times in backward.items():
        rows[k]["backward_s"] = statistics.median(times)
    return rows


def peak_memory(n, m, q, B, dtype_name, tool):
    """Peak RSS growth (MiB) of one forward+backward in a fresh process: the kernel's peak
    counter (VmHWM) is reset after the imports, the data and a warm-up (writing 5 to
    clear_refs), so only the solve is seen."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
torch.set_num_threads(1)
from qp import make_tool
from timing import peak_rss_growth
from amortized.problems.random_qp import random_qp
dtype = getattr(torch, {dtype_name!r})
g = torch.Generator().manual_seed(0)
data = [x.to(dtype).requires_grad_() for x in random_qp({B}, {n}, {m}, {q}, generator=g)]
fn = make_tool({tool!r}, {n}, {m}, {q}, dtype)
fn(*data).sum().backward()  # warm-up: lazy imports and allocator pools
for x in data:
    x.grad = None
print(peak_rss_growth(lambda: fn(*data).sum().backward()))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, **MALLOC_ENV)
    )
    return float(out.stdout.strip()) if out.returncode == 0 else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="*", default=[",".join(map(str, s)) for s in SIZES])
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--K", type=int, default=4, help="instances checked against Clarabel")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also measure peak memory at (500,500,0,8)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print("versions:", json.dumps(versions()))
    results = []
    for size in args.sizes:
        n, m, q, B = map(int, size.split(","))
        for dtype_name in args.dtypes.split(","):
            tools = args.tools.split(",")
            if n >= 200 and "qpth" in tools:
                # qpth's batched LU breaks with 2 threads at n ≥ 200 (DESIGN.md): 1 thread for all
                torch.set_num_threads(1)
            rows = bench_size(n, m, q, B, getattr(torch, dtype_name), tools, args.reps, args.K)
            torch.set_num_threads(args.threads)
            ours = rows.get("amortized", {})
            print(
                f"\n(n, m, p, B) = ({n}, {m}, {q}, {B}) {dtype_name}"
                + ("  [1 thread: qpth needs it here]" if n >= 200 and "qpth" in tools else "")
            )
            print(
                f"{'tool':22s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd+bwd / ours':>15s} "
                f"{'bwd / fwd':>9s} {'max|z-z_ref|':>13s} {'grad err vs FD':>15s}"
            )
            for name, r in rows.items():
                if "error" in r:
                    print(f"{name:22s} {r['error']}")
                    continue
                ratio = r["forward_backward_s"] / ours["forward_backward_s"] if ours else float("nan")
                share = r["backward_s"] / r["forward_s"]
                print(
                    f"{name:22s} {1e3 * r['forward_s']:9.2f} {1e3 * r['forward_backward_s']:11.2f} "
                    f"{ratio:15.2f} {share:9.0%} {r['max_abs_err_z']:13.1e} {r['grad_rel_err_fd']:15.1e}"
                )
            results.append({"size": [n, m, q, B], "dtype": dtype_name, "rows": rows})
    if args.memory:
        print("\npeak memory, one forward+backward at (500, 500, 0, 8) float64, 1 thread:")
        for tool in ("amortized", "qpth"):
            mem = peak_memory(500, 500, 0, 8, "float64", tool)
            print(f"  {tool:10s} {mem if mem is None else f'{mem:.0f} MiB'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
