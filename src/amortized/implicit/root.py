"""Differentiate y*(θ) defined by F(y*, θ) = 0 without differentiating the solver.

By the implicit function theorem ∂y*/∂θ = −(∂F/∂y)⁻¹ ∂F/∂θ, so a vector-Jacobian product
is one linear solve and one vjp:

    (∂F/∂y)ᵀ u = v,     v̄_θ = −uᵀ ∂F/∂θ.

Everything here goes through ONE `torch.autograd.Function` (`_Implicit`): it runs a solver
(or takes a solution computed elsewhere) in its forward and, in its backward, builds the
transposed Jacobian product u ↦ (∂F/∂y)ᵀu with `torch.func.vjp`, hands it to a pluggable
linear solve, and finishes with one vjp w.r.t. the parameters. The solve may ignore the
product and reuse a structured factorization from the forward pass (the QP's KKT Cholesky,
as in OptNet) and be polished by iterative refinement against the exact product
(`implicit_root`), or be a batched matrix-free Krylov method or a dense per-problem solve
(`custom_root`, `custom_fixed_point`). A Krylov solve can be preconditioned by curvature
the forward solver already has (`Preconditioned(y, M)`: a Newton step's Cholesky factor,
whose tensors are then kept until the backward) or by M built in the backward
(`custom_root(precond=...)`): with M = (∂F/∂y)⁻ᵀ it stops after one matvec, and the
tolerance is still tested on the true residual. The systems of the B problems are solved
independently (never one (B·N)×(B·N) system). This follows jaxopt's `custom_root` /
`root_vjp` (Blondel et al., "Efficient and Modular Implicit Differentiation", 2022).

The Function uses `setup_context`, so `torch.func.grad`/`vjp` over outer functions work,
and has a `vmap` rule (the vmapped dimension is looped over, each slice an independent
call), so `torch.func.vmap` over a function that calls a decorated solver works too.

Second derivatives (create_graph=True): the backward then makes u a differentiable
function of (y, θ, v) through a second Function (`_Adjoint`), whose own backward solves the
untransposed system (∂F/∂y) w = ū once per second-order product.
"""

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from amortized.linalg import linear_solve as ls

Tensors = tuple[Tensor, ...]
# (matvec: tuple -> tuple, v: tuple, precond: tuple -> tuple | None) -> u with (∂F/∂y)ᵀ u = v
TupleSolve = Callable[..., Tensors]


@dataclass(frozen=True)
class Preconditioner:
    """M ≈ (∂F/∂y)⁻ᵀ for the implicit backward, handed over by a forward solver from
    curvature it already has (the Cholesky factor of a Newton step, L-BFGS pairs), so the
    backward's Krylov solve needs a few matvecs instead of tens (with M exact, one).

    apply(v, *tensors) -> M v: v and the result shaped like the solution y (a tensor (B, ...),
    or a tuple of such tensors for a tuple solution), row b depending only on row b of v.
    tensors: everything apply reads besides v. The implicit Function saves them for its
    backward, so they are graph memory like an unrolled solver's iterates (and are seen by
    saved-tensor hooks): apply must not close over other large tensors. For "cg" M must be
    symmetric positive definite (it is for the inverse of a positive definite Hessian
    approximation); for the other iterative solves any non-singular M works.
    """

    apply: Callable[..., Tensor | Tensors]
    tensors: Tensors = ()

    def __call__(self, v: Tensor | Tensors) -> Tensor | Tensors:
        return self.apply(v, *self.tensors)


def _cholesky_apply(v: Tensor, L: Tensor) -> Tensor:
    return torch.cholesky_solve(v.unsqueeze(-1), L).squeeze(-1)


def cholesky_preconditioner(L: Tensor) -> Preconditioner:
    """M v = (L Lᵀ)⁻¹ v for a solution y (B, n) and lower Cholesky factors L (B, n, n) of
    (an approximation of) the symmetric Jacobian ∂F/∂y, e.g. the Hessian of an argmin. With
    the exact Hessian at the solution the backward's CG converges after one matvec."""
    return Preconditioner(_cholesky_apply, (L,))


