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
        return self.modes(positions).to(positions.dtype)

    def modes(self, positions: torch.Tensor) -> torch.Tensor:
        x = positions[self.atom_indices].to(torch.float64)
        x = (x - x.mean(dim=0)).reshape(-1)
        return torch.tanh(x @ self.weights) * 3.0


class BoxShiftedModes(StandInModes):
    """The stand-in modes plus a tenth of the box's first edge length: shows whether box vectors arrive."""

    def forward(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor] = None) -> torch.Tensor:
        modes = self.modes(positions)
        if boxvectors is not None:
            modes = modes + 0.1 * boxvectors[0, 0].to(modes.dtype)
        return modes.to(positions.dtype)
