"""Rigid-body removal and the (3n − 6)-dimensional internal frame, written once in TorchScript-compatible torch.

The same code prepares training data and runs inside every exported collective variable, so the two cannot drift.

Pipeline for the positions of n selected atoms (nm):

1. **unwrap** — rebuild the molecule across periodic boundaries: each atom is put at the minimum image of its
   parent in a spanning tree of the bond graph (parents precede children);
2. **centre and align** — subtract the mass-weighted centre and rotate onto a reference structure with the
   mass-weighted Kabsch algorithm;
3. **internal coordinates** — an aligned structure obeys six *linear* conditions: zero mass-weighted centre and the
   Eckart conditions ``Σ m_i r_i^ref × x_i = 0`` (the stationarity condition of the Kabsch fit). Mass-weighted
   aligned coordinates ``y_i = √m_i x_i`` therefore lie exactly in a fixed (3n − 6)-dimensional subspace, and
   ``u = y·B / √kT`` with an orthonormal basis ``B`` of that subspace are coordinates without rigid-body directions
   (no degenerate density, no spurious fast modes). Dividing by ``√kT`` gives the reduced units (β = 1, unit
   masses) of :mod:`nct_openmm.core`; ``u`` is then measured in ps (1 kJ/mol = 1 amu nm² ps⁻²), so the learned
   frequencies come out in 1/ps.

Momenta: the flow's momenta conjugate to ``u`` are drawn from N(0, 1) in reduced units, i.e. Maxwell–Boltzmann
momenta projected onto the internal subspace. This treats the Eckart frame as inertial — it neglects the
rotation–vibration (Coriolis) coupling of the kinetic energy — which is the approximation made for the momenta.
"""
from typing import List, Optional

import torch
from torch import Tensor, nn


def minimum_image(delta: Tensor, box: Tensor) -> Tensor:
    """Shortest periodic image of displacement vectors ``delta (..., 3)`` in an OpenMM (reduced, triclinic) box.

    ``box`` has the box vectors as rows, ``(..., 3, 3)``, broadcastable against ``delta``'s leading dimensions.
    """
    delta = delta - box[..., 2, :] * torch.round(delta[..., 2:3] / box[..., 2, 2:3])
    delta = delta - box[..., 1, :] * torch.round(delta[..., 1:2] / box[..., 1, 1:2])
    delta = delta - box[..., 0, :] * torch.round(delta[..., 0:1] / box[..., 0, 0:1])
    return delta


def unwrap(x: Tensor, box: Tensor, order: List[int], parents: List[int]) -> Tensor:
    """Make a molecule whole: visiting atoms in ``order`` (parents first), atom ``i`` moves to the minimum image of
    its already placed parent ``parents[i]`` (−1 for a root, which stays where it is).

    ``x`` is ``(..., n, 3)``, ``box`` ``(..., 3, 3)``.
    """
    atoms = [x[..., i, :] for i in range(len(parents))]
    for i in order:
        parent = parents[i]
        if parent >= 0:
            atoms[i] = atoms[parent] + minimum_image(x[..., i, :] - x[..., parent, :], box)
    return torch.stack(atoms, dim=-2)


def kabsch_align(x: Tensor, reference: Tensor, weights: Tensor, iterative: bool = False) -> Tensor:
    """Centre ``x (..., n, 3)`` on its weighted centre and rotate it onto the centred ``reference (n, 3)``,
    minimising ``Σ w_i |R x_i − r_i|²`` (proper rotations only).

    ``iterative`` computes the rotation with :func:`polar_rotation` instead of an SVD: the same rotation, from
    elementwise operations and 3×3 products only (on a GPU the SVD of a 3×3 matrix goes through the host, which a
    CUDA graph cannot capture). The iteration runs outside autograd and its result re-enters through
    :func:`_differentiable_rotation`, with the exact derivative of the optimal rotation for a fraction of the
    kernels of differentiating the Newton steps. On a CPU, where every operation costs microseconds of overhead,
    differentiating the one SVD is cheaper.
    """
    _, centred, _, covariance = _centre_and_covariance(x, reference, weights)
    if iterative:
        with torch.no_grad():
            rotation = polar_rotation(covariance)
        rotation = _differentiable_rotation(rotation, covariance)
    else:
        rotation = _svd_rotation(covariance)
    return centred @ rotation


