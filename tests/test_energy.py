"""Variational training from an OpenMM System: the energy as an autograd function (gradient = −forces, finite
differences), refusal of constraints and partial frames, analytic frequencies and free energy of a harmonic well,
and a short run on alanine dipeptide."""
import doctest
import math

import numpy as np
import openmm
import openmm.unit as unit
import pytest
import torch

from nct_openmm import energy as energy_module
from nct_openmm.core import FlowConfig, free_energy_estimate
from nct_openmm.energy import (OpenMMEnergy, fit_variational_openmm, harmonic_flow, harmonic_free_energy,
                               reduced_hamiltonian)
from nct_openmm.geometry import InternalFrame
from nct_openmm.slowmodes import SlowModeModel
from nct_openmm.systems import _openmmtoolsTestsystems, availablePlatforms, builtinSystem

WELL_MASSES = (2.0, 8.0, 16.0)  # amu
WELL_K = 36.0  # kJ/mol/nm²: ω = sqrt(k/m) = 4.24, 2.12, 1.5 /ps, each three-fold degenerate
WELL_CENTRES = np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.5, 0.2]])


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Small flows on 2 shared cores: torch's intra-op threads only spin against OpenMM and each other.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ala2():
    """Alanine dipeptide in vacuum without constraints (22 atoms, flexible X–H bonds)."""
    return _openmmtoolsTestsystems().AlanineDipeptideVacuum(constraints=None)


def harmonic_well():
    """Three particles of different masses, each in its own isotropic well: 9 modes, ω = sqrt(k/m)."""
    system = openmm.System()
    well = openmm.CustomExternalForce("0.5*k*((x-x0)^2+(y-y0)^2+(z-z0)^2)")
    for name in ("k", "x0", "y0", "z0"):
        well.addPerParticleParameter(name)
    for i, mass in enumerate(WELL_MASSES):
        system.addParticle(mass)
        well.addParticle(i, [WELL_K, *WELL_CENTRES[i]])
    system.addForce(well)
    return system


def well_frequencies():
    return np.sort(np.repeat([math.sqrt(WELL_K / m) for m in WELL_MASSES], 3))


def perturbed(positions, batch, scale=0.01, seed=0):
    x = torch.as_tensor(positions.value_in_unit(unit.nanometer), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    return x[None] + scale * torch.randn((batch,) + x.shape, generator=generator, dtype=torch.float64)


# --- (a) the autograd function ---------------------------------------------------------------------------------
PLATFORMS = [name for name in ("Reference", "CPU") if name in availablePlatforms()]
FORCE_TOLERANCE = {"Reference": 1e-12, "CPU": 1e-6}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gradient_is_minus_forces(ala2, platform):
    energy = OpenMMEnergy(ala2.system, platform, threads=1 if platform == "CPU" else None)
    x = perturbed(ala2.positions, 3).requires_grad_(True)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    (energy(x) * weights).sum().backward()
    # Independent evaluation through the public, unit-wrapped State API on a fresh Context.
    context = openmm.Context(ala2.system, openmm.VerletIntegrator(0.001), energy.platform)
    for i in range(3):
        context.setPositions(x[i].detach().numpy())
        state = context.getState(getEnergy=True, getForces=True)
        forces = torch.as_tensor(state.getForces(asNumpy=True).value_in_unit(
            unit.kilojoule_per_mole / unit.nanometer))
        scale = float(forces.abs().max())
        assert torch.allclose(x.grad[i], -weights[i] * forces, rtol=0, atol=FORCE_TOLERANCE[platform] * scale)
        assert math.isclose(float(energy(x[i].detach())),
                            state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole), rel_tol=1e-12)


def test_gradient_matches_finite_differences(ala2):
    energy = OpenMMEnergy(ala2.system)  # Reference: double precision throughout
    x = perturbed(ala2.positions, 2, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda positions: energy(positions), (x,), eps=1e-6, atol=1e-5, rtol=1e-5)


