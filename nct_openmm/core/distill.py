"""Distillation: a small network that reproduces the slow modes of a trained flow, for use at MD time.

The flow is needed for training and generation; a biased simulation only needs ``ε(q)``, the K slowest scaled latent
coordinates, and their gradient, at every (or every n-th) step. Evaluated through a TorchScript CV, the flow costs
roughly a thousand small operations per step, and on a CPU each costs microseconds of overhead; a three-layer MLP
costs a few dozen. The student maps the flow's whitened input ``y = pre(q)`` (the harmonic limit of the data), or
fixed features of ``q`` such as interatomic distances (``features``), to ``ε``, and is fitted in Sobolev norm
(values and gradients, since forces are gradients) on configurations the flow itself generates: no data are
needed, and the slow modes are sampled wider than the prior (``spread``) because metadynamics drives the system
far along them.

Examples
--------
>>> from nct_openmm.core import FlowConfig, NCTModel
>>> model = NCTModel(FlowConfig(dim=4, n_couplings=2, hidden=8))
>>> student, report = fit_student(model, modes=2, hidden=16, steps=50, samples=2048, progress=False)
>>> student(torch.zeros(1, 4)).shape
torch.Size([1, 2])
"""
import copy
import math
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .layers import AffinePoint, mlp
from .model import NCTModel


@dataclass
class StudentReport:
    """How well a student reproduces its flow on held-out configurations the flow generated.

    Errors are in units of the scaled modes (unit variance under the prior): ``value_rms``, ``value_max`` over
    configurations drawn like the training ones; ``value_rms_thermal`` over plain prior draws; ``gradient_relative``
    is ``‖∇ε_student − ∇ε_flow‖ / ‖∇ε_flow‖`` over the held-out set, with gradients taken with respect to the
    flow's input (mass-weighted coordinates, whose gradients the forces are, up to the mass scaling of each
    atom), not the whitened coordinates the network reads, where the stiff directions would hardly count.
    """

    value_rms: float
    value_max: float
    value_rms_thermal: float
    gradient_relative: float
    samples: int
    steps: int
    spread: float
    hidden: int
    depth: int

    def as_dict(self) -> dict:
        return asdict(self)


class Student(nn.Module):
    """``ε = net(input(q))``: a small SiLU MLP with K outputs on a fixed input map, the flow's whitening map, or
    ``features(q)`` standardised by ``feature_mean`` and ``feature_scale``."""

    def __init__(self, pre: AffinePoint, modes: int, hidden: int = 128, depth: int = 2,
                 features: Optional[nn.Module] = None, feature_mean: Optional[Tensor] = None,
                 feature_scale: Optional[Tensor] = None):
        super().__init__()
        self.pre = copy.deepcopy(pre).requires_grad_(False)
        self.features = copy.deepcopy(features)  # the caller's module (and its buffers) stays as it is
        if features is not None:
            self.register_buffer("feature_mean", feature_mean.clone())
            self.register_buffer("feature_scale", feature_scale.clone())
        width = pre.shift.numel() if features is None else int(feature_mean.numel())
        # Not zero-initialised like a coupling's: the student has no identity to start from.
        self.net = mlp(width, modes, hidden, depth, zero_output=False)
        self.modes = modes

    def input_of(self, q: Tensor) -> Tensor:
        """What the network reads at configurations ``q``."""
        if self.features is None:
            return self.pre(q)
        return (self.features(q) - self.feature_mean) / self.feature_scale

    def forward(self, q: Tensor) -> Tensor:
        return self.net(self.input_of(q))


