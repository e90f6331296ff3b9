"""Tests of nct_openmm.metadynamics: forces, bias bookkeeping, well-tempering, restart, platforms, input checks.

The CV module is the scriptable stand-in of tests/cv_standin.py on alanine dipeptide in vacuum (22 atoms).
"""
import doctest
import json
import math
import os
import subprocess
import sys
import warnings
from typing import Optional

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cv_standin import BoxShiftedModes, StandInModes  # noqa: E402
from nct_openmm import metadynamics  # noqa: E402
from nct_openmm.integrators import mtsLangevinIntegrator  # noqa: E402
from nct_openmm.metadynamics import LatentMetadynamics  # noqa: E402
from nct_openmm.systems import builtinSystem  # noqa: E402

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CV_ATOMS = [1, 4, 6, 8, 14, 16]
TEMPERATURE = 300.0
BIAS_FACTOR = 6.0


@pytest.fixture(scope="module")
def ala2():
    return builtinSystem("ala2-vacuum")


def freshSystem(ala2):
    return openmm.XmlSerializer.clone(ala2.system)


def makeMeta(system, numModes=2, ranges=None, widths=0.4, height=3.0, frequency=5, **options):
    cvModule = StandInModes(CV_ATOMS, num_modes=numModes)
    ranges = ranges if ranges is not None else [(-3.0, 3.0)] * numModes
    return LatentMetadynamics(system, cvModule, ranges, widths, TEMPERATURE * unit.kelvin, BIAS_FACTOR,
                              height * unit.kilojoule_per_mole, frequency, **options)


def makeSimulation(ala2, system, platform="Reference", integrator=None):
    integrator = integrator or openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 5 / unit.picosecond,
                                                               0.002 * unit.picoseconds)
    if isinstance(integrator, openmm.LangevinMiddleIntegrator):
        integrator.setRandomNumberSeed(7)
    properties = {"Threads": "1"} if platform == "CPU" else {}
    simulation = app.Simulation(ala2.topology, system, integrator, openmm.Platform.getPlatformByName(platform),
                                properties)
    simulation.context.setPositions(ala2.positions)
    return simulation


def biasEnergy(context, meta, positions=None):
    if positions is not None:
        context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True, groups={meta.forceGroup})
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def perturbedPositions(ala2, rng, scale=0.03):
    positions = ala2.positions.value_in_unit(unit.nanometer)
    return np.asarray(positions) + scale * rng.standard_normal((len(positions), 3))


def exactBias(points, centres, heights, width):
    squared = ((points[:, None, :] - centres[None, :, :]) / width) ** 2
    return (heights[None, :] * np.exp(-0.5 * squared.sum(-1))).sum(-1)


@pytest.fixture(scope="module")
def depositedRun(ala2):
    """A Reference run with 16 hills on K = 2, shared by the tests that only read it."""
    system = freshSystem(ala2)
    meta = makeMeta(system)
    simulation = makeSimulation(ala2, system)
    meta.step(simulation, 80)
    return meta, simulation


def savedBias(depositedRun, tmp_path):
    """The shared run, with its bias saved to a file: (meta, simulation, path)."""
    meta, simulation = depositedRun
    path = str(tmp_path / "bias.npz")
    meta.saveBias(path)
    return meta, simulation, path


# ---------------------------------------------------------------------------------------------------------------
# Forces and the bias itself
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["inside", "outside"])
def test_forces_are_minus_gradient_of_the_bias(ala2, where):
    system = freshSystem(ala2)
    if where == "inside":
        meta = makeMeta(system, height=5.0, frequency=4)
    else:
        # A narrow range leaves the modes outside it: flat continuation of the grid plus the wall.
        meta = makeMeta(system, ranges=[(-0.3, 0.3), (-0.2, 0.4)], widths=0.3, height=5.0, frequency=4,
                        wallForceConstant=20.0)
    simulation = makeSimulation(ala2, system)
    meta.step(simulation, 48)
    context = simulation.context
    positions = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    _, forces = biasEnergy(context, meta, positions)
    if where == "outside":
        modes = meta.getCollectiveVariables(simulation)
        assert np.any(modes < np.array([-0.3, -0.2])) or np.any(modes > np.array([0.3, 0.4]))
    delta = 1e-5
    for atom in CV_ATOMS:
        for axis in range(3):
            energies = []
            for sign in (1, -1):
                displaced = positions.copy()
                displaced[atom, axis] += sign * delta
                energies.append(biasEnergy(context, meta, displaced)[0])
            numerical = -(energies[0] - energies[1]) / (2 * delta)
            assert numerical == pytest.approx(forces[atom, axis], rel=1e-5, abs=1e-5 * np.abs(forces).max() + 1e-7)
    assert np.abs(forces).max() > 1.0


