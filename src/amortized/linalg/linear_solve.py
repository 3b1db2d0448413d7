"""Batched linear solves for the implicit backward: B independent systems A_b x_b = r_b.

Every solver here takes a matrix-free `matvec(x) -> A x` acting row-wise on x (B, N) (row b
of the result depends only on row b of x, which holds when A is the Jacobian of a batched
optimality function) and a right-hand side r (B, N). Convergence is tested per problem,
‖A_b x_b − r_b‖ ≤ rtol ‖r_b‖, with a batched mask; converged rows stop changing while the
others continue, and the loop stops once all rows are done. The check is a host sync: free on
the CPU, so there it runs after every iteration (an iteration costs a matvec, the expensive
part); on an accelerator it runs every few iterations.

    cg        conjugate gradients (A symmetric positive definite: the Hessian of argmin)
    gmres     restarted GMRES, modified Gram-Schmidt Arnoldi, Givens rotations (any
              non-singular A)
    bicgstab  BiCGStab (any non-singular A; short recurrences, 2 matvecs an iteration)
    neumann   x ← r + (I − A) x, the Neumann series (converges when ‖I − A‖ < 1, e.g. the
              fixed point Jacobian I − ∂T of a contraction)
    direct    materialize A_b (N matvecs, vmapped) and factor it: Cholesky when symmetric
              positive definite, otherwise Householder QR. Batched LU is avoided on purpose
              (torch 2.13 CPU batched LU is unreliable for N ≳ 150 with several threads).

Each returns (x (B, N), converged (B,) bool). The iterative ones take an optional
preconditioner `precond(x) -> M x` with M ≈ A⁻¹ row-wise (e.g. a factorization or curvature
pairs the forward solver already had): CG runs preconditioned CG (M symmetric positive
definite), GMRES, BiCGStab and Neumann solve A M z = r and return x = M z (right
preconditioning, so the tested residual is the true one). With M = A⁻¹ every one of them
stops after its first matvec.
"""

import functools
from collections.abc import Callable

import torch
from torch import Tensor

Matvec = Callable[[Tensor], Tensor]
Precond = Callable[[Tensor], Tensor] | None


def default_rtol(dtype: torch.dtype) -> float:
    """Relative residual target: eps^(2/3), about 5e-11 in float64 and 3e-5 in float32.

    (eps^0.6, 4e-10 / 7e-5, saves about 2 of 26 matvecs on the float64 benchmarks, but the
    looser float32 gradients moved the digits DEQ demo's last epoch under its accuracy bar.)"""
    return float(torch.finfo(dtype).eps ** (2 / 3))


def _check_every(r: Tensor, check_every: int | None) -> int:
    """Iterations between convergence checks: 1 on the CPU (a sync costs nothing there and
    every extra iteration costs a matvec), 5 on an accelerator (a sync stalls its queue)."""
    if check_every is not None:
        return check_every
    return 1 if r.device.type == "cpu" else 5


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _threshold(r: Tensor, rtol: float | None) -> Tensor:
    """Per-problem squared residual threshold (B,); a tiny floor so r = 0 counts as solved."""
    rtol = default_rtol(r.dtype) if rtol is None else rtol
    tiny = torch.finfo(r.dtype).tiny
    return (rtol * r.norm(dim=-1)).square().clamp_min(tiny)


def any_true(mask: Tensor) -> bool:
    """bool(mask.any()), or True when that is data-dependent control flow under torch.func.vmap
    (then the loops run to max_iter; the masks keep finished rows unchanged)."""
    try:
        return bool(mask.any())
    except RuntimeError:
        return True


def _safe(x: Tensor) -> Tensor:
    """x with zeros replaced by ones, for divisions whose result is masked out anyway."""
    return torch.where(x == 0, torch.ones_like(x), x)


