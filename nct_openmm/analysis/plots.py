"""Figures of the analysis: spectrum, mutual information, Ramachandran map.

Figures are built on :class:`matplotlib.figure.Figure` with the Agg canvas rather than through pyplot, so plotting
needs no display, leaves no figure open and does not change the backend of the calling program.
"""
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["largest_gap", "plot_spectrum", "plot_mutual_information", "plot_ramachandran"]


def _new_axes(ncols=1, width=5.0, sharey=False):
    """A figure with an Agg canvas and a row of ``ncols`` axes.

    Examples
    --------
    >>> fig, axes = _new_axes(ncols=2)
    >>> len(axes)
    2
    """
    fig = Figure(figsize=(width * ncols, 4.0))
    FigureCanvasAgg(fig)
    return fig, list(np.atleast_1d(fig.subplots(1, ncols, sharey=sharey)))


def _save(fig, path):
    """Write ``fig`` as an image at ``path`` and return the path.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _save(_new_axes()[0], Path(tmp) / "empty.png").stat().st_size > 0
    True
    """
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def largest_gap(frequencies):
    """Position and size of the largest jump between consecutive frequencies of a spectrum.

    Parameters
    ----------
    frequencies : array_like, shape (K,)
        Positive frequencies, in ascending (slowest-first) order; K ≥ 2.

    Returns
    -------
    index : int
        0-based index of the last mode below the gap: the gap lies between modes ``index`` and ``index + 1``, so
        ``index + 1`` modes are slow.
    ratio : float
        ω[index + 1] / ω[index], the largest ratio of consecutive frequencies (largest gap in log-frequency).

    Examples
    --------
    >>> largest_gap([1.0, 1.5, 12.0, 15.0])
    (1, 8.0)
    """
    frequencies = np.asarray(frequencies, dtype=float)
    if frequencies.ndim != 1 or len(frequencies) < 2 or not np.all(frequencies > 0):
        raise ValueError("frequencies must be a 1-d array of at least two positive numbers")
    index = int(np.argmax(np.diff(np.log(frequencies))))
    return index, float(frequencies[index + 1] / frequencies[index])


def plot_spectrum(frequencies, path, baseline=None, baseline_label="PCA", label="NCT"):
    """Plot ω_k against mode index on a log axis and mark the largest gap.

    Parameters
    ----------
    frequencies : array_like, shape (K,)
        Positive frequencies in 1/ps, slowest first.
    path : str or os.PathLike
        Image file to write; the format follows the extension.
    baseline : array_like, shape (K',), optional
        A reference spectrum (e.g. the harmonic PCA one) drawn on the same axes.
    baseline_label, label : str, optional
        Legend entries of the baseline and of the main spectrum.

    Returns
    -------
    pathlib.Path
        The file written.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     plot_spectrum([0.5, 0.7, 6.0, 7.0], Path(tmp) / "spectrum.png", baseline=[1.0, 2.0, 3.0, 4.0]).name
    'spectrum.png'
    """
    frequencies = np.asarray(frequencies, dtype=float)
    fig, (ax,) = _new_axes()
    modes = np.arange(1, len(frequencies) + 1)
    ax.plot(modes, frequencies, "o-", label=label)
    if baseline is not None:
        baseline = np.asarray(baseline, dtype=float)
        ax.plot(np.arange(1, len(baseline) + 1), baseline, "s--", alpha=0.7, label=baseline_label)
    index, ratio = largest_gap(frequencies)
    # Mode numbers on the axis are 1-based, so the gap after 0-based mode `index` sits at index + 1.5.
    ax.axvline(index + 1.5, color="grey", linestyle="--")
    ax.text(index + 1.6, np.sqrt(frequencies[index] * frequencies[index + 1]), f"gap ×{ratio:.1f}", va="center")
    ax.set_yscale("log")
    ax.set_xlabel("mode k")
    ax.set_ylabel("ω_k (1/ps)")
    ax.legend()
    return _save(fig, path)


def _bar_panel(ax, values, baseline, title, label, baseline_label):
    """Bars of one angle's mutual information per mode, the baseline's beside them.

    Examples
    --------
    >>> _bar_panel(_new_axes()[1][0], [0.5, 0.1], None, "Φ", "NCT", "PCA")
    """
    values = np.asarray(values, dtype=float)
    width = 0.4 if baseline is not None else 0.8
    modes = np.arange(1, len(values) + 1)
    ax.bar(modes - (width / 2 if baseline is not None else 0.0), values, width, label=label)
    if baseline is not None:
        baseline = np.asarray(baseline, dtype=float)
        ax.bar(np.arange(1, len(baseline) + 1) + width / 2, baseline, width, label=baseline_label)
    ax.set_xticks(modes)
    ax.set_xlabel("mode k (slowest first)")
    ax.set_title(title)
    ax.legend()