class Preconditioned(NamedTuple):
    """What a solver decorated by `custom_root` may return instead of y: the solution and a
    `Preconditioner` for the backward's linear solve. The decorated solver still returns y."""

    y: Tensor | Tensors
    precond: Preconditioner | None


class _Spec:
    """The non-tensor part of one implicit call. run(*inputs) -> ys (a tuple) or
    Preconditioned(ys, M); the forward records how many ys there are and M's apply (its
    tensors travel as extra non-differentiable outputs, so they are saved like any output).
    solve(matvec, v, precond) -> u; refine: iterative-refinement steps; n_pre: leading inputs
    (an initial guess, or the solution itself) that get no gradient; single: whether M acts
    on one tensor rather than a tuple; build(y, params) -> Preconditioner | None makes one
    in the backward instead (nothing kept); vjp_y(ys, params, u) -> (∂F/∂y)ᵀu and
    vjp_p(ys, params, w, wanted) -> [(∂F/∂θ_i)ᵀw for i in wanted], closed forms used
    instead of torch.func.vjp of F."""

    def __init__(
        self, run, F, solve, refine: int, n_pre: int, single=lambda: False, build=None, vjp_y=None, vjp_p=None
    ):
        self.run, self.F, self.solve, self.refine, self.n_pre, self.single = (
            run,
            F,
            solve,
            refine,
            n_pre,
            single,
        )
        self.build, self.vjp_y, self.vjp_p = build, vjp_y, vjp_p
        self.refine_tol = 0.0  # refinement stops once a correction is this small relative to u
        self.wide = False  # refinement residuals in float64 (for float32 solutions)
        # second derivatives: solve_forward(ū) -> w with (∂F/∂y) w = ū, when the caller has a
        # factorization for it; frozen() -> (B,) rows whose gradients are held at zero
        self.solve_forward: Callable[[Tensors], Tensors] | None = None
        self.frozen: Callable[[], Tensor | None] = lambda: None
        self.n_y = 0
        self.apply: Callable | None = None


def _vmap_by_slices(fn: type[torch.autograd.Function], info, in_dims, spec, inputs) -> tuple:
    """The vmap rule of our Functions: each slice of the vmapped dimension is an independent
    implicit problem, solved one after another (a solver may use data-dependent control
    flow that vmap forbids)."""
    dims = in_dims[1:]
    outs = []
    for k in range(info.batch_size):
        sl = [x if d is None else x.select(d, k) for x, d in zip(inputs, dims, strict=True)]
        outs.append(fn.apply(spec, *sl))
    stacked = tuple(torch.stack(o) for o in zip(*outs, strict=True))
    return stacked, (0,) * len(stacked)