def test_energy_dtype_shapes_and_counters(ala2):
    energy = OpenMMEnergy(ala2.system)
    x = perturbed(ala2.positions, 4)
    assert energy(x.float()).dtype == torch.float32
    assert energy(x[0]).shape == ()
    assert energy.evaluationCount == 5 and energy.microsecondsPerSample > 0


def test_non_finite_energy_names_the_sample(ala2):
    energy = OpenMMEnergy(ala2.system)
    x = perturbed(ala2.positions, 3)
    x[1, 5] = x[1, 4]  # two atoms on top of each other
    with pytest.raises(FloatingPointError, match="sample 1 of the batch"):
        energy(x)
    x = perturbed(ala2.positions, 3)
    x[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="sample 2 of the batch has non-finite positions"):
        energy(x)


# --- (b) constraints, (c) partial frames -----------------------------------------------------------------------
def test_constrained_system_is_refused_with_the_fix():
    constrained = builtinSystem("ala2-vacuum")  # HBonds
    with pytest.raises(ValueError, match=r"12 constraints.*omits the bond terms.*constraints=None"):
        OpenMMEnergy(constrained.system)
    with pytest.raises(ValueError, match="constraints=None"):
        fit_variational_openmm(constrained.system, constrained.topology, constrained.positions, 300.0, steps=1)


def test_frame_without_all_atoms_is_refused(ala2):
    energy = OpenMMEnergy(ala2.system)
    heavy = [atom.index for atom in ala2.topology.atoms() if atom.element.symbol != "H"]
    masses = torch.tensor([ala2.system.getParticleMass(i).value_in_unit(unit.dalton) for i in heavy])
    reference = torch.as_tensor(ala2.positions.value_in_unit(unit.nanometer))[heavy]
    frame = InternalFrame(heavy, masses, reference, kT=2.494)
    with pytest.raises(ValueError, match=r"every particle of the System.*selects 10 atoms of 22.*missing e\.g\."):
        reduced_hamiltonian(frame, energy)


def test_frame_in_another_atom_order_evaluates_the_same_energy(ala2):
    energy = OpenMMEnergy(ala2.system)
    x = perturbed(ala2.positions, 2)
    masses = torch.tensor([ala2.system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(22)])
    order = list(reversed(range(22)))
    frame = InternalFrame(order, masses[order], x[0, order], kT=2.494, align=False)
    hamiltonian = reduced_hamiltonian(frame, energy, energy_offset=10.0)
    u = frame.internal(x[:, order])
    assert torch.allclose(hamiltonian.potential(u), (energy(x) - 10.0) / 2.494, rtol=1e-10, atol=0)


# --- (d) analytic harmonic well ----------------------------------------------------------------------------------
def test_hessian_initialisation_is_the_exact_harmonic_model():
    model = fit_variational_openmm(harmonic_well(), None, WELL_CENTRES + 0.01, 300.0,
                                   dict(n_couplings=2, hidden=8), align=False, steps=0, eval_batch=256,
                                   progress=False)
    summary = model.metadata["training"]
    assert np.allclose(model.frequencies, well_frequencies(), rtol=1e-5)
    analytic = harmonic_free_energy(well_frequencies())
    assert math.isclose(summary["harmonic_free_energy"], analytic, abs_tol=1e-5)
    assert math.isclose(summary["free_energy"], analytic, abs_tol=1e-4)
    assert summary["free_energy_standard_error"] < 1e-5 and summary["effective_sample_fraction"] > 0.999