def cg(
    matvec: Matvec,
    r: Tensor,
    *,
    x0: Tensor | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
    check_every: int | None = None,
    precond: Precond = None,
) -> tuple[Tensor, Tensor]:
    """Conjugate gradients for symmetric positive definite A_b (Hestenes & Stiefel 1952),
    preconditioned by M ≈ A⁻¹ (symmetric positive definite) when `precond` is given.

    r, x0: (B, N). max_iter defaults to 2N + 10 (exact arithmetic needs N). Convergence is
    tested on the residual ‖r − Ax‖ itself, not its M-norm. A row whose curvature pᵀAp (or
    resᵀM res) is not positive (A or M not positive definite there) stops and is reported
    not converged.
    """
    M = precond if precond is not None else (lambda x: x)
    B, N = r.shape
    max_iter = 2 * N + 10 if max_iter is None else max_iter
    thresh = _threshold(r, rtol)
    check_every = _check_every(r, check_every)
    x = torch.zeros_like(r) if x0 is None else x0.clone()
    res = r - matvec(x) if x0 is not None else r.clone()
    z = M(res)
    p = z.clone()
    rz = _dot(res, z)  # = ‖res‖² without a preconditioner
    active = _dot(res, res) > thresh
    broken = active & ~(rz > 0)
    active = active & ~broken
    for k in range(max_iter):
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        bad = active & ~(pAp > 0)
        broken = broken | bad
        active = active & ~bad
        alpha = torch.where(active, rz / _safe(pAp), 0.0)
        x = x + alpha.unsqueeze(-1) * p
        res = res - alpha.unsqueeze(-1) * Ap
        active = active & (_dot(res, res) > thresh)
        if (k + 1) % check_every == 0 and not any_true(active):
            break  # before M: applying a preconditioner may cost as much as a matvec
        z = M(res)
        rz_new = _dot(res, z)
        bad = active & ~(rz_new > 0)
        broken = broken | bad
        active = active & ~bad
        beta = torch.where(active, rz_new / _safe(rz), 0.0)
        p = z + beta.unsqueeze(-1) * p
        rz = torch.where(active, rz_new, rz)
    return x, ~active & ~broken & torch.isfinite(x).all(-1)


def _right_preconditioned(
    solver: Callable[..., tuple[Tensor, Tensor]],
) -> Callable[..., tuple[Tensor, Tensor]]:
    """Add `precond` (M ≈ A⁻¹) to a solver by right preconditioning: solve A M z = r − A x0
    and return x = x0 + M z. The residual of z in A M is the true residual of x, so the
    tolerance keeps its meaning (relative to ‖r − A x0‖ when x0 is given)."""

    @functools.wraps(solver)
    def wrapped(matvec: Matvec, r: Tensor, *, x0: Tensor | None = None, precond: Precond = None, **kw):
        if precond is None:
            return solver(matvec, r, x0=x0, **kw)
        r0 = r if x0 is None else r - matvec(x0)
        z, ok = solver(lambda z_: matvec(precond(z_)), r0, **kw)
        x = precond(z) if x0 is None else x0 + precond(z)
        return x, ok & torch.isfinite(x).all(-1)

    return wrapped


@_right_preconditioned
def bicgstab(
    matvec: Matvec,
    r: Tensor,
    *,
    x0: Tensor | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
    check_every: int | None = None,
) -> tuple[Tensor, Tensor]:
    """BiCGStab (van der Vorst 1992) for non-symmetric A_b; r, x0: (B, N)."""
    B, N = r.shape
    max_iter = 2 * N + 10 if max_iter is None else max_iter
    thresh = _threshold(r, rtol)
    check_every = _check_every(r, check_every)
    x = torch.zeros_like(r) if x0 is None else x0.clone()
    res = r - matvec(x) if x0 is not None else r.clone()
    r_hat = res.clone()
    rho = alpha = omega = torch.ones(B, dtype=r.dtype, device=r.device)
    v = p = torch.zeros_like(r)
    active = _dot(res, res) > thresh
    for k in range(max_iter):
        rho_new = _dot(r_hat, res)
        beta = (rho_new / _safe(rho)) * (alpha / _safe(omega))
        p = res + beta.unsqueeze(-1) * (p - omega.unsqueeze(-1) * v)
        v = matvec(p)
        alpha = rho_new / _safe(_dot(r_hat, v))
        s = res - alpha.unsqueeze(-1) * v
        t = matvec(s)
        omega = _dot(t, s) / _safe(_dot(t, t))
        step = alpha.unsqueeze(-1) * p + omega.unsqueeze(-1) * s
        x = torch.where(active.unsqueeze(-1), x + step, x)
        res = torch.where(active.unsqueeze(-1), s - omega.unsqueeze(-1) * t, res)
        rho = rho_new
        active = active & (_dot(res, res) > thresh) & torch.isfinite(res).all(-1)
        if (k + 1) % check_every == 0 and not any_true(active):
            break
    res = r - matvec(x)
    return x, (_dot(res, res) <= 4 * thresh) & torch.isfinite(x).all(-1)


