"""Demo step: a batch of random QPs solved in float64 and float32, checked against
Clarabel, and differentiated (checked against a central finite difference)."""

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
    task = progress.add_task("QP: solve + backward + reference", total=len(cases) * 3)
    for n, m, q, B in cases:
        data = random_qp(B, n, m, q, dtype=torch.float64, generator=gen)
        k = min(B, 8)
        ref = np.stack([_clarabel(*(x[i].numpy() for x in data)) for i in range(k)])
        progress.advance(task)
        for dtype in (torch.float64, torch.float32):
            args = [x.to(dtype).clone().requires_grad_() for x in data]
            t = time.perf_counter()
            sol = am.solve_qp(*args)
            sol.z.square().sum().backward()
            t = time.perf_counter() - t
            z = sol.z[:k].detach().double().numpy()
            err = float(np.abs(z - ref).max() / (1 + np.abs(ref).max()))
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
            rows.append({"case": case, "metric": "solve + backward", "value": f"{t * 1e3:.1f} ms"})
            if dtype == torch.float64:
                # ⟨∇_p L, d⟩ against a central difference of L = Σ z² along a random d
                d = torch.randn(data[1].shape, generator=gen, dtype=torch.float64)
                eps = 1e-6
                f = lambda p, data=data: am.solve_qp(data[0], p, *data[2:]).z.square().sum().item()
                fd = (f(data[1] + eps * d) - f(data[1] - eps * d)) / (2 * eps)
                g = float((args[1].grad * d).sum())
                rel = abs(g - fd) / max(abs(fd), 1e-12)
                rows.append(
                    {
                        "case": case,
                        "metric": "grad vs finite difference (rel)",
                        "value": f"{rel:.1e}",
                        "target": "<= 1e-5",
                        "ok": rel <= 1e-5,
                    }
                )
            progress.advance(task)
    return rows
