"""Batched ADMM for dense convex QPs (OSQP: Stellato et al. 2020), warm-startable.

    minimize ½ zᵀQz + pᵀz   subject to   l ≤ Cz ≤ u,   C = [G; A],  l = [−∞; b],  u = [h; b]

An iteration solves one system with the fixed matrix K = Q + σI + Cᵀ diag(ρ) C (one
Cholesky per problem, redone only when ρ adapts), projects onto [l, u] and updates the
multipliers y = [λ; ν]; ρ is 10³ times larger on equality rows and follows the ratio of
primal to dual residual, as in OSQP. Iterations are cheap and many from a cold start, few
from a good warm start (an amortized prediction).

Once the residuals are small, the interior point method's active-set polish
(`pdipm._polish`) makes the answer exact and gives the implicit backward its factorization.
Statuses and their tests are those of `pdipm`, on the original problem; primal
infeasibility is certified by the change of y between checks (OSQP's δy). Unbounded
problems end MAX_ITER. A problem whose polish fails _HANDOVER times at a stall (no tenfold
progress in the 100 iterations between tries: a degenerate vertex in float32, where ADMM
cannot sharpen the guess) is finished by the interior point method instead, within what
it has left of max_iter.
"""

import torch
from torch import Tensor

from amortized.linalg import bmv, brmv, cholesky, cholesky_solve
from amortized.qp.pdipm import (
    DEFAULT_MAX_ITER,
    INFEASIBLE,
    MAX_ITER,
    NUMERICAL,
    SOLVED,
    Iterate,
    PDIPMResult,
    Residuals,
    _amax,
    _infeasible,
    _polish,
    _take_over,
    kkt_form,
    pdipm,
    scaled,
)
from amortized.qp.problem import QPData

# failed polishes at a stall before the interior point method takes a problem over
_HANDOVER = 2


