"""Batched primal-dual interior point method for dense convex QPs.

    minimize ½ zᵀQz + pᵀz   subject to   Gz + s = h,  s ≥ 0,  Az = b

Mehrotra's predictor-corrector (Mehrotra 1992), batched as in OptNet (Amos & Kolter 2017).
Each iteration solves two Newton systems with one factorization of the KKT system
(`kkt_system.KKT`, compliance D = s/λ). Problems advance under a per-problem mask: a
converged or failed problem stops changing while the rest of the batch continues, and
convergence is checked every few iterations so the loop syncs rarely.

Once a problem's residuals reach a loose tolerance, an active-set polish (as in OSQP)
solves the equality-constrained QP on the constraints found active. It makes the answer
exact to working precision without driving λ/s to extremes, and its factorization is the
one the implicit backward reuses. Problems whose polish fails keep iterating.

Degenerate LPs (most of Maros–Meszaros) need three safeguards: ds is taken from the
linearized complementarity on rows with s < λ (the KKT solve's rounding error there can
exceed s and jam the step); the primal form's regularization ρ = δ is per problem and falls
with μ (as in PIQP), checked for accuracy and raised again where the factorization fails or
returns garbage; and an absolute tolerance below the rounding error of a residual (a gap of
terms 1e8 in float64) is taken as met at that rounding error.
"""

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from amortized.linalg import bmv, brmv
from amortized.qp.kkt_system import KKT, dual_base, regularization
from amortized.qp.nullspace import Nullspace, nullspace
from amortized.qp.problem import QPData
from amortized.qp.scaling import Scaling, ruiz
from amortized.qp.status import QPStatus

SOLVED, MAX_ITER, INFEASIBLE, NUMERICAL, UNBOUNDED = (int(c) for c in QPStatus)


@dataclass(frozen=True)
class Iterate:
    z: Tensor
    s: Tensor
    lam: Tensor
    nu: Tensor

    def where(self, mask: Tensor, other: "Iterate") -> "Iterate":
        m = mask.unsqueeze(-1)
        return Iterate(*(torch.where(m, a, b) for a, b in zip(self.fields(), other.fields())))

    def fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.z, self.s, self.lam, self.nu


# the primal form's largest regularization, before a failed factorization means NUMERICAL
_RHO_MAX = 1e-4
# its starting ρ = δ, as a multiple of √ε
_RHO_RELAXED = 10
# the null-space reduced problem's iterations before the full one takes over: random
# well-posed QPs take 8-15, while on some badly conditioned problems of Maros–Meszaros the
# reduced one (factored without the primal form's safeguards) converges far slower or not
_REDUCED_MAX_ITER = 25
# a residual within _ROUNDING·ε of the magnitudes summed in it is zero to working precision
_ROUNDING = 10
# how far above eps a polished point may be when what is left in it is that rounding
# (float32, |z| ~ 1e3, cond Q ~ 4e3: a dual residual of 12·eps, all of it rounding)
_NEAR = 100
# the polish's refinement steps where three are not enough (a large ρ, float32)
_REFINE_MORE = 10
# the iteration budget when the caller gives none
DEFAULT_MAX_ITER = 100


def _amax(x: Tensor) -> Tensor:
    return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[:-1])


def _weights(sc: Scaling) -> tuple[Tensor, ...]:
    """w_x = 1/(cD) (B, n), w_E = 1/E (B, m + q) with its parts w_i, w_e, w_c = 1/c (B,) and
    w_z = D (B, n): the weights that take a scaled vector's entries to the original
    problem's. Computed once per `Scaling` (kept in its __dict__): every residual of the
    working set reuses them."""
    cache = vars(sc)
    if "_weights" not in cache:
        w_x, w_E, w_c = 1 / (sc.c.unsqueeze(-1) * sc.D), 1 / sc.E, 1 / sc.c
        cache["_weights"] = (w_x, w_E, w_c, w_c.unsqueeze(-1) / w_x)
    return cache["_weights"]


