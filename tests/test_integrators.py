"""Tests of nct_openmm.integrators: the leapfrog multiple-time-step Langevin integrator.

Its positions must equal openmm.MTSLangevinIntegrator's (the symmetric splitting it is conjugate to) and, with one
group, openmm.LangevinMiddleIntegrator's; it must evaluate the fast forces once per inner step and sample the
canonical distribution.
"""
import doctest
import math
import pickle

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from nct_openmm import integrators, systems
from nct_openmm.backend import createTorchForce
from nct_openmm.integrators import MTSLangevinMiddleIntegrator, mtsLangevinIntegrator
from nct_openmm.systems import builtinSystem

KT_300 = (unit.MOLAR_GAS_CONSTANT_R * 300 * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)


def chainSystem(particles=6, seed=0):
    """Particles in a chain of harmonic bonds (group 0), an anharmonic tether (group 1) and a weak pair term
    (group 2): three groups of different stiffness, no constraints."""
    rng = np.random.default_rng(seed)
    system = openmm.System()
    for _ in range(particles):
        system.addParticle(float(rng.uniform(4.0, 16.0)))
    bonds = openmm.HarmonicBondForce()
    for i in range(particles - 1):
        bonds.addBond(i, i + 1, 0.15, 2000.0)
    tether = openmm.CustomExternalForce("20*(x^2+y^2+z^2)^2")
    for i in range(particles):
        tether.addParticle(i, [])
    tether.setForceGroup(1)
    pair = openmm.CustomBondForce("5*(r-0.5)^2")
    pair.addBond(0, particles - 1, [])
    pair.setForceGroup(2)
    for force in (bonds, tether, pair):
        system.addForce(force)
    positions = np.column_stack([0.15 * np.arange(particles), np.zeros(particles), np.zeros(particles)])
    positions += rng.normal(0.0, 0.01, positions.shape)
    velocities = rng.normal(0.0, 1.0, positions.shape)
    return system, positions, velocities


def makeContext(system, integrator, positions, velocities):
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    context.setVelocities(velocities)
    return context


def trajectory(context, integrator, steps):
    frames = []
    for _ in range(steps):
        integrator.step(1)
        frames.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    return np.array(frames)


def halfKick(system, groups, dt, positions):
    """The velocity change of half a kick by every group at an outer-step boundary: Σ (dt / 2 substeps) f / m."""
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    masses = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(system.getNumParticles())])
    kick = np.zeros((system.getNumParticles(), 3))
    for group, substeps in groups:
        forces = context.getState(getForces=True, groups={group}).getForces(asNumpy=True)
        kick += dt / (2 * substeps) * forces.value_in_unit(unit.kilojoule_per_mole / unit.nanometer) / masses[:, None]
    return kick


@pytest.mark.parametrize("groups", [[(1, 1), (2, 4), (0, 4)], [(2, 1), (1, 2), (0, 4)], [(1, 1), (2, 1), (0, 3)]],
                         ids=["two-levels", "three-levels", "two-slow-groups"])
def test_positions_equal_the_symmetric_splitting_of_openmm(groups):
    system, positions, velocities = chainSystem()
    dt = 0.004
    symmetric = openmm.MTSLangevinIntegrator(300, 0.0, dt, groups)
    middle = MTSLangevinMiddleIntegrator(300, 0.0, dt, groups)
    # The two differ by half a kick at the outer-step boundary: start the leapfrog half a kick earlier.
    expected = trajectory(makeContext(system, symmetric, positions, velocities), symmetric, 40)
    shifted = velocities - halfKick(system, groups, dt, positions)
    actual = trajectory(makeContext(system, middle, positions, shifted), middle, 40)
    assert np.abs(expected - positions).max() > 0.01  # the particles moved
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10)


def test_positions_equal_openmm_with_friction_at_zero_temperature():
    """At 0 K the thermostat is deterministic friction, so where it acts in the step shows in the positions: a
    thermostat on the outer step, or one moved to the end of the inner step, misses by far more than 1e-10."""
    system, positions, velocities = chainSystem()
    dt, groups = 0.004, [(1, 1), (2, 4), (0, 4)]
    symmetric = openmm.MTSLangevinIntegrator(0, 20.0, dt, groups)
    middle = MTSLangevinMiddleIntegrator(0, 20.0, dt, groups)
    expected = trajectory(makeContext(system, symmetric, positions, velocities), symmetric, 40)
    shifted = velocities - halfKick(system, groups, dt, positions)
    actual = trajectory(makeContext(system, middle, positions, shifted), middle, 40)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-10)


