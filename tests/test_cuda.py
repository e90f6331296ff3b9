"""CUDA platform checks: the shipped model's CV, the latent bias and metadynamics on CUDA against Reference, with and
without CUDA graphs. Every test skips where OpenMM has no working CUDA platform (CI and the development machine);
they run on a GPU machine (``benchmarks/device_check.sh``).

Tolerances: CUDA runs the CV model in float32 (mixed precision hands TorchForce float32 positions), Reference in
float64; the float32 export agrees with the float64 model to about 1e-5 relative on data frames.
"""
import os
import sys

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cv_standin import StandInModes  # noqa: E402
from molecular_fixtures import phi_turned  # noqa: E402
from nct_openmm.backend import createTorchForce  # noqa: E402
from nct_openmm.enhanced import SlowModeMetadynamicsSettings, runSlowModeMetadynamics  # noqa: E402
from nct_openmm.export import slow_mode_module, student_module  # noqa: E402
from nct_openmm.forces import LatentBiasForce, SlowModeCV  # noqa: E402
from nct_openmm.metadynamics import LatentMetadynamics  # noqa: E402
from nct_openmm.slowmodes import SlowModeModel  # noqa: E402
from nct_openmm.systems import builtinSystem, platformProperties  # noqa: E402

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_MODEL = os.path.join(REPOSITORY, "models", "alanine_dipeptide.pt")
TEMPERATURE = 300.0


def cudaOrSkip():
    try:
        platform = openmm.Platform.getPlatformByName("CUDA")
        system = openmm.System()
        system.addParticle(1.0)
        openmm.Context(system, openmm.VerletIntegrator(0.001), platform)
    except Exception as error:  # no plugin, no driver or no device: nothing to test here
        pytest.skip(f"CUDA platform unavailable: {error}")
    return platform


@pytest.fixture(scope="module")
def ala2():
    return builtinSystem("ala2-vacuum")


@pytest.fixture(scope="module")
def shippedModel():
    return SlowModeModel.load(SHIPPED_MODEL)


def context(system, positions, platformName):
    platform = cudaOrSkip() if platformName == "CUDA" else openmm.Platform.getPlatformByName(platformName)
    result = openmm.Context(system, openmm.VerletIntegrator(0.001), platform, platformProperties(platform))
    result.setPositions(positions)
    return result


def energyAndForces(ctx, groups=-1):
    state = ctx.getState(getEnergy=True, getForces=True, groups=groups)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def perturbed(ala2, seed, scale=0.01):
    positions = np.asarray(ala2.positions.value_in_unit(unit.nanometer))
    return positions + scale * np.random.default_rng(seed).standard_normal(positions.shape)


def assertAgree(cuda, reference, rtol):
    (energy, forces), (energyRef, forcesRef) = cuda, reference
    assert energy == pytest.approx(energyRef, rel=rtol, abs=rtol)
    np.testing.assert_allclose(forces, forcesRef, atol=rtol * np.abs(forcesRef).max() + 1e-6)


@pytest.mark.parametrize("kind", ["flow", "distance-student"])
@pytest.mark.parametrize("cudaGraphs", [False, True])
def test_shipped_model_cv_matches_reference(ala2, shippedModel, cudaGraphs, kind):
    cudaOrSkip()
    if kind == "flow":
        module = slow_mode_module(shippedModel, 2, torch.float32)
    else:  # its accuracy does not matter here, only that CUDA computes what Reference does
        module = student_module(shippedModel, 2, features="distances", steps=20, samples=1024, progress=False)[0]
    results = {}
    for platformName in ("Reference", "CUDA"):
        system = openmm.XmlSerializer.clone(ala2.system)
        force = SlowModeCV(module, 0, cudaGraphs=cudaGraphs and platformName == "CUDA")
        force.setForceGroup(5)
        system.addForce(force)
        ctx = context(system, perturbed(ala2, 0), platformName)
        results[platformName] = [energyAndForces(ctx, {5})]
        for seed in (1, 2):  # new positions must reach a captured graph
            ctx.setPositions(perturbed(ala2, seed))
            results[platformName].append(energyAndForces(ctx, {5}))
        # φ = 20° and 60°: the heavy atoms' alignment covariance has a negative determinant there, where the GPU's
        # SVD-free rotation once returned a reflection
        for positions in phi_turned(ala2, [200.0, 240.0]):
            ctx.setPositions(positions)
            results[platformName].append(energyAndForces(ctx, {5}))
    for cuda, reference in zip(results["CUDA"], results["Reference"]):
        assertAgree(cuda, reference, 1e-4)


