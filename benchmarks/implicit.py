"""Implicit differentiation vs unrolling vs torchopt's implicit mode: hypergradient dL_val/dλ
of batched ridge and ℓ2-regularized logistic regression (B = 64 problems, n features,
m = 200 training samples, λ per problem), float64, CPU (--threads, default 2).

    w*(λ) = argmin_w  loss(X w, t) + ½ λ ‖w‖²,     L_val(w*) = validation loss

Methods (same inputs, same process, alternated A B C D ..., median of --reps runs):
  implicit      am.custom_root on the no-grad forward solve, backward = per-problem CG on the
                Hessian (matrix-free, torch.func vjp), default tolerance (rtol = eps^(2/3))
  implicit+hess the same CG preconditioned by custom_root(precond=...): the inverse Hessian
                (X^T D X + lam I)^-1 written out in closed form, built in the backward from
                the solution (its cost is in the backward; nothing is kept): its Cholesky
                factor for n <= m, the Woodbury form through an m x m factor for n > m
  implicit+factor  (ridge) the same CG preconditioned by the Cholesky factor the forward
                solve already computed, handed over with am.implicit.Preconditioned (kept
                from forward to backward: counted in graph MiB)
  implicit-rtol=R  plain CG with rtol R (--rtols R ...: the accuracy/time trade-off)
  torchopt      torchopt.diff.implicit.custom_root, same forward, solve_cg(rtol=1e-10)
  unroll-K      K steps of gradient descent (step 1/L, gradient written out in plain torch)
                tracked by autograd, backward through all of them
Timed: the backward (torch.autograd.grad of L_val w.r.t. λ) and the forward, separately; the
backward also in process CPU time (less inflated than wall time by other jobs on a shared
machine when run with one thread).
Memory: bytes of the tensors the autograd graph saves (deduplicated by storage), and the
peak RSS increase of forward+backward measured in a fresh subprocess per method.
Gradient error: max relative error against the closed-form hypergradient
−∇L_valᵀ H⁻¹ w* (H = the exact per-problem Hessian, dense Cholesky, tight forward solve).

    flock /tmp/amortized-cpu.lock python benchmarks/implicit.py --reps 5 --slow-reps 1 --sizes 100 --threads 1
    flock /tmp/amortized-cpu.lock python benchmarks/implicit.py --reps 3 --slow-reps 1 --sizes 1000 \\
        --threads 1
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import amortized as am  # noqa: E402
from amortized.solvers import lbfgs  # noqa: E402
from timing import MALLOC_ENV, peak_rss_growth  # noqa: E402

DT = torch.float64


def make(kind: str, B: int, n: int, m: int = 200, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, m, n, generator=g, dtype=DT) / m**0.5
    Xv = torch.randn(B, m, n, generator=g, dtype=DT) / m**0.5
    w_true = torch.randn(B, n, generator=g, dtype=DT)
    z, zv = (X @ w_true.unsqueeze(-1)).squeeze(-1), (Xv @ w_true.unsqueeze(-1)).squeeze(-1)
    if kind == "ridge":
        t = z + 0.1 * torch.randn(B, m, generator=g, dtype=DT)
        tv = zv + 0.1 * torch.randn(B, m, generator=g, dtype=DT)
    else:
        t, tv = (
            (torch.rand(B, m, generator=g, dtype=DT) < torch.sigmoid(z)).to(DT),
            (torch.sigmoid(zv) > 0.5).to(DT),
        )
    lam = torch.rand(B, generator=g, dtype=DT) + 0.5
    return X, t, Xv, tv, lam


def loss_terms(kind):
    if kind == "ridge":
        return lambda z, t: 0.5 * (z - t).square().sum(-1)
    return lambda z, t: torch.nn.functional.binary_cross_entropy_with_logits(z, t, reduction="none").sum(-1)


def objective(kind):
    loss = loss_terms(kind)

    def f(w, lam, X, t):  # λ first: torchopt 0.7.3's argnums only works for leading arguments
        return loss((X @ w.unsqueeze(-1)).squeeze(-1), t) + 0.5 * lam * w.square().sum(-1)

    return f


def grad_f(kind):
    f = objective(kind)
    return lambda w, lam, X, t: torch.func.grad(lambda w_: f(w_, lam, X, t).sum())(w)


def val_loss(kind, w, Xv, tv):
    return loss_terms(kind)((Xv @ w.unsqueeze(-1)).squeeze(-1), tv).sum()


def forward_solve(kind, lam, X, t):
    """The no-grad inner solve shared by the implicit methods (exact enough for 1e-9 grads):
    Preconditioned(w, M) with M the Cholesky factor of the Hessian for ridge (the forward
    factors it anyway; "implicit+factor" hands it to the backward, the others drop it)."""
    with torch.no_grad():
        if kind == "ridge":
            L = torch.linalg.cholesky(hessian_closed_form(kind, None, lam, X))
            w = torch.cholesky_solve((X.mT @ t.unsqueeze(-1)), L).squeeze(-1)
            return am.implicit.Preconditioned(w, am.implicit.cholesky_preconditioner(L))
        w0 = torch.zeros(X.shape[0], X.shape[-1], dtype=DT)
        sol = lbfgs(objective(kind), w0, lam, X, t, tol=1e-11, max_iter=2000, history=20, grad="unroll")
        assert bool(sol.solved.all()), sol.status
        return am.implicit.Preconditioned(sol.y, None)


def hessian_closed_form(kind, w, lam, X):
    """X^T D X + lam I per problem (B, n, n); D = 1 (ridge) or σ(Xw)(1 − σ(Xw)) (logistic)."""
    if kind == "ridge":
        XDX = X.mT @ X
    else:
        XDX = X.mT @ (logistic_weights(w, X).unsqueeze(-1) * X)
    return XDX + lam[:, None, None] * torch.eye(X.shape[-1], dtype=DT)


def logistic_weights(w, X):
    """D = σ(Xw)(1 − σ(Xw)), the logistic loss's curvature per sample (B, m)."""
    s = torch.sigmoid((X @ w.unsqueeze(-1)).squeeze(-1))
    return s * (1 - s)


