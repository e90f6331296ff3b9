"""Tests of nct_openmm.forces: slow modes as OpenMM forces, on a small particle system with the stand-in CV module.

Physics checks (forces = −∇E, restraint direction, exact wall zeros, energies from independent Python arithmetic) run
on the Reference platform in double precision; the other platforms are compared with Reference at float32
tolerances, and are skipped where OpenMM cannot create a Context on them.
"""
import os
import sys
import warnings
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from cv_standin import BoxShiftedModes, StandInModes
from nct_openmm.forces import (CVReporter, LatentBiasForce, OutOfDistributionWarning, SlowModeCV,
                               checkSystemCompatible, slowModeBiasVariables)

NUM_PARTICLES = 12
CV_ATOMS = list(range(10))
NUM_MODES = 3
PLATFORMS = ["Reference", "CPU", "CUDA", "OpenCL"]
# Relative tolerance of a platform's energies and forces against the module evaluated in float64.
TOLERANCE = {"Reference": 1e-9, "CPU": 2e-5, "CUDA": 2e-5, "OpenCL": 2e-5}


@pytest.fixture(scope="module")
def cvModule():
    return StandInModes(CV_ATOMS, num_modes=NUM_MODES, seed=3)


@pytest.fixture(scope="module")
def positions():
    generator = np.random.default_rng(7)
    return generator.uniform(0.0, 1.0, size=(NUM_PARTICLES, 3))


def makeSystem(numParticles=NUM_PARTICLES):
    """Particles tethered to their start positions, so that short MD stays near the configuration tested."""
    system = openmm.System()
    tether = openmm.CustomExternalForce("50*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    for name in ("x0", "y0", "z0"):
        tether.addPerParticleParameter(name)
    start = np.random.default_rng(7).uniform(0.0, 1.0, size=(numParticles, 3))
    for i in range(numParticles):
        system.addParticle(12.0)
        tether.addParticle(i, start[i])
    system.addForce(tether)
    return system


def platformOrSkip(name):
    try:
        platform = openmm.Platform.getPlatformByName(name)
        openmm.Context(makeSystem(1), openmm.VerletIntegrator(0.001), platform)
    except Exception as error:  # a missing plugin or a missing device; either way nothing to test here
        pytest.skip(f"platform {name} unavailable: {error}")
    return platform


def makeContext(system, positions, platform="Reference"):
    if isinstance(platform, str):
        platform = platformOrSkip(platform)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), platform)
    context.setPositions(positions)
    return context


def referenceSimulation(system, positions, integrator=None, friction=1.0, stepSize=0.002):
    """A Simulation on Reference, by default with a seeded Langevin integrator so that runs repeat exactly."""
    if integrator is None:
        integrator = openmm.LangevinMiddleIntegrator(300, friction, stepSize)
        integrator.setRandomNumberSeed(2024)
    simulation = app.Simulation(app.Topology(), system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions(positions)
    return simulation


def currentPositions(context):
    return context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)


def modeValues(cvModule, positions):
    with torch.no_grad():
        return cvModule(torch.as_tensor(positions, dtype=torch.float64)).numpy()


def modeGradient(cvModule, positions, mode):
    x = torch.as_tensor(positions, dtype=torch.float64).clone().requires_grad_(True)
    cvModule(x)[mode].backward()
    return x.grad.numpy()


def energyAndForces(context, groups=-1):
    state = context.getState(getEnergy=True, getForces=True, groups=groups)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def energy(context, groups=-1):
    return context.getState(getEnergy=True, groups=groups).getPotentialEnergy().value_in_unit(
        unit.kilojoule_per_mole)


def finiteDifferenceForces(context, positions, groups, h=1e-5):
    forces = np.zeros_like(positions)
    for index in np.ndindex(positions.shape):
        shifted = [positions.copy(), positions.copy()]
        shifted[0][index] += h
        shifted[1][index] -= h
        plus, minus = [(context.setPositions(x), energy(context, groups))[1] for x in shifted]
        forces[index] = -(plus - minus) / (2 * h)
    context.setPositions(positions)
    return forces


def cvForce(cvModule, mode, insideCustomCV):
    """Mode ``mode`` as a force in group 1, alone or as ``2*s`` in a CustomCVForce; returns it and the factor."""
    force = SlowModeCV(cvModule, mode)
    if insideCustomCV:
        outer = openmm.CustomCVForce("2*s")
        outer.addCollectiveVariable("s", force)
        force = outer
    force.setForceGroup(1)
    return force, (2.0 if insideCustomCV else 1.0)


