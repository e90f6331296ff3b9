"""The neural canonical transformation: a point transformation (optionally followed by a linear symplectic layer)
into a harmonic latent Hamiltonian.

With ``T`` the canonical map ``x = (q, p) ↦ z = (Q, P)`` and unit phase-space Jacobian, the model density is
``ρ(x) = N(T(x))`` where ``N`` is the harmonic prior's density (paper Sec. III A).
"""
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .layers import AffineCoupling, AffinePoint, LinearPoint, coupling_masks
from .linear import LinearSymplectic
from .prior import HarmonicPrior
from .serialization import load_payload, rebuilt, save_payload


@dataclass
class FlowConfig:
    """Hyperparameters of an :class:`NCTModel`.

    ``dim`` configuration coordinates; ``n_couplings`` RealNVP couplings with conditioners of ``depth`` hidden layers
    of ``hidden`` units; masks of ``mask`` kind drawn with ``seed``; coupling scales bounded by ``scale_bound``;
    ``linear_point`` adds a learnable linear point layer ``exp(A)`` after the couplings; ``linear_symplectic`` adds
    the full linear symplectic layer at the end (then the model is no longer a point transformation).
    """

    dim: int
    n_couplings: int = 8
    hidden: int = 64
    depth: int = 2
    mask: str = "random"
    seed: int = 0
    scale_bound: float = 2.0
    linear_point: bool = True
    linear_symplectic: bool = False