def _centre_and_covariance(x: Tensor, reference: Tensor, weights: Tensor):
    """Normalised weights ``w``, ``x`` centred on its weighted centre, ``w r`` and ``C = centredᵀ (w r)``."""
    w = weights / weights.sum()
    centred = x - (w[:, None] * x).sum(-2, keepdim=True)
    weighted_reference = w[:, None] * reference
    return w, centred, weighted_reference, centred.transpose(-1, -2) @ weighted_reference


def kabsch_align_saving(x: Tensor, reference: Tensor, weights: Tensor, iterative: bool = False):
    """:func:`kabsch_align` of one structure ``x (n, 3)`` for use outside autograd, and what
    :func:`kabsch_pullback` needs: ``(aligned, saved)``."""
    w, centred, weighted_reference, covariance = _centre_and_covariance(x, reference, weights)
    rotation = polar_rotation(covariance) if iterative else _svd_rotation(covariance)
    aligned = centred @ rotation
    return aligned, [aligned, rotation, covariance, w, weighted_reference]


def kabsch_pullback(saved: List[Tensor], cotangent: Tensor, generators: Tensor) -> Tensor:
    """Row covectors ``c (K, n, 3)`` on :func:`kabsch_align`'s output pulled back to its input: ``c ∂aligned/∂x``.

    ``aligned = centred R(C)``: directly ``c Rᵀ``; through the rotation, with ``dR = R Ω(ω)`` and
    ``ω = S vec(Rᵀ dC − dCᵀ R)`` (:func:`_differentiable_rotation`), the covector on ω is ``vec(Aᵀ c − cᵀ A)``
    (A = aligned), on C it is ``R Ω(Sᵀ ·)``, and on the centred positions ``(w r) (R Ω)ᵀ``; the centring then
    removes the weighted sum. ``generators`` is :func:`rotation_generators`. About fifteen small operations for
    all K rows, instead of the backward pass of an SVD.
    """
    aligned, rotation, covariance, w, weighted_reference = saved
    solve = _rotation_response(rotation, covariance)
    omega_covector = (aligned.t() @ cotangent).reshape(-1, 9) @ generators.t()
    covariance_covector = rotation @ ((omega_covector @ solve) @ generators).reshape(-1, 3, 3)
    centred_covector = cotangent @ rotation.t() + weighted_reference @ covariance_covector.transpose(-1, -2)
    return centred_covector - w[:, None] * centred_covector.sum(-2, keepdim=True)


def rotation_generators(dtype: torch.dtype = torch.float64) -> Tensor:
    """``(3, 9)``: row k is the flattened cross-product matrix Ω(e_k) (``Ω(ω) v = ω × v`` for a column vector v,
    the Ω of :func:`_differentiable_rotation`), so that ``Ω(ω).reshape(9) = ω @ generators``."""
    generators = torch.zeros(3, 3, 3, dtype=dtype)
    for k, (i, j) in enumerate([(2, 1), (0, 2), (1, 0)]):
        generators[k, i, j] = 1.0
        generators[k, j, i] = -1.0
    return generators.reshape(3, 9)


def _svd_rotation(covariance: Tensor) -> Tensor:
    u, _, vh = torch.linalg.svd(covariance)
    # A reflection would give a lower residual for a mirror-image structure; flip the last axis to forbid it.
    sign = torch.sign(torch.linalg.det(u @ vh))
    ones = torch.ones_like(sign)
    flip = torch.stack([ones, ones, sign], dim=-1)
    return (u * flip.unsqueeze(-2)) @ vh


