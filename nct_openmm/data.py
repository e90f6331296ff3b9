"""Simulation output in: trajectories (any format mdtraj reads), atom selection, masses, weights, checks.

Units are OpenMM's (nm, ps, amu, K) and are converted once, here. Positions stay float64 until the internal frame
has removed rigid-body motion.
"""
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import mdtraj
import numpy as np

from nct_openmm.messages import error_line

#: Residue names treated as ions (never part of the default selection).
ION_RESIDUES = {"NA", "CL", "K", "MG", "CA", "ZN", "LI", "RB", "CS", "F", "BR", "I", "Na+", "Cl-", "K+", "NA+", "CL-",
                "SOD", "CLA", "POT", "CAL", "CES", "LIT", "ZN2", "MG2"}  # the second line: CHARMM names

#: Boltzmann's constant in kJ/(mol K).
BOLTZMANN = 0.0083144626181532


def thermal_energy(temperature: float) -> float:
    """k_B T in kJ/mol for a temperature in K.

    Examples
    --------
    >>> round(thermal_energy(300.0), 4)
    2.4943
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive (K), got {temperature}")
    return BOLTZMANN * temperature


@dataclass
class TrajectoryData:
    """Selected-atom positions of one or more trajectories, ready for training.

    Attributes
    ----------
    positions : ndarray (T, n, 3)
        nm, float64.
    boxes : ndarray (T, 3, 3) or None
        Periodic box vectors (rows, nm) per frame, when the trajectories have them.
    trajectory_ids : ndarray (T,)
        Which input trajectory each frame came from (for splits by trajectory).
    frame_indices : ndarray (T,)
        Index of each frame in its source file.
    atom_indices : list of int
        Selected atoms, as indices of the full topology.
    masses : ndarray (n,)
        amu, from the topology's elements.
    bonds : list of (int, int)
        Bonds between selected atoms, as local indices.
    topology : mdtraj.Topology
        The full topology.
    weights : ndarray (T,) or None
        Statistical weights per frame.
    sources : list of str
        The trajectory files, as absolute paths (so a model's provenance stays unambiguous wherever it is read).
    """

    positions: np.ndarray
    boxes: Optional[np.ndarray]
    trajectory_ids: np.ndarray
    frame_indices: np.ndarray
    atom_indices: List[int]
    masses: np.ndarray
    bonds: List[tuple]
    topology: "mdtraj.Topology"
    weights: Optional[np.ndarray] = None
    sources: List[str] = field(default_factory=list)

    @property
    def n_frames(self) -> int:
        return len(self.positions)

    def subset(self, mask: np.ndarray) -> "TrajectoryData":
        """The frames where ``mask`` is true."""
        pick = lambda a: None if a is None else a[mask]
        return TrajectoryData(self.positions[mask], pick(self.boxes), self.trajectory_ids[mask],
                              self.frame_indices[mask], self.atom_indices, self.masses, self.bonds, self.topology,
                              pick(self.weights), self.sources)

    def split_by_trajectory(self, validation_fraction: float = 0.2, seed: int = 0):
        """(train, validation): whole trajectories held out when several are given (as in the paper), else the
        last ``validation_fraction`` of the single trajectory (a contiguous block, so that correlated neighbouring
        frames do not leak into the validation set). ``validation_fraction`` lies strictly between 0 and 1."""
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"the validation fraction must lie strictly between 0 and 1, got {validation_fraction}")
        ids = np.unique(self.trajectory_ids)
        if len(ids) > 1:
            rng = np.random.default_rng(seed)
            n_val = max(1, int(round(validation_fraction * len(ids))))
            held_out = rng.choice(ids, size=n_val, replace=False)
            is_val = np.isin(self.trajectory_ids, held_out)
        else:
            is_val = np.arange(self.n_frames) >= int(round((1 - validation_fraction) * self.n_frames))
        return self.subset(~is_val), self.subset(is_val)


def default_selection(topology: "mdtraj.Topology") -> List[int]:
    """Heavy atoms of the solute: no hydrogens, no water, no ions, no virtual sites."""
    return [atom.index for atom in topology.atoms
            if atom.element is not None and atom.element.symbol not in ("H", "VS")
            and not atom.residue.is_water and atom.residue.name not in ION_RESIDUES]


def select_atoms(topology: "mdtraj.Topology", selection: Optional[str]) -> List[int]:
    """Atom indices for an mdtraj selection string (``None``: :func:`default_selection`), with clear errors."""
    if selection is None or selection == "default":
        indices = default_selection(topology)
        what = "the default selection (solute heavy atoms)"
    else:
        try:
            indices = topology.select(selection).tolist()
        except Exception as error:
            raise ValueError(f"unknown or invalid atom selection {selection!r}: {error}") from None
        what = f"selection {selection!r}"
    if not indices:
        raise ValueError(f"{what} matches no atoms of the topology ({topology.n_atoms} atoms)")
    return indices


def atom_masses(topology: "mdtraj.Topology", atom_indices: Sequence[int]) -> np.ndarray:
    """Masses (amu) of the selected atoms from the topology's elements."""
    masses = np.array([topology.atom(i).element.mass if topology.atom(i).element is not None else 0.0
                       for i in atom_indices])
    if np.any(masses <= 0):
        bad = [topology.atom(atom_indices[i]) for i in np.flatnonzero(masses <= 0)]
        raise ValueError(f"atoms without a mass in the selection: {bad[:5]}")
    return masses


#: Selected atoms joined through unselected ones by a path of at most this many bonds count as linked when
#: molecules are made whole: consecutive Cα atoms (Cα–C–N–Cα, about 0.38 nm apart) are, two ends of a chain are not
#: (a long link could exceed half a box, where the minimum image is no longer the bonded one).
MAX_LINK_BONDS = 3


def local_bonds(topology: "mdtraj.Topology", atom_indices: Sequence[int]) -> List[tuple]:
    """Links among the selected atoms as pairs of positions in ``atom_indices`` (used to unwrap molecules): their
    bonds, then paths of at most :data:`MAX_LINK_BONDS` bonds through unselected atoms, so that a selection such as
    the Cα atoms of a chain stays one piece.

    Examples
    --------
    >>> import mdtraj
    >>> chain = mdtraj.Topology()
    >>> residue = chain.add_residue("MOL", chain.add_chain())
    >>> atoms = [chain.add_atom(f"C{i}", mdtraj.element.carbon, residue) for i in range(5)]
    >>> for a, b in zip(atoms, atoms[1:]):
    ...     chain.add_bond(a, b)
    >>> local_bonds(chain, [0, 3, 4])  # C0 and C3 are linked through C1 and C2
    [(1, 2), (0, 1)]
    """
    local = {atom: i for i, atom in enumerate(atom_indices)}
    bonds = [(local[a.index], local[b.index]) for a, b in topology.bonds if a.index in local and b.index in local]
    neighbours = {}
    for a, b in topology.bonds:
        neighbours.setdefault(a.index, []).append(b.index)
        neighbours.setdefault(b.index, []).append(a.index)
    linked = {frozenset(bond) for bond in bonds}
    for atom, i in local.items():
        frontier, seen = [atom], {atom}
        for _ in range(MAX_LINK_BONDS):
            reached = [other for current in frontier for other in neighbours.get(current, ()) if other not in seen]
            seen.update(reached)
            for other in reached:
                if other in local and frozenset((i, local[other])) not in linked:
                    linked.add(frozenset((i, local[other])))
                    bonds.append((i, local[other]))
            frontier = [other for other in reached if other not in local]  # paths go through unselected atoms only
    return bonds


def load_topology(path: str) -> "mdtraj.Topology":
    """Read a topology (PDB, prmtop, psf, gro, HDF5 …) with a clear error."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"topology file not found: {path}")
    try:
        return mdtraj.load_topology(path)
    except Exception as error:
        raise ValueError(f"cannot read topology {path}: {error_line(error)}") from None


def load_trajectories(paths: Sequence[str], topology: str, selection: Optional[str] = None, stride: int = 1,
                      start: int = 0, stop: Optional[int] = None, max_frames: Optional[int] = None,
                      weights: Optional[Sequence] = None, chunk: int = 10000) -> TrajectoryData:
    """Load trajectories, keeping only the selected atoms, streamed chunk by chunk.

    Parameters
    ----------
    paths : list of str
        Trajectory files in any format mdtraj reads (DCD, XTC, TRR, NetCDF, HDF5, PDB…).
    topology : str
        Topology file matching every trajectory.
    selection : str, optional
        mdtraj selection string; default: heavy atoms of the solute.
    stride, start, stop
        Frames ``start:stop:stride`` of each file, with Python's slice semantics (a negative ``start`` or
        ``stop`` counts from the end of the file); ``stride`` is a positive integer.
    max_frames : int, optional
        Upper bound on the frames kept per file: the stride grows as needed, so a trajectory longer than memory
        is subsampled without being loaded whole.
    weights : sequence of arrays or str, optional
        Per-frame weights for each file (arrays, or text files with one column) over *all* frames of the file;
        the same striding is applied. With a single trajectory path, a single array or file is accepted too. Only
        ratios matter: the loaded weights are scaled to mean 1 (in float64, so unnormalised factors such as
        exp(V/kT) of a large bias survive the float32 of training).
    chunk : int
        Frames read at a time.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing or unreadable files, an atom-count mismatch, a file that carries its own topology (PDB, GRO, HDF5)
        with other atoms or another order than ``topology``, an empty selection, NaN or infinite coordinates (of any
        atom, selected or not), an invalid frame range.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 1 and _single_weights(weights):
        weights = [weights]
    if not paths:
        raise ValueError("no trajectory given")
    _check_frame_range(start, stop, stride, max_frames)
    top = load_topology(topology)
    atom_indices = select_atoms(top, selection)
    masses = atom_masses(top, atom_indices)
    if weights is not None and len(weights) != len(paths):
        raise ValueError(f"{len(weights)} weight files/arrays for {len(paths)} trajectories")
    blocks = [_load_one(path, top, atom_indices, start, stop, stride, max_frames, chunk) for path in paths]
    positions = np.concatenate([b[0] for b in blocks])
    has_box = [b[1] is not None for b in blocks]
    if any(has_box) and not all(has_box):
        raise ValueError("some trajectories have periodic boxes and others not")
    boxes = np.concatenate([b[1] for b in blocks]) if all(has_box) else None
    frame_indices = np.concatenate([b[2] for b in blocks])
    ids = np.concatenate([np.full(len(b[0]), i) for i, b in enumerate(blocks)])
    frame_weights = None
    if weights is not None:
        frame_weights = np.concatenate([_frame_weights(w, b[2], b[3], p) for w, b, p in zip(weights, blocks, paths)])
        frame_weights = frame_weights / frame_weights.max()  # first the largest to 1: the sum cannot overflow
        frame_weights = frame_weights / frame_weights.mean()
    return TrajectoryData(positions, boxes, ids, frame_indices, atom_indices, masses, local_bonds(top, atom_indices),
                          top, frame_weights, [os.path.abspath(p) for p in paths])


