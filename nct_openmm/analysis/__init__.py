"""Analysis of learned collective variables: pure numpy/scipy/mdtraj/matplotlib, no torch and no OpenMM.

- :mod:`~nct_openmm.analysis.information` — mutual information (Kraskov–Stögbauer–Grassberger estimator).
- :mod:`~nct_openmm.analysis.pca` — harmonic PCA, the linear-limit baseline spectrum.
- :mod:`~nct_openmm.analysis.dihedrals` — backbone Φ/Ψ, transitions, basin free energies, free energy surfaces.
- :mod:`~nct_openmm.analysis.plots` — spectrum, mutual-information and Ramachandran figures.
- :mod:`~nct_openmm.analysis.model_analysis` — a trained model on data: spectrum vs PCA, mode–dihedral information,
  latent interpolation and mode scans. It runs the flow, so it needs torch; its names are imported on first use,
  which keeps ``import nct_openmm.analysis`` free of torch.
"""
from .dihedrals import backbone_dihedrals, basin_free_energy, count_transitions, free_energy_surface, in_upper_basin
from .information import mutual_information, mutual_information_matrix
from .pca import HarmonicPCA, harmonic_pca
from .plots import (largest_gap, plot_free_energy_surface, plot_mutual_information, plot_ramachandran,
                    plot_spectrum)

__all__ = [
    "mutual_information",
    "mutual_information_matrix",
    "HarmonicPCA",
    "harmonic_pca",
    "backbone_dihedrals",
    "count_transitions",
    "basin_free_energy",
    "in_upper_basin",
    "free_energy_surface",
    "largest_gap",
    "plot_spectrum",
    "plot_mutual_information",
    "plot_ramachandran",
    "plot_free_energy_surface",
]

_MODEL_ANALYSIS = (
    "LatentPath",
    "spectrum_report",
    "dihedral_information",
    "configuration_log_likelihood",
    "interpolate",
    "prior_samples_along_modes",
    "write_positions_as_trajectory",
)
__all__ += list(_MODEL_ANALYSIS)


def __getattr__(name):
    # PEP 562: model_analysis (and with it torch) is imported only when one of its names is asked for.
    if name in _MODEL_ANALYSIS:
        from . import model_analysis

        return getattr(model_analysis, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