def _differentiable_rotation(rotation: Tensor, covariance: Tensor) -> Tensor:
    """``rotation`` (the optimal ``R`` for ``covariance`` C, computed without autograd) as a function of C whose
    value is ``R`` and whose derivative is that of the optimum.

    Optimality makes ``P = Rᵀ C`` symmetric; differentiating that condition with ``dR = R Ω`` (Ω antisymmetric,
    vector ω) gives ``Ω P + P Ω = Rᵀ dC − dCᵀ R``, i.e. ``((tr P) I − P) ω = vec(Rᵀ dC − dCᵀ R)``: one 3×3 solve,
    with a matrix fixed at the current point. The returned ``R + R Ω(C − C₀)`` is linear in ``C − C₀`` (zero in
    value), so autograd sees a few small products instead of the backward pass of an SVD.
    """
    # The constant copy is made under no_grad, not with detach(): torch.jit.freeze (which TorchForce applies)
    # removes detach, and C − C₀ would then carry no derivative at all.
    with torch.no_grad():
        fixed = covariance.clone()
        solve = _rotation_response(rotation, fixed)
    a = rotation.transpose(-1, -2) @ (covariance - fixed)
    skew = a - a.transpose(-1, -2)
    v = torch.stack([skew[..., 2, 1], skew[..., 0, 2], skew[..., 1, 0]], dim=-1)
    omega = (solve @ v.unsqueeze(-1)).squeeze(-1)
    zero = torch.zeros_like(omega[..., 0])
    generator = torch.stack([torch.stack([zero, -omega[..., 2], omega[..., 1]], dim=-1),
                             torch.stack([omega[..., 2], zero, -omega[..., 0]], dim=-1),
                             torch.stack([-omega[..., 1], omega[..., 0], zero], dim=-1)], dim=-2)
    return rotation + rotation @ generator


def _rotation_response(rotation: Tensor, covariance: Tensor) -> Tensor:
    """``S = ((tr P) I − P)⁻¹`` with ``P = Rᵀ C``: how the optimal rotation turns, ``ω = S vec(Rᵀ dC − dCᵀ R)``.

    For a linear selection (two atoms, or a linear reference) ``(tr P) I − P`` is singular: a turn about the axis
    moves no atom. A relative 1e-6 (float32) or 1e-12 (float64) added to the diagonal keeps that turn finite, where
    the exact inverse made the gradient 0 · ∞ = NaN; elsewhere it changes the derivative by as little.
    """
    p = rotation.transpose(-1, -2) @ covariance
    trace = p.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    eye = torch.eye(3, dtype=p.dtype, device=p.device)
    diagonal = 1.0 + (1e-6 if p.dtype == torch.float32 else 1e-12)
    return torch.linalg.inv_ex(torch.addcmul(-p, trace, eye, value=diagonal))[0]


#: Newton steps of :func:`polar_rotation` in float32 and in float64. The iterated matrix has a condition number of
#: about σ₁/(σ₂ ± σ₃) for the singular values σ of the covariance (about 8 for alanine dipeptide's heavy atoms). Up
#: to σ₁/σ₂ = 1e3 (a nearly linear selection), 5 steps in float32 and 7 in float64 are the fewest that give the
#: rotation of 20 steps to within 4 rounding errors (``tests/test_molecular.py``; one step fewer leaves thousands).
#: Every step is ten GPU kernels of the hot path.
POLAR_ITERATIONS_FLOAT32 = 5
POLAR_ITERATIONS_FLOAT64 = 7


