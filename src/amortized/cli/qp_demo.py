"""Demo step: a batch of random QPs solved, checked against Clarabel, and differentiated."""

import time

import numpy as np
import torch

import amortized as am
from amortized.problems.random_qp import random_qp


def _clarabel(Q, p, G, h, A, b):
    import cvxpy as cp

    z = cp.Variable(p.shape[0])
    cons = [G @ z <= h] if G.shape[0] else []
    cons += [A @ z == b] if A.shape[0] else []
    cp.Problem(cp.Minimize(0.5 * cp.quad_form(z, cp.psd_wrap(Q)) + p @ z), cons).solve(
        solver="CLARABEL", tol_feas=1e-10, tol_gap_abs=1e-10, tol_gap_rel=1e-10
    )
    return z.value


def qp_step(out, progress, seed):
    rows = []
    gen = torch.Generator().manual_seed(seed)
    cases = [(20, 20, 5, 64), (50, 50, 10, 32)]
    task = progress.add_task("QP: solve + backward + reference", total=len(cases) * 2)
    for n, m, q, B in cases:
        for dtype in (torch.float64, torch.float32):
            Q, p, G, h, A, b = random_qp(B, n, m, q, dtype=torch.float64, generator=gen)
            args = [x.to(dtype).requires_grad_() for x in (Q, p, G, h, A, b)]
            t = time.perf_counter()
            sol = am.solve_qp(*args)
            sol.z.square().sum().backward()
            t = time.perf_counter() - t
            k = min(B, 8)
            ref = np.stack(
                [_clarabel(*(x[i].numpy() for x in (Q, p, G, h, A, b))) for i in range(k)]
            )
            err = float(
                np.abs(sol.z[:k].detach().double().numpy() - ref).max() / (1 + np.abs(ref).max())
            )
            tol = 1e-7 if dtype == torch.float64 else 1e-4
            case = f"n={n} m={m} q={q} B={B} {str(dtype)[6:]}"
            rows.append(
                {
                    "case": case,
                    "metric": "solved",
                    "value": f"{int(sol.solved.sum())}/{B}",
                    "target": f"{B}/{B}",
                    "ok": bool(sol.solved.all()),
                }
            )
            rows.append(
                {
                    "case": case,
                    "metric": "max|z - z_clarabel| (rel)",
                    "value": f"{err:.1e}",
                    "target": f"<= {tol:.0e}",
                    "ok": err <= tol,
                }
            )
            rows.append(
                {"case": case, "metric": "solve+backward time", "value": f"{t * 1e3:.1f} ms"}
            )
            progress.advance(task)
    return rows
