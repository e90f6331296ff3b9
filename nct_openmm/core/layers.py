"""Point layers: bijections ``Q = f(q)`` of configuration space together with their cotangent lift.

Phase-space convention used throughout nct_openmm: a point of phase space is the pair of row vectors ``(q, p)``
(positions first, momenta second), each of shape ``(batch, n)``; latent points are ``(Q, P)``. The symplectic form
is ``J = [[0, I], [-I, 0]]`` in this order.

A point transformation ``Q = f(q)`` becomes canonical when the momenta transform as ``P = p ∂q/∂Q`` (paper Eq. 3):
every layer here maps positions forward and inverse, and carries momenta through itself in both directions
(``lift``: ``p ↦ P``; ``unlift``: ``P ↦ p``) with one vector–Jacobian product, never with a full Jacobian. The
vector–Jacobian products are written out in closed form rather than taken from autograd, so that training through the
momenta differentiates once (an ordinary backward pass), not twice.
"""
from typing import List, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class PointLayer(nn.Module):
    """Interface of a layer of a point transformation.

    Subclasses implement :meth:`forward_with_momentum` and :meth:`inverse_with_momentum` (positions and momenta
    together, sharing one conditioner evaluation) and :meth:`forward` / :meth:`inverse` (positions alone, the fast
    path used by exported CVs).
    """

    def forward(self, q: Tensor) -> Tensor:
        raise NotImplementedError

    def inverse(self, Q: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_with_momentum(self, q: Tensor, p: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_with_momentum(self, Q: Tensor, P: Tensor) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError


class AffinePoint(PointLayer):
    """Fixed affine map ``Q = ((q − shift) M) ⊙ scale`` with an invertible matrix ``M``.

    Used to put data into a well-conditioned frame (centring, principal axes, unit variance) before the couplings and
    to restore the physical scale after them. Momenta transform as ``P = (p M⁻ᵀ) / scale``.

    Examples
    --------
    >>> layer = AffinePoint(torch.zeros(2), torch.eye(2), torch.tensor([2.0, 0.5]))
    >>> layer(torch.tensor([[1.0, 1.0]]))
    tensor([[2.0000, 0.5000]])
    """

    def __init__(self, shift: Tensor, matrix: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("shift", shift.clone())
        self.register_buffer("matrix", matrix.clone())
        self.register_buffer("scale", scale.clone())

    @property
    def matrix_inverse(self) -> Tensor:
        # Computed, not stored: a stored inverse would keep float32 rounding after the layer is cast to float64.
        # inv_ex skips the error check, which on a GPU is a host synchronisation (and breaks CUDA graph capture).
        return torch.linalg.inv_ex(self.matrix)[0]

    @classmethod
    def identity(cls, dim: int, dtype=torch.float32):
        return cls(torch.zeros(dim, dtype=dtype), torch.eye(dim, dtype=dtype), torch.ones(dim, dtype=dtype))

    def forward(self, q: Tensor) -> Tensor:
        return ((q - self.shift) @ self.matrix) * self.scale

    def inverse(self, Q: Tensor) -> Tensor:
        return (Q / self.scale) @ self.matrix_inverse + self.shift

    def forward_with_momentum(self, q: Tensor, p: Tensor) -> Tuple[Tensor, Tensor]:
        return self.forward(q), (p @ self.matrix_inverse.T) / self.scale

    def inverse_with_momentum(self, Q: Tensor, P: Tensor) -> Tuple[Tensor, Tensor]:
        return self.inverse(Q), (P * self.scale) @ self.matrix.T


class LinearPoint(PointLayer):
    """Learnable linear point transformation ``Q = q exp(A)``, ``P = p exp(−Aᵀ)``.

    This is the linear symplectic layer of the paper's Appendix A1 restricted to ``B = C = 0``: it mixes positions
    among themselves only, so the transformation stays a point transformation (its ``Q`` depends on ``q`` alone,
    which is what a collective variable needs). ``A`` starts at zero (the identity).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.generator = nn.Parameter(torch.zeros(dim, dim))

    def _exp(self, sign: float) -> Tensor:
        return torch.linalg.matrix_exp(sign * self.generator)

    def forward(self, q: Tensor) -> Tensor:
        return q @ self._exp(1.0).to(q.dtype)

    def inverse(self, Q: Tensor) -> Tensor:
        return Q @ self._exp(-1.0).to(Q.dtype)

    # With momenta, exp(−A) = exp(A)⁻¹ enters through a solve: a second matrix exponential would cost more, mostly
    # in its backward pass (the exponential of a 2n × 2n block matrix).
    def forward_with_momentum(self, q: Tensor, p: Tensor) -> Tuple[Tensor, Tensor]:
        forward = self._exp(1.0).to(q.dtype)
        return q @ forward, torch.linalg.solve_ex(forward.T, p, left=False)[0]

    def inverse_with_momentum(self, Q: Tensor, P: Tensor) -> Tuple[Tensor, Tensor]:
        forward = self._exp(1.0).to(Q.dtype)
        return torch.linalg.solve_ex(forward, Q, left=False)[0], P @ forward.T


def mlp(n_in: int, n_out: int, hidden: int, depth: int, zero_output: bool = True) -> "SiLUMLP":
    """A smooth MLP (SiLU) whose last layer starts at zero (``zero_output``), so that a coupling starts as the
    identity.

    Smoothness matters twice: forces are gradients of the CV, and training through the momenta (which contain the
    network's gradient) differentiates the network twice.
    """
    sizes = [n_in] + [hidden] * depth
    modules: List[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        modules += [nn.Linear(a, b), nn.SiLU()]
    last = nn.Linear(sizes[-1], n_out)
    if zero_output:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    modules.append(last)
    return SiLUMLP(*modules)


class SiLUMLP(nn.Sequential):
    """Linear layers with SiLU between them (what :func:`mlp` builds), with its derivative in closed form.

    :meth:`forward_saving` returns the output and the SiLU slopes; :meth:`pullback` maps row cotangents ``c`` on the
    output to ``c ∂net/∂x``: the transposed weights times those slopes. Both are TorchScript methods, used by the
    couplings' cotangent lift in training and by the exported CVs' forces.

    Examples
    --------
    >>> net = mlp(3, 2, hidden=8, depth=2, zero_output=False)
    >>> x, c = torch.randn(4, 3), torch.randn(4, 2)
    >>> out, slopes = net.forward_saving(x)
    >>> x_ = x.clone().requires_grad_(True)
    >>> torch.allclose(net.pullback(slopes, c), torch.autograd.grad(net(x_), x_, c)[0], atol=1e-6)
    True
    """

    def __init__(self, *layers: nn.Module):
        super().__init__(*layers)
        num_linear = sum(isinstance(layer, nn.Linear) for layer in layers)
        if [type(layer) for layer in layers] != [nn.Linear, nn.SiLU] * (num_linear - 1) + [nn.Linear]:
            raise ValueError("SiLUMLP needs Linear layers with SiLU between them, got "
                             f"{[type(layer).__name__ for layer in layers]}")

    def linear_weights(self) -> Tuple[List[Tensor], List[Tensor]]:
        weights: List[Tensor] = []
        biases: List[Tensor] = []
        for layer in self:
            # Not isinstance: TorchScript unrolls this loop and, with isinstance, keeps only the first Linear.
            if hasattr(layer, "weight"):
                weights.append(layer.weight)
                biases.append(layer.bias)
        return weights, biases

    @torch.jit.export
    def forward_saving(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """The output at ``x`` and the SiLU slopes :meth:`pullback` needs."""
        weights, biases = self.linear_weights()
        slopes: List[Tensor] = []
        h = x
        for i in range(len(weights) - 1):
            h, slope = _silu_with_slope(F.linear(h, weights[i], biases[i]))
            slopes.append(slope)
        return F.linear(h, weights[-1], biases[-1]), slopes

    @torch.jit.export
    def pullback(self, slopes: List[Tensor], cotangent: Tensor) -> Tensor:
        """``c ∂net/∂x`` at the point :meth:`forward_saving` returned ``slopes`` for."""
        weights, _ = self.linear_weights()
        g = cotangent @ weights[-1]
        for i in range(len(slopes) - 1, -1, -1):
            g = (g * slopes[i]) @ weights[i]
        return g


class AffineCoupling(PointLayer):
    """RealNVP affine coupling on positions: ``Q_b = q_b ⊙ exp(s(q_a)) + t(q_a)``, ``Q_a = q_a``.

    The conditioner reads only the conditioning coordinates ``a`` and outputs only the transformed ones ``b`` (no
    weights that multiply masked-out zeros). Scales are bounded, ``s = bound · tanh(·)``, to keep the map well
    conditioned. Momenta follow from the inverse Jacobian in closed form: ``P_b = p_b ⊙ exp(−s)`` and
    ``P_a = p_a − (∂Q_b/∂q_a)ᵀ P_b``, the latter one vector–Jacobian product through the conditioner.

    Examples
    --------
    >>> layer = AffineCoupling(torch.tensor([0, 2]), torch.tensor([1, 3]), hidden=8, depth=1)
    >>> q = torch.randn(5, 4)
    >>> torch.allclose(layer.inverse(layer(q)), q)
    True
    """

    def __init__(self, conditioning: Tensor, transformed: Tensor, hidden: int = 64, depth: int = 2,
                 scale_bound: float = 2.0):
        super().__init__()
        self.register_buffer("conditioning", conditioning.clone().long())
        self.register_buffer("transformed", transformed.clone().long())
        self.register_buffer("unpermute", torch.argsort(torch.cat([conditioning, transformed]).long()))
        self.n_transformed = int(transformed.numel())
        self.scale_bound = float(scale_bound)
        self.net = mlp(int(conditioning.numel()), 2 * self.n_transformed, hidden, depth)

    def _bounded_scale(self, raw: Tensor) -> Tuple[Tensor, Tensor]:
        """``s = bound · tanh(raw)`` and the tanh, from which ``ds/draw = bound − s · tanh`` follows."""
        tanh = torch.tanh(raw)
        return self.scale_bound * tanh, tanh

    def _scale_shift(self, qa: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.net(qa)
        s, _ = self._bounded_scale(out[..., : self.n_transformed])
        return s, out[..., self.n_transformed:]

    def _split(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return x.index_select(-1, self.conditioning), x.index_select(-1, self.transformed)

    def _assemble(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], dim=-1).index_select(-1, self.unpermute)

    def forward(self, q: Tensor) -> Tensor:
        qa, qb = self._split(q)
        s, t = self._scale_shift(qa)
        return self._assemble(qa, qb * torch.exp(s) + t)

    def inverse(self, Q: Tensor) -> Tensor:
        Qa, Qb = self._split(Q)
        s, t = self._scale_shift(Qa)
        return self._assemble(Qa, (Qb - t) * torch.exp(-s))

    def _linearisation(self, qa: Tensor, b: Tensor, b_is_output: bool) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """``(t, q_b e^s, saved)`` at conditioning coordinates ``qa``; ``saved`` is what :meth:`pullback` needs,
        ``e^s`` first.

        ``b`` is ``q_b``, or ``Q_b`` when ``b_is_output`` (then ``q_b e^s = Q_b − t``).
        """
        out, slopes = self.net.forward_saving(qa)
        s, tanh = self._bounded_scale(out[..., : self.n_transformed])
        t = out[..., self.n_transformed:]
        scale = torch.exp(s)
        qb_scaled = b - t if b_is_output else b * scale
        # ∂Q_b/∂s = q_b e^s; saved: e^s, q_b e^s ds/draw, then the conditioner's SiLU slopes.
        saved = [scale, qb_scaled * (self.scale_bound - s * tanh)] + slopes
        return t, qb_scaled, saved

    @torch.jit.export
    def forward_saving(self, q: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """``Q = f(q)`` and what :meth:`pullback` needs at ``q`` (TorchScript-friendly; no autograd involved)."""
        qa, qb = self._split(q)
        Qb, saved = self.halves_forward_saving(qa, qb)
        return self._assemble(qa, Qb), saved

    @torch.jit.export
    def pullback(self, saved: List[Tensor], cotangent: Tensor) -> Tensor:
        """``c ∂Q/∂q`` for row covectors ``c`` on ``Q`` (any number of rows), at the point :meth:`forward_saving` saw.

        This is the momentum map ``p = P ∂Q/∂q`` with ``c`` in place of ``P``.
        """
        ca, cb = self._split(cotangent)
        pa, pb = self.halves_pullback(saved, ca, cb)
        return self._assemble(pa, pb)

    @torch.jit.export
    def halves_forward_saving(self, qa: Tensor, qb: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """:meth:`forward_saving` on coordinates already split into the conditioning and the transformed ones:
        ``Q_b`` (``Q_a = q_a``) and what :meth:`halves_pullback` needs."""
        t, qb_scaled, saved = self._linearisation(qa, qb, False)
        return qb_scaled + t, saved

    @torch.jit.export
    def halves_pullback(self, saved: List[Tensor], ca: Tensor, cb: Tensor) -> Tuple[Tensor, Tensor]:
        """:meth:`pullback` on cotangents split like the coordinates: the conditioning and the transformed half."""
        return ca + self._conditioner_pullback(saved, cb), cb * saved[0]

    def _conditioner_pullback(self, saved: List[Tensor], cb: Tensor) -> Tensor:
        """``cb (∂Q_b/∂q_a)``: through the scale (``cb q_b e^s ds/draw``) and the shift (``cb``) into the net."""
        return self.net.pullback(saved[2:], torch.cat([cb * saved[1], cb], dim=-1))

    def forward_with_momentum(self, q: Tensor, p: Tensor) -> Tuple[Tensor, Tensor]:
        Q, saved = self.forward_saving(q)
        pa, pb = self._split(p)
        Pb = pb / saved[0]
        # P solves p = P ∂Q/∂q (see pullback): P_b = p_b e^−s, P_a = p_a − P_b ∂Q_b/∂q_a.
        return Q, self._assemble(pa - self._conditioner_pullback(saved, Pb), Pb)

    def inverse_with_momentum(self, Q: Tensor, P: Tensor) -> Tuple[Tensor, Tensor]:
        Qa, Qb = self._split(Q)
        _, qb_scaled, saved = self._linearisation(Qa, Qb, True)
        return self._assemble(Qa, qb_scaled / saved[0]), self.pullback(saved, P)


def _silu_with_slope(a: Tensor) -> Tuple[Tensor, Tensor]:
    """``silu(a)`` and its derivative ``σ(a) + silu(a) (1 − σ(a))``, sharing one sigmoid."""
    sigmoid = torch.sigmoid(a)
    h = a * sigmoid
    return h, torch.addcmul(h, sigmoid, 1.0 - h)


def coupling_masks(dim: int, n_layers: int, kind: str = "random", seed: int = 0) -> List[Tuple[Tensor, Tensor]]:
    """Conditioning/transformed index pairs for ``n_layers`` couplings on ``dim`` coordinates.

    ``"alternate"`` splits even/odd indices; ``"random"`` draws a seeded half partition for every pair of layers.
    Consecutive layers swap the roles of the two halves, so every coordinate is transformed.

    Examples
    --------
    >>> [tuple(m[1].tolist()) for m in coupling_masks(4, 2, "alternate")]
    [(1, 3), (0, 2)]
    """
    if dim < 2:
        raise ValueError(f"couplings need at least 2 coordinates, got {dim}")
    if kind not in ("random", "alternate"):
        raise ValueError(f"unknown mask kind {kind!r}: use 'random' or 'alternate'")
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for layer in range(n_layers):
        if layer % 2 == 0:
            order = torch.randperm(dim, generator=generator) if kind == "random" else torch.arange(dim)
            first = order[: dim // 2] if kind == "random" else order[0::2]
            second = order[dim // 2:] if kind == "random" else order[1::2]
            pair = (torch.sort(first).values, torch.sort(second).values)
        else:
            pair = (masks[-1][1], masks[-1][0])
        masks.append(pair)
    return masks