def plot_mutual_information(mi_phi, mi_psi, path, baseline_phi=None, baseline_psi=None, label="NCT",
                            baseline_label="PCA"):
    """Bar charts of the mutual information of each mode with Φ and with Ψ.

    Parameters
    ----------
    mi_phi, mi_psi : array_like, shape (K,)
        I(mode_k; Φ) and I(mode_k; Ψ) in nats, slowest mode first.
    path : str or os.PathLike
        Image file to write.
    baseline_phi, baseline_psi : array_like, shape (K',), optional
        The same quantities for a baseline (e.g. harmonic PCA modes), drawn beside each bar.
    label, baseline_label : str, optional
        Legend entries.

    Returns
    -------
    pathlib.Path
        The file written.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     plot_mutual_information([0.9, 0.1], [0.2, 0.6], Path(tmp) / "mi.png", [0.3, 0.2], [0.1, 0.1]).name
    'mi.png'
    """
    fig, (ax_phi, ax_psi) = _new_axes(ncols=2, sharey=True)
    _bar_panel(ax_phi, mi_phi, baseline_phi, "I(mode; Φ)", label, baseline_label)
    _bar_panel(ax_psi, mi_psi, baseline_psi, "I(mode; Ψ)", label, baseline_label)
    ax_phi.set_ylabel("mutual information (nats)")
    return _save(fig, path)


def _break_at_wraps(phi_deg, psi_deg):
    """Insert NaN between consecutive points that jump across the periodic boundary, so a path is not drawn across
    the whole map.

    Examples
    --------
    >>> _break_at_wraps(np.array([170.0, -170.0]), np.array([0.0, 0.0]))[0].tolist()
    [170.0, nan, -170.0]
    """
    jumps = (np.abs(np.diff(phi_deg)) > 180.0) | (np.abs(np.diff(psi_deg)) > 180.0)
    where = np.flatnonzero(jumps) + 1
    return np.insert(phi_deg, where, np.nan), np.insert(psi_deg, where, np.nan)


def _to_map_degrees(angles):
    """Radians to degrees in [−180, 180).

    Examples
    --------
    >>> _to_map_degrees(np.array([np.pi, -np.pi / 2])).tolist()
    [-180.0, -90.0]
    """
    return np.mod(np.rad2deg(np.asarray(angles, dtype=float)) + 180.0, 360.0) - 180.0


def plot_ramachandran(phi_psi_sets, path):
    """Overlay sets of (Φ, Ψ) on a Ramachandran map in degrees.

    Parameters
    ----------
    phi_psi_sets : sequence of (str, array_like, array_like, str)
        (label, phi, psi, style) per set, angles in radians. ``style`` is ``"points"`` for a cloud of samples
        (training data, held-out data, generated samples) or ``"path"`` for an ordered sequence drawn as a line with
        markers (e.g. an interpolation in latent space); sets are drawn in order, later ones on top.
    path : str or os.PathLike
        Image file to write.

    Returns
    -------
    pathlib.Path
        The file written.

    Examples
    --------
    >>> import tempfile
    >>> rng = np.random.default_rng(0)
    >>> cloud = ("train", rng.uniform(-3, 3, 100), rng.uniform(-3, 3, 100), "points")
    >>> line = ("interpolation", np.linspace(-2, 1, 10), np.linspace(2.5, -0.5, 10), "path")
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     plot_ramachandran([cloud, line], Path(tmp) / "rama.png").name
    'rama.png'
    """
    fig, (ax,) = _new_axes(width=5.0)
    for label, phi, psi, style in phi_psi_sets:
        phi_deg, psi_deg = _to_map_degrees(phi), _to_map_degrees(psi)
        if style == "points":
            ax.plot(phi_deg, psi_deg, ".", markersize=2, alpha=0.4, label=label)
        elif style == "path":
            ax.plot(*_break_at_wraps(phi_deg, psi_deg), "o-", markersize=3, linewidth=1.5, label=label)
        else:
            raise ValueError(f"style must be 'points' or 'path', got {style!r}")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-180, 180)
    ax.set_xticks(np.arange(-180, 181, 90))
    ax.set_yticks(np.arange(-180, 181, 90))
    ax.set_aspect("equal")
    ax.set_xlabel("Φ (degrees)")
    ax.set_ylabel("Ψ (degrees)")
    # Small point markers would make the legend unreadable; enlarge the legend's copies only.
    ax.legend(markerscale=3, loc="upper right")
    return _save(fig, path)


def plot_free_energy_surface(free_energy, edges, path, labels=("x", "y"), title="free energy (kJ/mol)"):
    """Filled contours of a 2-d free energy (kJ/mol, ``inf`` where unsampled) on its histogram bin edges."""
    fig, (ax,) = _new_axes()
    centres = [0.5 * (e[1:] + e[:-1]) for e in edges]
    finite = np.where(np.isfinite(free_energy), free_energy, np.nan)
    contours = ax.contourf(centres[0], centres[1], finite.T, levels=20, cmap="viridis")
    fig.colorbar(contours, ax=ax, label=title)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    return _save(fig, path)
