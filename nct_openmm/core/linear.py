"""The linear symplectic layer of the paper's Appendix A1, acting on the whole phase space."""
from typing import Tuple

import torch
from torch import Tensor, nn


class LinearSymplectic(nn.Module):
    """``(Q, P) = (q, p) exp(Y)`` with the Hamiltonian generator ``Y = [[A, B], [C, −Aᵀ]]``, ``B``, ``C`` symmetric.

    ``exp(Y)`` is symplectic for any such ``Y``; the inverse is ``exp(−Y)``. Unlike the point layers it mixes positions
    with momenta, so a model that contains it no longer has configuration-only latent coordinates (it cannot be
    exported as a collective variable). All blocks start at zero (the identity).

    Examples
    --------
    >>> layer = LinearSymplectic(2)
    >>> q, p = torch.randn(3, 2), torch.randn(3, 2)
    >>> Q, P = layer(q, p)
    >>> q2, p2 = layer.inverse(Q, P)
    >>> torch.allclose(q2, q) and torch.allclose(p2, p)
    True
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.a = nn.Parameter(torch.zeros(dim, dim))
        self.b = nn.Parameter(torch.zeros(dim, dim))
        self.c = nn.Parameter(torch.zeros(dim, dim))

    def generator(self) -> Tensor:
        b = 0.5 * (self.b + self.b.T)
        c = 0.5 * (self.c + self.c.T)
        return torch.cat([torch.cat([self.a, b], dim=1), torch.cat([c, -self.a.T], dim=1)], dim=0)

    def _map(self, x: Tensor, y: Tensor, sign: float) -> Tuple[Tensor, Tensor]:
        out = torch.cat([x, y], dim=-1) @ torch.linalg.matrix_exp(sign * self.generator()).to(x.dtype)
        return out[..., : self.dim], out[..., self.dim:]

    def forward(self, q: Tensor, p: Tensor) -> Tuple[Tensor, Tensor]:
        return self._map(q, p, 1.0)

    def inverse(self, Q: Tensor, P: Tensor) -> Tuple[Tensor, Tensor]:
        return self._map(Q, P, -1.0)
