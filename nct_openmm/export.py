"""TorchScript export of a trained model's slow modes: positions of the whole system in, the K slowest scaled
latent coordinates out.

Everything the CV needs travels inside the graph: atom selection, unwrapping across periodic boundaries, centring
and Kabsch alignment, the internal frame, and the flow. Only the layers needed for ``Q`` are exported (no momenta),
and the linear maps on either side of the couplings are fused into one matrix each, so that the exported network
is as small as the flow allows. Each mode is scaled to unit variance under the model, ``ε_k = ω_k Q_k``, so one
hill width fits all modes.

Forces: the modes' gradient is pulled back in closed form through the network, the input map and the alignment,
and enters autograd as one linear term (:class:`_LinearisedCV`); the backward pass that ``TorchForce`` runs is a
handful of small operations. Exported CVs therefore have exact first derivatives and no second derivatives.
"""
import copy
import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .core.distill import fit_student
from .core.layers import AffineCoupling, AffinePoint, LinearPoint
from .geometry import (PairDistances, kabsch_align, kabsch_align_saving, kabsch_pullback, pair_incidence,
                       rotation_generators, unwrap)

#: What a distilled CV can read (:func:`student_module`'s ``features``).
STUDENT_FEATURES = ("internal", "distances")
#: The most atoms a distance student reads: it reads all n(n − 1)/2 distances, and its exported front holds a
#: (pairs × atoms) incidence matrix (150 atoms: 11 175 pairs, 6.7 MB in float32).
MAX_DISTANCE_ATOMS = 150