def test_context_bias_matches_the_driver_copy(ala2, depositedRun):
    meta, simulation = depositedRun
    centres, heights = meta.getHills()
    assert len(heights) == 16
    rng = np.random.default_rng(1)
    points, energies = [], []
    for _ in range(8):
        simulation.context.setPositions(perturbedPositions(ala2, rng))
        points.append(meta.getCollectiveVariables(simulation))
        energies.append(biasEnergy(simulation.context, meta)[0])
    points = np.array(points)
    np.testing.assert_allclose(meta.getBias(points), energies, rtol=1e-10, atol=1e-10)
    exact = exactBias(points, centres, heights.value_in_unit(unit.kilojoule_per_mole), 0.4)
    np.testing.assert_allclose(energies, exact, atol=1e-3 * 3.0)
    assert meta.getBias(points[0]) == pytest.approx(energies[0], rel=1e-10)


def test_well_tempered_heights_decay_as_the_bias_grows(ala2):
    system = freshSystem(ala2)
    meta = makeMeta(system, frequency=1, height=2.0)
    # A vanishing time step keeps the modes in place, so every hill lands on the previous ones.
    simulation = makeSimulation(ala2, system, integrator=openmm.VerletIntegrator(1e-9 * unit.picoseconds))
    meta.step(simulation, 8)
    series = meta.getTimeSeries()
    heights = series["height_kj_mol"]
    assert len(heights) == 8 and heights[0] == pytest.approx(2.0)
    assert np.all(np.diff(heights) < 0)
    thermal = unit.MOLAR_GAS_CONSTANT_R * (BIAS_FACTOR - 1) * TEMPERATURE * unit.kelvin
    expected = 2.0 * np.exp(-series["bias_kj_mol"] / thermal.value_in_unit(unit.kilojoule_per_mole))
    np.testing.assert_allclose(heights, expected, rtol=1e-12)
    np.testing.assert_allclose(series["bias_kj_mol"][1:], np.cumsum(heights)[:-1], rtol=1e-3)


def test_a_short_run_deposits_the_expected_hills_and_a_free_energy(ala2):
    system = freshSystem(ala2)
    meta = makeMeta(system, frequency=10, gridWidth=[41, 31], stride=2)
    simulation = makeSimulation(ala2, system)
    meta.step(simulation, 45)
    meta.step(simulation, 55)
    centres, heights = meta.getHills()
    assert centres.shape == (10, 2)
    assert len(meta.getTimeSeries()["step"]) == 5
    np.testing.assert_array_equal(meta.getTimeSeries()["step"], [20, 40, 60, 80, 100])
    fes = meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert fes.shape == (41, 31) and np.all(np.isfinite(fes))
    nodes = np.stack(np.meshgrid(*meta.getGridPoints(), indexing="ij"), -1).reshape(-1, 2)
    exact = exactBias(nodes, centres, heights.value_in_unit(unit.kilojoule_per_mole), 0.4).reshape(41, 31)
    np.testing.assert_allclose(fes, -BIAS_FACTOR / (BIAS_FACTOR - 1) * exact, atol=1e-4)
    lowest = nodes[np.argmin(fes)]
    assert np.min(np.linalg.norm(centres - lowest, axis=1)) < 0.4


def test_hills_sit_at_the_modes_of_the_integrators_last_evaluation(ala2):
    system = freshSystem(ala2)
    meta = makeMeta(system, frequency=5)
    simulation = makeSimulation(ala2, system, integrator=openmm.VerletIntegrator(0.001 * unit.picoseconds))
    startOfStep = []
    for _ in range(15):
        startOfStep.append(simulation.context.getState(getPositions=True).getPositions(asNumpy=True))
        meta.step(simulation, 1)
    modes = StandInModes(CV_ATOMS, num_modes=2).modes
    expected = [modes(torch.tensor(startOfStep[step - 1].value_in_unit(unit.nanometer))).numpy()
                for step in (5, 10, 15)]
    np.testing.assert_allclose(meta.getHills()[0], expected, rtol=1e-12)
    assert meta.getTimeSeries()["bias_kj_mol"][0] == 0.0 and meta.getTimeSeries()["bias_kj_mol"][1] > 0.0