def polar_rotation(c: Tensor, iterations: Optional[int] = None) -> Tensor:
    """The proper rotation ``R = U diag(1, 1, det U Vᵀ) Vᵀ`` that maximises ``tr(Rᵀ c)`` for 3×3 matrices
    ``c = U S Vᵀ`` (``(..., 3, 3)``): :func:`kabsch_align`'s rotation, without an SVD.

    It is the orthogonal polar factor of ``M = c + cof(c)/σ₁`` (``cof(c) = det(c) c⁻ᵀ``, rows cross products of the
    rows of ``c``). ``M = U diag(σ₁ + dσ₂σ₃/σ₁, σ₂ + dσ₃, d(σ₂ + dσ₃)) Vᵀ`` with ``d = sign det c``, so its polar
    factor carries the sign flip that the SVD route applies: for ``det c < 0`` the polar factor of ``c`` itself is
    improper, and that is common (the heavy atoms of alanine dipeptide at φ > 0, aligned to a φ < 0 reference, give
    ``det c < 0``). ``M`` also stays well conditioned where ``det c`` passes through zero. ``σ₁`` is estimated as
    ``‖(cᵀc)⁸‖^(1/16)``, within 3.5 % above it: the rotation is exact unless ``d < 0`` and ``σ₃ > 0.96 σ₂``, where
    the optimal rotation is nearly degenerate anyway. The polar factor comes from Newton's iteration
    ``X ← (γX + (γX)⁻ᵀ)/2`` with determinant scaling ``γ = |det X|^(−1/3)``; ``iterations`` defaults to
    :data:`POLAR_ITERATIONS_FLOAT32` or :data:`POLAR_ITERATIONS_FLOAT64` by the dtype of ``c``. The inverse transpose
    of a 3×3 matrix is its cofactor matrix over its determinant, so every step is a handful of elementwise
    operations: free of host synchronisation. ``c`` needs rank 2 at least: the covariance of two atoms, or of a
    linear reference, gives NaN here (the SVD route aligns those).

    Examples
    --------
    >>> c = torch.tensor([[2.0, 0.3, 0.0], [0.1, 1.0, 0.2], [0.0, -0.2, -0.5]], dtype=torch.float64)
    >>> r = polar_rotation(c)
    >>> bool(torch.allclose(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-12)), round(float(torch.det(r)), 12)
    (True, 1.0)
    """
    if iterations is None:
        iterations = _default_polar_iterations(c.dtype)
    if iterations < 1:
        raise ValueError("polar_rotation needs at least one Newton step")
    # Normalised, so that the eighth power of cᵀc neither overflows nor underflows in float32.
    c = c / c.square().sum((-2, -1), keepdim=True).sqrt()
    power = c.transpose(-1, -2) @ c
    for _ in range(3):
        power = power @ power
    largest_singular_value = power.square().sum((-2, -1), keepdim=True).pow(1.0 / 32.0)
    # The iterates are kept at twice the Newton iterates, γX + (γX)⁻ᵀ: determinant scaling makes the next step
    # blind to that factor, and halving once at the end saves a kernel per step.
    x = torch.addcdiv(c, _cofactor(c), largest_singular_value)
    for _ in range(iterations):
        cofactor = _cofactor(x)
        det = (x[..., :1, :] * cofactor[..., :1, :]).sum(-1, keepdim=True)
        root = det.abs().pow(1.0 / 3.0)  # 1/γ
        x = torch.addcmul(x / root, root / det, cofactor)
    return 0.5 * x


def _cofactor(x: Tensor) -> Tensor:
    """Cofactor matrices ``det(x) x⁻ᵀ`` of ``(..., 3, 3)``: rows r1 × r2, r2 × r0, r0 × r1."""
    return torch.linalg.cross(x.roll(-1, -2), x.roll(-2, -2))


def _default_polar_iterations(dtype: torch.dtype, float32: int = POLAR_ITERATIONS_FLOAT32,
                              float64: int = POLAR_ITERATIONS_FLOAT64) -> int:
    # Defaults, not globals: TorchScript reads module-level numbers only as default values.
    return float32 if dtype == torch.float32 else float64


def rigid_body_basis(reference: Tensor, masses: Tensor) -> Tensor:
    """Orthonormal basis ``(3n, 3n − 6)`` of mass-weighted displacements orthogonal to the rigid-body motions
    about ``reference`` (centred, ``(n, 3)``). For n = 2 or a linear reference the count drops to 3n − 5."""
    n = reference.shape[0]
    sqrt_m = torch.sqrt(masses.double())
    ref = reference.double()
    rigid = []
    for axis in range(3):
        unit = torch.zeros(3, dtype=torch.float64)
        unit[axis] = 1.0
        rigid.append((sqrt_m[:, None] * unit).reshape(-1))
        rigid.append((sqrt_m[:, None] * torch.linalg.cross(unit.expand(n, 3), ref)).reshape(-1))
    rigid = torch.stack(rigid, dim=1)
    u, s, _ = torch.linalg.svd(rigid, full_matrices=True)
    rank = int((s > 1e-8 * s[0]).sum())
    return u[:, rank:]