class _OnWhitened(nn.Module):
    """A student with features as a function of the whitened input ``y`` the teacher's samples come in."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student

    def forward(self, y: Tensor) -> Tensor:
        return self.student(self.student.pre.inverse(y))


def fit_student(model: NCTModel, modes: int = 2, *, hidden: int = 128, depth: int = 2, samples: int = 65536,
                steps: int = 6000, batch: int = 1024, spread: float = 3.0, gradient_weight: float = 1.0,
                lr: float = 3e-3, seed: int = 0, progress: bool = True,
                features: Optional[nn.Module] = None) -> Tuple[Student, StudentReport]:
    """Fit a :class:`Student` to the ``modes`` slowest scaled modes of a point-transformation ``model``.

    Parameters
    ----------
    model : NCTModel
        A trained point transformation (its first layer must be the whitening :class:`AffinePoint`).
    modes : int
        K, as in the exported CV.
    hidden, depth
        Width and number of hidden layers of the student.
    samples : int
        Configurations drawn from the flow; a sixth is held out for the report.
    steps, batch, lr
        Adam steps, batch size and initial learning rate (cosine decay to zero).
    spread : float
        The slow modes of the training configurations are drawn with standard deviations uniform in
        ``[1, spread]`` (the other modes from the prior), so that the student is accurate where metadynamics goes.
    gradient_weight : float
        Weight of the gradient term of the Sobolev loss.
    features : torch.nn.Module, optional
        A fixed map from the flow's input ``q (batch, d)`` to features ``(batch, F)`` the student reads instead
        of the whitened ``q``, standardised over the training configurations; e.g.
        :class:`~nct_openmm.geometry.PairDistances`, which no rigid-body motion changes, so the exported CV needs
        no alignment.

    Returns
    -------
    (Student, StudentReport)
    """
    if not model.is_point_transformation or not isinstance(model.layers[0], AffinePoint):
        raise ValueError("a student needs a point transformation whose first layer is the whitening map")
    if not 1 <= modes <= model.dim:
        raise ValueError(f"modes must be between 1 and {model.dim}, got {modes}")
    if steps < 1 or samples < 12:
        raise ValueError(f"a student needs at least 1 step and 12 samples (a sixth held out), got {steps} and "
                         f"{samples}")
    generator = torch.Generator().manual_seed(seed)
    y, targets, gradients = _teacher_samples(model, modes, samples, spread, generator)
    thermal = _teacher_samples(model, modes, max(1024, samples // 8), 1.0, generator)
    held_out = len(y) // 6
    train = (y[held_out:], targets[held_out:], gradients[held_out:])
    with torch.random.fork_rng():  # seeds the initial weights without touching the caller's random stream
        torch.manual_seed(seed)
        student = Student(model.layers[0], modes, hidden, depth, features, *_feature_statistics(
            model.layers[0], features, train[0]))
    student.to(y.dtype)
    trainee = student.net if features is None else _OnWhitened(student)
    # ∂y/∂q of the whitening y = ((q − shift) M) · scale: gradients ∂ε/∂y times this are ∂ε/∂q.
    to_input = (model.layers[0].matrix * model.layers[0].scale).t().detach().to(y.dtype)
    _train_student(trainee, train, steps, batch, gradient_weight, lr, generator, progress, to_input)
    report = _report(trainee, (y[:held_out], targets[:held_out], gradients[:held_out]), thermal, to_input,
                     dict(samples=samples, steps=steps, spread=spread, hidden=hidden, depth=depth))
    return student.float().eval(), report


def _feature_statistics(pre: AffinePoint, features: Optional[nn.Module], y: Tensor):
    """Mean and standard deviation of the features over the training inputs (whitened ``y``), or ``(None, None)``."""
    if features is None:
        return None, None
    pre = copy.deepcopy(pre).double()
    with torch.no_grad():  # in chunks: features of tens of thousands of samples can take gigabytes at once
        values = torch.cat([features(pre.inverse(chunk)) for chunk in y.split(4096)])
    return values.mean(0), values.std(0).clamp_min(1e-12)


def _teacher_samples(model: NCTModel, modes: int, n: int, spread: float, generator: torch.Generator):
    """Whitened inputs ``y``, target modes ``ε(y)`` and their gradients ``∂ε/∂y`` ``(n, K, d)``, in float64."""
    teacher = copy.deepcopy(model).double().eval()
    order = teacher.prior.slow_order()[:modes]
    omega = teacher.prior.frequencies().detach()
    scale = torch.ones(n, teacher.dim, dtype=torch.float64)
    scale[:, order] = 1.0 + (spread - 1.0) * torch.rand(n, modes, generator=generator, dtype=torch.float64)
    Q = torch.randn(n, teacher.dim, generator=generator, dtype=torch.float64) * scale / omega
    with torch.no_grad():
        q = teacher.inverse_transform(Q)
        y = teacher.layers[0](q)
    rest = teacher.layers[1:]

    def modes_of(y_batch):
        Q_batch = y_batch
        for layer in rest:
            Q_batch = layer(Q_batch)
        return Q_batch[:, order] * (teacher.mode_signs[order] * omega[order])

    targets, gradients = [], []
    for start in range(0, n, 4096):
        chunk = y[start:start + 4096].detach().requires_grad_(True)
        eps = modes_of(chunk)
        rows = [torch.autograd.grad(eps[:, k].sum(), chunk, retain_graph=k + 1 < modes)[0] for k in range(modes)]
        targets.append(eps.detach())
        gradients.append(torch.stack(rows, dim=1))
    return y, torch.cat(targets), torch.cat(gradients)


def _sobolev_terms(net: nn.Module, y: Tensor, targets: Tensor, gradients: Tensor, create_graph: bool):
    y = y.detach().requires_grad_(True)
    eps = net(y)
    rows = [torch.autograd.grad(eps[:, k].sum(), y, create_graph=create_graph, retain_graph=True)[0]
            for k in range(eps.shape[1])]
    predicted = torch.stack(rows, dim=1)
    return eps - targets, predicted - gradients


def _train_student(net, data, steps, batch, gradient_weight, lr, generator, progress, to_input):
    from tqdm.auto import tqdm

    y, targets, gradients = data
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gradient_scale = (gradients @ to_input).pow(2).sum((1, 2)).mean()  # the loss terms in comparable units
    for _ in tqdm(range(steps), desc="distilling", disable=not progress, leave=False, dynamic_ncols=True):
        index = torch.randint(len(y), (batch,), generator=generator)
        value_error, gradient_error = _sobolev_terms(net, y[index], targets[index], gradients[index], True)
        loss = value_error.pow(2).sum(1).mean() + gradient_weight * (gradient_error @ to_input).pow(2).sum(
            (1, 2)).mean() / gradient_scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


def _report(net, held_out, thermal, to_input, settings: dict) -> StudentReport:
    value_error, gradient_error = (t.detach() for t in _sobolev_terms(net, *held_out, create_graph=False))
    thermal_error = _sobolev_terms(net, *thermal, create_graph=False)[0].detach()
    gradient_norm = (held_out[2] @ to_input).pow(2).sum((1, 2)).mean()
    gradient_error = (gradient_error @ to_input).pow(2).sum((1, 2)).mean()
    return StudentReport(
        value_rms=float(value_error.pow(2).mean().sqrt()), value_max=float(value_error.abs().max()),
        value_rms_thermal=float(thermal_error.pow(2).mean().sqrt()),
        gradient_relative=float(math.sqrt(gradient_error / gradient_norm)), **settings)


__all__ = ["Student", "StudentReport", "fit_student"]
