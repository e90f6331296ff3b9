"""A stand-in with the exported slow-mode CV contract, for tests of the OpenMM side that need no trained model.

The contract of every CV module nct_openmm exports (see nct_openmm.export):
``forward(positions (N, 3) nm, boxvectors: Optional[Tensor] = None) -> (K,)`` in the dtype of ``positions``,
K scaled slow modes, slowest first. Attributes: ``num_modes`` (K) and ``num_atoms_required`` (max atom index + 1).
"""
from typing import List, Optional

import torch


class StandInModes(torch.nn.Module):
    """Smooth nonlinear functions of selected atoms' centred coordinates: rotation-variant, but smooth and cheap."""

    def __init__(self, atom_indices: List[int], num_modes: int = 2, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        n = 3 * len(atom_indices)
        self.register_buffer("atom_indices", torch.tensor(atom_indices, dtype=torch.long))
        self.register_buffer("weights", torch.randn(n, num_modes, generator=generator, dtype=torch.float64))
        self.num_modes = num_modes
        self.num_atoms_required = max(atom_indices) + 1

    def forward(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = positions[self.atom_indices].to(torch.float64)
        x = (x - x.mean(dim=0)).reshape(-1)
        modes = torch.tanh(x @ self.weights) * 3.0
        return modes.to(positions.dtype)
