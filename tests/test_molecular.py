"""Tests of the molecular pipeline, from simulations to a trained slow-mode model: trajectory loading, the internal
frame, the model file, the TorchScript export and its OpenMM force, and a physical check of units end to end
(a harmonic chain whose learned frequencies must be the analytic ones, in 1/ps).

The ala2 trajectory and the tiny model are made once per session (tests/molecular_fixtures.py).
"""
import copy
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mdtraj
import numpy as np
import openmm
import pytest
import torch
from openmm import unit
from scipy.spatial.transform import Rotation

from molecular_fixtures import ALA2_HEAVY_ATOMS, TEMPERATURE, phi_turned, tiny_estimator, torch_threads
from nct_openmm.cli import main
from nct_openmm.core import NCTModel, FlowConfig
from nct_openmm.core import training as training_module
from nct_openmm.core.serialization import FORMAT_NAME, FORMAT_VERSION, ModelFileError
from nct_openmm.data import load_trajectories
from nct_openmm.core.distill import fit_student
from nct_openmm.core.layers import AffineCoupling, AffinePoint
import nct_openmm.export as export_module
from nct_openmm.export import AlignedInput, SlowModeModule, StudentModule, export_slow_modes, slow_mode_module
from nct_openmm.forces import SlowModeCV
from nct_openmm.geometry import (InternalFrame, PairDistances, _centre_and_covariance, _svd_rotation, kabsch_align,
                                 kabsch_align_saving, kabsch_pullback, polar_rotation, rotation_generators)
from nct_openmm.simulate import runLangevin
from nct_openmm.slowmodes import SlowModeModel
from nct_openmm.systems import builtinSystem, harmonicChainFrequencies, harmonicChainSystem

SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                             "alanine_dipeptide.pt")
#: A triclinic box in OpenMM's reduced form (rows a, b, c), each side more than twice the longest bond.
BOX = np.array([[2.5, 0.0, 0.0], [0.4, 2.6, 0.0], [-0.3, 0.5, 2.8]])


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ala2_traj(ala2_run):
    """The whole trajectory as mdtraj reads it (all 22 atoms)."""
    return mdtraj.load(ala2_run.trajectory, top=ala2_run.topology)


def write_pieces(traj, folder, bounds):
    """Write frames ``[start, stop)`` of ``traj`` as one DCD each; return the paths."""
    paths = []
    for i, (start, stop) in enumerate(bounds):
        path = os.path.join(str(folder), f"piece{i}.dcd")
        traj[start:stop].save_dcd(path)
        paths.append(path)
    return paths


def moved_and_broken(positions, seed=0):
    """A rigidly rotated and translated copy of ``positions (T, n, 3)`` in which every atom is shifted by a random
    lattice vector of :data:`BOX`, so that molecules are broken across the periodic boundary. Returns the copy and
    the boxes ``(T, 3, 3)``."""
    rotation = Rotation.random(random_state=seed).as_matrix()
    shifts = np.random.default_rng(seed).integers(-2, 3, size=positions.shape) @ BOX
    moved = positions @ rotation.T + np.array([3.1, -7.2, 0.4]) + shifts
    return moved, np.broadcast_to(BOX, (len(positions), 3, 3)).copy()


