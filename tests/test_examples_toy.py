"""The paper's toy experiments (examples/harmonic_chain.py, examples/ringworld.py), run on a small setting through
their ``main`` functions, checked against exact answers: normal-mode frequencies and ``−ln Z`` for the harmonic
chain; the angle as the slowest mode and the free-energy gap for ring world."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harmonic_chain_exact_answers_match_a_direct_computation():
    chain = load_example("harmonic_chain")
    n = 8
    stiffness = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    eigenvalues, vectors = np.linalg.eigh(stiffness)
    assert np.allclose(np.sqrt(eigenvalues), chain.analytic_frequencies(n))
    cosines = np.abs((vectors.T * chain.normal_modes(n)).sum(1)) / np.linalg.norm(chain.normal_modes(n), axis=1)
    assert np.allclose(cosines, 1.0)
    # −ln Z of the Gaussian directly: (2π)^n for momenta, (2π)^(n/2) det(K)^(−1/2) for positions.
    direct = -(n * math.log(2 * math.pi) - 0.5 * np.linalg.slogdet(stiffness)[1])
    assert chain.exact_free_energy(n) == pytest.approx(direct)
    assert chain.exact_free_energy(32) == pytest.approx(-57.06, abs=0.01)


def test_harmonic_chain_learns_the_normal_modes(tmp_path):
    chain = load_example("harmonic_chain")
    result = chain.main(["--n", "8", "--steps", "600", "--couplings", "2", "--hidden", "32",
                         "--json", str(tmp_path / "chain.json"), "--plot", str(tmp_path / "chain.png")])
    assert json.loads((tmp_path / "chain.json").read_text())["n"] == 8
    assert (tmp_path / "chain.png").stat().st_size > 0
    ratios = np.array(result["frequencies"][:3]) / np.array(result["analytic_frequencies"][:3])
    assert np.all(np.abs(ratios - 1) < 0.05), ratios
    # A variational free energy is an upper bound of −ln Z; near the optimum it is only a little above.
    assert -5 * result["final_loss_stderr"] < result["loss_gap"] < 0.1
    assert min(result["jacobian_cosines"]) > 0.99


def test_ringworld_exact_free_energy_and_samples():
    ring = load_example("ringworld")
    assert ring.exact_free_energy() == pytest.approx(-4.372, abs=0.002)
    q = ring.exact_samples(100000, seed=0).numpy()
    radius = np.hypot(q[:, 0], q[:, 1])
    # Radial law r·N(r; μ = 2, σ² = 0.16) (the Gaussian's weight below r = 0 is ~1e-36): mean E[r²]/E[r] =
    # (μ² + σ²)/μ = 2.08, variance E[r³]/E[r] − mean² = (μ² + 3σ²) − 2.08² = 0.1536.
    assert radius.mean() == pytest.approx(2.08, abs=0.005)
    assert radius.std() == pytest.approx(math.sqrt(0.1536), abs=0.005)
    histogram, _ = np.histogram(np.arctan2(q[:, 1], q[:, 0]), bins=8, range=(-np.pi, np.pi))
    assert np.allclose(histogram / len(q), 1 / 8, atol=0.005)


def test_ringworld_finds_the_angle_as_the_slow_mode(tmp_path):
    # A reduced run (~15 s). It unrolled the ring for 8 of 8 seeds once ω train at the flow's pace (the example's
    # default); with the core's 10x ω rate, 4 of 8 seeds ended in the isotropic local minimum described below.
    ring = load_example("ringworld")
    result = ring.main(["--steps", "800", "--couplings", "4", "--hidden", "32", "--samples", "4000",
                        "--json", str(tmp_path / "ring.json"), "--plot", str(tmp_path / "ring.png")])
    assert json.loads((tmp_path / "ring.json").read_text())["spearman_on"] == "samples drawn from the model"
    assert (tmp_path / "ring.png").stat().st_size > 0
    # The isotropic local minimum (a hole punched into a Cartesian Gaussian) has |Spearman| ≈ 0.75 with the angle,
    # ≈ 0.05 with the radius and a gap ≈ 0.55-0.75 kT; the unrolled ring has |Spearman| ≈ 1 and a gap of 0.3-0.45 kT
    # in this reduced setting.
    assert result["spearman_angle"] > 0.98
    assert result["spearman_radius"] > 0.85
    assert -5 * result["final_loss_stderr"] < result["loss_gap"] < 0.5
    assert result["frequencies"][1] / result["frequencies"][0] > 3
    # The gap splits into a momentum (non-isometric Jacobian) and a configurational part, both non-negative.
    assert result["loss_gap_momentum"] > 0 and result["loss_gap_configuration"] > -0.05


@pytest.mark.slow
def test_ringworld_default_settings(tmp_path):
    """The example as shipped (~1.5 min): seeds 0-3 gave gaps of 0.27-0.31 kT, |Spearman| ≥ 0.9999 with the angle and
    0.949-0.964 with the radius (0.96-0.97 before training's rounding changed with the closed-form cotangent lift
    and the fused optimiser: the same optimisation, a different path)."""
    ring = load_example("ringworld")
    result = ring.main(["--json", str(tmp_path / "ring.json")])
    assert result["spearman_angle"] > 0.995
    assert result["spearman_radius"] > 0.93
    assert -5 * result["final_loss_stderr"] < result["loss_gap"] < 0.35


@pytest.mark.slow
def test_harmonic_chain_default_settings():
    """The example as shipped, n = 32 (~35 s): the slowest five ω within 2 %, the loss within 0.3 kT of exact (seeds
    0-3 gave ≤ 1.6 % and 0.017-0.029 kT)."""
    chain = load_example("harmonic_chain")
    result = chain.main([])
    assert np.all(np.abs(np.array(result["frequency_ratios"][:5]) - 1) < 0.02), result["frequency_ratios"][:5]
    assert -5 * result["final_loss_stderr"] < result["loss_gap"] < 0.3
    assert min(result["jacobian_cosines"]) > 0.99
