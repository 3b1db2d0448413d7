"""The Maros–Meszaros dense subset (62 problems), one problem at a time, float64.

For each problem and solver: status, primal residual, dual residual, duality gap (absolute,
∞-norm, qpbenchmark's definitions), iterations, time. Success at a tolerance = the solver
reports success AND all three residuals are within it; 'wrongly solved' counts problems
labelled solved whose residuals fail at 1e-6.

    python benchmarks/maros_meszaros.py [--tools amortized,qpth,proxsuite] [--names HS21,...]
"""

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
import amortized as am  # noqa: E402
from amortized.problems import maros_meszaros as mm  # noqa: E402
from timing import versions  # noqa: E402


def run_amortized(prob):
    # qpbenchmark's high-accuracy setting, as for proxsuite below: absolute 1e-9
    sol = am.solve_qp(*prob.data, max_iter=200, eps_abs=1e-9)
    return sol.z[0], sol.lam[0], sol.nu[0], am.QPStatus(int(sol.status[0])).name, int(sol.iters[0])


def run_qpth(prob):
    from qpth.qp import QPFunction

    Q, p, G, h, A, b = prob.data
    e = torch.empty(0, dtype=Q.dtype)
    z = QPFunction(verbose=-1, maxIter=200)(
        Q, p, G if G.numel() else e, h if h.numel() else e, A if A.numel() else e, b if b.numel() else e
    )[0]
    # qpth returns no duals: recover none, so its dual residual and gap are not checkable
    return z, None, None, "returned", -1


def run_proxsuite(prob):
    import proxsuite

    Q, p, G, h, A, b = (x.numpy() for x in prob.data)
    n = p.shape[0]
    qp = proxsuite.proxqp.dense.QP(n, A.shape[0], G.shape[0])
    qp.settings.eps_abs = 1e-9
    qp.settings.eps_rel = 0
    qp.settings.max_iter = 10000
    qp.init(
        Q,
        p,
        A if A.shape[0] else None,
        b if A.shape[0] else None,
        G if G.shape[0] else None,
        None if not G.shape[0] else -1e20 * (h * 0 + 1),
        h if G.shape[0] else None,
    )
    qp.solve()
    status = (
        "SOLVED"
        if qp.results.info.status == proxsuite.proxqp.QPSolverOutput.PROXQP_SOLVED
        else str(qp.results.info.status)
    )
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)
    return t(qp.results.x), t(qp.results.z), t(qp.results.y), status, int(qp.results.info.iter)


RUNNERS = {"amortized": run_amortized, "qpth": run_qpth, "proxsuite": run_proxsuite}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tools", default="amortized,qpth,proxsuite")
    ap.add_argument("--names", default=None, help="comma-separated subset of problem names")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print("versions:", versions())
    names = args.names.split(",") if args.names else mm.dense_subset()
    tools = args.tools.split(",")
    summary = {t: {"1e-6": 0, "1e-9": 0, "wrong": 0, "time": 0.0} for t in tools}
    print(f"{'problem':10s} {'n':>4s} {'m':>5s} {'q':>4s} " + " ".join(f"{t:>34s}" for t in tools))
    for name in names:
        prob = mm.load(name)
        cells = []
        for tool in tools:
            t0 = time.perf_counter()
            try:
                z, lam, nu, status, iters = RUNNERS[tool](prob)
                dt = time.perf_counter() - t0
                if lam is None:
                    # no duals: only the primal residual can be checked; never counted solved
                    r = {
                        "primal": mm.residuals(
                            prob,
                            z,
                            torch.zeros(prob.h.shape, dtype=z.dtype),
                            torch.zeros(prob.b.shape, dtype=z.dtype),
                        )["primal"]
                    }
                    worst = float("inf")
                else:
                    r = mm.residuals(prob, z, lam, nu)
                    worst = max(r.values())
                solved = status == "SOLVED"
                for tol in ("1e-6", "1e-9"):
                    summary[tool][tol] += solved and worst <= float(tol)
                summary[tool]["wrong"] += solved and not worst <= 1e-6
                summary[tool]["time"] += dt
                cells.append(f"{status[:9]:>9s} it={iters:3d} res={worst:8.1e} {dt:6.2f}s")
            except Exception as ex:
                cells.append(f"{'raised ' + type(ex).__name__:>34s}")
        print(
            f"{name:10s} {prob.p.shape[0]:4d} {prob.G.shape[0]:5d} {prob.A.shape[0]:4d} "
            + " ".join(f"{c:>34s}" for c in cells),
            flush=True,
        )
    print(f"\nsummary over {len(names)} problems (success = reported solved and all residuals <= tol):")
    for tool, s in summary.items():
        print(
            f"  {tool:10s} solved@1e-6 {s['1e-6']:3d} ({s['1e-6'] / len(names):.0%})  "
            f"solved@1e-9 {s['1e-9']:3d} ({s['1e-9'] / len(names):.0%})  "
            f"labelled solved but failing 1e-6: {s['wrong']}  total time {s['time']:.1f} s"
        )


if __name__ == "__main__":
    main()
