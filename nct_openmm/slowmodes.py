"""Slow modes of molecules: the estimator that trains an NCT on trajectory data, and the model it returns.

PyData idiom: ``NCT(...).fit(data)`` trains; ``fetch_model()`` returns a :class:`SlowModeModel` that transforms
positions to slow modes, reports frequencies in 1/ps, saves to one self-contained file and exports OpenMM CVs.
"""
import datetime
import math
import platform
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from . import __version__
from .core import FlowConfig, NCTModel, fit_likelihood, model_from_data
from .core.serialization import load_payload, rebuilt, save_payload
from .data import BOLTZMANN, MAX_LINK_BONDS, TrajectoryData, thermal_energy
from .geometry import InternalFrame, breadth_first_order, kabsch_align, spanning_tree, unwrap


def average_structure(positions: np.ndarray, masses: np.ndarray, iterations: int = 3) -> np.ndarray:
    """Mass-weighted iterative Procrustes average of ``positions (T, n, 3)``, a reference that no single frame
    biases."""
    x = torch.as_tensor(positions, dtype=torch.float64)
    w = torch.as_tensor(masses, dtype=torch.float64)
    reference = x[0] - (w[:, None] * x[0]).sum(0) / w.sum()
    for _ in range(iterations):
        reference = kabsch_align(x, reference, w).mean(0)
    return reference.numpy()


class SlowModeModel:
    """A trained NCT of a molecule: internal frame (atoms, masses, reference, temperature) + flow + metadata.

    Parameters
    ----------
    frame : InternalFrame
    flow : NCTModel
    metadata : dict
        Temperature, training summary, data provenance, versions (JSON-like).
    """

    def __init__(self, frame: InternalFrame, flow: NCTModel, metadata: Optional[dict] = None):
        if frame.dim != flow.dim:
            raise ValueError(f"frame has {frame.dim} internal coordinates but the flow expects {flow.dim}")
        self.frame, self.flow = frame, flow
        self.metadata = dict(metadata or {})
        self.flow.eval()

    # --- description --------------------------------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        return self.frame.kT / BOLTZMANN

    @property
    def atom_indices(self):
        return list(self.frame.atom_indices)

    @property
    def n_modes(self) -> int:
        return self.flow.dim

    @property
    def frequencies(self) -> np.ndarray:
        """Angular frequencies ω (1/ps) of the internal modes, ascending. The internal coordinates are
        mass-weighted and divided by √kT, so they are in ps and ω = sqrt(kT / Var Q) is in 1/ps."""
        return self.flow.frequencies().double().numpy()

    # --- transforms ---------------------------------------------------------------------------------------------
    def internal_coordinates(self, positions, boxes=None) -> torch.Tensor:
        """Reduced internal coordinates ``(T, d)`` of selected-atom positions ``(T, n, 3)`` in nm."""
        x = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
        box = None if boxes is None else torch.as_tensor(np.asarray(boxes), dtype=torch.float64)
        with torch.no_grad():
            return self.frame.internal(x, box)

    def positions_and_boxes(self, data):
        """Selected-atom positions ``(T, n, 3)`` and boxes (or None) of ``data``, checked against this model's atom
        selection: a :class:`TrajectoryData` must hold the model's atoms, positions ``(T, n, 3)`` or ``(n, 3)``
        the model's number of atoms.

        Raises
        ------
        ValueError
            Naming the mismatch.

        Examples
        --------
        >>> model.positions_and_boxes(np.zeros((5, 3, 3)))  # doctest: +SKIP
        Traceback (most recent call last):
        ValueError: the data have 3 atoms per frame but the model reads 10 (its atom selection)
        """
        if isinstance(data, TrajectoryData):
            if list(data.atom_indices) != self.atom_indices:
                raise ValueError(
                    f"the data hold atoms {_short(data.atom_indices)} but the model reads atoms "
                    f"{_short(self.atom_indices)}; load the trajectories with the model's atom selection"
                )
            positions, boxes = data.positions, data.boxes
        else:
            positions, boxes = np.asarray(data, dtype=float), None
        if positions.ndim == 2:
            positions = positions[None]
        n = len(self.atom_indices)
        if positions.ndim != 3 or positions.shape[2] != 3:
            raise ValueError(f"positions must be (T, n, 3) or (n, 3), got shape {positions.shape}")
        if positions.shape[1] != n:
            raise ValueError(f"the data have {positions.shape[1]} atoms per frame but the model reads {n} "
                             "(its atom selection)")
        return positions, boxes

    def transform(self, data, k: Optional[int] = None, scaled: bool = True, batch: int = 8192) -> np.ndarray:
        """Slow modes ``(T, k)`` of ``data`` (a :class:`TrajectoryData` or selected positions ``(T, n, 3)``),
        slowest first; ``scaled`` gives ``ε = ω Q`` (unit variance under the model). ``k`` defaults to all."""
        if k is not None and not 1 <= k <= self.n_modes:
            raise ValueError(f"k must be between 1 and the model's {self.n_modes} modes, got {k}")
        positions, boxes = self.positions_and_boxes(data)
        u = self.internal_coordinates(positions, boxes).float()
        with torch.no_grad():
            out = [self.flow.slow_modes(u[i:i + batch], k, scaled) for i in range(0, len(u), batch)]
        return torch.cat(out).double().numpy()

    def log_likelihood(self, data, seed: int = 0) -> np.ndarray:
        """Phase-space log-likelihood ``ln ρ(u, p)`` per frame with Maxwell–Boltzmann momenta (seeded)."""
        positions, boxes = self.positions_and_boxes(data)
        u = self.internal_coordinates(positions, boxes).float()
        p = torch.randn(u.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return self.flow.log_prob(u, p).double().numpy()

    def positions_from_latent(self, Q: torch.Tensor) -> np.ndarray:
        """Selected-atom positions (nm, reference frame) of latent positions ``Q (T, d)`` in the flow's own mode
        order (``flow.prior.slow_order()`` maps it to slowest-first)."""
        with torch.no_grad():
            u = self.flow.inverse_transform(Q.float())
        return self.frame.cartesian(u.double()).numpy()

    # --- persistence --------------------------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the model as one self-contained file (no training code needed to load it)."""
        frame_state = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in self.frame.state().items()}
        save_payload(path, {"kind": "molecular", "flow": self.flow.state(), "frame": frame_state,
                            "metadata": self.metadata})

    @classmethod
    def load(cls, path) -> "SlowModeModel":
        """Read a model file; a foreign, corrupt or incompatible file raises ``ModelFileError``."""
        document = load_payload(path, "molecular")
        return rebuilt(path, lambda: cls(InternalFrame.from_state(document["frame"]),
                                         NCTModel.from_state(document["flow"]), document.get("metadata", {})))

    def summary(self) -> dict:
        """The metadata with the current spectrum, JSON-ready."""
        info = dict(self.metadata)
        info.update(frequencies=self.frequencies.tolist(), atom_indices=self.atom_indices,
                    temperature=self.temperature, n_internal_modes=self.n_modes)
        return info


