"""Batched primal-dual interior point method for dense convex QPs.

    minimize ½ zᵀQz + pᵀz   subject to   Gz + s = h,  s ≥ 0,  Az = b

Mehrotra's predictor-corrector (Mehrotra 1992; the batched form of OptNet, Amos & Kolter
2017). Each iteration eliminates the slacks and inequality duals, leaving the saddle system

    [ Q + GᵀWG + ρI   Aᵀ ] [dz]   [r1]
    [ A              −δI ] [dν] = [r2],      W = diag(λ / s),

factored by two Choleskys (linalg.kkt). The static regularization ρ, δ keeps it definite
for PSD-singular Q (LPs) and rank-deficient A; one step of iterative refinement against the
unregularized system removes its bias. Problems advance under a per-problem mask: a
converged (or failed) problem stops changing while the rest of the batch continues.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from amortized.linalg import SaddleFactor, factor_saddle
from amortized.qp.problem import QPData
from amortized.qp.status import QPStatus


@dataclass(frozen=True)
class Iterate:
    z: Tensor
    s: Tensor
    lam: Tensor
    nu: Tensor


@dataclass(frozen=True)
class Residuals:
    """Unscaled residuals (B, ·) and their per-problem scales (B,) for relative tests."""

    r_d: Tensor  # Qz + p + Gᵀλ + Aᵀν
    r_i: Tensor  # Gz + s − h
    r_e: Tensor  # Az − b
    primal: Tensor
    dual: Tensor
    gap: Tensor
    primal_scale: Tensor
    dual_scale: Tensor
    gap_scale: Tensor


def _mv(M: Tensor, x: Tensor) -> Tensor:
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def _rmv(M: Tensor, x: Tensor) -> Tensor:
    """Mᵀx for M (B, m, n), x (B, m)."""
    return (x.unsqueeze(-2) @ M).squeeze(-2)


def _amax(x: Tensor) -> Tensor:
    return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])


def residuals(d: QPData, it: Iterate) -> Residuals:
    Qz, Gz, Az = _mv(d.Q, it.z), _mv(d.G, it.z), _mv(d.A, it.z)
    Gt_lam, At_nu = _rmv(d.G, it.lam), _rmv(d.A, it.nu)
    r_d = Qz + d.p + Gt_lam + At_nu
    r_i = Gz + it.s - d.h
    r_e = Az - d.b
    primal = torch.maximum(_amax(r_i), _amax(r_e))
    primal_scale = 1 + torch.stack([_amax(Gz), _amax(d.h), _amax(Az), _amax(d.b)]).amax(0)
    dual_scale = 1 + torch.stack([_amax(Qz), _amax(d.p), _amax(Gt_lam), _amax(At_nu)]).amax(0)
    # duality gap of the Lagrangian dual: zᵀQz + pᵀz + hᵀλ + bᵀν (= sᵀλ when feasible)
    zQz, pz = (it.z * Qz).sum(-1), (d.p * it.z).sum(-1)
    hl, bn = (d.h * it.lam).sum(-1), (d.b * it.nu).sum(-1)
    gap = torch.maximum((zQz + pz + hl + bn).abs(), (it.s * it.lam).sum(-1))
    gap_scale = 1 + torch.stack([zQz.abs(), pz.abs(), hl.abs(), bn.abs()]).amax(0)
    return Residuals(r_d, r_i, r_e, _amax(r_d), primal, gap, primal_scale, dual_scale, gap_scale)


class KKT:
    """The Newton system of one interior point iteration, factored once and reused for the
    predictor, the corrector and (at the solution) the implicit backward."""

    def __init__(self, d: QPData, s: Tensor, lam: Tensor, rho: float, delta: float):
        self.d = d
        self.W = lam / s
        self.H0 = d.Q + (d.G.mT * self.W.unsqueeze(-2)) @ d.G  # Q + GᵀWG
        n = d.Q.shape[-1]
        H = self.H0 + rho * torch.eye(n, dtype=s.dtype, device=s.device)
        self.factor: SaddleFactor = factor_saddle(H, d.A, delta)

    def solve(self, r1: Tensor, r2: Tensor, refine: int = 1) -> tuple[Tensor, Tensor]:
        """Solve [H0 Aᵀ; A 0][x; y] = [r1; r2] with the regularized factor plus refinement."""
        x, y = self.factor.solve(r1, r2)
        for _ in range(refine):
            e1 = r1 - _mv(self.H0, x) - _rmv(self.d.A, y)
            e2 = r2 - _mv(self.d.A, x)
            dx, dy = self.factor.solve(e1, e2)
            x, y = x + dx, y + dy
        return x, y

    def newton(self, it: Iterate, res: Residuals, r_c: Tensor) -> Iterate:
        """Direction for the complementarity right-hand side λ∘s → λ∘s − r_c... written as
        λ∘ds + s∘dλ = −r_c, with the primal and dual residuals of `res`."""
        d = self.d
        t = (it.lam * res.r_i - r_c) / it.s
        dz, dnu = self.solve(-res.r_d - _rmv(d.G, t), -res.r_e)
        dlam = self.W * _mv(d.G, dz) + t
        ds = -res.r_i - _mv(d.G, dz)
        return Iterate(dz, ds, dlam, dnu)


def _max_step(x: Tensor, dx: Tensor) -> Tensor:
    """Largest α ≤ 1 with x + α dx ≥ 0, per problem. x, dx: (B, m)."""
    ratio = torch.where(dx < 0, -x / dx, torch.ones_like(x))
    return ratio.amin(-1).clamp(max=1.0) if x.shape[-1] else x.new_ones(x.shape[0])


def _initial_point(d: QPData, rho: float, delta: float, warm_start: Tensor | None) -> Iterate:
    """Mehrotra's starting point: the least-squares solve with W = I, then slacks and duals
    shifted into the interior."""
    B, n, m, q = d.shape
    ones = d.p.new_ones(B, m)
    kkt = KKT(d, ones, ones, rho, delta)
    z, nu = kkt.solve(-d.p + _rmv(d.G, d.h), d.b)
    if warm_start is not None:
        z = warm_start.expand(B, n).to(d.p)
    if m == 0:
        return Iterate(z, d.p.new_zeros(B, 0), d.p.new_zeros(B, 0), nu)
    s = d.h - _mv(d.G, z)
    lam = -s.clone()
    ds = torch.clamp(-1.5 * s.amin(-1, keepdim=True), min=0)
    dl = torch.clamp(-1.5 * lam.amin(-1, keepdim=True), min=0)
    s, lam = s + ds, lam + dl
    sl = (s * lam).sum(-1, keepdim=True)
    s = s + 0.5 * sl / lam.sum(-1, keepdim=True).clamp(min=1e-30)
    lam = lam + 0.5 * sl / s.sum(-1, keepdim=True).clamp(min=1e-30)
    # degenerate starts (s or λ identically zero) fall back to the unit point
    bad = ~((s > 0).all(-1) & (lam > 0).all(-1) & torch.isfinite(s).all(-1) & torch.isfinite(lam).all(-1))
    s = torch.where(bad[:, None], torch.ones_like(s), s)
    lam = torch.where(bad[:, None], torch.ones_like(lam), lam)
    return Iterate(z, s, lam, nu)


@dataclass
class PDIPMResult:
    it: Iterate
    res: Residuals
    status: Tensor
    iters: Tensor
    kkt: KKT  # factored at the returned iterate for every SOLVED problem


def pdipm(
    d: QPData,
    active: Tensor,
    *,
    eps: float,
    max_iter: int,
    check_every: int = 3,
    warm_start: Tensor | None = None,
) -> PDIPMResult:
    """Run the interior point method on the problems where `active` (B,) is True.

    Convergence: primal ≤ eps·primal_scale, dual ≤ eps·dual_scale, gap ≤ eps·gap_scale.
    Primal infeasibility: λ ≥ 0 with ‖Gᵀλ + Aᵀν‖∞ ≤ eps_inf·(−hᵀλ − bᵀν); by Farkas a feasible
    point then needs ‖z‖₁ ≥ 1/eps_inf, so the flag is never raised on a reasonably
    scaled feasible problem.
    """
    B, n, m, q = d.shape
    dtype = d.p.dtype
    finfo = torch.finfo(dtype)
    rho = delta = finfo.eps ** 0.5 * 1e-2 if dtype == torch.float64 else finfo.eps ** 0.5
    eps_inf = finfo.eps ** 0.5
    status = torch.full((B,), int(QPStatus.MAX_ITER), dtype=torch.long, device=d.p.device)
    status = torch.where(active, status, torch.full_like(status, int(QPStatus.NUMERICAL)))
    iters = torch.zeros(B, dtype=torch.long, device=d.p.device)
    it = _initial_point(d, rho, delta, warm_start)
    running = active.clone()
    tiny = finfo.tiny ** 0.5

    for k in range(max_iter + 1):
        res = residuals(d, it)
        kkt = KKT(d, it.s, it.lam, rho, delta)
        if k % check_every == 0 or k == max_iter:
            converged = (
                (res.primal <= eps * res.primal_scale)
                & (res.dual <= eps * res.dual_scale)
                & (res.gap <= eps * res.gap_scale)
            )
            farkas = d.h.mul(it.lam).sum(-1) + d.b.mul(it.nu).sum(-1)
            cert = torch.maximum(_amax(_rmv(d.G, it.lam) + _rmv(d.A, it.nu)), tiny * it.lam.sum(-1))
            infeasible = (farkas < 0) & (cert <= eps_inf * -farkas) & ~converged
            broken = ~kkt.factor.ok | ~torch.isfinite(res.primal + res.dual + res.gap)
            for flag, code in ((converged, QPStatus.SOLVED), (infeasible, QPStatus.INFEASIBLE), (broken, QPStatus.NUMERICAL)):
                status = torch.where(running & flag, int(code), status)
                running = running & ~flag
            if not bool(running.any()) or k == max_iter:
                break
        iters = iters + running
        # Mehrotra predictor-corrector
        aff = kkt.newton(it, res, it.s * it.lam)
        if m:
            mu = (it.s * it.lam).mean(-1, keepdim=True)
            a_aff = torch.minimum(_max_step(it.s, aff.s), _max_step(it.lam, aff.lam)).unsqueeze(-1)
            mu_aff = ((it.s + a_aff * aff.s) * (it.lam + a_aff * aff.lam)).mean(-1, keepdim=True)
            sigma = (mu_aff / mu).clamp(max=1.0) ** 3
            step = kkt.newton(it, res, it.s * it.lam + aff.s * aff.lam - sigma * mu)
            alpha = 0.99 * torch.minimum(_max_step(it.s, step.s), _max_step(it.lam, step.lam))
            alpha = alpha.clamp(max=1.0)
        else:
            step, alpha = aff, d.p.new_ones(B)
        a = torch.where(running, alpha, torch.zeros_like(alpha)).unsqueeze(-1)
        it = Iterate(
            it.z + a * step.z,
            (it.s + a * step.s).clamp(min=tiny) if m else it.s,
            (it.lam + a * step.lam).clamp(min=tiny) if m else it.lam,
            it.nu + a * step.nu,
        )
    return PDIPMResult(it, res, status, iters, kkt)
