"""Training throughput: phase-space maximum likelihood with nct_openmm.core against the reference algorithm.

Data: alanine dipeptide in vacuum at 300 K (Amber ff96, no constraints, 1 fs Langevin steps), 12 atoms (the 10 heavy
atoms and the two amide hydrogens) in the internal frame: 3·12 − 6 = 30 coordinates. Batch 200, Adam at 1e-3, the
reference architecture: 8 RealNVP couplings with 2 hidden layers of 128 (SiLU), scales bounded by 2·tanh.

- ``reference``: the published algorithm, reimplemented here (:class:`ReferenceFlow`): full-width conditioners whose
  input is the state multiplied by a 0/1 mask and whose output covers every coordinate, masked again (so the
  first layer's columns for masked inputs and the last layer's rows for unchanged outputs are dead weights); the
  momenta ``P = p ∂q/∂Q`` from autograd of a second, inverse pass of the whole flow, so the loss is differentiated
  twice; denormals not flushed.
- ``ours``: :mod:`nct_openmm.core`: conditioners read the conditioning half and write the transformed half, the
  momenta are carried through each layer by one vector–Jacobian product written out in closed form (so the loss is
  differentiated once), the optimiser is :func:`~nct_openmm.core.flow_optimizer`'s fused Adam, denormals are flushed
  (``torch.set_flush_denormal``, as ``Trainer.fit`` does).
- ``ours+linear``: the same with the learnable linear point layer after the couplings (the package default).
- ``ours+compile`` (CPU, not with ``--quick``/``--no-compile``): ours with the loss compiled by ``torch.compile``
  (``compile_loss=True``); the compilation is in its first step, reported apart.
- ``reference+half-width``: the reference's momenta (second pass, double backward) with our half-width
  conditioners, to separate the two levers.
- ``ours+graph`` (``--device cuda`` only): ours with the whole step replayed from a CUDA graph
  (:class:`nct_openmm.core.training.CapturedStep`, what ``Trainer(cuda_graph=True)`` does); batches and momenta come
  from the default CUDA generator, so its optimisation path differs from the others by the draws only.

Both models start as the same function: the reference's full-width weights are ours, padded with zeros, and the
script checks that the two give the same loss and gradients. Dead weights then get exactly zero gradient, so both
follow the same optimisation path and reach a given loss in the same number of steps: what differs is the time.

Sections (all timings interleaved in rounds inside one process; ratios are medians of per-round ratios):

1. samples/s of a training step (loss, backward, Adam);
2. where a step goes (CPU): the matrix products' share, and the bound it puts on any speed-up
   (:func:`measureMatmulFloor`);
3. time to a validation NLL: both trained on the same batches and momenta, evaluated on held-out frames;
4. time to the reference's final variational free energy on the harmonic chain of ``examples/harmonic_chain.py``
   (30 sites, the same architecture plus the linear point layer, the reference decoding momenta as
   ``p = P ∂Q/∂q`` by a second pass; ours trained as the example trains it, see :func:`measureChain`);
5. float32 denormals: the reference's dead weights set to 1e-39 (what long training with decoupled weight decay
   does to weights that never get a gradient), a step timed with and without flushing.

Usage::

    python benchmarks/training_throughput.py             # under 5 min on a 2-core CPU
    python benchmarks/training_throughput.py --quick --json out.json
    python benchmarks/training_throughput.py --device cuda       # on a GPU: adds ours+graph; no denormal section
"""
import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import openmm
import torch
from openmm import unit
from torch import nn

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)

from nct_openmm.core import (AffineCoupling, FlowConfig, NCTModel, flow_optimizer,  # noqa: E402
                             model_from_data, negative_log_likelihood, variational_loss)
from nct_openmm.core.training import CapturedStep, CompiledLoss  # noqa: E402
from nct_openmm.data import thermal_energy  # noqa: E402
from nct_openmm.geometry import InternalFrame, spanning_tree  # noqa: E402
from nct_openmm.slowmodes import average_structure  # noqa: E402
from nct_openmm.systems import getPlatform  # noqa: E402

ATOMS = [1, 4, 5, 6, 7, 8, 10, 14, 15, 16, 17, 18]  # heavy atoms and the two amide H: 30 internal coordinates
TEMPERATURE = 300.0
BATCH = 200
LEARNING_RATE = 1e-3
ARCHITECTURE = dict(n_couplings=8, hidden=128, depth=2, scale_bound=2.0, mask="random")
DENORMAL = 1e-39  # below float32's smallest normal number, 1.18e-38
CHAIN_SITES, CHAIN_OMEGA_SPREAD, CHAIN_EVAL = 30, 10.0, 2048