def one_line_error(capsys, command):
    """The stderr of a CLI call that failed: one line naming the subcommand."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"nct {command}: error:"), err
    return err


# ---------------------------------------------------------------------------------------------------------------
# 1. Loading
# ---------------------------------------------------------------------------------------------------------------

def test_default_selection_is_the_ten_heavy_atoms_with_masses_from_the_topology(ala2_data, ala2_traj):
    assert ala2_data.atom_indices == ALA2_HEAVY_ATOMS
    assert all(ala2_traj.topology.atom(i).element.symbol != "H" for i in ALA2_HEAVY_ATOMS)
    assert ala2_data.positions.shape == (1000, 10, 3) and ala2_data.positions.dtype == np.float64
    np.testing.assert_array_equal(ala2_data.positions, ala2_traj.xyz[:, ALA2_HEAVY_ATOMS])
    system = builtinSystem("ala2-vacuum").system
    openmmMasses = [system.getParticleMass(i).value_in_unit(unit.amu) for i in ALA2_HEAVY_ATOMS]
    np.testing.assert_allclose(ala2_data.masses, openmmMasses, rtol=1e-3)
    assert ala2_data.boxes is None and ala2_data.weights is None
    np.testing.assert_array_equal(ala2_data.trajectory_ids, 0)
    np.testing.assert_array_equal(ala2_data.frame_indices, np.arange(1000))
    # The heavy-atom bonds connect all ten atoms (a tree), so the molecule can be unwrapped from any one atom.
    assert len(ala2_data.bonds) == 9


@pytest.mark.parametrize("selection", ["backbone", "name CA", "element O N", "all"])
def test_a_custom_selection_picks_those_atoms(ala2_run, ala2_traj, selection):
    data = load_trajectories(ala2_run.trajectory, ala2_run.topology, selection=selection, stop=5)
    expected = ala2_traj.topology.select(selection).tolist()
    assert data.atom_indices == expected
    np.testing.assert_array_equal(data.positions, ala2_traj.xyz[:5][:, expected])
    np.testing.assert_allclose(data.masses, [ala2_traj.topology.atom(i).element.mass for i in expected])


@pytest.mark.parametrize("selection, message", [
    ("nonsense", "unknown or invalid atom selection 'nonsense'"),
    ("name CA and", "unknown or invalid atom selection 'name CA and'"),
    ("resname XYZ", "selection 'resname XYZ' matches no atoms of the topology \\(22 atoms\\)"),
    ("water", "selection 'water' matches no atoms"),
])
def test_bad_or_empty_selection_is_a_clear_error(ala2_run, selection, message):
    with pytest.raises(ValueError, match=message):
        load_trajectories(ala2_run.trajectory, ala2_run.topology, selection=selection)


@pytest.mark.parametrize("options, expected", [
    (dict(stride=3), np.arange(0, 1000, 3)),
    (dict(start=10, stop=50, stride=4), np.arange(10, 50, 4)),
    (dict(start=-10), np.arange(990, 1000)),
    (dict(stop=-990), np.arange(0, 10)),
    (dict(stop=5000), np.arange(1000)),
    (dict(max_frames=7), np.arange(0, 1000, 143)),
    (dict(start=100, stride=2, max_frames=300), np.arange(100, 1000, 3)),
])
def test_frame_ranges_pick_those_frames_across_chunks(ala2_run, ala2_traj, options, expected):
    data = load_trajectories(ala2_run.trajectory, ala2_run.topology, chunk=64, **options)
    np.testing.assert_array_equal(data.frame_indices, expected)
    np.testing.assert_array_equal(data.positions, ala2_traj.xyz[expected][:, ALA2_HEAVY_ATOMS])


@pytest.mark.parametrize("options, message", [
    (dict(stride=0), "stride must be a positive integer, got 0"),
    (dict(stride=-2), "stride must be a positive integer"),
    (dict(max_frames=0), "max_frames must be a positive integer"),
    (dict(start=2000), "no frames in the range start=2000.*the file has 1000"),
    (dict(stride=2.0), "stride must be a positive integer, got 2.0"),
])
def test_bad_frame_ranges_are_clear_errors(ala2_run, options, message):
    with pytest.raises(ValueError, match=message):
        load_trajectories(ala2_run.trajectory, ala2_run.topology, **options)


def test_several_trajectories_and_a_split_that_holds_out_whole_trajectories(ala2_run, ala2_traj, tmp_path):
    bounds = [(0, 300), (300, 500), (500, 800), (800, 1000)]
    paths = write_pieces(ala2_traj, tmp_path, bounds)
    data = load_trajectories(paths, ala2_run.topology)
    assert data.sources == paths
    np.testing.assert_array_equal(data.trajectory_ids, np.repeat(np.arange(4), [300, 200, 300, 200]))
    np.testing.assert_array_equal(data.frame_indices, np.concatenate([np.arange(b - a) for a, b in bounds]))
    # Rewriting a DCD rounds through Å in float32.
    np.testing.assert_allclose(data.positions, ala2_traj.xyz[:, ALA2_HEAVY_ATOMS], atol=1e-6)

    train, validation = data.split_by_trajectory(0.25, seed=0)
    held_out = np.unique(validation.trajectory_ids)
    assert len(held_out) == 1
    assert not set(held_out) & set(np.unique(train.trajectory_ids))
    sizes = [b - a for a, b in bounds]
    assert validation.n_frames == sizes[held_out[0]] and train.n_frames == 1000 - validation.n_frames

    # A single trajectory: the validation set is its last block, not frames scattered among the training ones.
    single = load_trajectories(paths[0], ala2_run.topology)
    _, validation = single.split_by_trajectory(0.2)
    np.testing.assert_array_equal(validation.frame_indices, np.arange(240, 300))


def test_weights_from_arrays_and_text_files_follow_the_frames(ala2_run, ala2_traj, tmp_path):
    paths = write_pieces(ala2_traj, tmp_path, [(0, 400), (400, 1000)])
    rng = np.random.default_rng(1)
    weights = [rng.uniform(size=400), rng.uniform(size=600)]
    column = tmp_path / "weights1.txt"
    np.savetxt(column, weights[1])
    data = load_trajectories(paths, ala2_run.topology, stride=3, weights=[weights[0], str(column)])
    expected = np.concatenate([weights[0][::3], weights[1][::3]])
    np.testing.assert_allclose(data.weights, expected / expected.mean(), rtol=1e-14)  # only ratios matter
    train, validation = data.split_by_trajectory(0.5, seed=0)
    assert train.weights.shape == (train.n_frames,) and validation.weights.shape == (validation.n_frames,)
    # One trajectory path with one array (not a list of one), and weights that follow a negative start.
    single = load_trajectories(paths[0], ala2_run.topology, start=-50, weights=weights[0])
    np.testing.assert_allclose(single.weights, weights[0][350:] / weights[0][350:].mean(), rtol=1e-14)
    # A list of one path with one file.
    listed = load_trajectories(paths[1:], ala2_run.topology, weights=str(column))
    np.testing.assert_allclose(listed.weights, weights[1] / weights[1].mean(), rtol=1e-14)


def test_unnormalised_weights_beyond_float32_are_scaled_at_load(ala2_run):
    """exp(V/kT) of a 250 kJ/mol bias is 1e43: finite in float64, inf in the float32 of training. Scaled to mean 1
    when loaded, the same ratios train."""
    huge = np.exp(np.linspace(0.0, 3.0, 1000)) * 1e43
    data = load_trajectories(ala2_run.trajectory, ala2_run.topology, weights=huge)
    assert data.weights.mean() == pytest.approx(1.0, rel=1e-12)
    assert np.all(np.isfinite(data.weights.astype(np.float32)))
    np.testing.assert_allclose(data.weights[-1] / data.weights[0], np.exp(3.0), rtol=1e-12)


@pytest.mark.parametrize("make_weights, message", [
    (lambda folder: [np.ones(999)], "must be one value per frame \\(1000\\), got shape \\(999,\\)"),
    (lambda folder: [np.ones(1000), np.ones(1000)], "2 weight files/arrays for 1 trajectories"),
    (lambda folder: [-np.ones(1000)], "finite and non-negative"),
    (lambda folder: [_text_file(folder, np.ones((1000, 2)))],
     "one value per frame \\(1000\\), got shape \\(1000, 2\\)"),
    (lambda folder: [_text_file(folder, np.ones(10))], "one value per frame \\(1000\\), got shape \\(10,\\)"),
    (lambda folder: [np.zeros(1000)], "are all zero"),
    (lambda folder: [_words_file(folder)], "weights.txt\\) are not a column of numbers"),
])
def test_wrong_weights_are_clear_errors(ala2_run, tmp_path, make_weights, message):
    with pytest.raises(ValueError, match=message):
        load_trajectories([ala2_run.trajectory], ala2_run.topology, weights=make_weights(tmp_path))


def _words_file(folder):
    path = os.path.join(str(folder), "weights.txt")
    with open(path, "w") as handle:
        handle.write("abc\n" * 1000)
    return path


def _text_file(folder, values):
    path = os.path.join(str(folder), "weights.txt")
    np.savetxt(path, values)
    return path


def test_a_pdb_trajectory_in_another_atom_order_is_refused(ala2_run, ala2_traj, tmp_path):
    """mdtraj reads a PDB in its own atom order, whatever topology it is given: one that lists atoms in another
    order than the topology would silently give other atoms' positions."""
    path = tmp_path / "reordered.pdb"
    ala2_traj[:3].save_pdb(str(path))
    lines = path.read_text().splitlines()
    atoms = [i for i, line in enumerate(lines) if line.startswith(("ATOM", "HETATM"))]
    for first in atoms[::22]:  # in every model, the methyl carbon and the carbonyl carbon trade places
        lines[first + 1], lines[first + 4] = lines[first + 4], lines[first + 1]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="reordered.pdb .* its atom 1 is ACE:C, where the topology has ACE:CH3"):
        load_trajectories(str(path), ala2_run.topology)
    ala2_traj[:3].save_pdb(str(tmp_path / "same.pdb"))
    assert load_trajectories(str(tmp_path / "same.pdb"), ala2_run.topology).n_frames == 3


def test_an_hdf5_trajectory_loads_like_the_dcd(ala2_run, ala2_traj, tmp_path):
    path = str(tmp_path / "frames.h5")
    ala2_traj[:20].save_hdf5(path)
    loaded = load_trajectories(path, ala2_run.topology)
    reference = load_trajectories(ala2_run.trajectory, ala2_run.topology, stop=20)
    np.testing.assert_allclose(loaded.positions, reference.positions, atol=1e-6)


def test_atom_count_mismatch_names_both_counts(ala2_run, ala2_traj, tmp_path):
    path = str(tmp_path / "ten_atoms.dcd")
    ala2_traj[:5].atom_slice(range(10)).save_dcd(path)
    with pytest.raises(ValueError, match="ten_atoms.dcd has 10 atoms per frame but the topology has 22"):
        load_trajectories(path, ala2_run.topology)