def test_one_group_is_langevin_middle_with_constraints():
    ala2 = builtinSystem("ala2-vacuum")
    assert ala2.system.getNumConstraints() > 0
    velocities = np.random.default_rng(3).normal(0.0, 0.5, (ala2.system.getNumParticles(), 3))
    results = []
    for integrator in (openmm.LangevinMiddleIntegrator(300, 0.0, 0.002),
                       MTSLangevinMiddleIntegrator(300, 0.0, 0.002, [(0, 1)])):
        context = makeContext(openmm.XmlSerializer.clone(ala2.system), integrator, ala2.positions, velocities)
        results.append(trajectory(context, integrator, 30))
    assert np.abs(results[0][-1] - results[0][0]).max() > 0.01
    np.testing.assert_allclose(results[1], results[0], rtol=0, atol=1e-9)


class CountingModel(torch.nn.Module):
    """Energy = the number of times the model has been evaluated, so the Context reports its own call count."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        self.calls += 1.0
        return self.calls + 0.0 * positions.sum()


@pytest.mark.parametrize("stride", [1, 4])
def test_each_group_is_evaluated_once_where_it_is_applied(stride):
    system, positions, velocities = chainSystem()
    slowCounter, fastCounter = 3, 4
    for group in (slowCounter, fastCounter):
        system.addForce(createTorchForce(CountingModel(), forceGroup=group))
    integrator = MTSLangevinMiddleIntegrator(300, 1.0, 0.002 * stride, [(1, 1), (slowCounter, 1), (0, stride),
                                                                        (2, stride), (fastCounter, stride)])
    context = makeContext(system, integrator, positions, velocities)

    def calls(group):  # reading the count evaluates the group once more
        return context.getState(getEnergy=True, groups={group}).getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole)

    before = {group: calls(group) for group in (slowCounter, fastCounter)}
    integrator.step(25)
    after = {group: calls(group) for group in (slowCounter, fastCounter)}
    assert after[slowCounter] - before[slowCounter] - 1 == 25  # once per outer step
    assert after[fastCounter] - before[fastCounter] - 1 == 25 * stride  # once per inner step, not once more


def test_samples_the_canonical_distribution():
    """Harmonic wells (fast, group 0) plus a weaker harmonic term (slow, group 1, every 4th step): the kinetic
    temperature and ⟨x²⟩ = kT / (k0 + k1) per coordinate. Weighting the slow kick wrongly moves these by far more
    than the tolerance; where the thermostat acts does not (harmonic wells keep their stationary distribution), which
    the zero-temperature comparison with OpenMM's integrator checks instead."""
    particles, k0, k1 = 64, 1000.0, 150.0
    system = openmm.System()
    fast, slow = (openmm.CustomExternalForce(f"{k}/2*(x^2+y^2+z^2)") for k in (k0, k1))
    for i in range(particles):
        system.addParticle(12.0)
        fast.addParticle(i, [])
        slow.addParticle(i, [])
    slow.setForceGroup(1)
    system.addForce(fast)
    system.addForce(slow)
    integrator = MTSLangevinMiddleIntegrator(300 * unit.kelvin, 5 / unit.picosecond, 0.008 * unit.picoseconds,
                                             [(1, 1), (0, 4)])
    integrator.setRandomNumberSeed(11)
    context = makeContext(system, integrator, np.zeros((particles, 3)), np.zeros((particles, 3)))
    context.setVelocitiesToTemperature(300, 11)
    integrator.step(500)
    squares, kinetic = [], []
    for _ in range(800):
        integrator.step(25)
        state = context.getState(getPositions=True, getEnergy=True)
        squares.append(np.mean(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) ** 2))
        kinetic.append(state.getKineticEnergy().value_in_unit(unit.kilojoule_per_mole))
    temperature = 2 * np.mean(kinetic) / (3 * particles * KT_300 / 300)
    assert temperature == pytest.approx(300, rel=0.02)
    assert np.mean(squares) == pytest.approx(KT_300 / (k0 + k1), rel=0.02)


def test_xml_round_trip_gives_the_same_trajectory():
    system, positions, velocities = chainSystem()
    groups = [(1, 1), (2, 1), (0, 4)]
    integrator = MTSLangevinMiddleIntegrator(300, 0.0, 0.008, groups)
    restored = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(integrator))
    assert type(restored) is openmm.CustomIntegrator  # as documented: the steps and globals, not the class
    assert restored.getGlobalVariableByName("temperature") == 300
    expected = trajectory(makeContext(system, integrator, positions, velocities), integrator, 10)
    actual = trajectory(makeContext(system, restored, positions, velocities), restored, 10)
    np.testing.assert_array_equal(actual, expected)


def test_thermostat_follows_temperature_friction_and_step_size():
    integrator = MTSLangevinMiddleIntegrator(300 * unit.kelvin, 2 / unit.picosecond, 0.016 * unit.picoseconds,
                                             [(31, 1), (0, 8)])
    assert integrator.getGlobalVariableByName("a") == pytest.approx(math.exp(-2 * 0.002))
    integrator.setFriction(10 / unit.picosecond)
    integrator.setStepSize(0.008 * unit.picoseconds)
    integrator.setTemperature(600)
    decay = math.exp(-10 * 0.001)
    assert integrator.getGlobalVariableByName("a") == pytest.approx(decay)
    assert integrator.getGlobalVariableByName("b") == pytest.approx(math.sqrt(1 - decay ** 2))
    assert integrator.getGlobalVariableByName("kT") == pytest.approx(2 * KT_300)
    assert integrator.getTemperature() == 600 * unit.kelvin
    assert integrator.getFriction() == 10 / unit.picosecond


