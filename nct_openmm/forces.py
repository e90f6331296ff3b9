"""Slow modes as OpenMM forces: collective variables, a latent-space bias, and a reporter.

An exported CV module maps positions ``(N, 3)`` in nm (and optionally the box vectors) to its K slow modes,
slowest first, each scaled to unit variance on the training data. This module hands those modes to OpenMM in two
ways:

- :func:`SlowModeCV` wraps one mode as a ``TorchForce`` whose energy *is* the mode, the shape OpenMM expects for a
  ``CustomCVForce`` collective variable or an ``app.BiasVariable`` (:func:`slowModeBiasVariables`). Each such force
  runs the model again, so K modes cost K forward and backward passes per step.
- :class:`LatentBiasForce` evaluates all K modes once and returns a bias built from them: harmonic restraints,
  flat-bottom walls, and a zero-weight linear term whose energy parameter derivatives report the mode values for
  free. Every centre, force constant and bound is a Context global parameter, so it can be changed during a run
  (that is how :meth:`LatentBiasForce.steer` pulls a restraint).

Mode values are dimensionless; energies and force constants are in kJ/mol (force constants per squared mode unit).
"""
import functools
import linecache
import math
import operator
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import openmm
import torch
from openmm import app, unit

from nct_openmm.backend import createTorchForce, globalParameterNames
from nct_openmm.systems import checkForceGroup, contextOf, freeForceGroup, valueInUnit, warnIfBoxIsIgnored

__all__ = [
    "SlowModeCV",
    "slowModeBiasVariables",
    "LatentBiasForce",
    "SteeringResult",
    "CVReporter",
    "OutOfDistributionWarning",
    "checkSystemCompatible",
]


# ---------------------------------------------------------------------------------------------------------------
# TorchScript modules that OpenMM evaluates
# ---------------------------------------------------------------------------------------------------------------

class SingleModeEnergy(torch.nn.Module):
    """The energy is mode ``mode`` of a CV module: a collective variable for ``CustomCVForce``.

    Parameters
    ----------
    cvModule : torch.nn.Module
        Follows the CV-module contract (``forward(positions, boxvectors=None) -> (K,)``).
    mode : int
        Index of the mode to return, 0 being the slowest.

    Examples
    --------
    >>> class Sums(torch.nn.Module):
    ...     def forward(self, positions, boxvectors=None):
    ...         return positions.sum(dim=0)
    >>> float(SingleModeEnergy(Sums(), 1)(torch.ones(4, 3, dtype=torch.float64)))
    4.0
    """

    def __init__(self, cvModule: torch.nn.Module, mode: int):
        super().__init__()
        self.cv = cvModule
        self.mode = mode

    def forward(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.cv(positions, boxvectors)[self.mode].to(positions.dtype)


def _restraintEnergy(modes: torch.Tensor, centers: torch.Tensor, forceConstants: torch.Tensor) -> torch.Tensor:
    """Σ ½ κ (s − c)² over the restrained modes."""
    return 0.5 * (forceConstants * (modes - centers) ** 2).sum()


def _wallEnergy(modes: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                forceConstants: torch.Tensor) -> torch.Tensor:
    """Σ ½ κ_w d² with d the distance outside [lower, upper], so exactly zero inside."""
    outside = torch.clamp(modes - upper, min=0.0) + torch.clamp(lower - modes, min=0.0)
    return 0.5 * (forceConstants * outside ** 2).sum()


class LatentBiasEnergy(torch.nn.Module):
    """Restraints, walls and a read-out term on all K modes, from one evaluation of the CV module.

    The parameter vector is laid out as K read-out weights λ (kept at zero: ∂E/∂λ_k = s_k), then (centre, force
    constant) for each restrained mode, then (lower, upper, force constant) for each walled mode.
    :meth:`energy` holds the arithmetic; ``forward`` is supplied per parameter count by :func:`_latentBiasModule`,
    because ``TorchForce`` passes every global parameter as a separate argument.

    Parameters
    ----------
    cvModule : torch.nn.Module
        A module following the CV-module contract, with attribute ``num_modes``.
    restraintModes, wallModes : list of int
        Modes carrying a restraint and walls, in parameter order.

    Examples
    --------
    >>> class Sums(torch.nn.Module):
    ...     num_modes = 2
    ...     def forward(self, positions, boxvectors=None):
    ...         return positions.sum(dim=0)[:2]
    >>> bias = LatentBiasEnergy(Sums(), restraintModes=[0], wallModes=[1])
    >>> parameters = [torch.tensor(v, dtype=torch.float64) for v in (0.0, 0.0, 1.0, 10.0, -1.0, 1.0, 100.0)]
    >>> float(bias.energy(torch.ones(2, 3, dtype=torch.float64), None, parameters))  # s = (2, 2): 5 + 50
    55.0
    """

    def __init__(self, cvModule: torch.nn.Module, restraintModes: List[int], wallModes: List[int]):
        super().__init__()
        self.cv = cvModule
        self.num_modes = int(cvModule.num_modes)
        self.register_buffer("restraint_modes", torch.tensor(restraintModes, dtype=torch.long))
        self.register_buffer("wall_modes", torch.tensor(wallModes, dtype=torch.long))

    def energy(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor],
               parameters: List[torch.Tensor]) -> torch.Tensor:
        modes = self.cv(positions, boxvectors).to(torch.float64)
        # openmm-torch builds pass parameters as 0-d or 1-element tensors, on the host or the device.
        p = torch.stack(parameters).reshape(-1).to(device=modes.device, dtype=torch.float64)
        k, numRestraints = self.num_modes, self.restraint_modes.shape[0]
        energy = torch.dot(p[:k], modes)
        # Absent terms are skipped rather than evaluated on empty tensors: each autograd op costs microseconds.
        if numRestraints > 0:
            restraint = p[k:k + 2 * numRestraints].reshape(-1, 2)
            energy = energy + _restraintEnergy(modes[self.restraint_modes], restraint[:, 0], restraint[:, 1])
        if self.wall_modes.shape[0] > 0:
            walls = p[k + 2 * numRestraints:].reshape(-1, 3)
            energy = energy + _wallEnergy(modes[self.wall_modes], walls[:, 0], walls[:, 1], walls[:, 2])
        return energy.to(positions.dtype)


