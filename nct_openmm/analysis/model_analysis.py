"""Analyses of a trained :class:`~nct_openmm.slowmodes.SlowModeModel` on data: its spectrum against the harmonic
PCA baseline, the mutual information of its modes with the backbone dihedrals, latent-space interpolation and mode
scans decoded to structures (Li, Dong, Zhang & Wang, PRX 10, 021020 (2020), Sec. IV C).

Unlike the rest of :mod:`nct_openmm.analysis`, this module needs torch (it runs the flow).

Units and conventions
---------------------
- Internal coordinates ``u`` are the model's own: mass-weighted, rigid-body-free and divided by √kT, so they are in
  ps (1 kJ/mol = 1 amu·nm²/ps²) and the prior frequencies ω are in 1/ps.
- Latent vectors are reported slowest mode first and with the model's sign convention, i.e. exactly as
  :meth:`SlowModeModel.transform` returns them: ``Q`` in ps, or ``ε = ωQ`` (dimensionless, unit variance under the
  prior) when called "scaled".
- Positions are those of the model's selected atoms, in nm. Decoded structures lie in the model's reference frame
  (centred and oriented like the reference structure).
- Log-likelihoods are configuration-space log densities ``ln ρ(u)`` per unit volume of ``u`` (ps^-d); see
  :func:`configuration_log_likelihood`.
"""
import copy
import math
import os
from dataclasses import dataclass

import mdtraj
import numpy as np
import torch

from ..data import TrajectoryData
from . import _MODEL_ANALYSIS
from .dihedrals import backbone_dihedrals
from .information import mutual_information_matrix
from .pca import harmonic_pca
from .plots import largest_gap

# The package lists these names without importing this module (and torch); one list serves both.
__all__ = list(_MODEL_ANALYSIS)


@dataclass(frozen=True)
class LatentPath:
    """Structures decoded from a sequence of latent points.

    Attributes
    ----------
    parameter : numpy.ndarray, shape (m,)
        What the path is parametrised by: the SLERP fraction t ∈ [0, 1] for :func:`interpolate`, the scanned
        ``Q_k`` in ps for :func:`prior_samples_along_modes`.
    latent : numpy.ndarray, shape (m, d)
        ``ε = ωQ`` of every point, slowest mode first, with the model's mode signs (what
        ``model.transform(positions, scaled=True)`` returns for the decoded positions).
    positions : numpy.ndarray, shape (m, n, 3)
        Decoded positions of the model's selected atoms in nm, in the model's reference frame.
    log_likelihood : numpy.ndarray, shape (m,)
        Exact configuration-space log density ``ln ρ(u)`` of every structure (see
        :func:`configuration_log_likelihood`).
    """

    parameter: np.ndarray
    latent: np.ndarray
    positions: np.ndarray
    log_likelihood: np.ndarray


def _example_model(seed=0):
    """A small untrained model of a random 4-atom molecule at kT = 2.5 kJ/mol, with its 400 training frames.

    Used by the examples of this module: it needs no simulation and no training, and its untrained flow is the
    harmonic (PCA) limit of the frames.

    Examples
    --------
    >>> model, positions = _example_model()
    >>> model.n_modes, positions.shape
    (6, (400, 4, 3))
    """
    from ..core import FlowConfig, model_from_data
    from ..geometry import InternalFrame
    from ..slowmodes import SlowModeModel

    rng = np.random.default_rng(seed)
    reference = rng.normal(scale=0.15, size=(4, 3))
    positions = reference + rng.normal(scale=0.01, size=(400, 4, 3)) * np.array([1.0, 2.0, 3.0, 4.0])[:, None]
    frame = InternalFrame([0, 1, 2, 3], torch.full((4,), 12.0), torch.as_tensor(reference), kT=2.5)
    with torch.no_grad():
        u = frame.internal(torch.as_tensor(positions)).float()
    flow = model_from_data(FlowConfig(dim=frame.dim, n_couplings=2, hidden=8), u)
    return SlowModeModel(frame, flow), positions


# --- shared plumbing ------------------------------------------------------------------------------------------------


def _weights(data):
    """Per-frame weights of ``data`` when it is a weighted :class:`TrajectoryData`, else None."""
    return data.weights if isinstance(data, TrajectoryData) else None


