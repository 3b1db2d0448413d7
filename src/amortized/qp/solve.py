"""`solve_qp`: the batched, differentiable dense QP solver."""

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from amortized.implicit import implicit_root
from amortized.linalg import bmv
from amortized.qp.admm import admm
from amortized.qp.elastic import elastic_qp, split_elastic
from amortized.qp.kkt import JacobianSolves, kkt_conditions, kkt_parameter_vjp, kkt_transpose_product
from amortized.qp.pdipm import DEFAULT_MAX_ITER, pdipm
from amortized.qp.problem import QPData, check_convex, qp_data
from amortized.qp.status import QPStatus


@dataclass
class QPSolution:
    """Solution of a batch of B QPs.

    z (B, n) primal; lam (B, m) inequality duals (≥ 0); nu (B, q) equality duals, in the
    Lagrangian L = ½zᵀQz + pᵀz + λᵀ(Gz − h) + νᵀ(Az − b), so Qz + p + Gᵀλ + Aᵀν = 0.
    s (B, m) slacks h − Gz. status (B,) QPStatus codes; iters (B,) iterations used;
    primal_residual, dual_residual, gap (B,) absolute ∞-norm residuals and duality gap.
    z, lam and nu are differentiable w.r.t. every tensor argument of `solve_qp`.

    Certificates: where status is INFEASIBLE, (lam, nu) is a Farkas certificate scaled to
    hᵀλ + bᵀν = −1 (λ ≥ 0, Gᵀλ + Aᵀν ≈ 0); where it is UNBOUNDED, z is a ray scaled to
    pᵀz = −1 (Qz ≈ 0, Gz ≤ 0, Az ≈ 0). Those problems have no solution to differentiate.

    relaxation (B, m + q), elastic mode only: how far each constraint row had to be relaxed,
    [t; Az − b] with Gz ≤ h + t, t ≥ 0 (zero where the QP was feasible); differentiable.
    """

    z: Tensor
    lam: Tensor
    nu: Tensor
    s: Tensor
    status: Tensor
    iters: Tensor
    primal_residual: Tensor
    dual_residual: Tensor
    gap: Tensor
    relaxation: Tensor | None = None

    @property
    def solved(self) -> Tensor:
        return self.status == int(QPStatus.SOLVED)


# forward solvers: (function, default max_iter); every one returns a PDIPMResult
SOLVERS = {"pdipm": (pdipm, DEFAULT_MAX_ITER), "admm": (admm, 4000)}


def default_eps(dtype: torch.dtype) -> float:
    """Relative tolerance on residuals and gap: 1e-10 in float64, 3e-6 in float32."""
    return 1e-10 if dtype == torch.float64 else 3e-6