class _Implicit(torch.autograd.Function):
    """forward(spec, *inputs): ys = spec.run(*inputs) (+ the preconditioner's tensors); the
    last len(inputs) − spec.n_pre inputs are the parameters θ of F(*ys, *θ)."""

    @staticmethod
    def forward(spec, *inputs):
        out = spec.run(*inputs)
        extra: Tensors = ()
        if isinstance(out, Preconditioned):
            out, pc = out
            if pc is not None:
                spec.apply, extra = pc.apply, tuple(pc.tensors)
        spec.n_y = len(out)
        # Clone: an output must not alias an input (a solver may return its init unchanged).
        return tuple(y.detach().clone() for y in out) + tuple(t.detach() for t in extra)

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, *args = inputs
        params = args[spec.n_pre :]
        ctx.spec, ctx.n_y, ctx.n_out = spec, spec.n_y, len(output)
        ctx.mark_non_differentiable(*output[spec.n_y :])
        ctx.tensor_idx = [i for i, p in enumerate(params) if isinstance(p, Tensor)]
        ctx.others = [None if isinstance(p, Tensor) else p for p in params]
        ctx.save_for_backward(*output, *(params[i] for i in ctx.tensor_idx))

    @staticmethod
    def backward(ctx, *v):
        spec = ctx.spec
        saved = ctx.saved_tensors
        ys, extra, tparams = saved[: ctx.n_y], saved[ctx.n_y : ctx.n_out], saved[ctx.n_out :]
        params = list(ctx.others)
        for i, p in zip(ctx.tensor_idx, tparams, strict=False):
            params[i] = p
        offset = 1 + spec.n_pre
        wanted = [i for i in ctx.tensor_idx if ctx.needs_input_grad[offset + i]]
        v = tuple(torch.zeros_like(y) if g is None else g for y, g in zip(ys, v[: ctx.n_y], strict=False))

        F_of = _AdjointSpec(spec, params, wanted).F  # F(ys, θ_wanted), the rest fixed

        out: list[Tensor | None] = [None] * len(params)
        if not wanted:
            return (None,) * offset + tuple(out)
        # create_graph=True: the gradients below are built differentiably (second derivatives).
        # Under torch.func transforms the backward's own operations are traced instead (as
        # jacrev(grad(f)) needs), so nothing is detached or wrapped there
        functorch = torch._C._are_functorch_transforms_active()
        create_graph = torch.is_grad_enabled() and not functorch
        ys_d = tuple(y.detach() for y in ys)
        ps_d = tuple(params[i].detach() for i in wanted)
        # Two linearizations of F: one in y alone for the solve's matvecs, so that no
        # iteration computes the parameter cotangents it would throw away (for a layer's
        # weights they cost as much as the y-product), and one in θ for the final vjp;
        # closed forms (spec.vjp_y, spec.vjp_p) replace them where given.
        params_d = [p.detach() if isinstance(p, Tensor) else p for p in params]
        matvec = _transposed_product(spec, ys_d, params_d, wanted)
        # mixed precision (`wide`): the refinement's residuals in float64, so that a float32
        # factor's answer is refined to float32's accuracy, not to cond·ε₃₂
        wide = spec.wide and not functorch and ys_d[0].dtype != torch.float64
        matvec_r = matvec
        if wide:
            f64 = lambda x: x.double() if isinstance(x, Tensor) and x.is_floating_point() else x
            matvec_r = _transposed_product(spec, tuple(map(f64, ys_d)), [f64(p) for p in params_d], wanted)

        M, single = None, spec.single()
        if spec.apply is not None:
            M = Preconditioner(spec.apply, extra)
        elif spec.build is not None:
            with torch.no_grad():
                M = spec.build(ys_d[0] if single else ys_d, params)
        precond = None
        if M is not None:

            def precond(u: Tensors) -> Tensors:  # M u ≈ (∂F/∂y)⁻ᵀ u, per problem
                mu = M(u[0] if single else u)
                return (mu,) if single else tuple(mu)

        v_d = v if functorch else tuple(vi.detach() for vi in v)
        with contextlib.nullcontext() if functorch else torch.no_grad():
            u = tuple(spec.solve(matvec, v_d, precond))
            # `wide`: u and the residuals in float64, each correction solved in v's dtype
            up = wide and spec.refine
            u_r, v_r = (tuple(x.double() for x in u), tuple(x.double() for x in v_d)) if up else (u, v_d)
            for _ in range(spec.refine):
                r = tuple((vi - ji).to(di.dtype) for vi, ji, di in zip(v_r, matvec_r(u_r), v_d, strict=False))
                du = spec.solve(matvec, r, precond)
                u_r = tuple(ui + di.to(ui.dtype) for ui, di in zip(u_r, du, strict=False))
                # (not under torch.func's transforms, which cannot branch on a value)
                if spec.refine_tol and not functorch and _converged(du, u_r, spec.refine_tol):
                    break
            u = tuple(ui.to(vi.dtype) for ui, vi in zip(u_r, v_d, strict=False))
        if create_graph:
            # u(y, θ, v) and the final product, differentiable: ys are the saved outputs,
            # whose graph leads back to θ through this very Function; integer tensors
            # (indices) carry no gradient and stay fixed in the adjoint's F
            fidx = [i for i in ctx.tensor_idx if params[i].is_floating_point() or params[i].is_complex()]
            aspec = _AdjointSpec(spec, [None if i in fidx else p for i, p in enumerate(params)], fidx)
            u = _Adjoint.apply(aspec, *u, *ys, *(params[i] for i in fidx), *v)
            ys_d, ps_d = ys, tuple(params[i] for i in wanted)
        w = tuple(-ui for ui in u)
        if spec.vjp_p is None:
            with torch.enable_grad():
                _, vjp_p = torch.func.vjp(lambda ps_: F_of(ys_d, ps_), ps_d)
            (grads,) = vjp_p(w)
        else:
            ps = params if create_graph else [p.detach() if isinstance(p, Tensor) else p for p in params]
            grads = spec.vjp_p(ys_d, ps, w, wanted)
        for i, g in zip(wanted, grads, strict=False):
            out[i] = g
        return (None,) * offset + tuple(out)

    @staticmethod
    def vmap(info, in_dims, spec, *inputs):
        return _vmap_by_slices(_Implicit, info, in_dims, spec, inputs)