def _check_frame_range(start, stop, stride, max_frames):
    for name, value in (("stride", stride), ("max_frames", max_frames)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("start", start), ("stop", stop)):
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
            raise ValueError(f"{name} must be an integer frame index, got {value!r}")


def _load_one(path, top, atom_indices, start, stop, stride, max_frames, chunk):
    """Positions (nm), boxes, frame indices and total frame count of one file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"trajectory file not found: {path}")
    n_total = _count_frames(path, top)
    n_atoms = _atoms_per_frame(path)
    if n_atoms is not None and n_atoms != top.n_atoms:
        raise ValueError(f"{path} has {n_atoms} atoms per frame but the topology has {top.n_atoms}: the trajectory "
                         "and the topology do not belong together")
    # Python slice semantics: a negative start or stop counts from the end of the file.
    first, last, _ = slice(start, stop, stride).indices(n_total)
    if max_frames is not None and (last - first) / stride > max_frames:
        stride = int(math.ceil((last - first) / max_frames))
    wanted = np.arange(first, last, stride)
    xyz, boxes, read = [], [], []
    try:
        for offset, piece in _iter_chunks(path, top, chunk):
            local = wanted[(wanted >= offset) & (wanted < offset + piece.n_frames)] - offset
            if len(local):
                # Every atom is checked, not only the selected ones: a non-finite coordinate anywhere means the
                # simulation that wrote the frame had blown up.
                finite = np.isfinite(piece.xyz[local]).all(axis=(1, 2))
                if piece.unitcell_vectors is not None:
                    finite &= np.isfinite(piece.unitcell_vectors[local]).all(axis=(1, 2))
                if not finite.all():
                    bad = local[~finite] + offset
                    more = f" (and {len(bad) - 1} more of frames {offset}-{offset + piece.n_frames - 1})" \
                        if len(bad) > 1 else ""
                    raise _NonFiniteFrames(f"{path}: NaN or infinite coordinates in frame {bad[0]}{more}")
                xyz.append(piece.xyz[local][:, atom_indices].astype(np.float64))
                boxes.append(None if piece.unitcell_vectors is None else piece.unitcell_vectors[local])
                read.append(local + offset)
    except _NonFiniteFrames as error:
        raise ValueError(str(error)) from None
    except ValueError as error:
        raise ValueError(f"cannot read {path} with topology of {top.n_atoms} atoms: {error_line(error)}") from None
    if not xyz:
        raise ValueError(f"{path}: no frames in the range start={start}, stop={stop}, stride={stride} "
                         f"(the file has {n_total})")
    positions = np.concatenate(xyz)
    box = None if boxes[0] is None else np.concatenate(boxes).astype(np.float64)
    return positions, box, np.concatenate(read), n_total


class _NonFiniteFrames(ValueError):
    pass


def _single_weights(weights) -> bool:
    """Whether ``weights`` is one file or one array of numbers (rather than one of those per trajectory)."""
    if weights is None:
        return False
    if isinstance(weights, (str, os.PathLike)):
        return True
    if isinstance(weights, np.ndarray):
        return weights.ndim == 1
    return len(weights) > 0 and all(isinstance(w, numbers.Real) for w in weights)


def _iter_chunks(path, top, chunk):
    offset = 0
    for piece in mdtraj.iterload(path, top=top, chunk=chunk):
        if piece.n_atoms != top.n_atoms:
            raise ValueError(f"the trajectory has {piece.n_atoms} atoms")
        if offset == 0:
            _check_same_atoms(piece.topology, top)
        yield offset, piece
        offset += piece.n_frames


def _check_same_atoms(own, top):
    """Formats with a topology of their own (PDB, GRO, HDF5) are read in their own atom order whatever ``top``
    says: refuse one whose atoms differ from ``top``'s, which would silently give other atoms' positions."""
    if own is top:
        return
    for a, b in zip(own.atoms, top.atoms):
        if (a.name, a.element) != (b.name, b.element):
            raise ValueError(f"its atom {a.index} is {a.residue.name}:{a.name}, where the topology has "
                             f"{b.residue.name}:{b.name}: the file lists other atoms or another order (write it "
                             "out in the topology's order, or use that file as the topology)")


def _count_frames(path, top) -> int:
    """Frame count without loading coordinates when the format allows it."""
    try:
        with mdtraj.open(path) as handle:
            return len(handle)
    except Exception:
        pass
    try:
        return sum(piece.n_frames for _, piece in _iter_chunks(path, top, 10000))
    except Exception as error:
        raise ValueError(f"cannot read trajectory {path} with topology of {top.n_atoms} atoms: "
                         f"{error_line(error)}") from None


def _atoms_per_frame(path) -> Optional[int]:
    """Atoms per frame read from the first frame of formats that store coordinates alone (DCD, XTC, TRR,
    NetCDF); None where that cannot be told without a topology."""
    try:
        with mdtraj.open(path) as handle:
            first = handle.read(n_frames=1)
    except Exception:
        return None
    xyz = first[0] if isinstance(first, tuple) else first
    return int(xyz.shape[1]) if isinstance(xyz, np.ndarray) and xyz.ndim == 3 else None


def _frame_weights(source, frame_indices, n_total, path):
    try:
        values = np.loadtxt(source, ndmin=1) if isinstance(source, (str, os.PathLike)) else np.asarray(source, float)
    except ValueError as error:
        raise ValueError(f"the weights for {path} ({source if isinstance(source, (str, os.PathLike)) else 'array'}) "
                         f"are not a column of numbers: {error}") from None
    if values.ndim != 1 or len(values) != n_total:
        raise ValueError(f"weights for {path} must be one value per frame ({n_total}), got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"weights for {path} must be finite and non-negative")
    selected = values[frame_indices]
    if not selected.sum() > 0:
        raise ValueError(f"the weights of the frames loaded from {path} are all zero")
    return selected