@_right_preconditioned
def gmres(
    matvec: Matvec,
    r: Tensor,
    *,
    x0: Tensor | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
    restart: int = 30,
) -> tuple[Tensor, Tensor]:
    """Restarted GMRES(m) (Saad & Schultz 1986), batched; r, x0: (B, N).

    Each cycle builds up to m Krylov vectors per problem by modified Gram-Schmidt and keeps
    the Hessenberg matrix triangular with Givens rotations, which give every problem's
    residual norm after each step for free; a problem's coefficients are cut at the step
    where it converged, so one short back substitution per cycle serves the whole batch.
    max_iter counts matvecs (default 2N + 10).
    """
    B, N = r.shape
    m = max(1, min(restart, N))
    max_iter = 2 * N + 10 if max_iter is None else max_iter
    thresh = _threshold(r, rtol).sqrt()
    x = torch.zeros_like(r) if x0 is None else x0.clone()
    tiny = torch.finfo(r.dtype).tiny
    used = 0
    while True:
        res = r - matvec(x) if used or x0 is not None else r  # x = 0: no matvec needed
        beta = res.norm(dim=-1)
        active = (beta > thresh) & torch.isfinite(beta)
        if used >= max_iter or not any_true(active):
            break
        V = [res / beta.clamp_min(tiny).unsqueeze(-1)]
        R = r.new_zeros(B, m, m)
        g = r.new_zeros(B, m + 1)
        g[:, 0] = beta
        cs, sn = [], []
        steps = torch.zeros(B, dtype=torch.long, device=r.device)  # Krylov steps each row keeps
        running = active.clone()
        for j in range(m):
            w = matvec(V[j])
            h = []
            for i in range(j + 1):
                hij = _dot(w, V[i])
                h.append(hij)
                w = w - hij.unsqueeze(-1) * V[i]
            hn = w.norm(dim=-1)
            V.append(torch.where(hn.unsqueeze(-1) > tiny, w / hn.clamp_min(tiny).unsqueeze(-1), 0.0))
            for i in range(j):  # previous rotations
                h[i], h[i + 1] = cs[i] * h[i] + sn[i] * h[i + 1], -sn[i] * h[i] + cs[i] * h[i + 1]
            den = torch.hypot(h[j], hn)
            ok = den > tiny
            c = torch.where(ok, h[j] / torch.where(ok, den, 1.0), 1.0)
            s_ = torch.where(ok, hn / torch.where(ok, den, 1.0), 0.0)
            cs.append(c)
            sn.append(s_)
            h[j] = den
            R[:, : j + 1, j] = torch.stack(h, -1)
            g[:, j + 1] = -s_ * g[:, j]
            g[:, j] = c * g[:, j]
            # A row keeps step j if it was still running and the step is well defined.
            keep = running & ok
            steps = steps + keep.long()
            running = keep & (g[:, j + 1].abs() > thresh)
            if not any_true(running):
                break
        used += j + 1
        k = j + 1
        idx = torch.arange(k, device=r.device)
        kept = idx.unsqueeze(0) < steps.unsqueeze(-1)  # (B, k)
        eye = torch.eye(k, dtype=r.dtype, device=r.device)
        Rk = torch.where(kept.unsqueeze(-1) & kept.unsqueeze(-2), R[:, :k, :k], eye)
        gk = torch.where(kept, g[:, :k], 0.0)
        coef = torch.linalg.solve_triangular(Rk, gk.unsqueeze(-1), upper=True).squeeze(-1)
        dx = torch.einsum("bj,jbn->bn", coef, torch.stack(V[:k]))
        x = torch.where(active.unsqueeze(-1), x + dx, x)
    return x, ~active & torch.isfinite(x).all(-1)


