"""Numerics of nct_openmm.analysis checked against analytic answers: Gaussian mutual information, harmonic
frequencies, populations of two-state series, and the documentation examples."""
import doctest

import mdtraj
import numpy as np
import pytest

from nct_openmm import analysis
from nct_openmm.analysis import dihedrals, information, pca, plots

KT = 2.494  # kJ/mol at 300 K


# --- mutual information ---------------------------------------------------------------------------------------------


def correlated_gaussian(r, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    return x, r * x + np.sqrt(1.0 - r**2) * rng.normal(size=n)


@pytest.mark.parametrize("r", [0.0, 0.5, 0.9])
def test_gaussian_mutual_information_matches_analytic(r):
    x, y = correlated_gaussian(r, n=5000, seed=7)
    assert analysis.mutual_information(x, y) == pytest.approx(-0.5 * np.log(1.0 - r**2), abs=0.03)


def test_mutual_information_is_invariant_to_rescaling_each_variable():
    x, y = correlated_gaussian(0.7, n=3000, seed=3)
    assert analysis.mutual_information(100.0 * x, 0.01 * y) == pytest.approx(analysis.mutual_information(x, y))


def test_independent_multivariate_variables_have_zero_mutual_information():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(5000, 2)), rng.uniform(size=(5000, 1))
    assert abs(analysis.mutual_information(x, y)) < 0.02
    assert analysis.mutual_information(x, y, clip=True) >= 0.0


def test_angle_and_its_cosine_share_information_when_treated_as_periodic():
    rng = np.random.default_rng(5)
    theta = rng.uniform(-np.pi, np.pi, size=5000)
    y = np.cos(theta) + 0.2 * rng.normal(size=5000)
    assert analysis.mutual_information(theta, y, periodic_x=True) > 0.5


def test_periodic_estimate_does_not_depend_on_where_the_angle_is_cut():
    # Moving the cut from ±pi to another angle changes a line variable, not a point on the circle.
    rng = np.random.default_rng(6)
    theta = rng.uniform(-np.pi, np.pi, size=4000)
    shifted = np.mod(theta + 1.0 + np.pi, 2.0 * np.pi) - np.pi
    y = np.cos(theta) + 0.2 * rng.normal(size=4000)
    periodic = analysis.mutual_information(theta, y, periodic_x=True)
    assert analysis.mutual_information(shifted, y, periodic_x=True) == pytest.approx(periodic, abs=0.05)


def test_mutual_information_is_deterministic_with_ties():
    rng = np.random.default_rng(8)
    x = rng.integers(0, 5, size=2000).astype(float)
    y = x + rng.integers(0, 3, size=2000)
    first = analysis.mutual_information(x, y)
    assert np.isfinite(first) and first == analysis.mutual_information(x, y)


def test_mutual_information_matrix_lists_one_value_per_mode_and_angle():
    rng = np.random.default_rng(10)
    phi, psi = rng.uniform(-np.pi, np.pi, size=(2, 3000))
    modes = np.stack([np.cos(phi), np.sin(psi), rng.normal(size=3000)], axis=1)
    mi = analysis.mutual_information_matrix(modes, {"phi": phi, "psi": psi})
    assert set(mi) == {"phi", "psi"} and all(len(values) == 3 for values in mi.values())
    assert mi["phi"][0] > 1.0 and mi["psi"][1] > 1.0
    assert max(abs(mi["phi"][1]), abs(mi["phi"][2]), abs(mi["psi"][0]), abs(mi["psi"][2])) < 0.03


def test_mutual_information_rejects_mismatched_samples():
    with pytest.raises(ValueError, match="different numbers"):
        analysis.mutual_information(np.zeros(10), np.zeros(11))


# --- harmonic PCA ---------------------------------------------------------------------------------------------------


def test_harmonic_pca_recovers_the_frequencies_of_a_gaussian():
    omegas = np.array([2.0, 5.0, 30.0, 80.0])  # 1/ps
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    covariance = rotation @ np.diag(KT / omegas**2) @ rotation.T
    u = rng.multivariate_normal(np.arange(4.0), covariance, size=40_000)
    fit = analysis.harmonic_pca(u, kT=KT)
    np.testing.assert_allclose(fit.frequencies, omegas, rtol=0.03)
    np.testing.assert_allclose(np.abs(np.sum(fit.components * rotation, axis=0)), 1.0, atol=0.01)
    np.testing.assert_allclose(fit.mean, np.arange(4.0), atol=0.01)