@pytest.mark.parametrize("cudaGraphs", [False, True])
def test_latent_bias_restraint_and_readout_match_reference(ala2, shippedModel, cudaGraphs):
    module = slow_mode_module(shippedModel, 2, torch.float32)
    results, readouts = {}, {}
    for platformName in ("Reference", "CUDA"):
        system = openmm.XmlSerializer.clone(ala2.system)
        bias = LatentBiasForce(module, cudaGraphs=cudaGraphs and platformName == "CUDA")
        bias.addRestraint(0, 0.5, 20.0)
        bias.addWalls(1, -1.0, 1.0, 50.0)
        bias.addToSystem(system)
        group = {bias.getForce().getForceGroup()}
        ctx = context(system, perturbed(ala2, 3), platformName)
        results[platformName] = energyAndForces(ctx, group)
        bias.setRestraintCenter(ctx, 0, -0.5)  # a changed global parameter must reach the module
        results[platformName + "-moved"] = energyAndForces(ctx, group)
        readouts[platformName] = np.asarray(bias.getCollectiveVariables(ctx))
    assertAgree(results["CUDA"], results["Reference"], 1e-4)
    assertAgree(results["CUDA-moved"], results["Reference-moved"], 1e-4)
    np.testing.assert_allclose(readouts["CUDA"], readouts["Reference"], atol=1e-4)


@pytest.mark.parametrize("numModes", [1, 2, 3])
@pytest.mark.parametrize("cudaGraphs", [False, True])
def test_metadynamics_hills_arrive_and_match_reference(ala2, cudaGraphs, numModes, tmp_path):
    """Hills deposited on CUDA equal those of the driver, and the CUDA bias equals a Reference bias loaded from it,
    for every number of modes (the fixed-shape deposit of a captured graph orders its channels by mode)."""
    cv = StandInModes([1, 4, 6, 8, 14, 16], num_modes=numModes)
    ranges = [(-3.0, 3.0)] * numModes
    system = openmm.XmlSerializer.clone(ala2.system)
    meta = LatentMetadynamics(system, cv, ranges, 0.4, TEMPERATURE, 6.0, 3.0, 5, cudaGraphs=cudaGraphs)
    platform = cudaOrSkip()
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE, 5.0, 0.002)
    simulation = app.Simulation(ala2.topology, system, integrator, platform, platformProperties(platform))
    simulation.context.setPositions(ala2.positions)
    meta.step(simulation, 60)
    assert len(meta.getHills()[1]) == 12
    path = str(tmp_path / "bias.npz")
    meta.saveBias(path)
    referenceSystem = openmm.XmlSerializer.clone(ala2.system)
    reference = LatentMetadynamics(referenceSystem, cv, ranges, 0.4, TEMPERATURE, 6.0, 3.0, 5)
    reference.loadBias(path)
    referenceContext = context(referenceSystem, ala2.positions, "Reference")
    for seed in range(3):
        positions = perturbed(ala2, seed, 0.03)
        simulation.context.setPositions(positions)
        referenceContext.setPositions(positions)
        assertAgree(energyAndForces(simulation.context, {meta.forceGroup}),
                    energyAndForces(referenceContext, {reference.forceGroup}), 1e-4)


@pytest.mark.parametrize("naive, cudaGraphs", [(False, True), (False, False), (True, True)])
def test_the_metadynamics_protocol_captures_its_bias_in_a_cuda_graph_by_default(ala2, shippedModel, naive,
                                                                                cudaGraphs, tmp_path):
    cudaOrSkip()
    settings = SlowModeMetadynamicsSettings(frequency=20, biasStride=1 if naive else 4, cudaGraphs=cudaGraphs,
                                            naive=naive)
    summary = runSlowModeMetadynamics(shippedModel, ala2, str(tmp_path), 0.002, settings=settings, platform="CUDA",
                                      progress=False)
    assert summary["platform"] == "CUDA" and summary["cuda_graphs"] is cudaGraphs
    assert np.all(np.isfinite(np.loadtxt(tmp_path / "weights.txt")))  # the final bias at every frame
    if not naive:
        hills = np.loadtxt(tmp_path / "cv.txt")
        assert hills.shape == (50, 6) and np.all(np.isfinite(hills))


