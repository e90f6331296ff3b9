"""Multiple time stepping for a bias in its own force group.

:class:`MTSLangevinMiddleIntegrator` takes the same arguments as ``openmm.MTSLangevinIntegrator`` and produces the
same positions (impulse r-RESPA around the BAOAB "middle" Langevin step), with one evaluation of the fast forces
fewer per outer step.

Why: a ``CustomIntegrator`` keeps the forces of one set of force groups at a time. ``openmm.MTSLangevinIntegrator``
splits each outer step symmetrically, a half kick of every group at both ends, so at the boundary between two outer
steps the order is fast, slow, slow, fast at unchanged positions: the fast forces are computed twice there, n + 1
times per outer step of n inner steps. Merging the two half kicks at each boundary into one kick at the start of the
step is the leapfrog form of the same splitting (``openmm.LangevinMiddleIntegrator`` is its one-group case): the two
integrators differ by a half kick of the velocities, so their positions coincide step by step
(``tests/test_integrators.py`` checks this without friction, and at zero temperature with friction) and their
sampling is the same. With the bias applied every 8th step, alanine dipeptide ran 1.11–1.12× faster in explicit
water and 1.05–1.17× faster in implicit solvent than with ``openmm.MTSLangevinIntegrator`` on this project's CPU
(``benchmarks/bias_overhead.py``, the ``*-symmetric`` variants; ``benchmarks/RESULTS.md`` section 1d).

Velocities: like ``LangevinMiddleIntegrator``'s, the velocities a State reports (and the kinetic energy computed from
them) are the leapfrog ones, half a kick behind the symmetric splitting's: ``v − Σ_g dt/(2 s_g) f_g/m`` with ``s_g``
the substeps of group g; ``setVelocities`` is read the same way. The positions coincide only while the step's
``updateContextState`` changes nothing (a ``CMMotionRemover`` or a barostat acts at different points of the two
splittings); the dynamics are valid either way.

Temperature, friction and the number of inner steps are global variables of the integrator, so a State or a
checkpoint carries them with the thermostat constants, and they survive pickling.
``openmm.XmlSerializer.deserialize`` gives back a plain ``CustomIntegrator`` (same steps, same globals) without the
methods of this class.

Examples
--------
>>> integrator = MTSLangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.008 * unit.picoseconds,
...                                          [(31, 1), (0, 4)])   # group 31 once, group 0 four times per step
>>> integrator.getNumComputations() > 0
True
"""
import math

import openmm
from openmm import unit

from nct_openmm.systems import NUM_FORCE_GROUPS, isInteger, usedForceGroups, valueInUnit

__all__ = ["MTSLangevinMiddleIntegrator", "mtsLangevinIntegrator", "biasGroups"]


