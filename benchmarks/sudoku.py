"""Time one OptNet Sudoku training batch (B = 150) with am.solve_qp and with qpth.

Same process, same inputs (puzzles, A, z0), same dtype (float64; ours also on the data
cast to float32), same threads. What is timed: forward QP solve + MSE loss + backward
(gradients of A and log z0), steady state
after a warm-up, median of --repeats runs, the tools alternated A B C A B C. Accuracy
beside speed: max |z_ours − z_qpth|, both against Clarabel (tight tolerances) on a few
problems, and the relative difference of the gradients (qpth averages the gradient of a
broadcast argument over the batch, we sum it: compared as ours / B).

    python benchmarks/sudoku.py [--checkpoint runs/optnet] [--repeats 7] [--threads 2]

Without --checkpoint, A ~ U[0, 1) and log z0 = 0 (the paper's initialization).
"""

import argparse
import platform
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from qpth.qp import QPFunction as QpthFunction

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
    Q, G, h = model.Q, model.G, model.h
    A0, logz0 = model.A.detach().clone(), model.log_z0.detach().clone()

    def batch(tool):
        A = A0.clone().requires_grad_()
        lz = logz0.clone().requires_grad_()
        b = A @ lz.exp()
        if tool.startswith("amortized"):
            dt = torch.float32 if tool.endswith("f32") else dtype
            args_ = [t.to(dt) for t in (Q, -x, G, h, A, b)]
            sol = am.solve_qp(*args_)
            z, ok = sol.z.to(dtype), int(sol.solved.sum())
        else:
            z, ok = QpthFunction(verbose=-1)(Q, -x, G, h, A, b), None
        loss = (z - y).square().mean()
        loss.backward()
        return z.detach(), A.grad, lz.grad, ok

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

    z_ours, gA_ours, gz_ours, solved = out["amortized"]
    z_qpth, gA_qpth, gz_qpth, _ = out["qpth"]
    gA_f32 = out["amortized-f32"][1]
    k = 5
    ref = np.stack(
        [
            clarabel(
                Q.numpy(),
                -x[i].numpy(),
                G.numpy(),
                h.numpy(),
                A0.numpy(),
                (A0 @ logz0.exp()).numpy(),
            )
            for i in range(k)
        ]
    )
    err = {t: float(np.abs(out[t][0][:k].numpy() - ref).max()) for t in tools}
    rel = lambda a, b: float((a - b).norm() / b.norm())
    B = args.batch
    med = {t: statistics.median(v) for t, v in times.items()}
    print(
        f"OptNet Sudoku, one training batch (B={B}, n=64, 64 ineq, {A0.shape[0]} eq), float64, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    print(
        f"state: {state}; timed: QP forward + MSE + backward (dA, dlog z0), "
        f"median of {args.repeats}, alternated"
    )
    print()
    print("| tool | median s / batch | min s | solved | max abs(z - z_clarabel) (5 problems) |")
    print("|---|---|---|---|---|")
    print(
        f"| amortized (am.solve_qp, PDIPM) | {med['amortized']:.3f} | "
        f"{min(times['amortized']):.3f} | "
        f"{solved}/{B} | {err['amortized']:.1e} |"
    )
    print(
        f"| qpth 0.0.18 (QPFunction, eps 1e-12, maxIter 20) | {med['qpth']:.3f} | "
        f"{min(times['qpth']):.3f} | "
        f"n/a | {err['qpth']:.1e} |"
    )
    print(
        f"| amortized, float32 inputs (same data cast) | {med['amortized-f32']:.3f} | "
        f"{min(times['amortized-f32']):.3f} | {out['amortized-f32'][3]}/{B} | "
        f"{err['amortized-f32']:.1e} |"
    )
    print()
    print(f"speed-up qpth / amortized: {med['qpth'] / med['amortized']:.2f}x")
    print(f"max abs(z_ours - z_qpth): {float((z_ours - z_qpth).abs().max()):.1e}")
    print(
        f"relative difference of dA (ours / B vs qpth's batch mean): "
        f"{rel(gA_ours / B, gA_qpth):.1e}; "
        f"of dlog z0: {rel(gz_ours / B, gz_qpth):.1e}"
    )
    print(f"relative difference of dA, float32 vs float64 (ours): {rel(gA_f32.double(), gA_ours):.1e}")


if __name__ == "__main__":
    main()
