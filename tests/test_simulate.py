"""Tests of nct_openmm.simulate and the ``nct sample`` command, with short runs on the Reference platform."""
from types import SimpleNamespace

import mdtraj
import numpy as np
import openmm.unit as unit
import pytest

from nct_openmm.cli import main
from nct_openmm.simulate import DihedralMetadynamics, _writeReweightingFactors, runLangevin
from nct_openmm.systems import builtinSystem, harmonicChainSystem

SHORT = dict(ns=0.0002, platform="Reference", reportInterval=0.02 * unit.picoseconds, progress=False)


@pytest.fixture(scope="module")
def ala2():
    return builtinSystem("ala2-vacuum")


def test_run_writes_a_trajectory_mdtraj_reads(ala2, tmp_path):
    result = runLangevin(ala2, str(tmp_path / "new" / "folder"), **SHORT)
    trajectory = mdtraj.load(result.trajectory, top=result.topology)
    assert result.nFrames == trajectory.n_frames == 10
    assert trajectory.n_atoms == 22
    assert result.ns == pytest.approx(0.0002)
    assert result.platform == "Reference"
    assert result.nsPerDay > 0


def test_same_seed_same_trajectory_other_seed_other_trajectory(ala2, tmp_path):
    def positions(folder, seed):
        result = runLangevin(ala2, str(tmp_path / folder), seed=seed, **SHORT)
        return mdtraj.load(result.trajectory, top=result.topology).xyz

    first = positions("a", seed=0)
    np.testing.assert_array_equal(first, positions("b", seed=0))
    assert not np.allclose(first, positions("c", seed=1))


def test_run_leaves_the_system_unchanged_and_overwrites_the_output(tmp_path):
    chain = harmonicChainSystem(3)
    forcesBefore = chain.system.getNumForces()
    runLangevin(chain, str(tmp_path), ns=0.001, platform="Reference", progress=False, reportInterval=0.1)
    (tmp_path / "weights.txt").write_text("1\n" * 10)  # as an earlier biased run into this folder left it
    result = runLangevin(chain, str(tmp_path), **SHORT)
    assert chain.system.getNumForces() == forcesBefore
    assert mdtraj.load(result.trajectory, top=result.topology).n_frames == 10
    assert result.weights is None and not (tmp_path / "weights.txt").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(ns=0.00001), "shorter than one report interval"),
        (dict(reportInterval=0.003), "whole number"),
        (dict(seed=-1), "seed must be"),
        (dict(platform="Nonsense"), "available platforms"),
    ],
)
def test_run_rejects_bad_arguments(ala2, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        runLangevin(ala2, str(tmp_path), **{**SHORT, **options})


def test_nct_sample_end_to_end(tmp_path, capsys):
    out = tmp_path / "ala2"
    argv = ["sample", "--system", "ala2-vacuum", "--ns", "0.0002", "--platform", "Reference"]
    argv += ["--report-interval", "0.02", "--seed", "3", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()
    assert len(printed.splitlines()) == 1
    assert "10 frames" in printed and "ns/day on Reference" in printed
    assert mdtraj.load(str(out / "traj.dcd"), top=str(out / "top.pdb")).n_frames == 10


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--system", "ala2-vacuum", "--platform", "Nonsense"], "OpenMM platform 'Nonsense' is not available"),
        (["--system", "ala3"], "unknown built-in system 'ala3'"),
        (["--pdb", "missing.pdb"], "input file not found: missing.pdb"),
        (["--system", "ala2-vacuum", "--inpcrd", "x.crd"], "--inpcrd cannot be combined with --system"),
        ([], "give --system, --pdb or --prmtop"),
    ],
)
def test_nct_sample_errors_are_one_line_with_exit_code_2(tmp_path, capsys, extra, message):
    argv = ["sample", "--ns", "0.0002", "--no-progress", "--out", str(tmp_path)]
    assert main(argv + extra) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("nct sample: error: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.out == ""


def test_reweighting_factors_interpolate_the_final_bias_between_grid_nodes(ala2_run, tmp_path):
    """V(Φ, Ψ) = 5 cos Φ + 3 sin Ψ kJ/mol on the (Ψ, Φ) grid of app.Metadynamics: the factors are exp(V/kT) at
    each frame's angles to the grid's interpolation error (the nearest node, used before, was off by about 9 %),
    and 0 for the discarded first tenth."""
    settings = DihedralMetadynamics()
    nodes = np.linspace(-np.pi, np.pi, settings.gridWidth)
    psi, phi = np.meshgrid(nodes, nodes, indexing="ij")
    bias = 5.0 * np.cos(phi) + 3.0 * np.sin(psi)
    temperature = 300.0
    deltaT = temperature * (settings.biasFactor - 1.0)
    freeEnergy = -(temperature + deltaT) / deltaT * bias
    finalBias = SimpleNamespace(getFreeEnergy=lambda: freeEnergy * unit.kilojoule_per_mole)
    path = str(tmp_path / "weights.txt")
    _writeReweightingFactors(finalBias, ala2_run.trajectory, ala2_run.topology, temperature, settings, path)
    weights = np.loadtxt(path)
    traj = mdtraj.load(ala2_run.trajectory, top=ala2_run.topology)
    angles = np.stack([mdtraj.compute_phi(traj)[1][:, 0], mdtraj.compute_psi(traj)[1][:, 0]], axis=1)
    expected = np.exp((5.0 * np.cos(angles[:, 0]) + 3.0 * np.sin(angles[:, 1])) / (0.0083144626181532 * temperature))
    kept = int(settings.discard * len(weights))
    assert np.all(weights[:kept] == 0.0)
    expected = expected[kept:] * (len(weights) / expected[kept:].sum())
    np.testing.assert_allclose(weights[kept:], expected, rtol=1e-2)
