"""Tests of the distilled student (nct_openmm.core.distill, nct_openmm.export.StudentModule): it reproduces the
flow's slow modes and their gradients, on the flow's own configurations and on held-out MD frames, and keeps the
CV contract (rigid-motion invariance, TorchForce energies)."""
import copy
from types import SimpleNamespace

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from nct_openmm.core import FlowConfig, NCTModel
from nct_openmm.core.distill import fit_student
from nct_openmm.export import StudentModule, slow_mode_module, student_module
from nct_openmm.forces import SlowModeCV
from nct_openmm.geometry import InternalFrame, PairDistances
from nct_openmm.systems import builtinSystem


def _curved_flow(dim=4, seed=0):
    """A flow whose couplings do real (nonlinear) work: random output layers."""
    model = NCTModel(FlowConfig(dim=dim, n_couplings=4, hidden=16, seed=seed))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            if hasattr(layer, "net"):
                layer.net[-1].weight.copy_(0.3 * torch.randn(layer.net[-1].weight.shape, generator=generator))
    return model


def test_student_reproduces_a_curved_flow_and_its_gradient():
    teacher = _curved_flow()
    student, report = fit_student(teacher, modes=2, hidden=64, steps=1500, samples=16384, progress=False)
    assert report.value_rms_thermal < 0.04 and report.value_rms < 0.08
    assert report.gradient_relative < 0.2
    q = teacher.inverse_transform(teacher.prior.sample(2000, torch.Generator().manual_seed(9))[0])
    with torch.no_grad():
        error = student(q) - teacher.slow_modes(q, 2, scaled=True)
    assert float(error.pow(2).mean().sqrt()) < 0.04


def test_an_untrained_student_is_far_from_the_flow():
    """The report measures something: a student with almost no training is clearly worse."""
    _, report = fit_student(_curved_flow(), modes=2, hidden=64, steps=5, samples=4096, progress=False)
    assert report.value_rms_thermal > 0.1


def test_bad_settings_are_refused(ala2_model):
    with pytest.raises(ValueError, match="unknown student features 'angles'"):
        student_module(ala2_model.model, 2, features="angles", steps=1, samples=64, progress=False)
    unaligned = copy.deepcopy(ala2_model.model)
    unaligned.frame.align = False  # modes of atoms held in space: distances cannot represent them
    with pytest.raises(ValueError, match="needs a model trained with alignment"):
        student_module(unaligned, 2, features="distances", steps=1, samples=64, progress=False)
    pair = SimpleNamespace(frame=InternalFrame([0, 1], torch.ones(2), torch.eye(2, 3), kT=1.0))
    with pytest.raises(ValueError, match="reads 3 to 150 atoms .* this model has 2"):
        student_module(pair, 1, features="distances", steps=1, samples=64, progress=False)
    frame = ala2_model.model.frame
    shifted = InternalFrame([i + 1 for i in frame.atom_indices], frame.masses, frame.reference, frame.kT)
    student, _ = fit_student(ala2_model.model.flow, 2, steps=1, samples=64, progress=False,
                             features=PairDistances(shifted))
    with pytest.raises(ValueError, match="distances of other atoms"):
        StudentModule(ala2_model.model, student)
    with pytest.raises(ValueError, match="modes"):
        fit_student(_curved_flow(), modes=9, steps=1, samples=64, progress=False)
    with pytest.raises(ValueError, match="at least 1 step"):
        fit_student(_curved_flow(), modes=2, steps=0, samples=64, progress=False)


@pytest.fixture(scope="module", params=["internal", "distances"])
def studentCv(ala2_model, request):
    return student_module(ala2_model.model, 2, steps=1500, samples=16384, progress=False, features=request.param)


def test_student_cv_matches_the_flow_cv_on_held_out_md_frames(ala2_model, studentCv, ala2_run):
    """The issue's check: distilled against flow samples, compared on MD frames it never saw."""
    import mdtraj

    cv, report = studentCv
    flow = slow_mode_module(ala2_model.model, 2)
    frames = mdtraj.load(ala2_run.trajectory, top=ala2_run.topology).xyz[::5]
    with torch.no_grad():
        pairs = [(cv(torch.as_tensor(x)), flow(torch.as_tensor(x))) for x in frames]
    student, teacher = (torch.stack(values).numpy() for values in zip(*pairs))
    rms = np.sqrt(np.mean((student - teacher) ** 2, axis=0))
    print("rms on held-out MD frames", rms)
    assert np.all(rms < 0.05), rms
    assert np.corrcoef(student[:, 0], teacher[:, 0])[0, 1] > 0.995
    assert set(report) >= {"value_rms", "value_rms_thermal", "gradient_relative"}
    assert cv.student_report["value_rms"] == pytest.approx(report["value_rms"])


def test_student_cv_is_invariant_to_rigid_motions_and_drives_a_torchforce(studentCv):
    cv, _ = studentCv
    ala2 = builtinSystem("ala2-vacuum")
    positions = np.asarray(ala2.positions.value_in_unit(unit.nanometer))
    rotation = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))[0]
    rotation *= np.sign(np.linalg.det(rotation))
    moved = positions @ rotation + np.array([0.3, -1.0, 2.0])
    with torch.no_grad():
        values = [cv(torch.as_tensor(x, dtype=torch.float64)).numpy() for x in (positions, moved)]
    np.testing.assert_allclose(values[0], values[1], atol=1e-5)
    system = openmm.XmlSerializer.clone(ala2.system)
    force = SlowModeCV(cv, 1)
    force.setForceGroup(4)
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(positions)
    energy = context.getState(getEnergy=True, groups={4}).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert energy == pytest.approx(float(values[0][1]), abs=1e-5)
