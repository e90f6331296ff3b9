"""Analyses of a trained model (nct_openmm.analysis.model_analysis) and the ``nct analyze`` command, on a tiny model
trained on 100 ps of alanine dipeptide in vacuum."""
import dataclasses
import doctest
import json
import shutil
from types import SimpleNamespace

import mdtraj
import numpy as np
import pytest
import torch

from nct_openmm.analysis import (backbone_dihedrals, configuration_log_likelihood, dihedral_information, harmonic_pca,
                                 interpolate, largest_gap, model_analysis, mutual_information_matrix,
                                 prior_samples_along_modes, spectrum_report, write_positions_as_trajectory)
from nct_openmm.cli import main
from nct_openmm.core import FlowConfig, model_from_data
from nct_openmm.data import load_trajectories
from nct_openmm.simulate import runLangevin
from nct_openmm.slowmodes import NCT, SlowModeModel
from nct_openmm.systems import builtinSystem

REQUIRED_KEYS = {"frequencies", "pca_frequencies", "mi_phi", "mi_psi", "pca_mi_phi", "pca_mi_psi", "span", "gap",
                 "n_frames", "training_sources", "analysed_trajectory_in_training"}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    # The tensors here are tiny: a second intra-op thread only adds contention, which on a busy machine slows
    # training by an order of magnitude.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ala2(tmp_path_factory, single_thread):
    folder = tmp_path_factory.mktemp("ala2")
    run = runLangevin(builtinSystem("ala2-vacuum"), str(folder), ns=0.1, platform="Reference", progress=False)
    data = load_trajectories([run.trajectory], run.topology)
    estimator = NCT(300, n_couplings=2, hidden=16, max_steps=60, batch_size=64, progress=False)
    model = estimator.fit(data).fetch_model()
    model_path = folder / "model.pt"
    model.save(model_path)
    return SimpleNamespace(folder=folder, traj=run.trajectory, top=run.topology, data=data, model=model,
                           model_path=str(model_path), estimator=estimator)


def aligned(model, positions):
    return model.frame.whole(torch.as_tensor(positions, dtype=torch.float64)).numpy()


# --- spectrum -------------------------------------------------------------------------------------------------------


def test_spectrum_report_matches_the_model_and_harmonic_pca(ala2):
    model, data = ala2.model, ala2.data
    report = spectrum_report(model, data)
    np.testing.assert_allclose(report["frequencies"], model.frequencies)
    assert report["span"] == pytest.approx(model.frequencies[-1] / model.frequencies[0])
    index, ratio = largest_gap(model.frequencies)
    assert report["gap"] == {"index": index, "ratio": pytest.approx(ratio)}
    assert report["n_frames"] == data.n_frames == 200 and len(report["pca_frequencies"]) == model.n_modes
    # u is in ps (divided by √kT); in mass-weighted sqrt(amu)·nm the same PCA reads ω = sqrt(kT / λ).
    u = model.internal_coordinates(data.positions).numpy()
    kT = model.frame.kT
    np.testing.assert_allclose(report["pca_frequencies"], harmonic_pca(u * np.sqrt(kT), kT).frequencies, rtol=1e-10)
    # Independently of the internal basis: PCA of the aligned mass-weighted Cartesians has the same 3n − 6 finite
    # frequencies (the basis is an isometry), plus six rigid-body directions of zero variance.
    mass_weighted = aligned(model, data.positions) * np.sqrt(data.masses)[:, None]
    cartesian = harmonic_pca(mass_weighted.reshape(data.n_frames, -1), kT).frequencies
    np.testing.assert_allclose(report["pca_frequencies"], cartesian[: model.n_modes], rtol=1e-6)


def test_untrained_flow_is_the_pca_limit(ala2):
    data = ala2.data
    frame = ala2.estimator.make_frame(data)
    u = frame.internal(torch.as_tensor(data.positions)).float()
    untrained = SlowModeModel(frame, model_from_data(FlowConfig(dim=frame.dim, n_couplings=2, hidden=16), u))
    report = spectrum_report(untrained, data)
    # The flow starts from the biased (1/N) covariance, harmonic_pca uses the unbiased 1/(N − 1) one.
    n = data.n_frames
    np.testing.assert_allclose(report["pca_frequencies"], untrained.frequencies * np.sqrt((n - 1) / n), rtol=1e-5)
    # Its exact density is then the Gaussian of the data: ln|det J| is the constant −ln √det Σ.
    from scipy.stats import multivariate_normal

    u64 = untrained.internal_coordinates(data.positions).numpy()
    gaussian = multivariate_normal(u64.mean(0), np.cov(u64.T, bias=True))
    np.testing.assert_allclose(configuration_log_likelihood(untrained, data.positions[:5]), gaussian.logpdf(u64[:5]),
                               atol=2e-3)


# --- dihedrals ------------------------------------------------------------------------------------------------------