def _transposed_product(spec: _Spec, ys: Tensors, params: list, wanted: list[int]) -> Callable:
    """u ↦ (∂F/∂y)ᵀu at (ys, params), row by row: the closed form spec.vjp_y, or
    torch.func.vjp of F in y (params detached)."""
    if spec.vjp_y is not None:
        return lambda u: tuple(spec.vjp_y(ys, params, u))
    F_of = _AdjointSpec(spec, params, wanted).F
    with torch.enable_grad():
        _, vjp_y = torch.func.vjp(lambda ys_: F_of(ys_, [params[i] for i in wanted]), ys)
    return lambda u: vjp_y(u)[0]


class _AdjointSpec:
    """The implicit call's F as a function of ys and the parameters at `tensor_idx`, the
    other entries of `params` fixed; what `_Adjoint` needs besides tensors (there the
    entries at tensor_idx are None: they are the adjoint's inputs)."""

    def __init__(self, spec: _Spec, params: list, tensor_idx: list[int]):
        self.spec, self.params, self.tensor_idx = spec, params, tensor_idx

    def F(self, ys: Tensors, tparams: Sequence[Tensor]) -> Tensors:
        full = list(self.params)
        for i, p in zip(self.tensor_idx, tparams, strict=True):
            full[i] = p
        return tuple(self.spec.F(*ys, *full))