def _flow64(model):
    """A float64 copy of the model's flow: decoding and Jacobians in double precision, the model left untouched."""
    flow = copy.deepcopy(model.flow).double().eval()
    for parameter in flow.parameters():
        parameter.requires_grad_(False)
    return flow


def _slow_axes(flow):
    """Flow-order index, frequency (1/ps) and sign of every mode, slowest mode first."""
    order = flow.prior.slow_order()
    return order, flow.prior.frequencies().detach()[order], flow.mode_signs[order]


def _flow_latent_from_eps(flow, eps):
    """Flow-order latent positions Q (ps) of slowest-first, signed ε = ωQ."""
    order, omega, signs = _slow_axes(flow)
    Q = torch.empty_like(eps)
    Q[:, order] = eps * signs / omega
    return Q


def _eps_from_flow_latent(flow, Q):
    """Slowest-first, signed ε = ωQ of flow-order latent positions Q."""
    order, omega, signs = _slow_axes(flow)
    return Q[:, order] * signs * omega


def _log_likelihood_of_internal(flow, u):
    """ln ρ(u) = ln N(F(u)) + ln |det ∂F/∂u| for a float64 flow and internal coordinates u (T, d)."""
    with torch.no_grad():
        Q = flow.transform(u)
    omega = flow.prior.frequencies().detach()
    log_prior = (torch.log(omega) - 0.5 * math.log(2.0 * math.pi)).sum() - 0.5 * ((omega * Q) ** 2).sum(-1)
    # Frames are independent, so the Jacobian of the batch sum holds every frame's Jacobian: one reverse pass per
    # latent coordinate instead of one per frame and coordinate.
    jacobian = torch.autograd.functional.jacobian(lambda x: flow.transform(x).sum(0), u, vectorize=True)
    log_det = torch.linalg.slogdet(jacobian.permute(1, 0, 2)).logabsdet
    return (log_prior + log_det).numpy()


def _decode(model, flow, eps):
    """Positions (m, n, 3) in nm and ln ρ(u) of slowest-first ε (m, d)."""
    with torch.no_grad():
        u = flow.inverse_transform(_flow_latent_from_eps(flow, eps))
        positions = model.frame.cartesian(u).numpy()
    return positions, _log_likelihood_of_internal(flow, u)


# --- spectrum and information ---------------------------------------------------------------------------------------


def spectrum_report(model, data):
    """The model's frequency spectrum next to the harmonic PCA spectrum of the same internal coordinates.

    The PCA baseline is the linear limit of the same method: for a Gaussian density of the internal coordinates the
    NCT's optimum is the normal-mode transformation, with ω_k = sqrt(kT / λ_k) and λ_k the covariance eigenvalues of
    the mass-weighted aligned coordinates. The model's ``u`` is already divided by √kT (β = 1, in ps), so
    ``harmonic_pca(u, kT=1)`` gives ω_k = 1/σ_k(u) in 1/ps — the same numbers as ``harmonic_pca(u·√kT, kT)`` on
    ``u·√kT`` in sqrt(amu)·nm. An untrained flow starts exactly there (up to the unbiased covariance's N/(N − 1)).

    Parameters
    ----------
    model : SlowModeModel
    data : TrajectoryData or array_like, shape (T, n, 3)
        Frames of the model's selected atoms (nm). Weights of a :class:`TrajectoryData` are used for the PCA.

    Returns
    -------
    dict
        JSON-ready: ``frequencies`` and ``pca_frequencies`` (lists, 1/ps, ascending), ``span`` and ``pca_span``
        (fastest / slowest), ``gap`` and ``pca_gap`` (``{"index", "ratio"}`` of :func:`largest_gap`: the gap lies
        after 0-based mode ``index``), ``n_frames``, ``n_modes`` and ``kT`` (kJ/mol).

    Examples
    --------
    >>> model, positions = _example_model()
    >>> report = spectrum_report(model, positions)
    >>> np.allclose(report["frequencies"], report["pca_frequencies"], rtol=0.01)  # untrained: the PCA limit
    True
    """
    positions, boxes = model.positions_and_boxes(data)
    if len(positions) < 2:
        raise ValueError("the PCA baseline needs at least two frames")
    u = model.internal_coordinates(positions, boxes).numpy()
    pca = harmonic_pca(u, 1.0, _weights(data))
    report = {"n_frames": int(len(positions)), "n_modes": int(model.n_modes), "kT": float(model.frame.kT)}
    for prefix, frequencies in (("", model.frequencies), ("pca_", pca.frequencies)):
        index, ratio = largest_gap(frequencies)
        report[prefix + "frequencies"] = [float(w) for w in frequencies]
        report[prefix + "span"] = float(frequencies[-1] / frequencies[0])
        report[prefix + "gap"] = {"index": index, "ratio": ratio}
    return report


