"""Backbone dihedrals of a dipeptide: transitions, basin free energies and free energy surfaces.

The defaults describe alanine dipeptide, whose metastable states fall into two Φ basins: C7ax and αL near
Φ ≈ +60°, between barriers at Φ ≈ 0° and Φ ≈ 120°, and C7eq, β and αR on the rest of the circle (β wraps across
±180°). Angles are in radians throughout, energies in the units of ``kT``.
"""
import mdtraj
import numpy as np
from scipy.special import logsumexp

__all__ = ["backbone_dihedrals", "count_transitions", "basin_free_energy", "in_upper_basin", "free_energy_surface"]

LOWER_CORE = (np.deg2rad(-150.0), np.deg2rad(-30.0))
UPPER_CORE = (np.deg2rad(30.0), np.deg2rad(100.0))
#: The Φ > 0 basin (C7ax, αL), from barrier top to barrier top. Splitting at ±180° instead counted frames of the β
#: basin near Φ = +180° as C7ax: a finite ΔF for a run that never visited C7ax.
UPPER_BASIN = (0.0, np.deg2rad(120.0))


def _wrap(angles):
    """Map angles in radians onto (−π, π].

    Examples
    --------
    >>> _wrap(np.array([1.5 * np.pi, -np.pi])).round(4)
    array([-1.5708,  3.1416])
    """
    return np.pi - np.mod(np.pi - np.asarray(angles, dtype=float), 2.0 * np.pi)


def backbone_dihedrals(traj):
    """Φ and Ψ of the first residue that has both, one value per frame.

    Parameters
    ----------
    traj : mdtraj.Trajectory
        A dipeptide trajectory (e.g. ACE-ALA-NME), whose topology names the backbone atoms C, N, CA.

    Returns
    -------
    phi, psi : numpy.ndarray, shape (T,)
        The dihedrals in radians, in (−π, π].

    Raises
    ------
    ValueError
        If mdtraj finds no Φ or no Ψ dihedral in the topology.

    Examples
    --------
    >>> top = mdtraj.Topology()
    >>> chain = top.add_chain()
    >>> residue = top.add_residue("HOH", chain)
    >>> _ = top.add_atom("O", mdtraj.element.oxygen, residue)
    >>> backbone_dihedrals(mdtraj.Trajectory(np.zeros((1, 1, 3)), top))
    Traceback (most recent call last):
    ...
    ValueError: the topology has no backbone phi/psi dihedral (found 0 phi, 0 psi)
    """
    phi_atoms, phi = mdtraj.compute_phi(traj)
    psi_atoms, psi = mdtraj.compute_psi(traj)
    if len(phi_atoms) == 0 or len(psi_atoms) == 0:
        raise ValueError(
            f"the topology has no backbone phi/psi dihedral (found {len(phi_atoms)} phi, {len(psi_atoms)} psi)"
        )
    return phi[:, 0].astype(float), psi[:, 0].astype(float)


def _core_labels(phi, lower_core, upper_core):
    """Label each frame 0 (lower core), 1 (upper core) or −1 (neither).

    Examples
    --------
    >>> _core_labels(np.array([-1.0, 0.0, 1.0]), (-2.0, -0.5), (0.5, 2.0)).tolist()
    [0, -1, 1]
    """
    for lo, hi in (lower_core, upper_core):
        if not -np.pi <= lo < hi <= np.pi:
            raise ValueError(f"a core must be an interval (lo, hi) with -pi <= lo < hi <= pi, got ({lo}, {hi})")
    if lower_core[1] > upper_core[0] and upper_core[1] > lower_core[0]:
        raise ValueError(f"the cores {lower_core} and {upper_core} overlap")
    phi = _wrap(phi)
    labels = np.full(phi.shape, -1)
    labels[(phi >= lower_core[0]) & (phi <= lower_core[1])] = 0
    labels[(phi >= upper_core[0]) & (phi <= upper_core[1])] = 1
    return labels