_FORWARD_TEMPLATE = '''
class {name}(LatentBiasEnergy):
    def forward(self, positions: torch.Tensor{boxArgument}{parameterArguments}) -> torch.Tensor:
        return self.energy(positions, {box}, [{parameters}])
'''


@functools.lru_cache(maxsize=None)
def _latentBiasModule(periodic, numParameters):
    """The subclass of :class:`LatentBiasEnergy` whose ``forward`` takes exactly what ``TorchForce`` passes.

    TorchScript has no ``*args``, so the signature is written out once per parameter count. The source is
    registered with ``linecache`` because ``torch.jit.script`` reads a method's source; the compiled module keeps
    its own copy, so serialized forces do not need this function.
    """
    names = [f"p{i}" for i in range(numParameters)]
    name = f"LatentBiasEnergy{'Periodic' if periodic else ''}{numParameters}"
    source = _FORWARD_TEMPLATE.format(
        name=name,
        boxArgument=", boxvectors: torch.Tensor" if periodic else "",
        parameterArguments="".join(f", {n}: torch.Tensor" for n in names),
        box="boxvectors" if periodic else "None",
        parameters=", ".join(names),
    )
    filename = f"<nct_openmm.forces: {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"torch": torch, "LatentBiasEnergy": LatentBiasEnergy, "__name__": __name__}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[name]


# ---------------------------------------------------------------------------------------------------------------
# Checks shared by the OpenMM-facing objects
# ---------------------------------------------------------------------------------------------------------------

def checkSystemCompatible(system, cvModule):
    """Fail clearly when a System has fewer particles than the CV module reads.

    Parameters
    ----------
    system : openmm.System
    cvModule : torch.nn.Module
        Has attribute ``num_atoms_required`` (its largest atom index + 1).

    Raises
    ------
    ValueError
        When ``system.getNumParticles() < cvModule.num_atoms_required``.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> system = openmm.System()
    >>> for _ in range(3):
    ...     _ = system.addParticle(1.0)
    >>> checkSystemCompatible(system, SimpleNamespace(num_atoms_required=22))
    Traceback (most recent call last):
    ...
    ValueError: the CV module reads atom indices up to 21 and needs at least 22 particles, but the System has 3
    """
    required, available = int(cvModule.num_atoms_required), system.getNumParticles()
    if available < required:
        raise ValueError(f"the CV module reads atom indices up to {required - 1} and needs at least {required} "
                         f"particles, but the System has {available}")


def _numModes(cvModule):
    return int(cvModule.num_modes)


