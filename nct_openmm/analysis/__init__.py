"""Analysis of learned collective variables: pure numpy/scipy/mdtraj/matplotlib, no torch and no OpenMM.

- :mod:`~nct_openmm.analysis.information` — mutual information (Kraskov–Stögbauer–Grassberger estimator).
- :mod:`~nct_openmm.analysis.pca` — harmonic PCA, the linear-limit baseline spectrum.
- :mod:`~nct_openmm.analysis.dihedrals` — backbone Φ/Ψ, transitions, basin free energies, free energy surfaces.
- :mod:`~nct_openmm.analysis.plots` — spectrum, mutual-information and Ramachandran figures.
"""
from .dihedrals import backbone_dihedrals, basin_free_energy, count_transitions, free_energy_surface
from .information import mutual_information, mutual_information_matrix
from .pca import HarmonicPCA, harmonic_pca
from .plots import largest_gap, plot_mutual_information, plot_ramachandran, plot_spectrum

__all__ = [
    "mutual_information",
    "mutual_information_matrix",
    "HarmonicPCA",
    "harmonic_pca",
    "backbone_dihedrals",
    "count_transitions",
    "basin_free_energy",
    "free_energy_surface",
    "largest_gap",
    "plot_spectrum",
    "plot_mutual_information",
    "plot_ramachandran",
]
