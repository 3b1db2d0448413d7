"""Amortized variational inference on scikit-learn's bundled 8×8 digits (the tutorial's VAE).

Per-datapoint problem: for an image x ∈ [0, 1]^64 (pixels/16) and a fixed decoder p_φ(x|z),
find the Gaussian q(z) = N(μ, diag σ²) in R^d (d = 10) maximizing the ELBO

    ELBO(μ, log σ²; x) = E_{ε ~ N(0, I)} [log p_φ(x | μ + σ ε)] − KL(q ‖ N(0, I)),

    log p_φ(x | z) = Σ_j x_j log π_j(z) + (1 − x_j) log(1 − π_j(z))   (Bernoulli likelihood
    with the continuous pixels as targets, π = sigmoid(decoder logits); unnormalized as in
    the usual "Bernoulli VAE on grey levels"),

so y = (μ, log σ²) ∈ R^{2d} and f(y; x) = −ELBO. The encoder of a VAE is the amortized model
ŷ_θ(x); the VAE is trained by the objective loss over encoder and decoder jointly.

The variance enters as log σ², as in the tutorial's code and most VAE code: the ELBO does
not depend on the choice, but a per-datapoint optimizer does (Adam at lr 5e-3 from zeros
moves log σ half as fast as with y = (μ, log σ), and on these digits needs ≈ 1,500 instead
of ≈ 800 iterations to reach the encoder's ELBO).
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from amortized.amortize import MLP

Y_LAYOUT = "mu, log sigma^2"  # what y (and the encoder's output) holds; saved with encoders


def load_digits_split(n_test: int = 500, seed: int = 0, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """(train (1797 − n_test, 64), test (n_test, 64)) digits scaled to [0, 1], shuffled by seed."""
    from sklearn.datasets import load_digits

    X = torch.tensor(load_digits().data, dtype=dtype) / 16.0
    if not 0 < n_test < X.shape[0]:
        raise ValueError(f"n_test must be in (0, {X.shape[0]})")
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    return X[perm[n_test:]], X[perm[:n_test]]


def make_vae(latent: int = 10, hidden: int = 256, pixels: int = 64) -> tuple[nn.Module, nn.Module]:
    """Encoder 64 → 256 → 256 → 2·latent (μ, log σ²) and decoder latent → 256 → 256 → 64 logits."""
    return MLP([pixels, hidden, hidden, 2 * latent]), MLP([latent, hidden, hidden, pixels])


def gaussian_kl(y: Tensor) -> Tensor:
    """(B,) KL(N(μ, σ²) ‖ N(0, I)) for y = (μ, log σ²) (B, 2d)."""
    mu, logvar = y.chunk(2, dim=-1)
    return 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1)


class VAEInference:
    """The per-datapoint ELBO problem for a fixed decoder (see the module docstring).

    objective(y, x) -> (B,) −ELBO estimated with `n_samples` reparameterized samples (fresh
    noise each call, from `generator`); `elbo(y, x, eps)` with given noise eps (S, B, d) for
    paired, low-variance comparisons between methods.
    """

    def __init__(
        self,
        decoder: nn.Module,
        latent: int = 10,
        n_samples: int = 1,
        data: Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        self.decoder, self.latent, self.n_samples, self.data, self.generator = (
            decoder,
            latent,
            n_samples,
            data,
            generator,
        )
        self.context_dim, self.solution_dim = 64, 2 * latent
        self.objective_module = decoder  # f's own parameters (implicit refinement trains them)

    def elbo(self, y: Tensor, x: Tensor, eps: Tensor) -> Tensor:
        """(B,) ELBO with noise eps (S, B, d): the mean over S of log p(x|z_s) − KL."""
        mu, logvar = y.chunk(2, dim=-1)
        z = mu + (0.5 * logvar).exp() * eps  # (S, B, d)
        logits = self.decoder(z)
        loglik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        return loglik.mean(0) - gaussian_kl(y)

    def objective(self, y: Tensor, x: Tensor) -> Tensor:
        eps = torch.randn(
            self.n_samples,
            *y.shape[:-1],
            self.latent,
            generator=self.generator,
            dtype=y.dtype,
            device=y.device,
        )
        return -self.elbo(y, x, eps)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n images drawn (with replacement) from the training data p(x)."""
        if self.data is None:
            raise ValueError("VAEInference.sample needs data")
        return self.data[torch.randint(self.data.shape[0], (n,), generator=generator)]

    def elbo_estimate(
        self, y: Tensor, x: Tensor, n_samples: int = 1000, seed: int = 1234, chunk: int = 100
    ) -> Tensor:
        """(B,) ELBO with n_samples common random numbers (the same noise for every call with
        the same seed, so differences between methods are paired), computed in chunks.
        """
        g = torch.Generator(device=y.device).manual_seed(seed)
        total = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device)
        done = 0
        with torch.no_grad():
            while done < n_samples:
                s = min(chunk, n_samples - done)
                eps = torch.randn(s, *y.shape[:-1], self.latent, generator=g, dtype=y.dtype, device=y.device)
                total += self.elbo(y, x, eps) * s
                done += s
        return total / n_samples


def adam_trace(
    problem: VAEInference,
    x: Tensor,
    y0: Tensor,
    *,
    lr: float,
    iters: int,
    every: int,
    sync=lambda: None,
) -> tuple[list[float], list[int], list[Tensor]]:
    """Per-datapoint Adam (torch.optim.Adam) on −ELBO from y0 (B, 2d), one sample per step.

    Returns cumulative wall times, iteration counts and detached iterates at every `every`
    iterations (the snapshot copies are outside the timed region).
    """
    y = y0.detach().clone().requires_grad_()
    opt = torch.optim.Adam([y], lr=lr)
    times, its, snaps = [0.0], [0], [y.detach().clone()]
    elapsed = 0.0
    import time

    for k in range(1, iters + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        problem.objective(y, x).sum().backward()
        opt.step()
        sync()
        elapsed += time.perf_counter() - t0
        if k % every == 0 or k == iters:
            times.append(elapsed)
            its.append(k)
            snaps.append(y.detach().clone())
    return times, its, snaps


def optimize_long(
    problem: VAEInference,
    x: Tensor,
    y0: Tensor,
    *,
    iters: int = 1500,
    lr: float = 5e-3,
    n_samples: int = 8,
) -> Tensor:
    """q*: Adam from y0 with n_samples per step and a cosine-decayed step size."""
    y = y0.detach().clone().requires_grad_()
    opt = torch.optim.Adam([y], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    old = problem.n_samples
    problem.n_samples = n_samples
    try:
        for _ in range(iters):
            opt.zero_grad(set_to_none=True)
            problem.objective(y, x).sum().backward()
            opt.step()
            sched.step()
    finally:
        problem.n_samples = old
    return y.detach()


LOG2PI = math.log(2 * math.pi)