def admm(
    d: QPData,
    active: Tensor,
    *,
    eps: float,
    max_iter: int,
    eps_abs: float | None = None,
    check_every: int = 10,
    warm_start: tuple[Tensor, Tensor | None, Tensor | None] | None = None,
    scale: bool = True,
    sigma: float = 1e-6,
    alpha: float = 1.6,
    rho: float = 0.1,
) -> PDIPMResult:
    """Solve the problems where `active` (B,) is True (the others are NUMERICAL), from
    warm_start = (z, λ, ν) of the original problem when given (λ, ν may be None: zero),
    else 0. Residuals are checked after the first iteration (a good start is polished at
    once) and every `check_every` iterations, where ρ may adapt."""
    orig, orig_G = d, d.G
    d, sc = scaled(d, scale)
    B, n, m, q = d.shape
    dtype = d.p.dtype
    finfo = torch.finfo(dtype)
    kkt_args = kkt_form(d)
    C = d.C
    lo = torch.cat([torch.full_like(d.h, -torch.inf), d.b], -1)
    up = torch.cat([d.h, d.b], -1)
    rho_row = torch.cat([d.p.new_ones(m), d.p.new_full((q,), 1e3)])
    rho_b = d.p.new_full((B, 1), rho)
    # OSQP polishes at its loose default tolerance; float32's iterations can stall above it
    # (a K with 10³-fold ρ on equality rows, factored in float32), where the polish, with
    # its refinement in float64 residuals, still finds the active set: the interior point
    # method's ε^¼ there
    eps_polish = max(eps, 1e-3, finfo.eps**0.25)
    eps_inf = max(1e-6, finfo.eps**0.5)
    eye = torch.eye(n, dtype=dtype, device=d.p.device)

    def factor(rho_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ρ per row (B, m + q) and the Cholesky factor of K with its ok flags."""
        r = rho_b * rho_row
        return r, *cholesky(d.Q + sigma * eye + (C.mT * r.unsqueeze(-2)) @ C)

    x, y = _start(d, sc, warm_start)
    z = torch.clamp(bmv(C, x), lo, up)
    y_check = y
    r, L, ok = factor(rho_b)
    status = torch.where(active & ok, MAX_ITER, NUMERICAL)
    running = active & ok
    iters = torch.zeros(B, dtype=torch.long, device=d.p.device)
    polished = torch.zeros_like(active)
    D_polish = d.p.new_full((B, m), torch.inf)
    tried = torch.full((B,), torch.inf, dtype=dtype, device=d.p.device)
    tried_at = torch.zeros(B, dtype=torch.long, device=d.p.device)
    stalls = torch.zeros(B, dtype=torch.long, device=d.p.device)
    handover = torch.zeros_like(active)

    def iterate_of(x: Tensor, z: Tensor, y: Tensor) -> Iterate:
        """The (z, s, λ, ν) of the interior point method's terms: s = h − z_G ≥ 0, λ = y_G ≥ 0
        (the projection keeps them so)."""
        return Iterate(x, (d.h - z[..., :m]).clamp(min=0), y[..., :m].clamp(min=0), y[..., m:])

    for k in range(1, max_iter + 1):
        x_t = cholesky_solve(L, sigma * x - d.p + brmv(C, r * z - y))
        z_hat = alpha * bmv(C, x_t) + (1 - alpha) * z
        x_new = alpha * x_t + (1 - alpha) * x
        z_new = torch.clamp(z_hat + y / r, lo, up)
        y_new = y + r * (z_hat - z_new)
        move = running.unsqueeze(-1)
        x, z, y = (torch.where(move, a, b) for a, b in ((x_new, x), (z_new, z), (y_new, y)))
        iters = iters + running
        if k % check_every and k not in (1, max_iter):
            continue
        it = iterate_of(x, z, y)
        res = Residuals(d, it, sc)
        rel = res.relative
        # retried after tenfold progress, or 100 iterations on (ADMM's residual can plateau
        # while its active set still changes)
        retry = (rel <= 0.1 * tried) | (k >= tried_at + 100)
        ready = running & (rel <= eps_polish) & retry
        if bool(ready.any()):
            stalls = stalls + (ready & (rel > 0.1 * tried))
            tried = torch.where(ready, rel, tried)
            tried_at = torch.where(ready, k, tried_at)
            it_p, D_act, done = _polish(d, sc, it, ready, eps, eps_abs, kkt_args)
            D_polish = torch.where(done.unsqueeze(-1), D_act, D_polish)
            polished = polished | done
            status = torch.where(done, SOLVED, status)
            running = running & ~done
            handover = handover | (running & (stalls >= _HANDOVER))
            running = running & ~handover
            x = torch.where(done.unsqueeze(-1), it_p.z, x)
            # keep the polished point as the answer: z, y consistent with it
            z = torch.where(done.unsqueeze(-1), torch.cat([d.h - it_p.s, d.b], -1), z)
            y = torch.where(done.unsqueeze(-1), torch.cat([it_p.lam, it_p.nu], -1), y)
            it = iterate_of(x, z, y)
            res = Residuals(d, it, sc)
        converged = running & res.meets(eps, eps_abs)
        dy = y - y_check
        cert = Iterate(x, it.s, dy[..., :m].clamp(min=0), dy[..., m:])
        infeasible = running & ~converged & _infeasible(Residuals(d, cert, sc), eps_inf, finfo.tiny**0.5)
        infeasible = infeasible & ((dy[..., :m] >= -eps_inf * _amax(dy).unsqueeze(-1)).all(-1))
        status = torch.where(converged, SOLVED, torch.where(infeasible, INFEASIBLE, status))
        running = running & ~converged & ~infeasible
        y = torch.where(infeasible.unsqueeze(-1), dy, y)  # the certificate, as pdipm reports it
        y_check = y
        if not bool(running.any()):
            break
        rho_new = rho_b * _rho_ratio(res, z).unsqueeze(-1)
        adapt = running.unsqueeze(-1) & ((rho_new > 5 * rho_b) | (rho_new < rho_b / 5))
        if bool(adapt.any()):
            rho_b = torch.where(adapt, rho_new.clamp(1e-6, 1e6), rho_b)
            r, L, ok = factor(rho_b)
            status = torch.where(running & ~ok, NUMERICAL, status)
            running = running & ok

    it = iterate_of(x, z, y)
    # the backward factors the active set: the polish's, or the one the multipliers show
    D = torch.where(polished.unsqueeze(-1), D_polish, torch.where(it.lam > it.s, 0.0, torch.inf))
    # the interior point method's own budget, within what each has left of max_iter (one
    # call per budget; the iterations reported are both solvers'); none left: MAX_ITER
    budget = (max_iter - iters).clamp(max=DEFAULT_MAX_ITER)
    for b in budget[handover & (budget > 0)].unique().tolist():
        idx = (handover & (budget == b)).nonzero().squeeze(-1)
        f = pdipm(orig.index(idx), active[idx], eps=eps, eps_abs=eps_abs, max_iter=b, scale=scale)
        it, status, D = _take_over(f, idx, sc, it, status, D)
        iters = iters.index_copy(0, idx, iters[idx] + f.iters)
    res = Residuals(d, it, sc)
    return PDIPMResult(Iterate(*sc.unscale(*it.fields())), res, status, iters, D, d, orig_G, sc, kkt_args)


def _start(d: QPData, sc, warm_start) -> tuple[Tensor, Tensor]:
    """x (B, n) and y = [λ; ν] (B, m + q) of the scaled problem from an original-problem
    start (z, λ, ν) (see `Scaling`: z = D z̃, λ = E_G λ̃ / c, ν = E_A ν̃ / c)."""
    B, n, m, q = d.shape
    x, y = d.p.new_zeros(B, n), d.p.new_zeros(B, m + q)
    if warm_start is None:
        return x, y
    z, lam, nu = warm_start
    E_G, E_A = sc.split(m)
    c = sc.c.unsqueeze(-1)
    if z is not None:
        x = (z.to(x) / sc.D).expand(B, n).clone()
    if lam is not None:
        y[..., :m] = (c * lam.to(x) / E_G).clamp(min=0)
    if nu is not None:
        y[..., m:] = c * nu.to(x) / E_A
    return x, y


def _rho_ratio(res: Residuals, z: Tensor) -> Tensor:
    """OSQP's ρ update factor √((‖Cx − z‖/max(‖Cx‖, ‖z‖)) / (‖Qx + p + Cᵀy‖/max(‖Qx‖, ‖Cᵀy‖, ‖p‖)))
    on the scaled problem, (B,), from the products `res` already holds at x, y."""
    tiny = torch.finfo(z.dtype).tiny ** 0.5
    Cx = torch.cat([res.Gz, res.Az], -1)
    primal = _amax(Cx - z) / torch.maximum(_amax(Cx), _amax(z)).clamp(min=tiny)
    dual = _amax(res.r_d) / torch.stack([_amax(res.Qz), _amax(res.Ct_y), _amax(res.d.p)]).amax(0).clamp(
        min=tiny
    )
    return (primal / dual.clamp(min=tiny)).clamp(min=tiny).sqrt()