@pytest.mark.parametrize("mass", [1.0, 16.0])
def test_harmonic_oscillator_variance_is_kT_over_omega_squared(mass):
    # A particle of `mass` amu in V = ½ m ω² x² has <x²> = kT / (m ω²); mass-weighting u = sqrt(m) x removes m.
    omega = 20.0
    x = np.random.default_rng(1).normal(scale=np.sqrt(KT / (mass * omega**2)), size=(50_000, 1))
    fit = analysis.harmonic_pca(np.sqrt(mass) * x, kT=KT)
    assert fit.variances[0] == pytest.approx(KT / omega**2, rel=0.02)
    assert fit.frequencies[0] == pytest.approx(omega, rel=0.01)


def test_zero_weights_drop_frames_exactly():
    rng = np.random.default_rng(2)
    u = rng.normal(size=(400, 3)) * [1.0, 2.0, 3.0]
    keep = np.arange(400) % 2 == 0
    weighted = analysis.harmonic_pca(u, kT=KT, weights=keep.astype(float))
    subset = analysis.harmonic_pca(u[keep], kT=KT)
    np.testing.assert_allclose(weighted.frequencies, subset.frequencies)
    np.testing.assert_allclose(weighted.components, subset.components)


def test_transform_is_slowest_first_with_reproducible_signs():
    rng = np.random.default_rng(3)
    u = rng.normal(size=(2000, 3)) * [0.1, 1.0, 0.3]
    fit = analysis.harmonic_pca(u, kT=KT)
    projected = fit.transform(u)
    assert np.all(np.diff(projected.var(axis=0)) < 0)
    rows = np.argmax(np.abs(fit.components), axis=0)
    assert np.all(fit.components[rows, np.arange(3)] > 0)
    np.testing.assert_allclose(analysis.harmonic_pca(-u, kT=KT).components, fit.components, atol=1e-12)


def test_direction_without_variance_has_infinite_frequency():
    u = np.stack([np.linspace(-1.0, 1.0, 50), np.zeros(50)], axis=1)
    assert np.isinf(analysis.harmonic_pca(u, kT=KT).frequencies[1])


# --- dihedrals ------------------------------------------------------------------------------------------------------


def place_atom(a, b, c, bond, angle, torsion):
    """Position of atom d with |cd| = bond, angle bcd = angle and dihedral abcd = torsion (radians)."""
    bc = (c - b) / np.linalg.norm(c - b)
    normal = np.cross(b - a, bc)
    normal /= np.linalg.norm(normal)
    local = np.array([-np.cos(angle), np.sin(angle) * np.cos(torsion), np.sin(angle) * np.sin(torsion)])
    return c + bond * (local @ np.stack([bc, np.cross(normal, bc), normal]))


def dipeptide_backbone(phis, psis):
    """An ACE-ALA-NME backbone trajectory (the five atoms that define Φ and Ψ) with exactly the given dihedrals."""
    top = mdtraj.Topology()
    chain = top.add_chain()
    atoms = [("ACE", "C", mdtraj.element.carbon), ("ALA", "N", mdtraj.element.nitrogen),
             ("ALA", "CA", mdtraj.element.carbon), ("ALA", "C", mdtraj.element.carbon),
             ("NME", "N", mdtraj.element.nitrogen)]
    residues = {name: top.add_residue(name, chain) for name in ("ACE", "ALA", "NME")}
    for residue, name, element in atoms:
        top.add_atom(name, element, residues[residue])
    frames = []
    for phi, psi in zip(phis, psis):
        c0, n1, ca = np.zeros(3), np.array([0.133, 0.0, 0.0]), np.array([0.18, 0.14, 0.0])
        c1 = place_atom(c0, n1, ca, 0.152, np.deg2rad(111.0), phi)
        n2 = place_atom(n1, ca, c1, 0.133, np.deg2rad(116.0), psi)
        frames.append([c0, n1, ca, c1, n2])
    return mdtraj.Trajectory(np.array(frames), top)


def test_backbone_dihedrals_of_a_built_geometry():
    phis, psis = np.deg2rad([-80.0, 60.0, 170.0]), np.deg2rad([150.0, -60.0, 10.0])
    phi, psi = analysis.backbone_dihedrals(dipeptide_backbone(phis, psis))
    np.testing.assert_allclose(phi, phis, atol=1e-5)
    np.testing.assert_allclose(psi, psis, atol=1e-5)


def test_backbone_dihedrals_reject_a_topology_without_backbone():
    water = mdtraj.Topology()
    residue = water.add_residue("HOH", water.add_chain())
    water.add_atom("O", mdtraj.element.oxygen, residue)
    with pytest.raises(ValueError, match="no backbone"):
        analysis.backbone_dihedrals(mdtraj.Trajectory(np.zeros((2, 1, 3)), water))


