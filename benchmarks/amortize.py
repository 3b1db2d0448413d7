"""Amortized model vs the exact solver, side by side in one process (issue 6's speed claims).

Each subcommand builds the reproduction's data, trains (or loads) the model, then times the
model and the solver on the same held-out contexts, alternated A B A B … with
`timing.alternate` (medians of --reps runs after one warm-up, outputs consumed), and prints a
markdown table with medians and ratios, plus the machine's load, threads and versions.

  qp      DC3's "simple" QP family (seed 17). For each batch size B (the first B test
          instances): `am.solve_qp` cold, the regression model alone, ours (model → active-set
          steps → warm-started exact fallback), the model → warm-started `am.solve_qp`, and the
          active-set steps from a cold start. Quality per method: relative objective gap to
          the exact optimum and max violation. Ratio = solve_qp time ÷ method time, same batch.
  vae     The digits VAE. Encoder pass vs per-datapoint Adam (lr 5e-3, from zeros, 1 sample
          per step) on 500 held-out images: Adam for the iterations it needs to first reach
          the encoder's ELBO (found from a trace scored with common random numbers) and for
          the full 2,000 iterations. Ratios = Adam time ÷ encoder time.
  sphere  The sphere problem: model vs the reference solver (grid + Riemannian descent) and
          vs the model + 10 Riemannian steps, on 1,000 held-out contexts.

    flock /tmp/amortized-cpu.lock python benchmarks/amortize.py qp --threads 2
    flock /tmp/amortized-cpu.lock python benchmarks/amortize.py vae --threads 2
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from amortized.amortize import MLP, AmortizedModel, Amortizer  # noqa: E402
from timing import alternate, versions  # noqa: E402


def header(args) -> None:
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    print(" ".join(f"{k}={v}" for k, v in versions().items()))


def table(rows: list[dict], cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


# ----------------------------------------------------------------------------------- QP
def qp(args) -> None:
    from amortized.problems.qp_proxy import ActiveSetWithFallback, WarmStartedSolve, dc3_simple

    P = dc3_simple(seed=17)
    x_train, _, x_test = P.split()
    q, n = P.A.shape
    model = AmortizedModel(MLP([q, 200, 200, n]).double())
    reg = Amortizer(P, model, loss="regression")
    if args.checkpoint:
        reg.load(args.checkpoint)
        trained = f"loaded {args.checkpoint}"
    else:  # a quick regression model: the speed of "ours" depends on it, its exactness does not
        xs = x_train[: args.train_labels]
        sol = P.solve_full(xs)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.train_steps)
        data = (xs[sol.solved], sol.z[sol.solved])
        g = torch.Generator().manual_seed(0)
        reg.fit(opt, steps=args.train_steps, batch_size=200, data=data, generator=g, scheduler=sched)
        trained = f"trained here: {args.train_steps} steps on {int(sol.solved.sum())} labels"
    print(f"QP proxy, DC3 simple (n={n}, q={q}, m={P.G.shape[0]}); regression model {trained}")
    active = ActiveSetWithFallback(P)
    ours = Amortizer(P, model, refiner=active, test_refine_steps=args.active_set_steps)
    warm = Amortizer(P, model, refiner=WarmStartedSolve(P), test_refine_steps=1)

    class Zero(torch.nn.Module):
        def forward(self, x):
            return x.new_zeros(x.shape[0], n)

    cold = Amortizer(P, Zero(), refiner=ActiveSetWithFallback(P), test_refine_steps=args.active_set_steps)
    cols = ["B", "method", "ms / batch", "µs / instance", "solve_qp ÷ method", "rel. gap", "max viol."]
    for B in args.batch_sizes:  # one table per batch size, printed as soon as it is measured
        rows = []
        x = x_test[:B]
        fns = {
            "solve_qp (exact, cold)": lambda x=x: P.solve(x),
            "regression model": lambda x=x: reg.predict(x),
            "ours: model → active set (→ exact fallback)": lambda x=x: ours.predict(x),
            "model → warm-started solve_qp": lambda x=x: warm.predict(x),
            "active set from y = 0": lambda x=x: cold.predict(x),
        }
        t = alternate(fns, reps=args.reps)
        base = t["solve_qp (exact, cold)"]
        ys = {name: fn() for name, fn in fns.items()}  # quality, outside the timed runs
        f_star = float(P.objective(ys["solve_qp (exact, cold)"], x).mean())
        for name, y in ys.items():
            v = P.constraint_violation(y, x)
            rows.append(
                {
                    "B": B,
                    "method": name,
                    "ms / batch": f"{t[name] * 1e3:.2f}",
                    "µs / instance": f"{t[name] / B * 1e6:.1f}",
                    "solve_qp ÷ method": f"{base / t[name]:.1f}",
                    "rel. gap": f"{(float(P.objective(y, x).mean()) - f_star) / abs(f_star):.2e}",
                    "max viol.": f"{float(torch.maximum(v['eq'].max(), v['ineq'].max())):.1e}",
                }
            )
        print(
            f"B={B}: active-set steps mean {float(active.active_set.last_steps.float().mean()):.2f}, "
            f"fallback fraction {float(active.last_fallback.float().mean()):.3f}, "
            f"load average {os.getloadavg()}"
        )
        table(rows, cols)


# ----------------------------------------------------------------------------------- VAE
def vae(args) -> None:
    from amortized.cli.amortize import train_vae
    from amortized.problems.vae import adam_trace

    P, enc, _, _, x_test, hist, t_train = train_vae(steps=args.steps, seed=args.seed, load=args.model)
    how = f"loaded {args.model}" if args.model else f"trained {args.steps} steps in {t_train:.0f} s"
    print(f"VAE {how}; {x_test.shape[0]} held-out images")
    with torch.no_grad():
        y_enc = enc(x_test)
    score = lambda y: float(P.elbo_estimate(y, x_test, n_samples=args.trace_samples).mean())  # noqa: E731
    e_enc = score(y_enc)
    _, its, snaps = adam_trace(P, x_test, torch.zeros_like(y_enc), lr=5e-3, iters=args.adam_iters, every=25)
    elbos = [score(s) for s in snaps]
    k_match = next((k for k, e in zip(its, elbos, strict=True) if e >= e_enc), None)
    print(
        f"encoder ELBO {e_enc:.3f}, Adam-{args.adam_iters} ELBO {elbos[-1]:.3f} "
        f"({args.trace_samples} common samples); Adam first reaches the encoder at "
        f"{k_match} iterations (checked every 25)"
    )

    def adam(iters):
        y = torch.zeros_like(y_enc).requires_grad_()
        opt = torch.optim.Adam([y], lr=5e-3)
        for _ in range(iters):
            opt.zero_grad(set_to_none=True)
            P.objective(y, x_test).sum().backward()
            opt.step()
        return y.detach()

    def encoder():
        with torch.inference_mode():
            return enc(x_test)

    fns = {"encoder": encoder, f"Adam {args.adam_iters} iterations": lambda: adam(args.adam_iters)}
    if k_match is not None:
        fns[f"Adam {k_match} iterations (time to match)"] = lambda: adam(k_match)
    # The encoder's pass is ~1e4 times shorter than Adam's: time it over more repetitions.
    t_enc = alternate({"encoder": encoder}, reps=200, warmup=10)["encoder"]
    t = alternate(fns, reps=args.reps)
    t_enc2 = alternate({"encoder": encoder}, reps=200, warmup=10)["encoder"]
    print(
        f"encoder medians before / during / after the Adam runs: {t_enc * 1e3:.3f} / "
        f"{t['encoder'] * 1e3:.3f} / {t_enc2 * 1e3:.3f} ms"
    )
    t_e = min(t_enc, t_enc2)
    rows = [{"method": k, "time (s)": f"{v:.4g}", "÷ encoder": f"{v / t_e:.0f}"} for k, v in t.items()]
    rows[0]["time (s)"] = f"{t_e:.4g}"
    rows[0]["÷ encoder"] = "1"
    table(rows, ["method", "time (s)", "÷ encoder"])


# -------------------------------------------------------------------------------- sphere
def sphere(args) -> None:
    import json

    from amortized.cli.amortize import train_sphere

    frame = args.context_frame
    if args.model:  # the checkpoint says which context frame its model was trained behind
        frame = json.loads(Path(args.model + ".json").read_text())["meta"].get("context_frame", "none")
    P, am, x_test, _, t_train = train_sphere(
        steps=0 if args.model else args.steps, seed=args.seed, frame=frame
    )
    if args.model:
        am.load(args.model)
    y_ref = P.solve(x_test)
    fns = {
        "model": lambda: am.predict(x_test, 0),
        "model + 10 Riemannian steps": lambda: am.predict(x_test, 10),
        "reference solver (grid + 200 steps)": lambda: P.solve(x_test),
    }
    t = alternate(fns, reps=args.reps)
    rows = []
    for name, fn in fns.items():
        d = P.distance(fn(), y_ref)
        rows.append(
            {
                "method": name,
                "µs / instance": f"{t[name] / x_test.shape[0] * 1e6:.1f}",
                "solver ÷ method": f"{t['reference solver (grid + 200 steps)'] / t[name]:.0f}",
                "median geodesic error (rad)": f"{float(d.median()):.4f}",
            }
        )
    how = f"loaded {args.model}" if args.model else f"trained {args.steps} steps in {t_train:.0f} s"
    print(f"sphere model ({frame} context frame) {how}; {x_test.shape[0]} held-out contexts")
    table(rows, ["method", "µs / instance", "solver ÷ method", "median geodesic error (rad)"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("problem", choices=["qp", "vae", "sphere"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[50, 833])
    ap.add_argument("--checkpoint", default=None, help="qp: a regression model saved by the CLI")
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--train-labels", type=int, default=2000)
    ap.add_argument("--active-set-steps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10_000, help="vae/sphere training steps")
    ap.add_argument("--model", default=None, help="vae/sphere: a model saved by the CLI (skips training)")
    ap.add_argument("--context-frame", default="rotated", help="sphere: rotated, sorted or none")
    ap.add_argument("--adam-iters", type=int, default=2000)
    ap.add_argument("--trace-samples", type=int, default=64)
    args = ap.parse_args()
    header(args)
    {"qp": qp, "vae": vae, "sphere": sphere}[args.problem](args)


if __name__ == "__main__":
    main()