def woodbury_apply(v, X, d, L, lam):
    """(λI + ZᵀZ)⁻¹ v per problem with Z = diag(d) X, from L = chol(λI + ZZᵀ) (B, m, m)
    (matrix inversion lemma; Z is never formed, so nothing of X's size is copied)."""
    Zv = d * (X @ v.unsqueeze(-1)).squeeze(-1)
    u = torch.cholesky_solve(Zv.unsqueeze(-1), L).squeeze(-1)
    return (v - (X.mT @ (d * u).unsqueeze(-1)).squeeze(-1)) / lam.unsqueeze(-1)


def reference(kind, X, t, Xv, tv, lam):
    """Closed-form hypergradient −∇L_valᵀ H⁻¹ w per problem (dense Hessian, Cholesky)."""
    w = forward_solve(kind, lam, X, t).y
    H = hessian_closed_form(kind, w, lam, X)
    wv = w.clone().requires_grad_()
    (gv,) = torch.autograd.grad(val_loss(kind, wv, Xv, tv), wv)
    return -(gv * torch.cholesky_solve(w.unsqueeze(-1), torch.linalg.cholesky(H)).squeeze(-1)).sum(-1)


def smoothness(kind, X, lam):
    L = torch.linalg.matrix_norm(X, ord=2).square() * (1.0 if kind == "ridge" else 0.25) + lam
    return float(L.max())