def test_thermostat_settings_reach_the_context_and_travel_with_its_state():
    system, positions, velocities = chainSystem()
    hot = MTSLangevinMiddleIntegrator(300, 1.0, 0.008, [(1, 1), (2, 1), (0, 4)])
    context = makeContext(system, hot, positions, velocities)
    hot.setTemperature(600 * unit.kelvin)
    hot.setFriction(5.0)
    assert context.getIntegrator().getGlobalVariableByName("kT") == pytest.approx(2 * KT_300)
    state = context.getState(getPositions=True, getVelocities=True, getIntegratorParameters=True)
    other = MTSLangevinMiddleIntegrator(400, 1.0, 0.008, [(1, 1), (2, 1), (0, 4)])
    makeContext(system, other, positions, velocities).setState(state)
    assert other.getTemperature() == 600 * unit.kelvin and other.getFriction() == 5 / unit.picosecond
    assert other.getGlobalVariableByName("kT") == pytest.approx(2 * KT_300)


def test_a_pickled_integrator_keeps_its_thermostat():
    integrator = MTSLangevinMiddleIntegrator(310, 2.0, 0.008, [(31, 1), (0, 4)])
    copy = pickle.loads(pickle.dumps(integrator))
    assert copy.getTemperature() == 310 * unit.kelvin and copy.getFriction() == 2 / unit.picosecond
    copy.setStepSize(0.004)
    assert copy.getGlobalVariableByName("a") == pytest.approx(math.exp(-2.0 * 0.001))


def test_negative_temperature_or_friction_is_refused():
    with pytest.raises(ValueError, match="friction must not be negative"):
        MTSLangevinMiddleIntegrator(300, -1.0, 0.004, [(0, 1)])
    integrator = MTSLangevinMiddleIntegrator(300, 1.0, 0.004, [(0, 1)])
    with pytest.raises(ValueError, match="temperature must not be negative"):
        integrator.setTemperature(-5)


@pytest.mark.parametrize("groups, message", [
    ([], "empty"),
    ([(32, 1)], "force group 0-31"),
    ([(0, 0)], "substeps >= 1"),
    ([(0, 2.5)], "pair of integers"),
    ([(0, 1), (0, 4)], "listed twice"),
    ([(1, 3), (0, 4)], "do not divide"),
    ((pair for pair in [(40, 1)]), "force group 0-31"),
    ([(True, 1)], "pair of integers"),
    ([(0, 2.0)], "pair of integers"),
    ([(0, 1, 2)], "pair of integers"),
    (None, "must be \\(force group, substeps\\) pairs"),
])
def test_bad_groups_are_refused_with_the_reason(groups, message):
    with pytest.raises(ValueError, match=message):
        MTSLangevinMiddleIntegrator(300, 1.0, 0.004, groups)


def test_factory_gives_the_bias_one_substep_and_every_other_group_stride():
    system, _, _ = chainSystem()
    integrator = mtsLangevinIntegrator(system, 5, 4, 300 * unit.kelvin, 1 / unit.picosecond, 2 * unit.femtoseconds)
    assert integrator.getStepSize() == 0.008 * unit.picoseconds
    kicks = [integrator.getComputationStep(i)[2] for i in range(integrator.getNumComputations())
             if integrator.getComputationStep(i)[1] == "v" and "*f" in integrator.getComputationStep(i)[2]]
    assert sum("f5/" in kick for kick in kicks) == 1
    assert all(sum(f"f{group}/" in kick for kick in kicks) == 4 for group in (0, 1, 2))


def test_bias_groups_include_the_reciprocal_space_group():
    system, _, _ = chainSystem()
    nonbonded = openmm.NonbondedForce()
    for _ in range(system.getNumParticles()):
        nonbonded.addParticle(0.0, 0.3, 0.1)
    nonbonded.setReciprocalSpaceForceGroup(6)
    system.addForce(nonbonded)
    assert integrators.biasGroups(system, 5, 4) == [(5, 1), (0, 4), (1, 4), (2, 4), (6, 4)]


def test_a_stride_without_fast_forces_is_refused():
    system = openmm.System()
    system.addParticle(1.0)
    bias = openmm.CustomExternalForce("x^2")
    bias.addParticle(0, [])
    bias.setForceGroup(5)
    system.addForce(bias)
    assert integrators.biasGroups(system, 5, 1) == [(5, 1)]
    with pytest.raises(ValueError, match="no force outside the bias group 5"):
        mtsLangevinIntegrator(system, 5, 4, 300)


@pytest.mark.parametrize("module", [integrators, systems])
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