class _Adjoint(torch.autograd.Function):
    """forward(spec, *u, *ys, *θ, *v) -> u: the backward's solution of (∂F/∂y)ᵀu = v, made a
    differentiable function of (y, θ, v) for second derivatives (create_graph=True), by
    implicit differentiation of G(u; y, θ, v) = (∂F/∂y)ᵀu − v = 0, linear in u:

        (∂F/∂y) w = ū,    v̄ = w,    (ȳ, θ̄) = −∂/∂(y, θ) ⟨(∂F/∂y)ᵀu, w⟩.

    The solve is the caller's (`solve_forward`, e.g. the QP's KKT factor) or GMRES without
    restarts on products (∂F/∂y)w; the last line is a double backward through F. Third
    derivatives are not supported (once_differentiable)."""

    @staticmethod
    def forward(aspec, *args):
        n = aspec.spec.n_y
        return tuple(u.detach().clone() for u in args[:n])

    @staticmethod
    def setup_context(ctx, inputs, output):
        aspec, *args = inputs
        ctx.aspec = aspec
        n, k = aspec.spec.n_y, len(aspec.tensor_idx)
        ctx.save_for_backward(*args[: 2 * n + k])  # u, ys, θ (v enters linearly: not needed)

    @staticmethod
    def vmap(info, in_dims, aspec, *inputs):
        return _vmap_by_slices(_Adjoint, info, in_dims, aspec, inputs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *u_bar):
        aspec = ctx.aspec
        spec = aspec.spec
        n, k = spec.n_y, len(aspec.tensor_idx)
        saved = ctx.saved_tensors
        u, ys, tparams = saved[:n], saved[n : 2 * n], saved[2 * n : 2 * n + k]
        frozen = spec.frozen()
        keep = None if frozen is None else ~frozen

        def dense(xs: Sequence[Tensor | None]) -> Tensors:  # shaped like u, None as zeros
            return tuple(torch.zeros_like(ui) if x is None else x for ui, x in zip(u, xs, strict=True))

        def masked(xs: Sequence[Tensor | None]) -> Tensors:
            xs = dense(xs)
            if keep is None:
                return xs
            return tuple(x * keep.reshape(-1, *(1,) * (x.dim() - 1)) for x in xs)

        u_bar = masked(u_bar)  # frozen rows: nothing to solve
        # one graph of (∂F/∂y)ᵀu, linear in u, serves every product below: (∂F/∂y) w is its
        # gradient in u along w (reverse mode twice; torch.func.jvp would go through
        # torch.jit), and (ȳ, θ̄) its gradient in (y, θ)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (*ys, *tparams)]
            u_l = [ui.detach().requires_grad_() for ui in u]
            out = aspec.F(tuple(leaves[:n]), leaves[n:])
            JTu = torch.autograd.grad(out, leaves[:n], u_l, create_graph=True, allow_unused=True)
        pairs = [(a, i) for i, a in enumerate(JTu) if a is not None]

        def grad_inner(w: Tensors, wrt: list[Tensor]) -> list[Tensor | None]:
            """∂/∂wrt ⟨(∂F/∂y)ᵀu, w⟩."""
            if not pairs:
                return [None] * len(wrt)
            with torch.enable_grad():
                inner = sum((a * w[i]).sum() for a, i in pairs)
                return list(torch.autograd.grad(inner, wrt, retain_graph=True, allow_unused=True))

        if spec.solve_forward is not None:
            w = masked(spec.solve_forward(u_bar))
        else:
            # GMRES without restarts on (∂F/∂y) w (a KKT-like Jacobian stalls a restarted
            # one); rows that do not converge warn and get w = 0
            w = masked(_second_order_solve(lambda w_: dense(grad_inner(w_, u_l)), u_bar))
        if not pairs:
            return (None, *(None,) * n, *(None,) * k, *w)
        both = grad_inner(w, [*u_l, *leaves])  # (∂F/∂y) w and (ȳ, θ̄) in one pass
        Jw, grads = dense(both[:n]), both[n:]
        # where (∂F/∂y) w misses ū by far (measured: 0.2-0.5 relative at degenerate QP
        # solutions, 1e-7 at weakly active ones, 1e-10 otherwise), the Jacobian is singular
        # with ū outside its range, and the regularized solve's w is of the size 1/δ:
        # zeroed, with a warning
        bad = _misses(Jw, u_bar)
        if bool(bad.any()):
            warnings.warn(
                "implicit second derivative: the Jacobian at the solution of problems "
                f"{bad.nonzero().flatten().tolist()[:10]} is singular (a degenerate solution, "
                "e.g. dependent active constraints): their second derivatives are not reliable",
                RuntimeWarning,
                stacklevel=3,
            )
            w = tuple(torch.where(bad.reshape(-1, *(1,) * (wi.dim() - 1)), 0.0, wi) for wi in w)
            grads = grad_inner(w, leaves)
        grads = [None if g is None else -g for g in grads]
        return (None, *(None,) * n, *grads, *w)


def _misses(Jw: Tensors, u_bar: Tensors) -> Tensor:
    """(B,) whether ‖Jw − ū‖∞ exceeds ε^¼ of ‖ū‖∞ + ‖Jw‖∞, row by row."""
    res = _flat([a - b for a, b in zip(Jw, u_bar, strict=True)]).abs().amax(-1)
    size = _flat(u_bar).abs().amax(-1) + _flat(Jw).abs().amax(-1)
    return res > torch.finfo(res.dtype).eps ** 0.25 * size