def hopping_series(n_hops, seed):
    """Φ (radians) that dwells in alternating cores, with failed excursions to the barrier top and beyond between
    genuine hops; returns the series and its number of hops."""
    rng = np.random.default_rng(seed)
    centres = {0: -75.0, 1: 60.0}
    pieces, state = [], 0
    for _ in range(n_hops + 1):
        pieces.append(centres[state] + rng.normal(scale=8.0, size=40))
        pieces.append(np.full(5, 0.0))  # the barrier top, then back: not a transition
        pieces.append(centres[state] + rng.normal(scale=8.0, size=40))
        pieces.append(np.linspace(-20.0, 20.0, 7) * (1 if state == 0 else -1))  # the crossing itself
        state = 1 - state
    return np.deg2rad(np.concatenate(pieces[:-1])), n_hops


@pytest.mark.parametrize("n_hops", [0, 1, 7])
def test_count_transitions_counts_committed_hops_only(n_hops):
    phi, expected = hopping_series(n_hops, seed=n_hops)
    assert analysis.count_transitions(phi) == expected
    # The same angles written in [0, 2π) describe the same trajectory.
    assert analysis.count_transitions(np.mod(phi, 2.0 * np.pi)) == expected


def test_count_transitions_takes_custom_cores():
    phi = np.deg2rad([-80.0, 20.0, -80.0, 20.0])
    assert analysis.count_transitions(phi) == 0
    assert analysis.count_transitions(phi, upper_core=(np.deg2rad(10.0), np.deg2rad(100.0))) == 3
    with pytest.raises(ValueError, match="overlap"):
        analysis.count_transitions(phi, lower_core=(-2.0, 0.5), upper_core=(0.0, 1.0))


def two_state_phi(n, fraction_positive, seed):
    rng = np.random.default_rng(seed)
    positive = rng.permutation(np.arange(n) < fraction_positive * n)
    return np.where(positive, np.deg2rad(60.0), np.deg2rad(-75.0)) + rng.normal(scale=0.2, size=n)


def test_basin_free_energy_of_known_populations():
    phi = two_state_phi(10_000, 0.2, seed=0)
    delta_f, error = analysis.basin_free_energy(phi, KT)
    assert delta_f == pytest.approx(KT * np.log(4.0), rel=1e-12)
    assert 0.0 < error < 0.1


def test_the_beta_basin_wraps_across_180_degrees():
    """An unbiased run in the C7eq/β basin reaches Φ ≈ +175° now and then; those frames are not C7ax. Splitting the
    basins at ±180° gave such a run, which never visited C7ax, a finite ΔF."""
    phi = np.deg2rad(np.concatenate([np.full(995, -80.0), np.full(5, 175.0)]))
    assert analysis.basin_free_energy(phi, KT)[0] == np.inf
    phi[:250] = np.deg2rad(110.0)  # the upper basin reaches the barrier top at 120°
    assert analysis.basin_free_energy(phi, KT)[0] == pytest.approx(KT * np.log(3.0), rel=1e-12)


def test_block_error_matches_the_binomial_error_of_independent_frames():
    rng = np.random.default_rng(1)
    p, n = 0.3, 20_000
    phi = np.where(rng.uniform(size=n) < p, 1.0, -1.0)
    analytic = KT * np.sqrt(1.0 / (n * p * (1.0 - p)))  # delta method on ln(p / (1 - p))
    assert analysis.basin_free_energy(phi, KT, n_blocks=20)[1] == pytest.approx(analytic, rel=0.5)


def test_weights_that_reverse_the_populations_flip_the_sign():
    phi = two_state_phi(10_000, 0.2, seed=2)
    weights = np.where(phi > 0, 16.0, 1.0)
    delta_f, _ = analysis.basin_free_energy(phi, KT, weights=weights)
    assert delta_f == pytest.approx(-KT * np.log(4.0), rel=1e-12)
    # exp(1000) overflows; its logarithm does not.
    log_delta_f, _ = analysis.basin_free_energy(phi, KT, log_weights=np.log(weights) + 1000.0)
    assert log_delta_f == pytest.approx(delta_f, rel=1e-12)


def test_a_block_that_misses_a_basin_still_gives_an_error():
    """A biased run reaches the second basin only after a while: its first block has none of it. The block
    populations stay defined there (a ΔF per block would be infinite); the error is the spread they show."""
    phi = np.concatenate([np.full(200, -1.0), two_state_phi(800, 0.5, seed=3)])
    delta_f, error = analysis.basin_free_energy(phi, KT, n_blocks=5)
    fractions = np.array([0.0] + [np.mean(block > 0) for block in np.array_split(phi[200:], 4)])
    expected = KT * fractions.std(ddof=1) / np.sqrt(5) / (0.4 * 0.6)
    assert np.isfinite(delta_f) and error == pytest.approx(expected, rel=0.02)
    assert np.isnan(analysis.basin_free_energy(np.full(100, -1.0), KT)[1])  # one basin only: no error to give


