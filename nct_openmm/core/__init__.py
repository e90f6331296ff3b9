"""The PyTorch core of nct_openmm: flows, prior, model and training. Imports nothing from OpenMM or mdtraj.

Paper map (Li, Dong, Zhang & Wang, PRX 10, 021020 (2020)): point transformation Eqs. 2–3 →
:mod:`~nct_openmm.core.layers`; linear symplectic layer, Appendix A1 → :mod:`~nct_openmm.core.linear`; harmonic
prior Eq. 4 → :mod:`~nct_openmm.core.prior`; variational and maximum-likelihood losses Eqs. 5–6 →
:mod:`~nct_openmm.core.training`.
"""
from .layers import AffineCoupling, AffinePoint, LinearPoint, coupling_masks
from .linear import LinearSymplectic
from .model import FlowConfig, NCTModel
from .prior import HarmonicPrior
from .serialization import ModelFileError
from .training import (TrainingHistory, Trainer, augment_momenta, fit_likelihood, fit_variational, flow_optimizer,
                       free_energy_estimate, harmonic_initialization, model_from_data, negative_log_likelihood,
                       path_gradient_objective, variational_loss, variational_objective)

__all__ = ["AffineCoupling", "AffinePoint", "LinearPoint", "coupling_masks", "LinearSymplectic", "FlowConfig",
           "NCTModel", "HarmonicPrior", "ModelFileError", "TrainingHistory", "Trainer", "augment_momenta",
           "fit_likelihood", "fit_variational", "flow_optimizer", "free_energy_estimate", "harmonic_initialization",
           "model_from_data", "negative_log_likelihood", "path_gradient_objective", "variational_loss",
           "variational_objective"]