class NCTModel(nn.Module):
    """A neural canonical transformation with a harmonic latent prior.

    Parameters
    ----------
    config : FlowConfig
    frequencies : Tensor, optional
        Initial ω of the prior (default ones).
    pre, post : AffinePoint, optional
        Fixed affine point maps applied before the couplings (e.g. whitening) and after them (e.g. restoring the
        physical scale); identity by default. :func:`nct_openmm.core.training.model_from_data` sets them so
        that the untrained model is the harmonic (PCA) limit of the data.

    Examples
    --------
    >>> model = NCTModel(FlowConfig(dim=4, n_couplings=2, hidden=8))
    >>> q, p = model.sample(3)
    >>> Q, P = model.encode(q, p)
    >>> q2, p2 = model.decode(Q, P)
    >>> bool(torch.allclose(q2, q, atol=1e-5) and torch.allclose(p2, p, atol=1e-5))
    True
    """

    def __init__(self, config: FlowConfig, frequencies: Optional[Tensor] = None,
                 pre: Optional[AffinePoint] = None, post: Optional[AffinePoint] = None):
        super().__init__()
        self.config = config
        with torch.random.fork_rng(devices=[]):
            # Weight initialisation follows config.seed, so a configuration names one model.
            torch.manual_seed(config.seed)
            self._build(config, frequencies, pre, post)

    def _build(self, config, frequencies, pre, post):
        dim = config.dim
        layers = [pre if pre is not None else AffinePoint.identity(dim)]
        if dim >= 2:
            for conditioning, transformed in coupling_masks(dim, config.n_couplings, config.mask, config.seed):
                layers.append(AffineCoupling(conditioning, transformed, config.hidden, config.depth,
                                             config.scale_bound))
        if config.linear_point:
            layers.append(LinearPoint(dim))
        layers.append(post if post is not None else AffinePoint.identity(dim))
        self.layers = nn.ModuleList(layers)
        self.linear = LinearSymplectic(dim) if config.linear_symplectic else None
        self.prior = HarmonicPrior(frequencies if frequencies is not None else torch.ones(dim))
        self.register_buffer("mode_signs", torch.ones(dim))

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    def is_point_transformation(self) -> bool:
        """True when ``Q`` depends on ``q`` alone, so that it can serve as a collective variable."""
        return self.linear is None

    # --- maps ---------------------------------------------------------------------------------------------------
    def transform(self, q: Tensor) -> Tensor:
        """Latent positions ``Q = F(q)`` of a point transformation (no momenta, no autograd bookkeeping)."""
        self._require_point("transform")
        for layer in self.layers:
            q = layer(q)
        return q

    def inverse_transform(self, Q: Tensor) -> Tensor:
        """Positions ``q = F⁻¹(Q)`` of a point transformation."""
        self._require_point("inverse_transform")
        for layer in reversed(self.layers):
            Q = layer.inverse(Q)
        return Q

    def encode(self, q: Tensor, p: Tensor) -> Tuple[Tensor, Tensor]:
        """Phase space to latent space, ``(Q, P) = T(q, p)`` (differentiable: train on it directly)."""
        for layer in self.layers:
            q, p = layer.forward_with_momentum(q, p)
        if self.linear is not None:
            q, p = self.linear(q, p)
        return q, p

    def decode(self, Q: Tensor, P: Tensor) -> Tuple[Tensor, Tensor]:
        """Latent space to phase space, ``(q, p) = T⁻¹(Q, P)``."""
        if self.linear is not None:
            Q, P = self.linear.inverse(Q, P)
        for layer in reversed(self.layers):
            Q, P = layer.inverse_with_momentum(Q, P)
        return Q, P

    def log_prob(self, q: Tensor, p: Tensor) -> Tensor:
        """``ln ρ(q, p)`` per sample: the prior's log density at ``T(q, p)`` (the Jacobian determinant is one)."""
        Q, P = self.encode(q, p)
        return self.prior.log_prob(Q, P)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
        """Draw ``n`` phase-space points from the model."""
        Q, P = self.prior.sample(n, generator)
        with torch.no_grad():
            return self.decode(Q, P)

    # --- slow modes ---------------------------------------------------------------------------------------------
    def frequencies(self) -> Tensor:
        """ω sorted ascending (slowest first), detached."""
        return torch.sort(self.prior.frequencies().detach()).values

    def slow_modes(self, q: Tensor, k: Optional[int] = None, scaled: bool = False) -> Tensor:
        """The ``k`` slowest latent coordinates of positions ``q``, slowest first, with deterministic signs.

        ``scaled`` returns ``ε_k = ω_k Q_k`` (unit variance under the prior) instead of ``Q_k``.
        """
        order = self.prior.slow_order()[: (k or self.dim)]
        Q = self.transform(q)[..., order] * self.mode_signs[order].to(q.dtype)
        if scaled:
            Q = Q * self.prior.frequencies()[order].to(q.dtype)
        return Q

    @torch.no_grad()
    def fix_mode_signs(self, q: Tensor) -> None:
        """Choose each mode's sign so that its third moment over ``q`` is non-negative (a reproducible convention;
        the prior is symmetric under ``Q_k → −Q_k``)."""
        Q = self.transform(q)
        Q = Q - Q.mean(0)
        skew = (Q ** 3).mean(0)
        self.mode_signs.copy_(torch.where(skew < 0, -1.0, 1.0).to(self.mode_signs.dtype))

    def _require_point(self, what: str) -> None:
        if not self.is_point_transformation:
            raise ValueError(f"{what} needs a point transformation; this model has a linear symplectic layer "
                             "that mixes positions with momenta")

    # --- persistence --------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Hyperparameters and weights as plain data (what :meth:`from_state` rebuilds from)."""
        return {"config": asdict(self.config), "dtype": str(self.prior.log_omega.dtype).replace("torch.", ""),
                "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict) -> "NCTModel":
        config = FlowConfig(**state["config"])
        # Built in the saved dtype: loading float64 weights into a float32 model would round them.
        model = cls(config).to(getattr(torch, state.get("dtype", "float32")))
        model.load_state_dict(state["state_dict"])
        return model

    def save(self, path, metadata: Optional[dict] = None) -> None:
        """Write the model to one file (hyperparameters, weights and optional JSON-like ``metadata``)."""
        save_payload(path, {"kind": "flow", "flow": self.state(), "metadata": metadata or {}})

    @classmethod
    def load(cls, path) -> "NCTModel":
        """Read a model written by :meth:`save`; a foreign or incompatible file raises ``ModelFileError``."""
        document = load_payload(path, "flow")
        model = rebuilt(path, lambda: cls.from_state(document["flow"]))
        model.metadata = document.get("metadata", {})
        return model