def implicit_root(
    F: Callable[..., Tensors],
    solve_transpose: Callable[[Tensors], Tensors],
    ys: Sequence[Tensor],
    params: Sequence[Tensor | None],
    *,
    refine: int = 1,
    refine_tol: float = 0.0,
    wide: bool = False,
    vjp_y: Callable[[Tensors, list, Tensors], Tensors] | None = None,
    vjp_p: Callable[[Tensors, list, Tensors, list[int]], Sequence[Tensor]] | None = None,
    solve_forward: Callable[[Tensors], Tensors] | None = None,
    frozen: Tensor | Callable[[], Tensor] | None = None,
) -> Tensors:
    """Attach implicit gradients to a solution computed elsewhere.

    F(*ys, *params) -> residuals shaped like ys, zero at the solution; row b of each
    residual must depend only on problem b (params may broadcast over the batch, and then
    their gradients are summed over it). solve_transpose(v) returns u with
    (∂F/∂y)ᵀ u ≈ v for a tuple v shaped like ys (e.g. from a factorization reused from the
    forward pass). `refine` iterative-refinement steps correct u against the exact
    Jacobian: (∂F/∂y)ᵀ u from torch.func.vjp of F, or from vjp_y(ys, params, u) when given;
    they stop early once every problem's correction is ≤ refine_tol times its u (∞-norms).
    `wide`: their residuals in float64 for float32 ys (mixed-precision refinement: the
    answer then reaches float32's accuracy where cond·ε₃₂ < 1, not cond·ε₃₂).
    The gradients are −uᵀ ∂F/∂θ, likewise from torch.func.vjp of F or from
    vjp_p(ys, params, w, wanted), the list of (∂F/∂θ_i)ᵀw for the indices i in `wanted`
    (shaped like params[i]). Closed forms spare linearizing F through torch.func, most of a
    small problem's backward. Returns ys, now differentiable w.r.t. params, twice: with
    create_graph=True the backward builds its gradients differentiably (`_Adjoint`; vjp_y
    and vjp_p must then be differentiable torch operations), and each second-order product
    solves (∂F/∂y) w = ū, with solve_forward(ū) when given (the same factorization, used
    untransposed), otherwise by GMRES. frozen: (B,) bool, or a function returning it at the
    second-order product: problems whose solve_transpose returns u = 0 (not solved), held
    at zero there too.
    """
    n_y = len(ys)

    def run(*inputs):
        return inputs[:n_y]

    spec = _Spec(run, F, lambda matvec, v, precond: solve_transpose(v), refine, n_y, vjp_y=vjp_y, vjp_p=vjp_p)
    spec.solve_forward, spec.refine_tol, spec.wide = solve_forward, refine_tol, wide
    if frozen is not None:
        spec.frozen = frozen if callable(frozen) else (lambda: frozen)
    return _Implicit.apply(spec, *ys, *params)[:n_y]


def _converged(du: Tensors, u: Tensors, tol: float) -> bool:
    """Whether every problem's correction is ≤ tol times its u (∞-norms per row, so a
    small problem's slow refinement does not hide under a large one's; one sync)."""
    if not _flat(u).numel():
        return True
    return bool((_flat(du).abs().amax(-1) <= tol * _flat(u).abs().amax(-1)).all())


def _flat(ts: Sequence[Tensor]) -> Tensor:
    B = ts[0].shape[0]
    return torch.cat([t.reshape(B, -1) for t in ts], dim=-1)


def _unflat(x: Tensor, like: Sequence[Tensor]) -> Tensors:
    out, k = [], 0
    for t in like:
        size = t[0].numel() if t.shape[0] else t.numel()
        out.append(x[:, k : k + size].reshape(t.shape))
        k += size
    return tuple(out)


