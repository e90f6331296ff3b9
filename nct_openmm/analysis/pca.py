"""Harmonic principal component analysis: the linear limit of the neural canonical transformation.

If the potential were harmonic in mass-weighted coordinates u, V = ½ Σ_k ω_k² q_k² with q the normal-mode
coordinates, the Boltzmann distribution would be Gaussian with covariance eigenvalues λ_k = kT / ω_k². Reading the
relation backwards turns the covariance of sampled configurations into a spectrum of frequencies
ω_k = sqrt(kT / λ_k), the baseline against which the flow's learned spectrum is compared.

Units: u in sqrt(amu)·nm and kT in kJ/mol = amu·nm²/ps², so λ is in amu·nm² and ω in 1/ps.
"""
from dataclasses import dataclass

import numpy as np

__all__ = ["HarmonicPCA", "harmonic_pca"]


@dataclass(frozen=True)
class HarmonicPCA:
    """Normal modes of the quasi-harmonic fit, slowest first.

    Attributes
    ----------
    frequencies : numpy.ndarray, shape (d,)
        ω_k = sqrt(kT / λ_k) in 1/ps, ascending; ``inf`` for a direction without variance.
    variances : numpy.ndarray, shape (d,)
        Covariance eigenvalues λ_k in amu·nm², descending.
    components : numpy.ndarray, shape (d, d)
        Orthonormal eigenvectors as columns, column k belonging to ``frequencies[k]``; each column's entry of
        largest magnitude is positive, so the projections' signs are reproducible.
    mean : numpy.ndarray, shape (d,)
        The (weighted) mean configuration.

    Examples
    --------
    >>> pca = HarmonicPCA(np.array([1.0]), np.array([2.5]), np.eye(1), np.zeros(1))
    >>> pca.transform(np.array([[0.5], [-1.0]])).ravel()
    array([ 0.5, -1. ])
    """

    frequencies: np.ndarray
    variances: np.ndarray
    components: np.ndarray
    mean: np.ndarray

    def transform(self, u):
        """Project configurations on the normal modes.

        Parameters
        ----------
        u : array_like, shape (T, d)
            Mass-weighted coordinates in sqrt(amu)·nm.

        Returns
        -------
        numpy.ndarray, shape (T, d)
            Mode amplitudes, slowest mode in column 0.

        Examples
        --------
        >>> pca = harmonic_pca(np.array([[0.0, 0.0], [2.0, 0.2], [4.0, 0.0]]), kT=2.5)
        >>> pca.transform([[4.0, 0.0]])[:, 0].round(3)
        array([2.])
        """
        return (np.asarray(u, dtype=float) - self.mean) @ self.components


def _weighted_covariance(u, weights):
    """Weighted mean and covariance, the latter unbiased for reliability weights.

    Normalising by 1 − Σ w² (weights summing to one) reduces to the familiar N − 1 rule for equal weights.

    Examples
    --------
    >>> mean, cov = _weighted_covariance(np.array([[0.0], [2.0]]), np.ones(2))
    >>> float(mean[0]), float(cov[0, 0])
    (1.0, 2.0)
    """
    w = weights / weights.sum()
    mean = w @ u
    centred = u - mean
    cov = (centred * w[:, None]).T @ centred / (1.0 - np.sum(w**2))
    return mean, cov


def _fix_signs(components):
    """Flip each column so that its entry of largest magnitude is positive.

    Examples
    --------
    >>> _fix_signs(np.array([[0.6, -0.8], [-0.8, -0.6]]))
    array([[-0.6,  0.8],
           [ 0.8,  0.6]])
    """
    rows = np.argmax(np.abs(components), axis=0)
    signs = np.sign(components[rows, np.arange(components.shape[1])])
    return components * signs


def harmonic_pca(u, kT, weights=None):
    """Fit the quasi-harmonic normal modes of sampled configurations.

    Parameters
    ----------
    u : array_like, shape (T, d)
        Configurations in mass-weighted coordinates, sqrt(amu)·nm (Cartesian displacement times sqrt(mass)).
    kT : float
        Thermal energy in kJ/mol.
    weights : array_like, shape (T,), optional
        Non-negative per-frame weights (e.g. to reweight a biased run); equal weights if omitted.

    Returns
    -------
    HarmonicPCA
        Frequencies in 1/ps ascending, covariance eigenvalues descending, matching components, mean.

    Examples
    --------
    A 1-d oscillator of mass 1 amu and ω = 10/ps at kT = 2.5 kJ/mol has ⟨x²⟩ = kT/ω² = 0.025 nm²:

    >>> rng = np.random.default_rng(0)
    >>> u = rng.normal(scale=np.sqrt(0.025), size=(20000, 1))
    >>> round(float(harmonic_pca(u, kT=2.5).frequencies[0]), 1)
    10.0
    """
    u = np.asarray(u, dtype=float)
    if u.ndim != 2 or len(u) < 2:
        raise ValueError(f"u must be a (T, d) array with T >= 2, got shape {u.shape}")
    weights = np.ones(len(u)) if weights is None else np.asarray(weights, dtype=float)
    if weights.shape != (len(u),) or np.any(weights < 0) or np.count_nonzero(weights) < 2:
        raise ValueError("weights must be T non-negative numbers, at least two of them positive")
    mean, cov = _weighted_covariance(u, weights)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    # eigh sorts ascending; the slowest mode is the widest one.
    variances = np.clip(eigenvalues[::-1], 0.0, None)
    with np.errstate(divide="ignore"):
        frequencies = np.sqrt(kT / variances)
    return HarmonicPCA(frequencies, variances, _fix_signs(eigenvectors[:, ::-1]), mean)