def cvSystem(cvModule, mode, insideCustomCV):
    system = makeSystem()
    force, factor = cvForce(cvModule, mode, insideCustomCV)
    system.addForce(force)
    return system, factor


def configuredBias(cvModule, positions, prefix="latent_"):
    """Restraints on modes 0 and 2, walls on mode 1 (violated) and mode 2 (satisfied)."""
    s = modeValues(cvModule, positions)
    bias = LatentBiasForce(cvModule, prefix=prefix)
    bias.addRestraint(0, center=s[0] + 0.4, forceConstant=20.0)
    bias.addRestraint(2, center=s[2] - 0.3, forceConstant=7.5 * unit.kilojoule_per_mole)
    bias.addWalls(1, lower=s[1] + 0.25, upper=s[1] + 2.0, forceConstant=60.0)
    bias.addWalls(2, lower=s[2] - 1.0, upper=s[2] + 1.0, forceConstant=60.0)
    return bias


def expectedBiasEnergy(s, restraints, walls):
    """The latent bias written out term by term, independent of the package code."""
    total = 0.0
    for mode, (center, kappa) in restraints.items():
        total += 0.5 * kappa * (s[mode] - center) ** 2
    for mode, (lower, upper, kappa) in walls.items():
        if s[mode] > upper:
            total += 0.5 * kappa * (s[mode] - upper) ** 2
        elif s[mode] < lower:
            total += 0.5 * kappa * (lower - s[mode]) ** 2
    return total


def biasContext(cvModule, positions, platform="Reference"):
    system = makeSystem()
    bias = configuredBias(cvModule, positions)
    bias.addToSystem(system)
    return bias, makeContext(system, positions, platform)


# --- a slow mode as a collective variable ------------------------------------------------------------------------