class NCT:
    """Estimator: maximum-likelihood NCT of the slow modes of a molecule from trajectory data.

    Parameters
    ----------
    temperature : float
        Temperature of the data (K); momenta are drawn from Maxwell–Boltzmann at this temperature.
    n_couplings, hidden, depth, mask, scale_bound, linear_point
        Flow hyperparameters (:class:`~nct_openmm.core.FlowConfig`).
    align : bool
        Remove rigid-body motion (3n − 6 internal coordinates). Turn off only for systems held by external fields.
    batch_size, max_steps, lr, patience, seed, validation_fraction, checkpoint, progress
        Training settings; the validation split is by trajectory when several are given.
    checkpoint_every : int, optional
        Steps between checkpoints when ``checkpoint`` is given; by default one epoch, so that an interrupted
        training resumes from its last epoch.
    compile_loss : bool
        Compile the training loss (:class:`~nct_openmm.core.training.CompiledLoss`): faster steps after a
        compilation of tens of seconds; worth it for trainings of more than a few minutes.

    Examples
    --------
    >>> estimator = NCT(temperature=300, max_steps=2000)                         # doctest: +SKIP
    >>> model = estimator.fit(load_trajectories(["traj.dcd"], "top.pdb")).fetch_model()  # doctest: +SKIP
    >>> model.frequencies[:3]                                                     # doctest: +SKIP
    """

    def __init__(self, temperature: float, n_couplings: int = 8, hidden: int = 64, depth: int = 2,
                 mask: str = "random", scale_bound: float = 2.0, linear_point: bool = True, align: bool = True,
                 batch_size: int = 256, max_steps: int = 20000, lr: float = 1e-3, patience: int = 10, seed: int = 0,
                 validation_fraction: float = 0.2, checkpoint: Optional[str] = None, progress: bool = True,
                 compile_loss: bool = False, checkpoint_every: Optional[int] = None):
        self.temperature = float(temperature)
        self.config_options = dict(n_couplings=n_couplings, hidden=hidden, depth=depth, mask=mask, seed=seed,
                                   scale_bound=scale_bound, linear_point=linear_point)
        self.align = align
        self.training = dict(batch_size=batch_size, max_steps=max_steps, lr=lr, patience=patience, seed=seed,
                             checkpoint=checkpoint, progress=progress, compile_loss=compile_loss)
        self.checkpoint_every = checkpoint_every
        self.validation_fraction = validation_fraction
        self._model = None

    def make_frame(self, data: TrajectoryData) -> InternalFrame:
        """The internal frame for ``data``: its atoms, masses, average structure and the temperature."""
        parents = spanning_tree(len(data.atom_indices), data.bonds)
        positions = data.positions
        pieces = sum(parent < 0 for parent in parents)
        if data.boxes is not None and pieces > 1:
            raise ValueError(f"the selected atoms form {pieces} pieces not bonded to each other (nor through at "
                             f"most {MAX_LINK_BONDS} bonds of unselected atoms), which cannot be made whole across "
                             "periodic boundaries: the CV would jump whenever the box splits them; select atoms "
                             "that are linked, e.g. all Cα atoms of a chain rather than two far apart")
        if data.boxes is not None:
            # Molecules broken across the periodic boundary would otherwise be averaged into a distorted reference.
            positions = unwrap(torch.as_tensor(positions, dtype=torch.float64),
                               torch.as_tensor(data.boxes, dtype=torch.float64), breadth_first_order(parents),
                               parents).numpy()
        reference = average_structure(positions, data.masses) if self.align else positions.mean(0)
        return InternalFrame(data.atom_indices, torch.as_tensor(data.masses), torch.as_tensor(reference),
                             thermal_energy(self.temperature), parents, self.align)

    def fit(self, data: TrajectoryData, validation: Optional[TrajectoryData] = None) -> "NCT":
        """Train on ``data`` (held-out ``validation`` data, or a split of ``data`` by trajectory)."""
        if validation is None:
            data, validation = data.split_by_trajectory(self.validation_fraction, self.training["seed"])
        if data.n_frames == 0 or validation.n_frames == 0:
            raise ValueError(f"{data.n_frames} training and {validation.n_frames} validation frames: both sets need "
                             "frames (check the validation fraction)")
        frame = self.make_frame(data)
        u = _internal(frame, data)
        u_val = _internal(frame, validation)
        w = None if data.weights is None else torch.as_tensor(data.weights, dtype=torch.float32)
        w_val = None if validation.weights is None else torch.as_tensor(validation.weights, dtype=torch.float32)
        flow = model_from_data(FlowConfig(dim=frame.dim, **self.config_options), u, w)
        every = self.checkpoint_every or max(1, len(u) // self.training["batch_size"])
        history = fit_likelihood(flow, u, weights=w, q_val=u_val, weights_val=w_val, checkpoint_every=every,
                                 **self.training)
        flow.fix_mode_signs(u)
        metadata = self._metadata(data, validation, history)
        with torch.no_grad():
            eps = flow.slow_modes(u, scaled=True).double().numpy()
        metadata["mode_ranges"] = np.stack([eps.min(0), eps.max(0)], axis=1).tolist()
        self._model = SlowModeModel(frame, flow, metadata)
        return self

    def fetch_model(self) -> SlowModeModel:
        if self._model is None:
            raise RuntimeError("fit() has not been called")
        return self._model

    def _metadata(self, data, validation, history) -> dict:
        import openmm

        return {
            "temperature": self.temperature,
            "units": {"positions": "nm", "masses": "amu", "frequencies": "1/ps", "temperature": "K"},
            "training": {"method": "maximum likelihood (phase space, Maxwell-Boltzmann momenta)",
                         "train_frames": int(data.n_frames), "validation_frames": int(validation.n_frames),
                         "sources": data.sources, "weighted": data.weights is not None,
                         "steps": int(history.step[-1]) if history.step else 0,
                         "best_validation_nll": float(history.best_val_loss), "stopped": history.stopped,
                         "seconds": float(history.elapsed[-1]) if history.elapsed else 0.0,
                         **{k: v for k, v in self.training.items() if k not in ("checkpoint", "progress")}},
            "versions": {"nct_openmm": __version__, "torch": str(torch.__version__), "openmm": str(openmm.__version__),
                         "python": platform.python_version()},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }


def _internal(frame: InternalFrame, data: TrajectoryData) -> torch.Tensor:
    x = torch.as_tensor(data.positions, dtype=torch.float64)
    box = None if data.boxes is None else torch.as_tensor(data.boxes, dtype=torch.float64)
    with torch.no_grad():
        return frame.internal(x, box).float()


def _short(indices, limit=8):
    """A list of indices, abbreviated for error messages.

    Examples
    --------
    >>> _short(range(20), limit=3)
    '[0, 1, 2, ...] (20 atoms)'
    """
    indices = list(indices)
    if len(indices) <= limit:
        return str(indices)
    return "[" + ", ".join(str(i) for i in indices[:limit]) + f", ...] ({len(indices)} atoms)"
