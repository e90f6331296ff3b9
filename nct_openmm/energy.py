"""Variational NCT training straight from a force field: an OpenMM System as a differentiable energy (paper Eq. 5).

The maximum-likelihood path (:mod:`nct_openmm.slowmodes`) needs trajectories. The variational path needs none: it
minimises ``F[ρ] = E_{x∼ρ}[ln ρ(x) + βH(x)] ≥ −ln Z`` over the flow, sampling from the flow itself and asking the
force field for ``U`` and ``−∇U`` at every sample.

Three pieces, one per idiom:

- :class:`OpenMMEnergy` speaks OpenMM: it owns a ``Context`` for an *unconstrained* System and evaluates batches of
  positions (nm, ``(B, N, 3)``) to energies (kJ/mol) and forces; called as a function of a torch tensor it is an
  autograd function whose backward is ``−forces · grad_output``.
- :class:`ReducedHamiltonian` (:func:`reduced_hamiltonian`) is the torch seam: ``H(u, p) = p²/2 + (U(x(u)) − U₀)/kT``
  on the reduced internal coordinates ``u`` of an :class:`~nct_openmm.geometry.InternalFrame`, the β = 1 units of
  :mod:`nct_openmm.core`.
- :func:`fit_variational_openmm` is the estimator: minimise, build the harmonic limit from the mass-weighted Hessian,
  train, and return a :class:`~nct_openmm.slowmodes.SlowModeModel` (same model file as the maximum-likelihood path).

Constraints. A System with constraints is refused, not repaired: OpenMM leaves the bond term of a constrained bond
out of the System (``HarmonicBondForce`` holds no spring for an ``HBonds``-constrained X–H bond), so deleting the
constraints would leave those atoms unbound. Build the System with ``constraints=None`` instead (``app.ForceField
.createSystem(..., constraints=None, rigidWater=False)``, ``AmberPrmtopFile.createSystem(constraints=None)``,
``openmmtools.testsystems.AlanineDipeptideVacuum(constraints=None)``). The flow moves every internal coordinate,
bond lengths included; a constrained System has no energy for those motions.

Constraints are checked, not guessed: the openmmtools alanine dipeptide has 21 ``HarmonicBondForce`` terms without
constraints and 9 with ``HBonds`` (its 12 X–H bonds then exist only as constraints).

Gradient. :func:`fit_variational_openmm` trains with the path-derivative estimator
(:func:`~nct_openmm.core.training.path_gradient_objective`) by default: unbiased like the plain reparameterisation
gradient of :func:`~nct_openmm.core.fit_variational`, but with a variance that vanishes at the optimum, which is what
lets the frequencies converge instead of jittering.

Cost. One sample is one ``setPositions`` plus one ``getState(getEnergy=True, getForces=True)``; the forces are kept
for the backward pass, so a training step costs ``batch_size`` such calls and no more. Measured on alanine dipeptide
in vacuum (22 atoms, no cutoff) on the 2 shared cores of the development machine (load average ~7), forward plus
backward on the Reference platform: 52–62 µs per sample with the raw-array read-out used here (the bare
``setPositions`` + ``getState`` pair took 17–35 µs in quieter moments), against 120–230 µs through the unit-wrapped
public ``State`` accessors (wrapping the force array in a ``Quantity`` alone costs ~50 µs). The CPU
platform (1 thread) takes ~220 µs: it only pays off for thousands of atoms (see STACK.md). A 128-sample step on
alanine dipeptide thus spends ~5 ms in OpenMM, while a flow of 4 couplings × 64 hidden units took ~30–60 ms for its
own forward and double backward (measured before the closed-form cotangent lift made steps ~1.5× faster): for small
molecules the force field is not the bottleneck. Small flows run many
times faster with ``torch.set_num_threads(1)`` on 2 shared cores. :attr:`OpenMMEnergy.microsecondsPerSample`
reports the cost measured in a run.
"""
import datetime
import math
import platform as _python_platform
import time
import warnings
from dataclasses import replace
from typing import Optional, Union