@pytest.mark.parametrize("insideCustomCV", [False, True], ids=["alone", "inCustomCV"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_cv_energy_equals_module_value(cvModule, positions, platform, insideCustomCV):
    expected = modeValues(cvModule, positions)
    for mode in range(NUM_MODES):
        system, factor = cvSystem(cvModule, mode, insideCustomCV)
        context = makeContext(system, positions, platform)
        assert energy(context, {1}) == pytest.approx(factor * expected[mode], rel=TOLERANCE[platform], abs=1e-6)


@pytest.mark.parametrize("insideCustomCV", [False, True], ids=["alone", "inCustomCV"])
def test_cv_forces_are_minus_energy_gradient(cvModule, positions, insideCustomCV):
    system, _ = cvSystem(cvModule, 1, insideCustomCV)
    context = makeContext(system, positions)
    _, forces = energyAndForces(context, {1})
    expected = finiteDifferenceForces(context, positions, {1})
    np.testing.assert_allclose(forces, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_cv_accepts_a_saved_and_loaded_script_module(cvModule, positions, tmp_path):
    path = str(tmp_path / "cv.pt")
    torch.jit.script(cvModule).save(path)
    loaded = torch.jit.load(path)
    system, _ = cvSystem(loaded, 2, insideCustomCV=True)
    assert energy(makeContext(system, positions), {1}) == pytest.approx(2 * modeValues(cvModule, positions)[2])


def test_bias_variables_pad_training_ranges_and_drive_metadynamics(cvModule, positions):
    variables = slowModeBiasVariables(cvModule, [0, 2], [(-2.5, 2.0), (-1.0, 3.0)], widths=0.2, padding=0.5)
    assert [(v.minValue, v.maxValue, v.biasWidth) for v in variables] == [(-3.0, 2.5, 0.2), (-1.5, 3.5, 0.2)]
    system = makeSystem()
    meta = app.Metadynamics(system, variables, 300 * unit.kelvin, 5.0, 1.0 * unit.kilojoule_per_mole, 5)
    simulation = referenceSimulation(system, positions, stepSize=0.001)
    meta.step(simulation, 10)
    expected = modeValues(cvModule, currentPositions(simulation.context))[[0, 2]]
    np.testing.assert_allclose(meta.getCollectiveVariables(simulation), expected, rtol=1e-10)
    assert np.abs(meta.getFreeEnergy()).max() > 0
    with pytest.raises(ValueError, match="padding widens the ranges: it must be a non-negative number, got -1.5"):
        slowModeBiasVariables(cvModule, [0], [(-1.0, 1.0)], padding=-1.5)
    with pytest.raises(ValueError, match="modes must be distinct"):
        slowModeBiasVariables(cvModule, [1, 1], [(-1.0, 1.0)] * 2)
    with pytest.raises(ValueError, match="a mode index must be an integer, got True"):
        slowModeBiasVariables(cvModule, [True], [(-1.0, 1.0)])


# --- all modes in one force ---------------------------------------------------------------------------------------

def test_bias_energy_is_sum_of_its_terms(cvModule, positions):
    bias, context = biasContext(cvModule, positions)
    s = modeValues(cvModule, positions)
    expected = expectedBiasEnergy(s, bias._restraints, bias._walls)
    assert expected > 1.0
    assert energy(context, {bias.getForce().getForceGroup()}) == pytest.approx(expected, rel=1e-10)
    bias.setRestraintCenter(context, 0, s[0] - 1.0)
    bias.setRestraintForceConstant(context, 2, 0.0)
    restraints = {0: (s[0] - 1.0, 20.0), 2: (s[2] - 0.3, 0.0)}
    assert energy(context) - energy(context, {0}) == pytest.approx(
        expectedBiasEnergy(s, restraints, bias._walls), rel=1e-10)
    with pytest.raises(ValueError, match="center must be a finite number, got nan"):
        bias.setRestraintCenter(context, 0, float("nan"))
    assert bias.getRestraintCenter(context, 0) == s[0] - 1.0


def test_bias_forces_are_minus_energy_gradient(cvModule, positions):
    bias, context = biasContext(cvModule, positions)
    group = {bias.getForce().getForceGroup()}
    _, forces = energyAndForces(context, group)
    expected = finiteDifferenceForces(context, positions, group)
    np.testing.assert_allclose(forces, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("platform", PLATFORMS[1:])
def test_platforms_agree_with_reference(cvModule, positions, platform):
    results = [energyAndForces(biasContext(cvModule, positions, name)[1]) for name in ("Reference", platform)]
    (referenceEnergy, referenceForces), (energyHere, forcesHere) = results
    assert energyHere == pytest.approx(referenceEnergy, rel=TOLERANCE[platform])
    np.testing.assert_allclose(forcesHere, referenceForces, rtol=1e-3,
                               atol=TOLERANCE[platform] * np.abs(referenceForces).max())


@pytest.mark.parametrize("platform", PLATFORMS)
def test_collective_variables_read_from_parameter_derivatives(cvModule, positions, platform):
    bias, context = biasContext(cvModule, positions, platform)
    np.testing.assert_allclose(bias.getCollectiveVariables(context), modeValues(cvModule, positions),
                               rtol=TOLERANCE[platform], atol=1e-6)
    simulation = SimpleNamespace(context=context)  # what it reads of an app.Simulation, as app.Metadynamics does
    np.testing.assert_array_equal(bias.getCollectiveVariables(simulation), bias.getCollectiveVariables(context))


def test_restraint_force_points_down_its_gradient(cvModule, positions):
    s = modeValues(cvModule, positions)
    system = makeSystem()
    bias = LatentBiasForce(cvModule)
    bias.addRestraint(1, center=s[1] + 0.5, forceConstant=30.0)
    bias.addToSystem(system, forceGroup=3)
    context = makeContext(system, positions)
    _, forces = energyAndForces(context, {3})
    gradient = modeGradient(cvModule, positions, 1)
    # F = −κ (s − c) ∇s: with the centre above s, the force raises s.
    np.testing.assert_allclose(forces, 30.0 * 0.5 * gradient, rtol=1e-8, atol=1e-10)
    assert np.sum(forces * gradient) > 0


def test_walls_are_exactly_zero_inside_and_act_outside(cvModule, positions):
    s = modeValues(cvModule, positions)
    system = makeSystem()
    bias = LatentBiasForce(cvModule)
    bias.addWalls(0, lower=s[0] - 0.5, upper=s[0] + 0.5, forceConstant=80.0)
    bias.addToSystem(system)
    context = makeContext(system, positions)
    group = {bias.getForce().getForceGroup()}
    insideEnergy, insideForces = energyAndForces(context, group)
    assert insideEnergy == 0.0 and not insideForces.any()
    context.setParameter(bias.getParameterName("upper", 0), s[0] - 0.2)
    outsideEnergy, outsideForces = energyAndForces(context, group)
    assert outsideEnergy == pytest.approx(0.5 * 80.0 * 0.2 ** 2, rel=1e-10)
    np.testing.assert_allclose(outsideForces, -80.0 * 0.2 * modeGradient(cvModule, positions, 0), rtol=1e-8,
                               atol=1e-10)


def test_two_bias_forces_coexist_with_different_prefixes(cvModule, positions):
    system = makeSystem()
    first, second = configuredBias(cvModule, positions, "a_"), configuredBias(cvModule, positions, "b_")
    first.addToSystem(system)
    second.addToSystem(system)
    assert first.getForce().getForceGroup() != second.getForce().getForceGroup()
    context = makeContext(system, positions)
    np.testing.assert_allclose(second.getCollectiveVariables(context), modeValues(cvModule, positions))
    second.setRestraintCenter(context, 0, 0.0)
    assert first.getRestraintCenter(context, 0) != 0.0
    assert energy(context, {first.getForce().getForceGroup()}) == pytest.approx(
        expectedBiasEnergy(modeValues(cvModule, positions), first._restraints, first._walls))


def test_two_bias_forces_with_one_prefix_are_refused(cvModule, positions):
    system = makeSystem()
    configuredBias(cvModule, positions).addToSystem(system)
    second = configuredBias(cvModule, positions)
    with pytest.raises(ValueError, match="already has a LatentBiasForce with prefix 'latent_'.*another prefix="):
        second.addToSystem(system)
    assert system.getNumForces() == 2  # the particles' force and the first bias: nothing half-added
    other = openmm.CustomExternalForce("latent_center0*x")
    other.addGlobalParameter("latent_center0", 0.0)
    clashing = makeSystem()
    clashing.addForce(other)
    with pytest.raises(ValueError, match=r"global parameters \['latent_center0'\]"):
        configuredBias(cvModule, positions).addToSystem(clashing)


def test_a_bias_in_a_serialized_system_is_seen_by_the_next_one(cvModule, positions):
    """A TorchForce back from XmlSerializer is a plain Force named 'TorchForce': its global parameters, read from
    its XML, still tell that a second bias with the same prefix would share them."""
    system = makeSystem()
    configuredBias(cvModule, positions).addToSystem(system)
    loaded = openmm.XmlSerializer.clone(system)
    with pytest.raises(ValueError, match="already has a LatentBiasForce with prefix 'latent_'"):
        configuredBias(cvModule, positions).addToSystem(loaded)
    configuredBias(cvModule, positions, prefix="second_").addToSystem(loaded)


def test_periodic_bias_force_receives_box(cvModule, positions):
    system = makeSystem()
    system.setDefaultPeriodicBoxVectors(*(2.0 * np.eye(3)))
    bias = LatentBiasForce(BoxShiftedModes(CV_ATOMS, num_modes=NUM_MODES, seed=3), periodic=True)
    bias.addRestraint(0, center=0.0, forceConstant=10.0)
    bias.addToSystem(system)
    context = makeContext(system, positions)
    s = modeValues(cvModule, positions)  # the same modes without the box's shift
    assert bias.getForce().usesPeriodicBoundaryConditions()
    group = {bias.getForce().getForceGroup()}
    assert energy(context, group) == pytest.approx(5.0 * (s[0] + 0.2) ** 2)
    context.setPeriodicBoxVectors(*(2.5 * np.eye(3)))
    assert energy(context, group) == pytest.approx(5.0 * (s[0] + 0.25) ** 2)
    with pytest.warns(UserWarning, match="periodic boundary conditions but this LatentBiasForce was given "
                                         "periodic=False"):
        LatentBiasForce(cvModule, prefix="other_").addToSystem(system)


def restrainedSimulation(cvModule, positions):
    """A bias with a restraint of 200 kJ/mol on mode 0 and a Reference simulation of it, for steering."""
    system = makeSystem()
    bias = LatentBiasForce(cvModule)
    bias.addRestraint(0, center=0.0, forceConstant=200.0)
    bias.addToSystem(system)
    return bias, referenceSimulation(system, positions, friction=5.0)


def test_steering_moves_centre_and_returns_work_profile(cvModule, positions):
    bias, simulation = restrainedSimulation(cvModule, positions)
    start = modeValues(cvModule, positions)[0]
    end = start - 0.6 * np.sign(start)  # towards 0, away from the stand-in's saturation at ±3
    result = bias.steer(simulation, 0, start, end, steps=300, increments=30)
    assert simulation.currentStep == 300
    assert bias.getRestraintCenter(simulation.context, 0) == pytest.approx(end)
    assert len(result.work) == len(result.centers) == len(result.values) == len(result.steps) == 31
    assert result.work[0].value_in_unit(unit.kilojoule_per_mole) == 0.0
    np.testing.assert_allclose(result.centers[[0, -1]], [start, end])
    np.testing.assert_array_equal(result.steps, np.arange(0, 301, 10))
    # Each jump does ½κ[(s − c_new)² − (s − c_old)²] of work at the value the last segment ended with.
    jumps = 0.5 * 200.0 * ((result.values[:-1] - result.centers[1:]) ** 2
                           - (result.values[:-1] - result.centers[:-1]) ** 2)
    work = result.work.value_in_unit(unit.kilojoule_per_mole)
    np.testing.assert_allclose(work, np.concatenate([[0], np.cumsum(jumps)]))
    assert abs(result.values[-1] - end) < 0.3 < abs(result.values[-1] - start)  # the mode followed the pull
    # The jump formula is the Context's own energy change when the centre moves at fixed positions.
    group, value = {bias.getForce().getForceGroup()}, result.values[-1]
    energies = []
    for center in (end, end + 0.05):
        bias.setRestraintCenter(simulation.context, 0, center)
        energies.append(energy(simulation.context, group))
    expected = 0.5 * 200.0 * ((value - end - 0.05) ** 2 - (value - end) ** 2)
    assert energies[1] - energies[0] == pytest.approx(expected, rel=1e-6)


def test_a_failed_steering_segment_keeps_the_work_done_before(cvModule, positions):
    bias, simulation = restrainedSimulation(cvModule, positions)

    class FailingReporter:
        def describeNextReport(self, simulation):
            return {"steps": 25 - simulation.currentStep % 25, "periodic": None, "include": []}

        def report(self, simulation, state):
            raise RuntimeError("disk full")

    simulation.reporters.append(FailingReporter())
    start = modeValues(cvModule, positions)[0]
    with pytest.raises(RuntimeError, match="disk full") as caught:
        bias.steer(simulation, 0, start, start - 0.5, steps=100, increments=10)
    partial = caught.value.steeringResult
    np.testing.assert_array_equal(partial.steps, [0, 10, 20])
    assert len(partial.centers) == len(partial.values) == len(partial.work) == 3


# --- persistence --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("insideCustomCV", [False, True], ids=["alone", "inCustomCV"])
def test_xml_round_trip_keeps_energy(cvModule, positions, insideCustomCV):
    system = makeSystem()
    bias = configuredBias(cvModule, positions)
    if insideCustomCV:
        system.addForce(cvForce(cvModule, 0, insideCustomCV=True)[0])
    bias.addToSystem(system)
    copy = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
    energies = [energy(makeContext(s, positions)) for s in (system, copy)]
    assert energies[1] == pytest.approx(energies[0], rel=1e-12)


def test_state_and_checkpoint_restore_parameters_and_trajectory(cvModule, positions, tmp_path):
    system = makeSystem()
    bias = configuredBias(cvModule, positions)
    bias.addToSystem(system)
    simulation = referenceSimulation(system, positions, openmm.VerletIntegrator(0.001))
    simulation.step(5)
    bias.setRestraintCenter(simulation.context, 0, 1.25)
    simulation.saveState(str(tmp_path / "state.xml"))
    simulation.saveCheckpoint(str(tmp_path / "state.chk"))
    simulation.step(10)
    expectedPositions, expectedEnergy = currentPositions(simulation.context), energy(simulation.context)
    for load, name in ((simulation.loadState, "state.xml"), (simulation.loadCheckpoint, "state.chk")):
        bias.setRestraintCenter(simulation.context, 0, -3.0)
        load(str(tmp_path / name))
        assert bias.getRestraintCenter(simulation.context, 0) == 1.25
        simulation.step(10)
        np.testing.assert_allclose(currentPositions(simulation.context), expectedPositions, rtol=0, atol=1e-10)
        assert energy(simulation.context) == pytest.approx(expectedEnergy, rel=1e-10)


# --- reporter -----------------------------------------------------------------------------------------------------

def test_reporter_writes_mode_values_and_warns_once_out_of_distribution(cvModule, positions, tmp_path):
    simulation = referenceSimulation(makeSystem(), positions)
    calls = []

    def logLikelihood(x):
        calls.append(x.copy())
        return -float(len(calls))

    path = tmp_path / "cv.txt"
    reporter = CVReporter(str(path), 5, cvModule, logLikelihood=logLikelihood, logLikelihoodThreshold=-2.5)
    simulation.reporters.append(reporter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simulation.step(30)
    reporter.close()
    assert [w.category for w in caught] == [OutOfDistributionWarning]
    lines = path.read_text().splitlines()
    assert lines[0] == "# step time_ps s0 s1 s2 logLikelihood"
    table = np.loadtxt(path)
    assert table.shape == (6, 2 + NUM_MODES + 1)
    np.testing.assert_array_equal(table[:, 0], [5, 10, 15, 20, 25, 30])
    np.testing.assert_allclose(table[:, 1], table[:, 0] * 0.002)
    expected = np.array([modeValues(cvModule, x) for x in calls])
    np.testing.assert_allclose(table[:, 2:5], expected, rtol=1e-9)
    np.testing.assert_array_equal(table[:, 5], -np.arange(1, 7))
    np.testing.assert_allclose(calls[-1], currentPositions(simulation.context))


# --- bad input ----------------------------------------------------------------------------------------------------

def test_too_few_atoms_is_a_clear_error(cvModule, positions, tmp_path):
    with pytest.raises(ValueError, match="at least 10 particles, but the System has 8"):
        checkSystemCompatible(makeSystem(8), cvModule)
    bias = LatentBiasForce(cvModule)
    with pytest.raises(ValueError, match="at least 10 particles"):
        bias.addToSystem(makeSystem(8))
    simulation = referenceSimulation(makeSystem(8), positions[:8])
    simulation.reporters.append(CVReporter(tmp_path / "cv.txt", 2, cvModule))  # a path-like file works too
    with pytest.raises(ValueError, match="at least 10 particles, but the System has 8"):
        simulation.step(2)


def test_all_force_groups_used_is_a_clear_error(cvModule):
    system = makeSystem()
    for group in range(32):
        extra = openmm.CustomExternalForce("0")
        extra.setForceGroup(group)
        system.addForce(extra)
    with pytest.raises(ValueError, match="all 32 force groups"):
        LatentBiasForce(cvModule).addToSystem(system)
    with pytest.raises(ValueError, match="forceGroup must be an integer from 0 to 31, got 32"):
        LatentBiasForce(cvModule).addToSystem(system, forceGroup=32)
    LatentBiasForce(cvModule).addToSystem(system, forceGroup=31)


def test_unknown_mode_is_a_clear_error(cvModule):
    with pytest.raises(ValueError, match="mode 3 does not exist: the CV module has 3 modes, 0 to 2"):
        SlowModeCV(cvModule, 3)
    bias = LatentBiasForce(cvModule)
    with pytest.raises(ValueError, match="mode -1 does not exist"):
        bias.addRestraint(-1, 0.0, 1.0)
    with pytest.raises(ValueError, match="integer"):
        bias.addWalls(0.5, -1.0, 1.0, 1.0)
    bias.addRestraint(0, 0.0, 1.0)
    with pytest.raises(ValueError, match="already has a restraint"):
        bias.addRestraint(0, 1.0, 1.0)
    with pytest.raises(ValueError, match="lower < upper"):
        bias.addWalls(1, 1.0, -1.0, 1.0)
    with pytest.raises(ValueError, match="non-negative"):
        bias.addWalls(1, -1.0, 1.0, -5.0)
    with pytest.raises(ValueError, match="non-negative and finite"):
        bias.addWalls(1, -1.0, 1.0, float("inf"))
    with pytest.raises(ValueError, match="center must be a finite number"):
        bias.addRestraint(2, float("nan"), 1.0)
    with pytest.raises(ValueError, match="widths gives 3 values for 2 modes"):
        slowModeBiasVariables(cvModule, [0, 1], [(-2, 2), (-2, 2)], widths=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="mode 1 has no restraint"):
        bias.setRestraintCenter(None, 1, 0.0)


def test_terms_are_fixed_once_added(cvModule):
    bias = LatentBiasForce(cvModule)
    with pytest.raises(RuntimeError, match="addToSystem first"):
        bias.getForce()
    bias.addToSystem(makeSystem())
    with pytest.raises(RuntimeError, match="terms are fixed"):
        bias.addRestraint(0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="already been added"):
        bias.addToSystem(makeSystem())