@_right_preconditioned
def neumann(
    matvec: Matvec,
    r: Tensor,
    *,
    x0: Tensor | None = None,
    rtol: float | None = None,
    max_iter: int | None = None,
    check_every: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Neumann series x_{k+1} = r + (I − A) x_k, i.e. x = Σ_k (I − A)^k r; r, x0: (B, N).

    Converges (linearly, at rate ‖I − A‖) when the spectral radius of I − A is below one:
    for a fixed point of a contraction T, A = I − ∂T. max_iter defaults to 1000.
    """
    max_iter = 1000 if max_iter is None else max_iter
    thresh = _threshold(r, rtol)
    check_every = _check_every(r, check_every)
    x = r.clone() if x0 is None else x0.clone()
    active = torch.ones(r.shape[0], dtype=torch.bool, device=r.device)
    for k in range(max_iter):
        res = r - matvec(x)
        active = active & (_dot(res, res) > thresh) & torch.isfinite(res).all(-1)
        x = torch.where(active.unsqueeze(-1), x + res, x)
        if (k + 1) % check_every == 0 and not any_true(active):
            break
    res = r - matvec(x)
    return x, (_dot(res, res) <= thresh) & torch.isfinite(x).all(-1)


def materialize(matvec: Matvec, like: Tensor) -> Tensor:
    """The matrices A_b (B, N, N) of a row-wise `matvec`, from N matvecs with unit vectors.

    Because row b of matvec(x) depends only on x_b, applying it to x = e_i in every row at
    once gives column i of every A_b; the N products are vmapped (a Python loop is the
    fallback for a matvec that vmap cannot trace).
    """
    B, N = like.shape
    eye = torch.eye(N, dtype=like.dtype, device=like.device)
    E = eye.unsqueeze(1).expand(N, B, N)
    try:
        cols = torch.func.vmap(matvec)(E)  # (N, B, N): cols[i, b] = A_b e_i
    except Exception:  # noqa: BLE001 - any tracing failure falls back to the exact loop
        cols = torch.stack([matvec(E[i].contiguous()) for i in range(N)])
    return cols.permute(1, 2, 0)


def direct(
    matvec: Matvec,
    r: Tensor,
    *,
    symmetric: bool = False,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """Materialize A_b (see `materialize`) and solve exactly; r: (B, N).

    symmetric=True tries Cholesky first (rows where it fails fall back to QR); otherwise
    Householder QR, x = R⁻¹ Qᵀ r. A singular A_b gives a non-finite row, reported not
    converged.
    """
    A = materialize(matvec, r)
    if symmetric:
        L, info = torch.linalg.cholesky_ex(A)
        ok = info == 0
        x = torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
        if not any_true(~ok):
            return x, torch.isfinite(x).all(-1)
        x = torch.where(ok.unsqueeze(-1), x, _qr_solve(A, r))
        return x, torch.isfinite(x).all(-1)
    x = _qr_solve(A, r)
    return x, torch.isfinite(x).all(-1)


def _qr_solve(A: Tensor, r: Tensor) -> Tensor:
    Qm, R = torch.linalg.qr(A)
    y = Qm.mT @ r.unsqueeze(-1)
    return torch.linalg.solve_triangular(R, y, upper=True).squeeze(-1)


SOLVERS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "cg": cg,
    "gmres": gmres,
    "bicgstab": bicgstab,
    "neumann": neumann,
    "direct": direct,
}
