"""Mutual information between collective variables and observables.

The estimator is algorithm 1 of Kraskov, Stögbauer & Grassberger, "Estimating mutual information",
Phys. Rev. E 69, 066138 (2004): for every sample, the distance ε to its k-th neighbour in the joint space (max-norm)
sets a radius inside which neighbours are counted in each marginal space, and

    I(X; Y) = ψ(k) + ψ(N) − ⟨ψ(n_x + 1) + ψ(n_y + 1)⟩.

Neighbour searches use k-d trees, so one estimate costs O(N log N).
"""
import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma

__all__ = ["mutual_information", "mutual_information_matrix"]


def _as_variable(values, periodic):
    """Return ``values`` as an (N, d) array, angles embedded on the unit circle.

    An angle is replaced by (cos θ, sin θ) so that θ = −π and θ = π are neighbours; each periodic column thus becomes
    two columns of the returned array.

    Examples
    --------
    >>> _as_variable(np.array([0.0, np.pi / 2]), periodic=True).round(6) + 0.0
    array([[1., 0.],
           [0., 1.]])
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2:
        raise ValueError(f"expected an (N,) or (N, d) array, got shape {values.shape}")
    if periodic:
        values = np.concatenate([np.cos(values), np.sin(values)], axis=1)
    return values


def _standardize(values):
    """Rescale a variable by one factor so that its columns have unit mean standard deviation.

    The estimator's finite-sample bias depends on the relative scale of the two variables, so both are brought to
    unit scale. A single factor per variable keeps its internal geometry (the circle of an embedded angle stays a
    circle).

    Examples
    --------
    >>> _standardize(np.array([[0.0], [2.0], [4.0]])).ravel().round(4)
    array([-1.2247,  0.    ,  1.2247])
    """
    centred = values - values.mean(axis=0)
    scale = centred.std(axis=0).mean()
    return centred / scale if scale > 0 else centred


def _counts_within(points, radii):
    """Number of other points strictly closer than ``radii`` (max-norm) to each point.

    ``cKDTree.query_ball_point`` counts distances ≤ r including the point itself; shrinking r by one ulp makes the
    comparison strict, as algorithm 1 requires.

    Examples
    --------
    >>> _counts_within(np.array([[0.0], [1.0], [3.0]]), np.array([1.5, 1.0, 2.5])).tolist()
    [1, 0, 1]
    """
    tree = cKDTree(points)
    strict = np.nextafter(radii, 0.0)
    return tree.query_ball_point(points, strict, p=np.inf, return_length=True) - 1


def mutual_information(x, y, k=5, periodic_x=False, periodic_y=False, clip=False, jitter=1e-10, seed=0):
    """Kraskov–Stögbauer–Grassberger (algorithm 1) estimate of the mutual information I(x; y) in nats.

    Parameters
    ----------
    x, y : array_like, shape (N,) or (N, d)
        Paired samples of the two variables.
    k : int, optional
        Neighbour order; larger k lowers the variance and raises the bias. Default 5.
    periodic_x, periodic_y : bool, optional
        Treat every column of the variable as an angle in radians and embed it as (cos, sin) before the estimate.
    clip : bool, optional
        Return ``max(I, 0)``. The raw estimate of independent variables scatters around zero, so it can be
        slightly negative.
    jitter : float, optional
        Amplitude, relative to the unit scale the variables are standardized to, of the uniform noise added to break
        ties. Ties (discretized or repeated values) make neighbour counts ambiguous and bias the estimate.
    seed : int, optional
        Seed of the jitter, so that repeated calls give the same number.

    Returns
    -------
    float
        The estimate of I(x; y) in nats.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> x = rng.normal(size=4000)
    >>> y = x + rng.normal(size=4000)
    >>> round(mutual_information(x, y), 1)  # exact: 0.5 ln 2 = 0.35
    0.3
    """
    xs = _standardize(_as_variable(x, periodic_x))
    ys = _standardize(_as_variable(y, periodic_y))
    n = len(xs)
    if len(ys) != n:
        raise ValueError(f"x and y hold different numbers of samples ({n} and {len(ys)})")
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, N - 1] = [1, {n - 1}], got {k}")
    rng = np.random.default_rng(seed)
    xs = xs + jitter * rng.uniform(-1.0, 1.0, size=xs.shape)
    ys = ys + jitter * rng.uniform(-1.0, 1.0, size=ys.shape)
    joint = np.concatenate([xs, ys], axis=1)
    # The query returns the point itself as its own nearest neighbour, hence k + 1.
    eps = cKDTree(joint).query(joint, k=k + 1, p=np.inf)[0][:, -1]
    n_x = _counts_within(xs, eps)
    n_y = _counts_within(ys, eps)
    estimate = digamma(k) + digamma(n) - np.mean(digamma(n_x + 1) + digamma(n_y + 1))
    return max(float(estimate), 0.0) if clip else float(estimate)


def mutual_information_matrix(modes, angles, k=5):
    """Mutual information between every mode and every angle.

    Parameters
    ----------
    modes : array_like, shape (N, K)
        Samples of K collective variables (e.g. latent modes, slowest first); treated as non-periodic.
    angles : dict of str to array_like, shape (N,)
        Named angles in radians, treated as periodic.
    k : int, optional
        Neighbour order of the estimator. Default 5.

    Returns
    -------
    dict of str to list of float
        For each angle name, the K estimates I(mode_j; angle) in nats, in the order of the columns of ``modes``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> phi = rng.uniform(-np.pi, np.pi, size=2000)
    >>> modes = np.stack([np.sin(phi), rng.normal(size=2000)], axis=1)
    >>> mi = mutual_information_matrix(modes, {"phi": phi})
    >>> mi["phi"][0] > 1.0, abs(mi["phi"][1]) < 0.05
    (True, True)
    """
    modes = np.asarray(modes, dtype=float)
    if modes.ndim != 2:
        raise ValueError(f"modes must be an (N, K) array, got shape {modes.shape}")
    return {
        name: [mutual_information(mode, angle, k=k, periodic_y=True) for mode in modes.T]
        for name, angle in angles.items()
    }