def test_variational_training_recovers_analytic_frequencies_and_free_energy():
    # From a start that knows nothing of U (ω = 1, identity flow): the force field alone must teach the spectrum.
    model = fit_variational_openmm(harmonic_well(), None, WELL_CENTRES, 300.0, dict(n_couplings=2, hidden=16),
                                   align=False, init="unit", minimize=False, steps=400, batch_size=64, lr=1e-2,
                                   eval_every=50, eval_batch=512, progress=False)
    summary = model.metadata["training"]
    analytic = harmonic_free_energy(well_frequencies())
    relative_error = model.frequencies / well_frequencies() - 1
    print(f"ω/analytic − 1: {np.round(relative_error, 4).tolist()}; F = {summary['free_energy']:.4f} ± "
          f"{summary['free_energy_standard_error']:.4f} (start {summary['initial_free_energy']:.2f}), "
          f"−ln Z = {analytic:.4f}, IS {summary['importance_sampled_free_energy']:.4f}, "
          f"ESS {summary['effective_sample_fraction']:.3f}")
    assert np.all(np.abs(relative_error) < 0.03)
    assert summary["initial_free_energy"] > analytic + 10
    # An upper bound that has closed in on −ln Z (to MC error), and an importance-sampled estimate on it.
    assert -4 * summary["free_energy_standard_error"] < summary["gap_to_harmonic"] < 0.01
    assert abs(summary["importance_sampled_free_energy"] - analytic) < 0.01


# --- (e) alanine dipeptide -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gradient", ["path", "reparameterization"])
def test_short_variational_run_on_alanine_dipeptide_lowers_the_free_energy(ala2, tmp_path, gradient):
    model = fit_variational_openmm(ala2.system, ala2.topology, ala2.positions, 300.0,
                                   FlowConfig(dim=60, n_couplings=2, hidden=16), steps=30, batch_size=32,
                                   eval_batch=256, gradient=gradient, progress=False,
                                   checkpoint=str(tmp_path / "ckpt.pt"))
    summary = model.metadata["training"]
    print({k: summary[k] for k in ("initial_free_energy", "best_monitored_free_energy", "free_energy",
                                   "harmonic_free_energy", "microseconds_per_energy", "energy_evaluations")})
    assert model.n_modes == 60 and summary["method"] == "variational (OpenMM energy)"
    assert summary["gradient"] == gradient and summary["particles"] == 22
    assert summary["steps"] == 30 and summary["floored_harmonic_modes"] == 0
    # Same latent samples before and after: training lowered the bound it minimises.
    assert summary["best_monitored_free_energy"] < summary["initial_free_energy"] - 1.0
    assert summary["free_energy"] < summary["initial_free_energy"]
    path = tmp_path / "ala2-variational.nct"
    model.save(path)
    loaded = SlowModeModel.load(path)
    assert loaded.metadata["training"]["method"] == "variational (OpenMM energy)"
    assert np.allclose(loaded.frequencies, model.frequencies)


def test_flow_config_of_the_wrong_size_is_refused(ala2):
    with pytest.raises(ValueError, match=r"dim=66.*60 internal coordinates"):
        fit_variational_openmm(ala2.system, ala2.topology, ala2.positions, 300.0, FlowConfig(dim=66), steps=1)


def test_harmonic_flow_floors_a_saddle_with_a_warning():
    hessian = torch.diag(torch.tensor([-4.0, 1.0, 9.0], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="1 Hessian eigenvalues.*1 of them not positive"):
        flow, omega, floored = harmonic_flow(FlowConfig(dim=3, n_couplings=2, hidden=4), torch.zeros(3), hessian,
                                             min_frequency=0.5)
    assert floored == 1 and omega.tolist() == [0.5, 1.0, 3.0]
    assert torch.allclose(flow.frequencies().double(), omega)


def test_free_energy_estimate_of_an_exact_flow():
    from nct_openmm.core import NCTModel

    omega = torch.tensor([0.5, 2.0])
    flow = NCTModel(FlowConfig(dim=2, n_couplings=2, hidden=4), frequencies=omega)
    hamiltonian = lambda q, p: 0.5 * (p ** 2).sum(-1) + 0.5 * ((omega * q) ** 2).sum(-1)
    estimate = free_energy_estimate(flow, hamiltonian, n=1000)
    assert math.isclose(estimate["variational"], harmonic_free_energy(omega), abs_tol=1e-5)
    assert math.isclose(estimate["importance_sampled"], harmonic_free_energy(omega), abs_tol=1e-5)


def test_docstring_examples():
    failures, _ = doctest.testmod(energy_module, optionflags=doctest.ELLIPSIS)
    assert failures == 0