def count_transitions(phi, lower_core=LOWER_CORE, upper_core=UPPER_CORE):
    """Number of committed transitions between the two Φ basins.

    A transition is counted when the trajectory, having last been in one core, enters the other core. Excursions
    out of a core that return to it, and time spent between the cores, do not count; this is what makes the count
    robust to recrossings of the barrier top.

    Parameters
    ----------
    phi : array_like, shape (T,)
        Φ in radians; wrapped to (−π, π] before use.
    lower_core, upper_core : tuple of float, optional
        (lo, hi) bounds in radians of the Φ < 0 core (default −150° to −30°: C7eq, β, αR) and of the Φ > 0 core
        (default 30° to 100°: C7ax, αL). They must not overlap.

    Returns
    -------
    int
        The number of transitions, in either direction.

    Examples
    --------
    >>> phi = np.deg2rad([-80, -10, -80, 10, 60, 0, 60, -70])
    >>> count_transitions(phi)
    2
    """
    labels = _core_labels(phi, lower_core, upper_core)
    visited = labels[labels >= 0]
    return int(np.count_nonzero(np.diff(visited)))


def in_upper_basin(phi, upper_basin=UPPER_BASIN):
    """Whether each Φ (radians, wrapped to (−π, π] first) lies in the Φ > 0 basin ``(lo, hi)``.

    Examples
    --------
    >>> in_upper_basin(np.deg2rad([-80.0, 60.0, 175.0, -179.0])).tolist()
    [False, True, False, False]
    """
    phi = _wrap(phi)
    return (phi > upper_basin[0]) & (phi < upper_basin[1])


def _basin_log_weights(phi, weights, log_weights):
    """Per-frame log-weights from at most one of linear or logarithmic weights.

    Examples
    --------
    >>> _basin_log_weights(np.zeros(2), np.array([1.0, np.e]), None).tolist()
    [0.0, 1.0]
    """
    if weights is not None and log_weights is not None:
        raise ValueError("give weights or log_weights, not both")
    if log_weights is not None:
        out = np.asarray(log_weights, dtype=float)
    elif weights is not None:
        with np.errstate(divide="ignore"):
            out = np.log(np.asarray(weights, dtype=float))
    else:
        out = np.zeros(len(phi))
    if out.shape != phi.shape:
        raise ValueError(f"weights of shape {out.shape} do not match phi of shape {phi.shape}")
    return out


def _delta_f(positive, log_w, kT):
    """−kT ln(P(Φ > 0) / P(Φ < 0)); ±inf when one basin is empty, nan when both are.

    Examples
    --------
    >>> round(float(_delta_f(np.array([True, False, False]), np.zeros(3), kT=1.0)), 4)
    0.6931
    """
    with np.errstate(invalid="ignore"):
        return -kT * (_log_total(log_w[positive]) - _log_total(log_w[~positive]))


def _log_total(log_w):
    """Logarithm of the summed weights; −inf for none.

    Examples
    --------
    >>> float(_log_total(np.array([])))
    -inf
    """
    return logsumexp(log_w) if len(log_w) else -np.inf