@pytest.mark.parametrize("atom", [4, 3], ids=["selected-atom", "unselected-hydrogen"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_infinite_coordinates_are_rejected_naming_the_frame(ala2_run, ala2_traj, tmp_path, atom, value):
    xyz = ala2_traj.xyz[:20].copy()
    xyz[7, atom, 1] = value
    path = str(tmp_path / "blown_up.dcd")
    mdtraj.Trajectory(xyz, ala2_traj.topology).save_dcd(path)
    with pytest.raises(ValueError, match="blown_up.dcd: NaN or infinite coordinates in frame 7"):
        load_trajectories(path, ala2_run.topology)


def _garbage(folder, name):
    path = os.path.join(str(folder), name)
    with open(path, "wb") as handle:
        handle.write(np.random.default_rng(0).bytes(3000))
    return path


@pytest.mark.parametrize("make_inputs, error, message", [
    (lambda run, folder: (os.path.join(str(folder), "missing.dcd"), run.topology),
     FileNotFoundError, "trajectory file not found: .*missing.dcd"),
    (lambda run, folder: (run.trajectory, os.path.join(str(folder), "missing.pdb")),
     FileNotFoundError, "topology file not found: .*missing.pdb"),
    (lambda run, folder: (_garbage(folder, "garbage.dcd"), run.topology), ValueError,
     "cannot read trajectory .*garbage.dcd with topology of 22 atoms"),
    (lambda run, folder: (_garbage(folder, "garbage.xtc"), run.topology), ValueError,
     "cannot read trajectory .*garbage.xtc"),
    (lambda run, folder: (_garbage(folder, "traj.unknown"), run.topology), ValueError,
     "cannot read trajectory .*traj.unknown"),
    (lambda run, folder: (run.trajectory, _garbage(folder, "garbage.pdb")), ValueError,
     "cannot read topology .*garbage.pdb"),
])
def test_missing_or_unreadable_files_are_clear_errors(ala2_run, tmp_path, make_inputs, error, message):
    trajectory, topology = make_inputs(ala2_run, tmp_path)
    with pytest.raises(error, match=message):
        load_trajectories(trajectory, topology)


def test_train_cli_reports_bad_inputs_in_one_line_with_exit_code_2(ala2_run, tmp_path, capsys):
    base = ["train", "--top", ala2_run.topology, "--temperature", "300", "--out", str(tmp_path / "m.pt")]
    cases = [
        (["--traj", _garbage(tmp_path, "garbage.dcd")], "cannot read trajectory"),
        (["--traj", str(tmp_path / "missing.dcd")], "trajectory file not found"),
        (["--traj", ala2_run.trajectory, "--select", "resname XYZ"], "matches no atoms"),
        (["--traj", ala2_run.trajectory, "--stride", "0"], "stride must be a positive integer"),
        (["--traj", ala2_run.trajectory, "--max-frames", "100"], "fewer than one batch of 256"),
        (["--traj", ala2_run.trajectory, "--validation", "0"],
         "validation fraction must lie strictly between 0 and 1"),
        (["--traj", ala2_run.trajectory, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--traj", ala2_run.trajectory, "--out", str(tmp_path / "missing" / "m.pt")],
         "the folder of --out does not exist"),
        # Both found before training, not after it (a folder as --out left the trained model as a temporary).
        (["--traj", ala2_run.trajectory, "--out", str(tmp_path)], "is a folder; give a file name"),
        (["--traj", ala2_run.trajectory, "--checkpoint", str(tmp_path / "missing" / "c.pt")],
         "the folder of --checkpoint does not exist"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        assert message in one_line_error(capsys, "train")
    assert not (tmp_path / "m.pt").exists()


def test_fewer_frames_than_a_batch_is_a_clear_error(ala2_run):
    data = load_trajectories(ala2_run.trajectory, ala2_run.topology, stop=100)
    with pytest.raises(ValueError, match="80 training frames are fewer than one batch of 256"):
        tiny_estimator().fit(data)


# ---------------------------------------------------------------------------------------------------------------
# 2. Geometry
# ---------------------------------------------------------------------------------------------------------------

def test_the_internal_frame_has_3n_minus_6_orthonormal_coordinates(ala2_model, ala2_data):
    model = ala2_model.model
    frame = model.frame
    assert frame.dim == 3 * 10 - 6 == model.n_modes == len(model.frequencies)
    basis = frame.basis
    np.testing.assert_allclose((basis.T @ basis).numpy(), np.eye(24), atol=1e-12)
    # Orthogonal to the six mass-weighted rigid-body motions about the reference.
    sqrt_m = torch.sqrt(frame.masses)[:, None]
    rigid = [(sqrt_m * torch.eye(3, dtype=torch.float64)[axis]).reshape(-1) for axis in range(3)]
    rigid += [(sqrt_m * torch.linalg.cross(torch.eye(3, dtype=torch.float64)[axis].expand(10, 3),
                                          frame.reference)).reshape(-1) for axis in range(3)]
    np.testing.assert_allclose((torch.stack(rigid) @ basis).numpy(), 0.0, atol=1e-12)
    assert model.internal_coordinates(ala2_data.positions[:5]).shape == (5, 24)


def test_rotated_translated_and_box_broken_copies_give_the_same_coordinates(ala2_model, ala2_data):
    model = ala2_model.model
    frames = ala2_data.subset(np.arange(ala2_data.n_frames) % 5 == 0)
    moved, boxes = moved_and_broken(frames.positions)
    # The copy really is broken: some bonds span more than half a box.
    bond_lengths = np.linalg.norm(moved[:, 1] - moved[:, 0], axis=-1)
    assert bond_lengths.max() > 1.0
    np.testing.assert_allclose(model.internal_coordinates(moved, boxes), model.internal_coordinates(frames.positions),
                               atol=1e-10)
    broken = frames.subset(np.ones(frames.n_frames, dtype=bool))
    broken.positions, broken.boxes = moved, boxes
    np.testing.assert_allclose(model.transform(broken), model.transform(frames), atol=1e-5)


def test_the_reference_structure_does_not_depend_on_broken_molecules(ala2_data):
    frames = ala2_data.subset(np.arange(ala2_data.n_frames) < 400)
    moved, boxes = moved_and_broken(frames.positions, seed=3)
    broken = frames.subset(np.ones(frames.n_frames, dtype=bool))
    broken.positions, broken.boxes = moved, boxes
    estimator = tiny_estimator()
    whole, other = estimator.make_frame(frames), estimator.make_frame(broken)
    # The same average structure, up to a rotation.
    aligned = kabsch_align(other.reference, whole.reference, whole.masses)
    np.testing.assert_allclose(aligned.numpy(), whole.reference.numpy(), atol=1e-9)
    # The same internal coordinates up to an orthogonal change of basis: equal Gram matrices.
    u, v = (frame.internal(torch.as_tensor(frames.positions)) for frame in (whole, other))
    np.testing.assert_allclose((v @ v.T).numpy(), (u @ u.T).numpy(), atol=1e-9)


def test_selections_linked_through_unselected_atoms_are_made_whole_and_far_pieces_refused(ala2_run):
    """Cα and O atoms are linked through the backbone atoms between them, so a box vector added to one of them
    changes nothing; the two terminal groups (four bonds apart) cannot be made whole across the box."""
    backbone = load_trajectories(ala2_run.trajectory, ala2_run.topology, selection="name CA or name O", stop=50)
    backbone.boxes = np.tile(3.0 * np.eye(3), (backbone.n_frames, 1, 1))
    frame = tiny_estimator().make_frame(backbone)
    x, box = torch.as_tensor(backbone.positions), torch.as_tensor(backbone.boxes)
    moved = x.clone()
    moved[:, 1] += box[:, 0]
    np.testing.assert_allclose(frame.internal(moved, box).numpy(), frame.internal(x, box).numpy(), atol=1e-9)
    ends = load_trajectories(ala2_run.trajectory, ala2_run.topology, selection="index 1 4 16 18", stop=50)
    tiny_estimator().make_frame(ends)  # without a box, pieces are fine
    ends.boxes = np.tile(3.0 * np.eye(3), (ends.n_frames, 1, 1))
    with pytest.raises(ValueError, match="form 2 pieces not bonded to each other"):
        tiny_estimator().make_frame(ends)


def test_iterative_alignment_equals_the_svd_one_with_its_gradient(ala2_data):
    """The SVD-free rotation that exported CVs use on a GPU (graph-capturable) gives the Kabsch alignment and the
    same forces; float32 within rounding."""
    x = torch.as_tensor(ala2_data.positions[::25])
    masses = torch.as_tensor(ala2_data.masses)
    reference = kabsch_align(x[0], x[0], masses)
    generator = torch.Generator().manual_seed(5)
    rotations = torch.linalg.qr(torch.randn(len(x), 3, 3, generator=generator, dtype=torch.float64))[0]
    rotations = rotations * torch.sign(torch.linalg.det(rotations))[:, None, None]  # proper rotations
    moved = (x @ rotations + torch.randn(len(x), 1, 3, generator=generator, dtype=torch.float64)).requires_grad_()
    scripted = torch.jit.script(kabsch_align)  # the exported CVs run it as TorchScript
    exact, iterative = (scripted(moved, reference, masses, iterative=flag) for flag in (False, True))
    assert (exact - iterative).abs().max() < 1e-12
    probe = torch.randn(exact.shape, generator=generator, dtype=torch.float64)
    gradients = [torch.autograd.grad((aligned * probe).sum(), moved, retain_graph=True)[0]
                 for aligned in (exact, iterative)]
    assert (gradients[0] - gradients[1]).abs().max() < 1e-10
    single = kabsch_align(moved.detach().float(), reference.float(), masses.float(), iterative=True)
    assert (single.double() - exact.detach()).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_polar_rotation_has_converged_at_its_default_step_count(dtype):
    """The default Newton steps give the rotation that many more steps give, also for ill-conditioned covariances
    (one or two small singular values: flat or nearly linear selections) and negative determinants, and that is the
    SVD's proper rotation ``U diag(1, 1, det U Vᵀ) Vᵀ``."""
    generator = torch.Generator().manual_seed(4)
    mirror = np.diag([1.0, 1.0, -1.0])
    for singular_values in ([1.0, 0.1, 1e-3], [1.0, 1.0, 1e-5], [1.0, 1e-2, 1e-3], [1.0, 1e-3, 1e-5], [1.0, 0.3, 0.25]):
        u, v = (Rotation.random(200, random_state=seed).as_matrix() for seed in (1, 2))
        u[::2] = u[::2] @ mirror  # half of them with det < 0, where the polar factor of c itself is improper
        c = torch.as_tensor((u * singular_values) @ v.transpose(0, 2, 1) * 0.37, dtype=dtype)
        c = c + 1e-3 * torch.randn(c.shape, generator=generator, dtype=dtype) * singular_values[-1]
        converged = polar_rotation(c, 20)
        assert (polar_rotation(c) - converged).abs().max() <= 4 * torch.finfo(dtype).eps
        bound = 1e-12 if dtype == torch.float64 else 1e-4
        assert (converged.double() - _svd_rotation(c.double())).abs().max() < bound
        assert torch.linalg.det(converged.double()).sub(1.0).abs().max() < bound


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_iterative_alignment_is_the_kabsch_one_across_negative_covariance_determinants(dtype):
    """Alanine dipeptide's heavy atoms at φ between about 0° and 150°, aligned to the extended structure (φ = −180°),
    have a covariance of negative determinant (the heavy atoms are nearly flat): a common case in MD, not a mirror
    image. The SVD-free rotation that exported CVs use on a GPU must be the proper Kabsch rotation there too, with
    the same gradient, and so continuous where the determinant passes through zero."""
    ala2 = builtinSystem("ala2-vacuum")
    positions = np.asarray(ala2.positions.value_in_unit(unit.nanometer))
    structures = phi_turned(ala2, np.arange(0.0, 330.0, 3.0))  # φ from −180° through 0° to 150°
    masses = torch.tensor([ala2.system.getParticleMass(i).value_in_unit(unit.dalton) for i in ALA2_HEAVY_ATOMS],
                          dtype=torch.float64)
    reference = torch.as_tensor(positions[ALA2_HEAVY_ATOMS])
    x = torch.as_tensor(structures[:, ALA2_HEAVY_ATOMS]).requires_grad_()
    determinants = torch.linalg.det(_centre_and_covariance(x.detach(), reference, masses)[3])
    assert (determinants < 0).sum() > 30 and (determinants > 0).sum() > 30
    exact = kabsch_align(x, reference, masses)
    iterative = kabsch_align(x.to(dtype), reference.to(dtype), masses.to(dtype), iterative=True).double()
    assert (iterative - exact).abs().max() < (1e-12 if dtype == torch.float64 else 1e-5)
    if dtype == torch.float64:
        probe = torch.randn(exact.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        gradients = [torch.autograd.grad((aligned * probe).sum(), x, retain_graph=True)[0]
                     for aligned in (exact, iterative)]
        assert (gradients[0] - gradients[1]).abs().max() < 1e-9


def test_the_shipped_cv_on_the_gpu_code_path_equals_the_cpu_one_at_positive_phi(monkeypatch):
    """On CUDA tensors the exported CV aligns with :func:`polar_rotation` instead of an SVD. Run that code path on
    the CPU, in float32 as mixed precision does, at φ = 20°, 60° and 90°: against the shipped model's reference the
    alignment covariance has a negative determinant there, where the GPU path once returned a reflection and moved
    the CV by up to 3 units."""
    cv = SlowModeModule(SlowModeModel.load(SHIPPED_MODEL), 2, torch.float32)
    structures = torch.as_tensor(phi_turned(builtinSystem("ala2-vacuum"), [200.0, 240.0, 270.0]), dtype=torch.float32)

    def modes_and_gradients():
        results = []
        for structure in structures:
            x = structure.clone().requires_grad_()
            modes = cv(x).reshape(-1)
            gradients = [torch.autograd.grad(mode, x, retain_graph=True)[0] for mode in modes]
            results.append((modes.detach(), torch.stack(gradients)))
        return results

    svd = modes_and_gradients()
    for name in ("kabsch_align", "kabsch_align_saving"):
        function = getattr(export_module, name)
        monkeypatch.setattr(export_module, name, lambda x, reference, masses, iterative=False, function=function:
                            function(x, reference, masses, True))
    for (modes, gradients), (gpu_modes, gpu_gradients) in zip(svd, modes_and_gradients()):
        np.testing.assert_allclose(gpu_modes, modes, atol=1e-4)
        np.testing.assert_allclose(gpu_gradients, gradients, atol=1e-4 * float(gradients.abs().max()))


@pytest.mark.parametrize("iterative", [False, True])
def test_kabsch_pullback_is_the_alignment_gradient(ala2_data, iterative):
    """The closed-form pullback the exported CVs use equals autograd through the alignment, row by row."""
    x = torch.as_tensor(ala2_data.positions[::100])
    masses = torch.as_tensor(ala2_data.masses)
    reference = kabsch_align(x[0], x[0], masses)
    probes = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    pullback = torch.jit.script(kabsch_pullback)
    for structure in x[1:] + torch.tensor([0.4, -1.0, 2.0], dtype=torch.float64):
        aligned, saved = kabsch_align_saving(structure, reference, masses, iterative)
        moved = structure.clone().requires_grad_(True)
        expected = kabsch_align(moved, reference, masses, iterative)
        assert (aligned - expected).abs().max() < 1e-12
        rows = [torch.autograd.grad((expected * probe).sum(), moved, retain_graph=True)[0] for probe in probes]
        np.testing.assert_allclose(pullback(saved, probes, rotation_generators()).numpy(), torch.stack(rows).numpy(),
                                   rtol=1e-10, atol=1e-12)


def test_the_alignment_pullback_of_a_linear_selection_is_finite():
    """Two atoms: a turn about the bond moves neither, and the rotation's response to C is singular there. The
    pullback must still be the gradient (finite differences), not NaN, which it was for a few percent of frames.
    (The GPU code path cannot align a linear selection at all: see polar_rotation.)"""
    generator = torch.Generator().manual_seed(2)
    masses = torch.tensor([12.0, 16.0], dtype=torch.float64)
    reference = torch.tensor([[0.0, 0.0, -0.065], [0.0, 0.0, 0.057]], dtype=torch.float64)
    structures = reference + 0.03 * torch.randn(400, 2, 3, generator=generator, dtype=torch.float64)
    probe = torch.randn(1, 2, 3, generator=generator, dtype=torch.float64)
    pullbacks = []
    for structure in structures:
        _, saved = kabsch_align_saving(structure, reference, masses)
        pullbacks.append(kabsch_pullback(saved, probe, rotation_generators())[0])
    assert torch.isfinite(torch.stack(pullbacks)).all()
    step = 1e-6
    for structure, pullback in zip(structures[:20], pullbacks):
        numerical = torch.zeros(2, 3, dtype=torch.float64)
        for atom, axis in np.ndindex(2, 3):
            shift = torch.zeros(2, 3, dtype=torch.float64)
            shift[atom, axis] = step
            ends = [(kabsch_align(structure + sign * shift, reference, masses) * probe[0]).sum() for sign in (1, -1)]
            numerical[atom, axis] = (ends[0] - ends[1]) / (2 * step)
        np.testing.assert_allclose(pullback.numpy(), numerical.numpy(), atol=1e-7)


def test_exporting_a_cv_of_a_linear_selection_warns_that_cuda_cannot_align_it():
    frame = InternalFrame([0, 1], torch.tensor([12.0, 16.0]), torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.12]]), 2.5)
    pre = AffinePoint(torch.zeros(frame.dim), torch.eye(frame.dim), torch.ones(frame.dim))
    with pytest.warns(UserWarning, match="linear reference.*CUDA gives NaN"):
        AlignedInput(frame, pre, torch.float32)


class _AlignedProbe(torch.nn.Module):
    def __init__(self, reference, masses, probe):
        super().__init__()
        self.register_buffer("reference", reference)
        self.register_buffer("masses", masses)
        self.register_buffer("probe", probe)

    def forward(self, x: torch.Tensor, iterative: bool) -> torch.Tensor:
        return (kabsch_align(x, self.reference, self.masses, iterative) * self.probe).sum()


@pytest.mark.parametrize("iterative", [False, True])
def test_alignment_gradient_survives_freezing(ala2_data, iterative):
    """TorchForce freezes the module (torch.jit.freeze drops detach); the forces must not change."""
    x = torch.as_tensor(ala2_data.positions[7])
    masses = torch.as_tensor(ala2_data.masses)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    module = _AlignedProbe(torch.as_tensor(ala2_data.positions[0]), masses, probe)
    frozen = torch.jit.freeze(torch.jit.script(module).eval())
    gradients = []
    for function in (module, frozen, frozen, frozen):  # the profiling executor optimises after a few calls
        moved = x.clone().requires_grad_(True)
        gradients.append(torch.autograd.grad(function(moved, iterative), moved)[0])
    for gradient in gradients[1:]:
        assert (gradient - gradients[0]).abs().max() < 1e-10


def test_kabsch_never_reflects_a_mirror_image(ala2_model, ala2_data):
    frame = ala2_model.model.frame
    x = torch.as_tensor(ala2_data.positions[::50])
    mirror = x * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    assert (frame.internal(mirror) - frame.internal(x)).abs().max() > 0.1
    # The aligned mirror image is a proper rotation of the centred mirror image.
    centred = mirror - (frame.masses[:, None] * mirror).sum(-2, keepdim=True) / frame.masses.sum()
    aligned = frame.whole(mirror)
    for c, a in zip(centred, aligned):
        rotation = torch.linalg.lstsq(c, a).solution
        np.testing.assert_allclose((rotation.T @ rotation).numpy(), np.eye(3), atol=1e-8)
        assert float(torch.linalg.det(rotation)) == pytest.approx(1.0, abs=1e-8)


def test_cartesian_inverts_internal_onto_the_aligned_structure(ala2_model, ala2_data):
    frame = ala2_model.model.frame
    x = torch.as_tensor(ala2_data.positions[::10])
    aligned = frame.whole(x)
    np.testing.assert_allclose(frame.cartesian(frame.internal(x)).numpy(), aligned.numpy(), atol=1e-12)
    # The aligned structure obeys the six linear conditions: zero centre of mass and the Eckart conditions.
    m = frame.masses[:, None]
    np.testing.assert_allclose((m * aligned).sum(-2).numpy(), 0.0, atol=1e-12)
    eckart = (m * torch.linalg.cross(frame.reference.expand_as(aligned), aligned)).sum(-2)
    np.testing.assert_allclose(eckart.numpy(), 0.0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 3. Model file
# ---------------------------------------------------------------------------------------------------------------

def test_transform_refuses_data_the_model_cannot_read(ala2_model, ala2_run, ala2_data):
    model = ala2_model.model
    other = load_trajectories(ala2_run.trajectory, ala2_run.topology, selection="index 0 to 9", stop=5)
    with pytest.raises(ValueError, match="the data hold atoms .* but the model reads atoms"):
        model.transform(other)
    with pytest.raises(ValueError, match="the data have 22 atoms per frame but the model reads 10"):
        model.transform(np.zeros((3, 22, 3)))
    for k in (0, model.n_modes + 1):
        with pytest.raises(ValueError, match=f"k must be between 1 and the model's {model.n_modes} modes"):
            model.transform(ala2_data.positions[:3], k=k)


def test_save_load_round_trip_gives_identical_transforms(ala2_model, ala2_data):
    model, loaded = ala2_model.model, SlowModeModel.load(ala2_model.path)
    np.testing.assert_array_equal(loaded.transform(ala2_data), model.transform(ala2_data))
    np.testing.assert_array_equal(loaded.transform(ala2_data, k=3, scaled=False),
                                  model.transform(ala2_data, k=3, scaled=False))
    np.testing.assert_array_equal(loaded.frequencies, model.frequencies)
    assert loaded.atom_indices == model.atom_indices == ALA2_HEAVY_ATOMS
    assert loaded.temperature == pytest.approx(TEMPERATURE)
    assert loaded.metadata == model.metadata
    assert torch.equal(loaded.frame.basis, model.frame.basis)


def test_nct_info_json_and_text(ala2_model, capsys):
    assert main(["info", "--json", ala2_model.path]) == 0
    info = json.loads(capsys.readouterr().out)
    frequencies = np.array(info["frequencies"])
    assert len(frequencies) == info["n_internal_modes"] == 24
    assert np.all(np.diff(frequencies) > 0) and frequencies[0] > 0
    assert info["atom_indices"] == ALA2_HEAVY_ATOMS
    assert info["temperature"] == pytest.approx(TEMPERATURE)
    assert info["units"]["frequencies"] == "1/ps"
    assert {"torch", "openmm", "nct_openmm"} <= set(info["versions"])
    assert info["training"]["train_frames"] == 800 and info["training"]["validation_frames"] == 200

    assert main(["info", ala2_model.path]) == 0
    text = capsys.readouterr().out
    assert "temperature  300.00 K" in text and "24 internal" in text


def test_nct_info_of_a_variational_model(ala2_model, tmp_path, capsys):
    """A model fitted to an energy records a free energy and no validation NLL (its info line crashed on that)."""
    model = copy.deepcopy(ala2_model.model)
    model.metadata["training"] = {"method": "variational (OpenMM energy)", "free_energy": -41.5, "steps": 300,
                                  "seconds": 12.0}
    path = str(tmp_path / "variational.pt")
    model.save(path)
    assert main(["info", path]) == 0
    assert "training     variational (OpenMM energy); free energy -41.5 kT, 300 steps, 12 s" in capsys.readouterr().out


def test_a_checkpointed_training_writes_its_checkpoint_every_epoch(ala2_data, tmp_path, monkeypatch):
    """So that an interrupted training resumes from its last epoch, not from the start."""
    saved_at = []
    monkeypatch.setattr(training_module.Trainer, "save_checkpoint",
                        lambda trainer, path=None: saved_at.append(trainer.step_count))
    tiny_estimator(max_steps=12, batch_size=200, checkpoint=str(tmp_path / "c.pt")).fit(ala2_data)
    assert saved_at[:3] == [4, 8, 12]  # 800 training frames: 4 steps an epoch

def _bad_model_file(kind, folder, good_path):
    path = os.path.join(str(folder), f"{kind}.pt")
    if kind == "corrupt":
        with open(path, "wb") as handle:
            handle.write(np.random.default_rng(0).bytes(5000))
    elif kind == "truncated":
        with open(good_path, "rb") as source, open(path, "wb") as handle:
            handle.write(source.read()[: os.path.getsize(good_path) // 2])
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "torchscript":
        export_slow_modes(SlowModeModel.load(good_path), path, 2)
    elif kind == "flow":
        NCTModel(FlowConfig(dim=4, n_couplings=1, hidden=4)).save(path)
    elif kind == "newer":
        torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION + 1, "kind": "molecular"}, path)
    elif kind == "incomplete":
        torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": "molecular"}, path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "not a readable nct_openmm model file \\(corrupt or foreign\\)"),
    ("truncated", "not a readable nct_openmm model file"),
    ("foreign", "not an nct_openmm model file \\(no 'nct_openmm.model' header\\)"),
    ("torchscript", "not a readable nct_openmm model file"),
    ("flow", "holds a 'flow' model, expected 'molecular'"),
    ("newer", f"model format version {FORMAT_VERSION + 1}; this nct_openmm reads version {FORMAT_VERSION}"),
    ("incomplete", "incomplete or damaged nct_openmm model file"),
])
def test_bad_model_files_raise_model_file_error_and_the_cli_exits_2(ala2_model, tmp_path, capsys, kind, message):
    path = _bad_model_file(kind, tmp_path, ala2_model.path)
    # torch.load warns that a TorchScript archive should go to torch.jit.load before it refuses the file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ModelFileError, match=message):
            SlowModeModel.load(path)
    capsys.readouterr()
    assert main(["info", path]) == 2
    assert message.replace("\\", "") in one_line_error(capsys, "info")
    assert main(["export", path, "--out", str(tmp_path / "cv.pt")]) == 2
    one_line_error(capsys, "export")
    assert not (tmp_path / "cv.pt").exists()


def test_a_missing_model_file_is_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing.pt")]) == 2
    assert "model file not found" in one_line_error(capsys, "info")


# ---------------------------------------------------------------------------------------------------------------
# 4. Export
# ---------------------------------------------------------------------------------------------------------------

def full_positions(traj, frames, dtype=torch.float32):
    return torch.as_tensor(traj.xyz[frames].astype(np.float64)).to(dtype)


def evaluate(module, positions, boxes=None):
    with torch.no_grad():
        if boxes is None:
            return torch.stack([module(x) for x in positions]).double().numpy()
        return torch.stack([module(x, b) for x, b in zip(positions, boxes)]).double().numpy()


def test_exported_float32_cv_equals_the_model_transform(ala2_model, ala2_data, ala2_traj):
    model = ala2_model.model
    frames = np.arange(0, 1000, 7)
    module = slow_mode_module(model, 2)
    values = evaluate(module, full_positions(ala2_traj, frames))
    expected = model.transform(ala2_data.positions[frames], k=2, scaled=True)
    np.testing.assert_allclose(values, expected, atol=1e-5)
    assert module(full_positions(ala2_traj, [0])[0]).dtype == torch.float32
    # Unit variance under the model, and roughly so on the training data.
    assert 0.3 < values.std(0).min() and values.std(0).max() < 3.0


def test_the_float64_export_equals_the_flow_evaluated_in_float64(ala2_model, ala2_data, ala2_traj):
    model = ala2_model.model
    frames = np.arange(0, 1000, 25)
    flow = copy.deepcopy(model.flow).double()
    with torch.no_grad():
        expected = flow.slow_modes(model.internal_coordinates(ala2_data.positions[frames]), 4, scaled=True).numpy()
    values = evaluate(slow_mode_module(model, 4, torch.float64), full_positions(ala2_traj, frames, torch.float64))
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-10)


def _with_unequal_halves(model):
    """``model`` with its three couplings replaced by random ones whose halves differ in size: 13/11, then 12/12
    (whose concatenated order equals the first one's swapped, though the halves do not), then its swap."""
    generator = torch.Generator().manual_seed(11)
    splits = [(torch.arange(11, 24), torch.arange(0, 11)), (torch.arange(0, 12), torch.arange(12, 24)),
              (torch.arange(12, 24), torch.arange(0, 12))]
    indices = [i for i, layer in enumerate(model.flow.layers) if isinstance(layer, AffineCoupling)]
    for index, (conditioning, transformed) in zip(indices, splits):
        coupling = AffineCoupling(conditioning, transformed, hidden=16)
        with torch.no_grad():
            for parameter in coupling.parameters():
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        model.flow.layers[index] = coupling
    return model


@pytest.mark.parametrize("mask", ["random", "alternate", "unequal"])
def test_the_export_keeps_coupling_halves_apart_without_changing_the_modes(ala2_data, ala2_traj, mask):
    """Between couplings the export carries the two halves, swapped or reordered (random masks draw a new split
    every second coupling; alternate ones only swap; the last coupling may not close a pair; halves may differ in
    size)."""
    with torch_threads(1):
        estimator = tiny_estimator(n_couplings=3 if mask == "unequal" else 5, max_steps=5,
                                   mask="random" if mask == "unequal" else mask)
        model = estimator.fit(ala2_data).fetch_model()
    if mask == "unequal":
        model = _with_unequal_halves(model)
    exported = SlowModeModule(model, 3, torch.float64)
    expected_swaps = {"random": [False, True, False, True, False], "alternate": [False, True, True, True, True],
                      "unequal": [False, False, True]}
    assert exported.swaps == expected_swaps[mask]
    frames = np.arange(0, 1000, 50)
    flow = copy.deepcopy(model.flow).double()
    with torch.no_grad():
        expected = flow.slow_modes(model.internal_coordinates(ala2_data.positions[frames]), 3, scaled=True).numpy()
    positions = full_positions(ala2_traj, frames, torch.float64)
    np.testing.assert_allclose(evaluate(torch.jit.script(exported), positions), expected, rtol=0, atol=1e-10)
    moved = positions[3].clone().requires_grad_(True)
    for k in range(3):
        gradient = torch.autograd.grad(exported(moved)[k], moved)[0]
        reference = torch.autograd.grad(_autograd_definition(exported, moved)[k], moved)[0]
        np.testing.assert_allclose(gradient.numpy(), reference.numpy(), rtol=1e-9, atol=1e-12)


def _autograd_definition(exported, positions):
    """The exported CV's modes with every derivative left to autograd: front, then couplings or student net."""
    y = exported.input(positions)
    if hasattr(exported, "couplings"):
        # The flow's front and output matrix are in the first and last couplings' split orders; the couplings
        # themselves take the natural one.
        first, last = exported.couplings[0], exported.couplings[-1]
        y = y.index_select(-1, torch.argsort(torch.cat([first.conditioning, first.transformed])))
        for coupling in exported.couplings:
            y = coupling(y)
        return (y.index_select(-1, torch.cat([last.conditioning, last.transformed])) @ exported.out_matrix)[0]
    return exported.net(y)[0]


@pytest.mark.parametrize("kind", ["flow", "student", "distance-student"])
def test_exported_forces_equal_autograd_through_the_network_also_when_frozen(ala2_model, ala2_traj, kind):
    """The exported network enters autograd through its closed-form Jacobian; TorchForce freezes the module."""
    model = ala2_model.model
    if kind == "flow":
        exported = SlowModeModule(model, 2, torch.float64)
    else:
        features = PairDistances(model.frame) if kind == "distance-student" else None
        student, _ = fit_student(model.flow, 2, steps=20, samples=256, batch=128, progress=False, features=features)
        exported = StudentModule(model, student, dtype=torch.float64)
    scripted = torch.jit.script(exported)
    frozen = torch.jit.freeze(torch.jit.script(copy.deepcopy(exported)).eval())
    positions = full_positions(ala2_traj, [100, 600], torch.float64)
    for x in positions:
        moved = x.clone().requires_grad_(True)
        expected = [torch.autograd.grad(_autograd_definition(exported, moved)[k], moved)[0] for k in range(2)]
        for module in (scripted, frozen, frozen, frozen):  # the profiling executor optimises after a few calls
            moved = x.clone().requires_grad_(True)
            modes = module(moved)
            for k in range(2):
                gradient = torch.autograd.grad(modes[k], moved, retain_graph=True)[0]
                assert torch.allclose(gradient, expected[k], rtol=1e-10, atol=1e-10 * float(expected[k].abs().max()))
            assert float(modes[0]) == pytest.approx(float(_autograd_definition(exported, x)[0]), abs=1e-12)
            with torch.no_grad():  # the values-only path skips the Jacobian and gives the same numbers
                assert torch.equal(module(x), modes.detach())


def test_the_exported_file_loads_with_plain_torch_jit_load(ala2_model, ala2_traj, tmp_path):
    path = export_slow_modes(ala2_model.model, str(tmp_path / "sub" / "cv.pt"), 3)
    loaded = torch.jit.load(path)
    assert loaded.num_modes == 3 and loaded.num_atoms_required == 19
    assert loaded.temperature == pytest.approx(TEMPERATURE)
    positions = full_positions(ala2_traj, [0, 500, 999])
    np.testing.assert_array_equal(evaluate(loaded, positions), evaluate(slow_mode_module(ala2_model.model, 3),
                                                                        positions))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_a_rigid_motion_of_the_whole_system_leaves_the_cv_unchanged(ala2_model, ala2_traj, dtype, tolerance):
    module = slow_mode_module(ala2_model.model, 2, dtype)
    positions = full_positions(ala2_traj, np.arange(0, 1000, 50), torch.float64)
    rotation = torch.as_tensor(Rotation.random(random_state=5).as_matrix())
    moved = positions @ rotation.T + torch.tensor([1.5, -2.0, 0.7], dtype=torch.float64)
    np.testing.assert_allclose(evaluate(module, moved.to(dtype)), evaluate(module, positions.to(dtype)),
                               atol=tolerance)


def test_the_exported_cv_unwraps_molecules_broken_across_the_box(ala2_model, ala2_traj):
    module = slow_mode_module(ala2_model.model, 2, torch.float64)
    positions = ala2_traj.xyz[::50].astype(np.float64)
    moved, boxes = moved_and_broken(positions, seed=2)
    np.testing.assert_allclose(evaluate(module, torch.as_tensor(moved), torch.as_tensor(boxes)),
                               evaluate(module, torch.as_tensor(positions)), atol=1e-10)


def test_a_distance_student_ignores_rigid_motions_and_unwraps_molecules(ala2_model, ala2_traj):
    student, _ = fit_student(ala2_model.model.flow, 2, steps=20, samples=256, batch=128, progress=False,
                             features=PairDistances(ala2_model.model.frame))
    module = torch.jit.script(StudentModule(ala2_model.model, student, dtype=torch.float64))
    positions = ala2_traj.xyz[::50].astype(np.float64)
    moved, boxes = moved_and_broken(positions, seed=3)
    expected = evaluate(module, torch.as_tensor(positions))
    assert np.ptp(expected, axis=0).min() > 0.1  # the frames differ, so equal values below are not a constant
    np.testing.assert_allclose(evaluate(module, torch.as_tensor(moved), torch.as_tensor(boxes)), expected, atol=1e-10)
    rotation = torch.as_tensor(Rotation.random(random_state=4).as_matrix())
    rotated = torch.as_tensor(positions) @ rotation.T + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    np.testing.assert_allclose(evaluate(module, rotated), expected, atol=1e-10)


@pytest.fixture(scope="module")
def cv_context(ala2_model):
    """A Reference Context of ala2 in vacuum with the two slowest modes (float64 export) as SlowModeCV forces in
    force groups 1 and 2."""
    module = slow_mode_module(ala2_model.model, 2, torch.float64)
    system = builtinSystem("ala2-vacuum").system
    for force in system.getForces():
        force.setForceGroup(0)
    for mode in range(2):
        force = SlowModeCV(module, mode)
        force.setForceGroup(1 + mode)
        system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    return context, module


@pytest.mark.parametrize("mode", [0, 1])
def test_openmm_cv_forces_are_minus_the_gradient_with_no_net_force_or_torque(cv_context, ala2_model, ala2_data,
                                                                          ala2_traj, mode):
    context, module = cv_context
    positions = ala2_traj.xyz[500].astype(np.float64)
    group = {1 + mode}

    def energy(x):
        context.setPositions(x)
        return context.getState(getEnergy=True, groups=group).getPotentialEnergy().value_in_unit(
            unit.kilojoule_per_mole)

    value = energy(positions)
    assert value == pytest.approx(float(module(torch.as_tensor(positions))[mode].detach()), abs=1e-12)
    assert value == pytest.approx(ala2_model.model.transform(ala2_data.positions[500:501])[0, mode], abs=1e-5)
    context.setPositions(positions)
    forces = context.getState(getForces=True, groups=group).getForces(asNumpy=True).value_in_unit(
        unit.kilojoule_per_mole / unit.nanometer)
    step = 1e-5
    gradient = np.zeros_like(positions)
    for atom in range(len(positions)):
        for axis in range(3):
            plus, minus = positions.copy(), positions.copy()
            plus[atom, axis] += step
            minus[atom, axis] -= step
            gradient[atom, axis] = (energy(plus) - energy(minus)) / (2 * step)
    norm = np.linalg.norm(forces)
    assert norm > 0
    np.testing.assert_allclose(forces, -gradient, atol=1e-4 * norm)
    unselected = np.setdiff1d(np.arange(len(positions)), ALA2_HEAVY_ATOMS)
    np.testing.assert_array_equal(forces[unselected], 0.0)
    # Translation and rotation invariance of the CV: no net force and no net torque on the system.
    assert np.linalg.norm(forces.sum(0)) < 1e-4 * norm
    arm = positions - positions[ALA2_HEAVY_ATOMS].mean(0)
    assert np.linalg.norm(np.cross(arm, forces).sum(0)) < 1e-4 * norm


def test_nct_export_cli_writes_a_loadable_file(ala2_model, ala2_traj, tmp_path, capsys):
    out = str(tmp_path / "cv.pt")
    assert main(["export", ala2_model.path, "--modes", "3", "--out", out]) == 0
    printed = capsys.readouterr().out.strip()
    assert len(printed.splitlines()) == 1 and printed.startswith(f"wrote {out}: 3 slowest modes")
    positions = full_positions(ala2_traj, [10, 20])
    np.testing.assert_array_equal(evaluate(torch.jit.load(out), positions),
                                  evaluate(slow_mode_module(ala2_model.model, 3), positions))

    assert main(["export", ala2_model.path, "--student", "--out", str(tmp_path)]) == 2  # before distilling
    assert "--out " + str(tmp_path) + " is a folder" in capsys.readouterr().err
    assert main(["export", ala2_model.path, "--modes", "2", "--double", "--out", out]) == 0
    loaded = torch.jit.load(out)
    assert loaded(positions[0].double()).dtype == torch.float64
    np.testing.assert_allclose(evaluate(loaded, positions.double()),
                               evaluate(slow_mode_module(ala2_model.model, 2, torch.float64), positions.double()),
                               rtol=0, atol=1e-12)
    capsys.readouterr()

    assert main(["export", ala2_model.path, "--modes", "2", "--student", "--student-steps", "30", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "distilled student on internal features: rms error" in printed and f"wrote {out}" in printed
    student = torch.jit.load(out)
    assert student.num_modes == 2 and student.student_report["steps"] == 30
    assert student.student_features == "internal"
    assert evaluate(student, positions).shape == (2, 2)
    assert main(["export", ala2_model.path, "--student", "--student-steps", "30", "--student-features", "distances",
                 "--out", out]) == 0
    assert "input.incidence" in dict(torch.jit.load(out).named_buffers())  # reads distances: no alignment in it
    assert torch.jit.load(out).student_features == "distances"
    capsys.readouterr()
    assert main(["export", ala2_model.path, "--student-features", "distances", "--out", out]) == 2
    assert "add --student" in one_line_error(capsys, "export")
    assert main(["export", ala2_model.path, "--modes", "25", "--out", out]) == 2
    assert "modes must be between 1 and 24" in one_line_error(capsys, "export")


# ---------------------------------------------------------------------------------------------------------------
# 5. Units end to end (issue §6): the harmonic chain's learned frequencies are the analytic ones, in 1/ps
# ---------------------------------------------------------------------------------------------------------------

CHAIN_PARTICLES = 4


def test_harmonic_chain_frequencies_learned_through_the_cli_match_the_analytic_ones(tmp_path, capsys):
    """2 ns of a 4-particle chain (20 000 frames) trained with ``nct train --no-align --select all``.

    Masses (amu), temperature (K → kT), the Maxwell–Boltzmann momenta and the nm/ps units all enter the learned
    frequencies; a kT 15 % too large already moves them by 7 %, beyond the 5 % tolerance."""
    chain = harmonicChainSystem(CHAIN_PARTICLES)
    run = runLangevin(chain, str(tmp_path / "chain"), ns=2.0, platform="Reference", seed=0,
                      friction=5.0 / unit.picosecond, reportInterval=0.1 * unit.picoseconds, progress=False)
    model_path = str(tmp_path / "chain.pt")
    argv = ["train", "--traj", run.trajectory, "--top", run.topology, "--temperature", "300", "--no-align",
            "--select", "all", "--couplings", "2", "--hidden", "16", "--epochs", "8", "--no-progress",
            "--out", model_path]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["info", "--json", model_path]) == 0
    measured = np.array(json.loads(capsys.readouterr().out)["frequencies"])
    assert len(measured) == 3 * CHAIN_PARTICLES  # no rigid-body removal: every coordinate is a mode
    analytic = harmonicChainFrequencies(CHAIN_PARTICLES)
    print(f"harmonic chain n={CHAIN_PARTICLES}: learned ω {measured[:CHAIN_PARTICLES].round(3)} 1/ps, "
          f"analytic {analytic.round(3)}")
    np.testing.assert_allclose(measured[:3], analytic[:3], rtol=0.05)
    np.testing.assert_allclose(measured[:CHAIN_PARTICLES], analytic, rtol=0.05)
    # The 2n y/z modes feel only their tethers: ω = sqrt(100 k / m).
    np.testing.assert_allclose(measured[CHAIN_PARTICLES:], np.sqrt(100 * 1000.0 / 12.0), rtol=0.05)