import numpy as np
import openmm
import openmm.unit as unit
import torch
from torch import Tensor

from . import __version__
from .core import FlowConfig, NCTModel, fit_variational, free_energy_estimate
from .core.training import VARIATIONAL_GRADIENTS
from .core.layers import AffinePoint
from .data import thermal_energy
from .geometry import InternalFrame, spanning_tree
from .slowmodes import SlowModeModel
from .systems import getPlatform, platformProperties, valueInUnit

_ENERGY = unit.kilojoule_per_mole
_FORCE = unit.kilojoule_per_mole / unit.nanometer


class OpenMMEnergy:
    """Potential energies and forces of an unconstrained OpenMM System, batched, as a torch autograd function.

    Parameters
    ----------
    system : openmm.System
        Must have no constraints (see the module docstring for why, and how to build one) and no virtual sites.
    platform : str or openmm.Platform
        ``"Reference"`` by default (double precision, and the fastest for small molecules on CPUs).
    threads : int, optional
        CPU-platform threads.
    precision : str, optional
        GPU-platform precision; ``"double"`` is advisable for training, whose gradients are the forces.

    Calling the object with positions ``(B, N, 3)`` (or ``(N, 3)``) in nm returns energies ``(B,)`` (or a scalar) in
    kJ/mol, in the positions' dtype, differentiable once: the backward pass returns ``−forces · grad_output`` from
    forces cached in the forward pass (no second OpenMM call).

    Raises
    ------
    ValueError
        For a System with constraints or virtual sites.

    Examples
    --------
    >>> system = openmm.System()
    >>> _ = system.addParticle(1.0)
    >>> well = openmm.CustomExternalForce("0.5*100*(x^2+y^2+z^2)")
    >>> _ = well.addParticle(0, [])
    >>> _ = system.addForce(well)
    >>> energy = OpenMMEnergy(system)
    >>> x = torch.tensor([[[0.1, -0.2, 0.3]]], dtype=torch.float64, requires_grad=True)
    >>> u = energy(x)
    >>> round(float(u.detach()), 6)               # k |x|² / 2
    7.0
    >>> u.sum().backward()
    >>> x.grad.tolist()                        # ∇U = k x
    [[[10.0, -20.0, 30.0]]]
    """

    def __init__(self, system: openmm.System, platform: Union[str, openmm.Platform] = "Reference",
                 threads: Optional[int] = None, precision: Optional[str] = None):
        if system.getNumConstraints() > 0:
            raise ValueError(
                f"the System has {system.getNumConstraints()} constraints; variational training moves every bond, "
                "so it needs an unconstrained System. Removing the constraints afterwards would not do: OpenMM "
                "omits the bond terms of constrained bonds. Rebuild it with constraints=None (and rigidWater=False)")
        virtual = [i for i in range(system.getNumParticles()) if system.isVirtualSite(i)]
        if virtual:
            raise ValueError(f"the System has {len(virtual)} virtual sites (first: particle {virtual[0]}); "
                             "variational training needs every particle to be a massive, independent atom")
        self.system = system
        self.platform = getPlatform(platform, threads)
        self.integrator = openmm.VerletIntegrator(0.001)  # never stepped: a Context needs one
        self.context = openmm.Context(system, self.integrator, self.platform,
                                      platformProperties(self.platform, precision, threads))
        self.nParticles = system.getNumParticles()
        # Raw SWIG accessors skip the unit wrapping that costs more than the force evaluation itself on small
        # systems; fall back to the public API if a future OpenMM drops them.
        self._fastReadout = hasattr(openmm.State, "_getVectorAsNumpy") and hasattr(
            getattr(openmm, "_openmm", None), "State_getPotentialEnergy")
        self.evaluationCount = 0
        self.evaluationSeconds = 0.0

    # --- OpenMM idiom -----------------------------------------------------------------------------------------
    def getPlatformName(self) -> str:
        return self.platform.getName()

    @property
    def microsecondsPerSample(self) -> float:
        """Mean wall time of one energy-and-forces evaluation so far (µs), NaN before the first."""
        return 1e6 * self.evaluationSeconds / self.evaluationCount if self.evaluationCount else math.nan

    def computeEnergiesAndForces(self, positions: np.ndarray):
        """Energies ``(B,)`` in kJ/mol and forces ``(B, N, 3)`` in kJ/mol/nm of positions ``(B, N, 3)`` in nm.

        One ``setPositions`` and one ``getState(getEnergy=True, getForces=True)`` per sample.

        Raises
        ------
        ValueError
            For a wrong shape or non-finite positions (naming the sample).
        FloatingPointError
            For a non-finite energy or force (naming the sample), e.g. overlapping atoms.
        """
        x = np.ascontiguousarray(positions, dtype=np.float64)
        if x.ndim != 3 or x.shape[1:] != (self.nParticles, 3):
            raise ValueError(f"positions must have shape (batch, {self.nParticles}, 3), got {x.shape}")
        bad = ~np.isfinite(x).all(axis=(1, 2))
        if bad.any():
            raise ValueError(f"sample {int(np.argmax(bad))} of the batch has non-finite positions")
        energies = np.empty(len(x))
        forces = np.empty_like(x)
        start = time.perf_counter()
        context = self.context
        for i in range(len(x)):
            context.setPositions(x[i])
            state = context.getState(getEnergy=True, getForces=True)
            if self._fastReadout:
                energies[i] = openmm._openmm.State_getPotentialEnergy(state)
                state._getVectorAsNumpy(openmm.State.Forces, forces[i])
            else:
                energies[i] = state.getPotentialEnergy().value_in_unit(_ENERGY)
                forces[i] = state.getForces(asNumpy=True).value_in_unit(_FORCE)
            if not math.isfinite(energies[i]):
                raise FloatingPointError(
                    f"OpenMM returned a potential energy of {energies[i]} kJ/mol for sample {i} of the batch "
                    "(overlapping atoms?); lower the learning rate or start from a better initialisation")
        self.evaluationSeconds += time.perf_counter() - start
        self.evaluationCount += len(x)
        bad = ~np.isfinite(forces).all(axis=(1, 2))
        if bad.any():
            raise FloatingPointError(f"OpenMM returned non-finite forces for sample {int(np.argmax(bad))} of the "
                                     "batch")
        return energies, forces

    def minimizeEnergy(self, positions: np.ndarray, tolerance: float = 1e-3, maxIterations: int = 0) -> np.ndarray:
        """A local minimum (nm, ``(N, 3)``) reached from ``positions`` by OpenMM's L-BFGS minimiser; ``tolerance``
        is the RMS force (kJ/mol/nm) to stop at. Tight by default, since the Hessian is taken there."""
        self.context.setPositions(np.ascontiguousarray(positions, dtype=np.float64))
        openmm.LocalEnergyMinimizer.minimize(self.context, tolerance, maxIterations)
        state = self.context.getState(getPositions=True)
        return state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)

    def computeHessian(self, positions: np.ndarray, step: float = 1e-4) -> np.ndarray:
        """Cartesian Hessian ``(3N, 3N)`` of U (kJ/mol/nm²) at ``positions (N, 3)`` by central differences of the
        forces with displacement ``step`` (nm), symmetrised. Costs ``6N`` force evaluations."""
        x = np.asarray(positions, dtype=np.float64).reshape(-1)
        n = x.size
        displaced = np.repeat(x[None], 2 * n, axis=0)
        displaced[np.arange(n), np.arange(n)] += step
        displaced[n + np.arange(n), np.arange(n)] -= step
        _, forces = self.computeEnergiesAndForces(displaced.reshape(2 * n, -1, 3))
        forces = forces.reshape(2 * n, n)
        hessian = -(forces[:n] - forces[n:]) / (2 * step)  # row j: ∂(∇U)/∂x_j
        return 0.5 * (hessian + hessian.T)

    # --- torch idiom ------------------------------------------------------------------------------------------
    def __call__(self, positions: Tensor) -> Tensor:
        if positions.dim() == 2:
            return _PotentialEnergy.apply(positions[None], self)[0]
        return _PotentialEnergy.apply(positions, self)