def main(argv=None):
    options = _parseArguments(argv)
    if options.quick:
        options.frames, options.rounds, options.steps, options.compile = 600, 2, 3, False
        options.loss_steps, options.eval_every, options.chain_steps, options.chain_eval_every = 20, 10, 20, 10
    with _torchState(options.threads):
        qTrain, qVal = makeData(options.frames, options.seed)
        config = FlowConfig(dim=qTrain.shape[1], seed=options.seed, linear_point=False, **ARCHITECTURE)
        result = {"settings": {"device": options.device, "dim": int(qTrain.shape[1]),
                               "train_frames": int(len(qTrain)), "validation_frames": int(len(qVal)),
                               "batch": BATCH, "learning_rate": LEARNING_RATE, "torch_threads": options.threads,
                               "rounds": options.rounds, "steps_per_round": options.steps, **ARCHITECTURE},
                  "equivalence": checkEquivalence(config, qTrain)}
        qTrain, qVal = qTrain.to(options.device), qVal.to(options.device)
        onCpu = qTrain.device.type == "cpu"
        sections = [("throughput", lambda: measureThroughput(config, qTrain, options)),
                    ("matmul_floor", lambda: measureMatmulFloor(config, qTrain, options) if onCpu else []),
                    ("time_to_loss", lambda: measureTimeToLoss(config, qTrain, qVal, options)),
                    ("harmonic_chain", lambda: measureChain(options)),
                    ("denormals", lambda: measureDenormals(config, qTrain, options) if onCpu else []),
                    ("denormal_matmul_probe", lambda: probeDenormalMatmul() if onCpu else [])]
        for key, measure in sections:
            result[key] = _measured(measure)
            if options.json:  # after every section, so that a failure later loses nothing
                with open(options.json, "w") as file:
                    json.dump(result, file, indent=2)
    printReport(result)
    return result


def _measured(measure):
    """The section's result, or ``{"error": ...}`` when it failed (reported, not hidden)."""
    try:
        return measure()
    except Exception as error:  # a variant that does not work on this device must not lose the other sections
        lines = str(error).strip().splitlines() or [""]
        return {"error": f"{type(error).__name__}: {lines[0]}"}