class InternalFrame(nn.Module):
    """Positions of selected atoms (nm) → reduced internal coordinates ``u`` (ps), see the module docstring.

    Parameters
    ----------
    atom_indices : list of int
        Atoms of the full system that the frame reads.
    masses : Tensor (n,)
        Their masses (amu).
    reference : Tensor (n, 3)
        Reference structure (nm); centred here.
    kT : float
        Thermal energy (kJ/mol) of the data.
    parents : list of int, optional
        Spanning-tree parent of each selected atom (−1 for roots), for unwrapping under periodic boundaries
        (see :func:`spanning_tree`); by default every atom is a root.
    align : bool
        Remove rigid-body motion (default). Without it the coordinates are the raw mass-weighted positions
        (for systems held in space by external fields).

    Examples
    --------
    >>> reference = torch.randn(4, 3, dtype=torch.float64)
    >>> frame = InternalFrame([0, 1, 2, 3], torch.ones(4), reference, kT=2.5)
    >>> frame.dim
    6
    >>> rotation = torch.linalg.matrix_exp(torch.tensor([[0., 1, 0], [-1, 0, 2], [0, -2, 0]], dtype=torch.float64))
    >>> moved = reference @ rotation.T + 3.0
    >>> bool(torch.allclose(frame.internal(moved[None]), frame.internal(reference[None]), atol=1e-10))
    True
    """

    def __init__(self, atom_indices: List[int], masses: Tensor, reference: Tensor, kT: float,
                 parents: Optional[List[int]] = None, align: bool = True):
        super().__init__()
        masses = torch.as_tensor(masses, dtype=torch.float64)
        reference = torch.as_tensor(reference, dtype=torch.float64)
        n = len(atom_indices)
        if masses.shape != (n,) or reference.shape != (n, 3):
            raise ValueError(f"{n} atoms need masses of shape ({n},) and a reference of shape ({n}, 3), got "
                             f"{tuple(masses.shape)} and {tuple(reference.shape)}")
        if torch.any(masses <= 0):
            raise ValueError("all selected atoms need a positive mass (virtual sites cannot be selected)")
        self.atom_indices = [int(i) for i in atom_indices]
        self.parents = [int(i) for i in parents] if parents is not None else [-1] * n
        self.unwrap_order = breadth_first_order(self.parents)
        self.align = bool(align)
        self.kT = float(kT)
        centre = (masses[:, None] * reference).sum(0) / masses.sum()
        self.register_buffer("masses", masses)
        self.register_buffer("reference", reference - centre if align else reference)
        basis = rigid_body_basis(self.reference, masses) if align else torch.eye(3 * n, dtype=torch.float64)
        self.register_buffer("basis", basis)
        self.register_buffer("coordinate_scale", torch.sqrt(masses / kT).repeat_interleave(3))

    @property
    def dim(self) -> int:
        return int(self.basis.shape[1])

    def whole(self, x: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Selected positions ``(..., n, 3)`` made whole across periodic boundaries and, when aligning, centred and
        rotated onto the reference."""
        if box is not None:
            x = unwrap(x, box.to(x.dtype), self.unwrap_order, self.parents)
        if self.align:
            x = kabsch_align(x, self.reference.to(x.dtype), self.masses.to(x.dtype))
        return x

    def internal(self, x: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Reduced internal coordinates ``(..., dim)`` of selected positions ``(..., n, 3)`` in nm."""
        x = self.whole(x, box)
        flat = x.reshape(x.shape[:-2] + (-1,)) * self.coordinate_scale.to(x.dtype)
        return flat @ self.basis.to(x.dtype)

    def cartesian(self, u: Tensor) -> Tensor:
        """Inverse of :meth:`internal` into the reference frame: positions ``(..., n, 3)`` in nm."""
        flat = (u.to(self.basis.dtype) @ self.basis.T) / self.coordinate_scale
        return flat.reshape(u.shape[:-1] + (-1, 3))

    def forward(self, positions: Tensor, box: Optional[Tensor] = None) -> Tensor:
        """Reduced internal coordinates of the selected atoms in full-system positions ``(N, 3)`` or ``(T, N, 3)``."""
        return self.internal(positions[..., self.atom_indices, :], box)

    def state(self) -> dict:
        return {"atom_indices": self.atom_indices, "masses": self.masses, "reference": self.reference,
                "kT": self.kT, "parents": self.parents, "align": self.align, "basis": self.basis}

    @classmethod
    def from_state(cls, state: dict) -> "InternalFrame":
        frame = cls(state["atom_indices"], state["masses"], state["reference"], state["kT"], state["parents"],
                    state["align"])
        # The stored basis, not a recomputed one: an SVD may pick another basis of the same subspace.
        frame.basis.copy_(state["basis"])
        return frame


def pair_incidence(first: Tensor, second: Tensor, n_atoms: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``(P, n)`` matrix of the atom pairs ``(first[p], second[p])``: +1 at the first atom, −1 at the second, so
    that ``B @ x`` gives every pair's difference vector in one product.

    Examples
    --------
    >>> pair_incidence(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), 3).tolist()
    [[1.0, -1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 1.0, -1.0]]
    """
    incidence = torch.zeros(len(first), n_atoms, dtype=dtype)
    rows = torch.arange(len(first))
    incidence[rows, first] = 1.0
    incidence[rows, second] = -1.0
    return incidence


class PairDistances(nn.Module):
    """Reduced internal coordinates ``u (..., dim)`` of a frame → all interatomic distances ``(..., P)`` (nm) of
    its atoms, pair ``p`` between atoms ``first[p] < second[p]``: features that no rigid-body motion changes, so a
    network reading them needs no alignment.

    Examples
    --------
    >>> reference = torch.eye(3, dtype=torch.float64)  # a triangle with sides of √2
    >>> frame = InternalFrame([0, 1, 2], torch.ones(3), reference, kT=1.0)
    >>> [round(d, 6) for d in PairDistances(frame)(frame.internal(reference[None]))[0].tolist()]
    [1.414214, 1.414214, 1.414214]
    """

    def __init__(self, frame: InternalFrame):
        super().__init__()
        self.frame = frame
        first, second = torch.triu_indices(len(frame.atom_indices), len(frame.atom_indices), 1)
        self.register_buffer("first", first)
        self.register_buffer("second", second)

    def forward(self, u: Tensor) -> Tensor:
        x = self.frame.cartesian(u)
        return torch.linalg.vector_norm(x[..., self.first, :] - x[..., self.second, :], dim=-1)


def spanning_tree(n_atoms: int, bonds) -> List[int]:
    """Parents of a breadth-first spanning forest over ``bonds`` (pairs of local atom indices); −1 marks roots.

    Examples
    --------
    >>> spanning_tree(4, [(0, 1), (1, 2)])
    [-1, 0, 1, -1]
    """
    neighbours: List[List[int]] = [[] for _ in range(n_atoms)]
    for a, b in bonds:
        neighbours[a].append(b)
        neighbours[b].append(a)
    parent = [-2] * n_atoms
    for root in range(n_atoms):
        if parent[root] != -2:
            continue
        parent[root] = -1
        queue = [root]
        while queue:
            atom = queue.pop(0)
            for other in sorted(neighbours[atom]):
                if parent[other] == -2:
                    parent[other] = atom
                    queue.append(other)
    return parent


def breadth_first_order(parents: List[int]) -> List[int]:
    """An order of atoms in which every parent comes before its children."""
    children: List[List[int]] = [[] for _ in parents]
    for child, parent in enumerate(parents):
        if parent >= 0:
            children[parent].append(child)
    order = [i for i, parent in enumerate(parents) if parent < 0]
    for atom in order:  # the list grows while it is walked: a breadth-first traversal
        order.extend(children[atom])
    return order
