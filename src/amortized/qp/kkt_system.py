"""The one linear system of the QP solver, its polish and its implicit backward:

    Q x + Gᵀ y_i + Aᵀ y_e = r1
    G x − D ∘ y_i         = r_i
    A x                   = r_e

with a compliance D (B, m) ≥ 0 per inequality row: D = s/λ inside the interior point
method, D = 0 for a row held as an equality (the active set of the polish), D = ∞ for a row
left out. Four factorizations, chosen per batch:

* "primal": eliminate the rows with 0 < D < ∞ into H = Q + Gᵀ D⁻¹ G (Cholesky of n × n),
  the rest by a Schur complement. Works for singular Q (LPs); its conditioning grows with
  λ/s.
* "separable": when Q is diagonal and each row of G has one nonzero (bounds, z ≥ 0),
  every inequality row is eliminated per variable, exactly even at D = 0, and only the
  q × q Schur complement on the rows of A is factored (OptNet's Sudoku layer).
* "dual": eliminate x with H = Q + ρI, factored once per solve together with
  M = C H⁻¹ Cᵀ (C = [G; A]) and its equality rows (M_AA + δI, which never change);
  each iteration only factors the m × m rest, plus diag(D).
  Well conditioned at any λ/s, which float32 needs (qpth's elimination); needs Q
  comfortably positive definite.
* "nullspace": the equality rows eliminated by a basis of A's null space (`Nullspace`),
  the rest by the primal form of the reduced system (n − q unknowns, no equality rows):
  the backward of problems that the interior point method solved in that reduced space.

All regularize (ρ on x, δ on equality rows) so that singular Q and rank-deficient A
factor, and `solve` refines against the exact system.
"""

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from amortized.linalg import (
    FixedRows,
    SaddleFactor,
    bmv,
    brmv,
    cholesky,
    cholesky_solve,
    col_major,
    factor_saddle,
    fix_rows,
)
from amortized.qp.nullspace import Nullspace
from amortized.qp.problem import QPData