def _parseArguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few frames, rounds and steps: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--frames", type=int, default=3000, help="MD frames, a sixth held out (default 3000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for samples/s (default 5)")
    parser.add_argument("--steps", type=int, default=15, help="training steps per variant and round (default 15)")
    parser.add_argument("--loss-steps", type=int, default=600,
                        help="training steps of each model in the time-to-loss run (default 600)")
    parser.add_argument("--eval-every", type=int, default=50,
                        help="steps between evaluations in the time-to-loss runs (default 50)")
    parser.add_argument("--chain-steps", type=int, default=400,
                        help="variational steps of each model on the harmonic chain (default 400)")
    parser.add_argument("--chain-eval-every", type=int, default=10,
                        help="steps between evaluations on the harmonic chain (default 10)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="leave out ours+compile (its first step compiles for ~50 s; --quick leaves it out too)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _torchState(threads):
    """Set the torch thread count; restore it and the denormal flag (which the sections toggle) afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        torch.set_flush_denormal(False)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def makeData(frames, seed):
    """Internal coordinates ``(train, validation)`` (float32) of unconstrained alanine dipeptide MD, 20 fs apart."""
    import logging
    logging.getLogger("pymbar").setLevel(logging.ERROR)
    import openmmtools.testsystems as testsystems

    ala2 = testsystems.AlanineDipeptideVacuum(constraints=None)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1.0 / unit.picosecond,
                                                 0.001 * unit.picoseconds)
    integrator.setRandomNumberSeed(seed + 1)
    context = openmm.Context(ala2.system, integrator, getPlatform("Reference"))
    context.setPositions(ala2.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, seed + 1)
    integrator.step(2000)
    positions = []
    for _ in range(frames):
        integrator.step(20)
        state = context.getState(getPositions=True)
        positions.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)[ATOMS])
    positions = np.array(positions)
    masses = np.array([ala2.system.getParticleMass(i).value_in_unit(unit.amu) for i in ATOMS])
    local = {atom: k for k, atom in enumerate(ATOMS)}
    bonds = [(local[a.index], local[b.index]) for a, b in ala2.topology.bonds()
             if a.index in local and b.index in local]
    frame = InternalFrame(ATOMS, torch.as_tensor(masses), torch.as_tensor(average_structure(positions, masses)),
                          thermal_energy(TEMPERATURE), spanning_tree(len(ATOMS), bonds))
    with torch.no_grad():
        u = frame.internal(torch.as_tensor(positions)).float()
    split = len(u) - len(u) // 6
    return u[:split], u[split:]


# ---------------------------------------------------------------------------------------------------------------
# The reference algorithm
# ---------------------------------------------------------------------------------------------------------------

class MaskedCoupling(nn.Module):
    """RealNVP coupling with a full-width conditioner: it reads ``x ⊙ keep`` and writes scale and shift for every
    coordinate, of which those of kept coordinates are multiplied by zero."""

    def __init__(self, keep: torch.Tensor, hidden: int, depth: int, scale_bound: float):
        super().__init__()
        dim = keep.numel()
        self.dim, self.scale_bound = dim, scale_bound
        self.register_buffer("keep", keep.float())
        self.register_buffer("change", 1.0 - keep.float())
        sizes = [dim] + [hidden] * depth
        modules = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            modules += [nn.Linear(a, b), nn.SiLU()]
        modules.append(nn.Linear(hidden, 2 * dim))
        self.net = nn.Sequential(*modules)

    def scale_shift(self, x):
        out = self.net(x * self.keep)
        s = self.scale_bound * torch.tanh(out[:, :self.dim]) * self.change
        return s, out[:, self.dim:] * self.change

    def forward(self, q):
        s, t = self.scale_shift(q)
        return q * torch.exp(s) + t

    def inverse(self, Q):
        s, t = self.scale_shift(Q)
        return (Q - t) * torch.exp(-s)


class ReferenceFlow(nn.Module):
    """A positions-only flow whose momenta come from autograd of a second pass in the other direction:
    ``P = p ∂q/∂Q`` (encoding, through the inverse map), ``p = P ∂Q/∂q`` (decoding, through the forward map)."""

    def __init__(self, layers, prior):
        super().__init__()
        self.layers, self.prior = nn.ModuleList(layers), prior

    def forward(self, q):
        for layer in self.layers:
            q = layer(q)
        return q

    def inverse(self, Q):
        for layer in reversed(self.layers):
            Q = layer.inverse(Q)
        return Q

    def nll(self, q, p, create_graph=True):
        """Mean ``−ln ρ(q, p)``."""
        Q = self.forward(q)
        qAgain = self.inverse(Q)
        P, = torch.autograd.grad(qAgain, Q, p, create_graph=create_graph)
        return -self.prior.log_prob(Q, P).mean()

    def variational(self, hamiltonian, n, generator, create_graph=True):
        """Monte-Carlo ``E[ln ρ + H]`` over ``n`` prior draws (reparameterised)."""
        Q, P = self.prior.sample(n, generator)
        logRho = self.prior.log_prob(Q, P)
        q = self.inverse(Q)
        QAgain = self.forward(q)
        p, = torch.autograd.grad(QAgain, q, P, create_graph=create_graph)
        return (logRho + hamiltonian(q, p)).mean()

    def set_dead_weights(self, value):
        """Set the weights that never get a gradient: the first layers' columns of masked-out inputs and the last
        layers' rows of the outputs that are multiplied by zero."""
        with torch.no_grad():
            for coupling in self.layers:
                if not isinstance(coupling, MaskedCoupling):
                    continue
                first, last = coupling.net[0], coupling.net[-1]
                masked = coupling.keep == 0
                first.weight[:, masked] = value
                last.weight[torch.cat([masked, masked]) == 0] = value


def referenceFrom(model, fullWidth=True):
    """The reference-algorithm flow that computes the same function as ``model`` (an NCTModel that is a point
    transformation): the same affine and linear point layers and prior; with ``fullWidth``, full-width conditioners
    holding ``model``'s weights padded with zeros, otherwise copies of ``model``'s half-width couplings."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, AffineCoupling) and fullWidth:
            layers.append(_maskedCopy(layer, model))
        else:
            layers.append(copy.deepcopy(layer))
    return ReferenceFlow(layers, copy.deepcopy(model.prior))


def _maskedCopy(layer, model):
    keep = torch.zeros(model.dim)
    keep[layer.conditioning] = 1.0
    coupling = MaskedCoupling(keep, model.config.hidden, model.config.depth, layer.scale_bound)
    ours, theirs = list(layer.net), list(coupling.net)
    with torch.no_grad():
        for module in theirs:
            if isinstance(module, nn.Linear):
                module.weight.zero_()
                module.bias.zero_()
        theirs[0].weight[:, layer.conditioning] = ours[0].weight
        theirs[0].bias.copy_(ours[0].bias)
        for a, b in zip(ours[1:-1], theirs[1:-1]):
            if isinstance(a, nn.Linear):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
        rows = torch.cat([layer.transformed, model.dim + layer.transformed])
        theirs[-1].weight[rows] = ours[-1].weight
        theirs[-1].bias[rows] = ours[-1].bias
    return coupling


# ---------------------------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------------------------

class Learner:
    """One model with its optimiser, sample stream and denormal setting; ``steps(n)`` trains n steps.

    ``loss(generator)`` returns the training loss of one batch drawn with ``generator``; learners built with the
    same seed draw the same batches.
    """

    def __init__(self, name, model, loss, seed, flushDenormals, optimizer=None):
        self.name, self.model, self.loss = name, model, loss
        self.device = next(model.parameters()).device
        self.optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.flushDenormals = flushDenormals
        self.count = 0
        self.seconds = 0.0

    def steps(self, n):
        torch.set_flush_denormal(self.flushDenormals)
        self._synchronize()
        start = time.perf_counter()
        for _ in range(n):
            self.step()
        self._synchronize()
        elapsed = time.perf_counter() - start
        self.count += n
        self.seconds += elapsed
        return elapsed

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.generator)
        loss.backward()
        self.optimizer.step()

    def _synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class GraphLearner(Learner):
    """A learner whose step is replayed from a CUDA graph; ``loss(None)`` draws from the default CUDA generator."""

    def __init__(self, name, model, loss, seed):
        super().__init__(name, model, loss, seed, flushDenormals=False)
        torch.cuda.manual_seed(seed)
        self.optimizer = flow_optimizer(model, LEARNING_RATE, frequency_lr_factor=1.0, capturable=True)
        self.captured = CapturedStep(lambda: loss(None), self.optimizer)

    def step(self):
        self.captured()


def _likelihoodLoss(nll, q):
    """Mean NLL of a batch of ``q`` with fresh Maxwell–Boltzmann momenta (unit masses, β = 1)."""
    def loss(generator):
        qb = q[torch.randint(len(q), (BATCH,), generator=generator, device=q.device)]
        return nll(qb, torch.randn(qb.shape, generator=generator, device=q.device))
    return loss


def _oursNll(model):
    return lambda q, p: negative_log_likelihood(model, q, p)


def _oursLearner(name, model, loss, seed):
    """Ours as :class:`~nct_openmm.core.Trainer` trains: flushed denormals, its (fused) Adam, here at one rate for
    all parameters so that ours and the reference follow the same optimisation path."""
    return Learner(name, model, loss, seed, flushDenormals=True,
                   optimizer=flow_optimizer(model, LEARNING_RATE, frequency_lr_factor=1.0))


def makeLearners(config, q, seed, allVariants=False, compiled=False):
    """reference and ours, starting as the same function, and ours+graph on a GPU; with ``allVariants`` also
    reference+half-width and ours+linear; with ``compiled`` (on a CPU) ours+compile, ours with
    :class:`~nct_openmm.core.training.CompiledLoss` (``compile_loss=True``), which compiles at its first step."""
    device = q.device
    ours = model_from_data(config, q.cpu())
    reference = referenceFrom(ours).train().to(device)
    ours = ours.to(device)
    learners = [Learner("reference", reference, _likelihoodLoss(reference.nll, q), seed, flushDenormals=False),
                _oursLearner("ours", ours.train(), _likelihoodLoss(_oursNll(ours), q), seed)]
    if device.type == "cuda":
        graphed = model_from_data(config, q.cpu()).to(device).train()
        learners.append(GraphLearner("ours+graph", graphed, _likelihoodLoss(_oursNll(graphed), q), seed))
    if allVariants:
        halfWidth = referenceFrom(ours, fullWidth=False).train()
        learners.append(Learner("reference+half-width", halfWidth, _likelihoodLoss(halfWidth.nll, q), seed,
                                flushDenormals=False))
        linearConfig = FlowConfig(**{**config.__dict__, "linear_point": True})
        linear = model_from_data(linearConfig, q.cpu()).to(device).train()
        learners.append(_oursLearner("ours+linear", linear, _likelihoodLoss(_oursNll(linear), q), seed))
    if compiled and device.type == "cpu":
        model = model_from_data(config, q.cpu()).train()
        learners.append(_oursLearner("ours+compile", model, _likelihoodLoss(CompiledLoss(_oursNll(model)), q), seed))
    return learners


def checkEquivalence(config, q):
    """Loss and gradient differences between ours and the reference on one batch, with random (non-zero) coupling
    outputs so that every layer acts."""
    ours = model_from_data(config, q.cpu())
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for layer in ours.layers:
            if isinstance(layer, AffineCoupling):
                layer.net[-1].weight.copy_(0.1 * torch.randn(layer.net[-1].weight.shape, generator=generator))
    reference = referenceFrom(ours)
    qb = q[:BATCH].cpu().double()
    pb = torch.randn(qb.shape, generator=generator, dtype=torch.float64)
    ours, reference = ours.double(), reference.double()
    lossOurs = negative_log_likelihood(ours, qb, pb)
    lossOurs.backward()
    lossReference = reference.nll(qb, pb)
    lossReference.backward()
    gradOurs = ours.prior.log_omega.grad
    gradReference = reference.prior.log_omega.grad
    lossOurs, lossReference = lossOurs.item(), lossReference.item()
    return {"nll_ours": lossOurs, "nll_reference": lossReference, "nll_difference": abs(lossOurs - lossReference),
            "log_omega_grad_max_difference": float((gradOurs - gradReference).abs().max()),
            "log_omega_grad_max": float(gradOurs.abs().max())}


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------

def _interleaved(learners, rounds, steps):
    """Seconds per step of every learner in every round (rotating order), and the seconds of the warm-up step each
    took first (which includes a compilation)."""
    firstStep = {learner.name: learner.steps(1) for learner in learners}
    perStep = {learner.name: [] for learner in learners}
    for round_ in range(rounds):
        shift = round_ % len(learners)
        for learner in learners[shift:] + learners[:shift]:
            perStep[learner.name].append(learner.steps(steps) / steps)
    return perStep, firstStep


def measureThroughput(config, q, options):
    """Rows ``{variant, samples_per_s, ratio_to_reference, ratio_min, ratio_max}``."""
    learners = makeLearners(config, q, options.seed, allVariants=True, compiled=options.compile)
    perStep, firstStep = _interleaved(learners, options.rounds, options.steps)
    base = perStep["reference"]
    rows = []
    for learner in learners:
        ratios = [b / s for b, s in zip(base, perStep[learner.name])]
        rows.append({"variant": learner.name, "samples_per_s": BATCH / statistics.median(perStep[learner.name]),
                     "ms_per_step": 1e3 * statistics.median(perStep[learner.name]),
                     "ratio_to_reference": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "first_step_s": firstStep[learner.name]})
    return rows


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def measureMatmulFloor(config, q, options):
    """Per training step of the reference and of ours: wall time (interleaved rounds, not profiled), and from
    ``torch.profiler`` the self time of the matrix products and the number of operator calls. The reference's step
    over ours' matrix products bounds what any implementation of ours could gain on this CPU without reducing them."""
    learners = makeLearners(config, q, options.seed)[:2]
    perStep, _ = _interleaved(learners, options.rounds, options.steps)
    rows = []
    for learner in learners:
        torch.set_flush_denormal(learner.flushDenormals)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            for _ in range(options.steps):
                learner.step()
        events = profile.key_averages()
        matmul = sum(event.self_cpu_time_total for event in events if event.key in MATMUL_OPS) * 1e-3
        calls = sum(event.count for event in events if event.key.startswith("aten::"))
        rows.append({"variant": learner.name, "ms_per_step": 1e3 * statistics.median(perStep[learner.name]),
                     "matmul_ms_per_step": matmul / options.steps, "ops_per_step": calls / options.steps})
    for row in rows:
        row["matmul_share"] = min(1.0, row["matmul_ms_per_step"] / row["ms_per_step"])
        row["reference_over_matmul"] = rows[0]["ms_per_step"] / row["matmul_ms_per_step"]
    return rows


def _validationNll(learner, qVal, momenta):
    learner.model.eval()
    with torch.enable_grad():
        if isinstance(learner.model, ReferenceFlow):
            value = learner.model.nll(qVal, momenta, create_graph=False).item()
        else:
            value = negative_log_likelihood(learner.model, qVal, momenta).item()
    learner.model.train()
    return value


def measureTimeToLoss(config, qTrain, qVal, options):
    """Both trained from the same function on the same batches; the validation NLL (fixed momenta) every
    ``eval_every`` steps, alternating chunks. Evaluation time is not counted. The target is a value both reached: the
    worse of the two best values, plus 2 % of the improvement on the start (None when neither improved)."""
    learners = makeLearners(config, qTrain, options.seed)
    momenta = torch.randn(qVal.shape, generator=torch.Generator().manual_seed(options.seed + 7)).to(qVal.device)
    curves = _trainAndEvaluate(learners, lambda learner: _validationNll(learner, qVal, momenta),
                               options.loss_steps, options.eval_every)
    start = curves["ours"][0][2]
    target = max(min(value for _, _, value in curve[1:]) for curve in curves.values())
    target += 0.02 * abs(start - target)
    return _timeToTarget(curves, None if target >= start else target, "validation_nll")


def _trainAndEvaluate(learners, evaluate, steps, every):
    """Train the learners in alternating chunks of ``every`` steps and ``evaluate(learner)`` after each: a curve
    ``[(steps, training seconds, value), ...]`` per learner name, starting with the untrained value."""
    curves = {learner.name: [(0, 0.0, evaluate(learner))] for learner in learners}
    for chunk in range(max(1, steps // every)):
        order = learners if chunk % 2 == 0 else learners[::-1]
        for learner in order:
            learner.steps(every)
            curves[learner.name].append((learner.count, learner.seconds, evaluate(learner)))
    return curves


def _timeToTarget(curves, target, key, baseline="reference"):
    """When each curve first reached ``target`` (steps, seconds), and the speed-up over ``baseline``."""
    reached = {}
    for name, curve in curves.items():
        hits = [(step, seconds) for step, seconds, value in curve[1:] if target is not None and value <= target]
        hit = hits[0] if hits else (None, None)
        reached[name] = {"steps": hit[0], "seconds": hit[1], f"final_{key}": curve[-1][2],
                         "curve": [{"step": s, "seconds": t, key: v} for s, t, v in curve]}
    base = reached[baseline]["seconds"]
    speedups = {name: base / row["seconds"] for name, row in reached.items() if row["seconds"] and base}
    return {f"initial_{key}": curves[baseline][0][2], f"target_{key}": target, "baseline": baseline,
            "variants": list(curves), "speedup": speedups.get("ours"), "speedups": speedups, **reached}


def _loadHarmonicChain():
    """``(examples/harmonic_chain.py as a module, None)``, or ``(None, why not)``."""
    path = os.path.join(REPOSITORY, "examples", "harmonic_chain.py")
    try:
        spec = importlib.util.spec_from_file_location("harmonic_chain_example", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.hamiltonian, module.exact_free_energy, module.parse_args  # noqa: B018 (what this benchmark uses)
        return module, None
    except (OSError, ImportError, AttributeError) as error:
        return None, f"{type(error).__name__}: {error}"


def measureChain(options):
    """Variational time to the reference's final free energy on the harmonic chain of
    ``examples/harmonic_chain.py``: ``CHAIN_SITES`` sites, the reference architecture with the linear point layer,
    data-free log-spaced initial ω, batch ``BATCH``; all start as the same function. Evaluated on fixed draws
    (``CHAIN_EVAL``).

    - ``reference``: the reference algorithm, Adam at ``LEARNING_RATE`` (as in the likelihood sections);
    - ``reference+our-optimiser``: the same with our optimiser settings, so that they are not what makes the
      difference;
    - ``ours``: as the example trains: whitened prior draws and :func:`~nct_openmm.core.fit_variational`'s
      optimiser at the example's rate (its ``--lr`` and ``--omega-lr-factor`` defaults).

    Each reference variant's final value is a target; the speed-up is the time that reference variant took to first
    reach its final value over the time ours took to reach it.
    """
    chain, problem = _loadHarmonicChain()
    if chain is None:
        return {"available": False, "reason": problem}
    hamiltonian = chain.hamiltonian
    config = FlowConfig(dim=CHAIN_SITES, seed=options.seed, **{**ARCHITECTURE, "linear_point": True})
    half = 0.5 * math.log(CHAIN_OMEGA_SPREAD)
    frequencies = torch.exp(torch.linspace(-half, half, CHAIN_SITES))
    device = torch.device(options.device)
    ours = NCTModel(config, frequencies=frequencies)
    reference, tuned = referenceFrom(ours).to(device), referenceFrom(ours).to(device)
    ours = ours.to(device)
    trained = chain.parse_args([])  # the example's own training settings
    lr, omegaFactor = trained.lr, trained.omega_lr_factor
    learners = [Learner("reference", reference.train(), lambda g: reference.variational(hamiltonian, BATCH, g),
                        options.seed, flushDenormals=False),
                Learner("reference+our-optimiser", tuned.train(),
                        lambda g: tuned.variational(hamiltonian, BATCH, g), options.seed, flushDenormals=False,
                        optimizer=flow_optimizer(tuned, lr, omegaFactor)),
                Learner("ours", ours.train(), lambda g: variational_loss(ours, hamiltonian, BATCH, 1.0, g, whiten=True),
                        options.seed, flushDenormals=True, optimizer=flow_optimizer(ours, lr, omegaFactor))]
    # No ours+graph here: the linear point layer's matrix exponential cannot be captured (Trainer refuses it).

    def evaluate(learner):
        generator = torch.Generator(device=device).manual_seed(options.seed + 11)
        learner.model.eval()
        if isinstance(learner.model, ReferenceFlow):
            value = learner.model.variational(hamiltonian, CHAIN_EVAL, generator, create_graph=False)
        else:
            with torch.no_grad():
                value = variational_loss(learner.model, hamiltonian, CHAIN_EVAL, 1.0, generator)
        learner.model.train()
        return value.item()

    curves = _trainAndEvaluate(learners, evaluate, options.chain_steps, options.chain_eval_every)
    versus = {name: _timeToTarget(curves, curves[name][-1][2], "free_energy", baseline=name)
              for name in ("reference", "reference+our-optimiser")}
    return {"available": True, "sites": CHAIN_SITES, "exact_free_energy": float(chain.exact_free_energy(CHAIN_SITES)),
            "learning_rates": {"reference": LEARNING_RATE, "ours": lr}, **versus["reference"], "versus": versus}


def measureDenormals(config, q, options):
    """ms per reference step: clean, dead weights at 1e-39 without flushing, the same with flushing; ours with
    and without flushing as a control."""
    learners = makeLearners(config, q, options.seed)[:2]
    reference, ours = learners
    configurations = [("reference, clean", reference, False, None),
                      ("reference, dead weights 1e-39", reference, False, DENORMAL),
                      ("reference, dead weights 1e-39, flushed", reference, True, DENORMAL),
                      ("ours, not flushed", ours, False, None),
                      ("ours, flushed", ours, True, None)]
    perStep = {label: [] for label, _, _, _ in configurations}
    for learner in learners:
        learner.steps(1)
    for round_ in range(options.rounds):
        shift = round_ % len(configurations)
        for label, learner, flush, dead in configurations[shift:] + configurations[:shift]:
            if learner is reference:
                # Adam leaves weights without gradient where they are, but a flushed step may zero them: reset.
                reference.model.set_dead_weights(0.0 if dead is None else dead)
            learner.flushDenormals = flush
            perStep[label].append(learner.steps(options.steps) / options.steps)
    clean = perStep["reference, clean"]
    rows = []
    for label, _, flush, _ in configurations:
        ratios = [c / s for c, s in zip(clean, perStep[label])]
        rows.append({"configuration": label, "flush_denormals": flush,
                     "ms_per_step": 1e3 * statistics.median(perStep[label]),
                     "speed_vs_clean_reference": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios)})
    return rows


def probeDenormalMatmul(repeats=400, rounds=5):
    """Microseconds of a (200, 128) @ (128, 128) float32 product with normal, denormal (1e-39) and zero weights,
    denormals not flushed and flushed: whether this CPU pays for denormal arithmetic at all."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 128, generator=generator)
    weights = {"normal": 0.1 * torch.randn(128, 128, generator=generator),
               "denormal": torch.full((128, 128), DENORMAL), "zero": torch.zeros(128, 128)}
    cases = [(name, flush) for flush in (False, True) for name in weights]
    times = {case: [] for case in cases}
    for _ in range(rounds):
        for name, flush in cases:
            torch.set_flush_denormal(flush)
            w = weights[name]
            x @ w
            start = time.perf_counter()
            for _ in range(repeats):
                x @ w
            times[(name, flush)].append((time.perf_counter() - start) / repeats * 1e6)
    torch.set_flush_denormal(False)
    return [{"weights": name, "flush_denormals": flush, "us_per_matmul": statistics.median(times[(name, flush)])}
            for name, flush in cases]


def printReport(result):
    settings = result["settings"]
    equivalence = result["equivalence"]
    print(f"phase-space maximum likelihood, {settings['dim']} coordinates, batch {settings['batch']}, "
          f"{settings['n_couplings']} couplings x {settings['depth']} hidden layers of {settings['hidden']}, "
          f"{settings['torch_threads']} torch thread(s)")
    print(f"same function: NLL ours {equivalence['nll_ours']:.6f}, reference {equivalence['nll_reference']:.6f} "
          f"(float64; gradient of log omega differs by {equivalence['log_omega_grad_max_difference']:.1e})")
    for key in ("throughput", "matmul_floor", "time_to_loss", "harmonic_chain", "denormals"):
        if isinstance(result[key], dict) and "error" in result[key]:
            print(f"{key}: failed: {result[key]['error']}")
    print()
    if isinstance(result["throughput"], list):
        _printThroughput(result)
    if isinstance(result["matmul_floor"], list) and result["matmul_floor"]:
        _printMatmulFloor(result["matmul_floor"])
        print()
    if "error" not in result["time_to_loss"]:
        _printTimeToTarget(result["time_to_loss"], "validation_nll", "validation NLL (ala2 data)", "--loss-steps",
                           "the worse of the two best values, plus 2 % of the improvement")
        print()
    chain = result["harmonic_chain"]
    if "error" not in chain and chain["available"]:
        _printChain(chain)
    elif "error" not in chain:
        print(f"harmonic chain: examples/harmonic_chain.py not usable ({chain['reason']})")
    if not isinstance(result["denormals"], list) or not result["denormals"]:
        return
    print()
    print("float32 denormals (ms per training step; speed relative to the clean reference)")
    for row in result["denormals"]:
        print(f"{row['configuration']:>40} {row['ms_per_step']:>8.1f} {row['speed_vs_clean_reference']:>7.2f} "
              f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]")
    probe = ", ".join(f"{row['weights']}{' flushed' if row['flush_denormals'] else ''} {row['us_per_matmul']:.0f}"
                      for row in result["denormal_matmul_probe"])
    print(f"probe, us per (200x128)@(128x128) float32 matmul: {probe}")


def _printThroughput(result):
    settings = result["settings"]
    print(f"samples/s (median of {settings['rounds']} interleaved rounds of {settings['steps_per_round']} steps; "
          "ratio: median of per-round ratios [min-max])")
    print(f"{'variant':>20} {'samples/s':>10} {'ms/step':>9} {'x reference':>12} {'spread':>14} {'first step s':>13}")
    for row in result["throughput"]:
        spread = f"[{row['ratio_min']:.2f}-{row['ratio_max']:.2f}]"
        print(f"{row['variant']:>20} {row['samples_per_s']:>10.0f} {row['ms_per_step']:>9.1f} "
              f"{row['ratio_to_reference']:>12.2f} {spread:>14} {row['first_step_s']:>13.2f}")
    print()


def _printTimeToTarget(section, key, what, option, rule):
    if section[f"target_{key}"] is None:
        print(f"time to {what}: no improvement on the start ({section[f'initial_{key}']:.3f}) within the budget; "
              f"raise {option}")
    else:
        print(f"time to {what} {section[f'target_{key}']:.3f} (start {section[f'initial_{key}']:.3f}; {rule})")
    print(f"{'variant':>24} {'steps':>7} {'train s':>8} {'final':>10} {'speed-up':>9}")
    for name in section["variants"]:
        row = section[name]
        steps = "-" if row["steps"] is None else str(row["steps"])
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.1f}"
        speedup = section["speedups"].get(name)
        speedup = "-" if speedup is None else f"{speedup:.2f}x"
        print(f"{name:>24} {steps:>7} {seconds:>8} {row[f'final_{key}']:>10.3f} {speedup:>9}")


def _printChain(chain):
    what = f"variational free energy, harmonic chain of {chain['sites']} (exact {chain['exact_free_energy']:.3f})"
    for name, section in chain["versus"].items():
        _printTimeToTarget(section, "free_energy", what, "--chain-steps", f"the final value of {name}")
        print()


def _printMatmulFloor(rows):
    print("where a CPU step goes (torch.profiler; matrix products = aten::mm/addmm/bmm self time)")
    print(f"{'variant':>12} {'ms/step':>8} {'matmul ms':>10} {'share':>6} {'ops/step':>9}")
    for row in rows:
        print(f"{row['variant']:>12} {row['ms_per_step']:>8.1f} {row['matmul_ms_per_step']:>10.1f} "
              f"{row['matmul_share']:>6.0%} {row['ops_per_step']:>9.0f}")
    ours = next(row for row in rows if row["variant"] == "ours")
    print(f"bound on ours vs the reference if everything but ours' matrix products took no time: "
          f"{ours['reference_over_matmul']:.1f}x")


if __name__ == "__main__":
    main()