class _SelectedAtoms(nn.Module):
    """The frame's atoms out of the system's positions, in the exported dtype, made whole across periodic
    boundaries: the part of every exported CV that runs under autograd."""

    def __init__(self, frame, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("atom_indices", torch.tensor(frame.atom_indices, dtype=torch.long))
        self.parents: List[int] = list(frame.parents)
        self.unwrap_order: List[int] = list(frame.unwrap_order)
        self.register_buffer("dtype_of_cv", torch.zeros(0, dtype=dtype))

    @torch.jit.export
    def selected(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tensor:
        """The selected atoms ``(n, 3)`` in the exported dtype, made whole across periodic boundaries."""
        x = positions[self.atom_indices].to(self.dtype_of_cv.dtype)
        if boxvectors is not None:
            x = unwrap(x, boxvectors.to(x.dtype), self.unwrap_order, self.parents)
        return x


class AlignedInput(_SelectedAtoms):
    """The front of every exported CV: selected atoms, unwrapped and aligned, mapped to the whitened internal
    coordinates ``y = pre(u)`` that the flow's couplings (or a distilled student) read; one fused matrix. With
    ``order``, ``y``'s coordinates come out in that order.

    ``forward`` is the front under autograd; the exported CVs use :meth:`selected` (under autograd),
    :meth:`transform_saving` and :meth:`pullback` (outside it) instead.
    """

    def __init__(self, frame, pre: AffinePoint, dtype: torch.dtype, order: Optional[Tensor] = None):
        super().__init__(frame, dtype)
        self.align = frame.align
        if frame.align and frame.dim > 3 * len(frame.atom_indices) - 6:  # 3n − 5: a linear reference
            warnings.warn(f"the CV's {len(frame.atom_indices)} selected atoms have a linear reference: it aligns on "
                          "the CPU and Reference platforms, but its SVD-free alignment on CUDA gives NaN there; "
                          "select at least three atoms not on a line", stacklevel=3)
        self.register_buffer("masses", frame.masses.to(dtype))
        self.register_buffer("reference", frame.reference.to(dtype))
        in_matrix, in_shift = _fused_input(frame, pre)
        if order is not None:  # y's coordinates in this order: the first coupling's halves come out as slices
            in_matrix, in_shift = in_matrix[:, order], in_shift[order]
        self.register_buffer("in_matrix", in_matrix.to(dtype))
        self.register_buffer("in_shift", in_shift.to(dtype))
        self.register_buffer("rotation_generators", rotation_generators(dtype))

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tensor:
        x = self.selected(positions, boxvectors)
        if self.align:
            x = kabsch_align(x, self.reference, self.masses, iterative=x.is_cuda)
        return (x.reshape(1, -1) @ self.in_matrix) + self.in_shift

    @torch.jit.export
    def transform_saving(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """``y (1, d)`` from selected atoms ``x``, and what :meth:`pullback` needs."""
        saved: List[Tensor] = []
        if self.align:
            x, saved = kabsch_align_saving(x, self.reference, self.masses, iterative=x.is_cuda)
        return (x.reshape(1, -1) @ self.in_matrix) + self.in_shift, saved

    @torch.jit.export
    def pullback(self, saved: List[Tensor], cotangent: Tensor) -> Tensor:
        """Row covectors ``(K, d)`` on ``y`` → on the selected atoms, ``(K, n, 3)``."""
        on_atoms = (cotangent @ self.in_matrix.t()).reshape(cotangent.shape[0], -1, 3)
        if self.align:
            on_atoms = kabsch_pullback(saved, on_atoms, self.rotation_generators)
        return on_atoms


class DistanceInput(_SelectedAtoms):
    """The front of a distilled CV that reads interatomic distances: the selected atoms' distances of all pairs,
    standardised. No alignment: no rigid-body motion changes a distance. A handful of operations where
    :class:`AlignedInput` needs dozens (the alignment's iteration on a GPU), which is what a CUDA graph's chain of
    kernels is made of.
    """

    def __init__(self, frame, pairs: PairDistances, mean: Tensor, scale: Tensor, dtype: torch.dtype):
        super().__init__(frame, dtype)
        # The pairs in the order the student was trained on.
        self.register_buffer("incidence", pair_incidence(pairs.first, pairs.second, len(frame.atom_indices), dtype))
        self.register_buffer("mean", mean.to(dtype))
        self.register_buffer("inverse_scale", (1.0 / scale.double()).to(dtype))

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tensor:
        return self.transform_saving(self.selected(positions, boxvectors))[0]

    @torch.jit.export
    def transform_saving(self, x: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """Standardised distances ``(1, P)`` of selected atoms ``x``, and their unit difference vectors over the
        scale ``(P, 3)``, which is what :meth:`pullback` needs."""
        differences = self.incidence @ x
        distances = torch.linalg.vector_norm(differences, dim=1)
        features = (distances - self.mean) * self.inverse_scale
        return features.unsqueeze(0), [differences * (self.inverse_scale / distances).unsqueeze(1)]

    @torch.jit.export
    def pullback(self, saved: List[Tensor], cotangent: Tensor) -> Tensor:
        """Row covectors ``(K, P)`` on the features → on the selected atoms, ``(K, n, 3)``."""
        return self.incidence.t() @ (cotangent.unsqueeze(2) * saved[0])


class _LinearisedCV(nn.Module):
    """Base of the exported CVs: only the atom selection (and unwrapping) runs under autograd.

    Alignment, input map and network (couplings, or a student MLP) run outside it and enter as their value plus a
    linear term in the selected positions, whose matrix is the modes' gradient pulled back in closed form through
    the network (:meth:`modes_and_jacobian`), the input map and the alignment (:func:`~nct_openmm.geometry.
    kabsch_pullback`): exact forces from a few dozen operations instead of a backward pass of several hundred.
    Second derivatives of the modes are therefore not available (OpenMM needs none). When the positions carry no
    gradient (under ``torch.no_grad``, or an energy-only evaluation) the Jacobian is skipped; the values are the
    same to the last bit.
    """

    def forward(self, positions: Tensor, boxvectors: Optional[Tensor] = None) -> Tensor:
        x = self.input.selected(positions, boxvectors)
        # Values only (under no_grad, or an energy-only evaluation) need no Jacobian.
        needs_gradient = x.requires_grad
        # The constant copy is made under no_grad, not with detach(), which torch.jit.freeze (applied by
        # TorchForce) would remove.
        with torch.no_grad():
            fixed = x.clone()
            y, saved = self.input.transform_saving(fixed)
            modes, jacobian = self.modes_and_jacobian(y, needs_gradient)
        if needs_gradient:
            with torch.no_grad():
                gradient = self.input.pullback(saved, jacobian.t()).reshape(jacobian.shape[1], -1)
            modes = modes + (x - fixed).reshape(1, -1) @ gradient.t()
        return modes[0].to(positions.dtype)

    def modes_and_jacobian(self, y: Tensor, jacobian: bool) -> Tuple[Tensor, Tensor]:
        """The modes ``(1, K)`` at the front's output ``y`` ``(1, d)`` and, if ``jacobian``, their derivatives
        ``(d, K)`` (else an empty tensor)."""
        raise NotImplementedError


class SlowModeModule(_LinearisedCV):
    """The exported collective variable: ``forward(positions (N, 3) nm, boxvectors=None) -> (K,)``.

    The result has the dtype of ``positions``; the arithmetic runs in the dtype the module was exported with.
    Attributes ``num_modes`` (K), ``num_atoms_required`` (largest atom index + 1) and ``temperature`` (K, of the
    training data) describe it. First derivatives only (see :class:`_LinearisedCV`).
    """

    def __init__(self, model, modes: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        frame, flow = model.frame, model.flow
        if not flow.is_point_transformation:
            raise ValueError("only point transformations can be exported as collective variables")
        if not 1 <= modes <= flow.dim:
            raise ValueError(f"modes must be between 1 and {flow.dim}, got {modes}")
        layers = list(flow.layers)
        pre, couplings = layers[0], [layer for layer in layers if isinstance(layer, AffineCoupling)]
        tail = [layer for layer in layers[1:] if not isinstance(layer, AffineCoupling)]
        orders = [torch.cat([c.conditioning, c.transformed]) for c in couplings] or [torch.arange(flow.dim)]
        self.input = AlignedInput(frame, pre, dtype, order=orders[0])
        copies = [_copy_coupling(c, dtype) for c in couplings]
        self.couplings = nn.ModuleList(copies)
        # The same modules in reverse order, for the pullback (TorchScript cannot iterate a ModuleList backwards).
        self.reversed_couplings = nn.ModuleList(copies[::-1])
        # Between couplings the coordinates stay split into the two halves, each in its coupling's order.
        self.split_sizes: List[int] = [int(c.conditioning.numel()) for c in couplings] or [flow.dim]
        # Consecutive couplings that swap the halves (coupling_masks pairs them so) need no reordering at all;
        # swaps[k] and reorders[k - 1] lead from coupling k - 1 to coupling k.
        self.swaps: List[bool] = [False] + [_swapped(earlier, later)
                                            for earlier, later in zip(couplings, couplings[1:])]
        rows = [torch.argsort(earlier)[later] for earlier, later in zip(orders, orders[1:])]
        reorders = torch.stack(rows) if rows else torch.empty(0, flow.dim, dtype=torch.long)
        self.register_buffer("reorders", reorders)
        self.register_buffer("inverse_reorders", torch.argsort(reorders, dim=-1))
        self.register_buffer("out_matrix", _fused_output(flow, tail, modes)[orders[-1]].to(dtype))
        self.num_modes = int(modes)
        self.num_atoms_required = int(max(frame.atom_indices)) + 1
        self.temperature = float(model.temperature)

    @torch.jit.export
    def modes_and_jacobian(self, y: Tensor, jacobian: bool) -> Tuple[Tensor, Tensor]:
        saved: List[List[Tensor]] = []
        a, b = y[:, :self.split_sizes[0]], y[:, self.split_sizes[0]:]
        for k, coupling in enumerate(self.couplings):
            if k > 0:
                a, b = self._next_halves(k, a, b)
            b, state = coupling.halves_forward_saving(a, b)
            saved.append(state)
        derivatives = y.new_empty(0)
        if jacobian:
            # One cotangent row per mode, pulled back through the couplings like momenta (p = P ∂Q/∂q).
            cotangents = self.out_matrix.t()
            ca, cb = cotangents[:, :self.split_sizes[-1]], cotangents[:, self.split_sizes[-1]:]
            last = len(self.split_sizes) - 1
            for j, reversed_coupling in enumerate(self.reversed_couplings):
                ca, cb = reversed_coupling.halves_pullback(saved.pop(), ca, cb)
                if j < last:
                    ca, cb = self._previous_halves(last - j, ca, cb)
            derivatives = torch.cat([ca, cb], -1).t()
        return torch.cat([a, b], -1) @ self.out_matrix, derivatives

    def _next_halves(self, k: int, a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
        """Coupling ``k − 1``'s output halves → coupling ``k``'s input halves."""
        if self.swaps[k]:
            return b, a
        y = torch.cat([a, b], -1).index_select(-1, self.reorders[k - 1])
        return y[:, :self.split_sizes[k]], y[:, self.split_sizes[k]:]

    def _previous_halves(self, k: int, ca: Tensor, cb: Tensor) -> Tuple[Tensor, Tensor]:
        """Cotangent halves on coupling ``k``'s input → on coupling ``k − 1``'s output."""
        if self.swaps[k]:
            return cb, ca
        c = torch.cat([ca, cb], -1).index_select(-1, self.inverse_reorders[k - 1])
        return c[:, :self.split_sizes[k - 1]], c[:, self.split_sizes[k - 1]:]


class StudentModule(_LinearisedCV):
    """A distilled CV (:mod:`nct_openmm.core.distill`) with the contract of :class:`SlowModeModule`: the same
    front, then a small MLP instead of the flow. Attributes: ``student_features``, what the network reads
    (``"internal"`` or ``"distances"``, see :func:`student_module`), and ``student_report``, the distillation
    errors; both survive ``save`` and ``torch.jit.load``."""

    def __init__(self, model, student, report: Optional[dict] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if student.features is None:
            self.input = AlignedInput(model.frame, student.pre, dtype)
            self.student_features = "internal"
        elif isinstance(student.features, PairDistances):
            if student.features.frame.atom_indices != model.frame.atom_indices:
                raise ValueError("the student reads distances of other atoms than the model's frame: "
                                 f"{student.features.frame.atom_indices} against {model.frame.atom_indices}")
            self.input = DistanceInput(model.frame, student.features, student.feature_mean, student.feature_scale,
                                       dtype)
            self.student_features = "distances"
        else:
            raise ValueError(f"cannot export a student that reads {type(student.features).__name__} features; "
                             "exported students read the whitened internal coordinates or PairDistances")
        self.net = copy.deepcopy(student.net).to(dtype)
        self.register_buffer("mode_rows", torch.eye(int(student.modes), dtype=dtype))
        self.num_modes = int(student.modes)
        self.num_atoms_required = int(max(model.frame.atom_indices)) + 1
        self.temperature = float(model.temperature)
        self.student_report: Dict[str, float] = {key: float(value) for key, value in (report or {}).items()}

    @torch.jit.export
    def modes_and_jacobian(self, y: Tensor, jacobian: bool) -> Tuple[Tensor, Tensor]:
        modes, slopes = self.net.forward_saving(y)
        derivatives = y.new_empty(0)
        if jacobian:
            derivatives = self.net.pullback(slopes, self.mode_rows).t()
        return modes, derivatives


def _fused_input(frame, pre: AffinePoint):
    """Aligned positions (flattened) → the couplings' input: mass weighting, 1/√kT, internal basis and the
    whitening map as one matrix and one shift."""
    scale = frame.coordinate_scale[:, None] * frame.basis  # (3n, d)
    matrix = scale @ pre.matrix.double() * pre.scale.double()
    shift = -(pre.shift.double() @ pre.matrix.double()) * pre.scale.double()
    return matrix, shift


def _fused_output(flow, tail, modes: int) -> Tensor:
    """The couplings' output → ε of the ``modes`` slowest modes: learnable linear point layer, output scale, mode
    selection, sign convention and the ω scaling as one ``(d, K)`` matrix."""
    matrix = torch.eye(flow.dim, dtype=torch.float64)
    for layer in tail:
        if isinstance(layer, LinearPoint):
            matrix = matrix @ torch.linalg.matrix_exp(layer.generator.detach().double())
        elif isinstance(layer, AffinePoint):
            if torch.any(layer.shift != 0):
                raise ValueError("an output map with a shift cannot be fused")
            matrix = (matrix @ layer.matrix.double()) * layer.scale.double()
        else:
            raise ValueError(f"cannot export a {type(layer).__name__} after the couplings")
    order = flow.prior.slow_order()[:modes]
    # ω from log ω in float64: exp in float32 would round every exported mode by a relative 1e-7.
    factor = (torch.exp(flow.prior.log_omega.detach().double()) * flow.mode_signs.double())[order]
    return matrix[:, order] * factor


def _swapped(earlier: AffineCoupling, later: AffineCoupling) -> bool:
    """Whether ``later`` conditions on what ``earlier`` transformed and transforms what it conditioned on."""
    return bool(torch.equal(later.conditioning, earlier.transformed)
                and torch.equal(later.transformed, earlier.conditioning))


def _copy_coupling(coupling: AffineCoupling, dtype) -> AffineCoupling:
    return copy.deepcopy(coupling).to(dtype)


def script(module):
    """``torch.jit.script`` without torch's deprecation warning: openmm-torch's TorchForce takes TorchScript only,
    so the warning's advice (torch.compile / torch.export) does not apply here."""
    if isinstance(module, torch.jit.ScriptModule):
        return module
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        return torch.jit.script(module)


def slow_mode_module(model, modes: int = 2, dtype: torch.dtype = torch.float32) -> torch.jit.ScriptModule:
    """The scripted CV of the ``modes`` slowest modes of a :class:`~nct_openmm.slowmodes.SlowModeModel`.

    Examples
    --------
    >>> from nct_openmm.slowmodes import SlowModeModel
    >>> cv = slow_mode_module(SlowModeModel.load("models/alanine_dipeptide.pt"), modes=2)  # doctest: +SKIP
    >>> cv(positions_nm)  # (2,) tensor                                                  # doctest: +SKIP
    """
    return script(SlowModeModule(model, modes, dtype))


def student_module(model, modes: int = 2, dtype: torch.dtype = torch.float32, features: str = "internal",
                   **options):
    """Distil the ``modes`` slowest modes of ``model`` into a small network (:func:`~nct_openmm.core.distill.
    fit_student`, ``options`` go there) and script it with the CV contract.

    ``features``: what the network reads. ``"internal"`` (default): the flow's own input, the aligned and whitened
    internal coordinates. ``"distances"``: all interatomic distances of the model's atoms
    (:class:`~nct_openmm.geometry.PairDistances`), which need no alignment, so the CV is a handful of operations
    plus the network (fewer kernels in a CUDA graph); distances cannot tell a structure from its mirror image,
    which MD of a chiral molecule does not visit. Only for models trained with alignment (without it the modes
    depend on absolute positions) and for 3 to :data:`MAX_DISTANCE_ATOMS` atoms.

    Returns
    -------
    (torch.jit.ScriptModule, dict)
        The CV and the distillation report (errors in mode units on held-out configurations of the flow).

    Examples
    --------
    >>> cv, report = student_module(SlowModeModel.load("models/alanine_dipeptide.pt"), modes=2)  # doctest: +SKIP
    >>> report["value_rms_thermal"]  # doctest: +SKIP
    """
    if features not in STUDENT_FEATURES:
        raise ValueError(f"unknown student features {features!r}: use one of {', '.join(STUDENT_FEATURES)}")
    mapping = None
    if features == "distances":
        _check_distance_frame(model.frame)
        mapping = PairDistances(model.frame)
    student, report = fit_student(model.flow, modes, features=mapping, **options)
    return script(StudentModule(model, student, report.as_dict(), dtype)), report.as_dict()


def _check_distance_frame(frame):
    """Refuse frames whose modes distances cannot represent, or whose distances are too many."""
    n = len(frame.atom_indices)
    if not frame.align:
        raise ValueError("a distance student needs a model trained with alignment: without it the modes depend on "
                         "where the atoms are in space, which distances do not say; use features='internal'")
    if not 3 <= n <= MAX_DISTANCE_ATOMS:
        raise ValueError(f"a distance student reads 3 to {MAX_DISTANCE_ATOMS} atoms (all n(n-1)/2 distances), this "
                         f"model has {n}; use features='internal'")


def export_slow_modes(model, path, modes: int = 2, dtype: torch.dtype = torch.float32) -> str:
    """Write the scripted CV to ``path``; it loads with plain ``torch.jit.load``."""
    return _save(slow_mode_module(model, modes, dtype), path)


def export_student(model, path, modes: int = 2, dtype: torch.dtype = torch.float32, **options) -> dict:
    """Write a distilled CV (:func:`student_module`) to ``path``; returns the distillation report."""
    module, report = student_module(model, modes, dtype, **options)
    _save(module, path)
    return report


def _save(module, path) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        module.save(os.fspath(path))
    return os.fspath(path)
