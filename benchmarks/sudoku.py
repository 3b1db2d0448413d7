"""Time one OptNet Sudoku training batch (B = 150) with am.solve_qp and with qpth.

Same process, same inputs (the batch of puzzles, A, log z0), float64, same threads. What
is timed, for each tool: b = A exp(log z0), the QP forward, the MSE loss, the backward
(gradients of A and log z0) and an Adam step on (A, log z0) with lr 0 (so every repeat
sees the same A): one training step of `amortized sudoku train`, steady state after a
warm-up, median of --repeats runs, the tools alternated A B C A B C. Ours also runs on the
same data cast to float32. Accuracy beside speed: max |z − z_ref| against Clarabel (tight
tolerances) on 5 problems, max |z_ours − z_qpth|, and the relative difference of the
gradients (qpth averages the gradient of a broadcast argument over the batch, we sum it:
compared as ours / B).

    python benchmarks/sudoku.py [--checkpoint DIR] [--repeats 7] [--threads 2] [--profile]

Without --checkpoint, A ~ U[0, 1) and log z0 = 0 (the paper's initialization). --profile
adds, for ours in float64, a cProfile of the solver's stages and torch.profiler's table of
the operators, per training step.
"""

import argparse
import cProfile
import importlib.metadata as md
import os
import platform
import pstats
import statistics
import time
import warnings

import numpy as np
import torch

import amortized as am
from amortized.problems import sudoku as S


def clarabel(Q, p, G, h, A, b):
    import cvxpy as cp

    z = cp.Variable(p.shape[0])
    cp.Problem(cp.Minimize(0.5 * cp.quad_form(z, cp.psd_wrap(Q)) + p @ z), [G @ z <= h, A @ z == b]).solve(
        solver="CLARABEL", tol_feas=1e-10, tol_gap_abs=1e-10, tol_gap_rel=1e-10
    )
    return z.value


# the solver's stages, as (label, file suffix, function) for the cProfile table
STAGES = [
    ("solve_qp (forward, total)", "qp/solve.py", "solve_qp"),
    ("  pdipm loop", "qp/pdipm.py", "pdipm"),
    ("    _initial_point", "qp/pdipm.py", "_initial_point"),
    (
        "    KKT factor (separable: chol of the 40×40 Schur complement on A)",
        "qp/kkt_system.py",
        "_factor_separable",
    ),
    ("    Mehrotra step (2 Newton solves)", "qp/pdipm.py", "_mehrotra_step"),
    ("    Residuals", "qp/pdipm.py", "__init__"),
    ("    _polish (active-set solve, ≤ 3 factorizations)", "qp/pdipm.py", "_polish"),
    ("  KKT.solve (all: steps, polish, backward)", "qp/kkt_system.py", "solve"),
    ("    cholesky (wrapper)", "linalg/cholesky.py", "cholesky"),
    ("    cholesky_solve (triangular solves)", "linalg/cholesky.py", "cholesky_solve"),
    ("backward (implicit, total)", "implicit/root.py", "backward"),
    ("  KKT at the solution (factored on first use)", "qp/pdipm.py", "kkt"),
]