def dihedral_information(model, data, traj=None, n_modes=6, k=5, seed=0):
    """Mutual information of the slowest NCT modes and of the slowest PCA modes with the backbone Φ and Ψ.

    KSG estimates (:func:`~nct_openmm.analysis.mutual_information`) in nats, with Φ and Ψ treated as periodic.
    The estimator takes no weights: for weighted data (a reweighted biased run) it runs on a subsample of the
    reweighted ensemble, frame i kept with probability w_i / max w (``seed``), as the PCA baseline is fitted to
    the weighted frames. Duplicating frames instead (resampling with replacement) would inflate KSG.

    Parameters
    ----------
    model : SlowModeModel
    data : TrajectoryData or array_like, shape (T, n, 3)
        Frames of the model's selected atoms (nm).
    traj : mdtraj.Trajectory, optional
        The same T frames with a topology that names the backbone (any atom set containing it), from which Φ and
        Ψ are taken. By default they are built from ``data`` with the topology of the model's selected atoms
        (``data`` must then be a :class:`TrajectoryData`).
    n_modes : int, optional
        Number of slowest modes analysed (capped at the model's dimension). Default 6.
    k : int, optional
        Neighbour order of the estimator. Default 5.

    Returns
    -------
    dict
        JSON-ready lists of length ``n_modes``, slowest mode first: ``mi_phi``, ``mi_psi`` (NCT modes) and
        ``pca_mi_phi``, ``pca_mi_psi`` (harmonic PCA modes of the same internal coordinates), plus ``n_modes``,
        ``k``, ``units``, ``mi_frames`` (the frames the estimates used) and ``mi_ensemble`` ("unweighted" or
        "reweighted subsample").

    Raises
    ------
    ValueError
        When the topology has no backbone Φ/Ψ (not a peptide, or the atoms given lack the backbone), or when
        ``traj`` and ``data`` hold different numbers of frames.

    Examples
    --------
    >>> model, positions = _example_model()
    >>> top = mdtraj.Topology()
    >>> residue = top.add_residue("UNK", top.add_chain())
    >>> for name in "ABCD":
    ...     _ = top.add_atom(name, mdtraj.element.carbon, residue)
    >>> dihedral_information(model, positions, mdtraj.Trajectory(positions, top))
    Traceback (most recent call last):
    ...
    ValueError: dihedral_information needs a peptide: the topology has no backbone phi/psi dihedral (found 0 phi, 0 psi)
    """
    positions, boxes = model.positions_and_boxes(data)
    if traj is None:
        if not isinstance(data, TrajectoryData):
            raise ValueError("give traj (an mdtraj.Trajectory naming the backbone) when data is a positions array")
        traj = mdtraj.Trajectory(positions, data.topology.subset(data.atom_indices))
        if boxes is not None:
            # With the box, mdtraj measures the dihedrals across periodic boundaries (minimum image).
            traj.unitcell_vectors = np.asarray(boxes, dtype=np.float32)
    if traj.n_frames != len(positions):
        raise ValueError(f"traj has {traj.n_frames} frames but data has {len(positions)}; they must be the same frames")
    try:
        phi, psi = backbone_dihedrals(traj)
    except ValueError as error:
        raise ValueError(f"dihedral_information needs a peptide: {error}") from None
    n_modes = min(int(n_modes), model.n_modes)
    if n_modes < 1:
        raise ValueError(f"n_modes must be at least 1, got {n_modes}")
    angles = {"phi": phi, "psi": psi}
    nct_modes = model.transform(data if isinstance(data, TrajectoryData) else positions, k=n_modes)
    u = model.internal_coordinates(positions, boxes).numpy()
    pca_modes = harmonic_pca(u, 1.0, _weights(data)).transform(u)[:, :n_modes]
    frames = _reweighted_subsample(_weights(data), len(positions), seed)
    angles = {name: values[frames] for name, values in angles.items()}
    nct = mutual_information_matrix(nct_modes[frames], angles, k=k)
    pca = mutual_information_matrix(pca_modes[frames], angles, k=k)
    return {"mi_phi": nct["phi"], "mi_psi": nct["psi"], "pca_mi_phi": pca["phi"], "pca_mi_psi": pca["psi"],
            "n_modes": n_modes, "k": int(k), "units": "nats", "mi_frames": int(len(frames)),
            "mi_ensemble": "unweighted" if _weights(data) is None else "reweighted subsample"}