def _checkMode(cvModule, mode):
    """Return ``mode`` as an int, or raise ValueError naming the modes that exist."""
    numModes = _numModes(cvModule)
    try:
        index = operator.index(mode)  # any integer type, numpy's and torch's included
    except TypeError:
        index = None
    if index is None or isinstance(mode, bool):
        raise ValueError(f"a mode index must be an integer, got {mode!r}")
    if not 0 <= index < numModes:
        raise ValueError(f"mode {mode} does not exist: the CV module has {numModes} modes, 0 to {numModes - 1}")
    return index


# ---------------------------------------------------------------------------------------------------------------
# One mode per force: collective variables for CustomCVForce and app.Metadynamics
# ---------------------------------------------------------------------------------------------------------------

def SlowModeCV(cvModule, mode, periodic=False, cudaGraphs=False):
    """A ``TorchForce`` whose energy is slow mode ``mode`` (dimensionless, reported in kJ/mol).

    Use it as a collective variable of ``openmm.CustomCVForce`` or as the force of ``app.BiasVariable``. Each
    call creates a new force (OpenMM takes ownership of a force once it is added somewhere). The force does not
    see the System: call :func:`checkSystemCompatible` first for a clear error when the System lacks the CV's
    atoms (OpenMM would fail later, with a TorchScript traceback).

    Parameters
    ----------
    cvModule : torch.nn.Module or torch.jit.ScriptModule
        Follows the CV-module contract.
    mode : int
        0 for the slowest mode.
    periodic : bool
        Hand the box vectors to the module (for systems with periodic boundary conditions).
    cudaGraphs : bool
        Capture the model in a CUDA graph on the CUDA platform.

    Returns
    -------
    openmmtorch.TorchForce

    Examples
    --------
    >>> cv = openmm.CustomCVForce("s0")  # doctest: +SKIP
    >>> cv.addCollectiveVariable("s0", SlowModeCV(cvModule, 0))  # doctest: +SKIP
    """
    return createTorchForce(SingleModeEnergy(cvModule, _checkMode(cvModule, mode)), periodic=periodic,
                            cudaGraphs=cudaGraphs)


def slowModeBiasVariables(cvModule, modes, ranges, widths=0.15, padding=0.5, gridWidth=None, periodic=False,
                          cudaGraphs=False):
    """``app.BiasVariable`` objects for ``app.Metadynamics``, one per slow mode.

    The modes are unit-variance on the training data, so one hill width in mode units suits every mode. The bias
    grid spans the training range widened by ``padding`` on both sides: ``app.Metadynamics`` applies no bias
    force outside its grid, and the point of biasing is to leave the sampled range. As for :func:`SlowModeCV`,
    check the System with :func:`checkSystemCompatible` first.

    Parameters
    ----------
    cvModule : torch.nn.Module
        Follows the CV-module contract.
    modes : sequence of int
        Modes to bias (``app.Metadynamics`` takes at most three).
    ranges : array_like, shape (len(modes), 2)
        Minimum and maximum of each mode over the training data.
    widths : float or sequence of float
        Hill widths (Gaussian standard deviations), in mode units.
    padding : float
        Added beyond each end of the training range, in mode units.
    gridWidth : int, optional
        Grid points per variable; ``app.BiasVariable`` chooses when omitted.
    periodic, cudaGraphs : bool
        Passed to :func:`SlowModeCV`.

    Returns
    -------
    list of openmm.app.BiasVariable

    Examples
    --------
    >>> variables = slowModeBiasVariables(cvModule, [0, 1], [(-2.8, 3.1), (-3.0, 2.6)])  # doctest: +SKIP
    >>> meta = app.Metadynamics(system, variables, 300 * unit.kelvin, 8.0, 1.0, 500)  # doctest: +SKIP
    """
    ranges = np.asarray(ranges, dtype=float).reshape(-1, 2)
    if len(ranges) != len(modes):
        raise ValueError(f"ranges gives {len(ranges)} (min, max) pairs for {len(modes)} modes")
    if len({_checkMode(cvModule, mode) for mode in modes}) != len(modes):
        raise ValueError(f"modes must be distinct, got {list(modes)}")
    if np.size(widths) not in (1, len(modes)):
        raise ValueError(f"widths gives {np.size(widths)} values for {len(modes)} modes")
    widths = np.broadcast_to(np.asarray(widths, dtype=float), (len(modes),))
    if np.any(ranges[:, 1] <= ranges[:, 0]) or np.any(widths <= 0):
        raise ValueError("every range needs min < max and every width must be positive")
    if not padding >= 0.0 or not math.isfinite(padding):
        raise ValueError(f"padding widens the ranges: it must be a non-negative number, got {padding}")
    return [app.BiasVariable(SlowModeCV(cvModule, mode, periodic, cudaGraphs), low - padding, high + padding,
                             float(width), False, gridWidth)
            for mode, (low, high), width in zip(modes, ranges, widths)]