def regularization(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps ** 0.5 * (1e-2 if dtype == torch.float64 else 1e-1)


@dataclass(frozen=True)
class DualBase:
    """What the dual elimination reuses across iterations: L_H = chol(Q + ρI) (B, n, n),
    HinvCt = H⁻¹Cᵀ (B, n, m+q), the equality rows of C H⁻¹ Cᵀ + diag(D, δ), which do not
    change, eliminated once (`fixed`, None without equality rows), and M (B, m, m)
    column-major, the inequality rows' complement that each iteration adds D to; M_max (B,)
    the largest diagonal entry of C H⁻¹ Cᵀ, whose ε-multiple is the rounding left in M (the
    elimination can leave M's own diagonal far smaller). A base for some of the problems
    (`index`) shares the full batch's M, whose `rows` it reads: M is only ever copied into
    each factorization's S (`copy_M`), so it needs no copy of its own."""

    L_H: Tensor
    HinvCt: Tensor
    M: Tensor
    M_max: Tensor
    ok: Tensor
    fixed: FixedRows | None = None
    rows: Tensor | None = None

    def index(self, idx: Tensor) -> "DualBase":
        rows = idx if self.rows is None else self.rows[idx]
        fixed = None if self.fixed is None else self.fixed.index(idx)
        return DualBase(self.L_H[idx], self.HinvCt[idx], self.M, self.M_max[idx], self.ok[idx], fixed, rows)

    def copy_M(self) -> Tensor:
        """A column-major copy of M (its `rows`), to be factored in place."""
        # indexing the batch copies and keeps the layout
        return col_major(self.M) if self.rows is None else self.M[self.rows]

    def M_diag(self) -> Tensor:
        """M's diagonal (B, m) (its `rows`), a view of M when there are no rows."""
        diag = self.M.diagonal(dim1=-2, dim2=-1)
        return diag if self.rows is None else diag[self.rows]


def dual_base(d: QPData, rho: float, delta: float) -> DualBase | None:
    """Factor Q + ρI once, or return None when Q is not comfortably positive definite
    (smallest Cholesky pivot below √ε·(1 + max|Q|)), where the primal form is the safer one.
    The equality rows of C H⁻¹ Cᵀ get δ plus ε·max|diag|, grown as in `KKT._factor_dual`
    where rounding leaves them indefinite (dependent rows of A), and are eliminated."""
    L = d.factor_Q(rho)
    if L is None:
        return None
    ok = torch.ones(d.shape[0], dtype=torch.bool, device=L.device)
    HinvCt = cholesky_solve(L, d.C.mT)
    M = d.C @ HinvCt
    B, n, m, q = d.shape
    M_max = M.diagonal(dim1=-2, dim2=-1).abs().amax(-1) if m + q else M.new_zeros(B)
    if not q:
        # column-major, so that each iteration's copy of M is factored in place
        return DualBase(L, HinvCt, col_major(M), M_max, ok)
    diag = M.diagonal(dim1=-2, dim2=-1)[..., m:].clone()
    floor = delta + torch.finfo(M.dtype).eps * M_max.unsqueeze(-1)
    for _ in range(3):
        M.diagonal(dim1=-2, dim2=-1)[..., m:].copy_(diag + floor)
        fixed, M_ineq, ok_N = fix_rows(M, m)
        if bool(ok_N.all()):
            break
        floor = torch.where(ok_N.unsqueeze(-1), floor, floor * 30 * q)
    return DualBase(L, HinvCt, col_major(M_ineq), M_max, ok & ok_N, fixed)


class KKT:
    """The system above, factored. `active_set=True` allows D ∈ {0, ∞} entries (the polish
    and the backward; also the primal form's interior point iterations, where it splits
    rows by D ≤ 1); otherwise 0 < D < ∞, which skips the masking work. Separable data
    (`d.sep`) always use the separable form, for any D. `grow_delta`: where a Schur
    complement (the rows eliminated last) fails to factor, grow its δ (as the dual form
    always does) rather than report the failure; off for the dense primal form for singular
    Q, whose iterations retry with a larger ρ = δ instead (`pdipm._factor_primal`)."""

    def __init__(
        self,
        d: QPData,
        D: Tensor,
        *,
        rho: float,
        delta: float,
        base: DualBase | None = None,
        nullspace: Nullspace | None = None,
        active_set: bool = False,
        grow_delta: bool = True,
    ):
        self.d, self.D, self.active_set = d, D, active_set
        self._r1 = self._r_e = None
        self._Gx: tuple[Tensor, Tensor] | None = None  # (x, Gx) of the last primal-form solve
        self.absent = torch.isinf(D) if active_set else None
        # the form only, not the dual base: its M is not needed once S is factored
        if d.sep is not None:
            self.form = "separable"
        else:
            self.form = "nullspace" if nullspace is not None else "dual" if base is not None else "primal"
        if self.form == "nullspace":
            # the primal form of the reduced system, which has no equality rows
            self.ns = nullspace
            args = dict(rho=rho, delta=delta, active_set=active_set, grow_delta=grow_delta)
            self.inner = KKT(nullspace.d, D, **args)
            self.ok = self.inner.ok
        elif self.form == "separable":
            self._factor_separable(rho, delta, grow_delta)
        elif self.form == "dual":
            self._factor_dual(base, delta)
        else:
            self._factor_primal(rho, delta, grow_delta)

    def factors_only(self) -> "KKT":
        """This system for unrefined solves (`solve(..., refine=0)`) only, without the data
        where those do not read them (the dual form): the factor the implicit backward
        keeps, so that the scaled Q and C can be freed before it forms the gradients."""
        if self.form != "dual":
            return self
        light = copy.copy(self)
        light.d = None  # `apply`, hence refinement, reads the data
        return light

    def _factor_separable(self, rho: float, delta: float, grow_delta: bool) -> None:
        """Separable data: row i of G is g_i at column j_i, H = diag(Q) + ρ. Every row is
        eliminated per variable: one row per variable (its smallest D) exactly through the
        2×2 block [[h̃_j, g_i], [g_i, −D_i]], so D = 0 (an active row) fixes z_j without a
        1/D; the others through h̃_j = H_jj + Σ g_i²/D_i. D gets δ like the equality rows.
        What is left, A diag(e) Aᵀ + δI with e_j = D_i/Δ_j, Δ_j = h̃_j D_i + g_i², is q × q."""
        d, D = self.d, self.D
        B, n, m, q = d.shape
        self.col, self.g = d.sep.col, d.sep.g
        # rows left out (D = ∞; only with active_set) decouple: zero weight, zero right side
        absent = self.absent if self.active_set else torch.zeros_like(D, dtype=torch.bool)
        self.Dd = torch.where(absent, 1.0, D + delta)

        def per_var(v: Tensor, how: str, fill: float = 0.0) -> Tensor:
            """Reduce a per-row (B, m) quantity over the rows of each variable: (B, n)."""
            return v.new_full((B, n), fill).scatter_reduce(-1, self.col, v, how)

        # the 2×2 row of a variable: its smallest D (ties to the last row)
        key = torch.where(absent | (self.g == 0), torch.inf, self.Dd)
        cand = torch.isfinite(key) & (key == per_var(key, "amin", torch.inf).gather(-1, self.col))
        row = torch.where(cand, torch.arange(m, device=D.device), -1)
        self.pair = cand & (row == per_var(row, "amax", -1).gather(-1, self.col))
        self.w = torch.where(absent | self.pair, 0.0, 1 / self.Dd)  # 1/D of the other rows
        self.H_t = (d.sep.q + rho).scatter_add(-1, self.col, self.g**2 * self.w)
        # the pair's g and D at its variable; a variable without one gets g = 0, D = 1
        self.g_v = per_var(torch.where(self.pair, self.g, 0.0), "sum")
        self.D_v = per_var(torch.where(self.pair, self.Dd, 0.0), "sum") + (self.g_v == 0)
        self.Delta = self.H_t * self.D_v + self.g_v**2
        self.factor = factor_saddle(self.Delta / self.D_v, d.A, delta, grow_delta)  # H = 1/e
        self.ok = self.factor.ok & torch.isfinite(self.Delta).all(-1)

    def _factor_dual(self, base: DualBase, delta: float) -> None:
        D = self.D
        M_diag = base.M_diag()
        if self.active_set:
            # rows left out decouple: zero row and column of M, unit diagonal, zero right side
            self.keep = ~self.absent
            M_diag = M_diag * self.keep
            D = torch.where(self.absent, 1.0, D)
        # δ grows with C H⁻¹ Cᵀ's diagonal until the Cholesky succeeds: rounding can make
        # M + diag(D) indefinite when rows of C are (nearly) dependent
        scale = torch.finfo(D.dtype).eps * base.M_max.unsqueeze(-1)
        boost = torch.ones_like(scale)
        for _ in range(3):
            floor = delta + boost * scale
            # S = M + diag(·), one copy of M, factored in place (a failed try destroys it)
            S = base.copy_M()
            if self.active_set:
                S.mul_(self.keep.unsqueeze(-1)).mul_(self.keep.unsqueeze(-2))
            S.diagonal(dim1=-2, dim2=-1).copy_(M_diag + torch.maximum(D, floor))
            L_S, ok = cholesky(S, overwrite=True)
            if bool(ok.all()):
                break
            boost = torch.where(ok.unsqueeze(-1), boost, boost * 30 * S.shape[-1])
        self.factor = SaddleFactor(base.L_H, base.HinvCt, L_S, ok & base.ok, base.fixed)
        self.ok = self.factor.ok

    def _factor_primal(self, rho: float, delta: float, grow_delta: bool) -> None:
        d, D = self.d, self.D
        # rows with D ≤ 1 (λ ≥ s: active or nearly) stay in the Schur complement and only
        # W = 1/D ≤ 1 is eliminated, so H = Q + GᵀWG stays well conditioned however extreme
        # λ/s gets
        self.hard = D <= 1 if self.active_set else None
        if self.active_set:
            soft = ~self.absent & ~self.hard
            self.W = torch.where(soft, 1 / torch.where(soft, D, 1.0), 0.0)
        else:
            self.W = 1 / D
        # H = GᵀWG + Q, the sum formed in place (the same bits as Q + GᵀWG)
        L_H = None
        if D.shape[-1] and (not self.active_set or bool(soft.any())):
            H = ((d.G.mT * self.W.unsqueeze(-2)) @ d.G).add_(d.Q)
        else:
            # W = 0 (an active set, D ∈ {0, ∞}: the polish and the backward): H = Q + ρI,
            # factored once per data where ρ is one number for the batch (or None)
            L_H = d.factor_Q(rho) if isinstance(rho, float) else None
            H = None if L_H is not None else d.Q.clone()
        if H is not None:
            Hd = H.diagonal(dim1=-2, dim2=-1)
            # relative to the diagonal, so that the Cholesky survives λ/s ≫ 1
            Hd += rho + 4 * Hd.shape[-1] * torch.finfo(D.dtype).eps * Hd.abs().amax(-1, keepdim=True)
        if self.active_set:
            # only the hard rows enter the Schur complement, gathered to the front (`rows`,
            # B × k for the batch's largest count k, `valid` marking the padding): a tall
            # problem (m ≫ n) has about n of them near its solution, not m
            B, n, m, _ = d.shape
            k = int(self.hard.sum(-1).amax()) if B * m else 0
            self.rows = torch.sort((~self.hard).to(torch.int8), dim=-1, stable=True).indices[..., :k]
            self.valid = self.hard.gather(-1, self.rows)
            G_h = d.G.expand(B, m, n).gather(-2, self.rows.unsqueeze(-1).expand(B, k, n))
            C = torch.cat([G_h * self.valid.unsqueeze(-1), d.A.expand(B, *d.A.shape[-2:])], dim=-2)
            D_h = torch.where(self.valid, D.gather(-1, self.rows) + delta, 1.0)
            self.factor = factor_saddle(
                H, C, torch.cat([D_h, torch.zeros_like(d.b) + delta], -1), grow_delta, L_H
            )
        else:
            self.factor = factor_saddle(H, d.A, delta, grow_delta, L_H)
        self.ok = self.factor.ok

    def apply(
        self, x: Tensor, y_i: Tensor, y_e: Tensor, d: QPData | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The exact (unregularized) operator, with the data d (default: the factored ones)."""
        d = self.d if d is None else d
        if self.active_set:
            r_i = torch.where(self.absent, 0.0, d.Gx(x) - torch.where(self.absent, 0.0, self.D) * y_i)
        else:
            r_i = d.Gx(x) - self.D * y_i
        return d.Qx(x) + d.Gty(y_i) + brmv(d.A, y_e), r_i, bmv(d.A, x)

    def _solve_separable(self, r1: Tensor, r_i: Tensor, r_e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The elimination of `_factor_separable`. With r̃1 = r1 + Σ g_i r_i/D_i over the
        other rows and r_k the pair's right side, x = e∘(r̃1 − Aᵀy_e) + g r_k/Δ: the saddle
        solve with H = 1/e and first right side r̃1 + g r_k/D. Then the pair's multiplier
        is (g (r̃1 − Aᵀy_e) − h̃ r_k)/Δ, the others' W (g x_j − r_i)."""
        if self.active_set:
            r_i = torch.where(self.absent, 0.0, r_i)
        r1 = r1.scatter_add(-1, self.col, self.g * self.w * r_i)
        r_k = torch.zeros_like(r1).scatter_add(-1, self.col, torch.where(self.pair, r_i, 0.0))
        x, y_e = self.factor.solve(r1 + self.g_v * r_k / self.D_v, r_e)
        y_pair = (self.g_v * (r1 - brmv(self.d.A, y_e)) - self.H_t * r_k) / self.Delta
        y_other = self.w * (self.g * x.gather(-1, self.col) - r_i)
        return x, torch.where(self.pair, y_pair.gather(-1, self.col), y_other), y_e

    def _solve_once(self, r1: Tensor, r_i: Tensor, r_e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        m = r_i.shape[-1]
        if self.form == "separable":
            return self._solve_separable(r1, r_i, r_e)
        if self.form == "nullspace":
            if r1 is not self._r1 or r_e is not self._r_e:  # predictor and corrector share them
                self._r1, self._r_e, self._prepared = r1, r_e, self.ns.split(r1, r_e)
            x_Y, Ut_r1, r1_N, GYx_Y = self._prepared
            x_N, y_i, _ = self.inner._solve_once(r1_N, r_i - GYx_Y, r_e[..., :0])
            x, y_e = self.ns.join(x_Y, Ut_r1, x_N, y_i)
            return x, y_i, y_e
        if self.active_set:
            r_i = torch.where(self.absent, 0.0, r_i)
        if self.form == "dual":
            if r1 is not self._r1:  # predictor and corrector share r1: reuse H⁻¹r1, C H⁻¹r1
                self._r1, self._prepared = r1, self.factor.prepare(r1)
            keep = self.keep if self.active_set else None
            x, y = self.factor.solve(r1, torch.cat([r_i, r_e], -1), self._prepared, keep)
            return x, y[..., :m], y[..., m:]
        r1 = r1 + brmv(self.d.G, self.W * r_i)
        if self.active_set:
            k = self.rows.shape[-1]
            x, y = self.factor.solve(r1, torch.cat([r_i.gather(-1, self.rows) * self.valid, r_e], -1))
            self._Gx = x, bmv(self.d.G, x)
            y_hard = torch.zeros_like(r_i).scatter(-1, self.rows, y[..., :k])
            y_i = torch.where(self.hard, y_hard, self.W * (self._Gx[1] - r_i))
            return x, y_i, y[..., k:]
        x, y_e = self.factor.solve(r1, r_e)
        self._Gx = x, bmv(self.d.G, x)
        return x, self.W * (self._Gx[1] - r_i), y_e

    def Gx(self, x: Tensor) -> Tensor:
        """Gx for x (B, n): the product the last solve formed when x is its answer (the
        primal form's y_i needs it, and so does the interior point step's ds), else anew."""
        if self._Gx is not None and self._Gx[0] is x:
            return self._Gx[1]
        return self.d.Gx(x)

    def solve(
        self,
        r1: Tensor,
        r_i: Tensor,
        r_e: Tensor,
        refine: int = 1,
        until_noise: bool = False,
        wide: bool = False,
        converged: bool = False,
    ):
        """(x, y_i, y_e), refined `refine` times against the exact operator. `until_noise`:
        stop earlier once every problem's next correction is at the noise floor of
        refinement (100ε relative to the solution's size, what the third of three steps
        measures on random QPs): further steps only move rounding errors, at a residual and
        a solve each. Refinement contracts linearly, so the next correction is predicted as
        this one times its ratio to the last (the first solve counts as a correction from
        zero): with the factor's ρ ≈ 1e-10 one step usually suffices, and the step that
        would only confirm it is skipped. Not with `wide`, whose float64 residuals resolve
        far below 100 ε₃₂: there the last correction itself must be that small.
        `wide`: residuals and sums in float64 (mixed-precision refinement), so a float32
        factor gives answers accurate to float32 where cond·ε₃₂ < 1, not cond·ε₃₂.
        `converged` (with until_noise): also return (B,) whether each problem's refinement
        reached that noise floor (not, where it contracts too slowly for `refine` steps)."""
        x, y_i, y_e = self._solve_once(r1, r_i, r_e)
        tol = 100 * torch.finfo(r1.dtype).eps
        dtype, d = r1.dtype, self.d
        mixed = wide and dtype != torch.float64
        if mixed:
            d = d.to(torch.float64)
            r1, r_i, r_e, x, y_i, y_e = (t.double() for t in (r1, r_i, r_e, x, y_i, y_e))
        predict = until_noise and not mixed
        # the last correction's size: the first solve's, as a correction from zero
        last = _relative(x, y_i, y_e, x, y_i, y_e) if predict and refine else None
        following = None
        for _ in range(refine):
            a1, a_i, a_e = self.apply(x, y_i, y_e, d)
            res = (r1 - a1, r_i - a_i, r_e - a_e)
            dx, dy_i, dy_e = self._solve_once(*(t.to(dtype) for t in res))
            x, y_i, y_e = x + dx, y_i + dy_i, y_e + dy_e
            if until_noise:
                corr = _relative(dx, dy_i, dy_e, x, y_i, y_e)
                following = corr
                if predict:  # linear contraction: the next is this one times corr/last
                    following = corr * (corr / last.clamp(min=torch.finfo(corr.dtype).tiny)).clamp(max=1.0)
                    last = corr
                if bool((following <= tol).all()):
                    break
        out = x.to(dtype), y_i.to(dtype), y_e.to(dtype)
        if not converged:
            return out
        return *out, torch.ones_like(x[..., 0], dtype=torch.bool) if following is None else following <= tol


def _relative(dx: Tensor, dy_i: Tensor, dy_e: Tensor, x: Tensor, y_i: Tensor, y_e: Tensor) -> Tensor:
    """(B,) the size of a correction relative to the solution's, ‖d‖∞ / (1 + ‖sol‖∞)."""
    corr, sol = torch.cat([dx, dy_i, dy_e], -1), torch.cat([x, y_i, y_e], -1)
    return corr.abs().amax(-1) / (1 + sol.abs().amax(-1))