def test_dihedral_information_of_the_peptide(ala2):
    info = dihedral_information(ala2.model, ala2.data, n_modes=3)
    for key in ("mi_phi", "mi_psi", "pca_mi_phi", "pca_mi_psi"):
        assert len(info[key]) == 3 and np.all(np.isfinite(info[key]))
    # The full trajectory gives the same angles as the selected heavy atoms, hence the same estimates.
    full = mdtraj.load(ala2.traj, top=ala2.top)
    assert dihedral_information(ala2.model, ala2.data, full, n_modes=3)["mi_phi"] == pytest.approx(info["mi_phi"])


def test_dihedral_information_of_weighted_data_uses_the_reweighted_ensemble(ala2):
    """KSG takes no weights: with weights, the estimates come from the frames a rejection draw by weight keeps
    (none of weight 0), the ensemble the PCA baseline is fitted to."""
    weights = np.where(np.arange(ala2.data.n_frames) % 2 == 0, 0.0, np.linspace(0.2, 1.0, ala2.data.n_frames))
    weighted = dataclasses.replace(ala2.data, weights=weights)
    info = dihedral_information(ala2.model, weighted, n_modes=2)
    assert info["mi_ensemble"] == "reweighted subsample" and 0 < info["mi_frames"] < ala2.data.n_frames / 2
    kept = np.flatnonzero(np.random.default_rng(0).uniform(size=len(weights)) * weights.max() < weights)
    assert np.all(weights[kept] > 0) and len(kept) == info["mi_frames"]
    phi, _ = backbone_dihedrals(mdtraj.load(ala2.traj, top=ala2.top))
    expected = mutual_information_matrix(ala2.model.transform(weighted, k=2)[kept], {"phi": phi[kept]})["phi"]
    assert info["mi_phi"] == pytest.approx(expected)
    assert dihedral_information(ala2.model, ala2.data, n_modes=2)["mi_ensemble"] == "unweighted"


def test_dihedral_information_rejects_non_peptides_and_mismatched_inputs(ala2):
    model, data = ala2.model, ala2.data
    top = mdtraj.Topology()
    residue = top.add_residue("UNK", top.add_chain())
    _ = [top.add_atom(f"C{i}", mdtraj.element.carbon, residue) for i in range(4)]
    not_a_peptide = mdtraj.Trajectory(np.zeros((data.n_frames, 4, 3)), top)
    with pytest.raises(ValueError, match="needs a peptide: the topology has no backbone phi/psi"):
        dihedral_information(model, data, not_a_peptide)
    with pytest.raises(ValueError, match="the same frames"):
        dihedral_information(model, data, mdtraj.load(ala2.traj, top=ala2.top)[:10])
    with pytest.raises(ValueError, match="atoms per frame but the model reads"):
        spectrum_report(model, data.positions[:, :5])
    other_atoms = load_trajectories([ala2.traj], ala2.top, selection="name CA")
    with pytest.raises(ValueError, match="the model's atom selection"):
        spectrum_report(model, other_atoms)


# --- interpolation and mode scans -----------------------------------------------------------------------------------


@pytest.mark.parametrize("modes", [None, 2])
def test_interpolation_reproduces_its_endpoints(ala2, modes):
    model, positions = ala2.model, ala2.data.positions
    start, end = positions[0], positions[-1]
    path = interpolate(model, start, end, n_frames=12, modes=modes)
    assert path.positions.shape == (12,) + start.shape
    assert np.abs(path.positions[0] - aligned(model, start)).max() < 1e-3
    assert np.abs(path.positions[-1] - aligned(model, end)).max() < 1e-3
    assert np.all(np.isfinite(path.log_likelihood))
    eps = model.transform(np.stack([start, end]), scaled=True)
    np.testing.assert_allclose(path.latent[[0, -1]], eps, atol=1e-4)
    # The decoded structures encode back to the path, and the reported density is theirs.
    np.testing.assert_allclose(model.transform(path.positions, scaled=True), path.latent, atol=1e-3)
    np.testing.assert_allclose(configuration_log_likelihood(model, path.positions), path.log_likelihood, atol=1e-3)
    if modes is not None:
        # Only the slowest `modes` components follow the great circle; the faster ones are linear in t.
        t = path.parameter[:, None]
        fast = path.latent[:, modes:]
        np.testing.assert_allclose(fast, (1 - t) * fast[0] + t * fast[-1], atol=1e-12)
    with pytest.raises(ValueError, match="n_frames"):
        interpolate(model, start, end, n_frames=1)


@pytest.mark.parametrize("mode, others", [(0, 0), (2, "sample")])
def test_prior_samples_scan_the_requested_range(ala2, mode, others):
    model = ala2.model
    scan = prior_samples_along_modes(model, mode, n=9, others=others, seed=1)
    omega = model.frequencies[mode]
    np.testing.assert_allclose(scan.parameter, np.linspace(-1.0, 1.0, 9) / omega, rtol=1e-6)
    Q = model.transform(scan.positions, scaled=False)
    np.testing.assert_allclose(Q[:, mode], scan.parameter, atol=1e-4 / omega)
    assert Q[:, mode].min() == pytest.approx(-1 / omega, rel=1e-3)
    assert Q[:, mode].max() == pytest.approx(1 / omega, rel=1e-3)
    rest = np.delete(model.transform(scan.positions, scaled=True), mode, axis=1)
    if others == 0:
        assert np.abs(rest).max() < 1e-3
    else:
        assert rest.std() > 0.5  # drawn from the prior: unit variance in ε
    assert np.all(np.isfinite(scan.log_likelihood))
    with pytest.raises(ValueError, match="mode must be between"):
        prior_samples_along_modes(model, model.n_modes)
    with pytest.raises(ValueError, match="others"):
        prior_samples_along_modes(model, 0, others="draw")