# ---------------------------------------------------------------------------------------------------------------
# All modes in one force: restraints, walls, read-out
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SteeringResult:
    """What :meth:`LatentBiasForce.steer` measured, one entry per restraint position.

    Attributes
    ----------
    steps : numpy.ndarray of int, shape (increments + 1,)
        Simulation step at the end of the segment spent at ``centers[i]`` (entry 0: before steering).
    centers : numpy.ndarray, shape (increments + 1,)
        Restraint centre, from start to end.
    values : numpy.ndarray, shape (increments + 1,)
        The steered mode at ``steps[i]``.
    work : openmm.unit.Quantity, shape (increments + 1,)
        Work done on the system up to ``steps[i]``, in kJ/mol; ``work[0]`` is 0.
    """

    steps: np.ndarray
    centers: np.ndarray
    values: np.ndarray
    work: unit.Quantity


class LatentBiasForce:
    """A bias on the slow modes computed by one ``TorchForce``, with all K modes evaluated once.

    The energy is ``Σ_k λ_k s_k`` (λ = 0; reads the modes out) plus ``½ κ_k (s_k − c_k)²`` for each restrained mode
    plus ``½ κ_w d_k²`` for each walled mode, d_k being how far s_k lies outside [lower_k, upper_k].
    Configure the terms first, then call :meth:`addToSystem`: the ``TorchForce`` and the names of its global
    parameters are fixed there, and afterwards only the parameter values change (through a Context).

    Parameters
    ----------
    cvModule : torch.nn.Module or torch.jit.ScriptModule
        Follows the CV-module contract.
    prefix : str
        Start of every global parameter name; give two such forces in one System different prefixes.
    periodic : bool
        Hand the box vectors to the module.
    cudaGraphs : bool
        Capture the model in a CUDA graph on the CUDA platform. Whether a captured graph sees later changes of
        global parameters depends on the openmm-torch build; check before steering with it.

    Examples
    --------
    >>> bias = LatentBiasForce(cvModule, prefix="umbrella_")  # doctest: +SKIP
    >>> bias.addRestraint(0, center=-1.0, forceConstant=50.0)  # doctest: +SKIP
    >>> bias.addWalls(1, lower=-3.5, upper=3.5, forceConstant=100.0)  # doctest: +SKIP
    >>> bias.addToSystem(system)  # doctest: +SKIP
    >>> simulation = app.Simulation(topology, system, integrator)  # doctest: +SKIP
    >>> bias.setRestraintCenter(simulation.context, 0, -0.5)  # doctest: +SKIP
    >>> bias.getCollectiveVariables(simulation.context)  # doctest: +SKIP
    array([-0.61,  0.25])
    """

    def __init__(self, cvModule, prefix="latent_", periodic=False, cudaGraphs=False):
        self._cvModule = cvModule
        self._prefix = prefix
        self._periodic = bool(periodic)
        self._cudaGraphs = bool(cudaGraphs)
        self._restraints = {}
        self._walls = {}
        self._force = None

    @property
    def numModes(self):
        """K, the number of modes of the CV module."""
        return _numModes(self._cvModule)

    def getParameterName(self, quantity, mode):
        """The Context global parameter holding ``quantity`` of ``mode``.

        Parameters
        ----------
        quantity : {"value", "center", "forceConstant", "lower", "upper", "wallForceConstant"}
            ``"value"`` is the read-out weight λ_k, whose energy derivative is the mode's value.
        mode : int

        Examples
        --------
        >>> LatentBiasForce(None, prefix="u_").getParameterName("center", 1)
        'u_center1'
        """
        suffixes = {"value": "cv", "center": "center", "forceConstant": "kappa", "lower": "lower",
                    "upper": "upper", "wallForceConstant": "wallkappa"}
        if quantity not in suffixes:
            raise ValueError(f"unknown quantity {quantity!r}; choose one of {sorted(suffixes)}")
        return f"{self._prefix}{suffixes[quantity]}{mode}"

    def addRestraint(self, mode, center, forceConstant):
        """Restrain ``mode`` harmonically: ``½ forceConstant (s − center)²``.

        Parameters
        ----------
        mode : int
        center : float
            In mode units; the initial value of global parameter ``getParameterName("center", mode)``.
        forceConstant : float or openmm.unit.Quantity
            kJ/mol per squared mode unit, non-negative.
        """
        mode = self._checkConfigurable(mode, self._restraints, "a restraint")
        self._restraints[mode] = (_finite(center, "center"), self._forceConstant(forceConstant))

    def addWalls(self, mode, lower, upper, forceConstant):
        """Confine ``mode`` to [lower, upper] with flat-bottom harmonic walls, zero inside.

        Parameters
        ----------
        mode : int
        lower, upper : float
            Bounds in mode units, ``lower < upper``.
        forceConstant : float or openmm.unit.Quantity
            kJ/mol per squared mode unit, non-negative.
        """
        mode = self._checkConfigurable(mode, self._walls, "walls")
        if not float(lower) < float(upper):
            raise ValueError(f"walls need lower < upper, got lower={lower}, upper={upper}")
        self._walls[mode] = (float(lower), float(upper), self._forceConstant(forceConstant))

    def addToSystem(self, system, forceGroup=None):
        """Create the ``TorchForce`` and add it to ``system``.

        Parameters
        ----------
        system : openmm.System
        forceGroup : int, optional
            Defaults to the highest group no force of ``system`` uses; ValueError when all 32 are taken.

        Returns
        -------
        int
            The index of the force in ``system``.
        """
        if self._force is not None:
            raise RuntimeError("this LatentBiasForce has already been added to a System")
        checkSystemCompatible(system, self._cvModule)
        warnIfBoxIsIgnored(system, self._periodic, "this LatentBiasForce")
        group = freeForceGroup(system) if forceGroup is None else checkForceGroup(forceGroup)
        parameters = self._globalParameters()
        # Every bias has its mode read-outs among them, so one with this prefix always clashes.
        clashes = sorted(set(parameters) & globalParameterNames(system))
        if clashes:
            raise ValueError(f"the System already has a LatentBiasForce with prefix {self._prefix!r} or global "
                             f"parameters {clashes}: give this one another prefix= (two biases with one prefix "
                             "would share their centres and read-outs)")
        module = _latentBiasModule(self._periodic, len(parameters))(
            self._cvModule, list(self._restraints), list(self._walls))
        self._force = createTorchForce(module, periodic=self._periodic, cudaGraphs=self._cudaGraphs,
                                       globalParameters=parameters,
                                       energyParameterDerivatives=self._valueParameters(), forceGroup=group)
        self._force.setName(f"LatentBiasForce {self._prefix}")
        return system.addForce(self._force)

    def getForce(self):
        """The ``TorchForce`` created by :meth:`addToSystem`."""
        self._checkAdded()
        return self._force

    def setRestraintCenter(self, context, mode, value):
        """Move the restraint centre of ``mode`` in ``context`` (mode units)."""
        name = self._restraintParameter("center", mode)
        context.setParameter(name, _finite(value, "center"))

    def getRestraintCenter(self, context, mode):
        """The current restraint centre of ``mode`` in ``context``."""
        return context.getParameter(self._restraintParameter("center", mode))

    def setRestraintForceConstant(self, context, mode, value):
        """Change the restraint force constant of ``mode`` in ``context`` (kJ/mol per squared mode unit)."""
        name = self._restraintParameter("forceConstant", mode)
        context.setParameter(name, self._forceConstant(value))

    def getCollectiveVariables(self, simulation):
        """All K mode values at the current positions, from one evaluation of this force's group.

        Parameters
        ----------
        simulation : openmm.app.Simulation or openmm.Context

        Returns
        -------
        numpy.ndarray, shape (K,)
        """
        self._checkAdded()
        group = 1 << self._force.getForceGroup()
        state = contextOf(simulation).getState(getParameterDerivatives=True, groups=group)
        derivatives = state.getEnergyParameterDerivatives()
        return np.array([derivatives[name] for name in self._valueParameters()])

    def steer(self, simulation, mode, start, end, steps, increments):
        """Pull the restraint centre of ``mode`` linearly from ``start`` to ``end`` while simulating.

        The centre is set to ``start`` (no work counted: begin from configurations equilibrated there), then jumps
        ``increments`` times, each jump followed by an equal share of ``steps`` MD steps. The work of each jump,
        ∫ ∂E/∂c dc at the configuration of the moment, is exact for a harmonic restraint:
        ½ κ [(s − c_new)² − (s − c_old)²]. Its accumulation is the nonequilibrium work of Jarzynski's equality.

        Parameters
        ----------
        simulation : openmm.app.Simulation
            Contains the System this force was added to; its reporters run as usual.
        mode : int
            A mode configured with :meth:`addRestraint`.
        start, end : float
            Centre positions in mode units.
        steps : int
            MD steps in total, at least ``increments``.
        increments : int
            Number of centre jumps.

        Returns
        -------
        SteeringResult
            Arrays of length ``increments + 1``: the state before steering, then the end of each segment.

        Raises
        ------
        Exception
            Whatever a segment raised (an integrator blow-up, a reporter); the result up to the last completed
            segment is attached to it as ``steeringResult``, and the centre stays where that segment put it.
        """
        steps, increments = int(steps), int(increments)
        if not 0 < increments <= steps:
            raise ValueError(f"need 0 < increments <= steps, got increments={increments}, steps={steps}")
        context = simulation.context
        forceConstant = context.getParameter(self._restraintParameter("forceConstant", mode))
        centers = np.linspace(float(start), float(end), increments + 1)
        chunks = np.diff(np.arange(increments + 1) * steps // increments)
        self.setRestraintCenter(context, mode, centers[0])
        value = self.getCollectiveVariables(context)[mode]
        stepsAt, values, work = [simulation.currentStep], [value], [0.0]

        def result():
            done = len(values)
            return SteeringResult(np.array(stepsAt), centers[:done], np.array(values),
                                  unit.Quantity(np.array(work[:done]), unit.kilojoule_per_mole))

        try:
            for old, new, chunk in zip(centers[:-1], centers[1:], chunks):
                work.append(work[-1] + 0.5 * forceConstant * ((value - new) ** 2 - (value - old) ** 2))
                self.setRestraintCenter(context, mode, new)
                simulation.step(int(chunk))
                value = self.getCollectiveVariables(context)[mode]
                stepsAt.append(simulation.currentStep)
                values.append(value)
        except Exception as error:
            error.steeringResult = result()
            raise
        return result()

    def _globalParameters(self):
        """Name → default value, in the argument order of :class:`LatentBiasEnergy`."""
        parameters = {name: 0.0 for name in self._valueParameters()}
        for mode, values in self._restraints.items():
            parameters.update(zip((self.getParameterName(q, mode) for q in ("center", "forceConstant")), values))
        for mode, values in self._walls.items():
            names = (self.getParameterName(q, mode) for q in ("lower", "upper", "wallForceConstant"))
            parameters.update(zip(names, values))
        return parameters

    def _valueParameters(self):
        return [self.getParameterName("value", k) for k in range(self.numModes)]

    def _restraintParameter(self, quantity, mode):
        if _checkMode(self._cvModule, mode) not in self._restraints:
            raise ValueError(f"mode {mode} has no restraint; add one with addRestraint before addToSystem")
        return self.getParameterName(quantity, mode)

    def _checkConfigurable(self, mode, terms, what):
        """Return ``mode`` as a valid index that may still receive a term of kind ``what``."""
        if self._force is not None:
            raise RuntimeError("the force is already part of a System; its terms are fixed. Change centres and "
                               "force constants through the Context instead")
        mode = _checkMode(self._cvModule, mode)
        if mode in terms:
            raise ValueError(f"mode {mode} already has {what}")
        return mode

    def _checkAdded(self):
        if self._force is None:
            raise RuntimeError("call addToSystem first: the force does not exist before it is added to a System")

    @staticmethod
    def _forceConstant(value):
        value = valueInUnit(value, unit.kilojoule_per_mole)
        if not 0 <= value < math.inf:
            raise ValueError(f"a force constant must be non-negative and finite, got {value}")
        return value


def _finite(value, name):
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------

class OutOfDistributionWarning(UserWarning):
    """The simulation reached configurations the CV module's training data did not cover."""


class CVReporter:
    """An ``app.Simulation`` reporter writing the slow modes, evaluated in torch on the reported positions.

    Each line holds the step, the time in ps, the K mode values and, when ``logLikelihood`` is given, its value.
    The first line is a header starting with ``#``, so ``numpy.loadtxt`` reads the file as it is.

    Parameters
    ----------
    file : str or file-like
        Path to (over)write, or an open text stream.
    reportInterval : int
        Steps between reports.
    cvModule : torch.nn.Module or torch.jit.ScriptModule
        Follows the CV-module contract; evaluated in float64 without gradients.
    logLikelihood : callable, optional
        ``logLikelihood(positions)`` with positions an ``(N, 3)`` array in nm, returning a float; low values flag
        configurations unlike the training data.
    logLikelihoodThreshold : float, optional
        Warn (once, :class:`OutOfDistributionWarning`) when ``logLikelihood`` falls below it.
    periodic : bool
        Hand the box vectors to the module, as a ``periodic`` force would.

    Examples
    --------
    >>> import io
    >>> class Sums(torch.nn.Module):
    ...     num_modes, num_atoms_required = 2, 1
    ...     def forward(self, positions, boxvectors=None):
    ...         return positions.sum(dim=0)[:2]
    >>> system = openmm.System()
    >>> _ = system.addParticle(1.0)
    >>> simulation = app.Simulation(app.Topology(), system, openmm.VerletIntegrator(0.001),
    ...                             openmm.Platform.getPlatformByName("Reference"))
    >>> simulation.context.setPositions([openmm.Vec3(0.5, 1.5, 0.0)])
    >>> out = io.StringIO()
    >>> simulation.reporters.append(CVReporter(out, 2, Sums()))
    >>> simulation.step(4)
    >>> print(out.getvalue())
    # step time_ps s0 s1
    2 0.002 0.5 1.5
    4 0.004 0.5 1.5
    <BLANKLINE>
    """

    def __init__(self, file, reportInterval, cvModule, logLikelihood=None, logLikelihoodThreshold=None,
                 periodic=False):
        self._ownsFile = isinstance(file, (str, os.PathLike))
        self._out = None
        self._out = open(file, "w") if self._ownsFile else file
        self._reportInterval = int(reportInterval)
        self._cvModule = cvModule
        self._logLikelihood = logLikelihood
        self._threshold = logLikelihoodThreshold
        self._periodic = bool(periodic)
        self._warned = False
        self._wroteHeader = False

    def describeNextReport(self, simulation):
        """Ask for unwrapped positions, as a ``TorchForce`` sees them, at the next multiple of the interval."""
        steps = self._reportInterval - simulation.currentStep % self._reportInterval
        return {"steps": steps, "periodic": False, "include": ["positions"]}

    def report(self, simulation, state):
        """Write one line for ``state``."""
        if not self._wroteHeader:
            checkSystemCompatible(simulation.system, self._cvModule)
        positions = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        values = list(self._modes(positions, state))
        if self._logLikelihood is not None:
            values.append(self._checkedLogLikelihood(positions, simulation.currentStep))
        if not self._wroteHeader:
            self._writeHeader()
        time = state.getTime().value_in_unit(unit.picosecond)
        print(simulation.currentStep, f"{time:.10g}", *(f"{v:.10g}" for v in values), file=self._out)
        self._out.flush()

    def close(self):
        """Close the file if this reporter opened it."""
        if getattr(self, "_ownsFile", False) and self._out is not None and not self._out.closed:
            self._out.close()

    def __del__(self):
        self.close()

    def _modes(self, positions, state):
        box = None
        if self._periodic:
            box = torch.as_tensor(state.getPeriodicBoxVectors(asNumpy=True).value_in_unit(unit.nanometer),
                                  dtype=torch.float64)
        with torch.no_grad():
            return self._cvModule(torch.as_tensor(positions, dtype=torch.float64), box).cpu().numpy()

    def _checkedLogLikelihood(self, positions, step):
        value = float(self._logLikelihood(positions))
        if self._threshold is not None and value < self._threshold and not self._warned:
            self._warned = True
            warnings.warn(f"log-likelihood {value:.4g} at step {step} is below {self._threshold:.4g}: the "
                          "simulation has left the configurations the CV module was trained on",
                          OutOfDistributionWarning, stacklevel=2)
        return value

    def _writeHeader(self):
        columns = [f"s{k}" for k in range(_numModes(self._cvModule))]
        if self._logLikelihood is not None:
            columns.append("logLikelihood")
        print("# step time_ps", *columns, file=self._out)
        self._wroteHeader = True