class Residuals:
    """Residual vectors (B, ·) at an iterate of the (scaled) problem `d`; their norms, scales
    and the duality gap (B,), measured on the original problem when a `Scaling` is given,
    are computed on first use only (at convergence checks), each ∞-norm family in one
    stacked reduction (`_primal_norms`, `_dual_norms`)."""

    def __init__(self, d: QPData, it: Iterate, sc: Scaling | None = None):
        self.d, self.it = d, it
        m = it.lam.shape[-1]
        if d.sep is None:
            self.Cz = bmv(d.C, it.z)  # one pass over [G; A] instead of two
            self.Gz, self.Az = self.Cz[..., :m], self.Cz[..., m:]
            self.Ct_y = brmv(d.C, self.y)  # Gᵀλ + Aᵀν
        else:
            self.Gz, self.Az = d.Gx(it.z), bmv(d.A, it.z)
            self.Ct_y = d.Gty(it.lam) + brmv(d.A, it.nu)
        self.Qz = d.Qx(it.z)
        self.r_d = self.Qz + d.p + self.Ct_y  # Qz + p + Gᵀλ + Aᵀν
        self.r_i = self.Gz + it.s - d.h  # Gz + s − h
        self.r_e = self.Az - d.b  # Az − b
        w = (None,) * 4 if sc is None else _weights(sc)
        self.w_x, self.w_E, self.w_c, self.w_z = w

    @property
    def w_i(self) -> Tensor | None:
        return None if self.w_E is None else self.w_E[..., : self.it.lam.shape[-1]]

    @property
    def w_e(self) -> Tensor | None:
        return None if self.w_E is None else self.w_E[..., self.it.lam.shape[-1] :]

    @cached_property
    def y(self) -> Tensor:
        """[λ; ν] (B, m + q)."""
        return torch.cat([self.it.lam, self.it.nu], -1)

    @staticmethod
    def _norm(x: Tensor, w: Tensor | None) -> Tensor:
        return _amax(x if w is None else x * w)

    @staticmethod
    def _norms(xs: list[Tensor], w: Tensor | None) -> Tensor:
        """(len(xs), B) the weighted ∞-norms of the vectors xs (B, k), in one reduction."""
        x = torch.stack(xs)
        if not x.shape[-1]:
            return x.new_zeros(x.shape[:-1])
        return (x if w is None else x * w).abs().amax(-1)

    @cached_property
    def _primal_norms(self) -> Tensor:
        """(3, B) ‖[r_i; r_e]‖, ‖Cz‖, ‖[h; b]‖ (weighted ∞-norms)."""
        Cz = self.Cz if "Cz" in vars(self) else torch.cat([self.Gz, self.Az], -1)
        return self._norms([torch.cat([self.r_i, self.r_e], -1), Cz, self.d.hb], self.w_E)

    @cached_property
    def _dual_norms(self) -> Tensor:
        """(4, B) ‖r_d‖, ‖Qz‖, ‖p‖, ‖Cᵀy‖ (weighted ∞-norms)."""
        return self._norms([self.r_d, self.Qz, self.d.p, self.Ct_y], self.w_x)

    @cached_property
    def neg_r_d(self) -> Tensor:
        """−r_d, one tensor shared by the predictor and corrector solves (so the
        factorization can reuse H⁻¹(−r_d), see KKT)."""
        return -self.r_d

    @cached_property
    def neg_r_i(self) -> Tensor:
        return -self.r_i

    @cached_property
    def neg_r_e(self) -> Tensor:
        return -self.r_e

    @property
    def primal(self) -> Tensor:
        return self._primal_norms[0]

    @property
    def dual(self) -> Tensor:
        return self._dual_norms[0]

    @cached_property
    def _raw_terms(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """zᵀQz, pᵀz, hᵀλ, bᵀν, sᵀλ of the scaled problem."""
        d, it = self.d, self.it
        zQz, pz = (it.z * torch.stack([self.Qz, d.p])).sum(-1)
        return zQz, pz, (d.h * it.lam).sum(-1), (d.b * it.nu).sum(-1), (it.s * it.lam).sum(-1)

    @cached_property
    def _gap_terms(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """zᵀQz, pᵀz, hᵀλ, bᵀν, sᵀλ of the original problem."""
        terms = torch.stack(self._raw_terms)
        return tuple(terms if self.w_c is None else terms * self.w_c)

    @cached_property
    def gap(self) -> Tensor:
        """Duality gap of the Lagrangian dual, zᵀQz + pᵀz + hᵀλ + bᵀν (= sᵀλ when feasible)."""
        zQz, pz, hl, bn, sl = self._gap_terms
        return torch.maximum((zQz + pz + hl + bn).abs(), sl)

    @cached_property
    def _worst(self) -> Tensor:
        """(3, B) primal, dual residual and gap."""
        return torch.stack([self.primal, self.dual, self.gap])

    def meets(self, eps: float, eps_abs: float | None, polished: bool = False) -> Tensor:
        """(B,) whether the relative test holds, and the absolute one when eps_abs is given.
        The absolute test asks each of primal, dual and gap to be ≤ eps_abs or within the
        rounding error of computing it, whichever is larger: a gap of terms 1e8 has no
        digits below 1e-8 in float64 (see `rounding_floor`).

        `polished` points, (B,) or all (the exact solution of an active set's equality-
        constrained QP, λ = 0 off it, its refinement at its noise floor) have no
        complementarity left to converge: what remains in them is rounding. There the
        relative test also passes, within _NEAR·eps, where each of primal, dual and gap is
        within `rounding_floor(inherited=True)`: in float32 a problem with |z| ~ 100 has no
        digits below 3e-6 relative in its gap, and the iterations would chase them to
        max_iter."""
        rel = self.relative
        ok = rel <= eps
        if polished is not False:
            near = ~ok & (rel <= _NEAR * eps) & polished
            if bool(near.any()):  # rare: only then pay for the floor
                floor = self.rounding_floor(inherited=True)
                within = ((self._worst <= eps * (1 + self._scale)) | (self._worst <= floor)).all(0)
                ok = ok | (near & within)
        if eps_abs is not None:
            worst = self._worst
            above = ok & (worst > eps_abs).any(0)
            if bool(above.any()):  # rare: only then pay for the floor
                worst = torch.where(worst <= eps_abs, 0.0, worst / self.rounding_floor())
                eps_abs = torch.where(above, 1.0, eps_abs)
            ok = ok & (worst.amax(0) <= eps_abs)
        return ok

    def rounding_floor(self, inherited: bool = False) -> Tensor:
        """(3, B) what rounding alone can leave in the primal residual, dual residual and gap
        of the original problem: _ROUNDING·ε times the magnitudes summed in each, e.g.
        ‖|Q||z| + |p| + |C|ᵀ|y|‖∞ for the dual residual (temporary |·| copies). With
        `inherited`, the gap's also counts the rounding of the residuals it is made of: it
        equals zᵀr_d − yᵀ(Cz − [h; b]) + sᵀλ, whose first two terms carry
        |z|ᵀ(|Q||z| + |p| + |C|ᵀ|y|) + |y|ᵀ(|C||z| + |[h; b]|)."""
        d, it, N = self.d, self.it, self._norm
        z_abs, y_abs = it.z.abs(), self.y.abs()
        C_abs = d.C.abs()
        primal = bmv(C_abs, z_abs) + d.hb.abs()
        dual = bmv(d.Q.abs(), z_abs) + d.p.abs() + brmv(C_abs, y_abs)
        gap = torch.stack([x.abs() for x in self._gap_terms[:4]]).sum(0)
        if inherited:
            gap_r = (z_abs * dual).sum(-1) + (y_abs * primal).sum(-1)
            gap = torch.maximum(gap, gap_r if self.w_c is None else gap_r * self.w_c)
        floor = torch.stack([N(primal, self.w_E), N(dual, self.w_x), gap])
        return _ROUNDING * torch.finfo(gap.dtype).eps * floor

    @cached_property
    def _scale(self) -> Tensor:
        """(3, B) the scales of primal, dual and gap: the largest of ‖Cz‖, ‖[h; b]‖; of ‖Qz‖,
        ‖p‖, ‖Cᵀy‖; and of the gap's terms."""
        return torch.stack(
            [
                self._primal_norms[1:].amax(0),
                self._dual_norms[1:].amax(0),
                torch.stack(self._gap_terms[:4]).abs().amax(0),
            ]
        )

    @cached_property
    def relative(self) -> Tensor:
        """(B,) the largest of primal, dual and gap relative to their scales."""
        return (self._worst / (1 + self._scale)).amax(0)


def newton(
    kkt: KKT, it: Iterate, res: Residuals, r_c: Tensor, refine: int, low: Tensor | None = None
) -> Iterate:
    """Newton direction with λ∘ds + s∘dλ = −r_c and the primal/dual residuals of `res`:
    G dz − (s/λ)∘dλ = r_c/λ − r_i, then ds = −r_i − G dz. `low` (B, m): the rows s < λ
    (given when the caller shares it between the predictor and the corrector)."""
    s, lam = it.s, it.lam
    dz, dlam, dnu = kkt.solve(res.neg_r_d, r_c / lam - res.r_i, res.neg_r_e, refine)
    # on rows with s < λ the KKT solve's rounding error (relative to |r_c/λ − r_i|) can
    # exceed s itself and block the step: take ds from the linearized complementarity
    # −(r_c + s∘dλ)/λ instead, which moves that error into the primal residual
    low = s < lam if low is None else low
    ds = torch.where(low, (s * dlam).add_(r_c).div_(lam).neg_(), res.neg_r_i - kkt.Gx(dz))
    return Iterate(dz, ds, dlam, dnu)


def _max_step(x: Tensor, dx: Tensor) -> Tensor:
    """(B, m) the largest α_i with x + α_i dx ≥ 0, row by row, or a value ≥ 1 (the caller
    clamps at 1): x/(−dx) where dx < 0, elsewhere x/tiny ≥ 1 since the iterates keep
    x ≥ √tiny (one division where a `where` would cost two more ops)."""
    tiny = torch.finfo(x.dtype).tiny
    return x / dx.neg().clamp_(min=tiny)


def _step_length(it: Iterate, step: Iterate) -> Tensor:
    """(B,) largest α ≤ 1 with s + α ds ≥ 0 and λ + α dλ ≥ 0."""
    return torch.minimum(_max_step(it.s, step.s), _max_step(it.lam, step.lam)).amin(-1).clamp_(max=1.0)


def _initial_point(d: QPData, kkt_args: dict, warm_start: Tensor | None) -> Iterate:
    """Mehrotra's starting point: the least-squares solve with s = λ = 1 (D = 1), then slacks
    and duals shifted into the interior."""
    B, n, m, q = d.shape
    kkt = KKT(d, d.p.new_ones(B, m), **kkt_args)
    # refined only without inequalities, where this is the solution; otherwise the start is
    # shifted anyway and need not be accurate
    z, _, nu = kkt.solve(-d.p, d.h, d.b, refine=0 if m else 1)
    if warm_start is not None:
        z = warm_start.expand(B, n).to(d.p)
    if m == 0:
        return Iterate(z, d.p.new_zeros(B, 0), d.p.new_zeros(B, 0), nu)
    s = d.h - d.Gx(z)
    lam = -s
    s = s + torch.clamp(-1.5 * s.amin(-1, keepdim=True), min=0)
    lam = lam + torch.clamp(-1.5 * lam.amin(-1, keepdim=True), min=0)
    sl = (s * lam).sum(-1, keepdim=True)
    s, lam = s + 0.5 * sl / lam.sum(-1, keepdim=True), lam + 0.5 * sl / s.sum(-1, keepdim=True)
    # degenerate starts (s or λ identically zero) fall back to the unit point
    good = ((s > 0).all(-1) & (lam > 0).all(-1) & torch.isfinite(s + lam).all(-1)).unsqueeze(-1)
    # at least √tiny, as every later iterate (`_max_step` needs s, λ ≥ tiny)
    floor = torch.finfo(s.dtype).tiny ** 0.5
    return Iterate(
        z, torch.where(good, s, 1.0).clamp_(min=floor), torch.where(good, lam, 1.0).clamp_(min=floor), nu
    )


@dataclass
class PDIPMResult:
    """The solver's answer in the original problem's terms (it; res measures the original
    residuals through the scaling), and what the implicit backward needs to factor the KKT
    system at the solution, in the scaled problem's terms: the scaled data `d`, its
    compliance D (B, m) (s/λ, or 0/∞ on a polished active set) and the `scaling`; G is the
    original inequality matrix."""

    it: Iterate
    res: Residuals
    status: Tensor
    iters: Tensor
    D: Tensor
    d: QPData
    G: Tensor
    scaling: Scaling
    kkt_args: dict

    @property
    def relaxed(self) -> bool:
        """Whether the KKT factor is the dense primal form for singular Q (`_relaxed`)."""
        return _relaxed(self.kkt_args)

    @cached_property
    def kkt(self) -> KKT:
        """The KKT system at the solution, for the implicit backward: factored on first use,
        so a forward pass without gradients never pays for it."""
        return KKT(self.d, self.D, active_set=True, **self.kkt_args)


def pdipm(
    d: QPData,
    active: Tensor,
    *,
    eps: float,
    max_iter: int,
    eps_abs: float | None = None,
    check_every: int = 2,
    warm_start: Tensor | None = None,
    polish: bool = True,
    scale: bool = True,
    reduce: bool = True,
) -> PDIPMResult:
    """Solve the problems where `active` (B,) is True; the others are reported NUMERICAL.
    The iterations run on the Ruiz-scaled problem (`scale`); every test below is made on
    the original one. In float64, many equality rows (n − q ≤ m, `reduce`) are eliminated
    first where that is safe for the whole batch (`_reduced`).

    SOLVED: primal, dual residual and gap all ≤ eps relative to their scales, or within
    _ROUNDING·ε of the magnitudes summed in them for a polished point within _NEAR·eps (and
    ≤ eps_abs when given, or within that rounding where it is larger; see `Residuals.meets`).
    INFEASIBLE: λ ≥ 0 with ‖Gᵀλ + Aᵀν‖∞ ≤ eps_inf·(−hᵀλ − bᵀν); by Farkas every feasible
    point then has ‖z‖₁ ≥ 1/eps_inf, so the flag is not raised on a sensibly scaled feasible
    problem.
    UNBOUNDED: the iterate runs off along a ray: x = z/‖z‖∞ has ‖Qx‖∞, ‖Ax‖∞, max(Gx)₊ all
    ≤ eps_inf·(−pᵀx), with ‖z‖∞ ≥ 1/eps_inf·(1 + ‖h‖∞ + ‖b‖∞) (a solution that large is
    the only way a bounded problem could pass).
    """
    kwargs = dict(eps=eps, max_iter=max_iter, eps_abs=eps_abs, check_every=check_every)
    kwargs.update(polish=polish, scale=scale)
    orig, orig_G = d, d.G
    d, sc = scaled(d, scale)
    B, n, m, q = d.shape
    dtype = d.p.dtype
    if reduce and d.sep is None and dtype == torch.float64 and q and 0 < n - q <= m:
        ns = nullspace(d, active, regularization(dtype))
        if ns is not None:
            return _reduced(orig, d, sc, ns, active, warm_start, **kwargs)
    # the caller's data go once scaled (solve_qp hands over its only reference: a large
    # symmetrized copy of Q is freed here)
    del orig
    finfo = torch.finfo(dtype)
    kkt_args = kkt_form(d)
    # the iterations' ρ = δ (in the dense primal form the factorizations of an active set
    # may keep a smaller ρ, problem by problem: `kkt_form`)
    rho = kkt_args["delta"]
    # the primal form's proximal term ρ(z − z_k) caps each step at about |r_d|/ρ along
    # directions where Q + GᵀWG is singular (LPs whose iterates must travel far along a
    # nearly free face): its ρ (per problem) falls with μ down to the dual form's value
    rho_min = regularization(dtype)
    eps_inf = max(1e-6, finfo.eps**0.5)
    # the polish takes over from a loose tolerance: the interior point method need not
    # push λ/s to the extremes where its systems lose accuracy
    eps_polish = max(eps, finfo.eps ** (1 / 3 if dtype == torch.float64 else 1 / 4)) if polish and m else eps
    floor = finfo.tiny**0.5

    status = torch.where(active, MAX_ITER, NUMERICAL)
    iters = torch.zeros(B, dtype=torch.long, device=d.p.device)
    it = _initial_point(d, kkt_args, None if warm_start is None else warm_start / sc.D)
    # polished problems keep their active set: the backward factors it (0 active, ∞ dropped)
    polish_D = it.s / it.lam
    polished = torch.zeros_like(active)
    tried = torch.full((B,), torch.inf, dtype=dtype, device=d.p.device)
    # the loop works on the problems still running, compacted as they finish
    idx = torch.arange(B, device=d.p.device)
    # only the dense primal form for singular Q relaxes its ρ (the others' is already small)
    relaxed = _relaxed(kkt_args)
    # Newton directions need not be exact (convergence is judged on true residuals, and the
    # polish refines its own solves), except in float32's dense primal form, whose large
    # ρ, δ and squared conditioning fail more problems without a refinement step
    refine = 1 if relaxed and dtype != torch.float64 else 0
    w_rho = torch.full((B,), rho, dtype=dtype, device=d.p.device) if relaxed else None
    w = _Work(d, sc, kkt_args, it, active.clone(), status, iters, tried, w_rho)

    for k in range(max_iter + 1):
        res = Residuals(w.d, w.it, w.sc)
        if k % check_every == 0 or k == max_iter:
            rel = res.relative
            if eps_polish > eps:
                # retry a failed polish only after a tenfold progress
                fresh = w.running & (rel <= 0.1 * w.tried)
                ready = fresh & (rel <= eps_polish)
                # each polish is a factorization and some 150 small ops: wait for half the
                # running problems, unless a ready one has waited a check (it is then 100×
                # past eps_polish: Mehrotra converges superlinearly)
                n_ready, n_run = int(ready.sum()), int(w.running.sum())
                if n_ready and (2 * n_ready >= n_run or bool((rel[ready] <= 0.01 * eps_polish).any())):
                    # then try every problem within 100·eps_polish too: the polish checks its
                    # answers, and those close to it are mostly right, which spares them the
                    # iterations and the later polish calls that would otherwise wait for them
                    ready = fresh & (rel <= 100 * eps_polish)
                    if 8 * int((fresh & ~ready).sum()) <= B:
                        # and the rest when they are few (as below): their active sets are
                        # usually found long before their residuals are small
                        ready = fresh
                elif 8 * n_run <= B and bool(fresh.any()):
                    # when few are left (an eighth of the batch), each check tries them all:
                    # their factorization is cheap, while each of their iterations costs the
                    # whole batch's op overhead
                    ready = fresh
                else:
                    ready = None
                if ready is not None:
                    w.tried = torch.where(ready, rel, w.tried)
                    w.it, D_act, done = _polish(w.d, w.sc, w.it, ready, eps, eps_abs, w.kkt_args)
                    polish_D[idx[done]] = D_act[done]
                    polished[idx[done]] = True
                    w.status = torch.where(done, SOLVED, w.status)
                    w.running = w.running & ~done
                    res = Residuals(w.d, w.it, w.sc)
                    rel = res.relative
            converged = res.meets(eps, eps_abs)
            stop = converged | _infeasible(res, eps_inf, floor)
            code = torch.where(converged, SOLVED, INFEASIBLE)
            unbounded = _unbounded(res, eps_inf)
            if unbounded is not None:
                code = torch.where(stop, code, UNBOUNDED)
                stop = stop | unbounded
            stop = w.running & stop
            w.status = torch.where(stop, code, w.status)
            w.running = w.running & ~stop
            n_run = int(w.running.sum())
            if k == max_iter or n_run == 0:
                break
            if n_run <= len(idx) // 2:
                it, status, iters = w.flush(idx, it, status, iters)
                keep = w.running.nonzero().squeeze(-1)
                idx, w = idx[keep], w.index(keep)
                res = Residuals(w.d, w.it, w.sc)
        if w.rho is None:
            kkt = KKT(w.d, w.it.s / w.it.lam, **w.kkt_args)
            ok = kkt.ok
        else:
            kkt, ok = _factor_primal(w, res, rho)
        all_ok = bool(ok.all())  # the usual case: one sync spares the masking below
        run = w.running if all_ok else w.running & ok
        w.iters = w.iters + run
        mu = None if w.rho is None else _mu(w.it)
        w.it, finite = _mehrotra_step(kkt, w.it, res, run, refine, floor)
        del kkt  # its factor goes before the next one (or the polish's) is formed
        if not all_ok or finite is not None:
            # a failed factorization or a non-finite step: NUMERICAL
            failed = w.running & ~(ok if finite is None else ok & finite)
            w.status = torch.where(failed, NUMERICAL, w.status)
            w.running = w.running & ~failed
        if w.rho is not None:
            w.rho = _relax_regularization(w.rho, mu, _mu(w.it), rho_min)
    it, status, iters = w.flush(idx, it, status, iters)
    D = torch.where(polished.unsqueeze(-1), polish_D, it.s / it.lam)
    # the residuals of the original problem, measured through the scaling weights (no
    # second copy of the data in memory)
    res = Residuals(d, it, sc)
    return PDIPMResult(Iterate(*sc.unscale(*it.fields())), res, status, iters, D, d, orig_G, sc, kkt_args)


def _reduced(
    orig: QPData, d: QPData, sc: Scaling, ns: Nullspace, active: Tensor, warm_start: Tensor | None, **kwargs
) -> PDIPMResult:
    """`pdipm` on the null-space reduced problem of the scaled data d (`nullspace`): its
    iterations, polish and factorizations have n − q unknowns and no equality rows, and its
    answer lifts to (z, ν) exactly (`Nullspace.lift`). Problems whose lifted answer fails the
    tests on the original problem `orig`, that the reduced problem reports NUMERICAL,
    INFEASIBLE or UNBOUNDED (the certificates are the full problem's), or that it has not
    solved in _REDUCED_MAX_ITER iterations, are solved again without the reduction (and
    report that solve's iterations); MAX_ITER stands when max_iter is smaller. The backward
    factors the full KKT system by the same elimination."""
    B, n, m, q = d.shape
    w0 = None if warm_start is None else brmv(ns.U, (warm_start / sc.D).expand(B, n))[..., q:]
    cap = min(kwargs["max_iter"], _REDUCED_MAX_ITER)
    r = pdipm(ns.d, active, warm_start=w0, reduce=False, **dict(kwargs, max_iter=cap, scale=False))
    z, nu = ns.lift(r.it.z, r.it.lam)
    it = Iterate(z, r.it.s, r.it.lam, nu)
    res = Residuals(d, it, sc)
    status, iters, D = r.status, r.iters, r.D
    failed = (status == SOLVED) & ~res.meets(kwargs["eps"], kwargs["eps_abs"])
    stopped = (status == MAX_ITER) & (cap < kwargs["max_iter"])
    no_answer = (status == NUMERICAL) | (status == INFEASIBLE) | (status == UNBOUNDED)
    retry = active & (failed | stopped | no_answer)
    if bool(retry.any()):
        idx = retry.nonzero().squeeze(-1)
        ws = None if warm_start is None else warm_start.expand(B, n)[idx]
        f = pdipm(orig.index(idx), active[idx], warm_start=ws, reduce=False, **kwargs)
        it, status, D = _take_over(f, idx, sc, it, status, D)
        iters = iters.index_copy(0, idx, f.iters)
        res = Residuals(d, it, sc)
    rho = regularization(d.p.dtype)
    kkt_args = {"rho": rho, "delta": rho, "base": None, "nullspace": ns, "grow_delta": True}
    return PDIPMResult(Iterate(*sc.unscale(*it.fields())), res, status, iters, D, d, orig.G, sc, kkt_args)


def _take_over(
    f: PDIPMResult, idx: Tensor, sc: Scaling, it: Iterate, status: Tensor, D: Tensor
) -> tuple[Iterate, Tensor, Tensor]:
    """A batch's scaled iterate, statuses and compliance D with the problems idx replaced by
    f, what `pdipm` answered for them alone: its iterate taken into the batch's scaling sc,
    and its compliance too, unless 0 or ∞ (a polished active set)."""
    it_f = Iterate(*sc.index(idx).scale(*f.it.fields()))
    it = Iterate(*(x.index_copy(0, idx, y) for x, y in zip(it.fields(), it_f.fields())))
    D_f = torch.where((f.D == 0) | torch.isinf(f.D), f.D, it_f.s / it_f.lam)
    return it, status.index_copy(0, idx, f.status), D.index_copy(0, idx, D_f)


def scaled(d: QPData, scale: bool = True) -> tuple[QPData, Scaling]:
    """The data the iterations run on: Ruiz-scaled (or not), with their separable structure
    detected, and the scaling."""
    d, sc = ruiz(d) if scale else (d, _no_scaling(d))
    return d.separated(), sc


def kkt_form(d: QPData) -> dict:
    """The keyword arguments of `KKT` for these data: which factorization, and its ρ, δ.
    A diagonal H (bounds, z ≥ 0 with diagonal Q) is the cheapest form of all. In float64,
    an inequality-only problem with fewer unknowns than rows (n < m, as the null-space
    reduced problems of `_reduced` mostly are) and a positive definite Q factors
    H = Q + GᵀWG, the smaller system. Otherwise the dual elimination is better conditioned,
    and in float64 the primal one (`_relaxed`) is cheaper for m + q ≫ n."""
    B, n, m, q = d.shape
    rho = delta = regularization(d.p.dtype)
    args = {"rho": rho, "delta": delta, "base": None, "nullspace": None, "grow_delta": True}
    if d.sep is not None:
        return args
    f64 = d.p.dtype == torch.float64
    if f64 and not q and n < m:
        if d.factor_Q(rho) is not None:
            return args
    elif m + q <= 2 * n or not f64:
        base = dual_base(d, rho, delta)
        if base is not None:
            return dict(args, base=base)
    # the primal form (singular Q, LPs) keeps near-active rows in a Schur complement
    # C (Q + GᵀWG + ρI)⁻¹ Cᵀ that squares the conditioning: ρ, δ must not be tiny; as a
    # proximal term ρ(z − z_k) they slow the steps but do not move the solution
    relaxed = _RHO_RELAXED * torch.finfo(d.p.dtype).eps ** 0.5
    # the factorizations of an active set (the polish, the backward) refine ρ(z − z_k) away
    # at a rate ρ/(ρ + λ_min(Q)): where Q is comfortably positive definite they keep the
    # dual form's ρ (a problem with cond Q ~ 2e3 in a batch that needs this form was left
    # 13% off in its float32 gradients by ten steps at 10√ε); the iterations start at δ
    comfortable = d.comfortable(rho)
    if bool(comfortable.any()):
        rho = torch.where(comfortable, rho, relaxed).unsqueeze(-1)
    else:
        rho = relaxed
    return dict(args, rho=rho, delta=relaxed, grow_delta=False)


def _relaxed(kkt_args: dict) -> bool:
    """Whether these are the dense primal form's arguments for Q that may be singular, whose
    ρ = δ the iterations relax with μ (see `kkt_form`): the only ones that leave a failed
    factorization to their callers (`grow_delta` off)."""
    return not kkt_args["grow_delta"]


def _index_args(kkt_args: dict, idx: Tensor) -> dict:
    """The KKT arguments of the problems idx."""
    base, ns, rho = kkt_args["base"], kkt_args["nullspace"], kkt_args["rho"]
    rho = rho[idx] if isinstance(rho, Tensor) else rho
    return dict(kkt_args, base=base and base.index(idx), nullspace=ns and ns.index(idx), rho=rho)


def _no_scaling(d: QPData) -> Scaling:
    B, n, m, q = d.shape
    return Scaling(d.p.new_ones(B, n), d.p.new_ones(B, m + q), d.p.new_ones(B))


def _infeasible(res: Residuals, eps_inf: float, floor: float) -> Tensor:
    """(B,) whether (λ, ν) is a Farkas certificate of primal infeasibility (see `pdipm`).
    Both sides are measured on the original problem: its certificate is (E_G λ̃, E_A ν̃).
    hᵀλ + bᵀν must also be negative beyond its rounding error (√ε·‖y‖∞·‖(h, b)‖∞): when λ
    diverges on a feasible problem, that sum can be a cancellation of huge terms."""
    it = res.it
    _, _, hl, bn, _ = res._raw_terms
    farkas = hl + bn
    cert = torch.maximum(res._dual_norms[3], floor * it.lam.sum(-1))  # ‖Gᵀλ + Aᵀν‖
    if res.w_c is None:
        y_size = _amax(res.y)
    else:
        cert = cert / res.w_c  # the certificate carries no 1/c
        y_size = _amax(res.y / res.w_E)
    rounding = torch.finfo(farkas.dtype).eps ** 0.5 * y_size * res._primal_norms[2]  # ‖(h, b)‖
    return (farkas < -rounding) & (cert <= eps_inf * -farkas)


def _unbounded(res: Residuals, eps_inf: float) -> Tensor | None:
    """(B,) whether the iterate z runs off along a ray of recession (see `pdipm`); None
    when no iterate is large enough to be checked (the usual case)."""
    d, it, N = res.d, res.it, Residuals._norm
    # original z = D z̃; with x = z̃ the products below map to the original ones by weights
    size = N(it.z, res.w_z)
    big = size * eps_inf >= 1 + res._primal_norms[2]  # 1 + ‖(h, b)‖
    if not bool(big.any()):  # skip the rest (a sync beats ~15 small ops)
        return None
    x_scale = 1 / size.clamp(min=torch.finfo(size.dtype).tiny).unsqueeze(-1)
    Gx = res.Gz * x_scale
    Gx = (Gx if res.w_i is None else Gx * res.w_i).clamp(min=0)
    cert = torch.stack([N(res.Qz * x_scale, res.w_x), N(res.Az * x_scale, res.w_e), _amax(Gx)]).amax(0)
    px = (d.p * it.z).sum(-1) * x_scale.squeeze(-1)
    if res.w_c is not None:
        px = px * res.w_c
    return big & (px < 0) & (cert <= eps_inf * -px)


@dataclass
class _Work:
    """The working set of the loop: the running problems' data and state."""

    d: QPData
    sc: Scaling
    kkt_args: dict
    it: Iterate
    running: Tensor
    status: Tensor
    iters: Tensor
    tried: Tensor
    rho: Tensor | None = None  # (B,) the primal form's regularization of the iterations

    def index(self, keep: Tensor) -> "_Work":
        args = _index_args(self.kkt_args, keep)
        it = Iterate(*(x[keep] for x in self.it.fields()))
        return _Work(
            self.d.index(keep),
            self.sc.index(keep),
            args,
            it,
            self.running[keep],
            self.status[keep],
            self.iters[keep],
            self.tried[keep],
            None if self.rho is None else self.rho[keep],
        )

    def flush(self, idx: Tensor, it: Iterate, status: Tensor, iters: Tensor):
        """Write the working set back into the full-batch iterate, status and counts."""
        it = Iterate(*(x.index_copy(0, idx, y) for x, y in zip(it.fields(), self.it.fields())))
        return it, status.index_copy(0, idx, self.status), iters.index_copy(0, idx, self.iters)


def _mu(it: Iterate) -> Tensor:
    """(B,) the mean complementarity sᵀλ/m (0 without inequalities)."""
    return (it.s * it.lam).mean(-1) if it.s.shape[-1] else it.z.new_zeros(it.z.shape[0])


def _relax_regularization(rho: Tensor, mu_old: Tensor, mu_new: Tensor, rho_min: float) -> Tensor:
    """ρ (B,) shrunk by the step's progress in μ, as in PIQP, down to rho_min."""
    ratio = torch.where(mu_old > 0, mu_new / mu_old.clamp(min=torch.finfo(mu_old.dtype).tiny), 1.0)
    return (rho * ratio.clamp(max=1.0)).clamp(min=rho_min)


def _factor_primal(w: "_Work", res: Residuals, rho0: float) -> tuple[KKT, Tensor]:
    """The primal form's KKT system at the iterate with the problems' own ρ = δ (B,), and
    (B,) whether it can be used: factored and, at a ρ relaxed below rho0, accurate. Where
    not, ρ grows 100-fold (up to rho0 from below; beyond it, where even rho0 does not
    factor, up to _RHO_MAX: a proximal term slows the steps but does not move the solution)
    and the system is factored again."""
    while True:
        rho = w.rho.unsqueeze(-1)
        kkt = KKT(w.d, w.it.s / w.it.lam, active_set=True, **dict(w.kkt_args, rho=rho, delta=rho))
        ok = kkt.ok & ((w.rho >= rho0) | _accurate(kkt, w.it, res, w.rho))
        retry = w.running & ~ok & (w.rho < _RHO_MAX)
        if not bool(retry.any()):
            return kkt, ok
        cap = torch.where(w.rho < rho0, rho0, _RHO_MAX)
        w.rho = torch.where(retry, torch.minimum(100 * w.rho, cap), w.rho)


def _accurate(kkt: KKT, it: Iterate, res: Residuals, rho: Tensor) -> Tensor:
    """(B,) whether the factorization solves the predictor's system up to its regularization
    (ρ = δ (B,) times the solution) and √ε of its sizes: with ρ, δ relaxed too far the
    primal form's Schur complement can factor and still return garbage (directions of 1e20
    on LPs of Maros–Meszaros)."""
    rhs = (res.neg_r_d, it.s - res.r_i, -res.r_e)
    sol = kkt.solve(*rhs, refine=0)
    err = torch.stack([_amax(a - r) for a, r in zip(kkt.apply(*sol), rhs)]).amax(0)
    size = torch.stack([_amax(x) for x in (*rhs, *sol)]).amax(0)
    return err <= torch.finfo(err.dtype).eps ** 0.5 * size + 2 * rho * size


def _mehrotra_step(
    kkt: KKT, it: Iterate, res: Residuals, running: Tensor, refine: int, floor: float
) -> tuple[Iterate, Tensor | None]:
    """One predictor-corrector step of the running problems (the others do not move).
    Also returns which steps were finite (B,), or None when all were; a problem with a
    non-finite step does not move."""
    if it.s.shape[-1]:
        s, lam = it.s, it.lam
        sl, low = s * lam, s < lam
        aff = newton(kkt, it, res, sl, refine, low)
        mu = sl.mean(-1, keepdim=True)
        a_aff = _step_length(it, aff).unsqueeze(-1)
        mu_aff = ((s + a_aff * aff.s) * (lam + a_aff * aff.lam)).mean(-1, keepdim=True)
        sigma = (mu_aff / mu).clamp(max=1.0) ** 3
        step = newton(kkt, it, res, sl + aff.s * aff.lam - sigma * mu, refine, low)
        alpha = 0.99 * _step_length(it, step)
    else:
        step = newton(kkt, it, res, it.s * it.lam, refine)
        alpha = it.z.new_ones(it.z.shape[0])
    finite = torch.isfinite(torch.cat(step.fields(), -1).sum(-1) + alpha)
    if bool(finite.all()):
        a = (alpha * running).unsqueeze(-1)  # α, or 0 where the problem does not move
        finite = None
    else:
        move = running & finite
        a = torch.where(move, alpha, 0.0).unsqueeze(-1)
        step = Iterate(*(torch.where(move.unsqueeze(-1), x, 0.0) for x in step.fields()))
    new = Iterate(
        it.z + a * step.z,
        (it.s + a * step.s).clamp_(min=floor),
        (it.lam + a * step.lam).clamp_(min=floor),
        it.nu + a * step.nu,
    )
    return new, finite


def _polish(
    d: QPData, sc: Scaling, it: Iterate, ready: Tensor, eps: float, eps_abs: float | None, kkt_args: dict
) -> tuple[Iterate, Tensor, Tensor]:
    """Active-set polish of the `ready` problems: solve the QP with the constraints
    {λ > s} as equalities and the others dropped, correcting the guess while it is
    inconsistent. A problem is done when the polished point meets eps; its point then
    replaces the interior point one. Only the ready problems are factored, and a corrected
    guess refactors only the problems whose guess was wrong (all, when they are many).
    Returns the iterate, the compliance D of the active set (0 active, ∞ dropped) and the
    done mask."""
    # the dense primal form's ρ, δ are not tiny (see pdipm): more refinement steps remove them
    n_refine = _REFINE_MORE if _relaxed(kkt_args) else 3
    # in float32 the guess holds rows that are not active more often (at μ ≈ 3e-6 a row with
    # slack 6e-4 still has λ > s), and a guess with more active rows than unknowns has no
    # unique multipliers (the factor's δ ≈ 3e-5 spreads them): several come out negative,
    # and dropping them all at once drops active rows too and cycles; with float64's
    # δ ≈ 1e-10 dropping them all polished degenerate LPs (Maros–Meszaros) more accurately
    one_drop = d.p.dtype != torch.float64
    idx = ready.nonzero().squeeze(-1)
    hard = it.lam[idx] > it.s[idx]
    z, lam, nu = it.z[idx], torch.zeros_like(hard, dtype=it.s.dtype), it.nu[idx]
    factored = torch.zeros_like(idx, dtype=torch.bool)
    exact = torch.zeros_like(factored)  # refined to the noise floor
    eps_m = 10 * torch.finfo(d.p.dtype).eps
    d_r, args_r = _subset(d, kkt_args, idx)
    todo = torch.arange(len(idx), device=idx.device)  # positions in idx still to (re)solve
    for _ in range(3):
        sub, args = _subset(d_r, args_r, todo)
        z_t, lam_t, nu_t, solved, exact[todo] = _active_set_solve(sub, args, hard[todo], n_refine)
        Gz = sub.Gx(z_t)
        # an active set is right when its multipliers are ≥ 0 and the dropped rows hold,
        # to rounding: near-degenerate rows (s, λ both small) are often guessed wrong
        lam_tol = eps_m * (1 + _amax(lam_t)).unsqueeze(-1)
        row_tol = eps_m * (1 + sub.h.abs() + Gz.abs())
        drop = hard[todo] & (lam_t < -lam_tol)
        if one_drop:
            # only the most negative multiplier goes, as in an active-set method
            drop = drop & (lam_t <= lam_t.amin(-1, keepdim=True))
        add = ~hard[todo] & (Gz - sub.h > row_tol)
        wrong = (drop | add).any(-1)
        z[todo], lam[todo], nu[todo] = z_t, lam_t, nu_t
        factored[todo] = solved & ~wrong
        if not bool(wrong.any()):
            break
        hard[todo] = torch.where(wrong.unsqueeze(-1), (hard[todo] | add) & ~drop, hard[todo])
        todo = todo[wrong]
        if 4 * len(todo) > len(idx):
            # a large share wrong: solving them all again (the others' answers do not change)
            # costs less memory than copying their data and factors
            todo = torch.arange(len(idx), device=idx.device)

    def candidate() -> tuple[Iterate, Tensor]:
        cand = Iterate(z, (d_r.h - d_r.Gx(z)).clamp(min=0), torch.where(hard, lam, 0.0).clamp(min=0), nu)
        return cand, factored & Residuals(d_r, cand, sc.index(idx)).meets(eps, eps_abs, polished=exact)

    cand, ok = candidate()
    if n_refine < _REFINE_MORE and d.p.dtype != torch.float64:
        # a right active set whose answer misses eps: in float32, three refinement steps can
        # stop short on an ill-conditioned system (|z| ~ 400, cond Q ~ 3e3); more, for those
        again = (factored & ~ok).nonzero().squeeze(-1)
        if len(again):
            sub, args = _subset(d_r, args_r, again)
            z[again], lam[again], nu[again], factored[again], exact[again] = _active_set_solve(
                sub, args, hard[again], _REFINE_MORE
            )
            cand, ok = candidate()
    done = torch.zeros_like(ready).index_fill(0, idx[ok], True)
    full = Iterate(*(x.index_copy(0, idx, c) for x, c in zip(it.fields(), cand.fields())))
    D_act = torch.zeros_like(it.s[idx]).masked_fill(~hard, torch.inf)
    D = torch.full_like(it.s, torch.inf).index_copy(0, idx, D_act)
    return full.where(done, it), D, done


def _active_set_solve(
    d: QPData, kkt_args: dict, hard: Tensor, refine: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """z (B, n), λ (B, m), ν (B, q) of the QPs d with the rows `hard` (B, m) as equalities
    and the others dropped, the factorization's ok flags (B,), and (B,) whether the
    refinement reached its noise floor (the answer is then exact to rounding)."""
    D = torch.zeros_like(hard, dtype=d.p.dtype).masked_fill(~hard, torch.inf)
    kkt = KKT(d, D, active_set=True, **kkt_args)  # D: 0 equality, ∞ dropped
    # ρ(z − z_k) in the factor is a proximal term; refinement removes it (handles singular Q)
    # in float64 residuals: a float32 polish would otherwise stop at cond·ε₃₂ (ill-
    # conditioned Q, large z), fail its check, and leave the problem to the iterations
    z, lam, nu, exact = kkt.solve(-d.p, d.h, d.b, refine=refine, until_noise=True, wide=True, converged=True)
    return z, lam, nu, kkt.ok, exact


def _subset(d: QPData, kkt_args: dict, idx: Tensor) -> tuple[QPData, dict]:
    """The data and KKT arguments of the problems idx (increasing); no copy when that is
    the whole batch, which keeps the polish of a large batch from doubling the memory."""
    if len(idx) == d.shape[0]:
        return d, kkt_args
    return d.index(idx), _index_args(kkt_args, idx)