class _PotentialEnergy(torch.autograd.Function):
    """positions ``(B, N, 3)`` nm → energies ``(B,)`` kJ/mol; backward ``−F · grad_output`` from cached forces."""

    @staticmethod
    def forward(ctx, positions: Tensor, engine: OpenMMEnergy) -> Tensor:
        energies, forces = engine.computeEnergiesAndForces(positions.detach().cpu().double().numpy())
        ctx.save_for_backward(torch.from_numpy(forces))
        return torch.from_numpy(energies).to(dtype=positions.dtype, device=positions.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        (forces,) = ctx.saved_tensors
        gradient = -forces.to(dtype=grad_output.dtype, device=grad_output.device) * grad_output[:, None, None]
        return gradient, None


class ReducedHamiltonian:
    """``H(u, p) = |p|²/2 + (U(x(u)) − energy_offset)/kT`` in the reduced units of an :class:`InternalFrame`.

    ``x(u) = frame.cartesian(u)`` gives positions of the frame's atoms in its reference frame; they are put in the
    System's particle order before OpenMM sees them, so the frame must select every particle of the System (in any
    order). The potential is evaluated in float64 and returned in ``u``'s dtype.

    Raises
    ------
    ValueError
        When the frame does not hold every particle of the System exactly once: a force field cannot evaluate a
        molecule with atoms missing (e.g. a heavy-atom frame).
    """

    def __init__(self, frame: InternalFrame, energy: OpenMMEnergy, energy_offset: float = 0.0):
        indices = list(frame.atom_indices)
        n = energy.nParticles
        if sorted(indices) != list(range(n)):
            missing = sorted(set(range(n)) - set(indices))
            raise ValueError(
                f"variational training evaluates the force field on the flow's samples, so the internal frame must "
                f"hold every particle of the System exactly once: it selects {len(indices)} atoms"
                + (f" ({len(set(indices))} distinct)" if len(set(indices)) != len(indices) else "")
                + f" of {n}" + (f"; missing e.g. {missing[:5]}" if missing else "")
                + ". Build the frame on all atoms (a heavy-atom frame suits the maximum-likelihood path only)")
        self.frame, self.energy = frame, energy
        self.kT = float(frame.kT)
        self.energy_offset = float(energy_offset)
        self._system_order = torch.as_tensor(np.argsort(indices), dtype=torch.long)

    def positions(self, u: Tensor) -> Tensor:
        """All-particle positions ``(..., N, 3)`` in nm, System order, float64."""
        return self.frame.cartesian(u).index_select(-2, self._system_order)

    def potential(self, u: Tensor) -> Tensor:
        """``(U(x(u)) − energy_offset)/kT`` per sample, float64."""
        flat = u.reshape(-1, u.shape[-1])
        energies = self.energy(self.positions(flat))
        return ((energies - self.energy_offset) / self.kT).reshape(u.shape[:-1])

    def __call__(self, q: Tensor, p: Tensor) -> Tensor:
        return 0.5 * (p ** 2).sum(-1) + self.potential(q).to(q.dtype)


def reduced_hamiltonian(frame: InternalFrame, energy: OpenMMEnergy, energy_offset: float = 0.0) -> ReducedHamiltonian:
    """The reduced Hamiltonian of ``energy`` on ``frame``'s internal coordinates, for
    :func:`~nct_openmm.core.fit_variational`; see :class:`ReducedHamiltonian`
    (which checks that ``frame`` holds every particle)."""
    return ReducedHamiltonian(frame, energy, energy_offset)


# --- the harmonic limit --------------------------------------------------------------------------------------------
def internal_hessian(frame: InternalFrame, cartesian_hessian: np.ndarray) -> Tensor:
    """The Hessian of ``U/kT`` in the frame's reduced internal coordinates, ``(d, d)`` in 1/ps².

    With ``x = M^{-1/2} B u √kT`` it is ``Bᵀ M^{-1/2} H_x M^{-1/2} B``: the mass-weighted Hessian projected on the
    internal basis (rigid-body directions removed when the frame aligns). Its eigenvalues are ω² of the normal modes.
    Atoms are taken in the frame's order; ``cartesian_hessian`` is in the System's order.
    """
    index = torch.as_tensor(frame.atom_indices, dtype=torch.long)
    coords = (3 * index[:, None] + torch.arange(3)).reshape(-1)
    hessian = torch.as_tensor(cartesian_hessian, dtype=torch.float64)[coords][:, coords]
    inverse_sqrt_mass = torch.rsqrt(frame.masses).repeat_interleave(3)
    weighted = inverse_sqrt_mass[:, None] * hessian * inverse_sqrt_mass[None, :]
    projected = frame.basis.T @ weighted @ frame.basis
    return 0.5 * (projected + projected.T)


def harmonic_flow(config: FlowConfig, centre: Tensor, hessian: Tensor, min_frequency: Optional[float] = None):
    """An untrained flow that is exactly the harmonic approximation ``N(centre, hessian⁻¹)`` in reduced units.

    The normal modes become the prior's modes: ``pre`` centres, rotates onto the eigenvectors of ``hessian`` and
    scales each by ω, ``post`` divides by ω again, and the prior starts at ω (ascending, slowest first). The
    couplings start at the identity, so the model's density *is* the harmonic one.

    ω is floored at ``min_frequency`` (1/ps; default 10⁻⁴ of the largest ω), with a warning: eigenvalues at or
    below zero come from a saddle or an unminimised structure. Returns ``(model, ω, n_floored)``.
    """
    eigenvalues, vectors = torch.linalg.eigh(hessian.double())
    positive = eigenvalues[eigenvalues > 0]
    floor = min_frequency if min_frequency is not None else (
        1e-4 * float(positive.max().sqrt()) if len(positive) else 1.0)
    floored = int((eigenvalues < floor ** 2).sum())
    if floored:
        warnings.warn(f"{floored} Hessian eigenvalues lie below ({floor:.3g}/ps)², {int((eigenvalues <= 0).sum())} "
                      "of them not positive (is the reference a minimum?); their frequencies are floored there",
                      RuntimeWarning, stacklevel=2)
    omega = torch.sqrt(torch.clamp(eigenvalues, min=floor ** 2))
    dim = len(omega)
    pre = AffinePoint(centre.float(), vectors.float(), omega.float())
    post = AffinePoint(torch.zeros(dim), torch.eye(dim), (1.0 / omega).float())
    return NCTModel(config, frequencies=omega.float(), pre=pre, post=post), omega, floored


def harmonic_free_energy(omega) -> float:
    """``−ln Z`` (kT) of ``Σ_k (p_k² + ω_k² q_k²)/2`` in reduced units: ``Σ_k ln(ω_k / 2π)``."""
    omega = torch.as_tensor(omega, dtype=torch.float64)
    return float(torch.log(omega / (2 * math.pi)).sum())


# --- the estimator -------------------------------------------------------------------------------------------------
def fit_variational_openmm(system: openmm.System, topology, reference_positions, temperature,
                           config: Optional[Union[FlowConfig, dict]] = None, *, align: bool = True,
                           platform: Union[str, openmm.Platform] = "Reference", threads: Optional[int] = None,
                           minimize: bool = True, init: str = "hessian", hessian_step: float = 1e-4,
                           gradient: str = "path",
                           steps: int = 2000, batch_size: int = 256, lr: float = 1e-3, eval_every: int = 100,
                           eval_batch: int = 2048, patience: int = 8, seed: int = 0, progress: bool = True,
                           checkpoint: Optional[str] = None, **trainer_options) -> SlowModeModel:
    """Train an NCT of a molecule variationally against its force field (paper Eq. 5) — no trajectory needed.

    Parameters
    ----------
    system : openmm.System
        Without constraints or virtual sites (see the module docstring); every particle enters the flow.
    topology : openmm.app.Topology or None
        Its bonds give the frame's unwrapping tree; its atom count must match the System's.
    reference_positions : array (N, 3) in nm, or a Quantity
        Start of the minimisation; the (minimised) structure is the frame's reference and the harmonic centre.
    temperature : float (K) or Quantity
    config : FlowConfig or dict, optional
        Flow hyperparameters; a dict is passed to ``FlowConfig(dim=d, ...)``. A FlowConfig must have
        ``dim = 3N − 6`` (``3N`` without alignment).
    align : bool
        Remove rigid-body motion (default). ``False`` only for particles held in space by external forces.
    platform, threads
        OpenMM platform for the energies (Reference by default).
    minimize : bool
        Minimise the reference first (RMS force below 1e-3 kJ/mol/nm), so the Hessian is positive.
    init : {"hessian", "unit"}
        ``"hessian"``: start at the harmonic limit of the force field (normal modes from the finite-difference
        Hessian; :func:`harmonic_flow`). ``"unit"``: start centred on the reference with ω = 1 and the identity
        map — no knowledge of U; only sensible for toy systems (a molecule's samples would overlap atoms).
    gradient : {"path", "reparameterization"}
        The estimator of :func:`~nct_openmm.core.fit_variational`'s training gradient. ``"path"`` (default): the
        path derivative, whose variance vanishes at the optimum; ``"reparameterization"``: the full gradient.
        On a harmonic well, the latter leaves ω jittering by several per cent at a constant learning rate while
        the former converges to the exact frequencies.
    steps, batch_size, lr, eval_every, eval_batch, patience, seed, progress, checkpoint
        Training settings; training resumes from ``checkpoint`` if it exists.
    **trainer_options
        Further :class:`~nct_openmm.core.Trainer` settings (``lr_patience``, ``lr_factor``, ``min_lr``,
        ``frequency_lr_factor``).

    Returns
    -------
    SlowModeModel
        Its metadata's ``training`` section reports the variational free energy before and after training, the
        importance-sampled estimate, the harmonic ``−ln Z`` and the gap to it, all in kT relative to the
        reference (minimum) energy, and the measured cost of the energies.

    Raises
    ------
    ValueError
        For constraints, virtual sites, massless particles, mismatched shapes or a FlowConfig of the wrong size.
    """
    if init not in ("hessian", "unit"):
        raise ValueError(f"unknown init {init!r}: use 'hessian' or 'unit'")
    if gradient not in VARIATIONAL_GRADIENTS:  # checked before the set-up, which takes a while
        raise ValueError(f"unknown gradient {gradient!r}: use one of {', '.join(VARIATIONAL_GRADIENTS)}")
    energy = OpenMMEnergy(system, platform, threads)
    n = system.getNumParticles()
    positions = np.asarray(valueInUnit(reference_positions, unit.nanometer)
                           if unit.is_quantity(reference_positions) else reference_positions, dtype=np.float64)
    if positions.shape != (n, 3):
        raise ValueError(f"reference positions must have shape ({n}, 3) for this System, got {positions.shape}")
    if topology is not None and topology.getNumAtoms() != n:
        raise ValueError(f"the topology has {topology.getNumAtoms()} atoms but the System has {n} particles")
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(n)])
    if np.any(masses <= 0):
        raise ValueError(f"particle {int(np.argmax(masses <= 0))} is massless; every particle must move with the "
                         "flow")
    temperature = valueInUnit(temperature, unit.kelvin)
    kT = thermal_energy(temperature)
    clock = time.perf_counter()
    if minimize:
        positions = energy.minimizeEnergy(positions)
    parents = None
    if topology is not None:
        parents = spanning_tree(n, [(a.index, b.index) for a, b in topology.bonds()])
    frame = InternalFrame(list(range(n)), torch.as_tensor(masses), torch.as_tensor(positions), kT, parents, align)
    config = _flow_config(config, frame.dim, align)

    reference_energy = float(energy.computeEnergiesAndForces(positions[None])[0][0])
    hamiltonian = reduced_hamiltonian(frame, energy, energy_offset=reference_energy)
    with torch.no_grad():
        centre = frame.internal(torch.as_tensor(positions)[None])[0]
    hessian = internal_hessian(frame, energy.computeHessian(positions, hessian_step))
    harmonic_model, omega, floored = harmonic_flow(config, centre, hessian)
    if init == "hessian":
        flow = harmonic_model
    else:
        flow = NCTModel(config, pre=AffinePoint(centre.float(), torch.eye(frame.dim), torch.ones(frame.dim)))
    harmonic = harmonic_free_energy(omega)
    setup_seconds = time.perf_counter() - clock

    # The very samples the trainer monitors (one draw of eval_batch with seed + 1), so the numbers compare.
    initial = free_energy_estimate(flow, hamiltonian, eval_batch, seed + 1, batch=eval_batch)
    history = fit_variational(flow, hamiltonian, gradient=gradient, batch_size=batch_size, max_steps=steps,
                              eval_every=eval_every, eval_batch=eval_batch, lr=lr, patience=patience, seed=seed,
                              checkpoint=checkpoint, resume=checkpoint is not None, progress=progress,
                              **trainer_options)
    final = free_energy_estimate(flow, hamiltonian, eval_batch, seed + 2, batch=eval_batch)  # fresh: unbiased
    with torch.no_grad():
        u, _ = flow.sample(eval_batch, torch.Generator().manual_seed(seed + 3))
        flow.fix_mode_signs(u)
        eps = flow.slow_modes(u, scaled=True).double().numpy()

    metadata = {
        "temperature": temperature,
        "units": {"positions": "nm", "masses": "amu", "frequencies": "1/ps", "temperature": "K",
                  "free_energies": "kT, relative to U(reference)/kT"},
        "training": {
            "method": "variational (OpenMM energy)",
            "platform": energy.getPlatformName(), "particles": n, "minimized": bool(minimize),
            "initialization": init, "gradient": gradient, "reference_energy_kj_per_mol": reference_energy,
            "harmonic_frequencies": omega.tolist(), "floored_harmonic_modes": floored,
            "harmonic_free_energy": harmonic,
            "initial_free_energy": initial["variational"],
            "free_energy": final["variational"], "free_energy_standard_error": final["standard_error"],
            "importance_sampled_free_energy": final["importance_sampled"],
            "effective_sample_fraction": final["effective_sample_fraction"],
            "gap_to_harmonic": final["variational"] - harmonic,
            "best_monitored_free_energy": float(history.best_val_loss),
            "steps": int(history.step[-1]) if history.step else 0, "stopped": history.stopped,
            "seconds": float(history.elapsed[-1]) if history.elapsed else 0.0,
            "setup_seconds": setup_seconds, "energy_evaluations": energy.evaluationCount,
            "microseconds_per_energy": energy.microsecondsPerSample,
            "batch_size": batch_size, "max_steps": steps, "lr": lr, "eval_every": eval_every,
            "eval_batch": eval_batch, "patience": patience, "seed": seed, "align": bool(align),
            "trainer_options": dict(trainer_options),
            "forces": [force.__class__.__name__ for force in system.getForces()],
        },
        "mode_ranges": np.stack([eps.min(0), eps.max(0)], axis=1).tolist(),
        "versions": {"nct_openmm": __version__, "torch": str(torch.__version__), "openmm": str(openmm.__version__),
                     "python": _python_platform.python_version()},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    model = SlowModeModel(frame, flow, metadata)
    model.history = history
    return model


def _flow_config(config, dim: int, align: bool) -> FlowConfig:
    if config is None:
        return FlowConfig(dim=dim)
    if isinstance(config, dict):
        return FlowConfig(dim=dim, **config)
    if config.dim != dim:
        raise ValueError(f"the FlowConfig has dim={config.dim}, but this System has {dim} internal coordinates "
                         f"({'3N − 6' if align else '3N'}); use dataclasses.replace(config, dim={dim})")
    return replace(config)
