"""The harmonic latent Hamiltonian ``K(Q, P) = Σ_k (P_k² + ω_k² Q_k²) / 2`` (paper Eq. 4) and its density."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn


class HarmonicPrior(nn.Module):
    """Independent harmonic oscillators at inverse temperature 1, with learnable frequencies ω > 0.

    ``ω = exp(log_omega)``; the density of ``(Q, P)`` is ``exp(−K) · Π ω_k / (2π)``. The slow modes are the ones
    with the smallest ω: ``Q_k`` then has the largest variance ``1/ω_k²``.

    Examples
    --------
    >>> prior = HarmonicPrior(torch.tensor([0.5, 2.0]))
    >>> prior.frequencies().detach()
    tensor([0.5000, 2.0000])
    """

    def __init__(self, frequencies: Tensor):
        super().__init__()
        if torch.any(frequencies <= 0) or not torch.all(torch.isfinite(frequencies)):
            raise ValueError("initial frequencies must be finite and positive")
        self.log_omega = nn.Parameter(torch.log(frequencies.detach().clone().float()))

    @property
    def dim(self) -> int:
        return self.log_omega.numel()

    def frequencies(self) -> Tensor:
        """ω in the model's order (not sorted; see :meth:`slow_order`)."""
        return torch.exp(self.log_omega)

    def slow_order(self) -> Tensor:
        """Mode indices sorted by ascending ω (slowest first)."""
        return torch.argsort(self.log_omega.detach())

    def energy(self, Q: Tensor, P: Tensor) -> Tensor:
        omega = self.frequencies().to(Q.dtype)
        return 0.5 * (P ** 2 + (omega * Q) ** 2).sum(-1)

    def log_prob(self, Q: Tensor, P: Tensor) -> Tensor:
        log_norm = (self.log_omega.to(Q.dtype) - math.log(2 * math.pi)).sum()
        return log_norm - self.energy(Q, P)

    def sample(self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float32,
               whiten: bool = False) -> Tuple[Tensor, Tensor]:
        """Draw ``n`` latent points ``(Q, P)``.

        ``whiten`` returns a batch whose standard-normal draws have exactly zero mean and unit covariance (see
        :func:`whiten_batch`): a lower-variance batch for training, not independent samples.
        """
        device = self.log_omega.device
        Q = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device)
        P = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device)
        if whiten:
            Q, P = whiten_batch(Q), whiten_batch(P)
        return Q / self.frequencies().to(dtype), P


def whiten_batch(x: Tensor) -> Tensor:
    """Map a batch of standard-normal draws onto one with sample mean 0 and sample covariance exactly ``I``.

    Symmetric (ZCA) whitening, ``x ↦ (x − x̄) C^(−1/2)``, so that no coordinate is singled out. Every second moment
    of the batch then equals its expectation; an expectation of a quadratic function (a harmonic Hamiltonian through a
    linear map, and to leading order any smooth one near its harmonic limit) is estimated without Monte-Carlo noise.
    The batch is no longer an independent sample: estimates of non-quadratic terms carry an ``O(1/n)`` bias, harmless
    for training, so an unbiased free energy should still be computed on plain draws.

    Examples
    --------
    >>> x = whiten_batch(torch.randn(1000, 3, dtype=torch.float64))
    >>> torch.allclose(x.T @ x / 1000, torch.eye(3, dtype=torch.float64))
    True
    """
    n, dim = x.shape
    if n <= dim:
        raise ValueError(f"whitening needs more samples than dimensions, got {n} samples of {dim}")
    centred = x - x.mean(0)
    # eigh in float64: the covariance of a few hundred float32 draws is well conditioned, but its inverse square
    # root in float32 would leave ~1e-6 covariance errors that defeat the purpose for small-variance terms.
    covariance = (centred.T.double() @ centred.double()) / n
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    inverse_root = (vectors * eigenvalues.rsqrt()) @ vectors.T
    return centred @ inverse_root.to(x.dtype)


def spread_frequencies(dim: int, ratio: float = 10.0) -> Tensor:
    """Data-free initial frequencies: ``dim`` values log-spaced over ``ratio`` with geometric mean 1.

    With all-equal ω the latent modes are interchangeable: the prior, and with it the loss, is invariant under
    rotations of ``Q``, so nothing in the early gradient decides which direction becomes slow. Distinct ω break that
    symmetry from the first step. In the ring-world example this decides the outcome: an elongated initial latent
    Gaussian bends into the ring and its slow mode becomes the angle, whereas equal ω end in a hole punched into an
    isotropic Gaussian (a local minimum ~0.55 kT above ``−ln Z`` instead of ~0.3). Nothing about the system is used.

    Examples
    --------
    >>> spread_frequencies(3, ratio=100.0)
    tensor([ 0.1000,  1.0000, 10.0000])
    """
    if ratio < 1.0:
        raise ValueError(f"ratio must be at least 1, got {ratio}")
    if dim == 1:
        return torch.ones(1)
    half = 0.5 * math.log(ratio)
    return torch.exp(torch.linspace(-half, half, dim))