def _reweighted_subsample(weights, n_frames, seed):
    """Indices of the frames kept by rejection with probability w / max w (all frames without weights).

    Examples
    --------
    >>> _reweighted_subsample(np.array([0.0, 1.0, 1.0]), 3, seed=0).tolist()
    [1, 2]
    """
    if weights is None:
        return np.arange(n_frames)
    weights = np.asarray(weights, dtype=float)
    return np.flatnonzero(np.random.default_rng(seed).uniform(size=len(weights)) * weights.max() < weights)


# --- densities, interpolation and scans -----------------------------------------------------------------------------


def configuration_log_likelihood(model, data):
    """Exact configuration-space log density of the model, ``ln ρ(u) = ln N(F(u)) + ln |det ∂F/∂u|``, per frame.

    ``N`` is the prior's marginal on the latent positions (independent Gaussians of variance 1/ω_k²) and the
    Jacobian determinant of the point transformation F is computed exactly by automatic differentiation, in
    float64. The density is per unit volume of the model's internal coordinates ``u`` (ps^-d); with respect to
    mass-weighted coordinates ``u·√kT`` it is lower by the constant ``(d/2) ln kT``.

    This is the marginal of the model's phase-space density over the momenta. The phase-space log density at zero
    momenta, which needs no Jacobian, differs from it by ``ln |det ∂F/∂u| + (d/2) ln 2π`` — a frame-dependent
    amount — so it is not used here.

    Parameters
    ----------
    model : SlowModeModel
        A point transformation (no linear symplectic layer).
    data : TrajectoryData or array_like, shape (T, n, 3) or (n, 3)
        Frames of the model's selected atoms (nm).

    Returns
    -------
    numpy.ndarray, shape (T,)

    Examples
    --------
    The untrained flow is linear, so ρ is the Gaussian of the frames' (biased) covariance:

    >>> from scipy.stats import multivariate_normal
    >>> model, positions = _example_model()
    >>> u = model.internal_coordinates(positions).numpy()
    >>> gaussian = multivariate_normal(u.mean(0), np.cov(u.T, bias=True))
    >>> bool(np.allclose(configuration_log_likelihood(model, positions[:3]), gaussian.logpdf(u[:3]), atol=1e-3))
    True
    """
    positions, boxes = model.positions_and_boxes(data)
    u = model.internal_coordinates(positions, boxes)
    return _log_likelihood_of_internal(_flow64(model), u)