def solve_qp(
    Q: Tensor,
    p: Tensor,
    G: Tensor | None = None,
    h: Tensor | None = None,
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    solver: str = "pdipm",
    eps: float | None = None,
    eps_abs: float | None = None,
    max_iter: int | None = None,
    warm_start: "Tensor | tuple[Tensor, Tensor, Tensor] | QPSolution | None" = None,
    check_convexity: bool = True,
    elastic: float | None = None,
) -> QPSolution:
    """Solve a batch of convex QPs

        minimize ½ zᵀQz + pᵀz   subject to   Gz ≤ h,  Az = b.

    Shapes (the batch dimension B is optional on each argument and broadcast):
    Q (B, n, n), p (B, n), G (B, m, n), h (B, m), A (B, q, n), b (B, q). G/h and A/b may be
    None or empty. Q is symmetrized ((Q + Qᵀ)/2); it may be singular (Q = 0 is an LP).

    Bad input: wrong shapes, mixed dtypes or devices raise ValueError/TypeError naming the
    argument; a clearly non-convex Q raises ValueError (skip with check_convexity=False); a
    problem with NaN/Inf data gets status NUMERICAL and zero outputs, the others solve.

    The solution is differentiable w.r.t. Q, p, G, h, A, b by implicit differentiation of
    the KKT conditions at the solution, reusing the forward factorization (OptNet).
    Gradients of broadcast arguments are summed over the batch. Problems not SOLVED get
    zero gradients (and a warning in the backward pass).

    solver: "pdipm" (primal-dual interior point, Mehrotra predictor-corrector; few costly
    iterations, max_iter 100 by default) or "admm" (OSQP's ADMM, `qp.admm`: many cheap
    iterations, max_iter 4000 by default; fast from a good warm_start; a problem whose
    polish fails twice at a stall is finished by "pdipm"). Both finish with the same
    active-set polish and share the backward.
    eps: relative tolerance (default from the dtype, see `default_eps`): SOLVED means primal
    and dual residuals and gap (∞-norm) are each ≤ eps·(1 + the size of their terms), or,
    for a polished point within 100·eps, within the rounding error of computing them (a
    float32 problem with |z| ~ 100 cannot read its gap below 3e-6 relative).
    eps_abs: also require each to be ≤ eps_abs in absolute terms (off by default), or, where
    float64 cannot resolve eps_abs, within 10·ε of the magnitudes summed in it (a gap whose
    terms are 1e8 has no digits below ~1e-8).
    warm_start: a primal starting point z (B, n) or (n,), or a start with multipliers,
    (z, λ, ν) or a QPSolution (e.g. the previous solve's). "pdipm" uses z only; "admm"
    uses all (zero multipliers when only z is given).
    elastic: a penalty weight w > 0 switches on elastic mode: solve the closest feasible QP,
    min ½zᵀQz + pᵀz + w·(‖t‖₁ + ‖Az − b‖₁) s.t. Gz ≤ h + t, t ≥ 0 (see `qp.elastic`); exact
    (t = 0, Az = b) when the QP is feasible and w exceeds its largest multiplier. The
    solution's `relaxation` holds the violations.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; available: {', '.join(map(repr, SOLVERS))}")
    max_iter = SOLVERS[solver][1] if max_iter is None else max_iter
    if max_iter < 1:
        raise ValueError("max_iter must be at least 1")
    data, finite = qp_data(Q, p, G, h, A, b)
    if data.shape[0] == 0:
        return _empty_batch(data, [Q, p, G, h, A, b])
    if elastic is not None:
        if warm_start is not None:
            raise ValueError("warm_start is not supported in elastic mode")
        kwargs = {"solver": solver, "eps": eps, "eps_abs": eps_abs, "max_iter": max_iter}
        return _solve_elastic(data, float(elastic), check_convexity=check_convexity, **kwargs)
    B, n, m, q = data.shape
    if not bool(finite.all()):
        data = _replace_nonfinite(data, finite)
    if check_convexity:
        check_convex(data.Q if Q.dim() == 3 else data.Q[:1])
    eps = default_eps(data.p.dtype) if eps is None else float(eps)
    vectors = tuple(x.detach() for x in (data.p, data.h, data.b))
    ws = _warm_start(warm_start, solver)
    # the solver gets the only reference to the data: a symmetrized copy of Q (made when
    # Q is not exactly symmetric) is then freed once the solver has scaled its own copy
    box = [QPData(*(x.detach() for x in (data.Q, data.p, data.G, data.h, data.A, data.b)))]
    del data
    with _solver_mode():
        r = SOLVERS[solver][0](box.pop(), finite, eps=eps, eps_abs=eps_abs, max_iter=max_iter, warm_start=ws)
    it, solved = r.it, r.status == int(QPStatus.SOLVED)
    it = _normalize_certificates(it, r.status, *vectors)
    zero_bad = lambda x: torch.where(finite.unsqueeze(-1), x, torch.zeros_like(x))
    z, lam, nu, s = (zero_bad(x) for x in (it.z, it.lam, it.nu, it.s))

    params = [Q, p, G, h, A, b]
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in params):
        params = [x if x is not None and x.numel() else None for x in params]
        solves = JacobianSolves(r, s, lam, solved)
        F, vjp_y, vjp_p = _kkt_with_defaults(B, n, p, tight=solves.tight)
        z, lam, nu = implicit_root(
            F,
            _warn_unsolved(solves.transpose, solved),
            (z, lam, nu),
            params,
            # in float64 one step takes the factor's ρ = δ ≈ 1e-10 out of the answer (to ρ²),
            # the dense primal form for singular Q (ρ ≈ 1e-7, squared conditioning) two;
            # with float32's ρ ≈ 3e-5 each step gains only 8-10× at (100,100,50) or on an
            # ill-conditioned problem (two steps left gradients 2.8e-3 off), 2.4× on one just
            # short of comfortably positive definite (dense primal form): up to twelve, until
            # a correction is 1e-4 of the answer
            refine=12 if r.d.p.dtype != torch.float64 else 2 if r.relaxed else 1,
            refine_tol=1e-4 if r.d.p.dtype != torch.float64 else 0.0,
            # float32's residuals in float64, as the polish's: cond·ε₃₂ left 1e-3 (cond Q ~ 2e3)
            wide=r.d.p.dtype != torch.float64,
            vjp_y=vjp_y,
            vjp_p=vjp_p,
            solve_forward=solves.forward,
            frozen=lambda: solves.frozen,
        )
    # normal tensors out of the solver's inference ones, which autograd could not save
    report = (x.clone() for x in (r.status, r.iters, r.res.primal, r.res.dual, r.res.gap))
    return QPSolution(z, lam, nu, s, *report)


def _solver_mode():
    """The autograd mode the forward solvers run in: inference mode, which spares each of
    their many small ops some dispatch overhead, or no_grad under torch.func's transforms,
    whose wrapped tensors cannot enter it."""
    return torch.no_grad() if torch._C._are_functorch_transforms_active() else torch.inference_mode()


def _empty_batch(data: QPData, params: list) -> QPSolution:
    """The solution of a batch of no problems: empty outputs, still attached to the
    arguments' graph (their gradients are zero), so a training loop's empty batch runs."""
    B, n, m, q = data.shape
    anchor = sum(0 * x.sum() for x in params if isinstance(x, Tensor) and x.requires_grad)
    z, lam, nu, s = (data.p.new_zeros(0, k) + anchor for k in (n, m, q, m))
    empty = data.p.new_zeros(0)
    status = torch.zeros(0, dtype=torch.long, device=data.p.device)
    return QPSolution(z, lam, nu, s, status, status.clone(), empty, empty.clone(), empty.clone())


def _solve_elastic(data: QPData, weight: float, **kwargs) -> QPSolution:
    """solve_qp in elastic mode: the elastic QP (built from `data` by differentiable ops, so
    gradients reach the original arguments) solved as an ordinary one."""
    if not weight > 0:
        raise ValueError(f"elastic must be a positive penalty weight, got {weight}")
    B, n, m, q = data.shape
    e = elastic_qp(data, weight)
    sol = solve_qp(e.Q, e.p, e.G, e.h, **kwargs)
    z, lam, nu, t = split_elastic(sol.z, sol.lam, n, m, q)
    relaxation = torch.cat([t, bmv(data.A, z) - data.b], -1)
    s = data.h + t - bmv(data.G, z)
    return QPSolution(
        z, lam, nu, s, sol.status, sol.iters, sol.primal_residual, sol.dual_residual, sol.gap, relaxation
    )


def _warm_start(warm_start, solver: str):
    """The start as the solver takes it: z (pdipm), or (z, λ, ν) with λ, ν possibly None."""
    if warm_start is None:
        return None
    if isinstance(warm_start, QPSolution):
        warm_start = (warm_start.z, warm_start.lam, warm_start.nu)
    if isinstance(warm_start, Tensor):
        warm_start = (warm_start, None, None)
    z, lam, nu = (None if x is None else x.detach() for x in warm_start)
    return z if solver == "pdipm" else (z, lam, nu)


def _normalize_certificates(it, status: Tensor, p: Tensor, h: Tensor, b: Tensor):
    """Scale the certificates of INFEASIBLE and UNBOUNDED problems as QPSolution states."""
    infeasible = (status == int(QPStatus.INFEASIBLE)).unsqueeze(-1)
    unbounded = (status == int(QPStatus.UNBOUNDED)).unsqueeze(-1)
    if not bool(infeasible.any() | unbounded.any()):
        return it
    farkas = ((h * it.lam).sum(-1) + (b * it.nu).sum(-1)).unsqueeze(-1).abs()
    pz = (p * it.z).sum(-1).unsqueeze(-1).abs()
    fix = lambda x, bad, size: torch.where(bad, x / torch.where(bad, size, 1.0), x)
    lam, nu = fix(it.lam, infeasible, farkas), fix(it.nu, infeasible, farkas)
    return type(it)(fix(it.z, unbounded, pz), it.s, lam, nu)


def _replace_nonfinite(d: QPData, finite: Tensor) -> QPData:
    """Swap the data of non-finite problems for a trivial QP so nothing NaN enters the batch."""
    f2, f3 = finite[:, None], finite[:, None, None]
    eye = torch.eye(d.Q.shape[-1], dtype=d.Q.dtype, device=d.Q.device)
    return QPData(
        torch.where(f3, d.Q, eye),
        torch.where(f2, d.p, 0.0),
        torch.where(f3, d.G, 0.0),
        torch.where(f2, d.h, 1.0),
        torch.where(f3, d.A, 0.0),
        torch.where(f2, d.b, 0.0),
    )


def _kkt_with_defaults(B: int, n: int, like: Tensor, tight: Tensor | None = None):
    """kkt_conditions and its closed-form products (ys, params, u) -> (∂F/∂y)ᵀu (with the
    rows `tight`, see `kkt_transpose_product`) and (ys, params, w, wanted) ->
    (∂F/∂θ_i)ᵀw, with absent (None) constraint blocks filled by empty tensors (they are
    never `wanted`)."""
    empty_M, empty_v = like.new_zeros(B, 0, n), like.new_zeros(B, 0)

    def filled(Q, p, G, h, A, b):
        if G is None:
            G, h = empty_M, empty_v
        if A is None:
            A, b = empty_M, empty_v
        return Q, p, G, h, A, b

    def F(z, lam, nu, *params):
        return kkt_conditions(z, lam, nu, *filled(*params))

    def vjp_y(ys, params, u):
        return kkt_transpose_product(*ys, *filled(*params), u, tight)

    def vjp_p(ys, params, w, wanted):
        return kkt_parameter_vjp(*ys, filled(*params), w, wanted)

    return F, vjp_y, vjp_p


def _warn_unsolved(solve, solved: Tensor):
    warned = False

    def wrapped(v):
        nonlocal warned
        if not warned and not bool(solved.all()):
            warned = True
            bad = (~solved).nonzero().flatten().tolist()[:10]
            warnings.warn(
                f"solve_qp backward: problems {bad} are not SOLVED; their gradients are zero",
                RuntimeWarning,
                stacklevel=2,
            )
        return solve(v)

    return wrapped