def method_fns(kind, X, t, Xv, tv, rtols=()):
    gf = grad_f(kind)
    lr = 1.0 / smoothness(kind, X, torch.ones(1, dtype=DT) * 1.5)

    def implicit(rtol=None, precond=None, factor=False):
        def fwd(w0, lam_, X_, t_):
            sol = forward_solve(kind, lam_, X_, t_)
            return sol if factor else sol.y

        solver = am.custom_root(gf, solve="cg", rtol=rtol, precond=precond)(fwd)
        return lambda lam: solver(None, lam, X, t)

    def hessian_precond(w, lam_, X_, t_):
        """M = H⁻¹, H = XᵀDX + λI in closed form at the solution, built in the backward: the
        Cholesky factor of H when n ≤ m, else (n > m: H is λI plus rank m) its Woodbury form
        H⁻¹v = (v − Zᵀ(λI + ZZᵀ)⁻¹Zv)/λ with Z = D^½X, through an m×m Cholesky factor.
        Its tensors live only during the backward (nothing is kept from the forward)."""
        m, n = X_.shape[-2:]
        if n <= m:
            return am.implicit.cholesky_preconditioner(
                torch.linalg.cholesky(hessian_closed_form(kind, w, lam_, X_))
            )
        d = torch.ones_like(t_) if kind == "ridge" else logistic_weights(w, X_).sqrt()
        K = d.unsqueeze(-1) * (X_ @ X_.mT) * d.unsqueeze(-2) + lam_[:, None, None] * torch.eye(m, dtype=DT)
        return am.implicit.Preconditioner(woodbury_apply, (X_, d, torch.linalg.cholesky(K), lam_))

    def unroll(K):
        # The strongest unrolled baseline: plain tensor ops with the gradient written out
        # (no torch.func per step), every step tracked by autograd.
        def run(lam):
            w = torch.zeros(X.shape[0], X.shape[-1], dtype=DT)
            for _ in range(K):
                z = (X @ w.unsqueeze(-1)).squeeze(-1)
                r = z - t if kind == "ridge" else torch.sigmoid(z) - t
                w = w - lr * ((X.mT @ r.unsqueeze(-1)).squeeze(-1) + lam.unsqueeze(-1) * w)
            return w

        return run

    fns = {"implicit": implicit(), "implicit+hess": implicit(precond=hessian_precond)}
    if kind == "ridge":
        fns["implicit+factor"] = implicit(factor=True)
    fns.update({f"implicit-rtol={r:g}": implicit(r) for r in rtols})
    fns.update({"unroll-100": unroll(100), "unroll-1000": unroll(1000)})
    try:
        import torchopt

        solve = torchopt.linear_solve.solve_cg(rtol=1e-10, atol=0.0, maxiter=10 * X.shape[-1])

        def to(lam):
            solver = torchopt.diff.implicit.custom_root(gf, argnums=1, solve=solve)(
                lambda w0, lam_, X_, t_: forward_solve(kind, lam_, X_, t_).y
            )
            return solver(torch.zeros(X.shape[0], X.shape[-1], dtype=DT), lam, X, t)

        fns["torchopt"] = to
    except ImportError:
        pass
    return fns


