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

    def sample(self, n: int, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
        """Draw ``n`` latent points ``(Q, P)``."""
        device = self.log_omega.device
        Q = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device)
        P = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device)
        return Q / self.frequencies().to(dtype), P
