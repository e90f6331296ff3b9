"""Enhanced-sampling runs on a trained model: 'nct metad', model/system checks, and the alanine-dipeptide example
on a small setting."""
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import openmm.unit as unit
import pytest

from nct_openmm.cli import main
from nct_openmm.enhanced import (SlowModeMetadynamicsSettings, TemperatureMismatchWarning, _biasFunction,
                                 checkModelForSystem, runSlowModeMetadynamics)
from nct_openmm.systems import builtinSystem, harmonicChainSystem

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


def test_model_refuses_another_system(ala2_model):
    with pytest.raises(ValueError, match="reads atom indices up to 18"):
        checkModelForSystem(ala2_model.model, harmonicChainSystem(4), 300.0)


def test_model_refuses_other_masses(ala2_model):
    chain = harmonicChainSystem(20)
    with pytest.raises(ValueError, match="masses"):
        checkModelForSystem(ala2_model.model, chain, 300.0)


def test_temperature_mismatch_warns(ala2_model):
    with pytest.warns(TemperatureMismatchWarning, match="300.0 K"):
        checkModelForSystem(ala2_model.model, builtinSystem("ala2-vacuum"), 350.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        checkModelForSystem(ala2_model.model, builtinSystem("ala2-vacuum"), 300.0)


@pytest.mark.parametrize("naive", [False, True])
def test_metadynamics_run_deposits_hills_and_writes_outputs(ala2_model, tmp_path, naive):
    settings = SlowModeMetadynamicsSettings(modes=2, frequency=20, height=2.0, naive=naive)
    summary = runSlowModeMetadynamics(ala2_model.model, builtinSystem("ala2-vacuum"), str(tmp_path), 0.004,
                                      settings=settings, platform="Reference", progress=False)
    assert summary["frames"] == 40 and summary["ns_per_day"] > 0
    assert summary["cuda_graphs"] is False  # asked for (the default), but only the CUDA platform has graphs
    for name in ["traj.dcd", "top.pdb", "weights.txt", "summary.json", "fes_phipsi.npz"] + ([] if naive else
                                                                           ["cv.txt", "bias.npz", "fes_modes.png"]):
        assert os.path.getsize(tmp_path / name) > 0, name
    with open(tmp_path / "summary.json") as handle:
        written = json.load(handle)
    for key in ("ns", "ns_per_day", "phi_transitions", "delta_f", "delta_f_error"):
        assert key in written
    weights = np.loadtxt(tmp_path / "weights.txt")
    assert np.all(weights[:4] == 0.0) and np.all(weights[4:] > 0.0)  # the first tenth is discarded
    if not naive:
        cv = np.loadtxt(tmp_path / "cv.txt")
        assert cv.shape == (100, 6)  # a hill every 20 of 2000 steps: step, time, 2 modes, bias, height
        assert np.all(np.diff(cv[:, 0]) == 20)


def test_the_naive_bias_is_the_grid_inside_and_zero_outside():
    """app.Metadynamics's tabulated bias is 0 outside its grid (OpenMM's tabulated functions are), so frames there
    get no bias: not an extrapolated one, nor one shifted by the grid's minimum."""
    variables = [SimpleNamespace(minValue=-1.0, maxValue=1.0, gridWidth=5), SimpleNamespace(minValue=0.0,
                                                                                             maxValue=2.0, gridWidth=3)]
    bias = 2.0 + np.arange(15.0).reshape(3, 5)  # V on the grid, axes last variable first
    settings = SlowModeMetadynamicsSettings(naive=True, biasFactor=6.0)
    free = -settings.biasFactor / (settings.biasFactor - 1.0) * bias
    naive = SimpleNamespace(variables=variables, getFreeEnergy=lambda: free * unit.kilojoule_per_mole)
    biasAt = _biasFunction(naive, None, settings, 300.0)
    np.testing.assert_allclose(biasAt(np.array([[-1.0, 0.0], [0.5, 2.0], [0.25, 1.0]])), [2.0, 15.0, 9.5])
    np.testing.assert_array_equal(biasAt(np.array([[1.5, 1.0], [0.0, -0.1]])), [0.0, 0.0])


def test_metad_cli_errors(ala2_model, tmp_path, capsys):
    assert main(["metad", "--model", ala2_model.path, "--system", "ala2-vacuum", "--ns", "0.001", "--modes", "4",
                 "--out", str(tmp_path)]) == 2
    assert "--modes" in capsys.readouterr().err
    assert main(["metad", "--model", ala2_model.path, "--system", "ala2-vacuum", "--ns", "0.001", "--platform",
                 "Nonexistent", "--out", str(tmp_path)]) == 2
    assert "Nonexistent" in capsys.readouterr().err
    assert main(["metad", "--model", ala2_model.path, "--system", "ala2-vacuum", "--ns", "-1", "--out",
                 str(tmp_path / "never")]) == 2
    assert "the run length must be positive, got -1.0 ns" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
    (tmp_path / "a_file").write_text("")
    assert main(["metad", "--model", ala2_model.path, "--system", "ala2-vacuum", "--ns", "0.001", "--out",
                 str(tmp_path / "a_file")]) == 2
    assert "the output folder" in capsys.readouterr().err


def test_metad_cli_runs(ala2_model, tmp_path, capsys):
    assert main(["metad", "--model", ala2_model.path, "--system", "ala2-vacuum", "--ns", "0.002", "--frequency",
                 "50", "--platform", "Reference", "--out", str(tmp_path), "--no-progress", "--no-cuda-graphs"]) == 0
    assert "phi transitions" in capsys.readouterr().out
    with open(tmp_path / "summary.json") as handle:
        summary = json.load(handle)
    assert summary["settings"]["cudaGraphs"] is False and summary["cuda_graphs"] is False


def test_alanine_dipeptide_example_small_setting(ala2_model, tmp_path):
    spec = importlib.util.spec_from_file_location("ala2_metad_example",
                                                  os.path.join(EXAMPLES, "alanine_dipeptide_metad.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    document = example.main(["--model", ala2_model.path, "--ns", "0.004", "--out", str(tmp_path), "--no-progress"])
    assert set(document["results"]) == {"nct", "phi_psi", "unbiased"}
    for result in document["results"].values():
        assert result["frames"] == 40
    assert (tmp_path / "comparison.json").exists()


def test_student_cv_with_multiple_time_stepping(ala2_model, tmp_path):
    """The fast path of 'nct metad': a distilled CV applied every 4th step; hills and frames keep their schedule."""
    settings = SlowModeMetadynamicsSettings(modes=2, frequency=25, height=2.0, student=True, studentSteps=200,
                                            biasStride=5)
    summary = runSlowModeMetadynamics(ala2_model.model, builtinSystem("ala2-vacuum"), str(tmp_path), 0.004,
                                      settings=settings, platform="Reference", progress=False)
    assert summary["frames"] == 40 and summary["frame_interval_ps"] == pytest.approx(0.1)
    assert set(summary["student_report"]) >= {"value_rms", "gradient_relative"}
    cv = np.loadtxt(tmp_path / "cv.txt")
    assert cv.shape == (80, 6) and np.all(np.diff(cv[:, 0]) == 5)  # a hill every 5 outer steps of 10 fs


@pytest.mark.parametrize("stride, naive, message", [(0, False, "positive divisor of the hill frequency"),
                                                     (3, False, "positive divisor of the hill frequency"),
                                                     (2, True, "naive comparison .* takes no bias stride")])
def test_a_bad_bias_stride_is_refused_before_anything_runs(ala2_model, tmp_path, stride, naive, message):
    settings = SlowModeMetadynamicsSettings(frequency=20, biasStride=stride, naive=naive)
    with pytest.raises(ValueError, match=message):
        runSlowModeMetadynamics(ala2_model.model, builtinSystem("ala2-vacuum"), str(tmp_path / "run"), 0.001,
                                settings=settings, platform="Reference", progress=False)
    assert not (tmp_path / "run").exists()


def test_student_features_without_a_student_are_refused(ala2_model, tmp_path):
    settings = SlowModeMetadynamicsSettings(studentFeatures="distances")
    with pytest.raises(ValueError, match="set student=True"):
        runSlowModeMetadynamics(ala2_model.model, builtinSystem("ala2-vacuum"), str(tmp_path / "run"), 0.001,
                                settings=settings, platform="Reference", progress=False)
    assert not (tmp_path / "run").exists()


def test_metad_cli_refuses_a_stride_that_does_not_divide_the_hill_frequency(ala2_model, tmp_path, capsys):
    assert main(["metad", "--model", ala2_model.path, "--system", "ala2-vacuum", "--ns", "0.001", "--frequency",
                 "50", "--bias-stride", "4", "--out", str(tmp_path)]) == 2
    assert "--bias-stride" in capsys.readouterr().err
    assert main(["metad", "--model", ala2_model.path, "--system", "ala2-vacuum", "--ns", "0.001", "--naive",
                 "--student", "--out", str(tmp_path)]) == 2
    assert "--naive" in capsys.readouterr().err
    assert main(["metad", "--model", ala2_model.path, "--system", "ala2-vacuum", "--ns", "0.001",
                 "--student-features", "distances", "--out", str(tmp_path)]) == 2
    assert "add --student" in capsys.readouterr().err


def test_the_command_line_parser_does_not_load_openmm_torch():
    """A broken openmm-torch install (an ABI mismatch) must leave nct sample, train, info, analyze and export working:
    only nct metad needs it, and imports it when it runs."""
    code = ("import sys; from nct_openmm.cli import build_parser; build_parser(); "
            "sys.exit(1 if 'openmmtorch' in sys.modules else 0)")
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment = dict(os.environ, PYTHONPATH=repository)
    assert subprocess.run([sys.executable, "-c", code], cwd=repository, env=environment).returncode == 0


def test_metad_takes_the_system_options_of_sample(ala2_model, tmp_path, capsys):
    """A model trained on an implicit-solvent or force-field run is biased in the same Hamiltonian: nct metad
    builds its System with nct sample's options (they used to differ, and --forcefield was ignored there)."""
    base = ["metad", "--model", ala2_model.path, "--ns", "0.001", "--out", str(tmp_path / "run")]
    assert main(base + ["--system", "ala2-vacuum", "--implicit-solvent", "OBC2"]) == 2
    assert "--implicit-solvent cannot be combined with --system" in capsys.readouterr().err
    assert main(base + ["--system", "ala2-vacuum", "--forcefield", "amber14-all.xml"]) == 2
    assert "--forcefield cannot be combined with --system" in capsys.readouterr().err