def make_transpose_solve(
    solve: str | Callable,
    *,
    symmetric: bool = False,
    rtol: float | None = None,
    max_iter: int | None = None,
    name: str = "implicit backward",
) -> TupleSolve:
    """A tuple-level solve of (∂F/∂y)ᵀ u = v from a named batched solver or a callable.

    solve: "cg" | "gmres" | "bicgstab" | "neumann" | "direct", or a callable
    solve(matvec, r) -> x or (x, converged) on flat per-problem vectors r (B, N), where
    matvec(x) = (∂F/∂y)ᵀ x row-wise; when the forward solver attached a `Preconditioner`
    the callable is called as solve(matvec, r, precond=M) with M acting on (B, N) rows too
    (the named iterative solves use it, "direct" ignores it). Rows whose solve fails to
    converge or is not finite warn (RuntimeWarning); non-finite rows get u = 0, so no NaN
    reaches the parameters. The result is tuple_solve(matvec, v, precond=None) on tuples.
    """
    if isinstance(solve, str):
        if solve not in ls.SOLVERS:
            raise ValueError(
                f"unknown linear solve {solve!r}; choose from {sorted(ls.SOLVERS)} or pass a callable"
            )
        fn = ls.SOLVERS[solve]
        kwargs: dict = {"rtol": rtol, "max_iter": max_iter}
        if solve == "direct":
            kwargs = {"symmetric": symmetric}

        def flat_solve(matvec, r, **pc):
            return fn(matvec, r, **kwargs, **pc)
    elif callable(solve):
        flat_solve = solve
    else:
        raise TypeError(f"solve must be a string or a callable, got {type(solve).__name__}")

    def tuple_solve(matvec, v, precond=None):
        r = _flat(v)

        def flat_matvec(x):
            return _flat(matvec(_unflat(x, v)))

        pc = {}
        if precond is not None:
            pc["precond"] = lambda x: _flat(precond(_unflat(x, v)))
        out = flat_solve(flat_matvec, r, **pc)
        x, ok = out if isinstance(out, tuple) else (out, torch.isfinite(out).all(-1))
        finite = torch.isfinite(x).all(-1)
        x = torch.where(finite.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        if ls.any_true(~ok) and _concrete(ok):
            bad = (~ok).nonzero().flatten().tolist()[:10]
            warnings.warn(
                f"{name}: the linear solve did not converge for problems {bad}"
                " (non-finite rows get zero gradients)",
                RuntimeWarning,
                stacklevel=3,
            )
        return _unflat(x, v)

    return tuple_solve


def _full_gmres(matvec, r):
    x, ok = ls.gmres(matvec, r, restart=r.shape[-1], max_iter=2 * r.shape[-1] + 10)
    return torch.where(ok.unsqueeze(-1), x, 0.0), ok


# the adjoint's own solve, (∂F/∂y) w = ū, where the caller has no factorization for it
_second_order_solve = make_transpose_solve(_full_gmres, name="implicit second derivative")


def _concrete(t: Tensor) -> bool:
    """Whether t can be inspected on the host (not a vmap-batched tensor)."""
    try:
        bool(t.any())
        return True
    except RuntimeError:
        return False


def custom_root(
    optimality_fn: Callable[..., Tensor | Tensors],
    solve: str | Callable = "gmres",
    *,
    symmetric: bool = False,
    rtol: float | None = None,
    max_iter: int | None = None,
    has_aux: bool = False,
    precond: Callable[..., Preconditioner | None] | None = None,
):
    """Decorator: make `solver(init, *params) -> y` differentiable by implicit differentiation
    of `optimality_fn(y, *params) = 0` (jaxopt's `custom_root`, Blondel et al. 2022).

    y: (B, ...) batch-first, or a tuple of such tensors; optimality_fn returns residuals
    shaped like y, zero at the solution, whose row b depends only on problem b. params may
    be batched (B, ...) or shared across the batch (their gradients are then summed over
    it); non-tensor params are passed through. The solver runs inside the autograd Function's
    forward with autograd off, so it need not be differentiable (a no_grad loop, scipy, C).

    Backward, per problem b: solve (∂F/∂y)ᵀ u = −v (`solve`: "gmres" by default, "cg" when
    the Jacobian is symmetric positive definite (an argmin's Hessian), "bicgstab",
    "neumann", "direct", or a callable, see `make_transpose_solve`), then one vjp w.r.t.
    the params. `symmetric` lets "direct" use Cholesky. `rtol`, `max_iter` tune the
    iterative solves. has_aux: the solver returns (y, aux); aux is returned untouched.

    Curvature from the forward: the solver may return `Preconditioned(y, M)` (in place of
    y, also inside (y, aux)) with a `Preconditioner` M ≈ (∂F/∂y)⁻ᵀ built from what it
    already computed, e.g. `cholesky_preconditioner(L)` with the factor of its last Newton
    step, or `solvers.lbfgs`'s `sol.precond`. The iterative solve is then preconditioned by
    M: one or a few matvecs instead of tens, still to the same tolerance on the true
    residual. M's tensors are kept until the backward (graph memory). Or, keeping nothing,
    `precond(y, *params) -> Preconditioner | None` builds M in the backward (its cost is
    then part of the backward), e.g. `cholesky_preconditioner` of a Hessian written out in
    closed form. A preconditioner returned by the solver takes precedence.

    The decorated solver returns y (or (y, aux)); `init` receives no gradient.
    """
    tsolve = make_transpose_solve(
        solve, symmetric=symmetric, rtol=rtol, max_iter=max_iter, name="custom_root backward"
    )

    def decorator(solver):
        @functools.wraps(solver)
        def wrapped(init, *params):
            meta: dict = {}

            def run(init_, *ps):
                out = solver(init_, *ps)
                if has_aux:
                    out, meta["aux"] = out
                precond = None
                if isinstance(out, Preconditioned):
                    out, precond = out
                meta["single"] = isinstance(out, Tensor)
                ys = (out,) if meta["single"] else tuple(out)
                return Preconditioned(ys, precond)

            def F(*args):
                n_y = len(args) - len(params)
                ys, ps = args[:n_y], args[n_y:]
                res = optimality_fn(ys[0] if meta["single"] else ys, *ps)
                return (res,) if meta["single"] else tuple(res)

            build = None if precond is None else (lambda y, ps: precond(y, *ps))
            spec = _Spec(run, F, tsolve, 0, 1, single=lambda: meta["single"], build=build)
            ys = _Implicit.apply(spec, init, *params)[: spec.n_y]
            y = ys[0] if meta["single"] else ys
            return (y, meta.get("aux")) if has_aux else y

        return wrapped

    return decorator


def custom_fixed_point(
    T: Callable[..., Tensor | Tensors],
    solve: str | Callable = "gmres",
    *,
    rtol: float | None = None,
    max_iter: int | None = None,
    has_aux: bool = False,
    precond: Callable[..., Preconditioner | None] | None = None,
):
    """Decorator for a solver of y = T(y, *params) (y (B, ...) batch-first; row b of T
    depends only on problem b): `custom_root` with optimality y − T(y, *params).

    The backward solves (I − ∂T/∂y)ᵀ u = −v per problem; "neumann" sums the series
    Σ (∂T/∂yᵀ)^k, which converges for a contraction (the DEQ setting); "gmres" (default)
    needs only I − ∂T non-singular. precond (and a solver returning `Preconditioned`):
    M ≈ (I − ∂T/∂y)⁻ᵀ, see `custom_root`.
    """

    def residual(y, *params):
        t = T(y, *params)
        if isinstance(y, Tensor):
            return y - t
        return tuple(a - b for a, b in zip(y, t, strict=False))

    return custom_root(residual, solve, rtol=rtol, max_iter=max_iter, has_aux=has_aux, precond=precond)