def test_global_parameter_changes_reach_a_cuda_graph():
    """A fact about the openmm-torch build: a changed global parameter reaches a module captured in a CUDA graph."""
    platform = cudaOrSkip()
    system = openmm.System()
    for _ in range(4):
        system.addParticle(1.0)
    system.addForce(createTorchForce(_ScaledSquares(), cudaGraphs=True, globalParameters={"scale": 1.0}))
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), platform, platformProperties(platform))
    positions = np.arange(12.0).reshape(4, 3) * 0.1
    ctx.setPositions(positions)
    energies = []
    for scale in (1.0, 2.0, 3.0):
        ctx.setParameter("scale", scale)
        energies.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    np.testing.assert_allclose(energies, np.array([1.0, 2.0, 3.0]) * np.sum(positions ** 2), rtol=1e-5)


class _ScaledSquares(torch.nn.Module):
    def forward(self, positions: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scale * (positions ** 2).sum()


def cudaDeviceOrSkip():
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch.device("cuda")


@pytest.mark.parametrize("cudaGraph", [False, True])
def test_likelihood_training_on_the_gpu_recovers_gaussian_frequencies(cudaGraph):
    """As the CPU test of the core: ω = 1/σ from ω = 1, on the GPU, eagerly and replayed from a CUDA graph."""
    from nct_openmm.core import FlowConfig, NCTModel, fit_likelihood

    device = cudaDeviceOrSkip()
    generator = torch.Generator().manual_seed(0)
    sigma = torch.tensor([2.0, 1.0, 0.5])
    q = (torch.randn(4096, 3, generator=generator) * sigma).to(device)
    model = NCTModel(FlowConfig(dim=3, n_couplings=2, hidden=16, linear_point=not cudaGraph)).to(device)
    weights = torch.ones(len(q))  # on the CPU: they follow the frames to the GPU
    history = fit_likelihood(model, q, weights=weights, max_steps=400, lr=3e-3, progress=False, cuda_graph=cudaGraph)
    assert len(history.val_loss) >= 20 and all(np.isfinite(history.train_loss))
    assert torch.allclose(model.frequencies().cpu(), torch.sort(1 / q.std(0)).values.cpu(), rtol=0.03)


def test_an_eager_checkpoint_resumes_replayed_from_a_cuda_graph(tmp_path):
    from nct_openmm.core import FlowConfig, NCTModel, fit_likelihood

    device = cudaDeviceOrSkip()
    q = torch.randn(1024, 3, generator=torch.Generator().manual_seed(1)).to(device) * 0.5
    config = FlowConfig(dim=3, n_couplings=2, hidden=16, linear_point=False)
    checkpoint = str(tmp_path / "checkpoint.pt")
    options = dict(lr=3e-3, checkpoint=checkpoint, progress=False)
    fit_likelihood(NCTModel(config).to(device), q, max_steps=40, **options)
    model = NCTModel(config).to(device)
    history = fit_likelihood(model, q, max_steps=300, cuda_graph=True, **options)
    resumed = history.step.index(40)
    assert history.step[-1] > 40 and all(np.isfinite(history.train_loss))
    assert min(history.val_loss[resumed + 1:]) < history.val_loss[resumed]
    assert torch.allclose(model.frequencies().cpu(), torch.full((3,), 2.0), rtol=0.1)


def test_variational_training_replayed_from_a_cuda_graph_finds_the_frequencies():
    from nct_openmm.core import FlowConfig, NCTModel, fit_variational

    device = cudaDeviceOrSkip()
    model = NCTModel(FlowConfig(dim=2, n_couplings=2, hidden=8, linear_point=False)).to(device)
    fit_variational(model, lambda q, p: 0.5 * (p ** 2).sum(-1) + 2.0 * (q ** 2).sum(-1), max_steps=300,
                    progress=False, cuda_graph=True)
    assert torch.allclose(model.frequencies().cpu(), torch.full((2,), 2.0), rtol=0.05)