def test_positions_are_written_as_dcd_and_pdb(ala2, tmp_path):
    topology = ala2.data.topology.subset(ala2.data.atom_indices)
    positions = ala2.data.positions[:3]
    write_positions_as_trajectory(positions, topology, tmp_path / "x.pdb")
    write_positions_as_trajectory(positions, topology, tmp_path / "x.dcd")
    back = mdtraj.load(str(tmp_path / "x.dcd"), top=str(tmp_path / "x.pdb"))
    np.testing.assert_allclose(back.xyz, positions, atol=1e-3)  # PDB/DCD precision
    with pytest.raises(ValueError, match="atoms but the topology has"):
        write_positions_as_trajectory(positions[:, :4], topology, tmp_path / "y.pdb")
    with pytest.raises(ValueError, match="cannot write"):
        write_positions_as_trajectory(positions, topology, tmp_path / "y.unknown")


# --- command line ---------------------------------------------------------------------------------------------------


def test_analyze_writes_the_report_and_figures(ala2, tmp_path, capsys):
    report_path, plots = tmp_path / "report.json", tmp_path / "plots"
    code = main(["analyze", ala2.model_path, "--traj", ala2.traj, "--top", ala2.top, "--json", str(report_path),
                 "--plot", str(plots), "--modes", "4"])
    assert code == 0
    out = capsys.readouterr().out
    assert "ω NCT" in out and "I(Φ) NCT" in out
    report = json.loads(report_path.read_text())
    assert REQUIRED_KEYS <= set(report)
    assert len(report["mi_phi"]) == len(report["pca_mi_psi"]) == 4
    assert report["n_frames"] == 200 and report["analysed_trajectory_in_training"] is True
    assert report["training_sources"] == ala2.model.metadata["training"]["sources"]
    np.testing.assert_allclose(report["frequencies"], ala2.model.frequencies, rtol=1e-6)
    for name in ("spectrum.png", "mutual_information.png", "ramachandran.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = mdtraj.load(str(plots / "interpolation.dcd"), top=str(plots / "interpolation.pdb"))
    assert path.n_frames == 20 and path.n_atoms == len(ala2.model.atom_indices)


def test_analyze_without_a_backbone_reports_the_spectrum_only(ala2, tmp_path, capsys):
    # Renaming the α carbons hides the backbone from mdtraj while keeping the masses, so the model still applies.
    top = mdtraj.load(ala2.top)
    for atom in top.topology.atoms:
        if atom.name == "CA":
            atom.name = "CX"
    top.save(str(tmp_path / "renamed.pdb"))
    copy = tmp_path / "copy.dcd"
    shutil.copy(ala2.traj, copy)
    report_path = tmp_path / "report.json"
    code = main(["analyze", ala2.model_path, "--traj", str(copy), "--top", str(tmp_path / "renamed.pdb"),
                 "--json", str(report_path), "--stride", "2"])
    assert code == 0
    assert "no mutual information" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["mi_phi"] is None and "needs a peptide" in report["mi_note"]
    assert report["n_frames"] == 100 and report["analysed_trajectory_in_training"] is False


def test_analyze_checks_its_output_folder_before_the_analysis(ala2, tmp_path, capsys):
    missing = tmp_path / "missing" / "report.json"
    assert main(["analyze", ala2.model_path, "--traj", ala2.traj, "--top", ala2.top, "--json", str(missing)]) == 2
    assert "the folder of --json does not exist" in capsys.readouterr().err


def test_analyze_rejects_a_topology_of_another_system(ala2, tmp_path, capsys):
    heavy = mdtraj.load(ala2.top).atom_slice(ala2.model.atom_indices)
    heavy.save(str(tmp_path / "heavy.pdb"))
    assert main(["analyze", ala2.model_path, "--traj", ala2.traj, "--top", str(tmp_path / "heavy.pdb")]) == 2
    assert "another system" in capsys.readouterr().err
    swapped = mdtraj.load(ala2.top)
    swapped.topology.atom(ala2.model.atom_indices[0]).element = mdtraj.element.sulfur
    swapped.save(str(tmp_path / "swapped.pdb"))
    assert main(["analyze", ala2.model_path, "--traj", ala2.traj, "--top", str(tmp_path / "swapped.pdb")]) == 2
    assert "not the one the model was trained on" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing.pt"), "--traj", ala2.traj, "--top", ala2.top]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_docstring_examples_run():
    result = doctest.testmod(model_analysis, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