def _slerp(a, b, t):
    """Spherical linear interpolation between vectors ``a`` and ``b`` (d,) at fractions ``t`` (m,).

    ``sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b`` with θ the angle between a and b; it reproduces a and b
    exactly at t = 0 and 1. For (nearly) parallel or antiparallel vectors, where the great circle is undefined,
    it falls back to linear interpolation.

    Examples
    --------
    >>> _slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.5, 1.0])).round(decimals=4)
    tensor([[1.0000, 0.0000],
            [0.7071, 0.7071],
            [0.0000, 1.0000]])
    """
    t = t[:, None]
    norms = torch.linalg.norm(a) * torch.linalg.norm(b)
    cos = torch.clamp(torch.dot(a, b) / norms, -1.0, 1.0) if norms > 0 else torch.tensor(1.0, dtype=a.dtype)
    theta = torch.arccos(cos)
    if torch.sin(theta) < 1e-6:
        return (1.0 - t) * a + t * b
    return (torch.sin((1.0 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


def interpolate(model, start_positions, end_positions, n_frames=20, modes=None, start_box=None, end_box=None):
    """Path between two structures by spherical linear interpolation (SLERP) of their latent vectors, decoded.

    Both structures are encoded to ε = ωQ, the latent vector in units of the prior's standard deviations. SLERP of
    ε (as in the paper's latent interpolations) keeps the path's norm close to the endpoints' — near the typical
    shell of the d-dimensional Gaussian prior, where sampled structures live — whereas linear interpolation would
    cut through the atypical region near the prior's mean. Interpolating ε rather than Q weighs every mode by its
    own thermal width, so the slow, wide modes do not dominate the angle.

    Parameters
    ----------
    model : SlowModeModel
        A point transformation.
    start_positions, end_positions : array_like, shape (n, 3)
        The two structures (model's selected atoms, nm), in any orientation.
    n_frames : int, optional
        Number of structures on the path, endpoints included (≥ 2). Default 20.
    modes : int, optional
        None (default): SLERP the whole ε vector. An int k: SLERP only the k slowest components of ε (as one
        k-vector) and interpolate the faster ones linearly — their nearly harmonic directions need no great circle,
        and the path then follows the slow manifold. The endpoints are reproduced either way.
    start_box, end_box : array_like, shape (3, 3), optional
        Periodic boxes (rows, nm) of the structures, to make molecules whole across the boundaries.

    Returns
    -------
    LatentPath
        ``parameter`` the fractions t, ``latent`` ε (slowest first), ``positions`` in the model's reference frame
        (the endpoints are the inputs after alignment onto the reference) and ``log_likelihood`` the exact
        configuration-space ln ρ(u) of each structure (:func:`configuration_log_likelihood`).

    Examples
    --------
    >>> model, positions = _example_model()
    >>> path = interpolate(model, positions[0], positions[1], n_frames=5)
    >>> path.positions.shape, path.parameter.tolist()
    ((5, 4, 3), [0.0, 0.25, 0.5, 0.75, 1.0])
    >>> bool(np.abs(path.positions[0] - model.frame.whole(torch.as_tensor(positions[0])).numpy()).max() < 1e-6)
    True
    """
    if int(n_frames) < 2:
        raise ValueError(f"n_frames must be at least 2 (the endpoints), got {n_frames}")
    k = model.n_modes if modes is None else int(modes)
    if not 1 <= k <= model.n_modes:
        raise ValueError(f"modes must be between 1 and {model.n_modes}, got {modes}")
    flow = _flow64(model)
    u = []
    for positions, box in ((start_positions, start_box), (end_positions, end_box)):
        positions = np.asarray(positions, dtype=float)
        if positions.ndim != 2:
            raise ValueError(f"start and end positions must be single structures (n, 3), got shape {positions.shape}")
        positions, _ = model.positions_and_boxes(positions)
        u.append(model.internal_coordinates(positions, None if box is None else np.asarray(box)[None]))
    with torch.no_grad():
        eps = _eps_from_flow_latent(flow, flow.transform(torch.cat(u)))
    t = torch.linspace(0.0, 1.0, int(n_frames), dtype=torch.float64)
    path = (1.0 - t[:, None]) * eps[0] + t[:, None] * eps[1]
    path[:, :k] = _slerp(eps[0, :k], eps[1, :k], t)
    positions, log_likelihood = _decode(model, flow, path)
    return LatentPath(t.numpy(), path.numpy(), positions, log_likelihood)


def prior_samples_along_modes(model, mode, n=50, others=0, width=1.0, seed=0):
    """Structures along one latent mode: ``Q_k`` scanned over [−width/ω_k, width/ω_k], decoded.

    The prior gives ``Q_k`` the standard deviation 1/ω_k, so the default scan covers ±1 standard deviation. With
    the other modes at 0 the structures trace the mode's curve through the prior's centre F⁻¹(0); with the other
    modes drawn from the prior they show the mode's effect on typical structures.

    Parameters
    ----------
    model : SlowModeModel
        A point transformation.
    mode : int
        0-based mode index, slowest first (mode 0 is the slowest).
    n : int, optional
        Number of structures (≥ 2). Default 50.
    others : 0 or "sample", optional
        The other modes: 0 (default) holds them at Q = 0; ``"sample"`` draws each structure's other modes
        independently from the prior.
    width : float, optional
        Half-width of the scan in prior standard deviations. Default 1.
    seed : int, optional
        Seed of the draws of ``others="sample"``.

    Returns
    -------
    LatentPath
        ``parameter`` the scanned ``Q_k`` in ps, in the model's sign convention, so that
        ``model.transform(path.positions, scaled=False)[:, mode]`` reproduces it; ``latent`` ε (slowest first);
        ``positions`` in nm; ``log_likelihood`` the exact ln ρ(u).

    Examples
    --------
    >>> model, _ = _example_model()
    >>> scan = prior_samples_along_modes(model, mode=0, n=3)
    >>> omega = model.frequencies[0]
    >>> bool(np.allclose(scan.parameter, [-1 / omega, 0.0, 1 / omega]))
    True
    >>> bool(np.allclose(model.transform(scan.positions, scaled=False)[:, 0], scan.parameter, atol=1e-5))
    True
    """
    mode = int(mode)
    if not 0 <= mode < model.n_modes:
        raise ValueError(f"mode must be between 0 and {model.n_modes - 1} (slowest first), got {mode}")
    if int(n) < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    flow = _flow64(model)
    if isinstance(others, str) and others == "sample":
        generator = torch.Generator().manual_seed(int(seed))
        eps = torch.randn(int(n), model.n_modes, generator=generator, dtype=torch.float64)
    elif not isinstance(others, str) and others == 0:
        eps = torch.zeros(int(n), model.n_modes, dtype=torch.float64)
    else:
        raise ValueError(f"others must be 0 or 'sample', got {others!r}")
    eps[:, mode] = torch.linspace(-float(width), float(width), int(n), dtype=torch.float64)
    positions, log_likelihood = _decode(model, flow, eps)
    omega = float(_slow_axes(flow)[1][mode])
    return LatentPath(eps[:, mode].numpy() / omega, eps.numpy(), positions, log_likelihood)


def write_positions_as_trajectory(positions, topology_subset, path):
    """Write positions of the selected atoms as a trajectory file, the format chosen by the extension.

    Parameters
    ----------
    positions : array_like, shape (T, n, 3) or (n, 3)
        Positions in nm.
    topology_subset : mdtraj.Topology
        The topology of the n atoms, e.g. ``data.topology.subset(model.atom_indices)``.
    path : str or os.PathLike
        ``.dcd`` (needs the topology elsewhere, e.g. a PDB written alongside) or ``.pdb`` (one model per frame);
        other extensions mdtraj writes (``.xtc``, ``.h5``…) work too.

    Returns
    -------
    mdtraj.Trajectory
        The trajectory written.

    Examples
    --------
    >>> import tempfile
    >>> top = mdtraj.Topology()
    >>> residue = top.add_residue("UNK", top.add_chain())
    >>> _ = top.add_atom("C1", mdtraj.element.carbon, residue)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     traj = write_positions_as_trajectory(np.zeros((3, 1, 3)), top, os.path.join(tmp, "path.dcd"))
    ...     mdtraj.load(os.path.join(tmp, "path.dcd"), top=top).n_frames
    3
    """
    positions = np.asarray(positions, dtype=float)
    if positions.ndim == 2:
        positions = positions[None]
    if positions.ndim != 3 or positions.shape[2] != 3:
        raise ValueError(f"positions must be (T, n, 3) or (n, 3), got shape {positions.shape}")
    if positions.shape[1] != topology_subset.n_atoms:
        raise ValueError(f"positions hold {positions.shape[1]} atoms but the topology has {topology_subset.n_atoms}")
    traj = mdtraj.Trajectory(positions, topology_subset)
    try:
        traj.save(os.fspath(path))
    except (KeyError, IOError, ValueError) as error:
        raise ValueError(f"cannot write {path}: {error}") from None
    return traj