def test_frames_of_zero_weight_belong_to_no_block():
    """A discarded start (weight 0) would otherwise fill the first blocks with frames that do not count."""
    phi = two_state_phi(1000, 0.3, seed=5)
    weights = np.random.default_rng(6).uniform(0.5, 1.5, size=1000)
    with_start = analysis.basin_free_energy(np.concatenate([np.full(300, -1.0), phi]), KT,
                                            weights=np.concatenate([np.zeros(300), weights]))
    assert with_start == pytest.approx(analysis.basin_free_energy(phi, KT, weights=weights), rel=1e-12)


def test_free_energy_surface_of_a_harmonic_well():
    sigma = 0.5
    x = np.random.default_rng(4).normal(scale=sigma, size=200_000)
    f, (edges,) = analysis.free_energy_surface(x, KT, bins=40, ranges=[(-1.0, 1.0)])
    centres = 0.5 * (edges[1:] + edges[:-1])
    expected = KT * centres**2 / (2.0 * sigma**2)
    assert f.min() == 0.0
    np.testing.assert_allclose(f, expected - expected.min(), atol=0.15)


def test_reweighted_uniform_samples_give_the_same_well():
    sigma = 0.5
    x = np.random.default_rng(5).uniform(-1.0, 1.0, size=200_000)
    f, (edges,) = analysis.free_energy_surface(x, KT, weights=np.exp(-(x**2) / (2.0 * sigma**2)), bins=20)
    centres = 0.5 * (edges[1:] + edges[:-1])
    expected = KT * centres**2 / (2.0 * sigma**2)
    np.testing.assert_allclose(f, expected - expected.min(), atol=0.15)


def test_two_dimensional_surface_marks_empty_bins_infinite():
    values = np.random.default_rng(6).uniform(0.0, 1.0, size=(5000, 2))
    f, edges = analysis.free_energy_surface(values, KT, bins=10, ranges=[(0.0, 2.0), (0.0, 1.0)])
    assert f.shape == (10, 10) and len(edges) == 2
    assert np.all(np.isinf(f[5:])) and np.all(np.isfinite(f[:5])) and f.min() == 0.0


# --- plots ----------------------------------------------------------------------------------------------------------


def assert_png(path):
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_largest_gap_finds_the_biggest_ratio():
    assert analysis.largest_gap([1.0, 2.0, 3.0, 30.0, 40.0]) == (2, 10.0)
    with pytest.raises(ValueError):
        analysis.largest_gap([1.0])


def test_plot_spectrum_writes_a_png(tmp_path):
    written = analysis.plot_spectrum([0.4, 0.6, 9.0, 11.0, 14.0], tmp_path / "spectrum.png",
                                     baseline=[1.0, 3.0, 5.0, 8.0, 12.0])
    assert written == tmp_path / "spectrum.png" and written.stat().st_size > 0
    assert_png(written)


def test_plot_mutual_information_writes_a_png(tmp_path):
    written = analysis.plot_mutual_information([0.8, 0.1, 0.0], [0.3, 0.5, 0.1], tmp_path / "mi.png",
                                               baseline_phi=[0.4, 0.2, 0.1], baseline_psi=[0.1, 0.2, 0.1])
    assert written.stat().st_size > 0
    assert_png(written)


def test_plot_ramachandran_writes_a_png(tmp_path):
    rng = np.random.default_rng(7)
    sets = [("train", rng.uniform(-np.pi, 0.0, 500), rng.uniform(-np.pi, np.pi, 500), "points"),
            ("held-out", rng.uniform(-np.pi, 0.0, 100), rng.uniform(-np.pi, np.pi, 100), "points"),
            ("generated", rng.uniform(0.5, 1.5, 100), rng.uniform(-1.0, 1.0, 100), "points"),
            ("interpolation", np.linspace(2.5, 4.0, 12), np.linspace(-1.0, 1.0, 12), "path")]
    written = analysis.plot_ramachandran(sets, tmp_path / "rama.png")
    assert written.stat().st_size > 0
    assert_png(written)
    with pytest.raises(ValueError, match="style"):
        analysis.plot_ramachandran([("x", [0.0], [0.0], "contour")], tmp_path / "bad.png")


# --- documentation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [information, pca, dihedrals, plots])
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
