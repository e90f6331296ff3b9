"""nct_openmm: neural canonical transformations that learn slow collective variables for OpenMM.

The package is layered so that data flows one way:

- :mod:`nct_openmm.core` — the flow (point transformation, linear symplectic layer, harmonic prior), the model,
  and the variational / maximum-likelihood training loops. Pure PyTorch; knows nothing of OpenMM or mdtraj.
- :mod:`nct_openmm.geometry` — rigid-body removal and the 3n−6 internal frame, in TorchScript-compatible torch,
  shared by training and the exported CVs.
- :mod:`nct_openmm.data`, :mod:`nct_openmm.systems`, :mod:`nct_openmm.simulate` — trajectories and OpenMM systems in.
- :mod:`nct_openmm.export`, :mod:`nct_openmm.forces`, :mod:`nct_openmm.metadynamics` — the trained model as OpenMM
  forces; :mod:`nct_openmm.integrators` — multiple time stepping that applies such a bias every n-th step.
- :mod:`nct_openmm.analysis` — spectra, mutual information, PCA baseline, interpolation.
- :mod:`nct_openmm.cli` — the ``nct`` command.
- :mod:`nct_openmm.messages` — the one-line error messages every layer shows; imports nothing.
"""
__version__ = "0.1.0"