class MTSLangevinMiddleIntegrator(openmm.CustomIntegrator):
    """Langevin dynamics (BAOAB, leapfrog form) whose force groups are applied at different time steps.

    Parameters
    ----------
    temperature : unit.Quantity or float
        Heat-bath temperature (K), not negative.
    friction : unit.Quantity or float
        Friction coefficient (1/ps), not negative.
    dt : unit.Quantity or float
        The outer time step (ps); the inner one is ``dt`` divided by the largest number of substeps.
    groups : iterable of (int, int)
        ``(force group, substeps)``: the group is applied ``substeps`` times per outer step. Every number of
        substeps must divide the largest (OpenMM's integrator also wants them nested; this one does not). As with
        ``openmm.MTSLangevinIntegrator``, a force group of the System that is not listed is never applied:
        :func:`biasGroups` lists every group a System uses. Each group costs one force evaluation wherever it is
        applied, so keep the fast forces in one group.

    As with ``openmm.MTSLangevinIntegrator`` (both are ``CustomIntegrator``s), a ``getState`` that asks for the
    energy between steps changes the trajectory that follows, not its statistics (measured on Reference): the
    same seed repeats a trajectory only under the same reporters, a ``StateDataReporter`` with energies included.

    Examples
    --------
    >>> integrator = MTSLangevinMiddleIntegrator(300, 1.0, 0.016, [(31, 1), (0, 8)])
    >>> integrator.getStepSize()
    0.016 ps
    """

    def __init__(self, temperature, friction, dt, groups):
        groups = _validatedGroups(groups)
        super().__init__(valueInUnit(dt, unit.picoseconds))
        innerSteps = max(substeps for _, substeps in groups)
        self.addGlobalVariable("temperature", _nonNegative(valueInUnit(temperature, unit.kelvin), "temperature"))
        self.addGlobalVariable("friction", _nonNegative(valueInUnit(friction, unit.picosecond ** -1), "friction"))
        self.addGlobalVariable("innerSteps", innerSteps)
        for name in ("a", "b", "kT"):
            self.addGlobalVariable(name, 0.0)
        self.addPerDofVariable("x1", 0.0)
        self._updateThermostat()
        self.addUpdateContextState()
        for step in range(innerSteps):
            self._addInnerStep(step, innerSteps, groups)

    def _addInnerStep(self, step, inner, groups):
        """Kick by every group due at this inner step (slowest first), then drift, thermostat, drift, constrain."""
        for group, substeps in groups:
            if step % (inner // substeps) == 0:
                self.addComputePerDof("v", f"v+(dt/{substeps})*f{group}/m")
        self.addConstrainVelocities()
        self.addComputePerDof("x", f"x+(dt/{2 * inner})*v")
        self.addComputePerDof("v", "a*v+b*sqrt(kT/m)*gaussian")
        self.addComputePerDof("x", f"x+(dt/{2 * inner})*v")
        self.addComputePerDof("x1", "x")
        self.addConstrainPositions()
        self.addComputePerDof("v", f"v+(x-x1)/(dt/{inner})")

    def _updateThermostat(self):
        # a, b and kT are set here rather than computed in the step: a global computation every step would cost
        # more than the step's arithmetic on a GPU.
        innerStep = self.getStepSize().value_in_unit(unit.picoseconds) / self.getGlobalVariableByName("innerSteps")
        decay = math.exp(-self.getGlobalVariableByName("friction") * innerStep)
        self.setGlobalVariableByName("a", decay)
        self.setGlobalVariableByName("b", math.sqrt(1.0 - decay * decay))
        kT = unit.MOLAR_GAS_CONSTANT_R * self.getGlobalVariableByName("temperature") * unit.kelvin
        self.setGlobalVariableByName("kT", kT.value_in_unit(unit.kilojoule_per_mole))

    def getTemperature(self):
        """The heat-bath temperature."""
        return self.getGlobalVariableByName("temperature") * unit.kelvin

    def setTemperature(self, temperature):
        """Set the heat-bath temperature (a Quantity or K)."""
        kelvin = _nonNegative(valueInUnit(temperature, unit.kelvin), "temperature")
        self.setGlobalVariableByName("temperature", kelvin)
        self._updateThermostat()

    def getFriction(self):
        """The friction coefficient."""
        return self.getGlobalVariableByName("friction") / unit.picosecond

    def setFriction(self, friction):
        """Set the friction coefficient (a Quantity or 1/ps)."""
        rate = _nonNegative(valueInUnit(friction, unit.picosecond ** -1), "friction")
        self.setGlobalVariableByName("friction", rate)
        self._updateThermostat()

    def setStepSize(self, dt):
        """Set the outer time step (a Quantity or ps); the thermostat follows the new inner step."""
        super().setStepSize(valueInUnit(dt, unit.picoseconds))
        self._updateThermostat()


def _nonNegative(value, name):
    if not value >= 0.0:
        raise ValueError(f"the {name} must not be negative, got {value}")
    return value


def _validatedGroups(groups):
    """``groups`` as ``(group, substeps)`` integer pairs, slowest first; a clear error for anything else."""
    try:
        pairs = [tuple(pair) for pair in groups]
    except TypeError:
        raise ValueError(f"groups must be (force group, substeps) pairs, got {groups!r}") from None
    if not pairs:
        raise ValueError("groups is empty: give at least one (force group, substeps) pair")
    for pair in pairs:
        if (len(pair) != 2 or not all(isInteger(value) for value in pair) or not 0 <= pair[0] < NUM_FORCE_GROUPS
                or pair[1] < 1):
            raise ValueError(f"{pair!r} is not a (force group 0-{NUM_FORCE_GROUPS - 1}, substeps >= 1) "
                             "pair of integers")
    pairs = [(int(group), int(substeps)) for group, substeps in pairs]
    listed = [group for group, _ in pairs]
    if len(set(listed)) != len(listed):
        raise ValueError(f"a force group is listed twice in {pairs}")
    innermost = max(substeps for _, substeps in pairs)
    uneven = [substeps for _, substeps in pairs if innermost % substeps]
    if uneven:
        raise ValueError(f"substeps {uneven} do not divide the largest number of substeps, {innermost}")
    return sorted(pairs, key=lambda pair: pair[1])


def mtsLangevinIntegrator(system, biasGroup, stride, temperature, friction=1.0, timestep=0.002):
    """An :class:`MTSLangevinMiddleIntegrator` with an outer step of ``stride × timestep`` that applies force group
    ``biasGroup`` once per outer step and every other group ``system`` uses ``stride`` times (``biasGroup=None``:
    every group ``stride`` times). Temperature, friction and time step as quantities or in K, 1/ps and ps.

    Examples
    --------
    >>> integrator = mtsLangevinIntegrator(system, meta.forceGroup, 8, 300 * unit.kelvin)  # doctest: +SKIP
    """
    return MTSLangevinMiddleIntegrator(temperature, friction, stride * valueInUnit(timestep, unit.picoseconds),
                                       biasGroups(system, biasGroup, stride))


def biasGroups(system, biasGroup, stride):
    """``(force group, substeps)`` pairs for an MTS integrator: ``biasGroup`` once, every other group of
    ``system`` ``stride`` times (``biasGroup=None``: every group ``stride`` times). The groups of the System include
    the reciprocal-space groups of its ``NonbondedForce``s.

    Raises
    ------
    ValueError
        When ``stride`` > 1 and the System has no force outside ``biasGroup``: there would be nothing to apply at
        the inner steps, and the whole step would silently become ``stride`` times longer.

    Examples
    --------
    >>> system = openmm.System()
    >>> for group in (0, 3):
    ...     force = openmm.CustomExternalForce("0"); force.setForceGroup(group); _ = system.addForce(force)
    >>> biasGroups(system, 31, 8)
    [(31, 1), (0, 8), (3, 8)]
    """
    slow = set() if biasGroup is None else {biasGroup}
    others = sorted(usedForceGroups(system) - slow)
    if stride > 1 and not others:
        raise ValueError(f"the System has no force outside the bias group {biasGroup}, so a bias stride of {stride} "
                         "has no inner steps to apply anything at")
    return [(group, 1) for group in slow] + [(group, stride) for group in others]