def profile_ours(step, repeats: int) -> None:
    """Print per-step cumulative times of the solver's stages (cProfile) and the top
    operators (torch.profiler) over `repeats` steps."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(repeats):
        step()
    pr.disable()
    stats = pstats.Stats(pr).stats
    print(f"cProfile, ours float64, per training step (mean of {repeats}):")
    print("| stage | calls / step | cumulative ms / step |")
    print("|---|---|---|")
    for label, file, fn in STAGES:
        rows = [(v[1], v[3]) for (f, _, name), v in stats.items() if f.endswith(file) and name == fn]
        if rows:
            calls, cum = sum(r[0] for r in rows), sum(r[1] for r in rows)
            print(f"| {label} | {calls / repeats:.1f} | {1e3 * cum / repeats:.0f} |")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print()
    print(f"torch.profiler, ours float64, top operators by self CPU time per step (mean of {repeats}):")
    print("| operator | calls / step | self ms / step | share |")
    print("|---|---|---|---|")
    for e in events:
        print(
            f"| {e.key} | {e.count / repeats:.0f} | {e.self_cpu_time_total / 1e3 / repeats:.1f} | "
            f"{e.self_cpu_time_total / total:.0%} |"
        )
    print()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-qpth", action="store_true", help="time ours only (and profile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    dtype = torch.float64
    if args.checkpoint:
        model, _ = S.load_checkpoint(args.checkpoint)
        model = model.to(dtype)
        state = f"trained checkpoint {args.checkpoint}"
    else:
        torch.manual_seed(args.seed)
        model = S.OptNetSudoku(dtype=dtype)
        state = "initialization (A ~ U[0,1), z0 = 1)"
    puzzles, solutions = S.generate(args.batch, seed=args.seed)
    x = S.one_hot(puzzles, dtype=dtype).reshape(args.batch, 64)
    y = S.one_hot(solutions, dtype=dtype).reshape(args.batch, 64)
    Q, G, h, _, _ = (t.detach() for t in model.qp.data())
    A0, logz0 = model.A.detach().clone(), model.log_z0.detach().clone()

    def batch(tool):
        A = A0.clone().requires_grad_()
        lz = logz0.clone().requires_grad_()
        opt = torch.optim.Adam([A, lz], lr=0.0)
        b = A @ lz.exp()
        if tool.startswith("amortized"):
            dt = torch.float32 if tool.endswith("f32") else dtype
            sol = am.solve_qp(*(t.to(dt) for t in (Q, -x, G, h, A, b)))
            z, ok = sol.z.to(dtype), int(sol.solved.sum())
        else:
            z, ok = QpthFunction(verbose=-1)(Q, -x, G, h, A, b), None
        loss = (z - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return z.detach(), A.grad, lz.grad, ok

    if args.no_qpth:
        tools = ["amortized"]
    else:
        from qpth.qp import QPFunction as QpthFunction

        tools = ["amortized", "qpth", "amortized-f32"]
    times = {t: [] for t in tools}
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in tools:  # warm-up
            out[t] = batch(t)
        for _ in range(args.repeats):
            for t in tools:
                t0 = time.perf_counter()
                out[t] = batch(t)
                times[t].append(time.perf_counter() - t0)
        load_after = os.getloadavg()
        if args.profile:
            profile_ours(lambda: batch("amortized"), max(3, args.repeats // 2))

    B = args.batch
    med = {t: statistics.median(v) for t, v in times.items()}
    versions = f"torch {torch.__version__}"
    for pkg in ("qpth", "cvxpy", "clarabel"):
        try:
            versions += f", {pkg} {md.version(pkg)}"
        except md.PackageNotFoundError:
            pass
    print(
        f"OptNet Sudoku, one training step (B={B}, n=64, 64 ineq, {A0.shape[0]} eq), float64, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {versions}"
    )
    print(
        f"state: {state}; timed: b = A exp(log z0), QP forward, MSE, backward (dA, dlog z0), "
        f"Adam step; median of {args.repeats}, alternated"
    )
    print(
        "load average (1, 5, 15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}".format(
            *load_before, *load_after
        )
    )
    print()
    z_ours, gA_ours, gz_ours, solved = out["amortized"]
    if args.no_qpth:
        print(
            f"amortized: median {med['amortized']:.3f} s, min {min(times['amortized']):.3f} s, {solved}/{B}"
        )
        return
    z_qpth, gA_qpth, gz_qpth, _ = out["qpth"]
    gA_f32 = out["amortized-f32"][1]
    k = 5
    b0 = (A0 @ logz0.exp()).numpy()
    ref = np.stack(
        [clarabel(Q.numpy(), -x[i].numpy(), G.numpy(), h.numpy(), A0.numpy(), b0) for i in range(k)]
    )
    err = {t: float(np.abs(out[t][0][:k].numpy() - ref).max()) for t in tools}
    rel = lambda a, b: float((a - b).norm() / b.norm())
    print("| tool | median s / step | min s | qpth / tool | solved | max abs(z - z_clarabel) (5 problems) |")
    print("|---|---|---|---|---|---|")
    names = {
        "amortized": "amortized (am.solve_qp, PDIPM, eps 1e-10)",
        "qpth": "qpth (QPFunction, eps 1e-12, maxIter 20)",
        "amortized-f32": "amortized, float32 (same data cast, eps 3e-6)",
    }
    for t in tools:
        ok = "n/a" if out[t][3] is None else f"{out[t][3]}/{B}"
        print(
            f"| {names[t]} | {med[t]:.3f} | {min(times[t]):.3f} | {med['qpth'] / med[t]:.2f}× | {ok} | "
            f"{err[t]:.1e} |"
        )
    print()
    print(f"max abs(z_ours - z_qpth): {float((z_ours - z_qpth).abs().max()):.1e}")
    print(
        f"relative difference of dA (ours / B vs qpth's batch mean): "
        f"{rel(gA_ours / B, gA_qpth):.1e}; "
        f"of dlog z0: {rel(gz_ours / B, gz_qpth):.1e}"
    )
    print(f"relative difference of dA, float32 vs float64 (ours): {rel(gA_f32.double(), gA_ours):.1e}")


if __name__ == "__main__":
    main()