def test_a_hill_without_an_evaluation_since_the_last_one_sits_at_the_current_modes(ala2):
    system = freshSystem(ala2)
    meta = makeMeta(system, frequency=5)
    integrator = openmm.VerletIntegrator(0.001 * unit.picoseconds)
    integrator.setIntegrationForceGroups({0})  # the integrator never evaluates the bias
    simulation = makeSimulation(ala2, system, integrator=integrator)
    initial = meta.getCollectiveVariables(simulation)
    simulation.context.getState(getEnergy=True)  # an evaluation the first hill may use, and only the first
    current = []
    for _ in range(3):
        meta.step(simulation, 5)
        current.append(meta.getCollectiveVariables(simulation))
    centres = meta.getHills()[0]
    np.testing.assert_allclose(centres[0], initial, rtol=1e-12)
    np.testing.assert_allclose(centres[1:], current[1:], rtol=1e-12)
    assert len(np.unique(centres, axis=0)) == 3


def test_the_remembered_modes_are_read_once_and_in_float64_from_float32_parameters():
    cvModule = StandInModes(CV_ATOMS, num_modes=2)
    grid = metadynamics.HermiteBiasGrid([-3.0] * 2, [3.0] * 2, [31] * 2, [0.4] * 2)
    module = torch.jit.script(metadynamics._MetadynamicsModuleNoBox(cvModule, [0, 1], grid))
    names = list(metadynamics._parameterOrder(2, 0, [-3.0] * 2, [3.0] * 2)[0])
    positions = torch.rand(max(CV_ATOMS) + 1, 3, dtype=torch.float64)

    def call(readOut, dtype, shape):  # the CUDA kernel passes float32 parameters of shape (1,)
        values = {metadynamics._READ_OUT: float(readOut), metadynamics._modeReadout(1): 1.0}
        parameters = [torch.full(shape, values.get(name, 0.0), dtype=dtype) for name in names]
        return float(module(positions.to(dtype), *parameters))

    evaluated = call(metadynamics._EVALUATION, torch.float64, [])
    remembered = call(metadynamics._READ_LAST, torch.float32, [1])
    mode1 = float(cvModule.modes(positions)[1])
    assert remembered == pytest.approx(mode1, rel=1e-6) and evaluated == pytest.approx(mode1, rel=1e-12)
    assert math.isnan(call(metadynamics._READ_LAST, torch.float32, [1]))