def saved_bytes(fn, kind, lam, data_tensors):
    """Bytes of the tensors the autograd graph of L_val keeps for backward beyond the problem
    data (walking the graph from the loss; deduplicated by storage; the data X, t, Xv, tv
    and λ exist anyway and are not counted)."""
    data = {x.untyped_storage().data_ptr() for x in data_tensors}
    Xv, tv = data_tensors[2], data_tensors[3]
    loss = val_loss(kind, fn(lam), Xv, tv)
    seen, stack, visited = {}, [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    v = getattr(node, name)
                except Exception:  # noqa: BLE001 - some saved values cannot be unpacked twice
                    continue
                tensors += (
                    [v]
                    if isinstance(v, torch.Tensor)
                    else [x for x in v if isinstance(x, torch.Tensor)]
                    if isinstance(v, (tuple, list))
                    else []
                )
        if hasattr(node, "saved_tensors"):
            try:
                tensors += [x for x in node.saved_tensors if isinstance(x, torch.Tensor)]
            except Exception:  # noqa: BLE001
                pass
        for x in tensors:
            st = x.untyped_storage()
            if st.data_ptr() not in data:
                seen[st.data_ptr()] = st.nbytes()
        stack += [nf for nf, _ in node.next_functions]
    return sum(seen.values())


def run_once(fn, kind, lam0, Xv, tv):
    lam = lam0.clone().requires_grad_()
    t0 = time.perf_counter()
    w = fn(lam)
    loss = val_loss(kind, w, Xv, tv)
    t1, c1 = time.perf_counter(), time.process_time()
    (g,) = torch.autograd.grad(loss, lam)
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, (t2 - t1, c2 - c1), g


def memory_probe(kind, n, B, method, threads, rtols):
    """Peak RSS increase (MiB) of one forward+backward, in this (fresh) process."""
    torch.set_num_threads(threads)
    X, t, Xv, tv, lam = make(kind, B, n)
    fn = method_fns(kind, X, t, Xv, tv, rtols)[method]
    run_once(fn, kind, lam, Xv, tv)  # warm-up: lazy imports and allocator pools
    # ru_maxrss never resets: the set-up's own peak hid the solve's (the column read 0)
    return peak_rss_growth(lambda: run_once(fn, kind, lam, Xv, tv))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--kinds", nargs="+", default=["ridge", "logistic"])
    ap.add_argument("--out", default="benchmarks/implicit_results.json")
    ap.add_argument("--cases", nargs="*", default=None, help="KIND:N pairs (overrides --kinds/--sizes)")
    ap.add_argument(
        "--slow-reps", type=int, default=None, help="reps of unroll-1000 (then without its memory columns)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rtols", type=float, nargs="*", default=[], help="extra implicit rows, CG rtol")
    ap.add_argument("--probe", nargs=3, metavar=("KIND", "N", "METHOD"))
    args = ap.parse_args()
    if args.probe:
        probe = memory_probe(
            args.probe[0], int(args.probe[1]), args.B, args.probe[2], args.threads, args.rtols
        )
        print(json.dumps(probe))
        return
    torch.set_num_threads(args.threads)
    rows = []
    cases = [(k, n) for k in args.kinds for n in args.sizes]
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases]
    for kind, n in cases:
        if True:
            X, t, Xv, tv, lam = make(kind, args.B, n)
            ref = reference(kind, X, t, Xv, tv, lam)
            fns = method_fns(kind, X, t, Xv, tv, args.rtols)
            slow = {"unroll-1000"} if n >= 1000 or args.slow_reps else set()
            for k, fn in fns.items():  # warm-up (the slow method is warm from the others' runs)
                if k not in slow:
                    run_once(fn, kind, lam, Xv, tv)
            times = {k: ([], [], []) for k in fns}
            errs = {}
            reps_of = {k: args.slow_reps if k in slow and args.slow_reps else args.reps for k in fns}
            for rep in range(args.reps):  # alternate the methods
                for k, fn in fns.items():
                    if rep >= reps_of[k]:
                        continue
                    tf, tb, g = run_once(fn, kind, lam, Xv, tv)
                    times[k][0].append(tf)
                    times[k][1].append(tb[0])
                    times[k][2].append(tb[1])
                    errs[k] = float(((g - ref).abs() / ref.abs().clamp_min(1e-300)).max())
            for k, fn in fns.items():
                if k in slow:  # one more 1000-step run is too long for the shared machine
                    rows.append(
                        {
                            "problem": kind,
                            "n": n,
                            "B": args.B,
                            "method": k,
                            "forward_ms": 1e3 * statistics.median(times[k][0]),
                            "backward_ms": 1e3 * statistics.median(times[k][1]),
                            "backward_cpu_ms": 1e3 * statistics.median(times[k][2]),
                            "graph_MiB": float("nan"),
                            "peak_rss_MiB": float("nan"),
                            "grad_rel_err": errs[k],
                            "reps": reps_of[k],
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                rss = subprocess.run(
                    [sys.executable, __file__, "--B", str(args.B), "--threads", str(args.threads)]
                    + ["--probe", kind, str(n), k, "--rtols", *map(str, args.rtols)],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=dict(os.environ, **MALLOC_ENV),
                ).stdout
                lam_g = lam.clone().requires_grad_()
                rows.append(
                    {
                        "problem": kind,
                        "n": n,
                        "B": args.B,
                        "method": k,
                        "forward_ms": 1e3 * statistics.median(times[k][0]),
                        "backward_ms": 1e3 * statistics.median(times[k][1]),
                        "backward_cpu_ms": 1e3 * statistics.median(times[k][2]),
                        "graph_MiB": saved_bytes(fn, kind, lam_g, (X, t, Xv, tv, lam_g)) / 2**20,
                        "peak_rss_MiB": float(rss.strip().splitlines()[-1]),
                        "grad_rel_err": errs[k],
                        "reps": reps_of[k],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps}
    try:
        import torchopt

        meta["torchopt"] = torchopt.__version__
    except ImportError:
        meta["torchopt"] = None
    with open(args.out + ".tmp", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    os.replace(args.out + ".tmp", args.out)
    print(table(rows, meta))


def table(rows, meta):
    lines = [
        f"torch {meta['torch']}, torchopt {meta['torchopt']}, {meta['threads']} threads, "
        f"median of {meta['reps']}",
        "",
        "| problem | n | method | reps | forward ms | backward ms | backward CPU ms | graph MiB "
        "| peak RSS MiB | grad rel err |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['problem']} | {r['n']} | {r['method']} | {r.get('reps', meta['reps'])} | "
            f"{r['forward_ms']:.1f} | "
            f"{r['backward_ms']:.1f} | {r.get('backward_cpu_ms', float('nan')):.1f} | "
            f"{r['graph_MiB']:.2f} | {r['peak_rss_MiB']:.0f} | {r['grad_rel_err']:.1e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
