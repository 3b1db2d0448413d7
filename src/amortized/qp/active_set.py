"""Primal-dual active-set method for a family of QPs that share their matrices.

    minimize_y ½ yᵀQy + pᵀy   subject to   G y ≤ h,   A y = b,

with Q (n, n) positive definite, p (n,), G (m, n), A (q, n) shared by every instance and
b (B, q) (and optionally h (B, m)) varying. Hintermüller, Ito, Kunisch (2002): guess the
active set S, solve the equality-constrained QP with G_S y = h_S, set λ from its
multipliers (λ_i = 0 off S), update S ← {i : λ_i + c (G_i y − h_i) > 0}, stop when S
repeats. The fixed point satisfies stationarity, A y = b and complementarity exactly.

Because the matrices are shared, the Schur complement M = [A; G] Q⁻¹ [A; G]ᵀ and the
elimination of the (always active) equality block are formed once; a step is then one
batched (B, m, m) Cholesky of the reduced matrix restricted to S and a few products.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from amortized.linalg import cholesky, cholesky_solve
from amortized.qp.status import QPStatus


class ActiveSetStep(NamedTuple):
    """The equality-constrained solve for one active set: y (B, n), lam (B, m) (zero off S),
    nu (B, q), ok (B,) bool (False where the Cholesky of the reduced matrix failed, i.e. the
    active rows [A; G_S] were numerically dependent; y, lam, nu are then meaningless).
    """

    y: Tensor
    lam: Tensor
    nu: Tensor
    ok: Tensor


@dataclass
class ActiveSetResult:
    """Outcome of `ActiveSetQP.solve` on a batch of B problems.

    y (B, n), lam (B, m), nu (B, q) with Qy + p + Gᵀλ + Aᵀν = 0; S (B, m) bool, the last
    active set; status (B,) QPStatus codes: SOLVED where the KKT check passed (G y ≤ h + tol,
    λ ≥ −tol; stationarity, A y = b and complementarity hold by construction), NUMERICAL
    where the last step's factorization failed, MAX_ITER otherwise (not a KKT point after
    `max_steps`; the method cannot tell an infeasible problem from a slow one). steps (B,)
    the steps each problem used; iterates the list [y0, y1, …] (one entry per step taken
    by the batch), for unrolling.
    """

    y: Tensor
    lam: Tensor
    nu: Tensor
    S: Tensor
    status: Tensor
    steps: Tensor
    iterates: list[Tensor]

    @property
    def solved(self) -> Tensor:
        return self.status == int(QPStatus.SOLVED)


class ActiveSetQP:
    """A family of QPs with shared Q (n, n) SPD, p (n,), G (m, n), h (m,), A (q, n) and
    per-instance b (B, q); see the module docstring. c > 0 weighs the primal violation in
    the active-set update; tol (default √eps of the dtype) is the KKT check's tolerance.

    With C = [A; G_S], the equality-constrained solve is y = Q⁻¹(−p − Aᵀν − G_Sᵀλ_S) where
    C Q⁻¹ Cᵀ [ν; λ_S] = −C Q⁻¹ p − [b; h_S]. Eliminating ν (A has full row rank) leaves

        K_SS λ_S = (r_G − h − W (r_A − b))_S,   K = M_GG − M_GA M_AA⁻¹ M_AG,
        ν = M_AA⁻¹ (r_A − b) − Z λ,

    with r = −[A; G] Q⁻¹ p, Z = M_AA⁻¹ M_AG and W = M_GA M_AA⁻¹. Rows and columns of K off S
    are replaced by unit ones, so every problem of the batch keeps the size m. A step is
    differentiable w.r.t. b and h for a fixed active set, so the iteration can be unrolled.
    Needs the active rows [A; G_S] linearly independent (LICQ); where they are not, the
    step's Cholesky fails (status NUMERICAL) or its multipliers are inaccurate, and the
    final KKT check decides as everywhere else.
    """

    def __init__(
        self,
        Q: Tensor,
        p: Tensor,
        G: Tensor,
        h: Tensor,
        A: Tensor,
        *,
        c: float = 1.0,
        tol: float | None = None,
    ):
        L_Q, ok = cholesky(Q)
        if not bool(ok):
            raise ValueError("ActiveSetQP needs Q positive definite")
        self.Q, self.p, self.G, self.h, self.A, self.c = Q, p, G, h, A, c
        self.tol = tol if tol is not None else torch.finfo(Q.dtype).eps ** 0.5
        q = A.shape[0]
        Q_inv = torch.cholesky_inverse(L_Q)
        C = torch.cat([A, G], 0)
        CQi = C @ Q_inv  # (q + m, n)
        M = CQi @ C.T
        M_AA, M_AG, M_GA, M_GG = M[:q, :q], M[:q, q:], M[q:, :q], M[q:, q:]
        L_AA, ok = cholesky(M_AA)
        # dependent rows of A leave a pivot of the order √eps (relative), not an exact zero
        d = L_AA.diagonal()
        if not bool(ok) or (q and float(d.min() / d.max()) ** 2 < 10 * q * torch.finfo(Q.dtype).eps):
            raise ValueError("ActiveSetQP needs A of full row rank")
        self.M_AA_inv = torch.cholesky_inverse(L_AA)
        self.Z = self.M_AA_inv @ M_AG  # (q, m)
        self.W = M_GA @ self.M_AA_inv  # (m, q)
        self.K = M_GG - M_GA @ self.Z  # (m, m) reduced Schur complement
        r = -CQi @ p
        self.r_A, self.r_G = r[:q], r[q:]
        self.AQi, self.GQi = CQi[:q], CQi[q:]
        self.y_free = -Q_inv @ p  # the unconstrained minimizer

    def slack(self, y: Tensor, h: Tensor | None = None) -> Tensor:
        """(B, m) G y − h (≤ 0 where feasible)."""
        return y @ self.G.T - (self.h if h is None else h)

    def guess(self, y: Tensor, h: Tensor | None = None, tol_active: float = 0.0) -> Tensor:
        """(B, m) the active set a point y (B, n) implies: {i : G_i y − h_i > −tol_active}."""
        return self.slack(y.detach(), h) > -tol_active

    def solve_active(self, S: Tensor, b: Tensor, h: Tensor | None = None) -> ActiveSetStep:
        """Minimize ½yᵀQy + pᵀy s.t. A y = b (B, q), G_S y = h_S for active masks S (B, m)."""
        h = self.h if h is None else h
        s = S.to(b.dtype)
        rA = self.r_A - b  # (B, q)
        rG = s * (self.r_G - h - rA @ self.W.T)
        K_S = self.K * (s.unsqueeze(-1) * s.unsqueeze(-2)) + torch.diag_embed(1 - s)
        L, ok = cholesky(K_S)
        lam = s * cholesky_solve(L, rG)
        nu = rA @ self.M_AA_inv - lam @ self.Z.T
        y = self.y_free - nu @ self.AQi - lam @ self.GQi
        return ActiveSetStep(y, lam, nu, ok)

    def solve(
        self,
        b: Tensor,
        y0: Tensor | None = None,
        *,
        S0: Tensor | None = None,
        h: Tensor | None = None,
        max_steps: int = 20,
        tol_active: float = 0.0,
    ) -> ActiveSetResult:
        """Active-set steps on the problems with right sides b (B, q) (and h (B, m) if given).

        Starts from S0 (B, m) if given, else from the active set y0 (B, n) implies (see
        `guess`), else from S = ∅. A problem stops when S repeats; the batch stops when all
        have, or after max_steps. Before the first step the state is (y0 or 0, λ = 0, ν = 0)
        and not solved.
        """
        B = b.shape[0]
        y = y0 if y0 is not None else b.new_zeros(B, self.Q.shape[0])
        if S0 is not None:
            S = S0
        elif y0 is not None:
            S = self.guess(y0, h, tol_active)
        else:
            S = torch.zeros(B, self.G.shape[0], dtype=torch.bool, device=b.device)
        ys = [y]
        done = torch.zeros(B, dtype=torch.bool, device=b.device)
        used = torch.zeros(B, dtype=torch.long, device=b.device)
        lam = torch.zeros_like(S, dtype=b.dtype)
        nu = torch.zeros_like(b)
        ok = done.clone()
        for _ in range(max_steps):
            step = self.solve_active(S, b, h)
            keep = done.unsqueeze(-1)
            y = torch.where(keep, y, step.y)
            lam = torch.where(keep, lam, step.lam)
            nu = torch.where(keep, nu, step.nu)
            ok = torch.where(done, ok, step.ok)
            used = used + (~done).long()
            S_new = (lam.detach() + self.c * self.slack(y.detach(), h)) > 0
            done = done | (S_new == S).all(-1)
            S = torch.where(done.unsqueeze(-1), S, S_new)
            ys.append(y)
            if bool(done.all()):  # one host sync per step: steps are few and costly
                break
        return ActiveSetResult(y, lam, nu, S, self._status(y, lam, ok, h), used, ys)

    def _status(self, y: Tensor, lam: Tensor, ok: Tensor, h: Tensor | None) -> Tensor:
        """QPStatus codes (B,): the KKT check of the final point (see `ActiveSetResult`)."""
        viol = self.slack(y.detach(), h).clamp_min(0).amax(-1)
        kkt = ok & (viol <= self.tol) & (lam.detach() >= -self.tol).all(-1)
        status = torch.full_like(ok, int(QPStatus.MAX_ITER), dtype=torch.long)
        status = status.masked_fill(~ok, int(QPStatus.NUMERICAL))
        return status.masked_fill(kkt, int(QPStatus.SOLVED))