def test_a_cv_that_returns_nan_stops_the_run_before_a_hill_poisons_the_grid():
    system = openmm.System()
    system.addParticle(1.0)
    meta = LatentMetadynamics(system, XCoordinate(scale=math.nan), [(-1.0, 1.0)], 0.1, TEMPERATURE, BIAS_FACTOR, 1.0,
                              5)
    simulation = app.Simulation(app.Topology(), system, openmm.VerletIntegrator(0.001),
                                openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions([[0.1, 0.0, 0.0]])
    with pytest.raises(RuntimeError, match="non-finite modes"):
        meta.step(simulation, 5)
    assert len(meta.getHills()[1]) == 0 and np.all(np.isfinite(meta.getFreeEnergy()._value))


class XCoordinate(torch.nn.Module):
    """The x coordinate of particle 0 (nm), times ``scale``, as a one-mode CV module."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.num_modes = 1
        self.num_atoms_required = 1
        self.scale = scale

    def forward(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor] = None) -> torch.Tensor:
        return positions[0, 0:1] * self.scale


def test_free_energy_of_a_double_well_is_recovered():
    barrier, minimum = 10.0, 0.3
    system = openmm.System()
    system.addParticle(1.0)
    potential = openmm.CustomExternalForce(f"{barrier}*((x/{minimum})^2-1)^2 + 500*(y^2+z^2)")
    potential.addParticle(0, [])
    system.addForce(potential)
    meta = LatentMetadynamics(system, XCoordinate(), [(-0.6, 0.6)], 0.04, TEMPERATURE, BIAS_FACTOR, 1.0, 10)
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 10.0, 0.002)
    integrator.setRandomNumberSeed(1)
    simulation = app.Simulation(app.Topology(), system, integrator, openmm.Platform.getPlatformByName("Reference"))
    simulation.context.setPositions([[-minimum, 0.0, 0.0]])
    # Over seeds 1-8 the barrier read 10.5 ± 2 kJ/mol after 8000 steps and 10.5 ± 0.75 after 24 000.
    meta.step(simulation, 24000)
    x = meta.getGridPoints()[0]
    fes = meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole)
    wells = np.abs(x) < 0.4
    error = (fes - barrier * ((x / minimum) ** 2 - 1) ** 2)[wells]
    assert np.sqrt(np.mean((error - error.mean()) ** 2)) < 2.0
    assert fes[np.argmin(np.abs(x))] - fes[wells].min() == pytest.approx(barrier, abs=2.5)


def test_branch_free_mode_gives_the_same_bias(ala2):
    energies, hills = [], []
    for cudaGraphs in (False, True):
        system = freshSystem(ala2)
        meta = makeMeta(system, cudaGraphs=cudaGraphs)
        # Branch-free hills sit at the current modes; give the other run the same centres.
        meta._readouts = lambda context, lastEvaluation=False, meta=meta: LatentMetadynamics._readouts(meta, context)
        simulation = makeSimulation(ala2, system, integrator=openmm.VerletIntegrator(0.001 * unit.picoseconds))
        meta.step(simulation, 30)
        energies.append(biasEnergy(simulation.context, meta)[0])
        hills.append(meta.getHills()[0])
    np.testing.assert_allclose(hills[0], hills[1], rtol=1e-12)
    assert energies[0] == pytest.approx(energies[1], rel=1e-10)



def test_a_mode_at_the_lower_end_of_the_range_reads_the_first_cell():
    """At s = low, the cell coordinate of this grid rounds to −7e-15; its cell must be 0, not −1, which wrapped
    to the last node (here made huge so that its tiny weight shows)."""
    grid = metadynamics.HermiteBiasGrid([-5.0], [-1.3], [31], [0.3])
    assert float(grid.cellOrigin - 5.0 * grid.inverseSpacing) < 0.0
    grid.values[:, -1] = 1e12
    bias, total, gradient = grid.evaluate(torch.tensor([[-5.0], [-5.5]], dtype=torch.float64))
    assert bias.tolist() == [0.0, 0.0] and gradient.tolist() == [[0.0], [0.0]]


@pytest.mark.parametrize("numModes", [1, 2, 3])
def test_every_hill_update_writes_the_truncated_gaussian_and_its_derivatives(numModes):
    """The module's windowed and fixed-shape updates and the driver's dense rebuild, hills inside, at and off edges."""
    lows, highs, sizes = [-1.0, -0.5, 0.0][:numModes], [1.0, 1.5, 0.8][:numModes], [21, 17, 13][:numModes]
    widths = [0.15, 0.3, 0.1][:numModes]
    rng = np.random.default_rng(numModes)
    centres = np.concatenate([rng.uniform(lows, highs, (4, numModes)), np.array([lows]) - 0.05,
                              np.array([highs]) + 0.3, np.array([highs]) + 5.0])
    heights = rng.uniform(0.5, 2.0, len(centres))
    grids = [torch.jit.script(metadynamics.HermiteBiasGrid(lows, highs, sizes, widths)) for _ in range(2)]
    for centre, height in zip(torch.as_tensor(centres), torch.as_tensor(heights)):
        grids[0].deposit(centre, height)
        grids[1].depositFixedShape(centre, height)
    dense = metadynamics.HermiteBiasGrid(lows, highs, sizes, widths)
    metadynamics._depositDense(dense, centres, heights)
    for grid in grids:  # the same factors, multiplied in another order
        np.testing.assert_allclose(grid.values.numpy(), dense.values.numpy(), rtol=1e-13, atol=1e-13)

    nodes = np.stack(np.meshgrid(*[np.linspace(lo, hi, n) for lo, hi, n in zip(lows, highs, sizes)],
                                 indexing="ij"), -1).reshape(-1, numModes)
    spacings = (np.array(highs) - np.array(lows)) / (np.array(sizes) - 1)
    halfWindows = np.ceil(metadynamics.HILL_CUTOFF * np.array(widths) / spacings)
    nearest = np.round((centres - lows) / spacings)
    indices = np.round((nodes - lows) / spacings)
    inside = np.all(np.abs(indices[:, None, :] - nearest[None, :, :]) <= halfWindows, -1)
    z = (nodes[:, None, :] - centres[None, :, :]) / np.array(widths)
    gaussians = heights * np.exp(-0.5 * (z ** 2).sum(-1)) * inside
    slopes = -z / np.array(widths)
    for channel in range(2 ** numModes):
        expected = gaussians.copy()
        for k in range(numModes):
            if (channel >> k) & 1:
                expected *= slopes[..., k]
        np.testing.assert_allclose(dense.values[channel].numpy(), expected.sum(-1),
                                   rtol=1e-12, atol=1e-12)

def test_bias_group_works_with_multiple_time_stepping(ala2):
    system = freshSystem(ala2)
    others = {force.getForceGroup() for force in system.getForces()}
    meta = makeMeta(system, frequency=5)
    assert meta.forceGroup not in others
    integrator = mtsLangevinIntegrator(system, meta.forceGroup, 2, TEMPERATURE * unit.kelvin, 5 / unit.picosecond,
                                       0.002 * unit.picoseconds)
    assert integrator.getStepSize() == 0.004 * unit.picoseconds
    simulation = makeSimulation(ala2, system, integrator=integrator)
    meta.step(simulation, 20)
    assert len(meta.getHills()[1]) == 4


def test_box_vectors_reach_the_module_of_a_periodic_system(ala2):
    """The same hills on a box-independent CV whether or not the force is periodic; and with a CV that reads the
    box, the modes follow the Context's box."""
    energies = []
    for periodic in (False, True):
        system = freshSystem(ala2)
        system.setDefaultPeriodicBoxVectors(*(3.0 * np.eye(3)) * unit.nanometer)
        meta = makeMeta(system, periodic=periodic)
        assert meta.force.usesPeriodicBoundaryConditions() == periodic
        simulation = makeSimulation(ala2, system, integrator=openmm.VerletIntegrator(0.001 * unit.picoseconds))
        meta.step(simulation, 20)
        energies.append(biasEnergy(simulation.context, meta)[0])
    assert energies[1] == pytest.approx(energies[0], rel=1e-10)
    system = freshSystem(ala2)
    system.setDefaultPeriodicBoxVectors(*(3.0 * np.eye(3)) * unit.nanometer)
    meta = LatentMetadynamics(system, BoxShiftedModes(CV_ATOMS, num_modes=2), [(-3.0, 3.0)] * 2, 0.4, TEMPERATURE,
                              BIAS_FACTOR, 3.0, 5, periodic=True)
    simulation = makeSimulation(ala2, system)
    shifted = meta.getCollectiveVariables(simulation)
    simulation.context.setPeriodicBoxVectors(*(3.5 * np.eye(3)) * unit.nanometer)
    np.testing.assert_allclose(meta.getCollectiveVariables(simulation) - shifted, 0.05, rtol=1e-6)


def test_a_periodic_system_without_box_vectors_for_the_cv_gets_a_warning(ala2):
    system = freshSystem(ala2)
    wrapped = openmm.CustomBondForce("0")
    wrapped.setUsesPeriodicBoundaryConditions(True)
    system.addForce(wrapped)
    with pytest.warns(UserWarning, match="periodic boundary conditions but LatentMetadynamics was given "
                                         "periodic=False"):
        makeMeta(system)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        makeMeta(freshSystem(ala2), periodic=False)  # not periodic: nothing to warn about


# ---------------------------------------------------------------------------------------------------------------
# Restart and platforms
# ---------------------------------------------------------------------------------------------------------------

def test_a_run_restarted_from_a_bias_and_a_state_of_the_same_step_continues_the_uninterrupted_one(ala2, tmp_path):
    """Save the bias and the Context's State at one step, rebuild everything, load both: the next hills and the
    trajectory are those of the run that never stopped (Verlet on Reference is deterministic)."""
    def run(steps):
        system = freshSystem(ala2)
        meta = makeMeta(system)
        simulation = makeSimulation(ala2, system, integrator=openmm.VerletIntegrator(0.001 * unit.picoseconds))
        meta.step(simulation, steps)
        return system, meta, simulation

    _, uninterrupted, simulation = run(40)
    _, first, firstSimulation = run(20)
    first.saveBias(str(tmp_path / "bias.npz"))
    state = firstSimulation.context.getState(getPositions=True, getVelocities=True, getParameters=True)
    system = freshSystem(ala2)
    restarted = makeMeta(system)
    restarted.loadBias(str(tmp_path / "bias.npz"))
    resumed = makeSimulation(ala2, system, integrator=openmm.VerletIntegrator(0.001 * unit.picoseconds))
    resumed.context.setState(state)
    resumed.currentStep = firstSimulation.currentStep
    restarted.step(resumed, 20)
    np.testing.assert_allclose(restarted.getHills()[0], uninterrupted.getHills()[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(restarted.getHills()[1].value_in_unit(unit.kilojoule_per_mole),
                               uninterrupted.getHills()[1].value_in_unit(unit.kilojoule_per_mole), rtol=1e-9)
    positions = [s.context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
                 for s in (resumed, simulation)]
    np.testing.assert_allclose(positions[0], positions[1], rtol=0, atol=1e-9)


def test_save_and_load_restart_with_an_identical_bias(ala2, tmp_path):
    system = freshSystem(ala2)
    meta = makeMeta(system, biasDir=str(tmp_path / "bias"), saveFrequency=20)
    simulation = makeSimulation(ala2, system)
    meta.step(simulation, 60)
    assert os.path.exists(tmp_path / "bias" / "bias.npz")
    path = str(tmp_path / "restart.npz")
    meta.saveBias(path)

    restartedSystem = freshSystem(ala2)
    restarted = makeMeta(restartedSystem)
    restarted.loadBias(path)
    assert restartedSystem.getNumForces() == system.getNumForces()
    restartedSimulation = makeSimulation(ala2, restartedSystem)
    rng = np.random.default_rng(2)
    for _ in range(4):
        positions = perturbedPositions(ala2, rng)
        before, forcesBefore = biasEnergy(simulation.context, meta, positions)
        after, forcesAfter = biasEnergy(restartedSimulation.context, restarted, positions)
        assert after == pytest.approx(before, rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(forcesAfter, forcesBefore, rtol=1e-10, atol=1e-10)
    points = np.random.default_rng(3).uniform(-3, 3, (20, 2))
    np.testing.assert_array_equal(restarted.getBias(points), meta.getBias(points))
    np.testing.assert_array_equal(restarted.getHills()[0], meta.getHills()[0])
    for key, value in meta.getTimeSeries().items():
        np.testing.assert_array_equal(restarted.getTimeSeries()[key], value)
    restarted.step(restartedSimulation, 5)
    assert len(restarted.getHills()[1]) == 13


def test_a_bias_loaded_into_a_running_simulation_takes_effect_after_reinitialize(ala2, depositedRun, tmp_path):
    meta, simulation, path = savedBias(depositedRun, tmp_path)
    system = freshSystem(ala2)
    running = makeMeta(system)
    runningSimulation = makeSimulation(ala2, system)
    running.step(runningSimulation, 10)
    running.loadBias(path)
    with pytest.raises(RuntimeError, match="reinitialize it"):
        running.step(runningSimulation, 5)  # the Context still holds the force loadBias replaced
    runningSimulation.context.reinitialize(preserveState=True)
    positions = perturbedPositions(ala2, np.random.default_rng(4))
    assert biasEnergy(runningSimulation.context, running, positions)[0] == pytest.approx(
        biasEnergy(simulation.context, meta, positions)[0], rel=1e-12)
    running.step(runningSimulation, 5)
    assert len(running.getHills()[1]) == 17


def test_a_smaller_bias_loaded_into_a_running_simulation_adds_no_stale_hill(ala2, tmp_path):
    """The running Context announced more hills than the file holds; it keeps that hill id through reinitialize(),
    and the new grid must not take it for a hill of its own. A checkpoint saved with a later bias then restarts
    the run in a fresh System exactly (Verlet on Reference is deterministic)."""
    def verletSimulation(system):
        return makeSimulation(ala2, system, integrator=openmm.VerletIntegrator(0.001 * unit.picoseconds))

    system = freshSystem(ala2)
    meta = makeMeta(system)
    simulation = verletSimulation(system)
    meta.step(simulation, 15)
    early, later = str(tmp_path / "early.npz"), str(tmp_path / "later.npz")
    meta.saveBias(early)
    meta.step(simulation, 20)  # 7 hills in the Context
    meta.loadBias(early)  # 3 hills
    simulation.context.reinitialize(preserveState=True)
    positions = perturbedPositions(ala2, np.random.default_rng(5))
    expected = biasEnergy(makeSimulation(ala2, system).context, meta, positions)[0]  # a Context made after loading
    assert biasEnergy(simulation.context, meta, positions)[0] == pytest.approx(expected, rel=1e-12)
    meta.step(simulation, 10)
    assert len(meta.getHills()[1]) == 5
    meta.saveBias(later)
    checkpoint = simulation.context.createCheckpoint()
    restartedSystem = freshSystem(ala2)
    restarted = makeMeta(restartedSystem)
    restarted.loadBias(later)
    resumed = verletSimulation(restartedSystem)
    resumed.context.loadCheckpoint(checkpoint)
    resumed.currentStep = simulation.currentStep
    restarted.step(resumed, 10)
    meta.step(simulation, 10)
    np.testing.assert_allclose(restarted.getHills()[0], meta.getHills()[0], rtol=1e-9, atol=1e-12)


def test_a_context_without_the_hills_is_refused(ala2, depositedRun):
    meta, simulation = depositedRun
    stale = app.Simulation(ala2.topology, simulation.system, openmm.VerletIntegrator(0.001),
                           openmm.Platform.getPlatformByName("Reference"))
    stale.context.setPositions(ala2.positions)
    with pytest.raises(RuntimeError, match="holds 0 hills"):
        meta.step(stale, 5)


@pytest.mark.parametrize("cudaGraphs", [False, True], ids=["windowed", "branch-free"])
def test_a_reinitialized_context_that_lost_hills_is_refused(ala2, cudaGraphs):
    """reinitialize() rebuilds the grid from the force (no hills) but keeps the last hill id: the grid then takes
    that one hill back. Counting absorbed hills, not ids, tells the grid lost the others."""
    system = freshSystem(ala2)
    meta = makeMeta(system, cudaGraphs=cudaGraphs)
    simulation = makeSimulation(ala2, system)
    meta.step(simulation, 20)
    simulation.context.reinitialize(preserveState=True)
    with pytest.raises(RuntimeError, match="holds 1 hills but this LatentMetadynamics deposited 4"):
        meta.step(simulation, 5)


def test_loading_a_bias_with_other_settings_is_refused(ala2, depositedRun, tmp_path):
    meta, _ = depositedRun
    path = str(tmp_path / "bias.npz")
    meta.saveBias(path)
    other = LatentMetadynamics(freshSystem(ala2), StandInModes(CV_ATOMS, num_modes=2), [(-3.0, 3.0)] * 2, 0.4,
                               TEMPERATURE, BIAS_FACTOR + 1, 3.0, 5)
    with pytest.raises(ValueError, match="biasFactor"):
        other.loadBias(path)


def test_reference_and_cpu_energies_agree(ala2, depositedRun, tmp_path):
    meta, simulation, path = savedBias(depositedRun, tmp_path)
    cpuSystem = freshSystem(ala2)
    onCpu = makeMeta(cpuSystem)
    onCpu.loadBias(path)
    cpuSimulation = makeSimulation(ala2, cpuSystem, platform="CPU")
    rng = np.random.default_rng(4)
    for _ in range(4):
        positions = perturbedPositions(ala2, rng)
        reference, referenceForces = biasEnergy(simulation.context, meta, positions)
        cpu, cpuForces = biasEnergy(cpuSimulation.context, onCpu, positions)
        assert cpu == pytest.approx(reference, rel=1e-4, abs=1e-4)
        np.testing.assert_allclose(cpuForces, referenceForces, atol=1e-3 * np.abs(referenceForces).max() + 1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Input checks, documentation, benchmark
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("numModes, arguments, message", [
    (2, dict(ranges=[(-3.0, 3.0)]), "ranges needs one"),
    (2, dict(widths=[0.3, 0.3, 0.3]), "widths needs one"),
    (2, dict(widths=[0.3, 0.0]), "width must be positive"),
    (2, dict(widths=-0.1), "width must be positive"),
    (4, dict(), "1 to 3 modes"),
    (2, dict(ranges=[(1.0, -1.0), (-3.0, 3.0)]), "lo < hi"),
    (2, dict(biasFactor=1.0), "biasFactor"),
    (2, dict(biasFactor=math.inf), "biasFactor"),
    (2, dict(temperature=0.0), "temperature must be positive"),
    (2, dict(height=-1.0), "height must not be negative"),
    (1, dict(ranges=(-3.0, 3.0)), r"e.g. \[\(-3, 3\)\] for one mode"),
    (2, dict(frequency=2.5), "frequency must be a positive integer"),
    (2, dict(frequency=True), "frequency must be a positive integer"),
    (2, dict(gridWidth=[1, 30]), "at least 2 nodes"),
    (2, dict(biasDir="unused", saveFrequency=7), "multiple of frequency"),
    (2, dict(biasDir="unused"), "together"),
    (2, dict(modes=[0, 2]), "distinct indices"),
])
def test_bad_input_is_refused_clearly(ala2, numModes, arguments, message):
    settings = dict(ranges=[(-3.0, 3.0)] * min(numModes, 3), widths=0.3, temperature=TEMPERATURE,
                    biasFactor=BIAS_FACTOR, height=1.0, frequency=5)
    settings.update(arguments)
    with pytest.raises(ValueError, match=message):
        LatentMetadynamics(freshSystem(ala2), StandInModes(CV_ATOMS, num_modes=numModes), **settings)


def test_bad_step_counts_and_bias_points_are_refused(ala2, depositedRun):
    meta, simulation = depositedRun
    for steps in (-1, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 0"):
            meta.step(simulation, steps)
    with pytest.raises(ValueError, match=r"shape \(M, 2\) or \(2,\)"):
        meta.getBias([0.1, 0.2, 0.3])


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(depositedRun, tmp_path, monkeypatch):
    meta, _ = depositedRun
    path = tmp_path / "bias.npz"
    meta.saveBias(str(path))
    assert path.stat().st_mode & 0o777 == 0o644
    saved = path.read_bytes()

    def failingSave(file, **contents):
        file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failingSave)
    with pytest.raises(OSError, match="disk full"):
        meta.saveBias(str(path))
    assert path.read_bytes() == saved and sorted(p.name for p in tmp_path.iterdir()) == ["bias.npz"]


def test_a_subset_of_modes_can_be_biased(ala2):
    system = freshSystem(ala2)
    meta = LatentMetadynamics(system, StandInModes(CV_ATOMS, num_modes=4), [(-3.0, 3.0)], 0.3, TEMPERATURE,
                              BIAS_FACTOR, 1.0, 5, modes=[2])
    simulation = makeSimulation(ala2, system)
    meta.step(simulation, 10)
    assert meta.getHills()[0].shape == (2, 1)


def test_one_metadynamics_force_per_system(ala2):
    system = freshSystem(ala2)
    makeMeta(system)
    with pytest.raises(ValueError, match="one per System"):
        makeMeta(system)
    with pytest.raises(ValueError, match="one per System"):  # its TorchForce, renamed by XmlSerializer
        makeMeta(openmm.XmlSerializer.clone(system))


def test_docstring_examples_run():
    failures, _ = doctest.testmod(metadynamics, optionflags=doctest.ELLIPSIS)
    assert failures == 0


@pytest.mark.parametrize("cv", ["stand-in", "models/alanine_dipeptide.pt"])
def test_quick_hill_cost_benchmark_runs(tmp_path, cv):
    output = tmp_path / "hill_cost.json"
    script = os.path.join(REPOSITORY, "benchmarks", "hill_cost.py")
    model = [] if cv == "stand-in" else ["--model", cv]
    completed = subprocess.run([sys.executable, script, "--quick", "--json", str(output)] + model,
                               capture_output=True, text=True, timeout=120, cwd=REPOSITORY)
    assert completed.returncode == 0, completed.stderr
    result = json.loads(output.read_text())
    assert result["cv"] == cv and [row["modes"] for row in result["cases"]] == [1, 2]
    assert all(math.isfinite(row["latent_ms"]) and row["app_metadynamics_ms"] > 0 for row in result["cases"])