def basin_free_energy(phi, kT, weights=None, n_blocks=5, log_weights=None, upper_basin=UPPER_BASIN):
    """Free energy of the Φ > 0 basin (C7ax, αL) relative to the other one, with a block-averaging error.

    ΔF = −kT ln(p / (1 − p)), p being the (weighted) fraction of frames in the upper basin. The error comes from
    p on ``n_blocks`` contiguous blocks of the frames of non-zero weight (a discarded start belongs to no block):
    the standard error of their mean, carried to ΔF as kT δp / (p(1 − p)). That accounts for the correlation
    between successive frames as long as a block is longer than the correlation time, and, unlike a ΔF per block,
    stays defined for a block that never visited one basin (the start of a biased run).

    Parameters
    ----------
    phi : array_like, shape (T,)
        Φ in radians, wrapped to (−π, π] before use.
    kT : float
        Thermal energy; ΔF is returned in the same unit.
    weights : array_like, shape (T,), optional
        Linear per-frame weights, e.g. exp(βV_bias) to reweight a biased run.
    n_blocks : int, optional
        Number of contiguous blocks for the error estimate, at least 2. Default 5.
    log_weights : array_like, shape (T,), optional
        Logarithms of the weights, instead of ``weights``; avoids the overflow of exp(βV_bias) for large biases.
    upper_basin : tuple of float, optional
        (lo, hi) in radians of the Φ > 0 basin (default 0° to 120°, the barrier tops); the rest of the circle is
        the other basin.

    Returns
    -------
    delta_f : float
        ΔF(Φ > 0 − Φ < 0); ±inf if one basin was never visited.
    error : float
        Standard error of ΔF from the blocks; nan if a basin was never visited or fewer frames than blocks count.

    Examples
    --------
    One frame in four at Φ > 0 gives ΔF = kT ln 3:

    >>> phi = np.tile(np.deg2rad([-80.0, -80.0, -80.0, 60.0]), 10)
    >>> delta_f, error = basin_free_energy(phi, kT=1.0)
    >>> round(delta_f, 4), error
    (1.0986, 0.0)
    """
    phi = _wrap(phi)
    if n_blocks < 2:
        raise ValueError(f"n_blocks must be at least 2, got {n_blocks}")
    if len(phi) < n_blocks:
        raise ValueError(f"{len(phi)} frames cannot fill {n_blocks} blocks")
    log_w = _basin_log_weights(phi, weights, log_weights)
    positive = in_upper_basin(phi, upper_basin)
    delta_f = float(_delta_f(positive, log_w, kT))
    fraction = _upper_fraction(positive, log_w)
    counted = np.flatnonzero(log_w > -np.inf)
    if not 0.0 < fraction < 1.0 or len(counted) < n_blocks:
        return delta_f, float("nan")
    per_block = np.array([_upper_fraction(positive[b], log_w[b]) for b in np.array_split(counted, n_blocks)])
    return delta_f, float(kT * per_block.std(ddof=1) / np.sqrt(n_blocks) / (fraction * (1.0 - fraction)))


def _upper_fraction(positive, log_w):
    """Weighted fraction of the frames that lie in the upper basin.

    Examples
    --------
    >>> round(_upper_fraction(np.array([True, False]), np.log([1.0, 3.0])), 12)
    0.25
    """
    return float(np.exp(_log_total(log_w[positive]) - _log_total(log_w)))


def free_energy_surface(values, kT, weights=None, bins=50, ranges=None):
    """Free energy F = −kT ln p on a 1-d or 2-d histogram, shifted to a minimum of zero.

    Parameters
    ----------
    values : array_like, shape (T,) or (T, d) with d = 1 or 2
        Samples of the variables. Periodic variables are not wrapped: pass them already in the range wanted.
    kT : float
        Thermal energy; F is returned in the same unit (kJ/mol for kT in kJ/mol).
    weights : array_like, shape (T,), optional
        Linear per-frame weights (e.g. to reweight a biased run).
    bins : int or sequence, optional
        Passed to :func:`numpy.histogramdd`: a count for every axis, one per axis, or explicit edges. Default 50.
    ranges : sequence of (float, float), optional
        One (lo, hi) pair per variable; the data range if omitted.

    Returns
    -------
    free_energy : numpy.ndarray, shape (n_bins,) or (n_bins_x, n_bins_y)
        F with minimum 0; ``inf`` in bins without samples. Densities, not counts, are used, so unequal bins are
        handled correctly.
    edges : list of numpy.ndarray
        Bin edges, one array per variable.

    Examples
    --------
    >>> f, edges = free_energy_surface(np.array([0.1, 0.2, 0.3, 1.5]), kT=1.0, bins=2, ranges=[(0.0, 2.0)])
    >>> f.round(4), edges[0]
    (array([0.    , 1.0986]), array([0., 1., 2.]))
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or values.shape[1] not in (1, 2):
        raise ValueError(f"values must be (T,), (T, 1) or (T, 2), got shape {values.shape}")
    density, edges = np.histogramdd(values, bins=bins, range=ranges, weights=weights, density=True)
    with np.errstate(divide="ignore"):
        free_energy = -kT * np.log(density)
    return free_energy - free_energy.min(), list(edges)
