"""Well-tempered metadynamics on 1–3 slow modes, evaluated in one ``TorchForce``.

``openmm.app.Metadynamics`` with learned CVs runs one ``TorchForce`` per mode inside a ``CustomCVForce`` (K forward
and backward passes per step) and refits a spline over the whole grid every time it adds a hill. Here the bias lives
inside the TorchScript module that also evaluates the CV model:

- **One model evaluation per step.** The module computes the K modes, looks the bias up on its own grid and returns
  the energy; autograd gives the forces, so they are exactly −∇E of the bias that is applied.
- **Hills travel through global parameters.** At a deposition step the driver reads the modes and the bias out of
  the Context (zero-weight energy terms whose parameter derivatives are the values), computes the well-tempered
  height ``h = h0 exp(−V(s) / (k_B ΔT))``, ΔT = (γ − 1) T, and sets a hill counter, the centre and the height as
  Context parameters. The module adds the hill to its grid buffer the first time it sees a new counter value; the
  buffer change persists inside the Context. The Python side does no grid work at deposition time: it keeps the
  hill list and folds it into its own copy of the grid only when asked (free energy, saving); that copy equals the
  Context's grid to rounding. The heights use V(s) as the Context applies it, and every deposition checks that the
  Context's grid holds as many hills as the driver deposited.
- **Hills cost no model evaluation.** The module remembers the modes and the bias of its last evaluation for the
  integrator or a ``getState`` (with ``LangevinMiddleIntegrator`` at the start of the last step; some integrators
  evaluate at the end), and the read-out returns those without running the model: the hill is centred on the
  trajectory at most one (outer) step back, which samples the same distribution. Each remembered point serves
  one hill; without an evaluation since the previous hill the read-out evaluates the model at the current
  positions. A hill therefore costs a read-out of a few tensor operations plus an update of the
  nodes within ``HILL_CUTOFF`` widths of its centre, whatever the grid size and the CV model
  (``benchmarks/hill_cost.py`` on this project's CPU: 0.5–0.75 ms per hill, at most 1.06, with the shipped flow
  model, whose evaluation costs 1.7 ms; 0.3–0.7 ms with a cheap stand-in; ``app.Metadynamics`` needs 2.9 ms to
  138 ms with the flow on grids from 90 to 50³ nodes). With ``cudaGraphs`` the read-out replays the graph and
  the hill sits at the current modes.
- **Smooth bias.** Every grid node stores the bias and its first mixed derivatives (∂V/∂s_i, ∂²V/∂s_i∂s_j, …),
  accumulated from the exact derivatives of each Gaussian, and the module evaluates the tensor-product cubic
  Hermite interpolant. The bias is C¹ in the modes, so forces are continuous; a linearly interpolated grid would
  give forces that jump at every cell face.

Grid or list of hills? A fixed-capacity list of exact Gaussians costs O(number of hills) per step, the grid O(1)
per step and O(2^K × nodes) memory. Measured on this project's 2-core CPU (Reference platform, alanine dipeptide,
K = 2, µs per step on top of a TorchForce that only evaluates the CV model, over four runs on a shared machine):
the grid (81², any number of hills) added 350–425; a hill list added 70–220 with 1000 hills, 330–530 with 5000 and
940–1780 with 20 000 (a 20 ns run with a hill every ps deposits 20 000). The list wins only below a few thousand
hills, so the bias is a grid. Its
other costs: memory, 2^K × 8 bytes per node (K = 3 with 121 nodes per mode: 113 MB, carried inside the force);
the interpolation error, at most 2e-4 of a hill height at the default spacing of a third of a hill width (8e-5 at
a quarter); and the truncation of each Gaussian at ``HILL_CUTOFF`` widths. On this CPU the grid lookup is about
30 small tensor operations, each costing a few µs of TorchScript overhead; on a GPU, CUDA graphs would remove most
of that.

Outside the grid the bias continues flat: V(s) = V(clamp(s, lo, hi)), so the energy is continuous but the bias
force normal to the grid boundary drops to zero there. Choose ranges with a margin of a few hill widths around the
region to sample; ``wallForceConstant`` adds a flat-bottom harmonic wall, ``½ κ d²`` with d the distance outside
the range in mode units, that pushes the system back. Hills whose centre lies outside the range are still
deposited (their tails reach the grid).

CUDA graphs (``cudaGraphs=True``): the module adds hills without data-dependent branches, so it can be captured.
Verified on an H200 with acellera-openmmtorch-cu13 1.10 (``tests/test_cuda.py``): changed global parameters reach
the captured graph, hills arrive, and the CUDA bias equals the Reference one; the kernel passes parameters as
1-element tensors there (0-d on the CPU platforms), which the module accepts. The hill-count check in
:meth:`LatentMetadynamics.step` would stop a run on a build where hills do not arrive.

Multiple time stepping: the bias force sits in its own force group (:attr:`LatentMetadynamics.forceGroup`), so a
multiple-time-step integrator can apply it every n-th inner step:
:func:`nct_openmm.integrators.mtsLangevinIntegrator` gives the bias group one substep of an outer step of n × 2 fs
and every other group of the System n. ``frequency`` then counts outer steps. How much accuracy the slower bias
costs is the user's to measure (``benchmarks/bias_overhead.py --mts-accuracy``).

Examples
--------
>>> meta = LatentMetadynamics(system, cvModule, ranges=[(-4, 4), (-4, 4)], widths=[0.2, 0.2],
...                           temperature=300 * unit.kelvin, biasFactor=8, height=1.0, frequency=500)  # doctest: +SKIP
>>> simulation = app.Simulation(topology, system, integrator)  # doctest: +SKIP
>>> meta.step(simulation, 500000)  # doctest: +SKIP
>>> fes = meta.getFreeEnergy()  # doctest: +SKIP
>>> meta.saveBias("bias.npz")  # doctest: +SKIP
"""
import math
import os
import tempfile
from typing import List, Optional, Tuple

import numpy as np
import openmm
import torch
from openmm import unit

from nct_openmm.backend import createTorchForce, globalParameterNames
from nct_openmm.systems import checkForceGroup, contextOf, freeForceGroup, valueInUnit, warnIfBoxIsIgnored

__all__ = ["LatentMetadynamics", "HermiteBiasGrid", "LatentMetadynamicsModule"]

#: Version of the file written by :meth:`LatentMetadynamics.saveBias`.
BIAS_FORMAT_VERSION = 1

MAX_MODES = 3

#: Name of the force LatentMetadynamics adds (``Force.getName``).
FORCE_NAME = "LatentMetadynamics"

#: Default grid spacing is the hill width divided by this.
POINTS_PER_WIDTH = 3

#: Gaussians are cut at this many widths from their centre (exp(−12.5) ≈ 4e-6 of the height).
HILL_CUTOFF = 5.0

_PREFIX = "nctMetad"
_HILL_ID = _PREFIX + "HillId"
_HEIGHT = _PREFIX + "Height"
_BIAS_READOUT = _PREFIX + "BiasReadout"
_COUNT_READOUT = _PREFIX + "HillCountReadout"
_READ_OUT = _PREFIX + "ReadOut"
# Values of _READ_OUT: an evaluation for the integrator (remembered), or a read-out of the modes at the current
# positions (not remembered) or of the remembered ones (the model is not run).
_EVALUATION, _READ_CURRENT, _READ_LAST = 0, -1, 1


def _centreParameter(k):
    return f"{_PREFIX}Centre{k}"


def _modeReadout(k):
    return f"{_PREFIX}ModeReadout{k}"


# ---------------------------------------------------------------------------------------------------------------
# TorchScript: the grid and the module OpenMM evaluates
# ---------------------------------------------------------------------------------------------------------------

class HermiteBiasGrid(torch.nn.Module):
    """A bias on a regular K-dimensional grid of values and mixed derivatives, read by cubic Hermite interpolation.

    Node data are stored as ``values[c, node]``, where bit k of channel ``c`` says whether the stored quantity is
    differentiated once with respect to mode k (channel 0 is the bias itself, channel 2^K − 1 the K-th mixed
    derivative). Gaussian hills are separable, so each channel of a hill is a product of 1-D factors.
    :meth:`evaluate` returns the interpolant and its exact gradient without autograd: TorchScript pays a few
    microseconds per operation on a CPU, and recording the interpolation for backward would double that.

    Parameters
    ----------
    lows, highs : list of float
        Grid range of each mode (the end points are nodes).
    sizes : list of int
        Nodes per mode, at least 2.
    widths : list of float
        Hill widths (Gaussian standard deviations) in mode units.
    values : torch.Tensor, optional
        Initial node data, shape ``(2**K, prod(sizes))``, float64; zeros when omitted.
    hillCount : int
        Hills already contained in ``values``. :attr:`hillCount` counts the hills the grid holds;
        :attr:`lastHillId`, the id of the last hill it absorbed, tells new hills from ones already in it. The two
        part when a copy of the grid meets a later hill id (a reinitialised Context, a State from another step),
        which is how the driver notices that the grid lost hills.
    lastHillId : int, optional
        The id of the last hill in ``values``; ``hillCount`` when omitted. Ids only grow, so after a bias with
        fewer hills is loaded they run ahead of the count.
    wallForceConstant : float
        κ of the flat-bottom wall outside the range, kJ/mol per squared mode unit.
    branchFree : bool
        Add hills without a data-dependent branch, so the module can be captured in a CUDA graph; every step then
        pays for one hill's worth of arithmetic, multiplied by zero.

    Examples
    --------
    >>> grid = HermiteBiasGrid([-2.0], [2.0], [17], [0.5])
    >>> grid.deposit(torch.tensor([0.0], dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64))
    >>> bias, total, gradient = grid.evaluate(torch.tensor([[0.0], [0.5]], dtype=torch.float64))
    >>> [round(float(v), 4) for v in bias], [round(float(g), 4) for g in gradient[:, 0]]
    ([1.5, 0.9098], [0.0, -1.8196])
    """

    def __init__(self, lows: List[float], highs: List[float], sizes: List[int], widths: List[float],
                 values: Optional[torch.Tensor] = None, hillCount: int = 0, wallForceConstant: float = 0.0,
                 branchFree: bool = False, lastHillId: Optional[int] = None):
        super().__init__()
        self.numModes = len(sizes)
        self.lows = [float(x) for x in lows]
        self.highs = [float(x) for x in highs]
        self.sizes = [int(n) for n in sizes]
        self.widths = [float(w) for w in widths]
        self.spacings = [(h - l) / (n - 1) for l, h, n in zip(self.lows, self.highs, self.sizes)]
        self.halfWindows = [min(math.ceil(HILL_CUTOFF * w / d), n - 1)
                            for w, d, n in zip(self.widths, self.spacings, self.sizes)]
        self.strides = [int(np.prod(self.sizes[k + 1:], dtype=np.int64)) for k in range(self.numModes)]
        self.wallForceConstant = float(wallForceConstant)
        self.branchFree = bool(branchFree)
        numChannels, numNodes = 2 ** self.numModes, int(np.prod(self.sizes, dtype=np.int64))
        if values is None:
            values = torch.zeros(numChannels, numNodes, dtype=torch.float64)
        if tuple(values.shape) != (numChannels, numNodes):
            raise ValueError(f"grid values must have shape {(numChannels, numNodes)}, got {tuple(values.shape)}")
        self.register_buffer("values", values.to(torch.float64).clone())
        self.register_buffer("hillCount", torch.tensor(float(hillCount), dtype=torch.float64))
        self.register_buffer("lastHillId", torch.tensor(float(hillCount if lastHillId is None else lastHillId),
                                                        dtype=torch.float64))
        half = max(self.halfWindows)
        self.register_buffer("offsets", torch.arange(-half, half + 1, dtype=torch.long))
        self.register_buffer("withinCutoff", self.offsets.abs()[None, :] <= torch.tensor(self.halfWindows)[:, None])
        self.register_buffer("nodeSpacings", torch.tensor(self.spacings, dtype=torch.float64))
        self.register_buffer("hillWidths", torch.tensor(self.widths, dtype=torch.float64)[:, None])
        # torch.clamp takes tensor bounds only as a pair, so the lower one is a tensor of zeros.
        self.register_buffer("firstNodes", torch.zeros(self.numModes, 1, dtype=torch.long))
        self.register_buffer("lastNodes", torch.tensor(self.sizes, dtype=torch.long)[:, None] - 1)
        self.register_buffer("nodeStridesLong", torch.tensor(self.strides, dtype=torch.long)[:, None])
        self.register_buffer("nodeCoordinates", _nodeCoordinates(self.lows, self.sizes, self.spacings))
        for name, tensor in _interpolationTables(self.lows, self.highs, self.sizes, self.spacings).items():
            self.register_buffer(name, tensor)
        self.weightShape = [-1, (self.numModes + 1) * numChannels * numChannels, self.numModes]

    def gaussianFactors(self, k: int, x: torch.Tensor, centre: torch.Tensor):
        """Gaussian factor of mode ``k`` at coordinates ``x`` and its derivative with respect to ``x``.

        The module's windowed update, its fixed-shape update and the driver's dense rebuild all take node
        coordinates from :attr:`nodeCoordinates` and factors from :func:`_gaussianFactors` (this method for one
        mode, the fixed-shape update for all at once), so every grid holds the same numbers.
        """
        return _gaussianFactors(x, centre, self.hillWidths[k])

    @torch.jit.export
    def nearestNodes(self, centres: torch.Tensor) -> torch.Tensor:
        """Index of the node nearest to each centre along each mode: ``(..., K)`` → ``(..., K)`` (long)."""
        return torch.round((centres - self.rangeLow) / self.nodeSpacings).to(torch.long)

    @torch.jit.export
    def deposit(self, centre: torch.Tensor, height: torch.Tensor):
        """Add ``height × Gaussian(centre)`` to the nodes within the cutoff: a box of the grid, updated in place.

        Reads the nearest nodes on the host (one synchronisation on a GPU); :meth:`depositFixedShape` does not.
        A hill costs a fixed number of tensor operations (about 15 per mode) plus the update of the box, whatever
        the grid size.
        """
        region = self.values.view([self.values.shape[0]] + self.sizes)
        channels = height.to(torch.float64).view(1, 1)
        nearestNodes: List[int] = self.nearestNodes(centre).tolist()
        factors = torch.empty(0, dtype=torch.float64)
        for k in range(self.numModes):
            nearest = nearestNodes[k]
            first = max(nearest - self.halfWindows[k], 0)
            last = min(nearest + self.halfWindows[k], self.sizes[k] - 1)
            if first > last:
                return
            if k > 0:
                channels = _outerChannels(factors, channels)
            g, dg = self.gaussianFactors(k, self.nodeCoordinates[k, first:last + 1], centre[k])
            factors = torch.stack([g, dg])
            region = region.narrow(k + 1, first, last - first + 1)
        # The last mode's outer product is fused into the update: one pass over the box, no temporary of its size.
        window = list(region.shape[1:])
        region.view([2, channels.shape[0]] + window).addcmul_(
            factors.view([2, 1] + [1] * (self.numModes - 1) + [window[-1]]),
            channels.view([1, channels.shape[0]] + window[:-1] + [1]))

    @torch.jit.export
    def depositFixedShape(self, centre: torch.Tensor, height: torch.Tensor):
        """Like :meth:`deposit`, with tensors of a fixed shape and no host synchronisation (for CUDA graphs).

        Scatters a window of ``2 * max(halfWindows) + 1`` nodes per mode; nodes off the grid or beyond the cutoff
        get weight zero. Every mode's window is computed at once: this runs at every step of a captured graph, where
        each operation is a kernel launch.
        """
        window = self.nearestNodes(centre)[:, None] + self.offsets
        nodes = torch.clamp(window, self.firstNodes, self.lastNodes)
        kept = (nodes == window) & self.withinCutoff
        g, dg = _gaussianFactors(self.nodeCoordinates.gather(1, nodes), centre[:, None], self.hillWidths)
        factors = torch.stack([g, dg]) * kept
        flatNodes = nodes * self.nodeStridesLong
        channels = height.to(torch.float64).view(1, 1)
        flat = flatNodes[0]
        for k in range(self.numModes):
            channels = _outerChannels(factors[:, k], channels)
            if k > 0:
                flat = (flat[:, None] + flatNodes[k][None, :]).reshape(-1)
        self.values.index_add_(1, flat, channels)

    @torch.jit.export
    def evaluate(self, s: torch.Tensor):
        """Bias at CV points ``s`` ``(M, K)``: ``(grid part (M,), grid plus wall (M,), gradient of both (M, K))``.

        Inside the range, the cubic Hermite interpolant; outside, the interpolant at the nearest point of the range
        (so its gradient across the boundary is zero) plus the wall. Computed without autograd.
        """
        clamped = torch.clamp(s, self.rangeLow, self.rangeHigh)
        t = torch.addcmul(self.cellOrigin, clamped, self.inverseSpacing)
        # fmin, not minimum: a NaN mode must still index a cell. In a frozen module, as openmm-torch runs it, the
        # out-of-range index that NaN gave crashed the process (segmentation fault) instead of raising. At the
        # lower end t can round to −1e-15, whose cell −1 would wrap to another node.
        cell = torch.fmin(torch.floor(t), self.lastCell).clamp_min(0.0)
        powers = ((t - cell).unsqueeze(-1) ** self.exponents).unsqueeze(-2)
        basis = torch.matmul(powers, self.basisCoefficients).view(s.shape[0], -1)
        weights = basis.index_select(1, self.basisIndex).view(self.weightShape).prod(-1)
        corners = (cell * self.nodeStrides).sum(-1).long().view(-1, 1, 1) + self.cornerChannelOffsets
        result = torch.bmm(weights.view(s.shape[0], self.numModes + 1, -1), self.values.take(corners))
        bias = result[:, 0, 0]
        gradient = result[:, 1:, 0] * (s == clamped)
        if self.wallForceConstant == 0.0:
            return bias, bias, gradient
        outside = s - clamped
        wall = 0.5 * self.wallForceConstant * (outside * outside).sum(-1)
        return bias, bias + wall, gradient + self.wallForceConstant * outside

    @torch.jit.export
    def addHill(self, hillId: torch.Tensor, centres: List[torch.Tensor], height: torch.Tensor):
        """Deposit the hill announced as ``hillId`` unless it is already in the grid."""
        hillId = hillId.detach().to(torch.float64)
        isNew = hillId > self.lastHillId
        if self.branchFree:
            newHills = isNew.to(torch.float64)  # 1 or 0: every step of a captured graph runs this
            self.depositFixedShape(torch.stack(centres).detach().to(torch.float64),
                                   height.detach() * newHills)
            self.hillCount.add_(newHills)
            self.lastHillId.copy_(torch.maximum(self.lastHillId, hillId))
        elif bool(isNew):
            self.deposit(torch.stack(centres).detach().to(torch.float64), height.detach().to(torch.float64))
            self.hillCount.add_(1.0)
            self.lastHillId.copy_(hillId)


def _gaussianFactors(x: torch.Tensor, centre: torch.Tensor, width: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian of standard deviation ``width`` at ``x`` and its derivative with respect to ``x`` (broadcast)."""
    z = (x - centre) / width
    g = torch.exp(-0.5 * z * z)
    return g, g * z * (-1.0 / width)


def _outerChannels(factors: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Extend per-channel node factors ``(C, L)`` by one mode's ``(2, M)`` (Gaussian, derivative): ``(2C, L × M)``.

    The new mode's derivative order becomes the channel's highest bit.
    """
    return (factors.view(2, 1, 1, -1) * channels.view(1, channels.shape[0], -1, 1)).view(2 * channels.shape[0], -1)


def _nodeCoordinates(lows, sizes, spacings):
    """Node coordinates of each mode, ``(K, max(sizes))``, zero-padded."""
    coordinates = torch.zeros(len(sizes), max(sizes), dtype=torch.float64)
    for k, (low, size, spacing) in enumerate(zip(lows, sizes, spacings)):
        coordinates[k, :size] = low + torch.arange(size, dtype=torch.float64) * spacing
    return coordinates


#: Cubic Hermite basis on a cell, as polynomial coefficients of (1, u, u², u³). Rows: value of node 0, slope of
#: node 0, value of node 1, slope of node 1 (slopes per unit u); then the same differentiated with respect to u.
_HERMITE = np.array([
    [1, 0, -3, 2], [0, 1, -2, 1], [0, 0, 3, -2], [0, 0, -1, 1],
    [0, -6, 6, 0], [1, -4, 3, 0], [0, 6, -6, 0], [0, -2, 3, 0],
], dtype=np.float64)


def _interpolationTables(lows, highs, sizes, spacings):
    """Constant index and coefficient tables that let :meth:`HermiteBiasGrid.evaluate` run as a few tensor ops.

    Corners and channels of a cell are both numbered by bit patterns (bit k: upper node / derivative along k).
    ``basisIndex[j, corner, channel, k]`` picks, from the flattened per-mode basis ``(K, order, node, slope)``,
    the factor that mode k contributes to the weight of ``values[channel, corner]`` in row j of the result: row 0
    is the interpolant, row k + 1 its u-derivative along mode k (order 1 for mode k, order 0 for the others).
    """
    numModes = len(sizes)
    numCorners = 2 ** numModes
    bits = np.array([[(c >> k) & 1 for k in range(numModes)] for c in range(numCorners)])
    coefficients = np.stack([_HERMITE.T.copy() for _ in range(numModes)])
    for k, spacing in enumerate(spacings):
        # Node slopes are per unit s, the basis is in u = (s - node) / spacing; derivative rows return d/ds.
        coefficients[k][:, [1, 3, 5, 7]] *= spacing
        coefficients[k][:, 4:] /= spacing
    row, corner, channel, mode = np.meshgrid(np.arange(numModes + 1), np.arange(numCorners), np.arange(numCorners),
                                             np.arange(numModes), indexing="ij")
    order = (row == mode + 1).astype(np.int64)
    basisIndex = (mode * 8 + order * 4 + bits[corner, mode] * 2 + bits[channel, mode])
    basisIndex = basisIndex.reshape(numModes + 1, numCorners * numCorners, numModes)
    strides = [int(np.prod(sizes[k + 1:], dtype=np.int64)) for k in range(numModes)]
    numNodes = int(np.prod(sizes, dtype=np.int64))
    cornerChannelOffsets = (bits @ np.array(strides))[:, None] + np.arange(numCorners)[None, :] * numNodes
    low, spacing = torch.tensor(lows, dtype=torch.float64), torch.tensor(spacings, dtype=torch.float64)
    return {
        "rangeLow": low,
        "rangeHigh": torch.tensor(highs, dtype=torch.float64),
        "cellOrigin": -low / spacing,
        "inverseSpacing": 1.0 / spacing,
        "lastCell": torch.tensor([n - 2 for n in sizes], dtype=torch.float64),
        "exponents": torch.arange(4, dtype=torch.float64),
        "basisCoefficients": torch.as_tensor(coefficients),
        "basisIndex": torch.as_tensor(basisIndex.reshape(-1)),
        "nodeStrides": torch.tensor(strides, dtype=torch.float64),
        "cornerChannelOffsets": torch.as_tensor(cornerChannelOffsets.reshape(1, -1, 1)),
    }


class LatentMetadynamicsModule(torch.nn.Module):
    """CV module followed by the grid bias, with hill deposition and read-outs driven by global parameters.

    Energy (kJ/mol) = V(s) + wall(s) + β V(s) + Σ_k λ_k s_k + ν n. The read-out parameters β, λ_k, ν are zero and
    exist for their energy derivatives: V(s), the modes s_k, and the hill count n of this module's grid. The bias
    enters autograd only as ``s · G`` plus a constant, with G its exact gradient at s computed without autograd,
    so backward runs through the CV model and one product. Subclasses give ``forward`` the argument list
    ``TorchForce`` passes.
    """

    def __init__(self, cvModule: torch.nn.Module, modes: List[int], grid: HermiteBiasGrid):
        super().__init__()
        self.cv = cvModule
        self.grid = grid
        self.allModes = modes == list(range(int(cvModule.num_modes)))
        self.register_buffer("modes", torch.tensor(modes, dtype=torch.long))
        # NaN until an evaluation and again after each read: a read-out with nothing new to report is told.
        self.register_buffer("lastModes", torch.full([len(modes)], math.nan, dtype=torch.float64))
        self.register_buffer("lastBias", torch.tensor(math.nan, dtype=torch.float64))
        self.evaluationKind, self.readLastKind = _EVALUATION, _READ_LAST  # TorchScript reads no global ints

    def energy(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor], hillId: torch.Tensor,
               height: torch.Tensor, biasReadout: torch.Tensor, countReadout: torch.Tensor,
               centres: List[torch.Tensor], modeReadouts: List[torch.Tensor],
               readOut: torch.Tensor) -> torch.Tensor:
        biasReadout, countReadout = _scalar(biasReadout), _scalar(countReadout)
        modeReadouts = [_scalar(r) for r in modeReadouts]
        with torch.no_grad():
            self.grid.addHill(_scalar(hillId), [_scalar(c) for c in centres], _scalar(height))
        if self.grid.branchFree:
            # A captured CUDA graph cannot branch on a parameter: every read-out evaluates the model.
            energy = self.biasEnergy(positions, boxvectors, biasReadout, countReadout, modeReadouts, False)
        else:
            kind = int(_scalar(readOut))
            if kind == self.readLastKind:
                energy = self.lastEvaluation(positions, biasReadout, countReadout, modeReadouts)
            else:
                energy = self.biasEnergy(positions, boxvectors, biasReadout, countReadout, modeReadouts,
                                         kind == self.evaluationKind)
        return energy.to(positions.dtype)

    def biasEnergy(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor], biasReadout: torch.Tensor,
                   countReadout: torch.Tensor, modeReadouts: List[torch.Tensor], remember: bool) -> torch.Tensor:
        """The bias and the read-out terms at the modes of ``positions`` (float64); ``remember`` keeps the modes
        and the bias for :meth:`lastEvaluation`."""
        s = self.cv(positions, boxvectors)
        if not self.allModes:
            s = s[self.modes]
        s = s.to(torch.float64)
        # The lookup runs without autograd (TorchScript would otherwise wrap it in a differentiable graph). Not
        # s.detach(): torch.jit.freeze drops detach, and its CSE ignores no_grad scopes, so the product with s
        # below must stay a different expression from the constant term computed here.
        with torch.no_grad():
            bias, total, gradient = self.grid.evaluate(s.unsqueeze(0))
            constant = total[0] - torch.dot(s, gradient[0])
            if remember:
                self.lastModes.copy_(s)
                self.lastBias.copy_(bias[0])
        energy = (s * (gradient[0] + torch.stack(modeReadouts))).sum() + constant
        return energy + biasReadout * bias[0] + countReadout * self.grid.hillCount

    def lastEvaluation(self, positions: torch.Tensor, biasReadout: torch.Tensor, countReadout: torch.Tensor,
                       modeReadouts: List[torch.Tensor]) -> torch.Tensor:
        """The read-out terms at the remembered modes and bias, without evaluating the model (float64); each
        remembered value is read once (NaN afterwards), so a hill never reuses the point of the previous one.

        Contributes no force. The positions enter with weight zero because openmm-torch differentiates the energy
        with respect to them.
        """
        # The CUDA kernel passes the parameters in float32 unless the Context runs in double precision.
        readouts = torch.stack([biasReadout, countReadout] + modeReadouts).to(torch.float64)
        values = torch.cat([self.lastBias.view(1), self.grid.hillCount.view(1), self.lastModes])
        with torch.no_grad():
            self.lastModes.fill_(math.nan)
            self.lastBias.fill_(math.nan)
        return torch.dot(readouts, values) + 0.0 * positions.sum()


class _MetadynamicsModuleNoBox(LatentMetadynamicsModule):
    def forward(self, positions: torch.Tensor, biasReadout: torch.Tensor, countReadout: torch.Tensor,
                p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor, p4: torch.Tensor,
                p5: Optional[torch.Tensor] = None, p6: Optional[torch.Tensor] = None,
                p7: Optional[torch.Tensor] = None, p8: Optional[torch.Tensor] = None) -> torch.Tensor:
        readouts, readOut, hillId, height, centres = _splitParameters(
            self.grid.numModes, [p0, p1, p2, p3, p4], [p5, p6, p7, p8])
        return self.energy(positions, None, hillId, height, biasReadout, countReadout, centres, readouts,
                           readOut)


class _MetadynamicsModuleBox(LatentMetadynamicsModule):
    def forward(self, positions: torch.Tensor, boxvectors: torch.Tensor, biasReadout: torch.Tensor,
                countReadout: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, p3: torch.Tensor,
                p4: torch.Tensor, p5: Optional[torch.Tensor] = None, p6: Optional[torch.Tensor] = None,
                p7: Optional[torch.Tensor] = None, p8: Optional[torch.Tensor] = None) -> torch.Tensor:
        readouts, readOut, hillId, height, centres = _splitParameters(
            self.grid.numModes, [p0, p1, p2, p3, p4], [p5, p6, p7, p8])
        return self.energy(positions, boxvectors, hillId, height, biasReadout, countReadout, centres, readouts,
                           readOut)


def _scalar(parameter: torch.Tensor) -> torch.Tensor:
    """A global parameter as a 0-d tensor: the CPU kernels of openmm-torch pass shape (), the CUDA kernel (1,)."""
    return parameter.reshape(torch.jit.annotate(List[int], []))


def _splitParameters(numModes: int, given: List[torch.Tensor], optional: List[Optional[torch.Tensor]]):
    """Split the per-mode global parameters: K mode read-outs, the last-evaluation switch, the hill id, the height,
    K centres.

    TorchScript has no ``*args``; TorchForce passes exactly 2K + 3 of them after the two read-outs, 5 for K = 1 and
    up to 9 for K = 3, so the last four slots are optional. See :func:`_parameterOrder`.
    """
    parameters = given
    for parameter in optional:
        if parameter is not None:
            parameters.append(parameter)
    return (parameters[:numModes], parameters[numModes], parameters[numModes + 1], parameters[numModes + 2],
            parameters[numModes + 3:2 * numModes + 3])


def _depositDense(grid, centres, heights, chunk=256):
    """Add many hills to ``grid`` at once (driver side): per-mode factors on every node, then one contraction.

    Uses :meth:`HermiteBiasGrid.gaussianFactors` with the same nearest node and cutoff as the module's windowed
    update, so the result equals depositing the hills one by one.
    """
    numModes = grid.numModes
    letters = "abc"[:numModes]
    equation = "p," + ",".join(f"p{letter}" for letter in letters) + "->" + letters
    with torch.no_grad():
        for start in range(0, len(heights), chunk):
            c = torch.as_tensor(centres[start:start + chunk], dtype=torch.float64)
            h = torch.as_tensor(heights[start:start + chunk], dtype=torch.float64)
            nearest = grid.nearestNodes(c)
            factors = [_denseFactors(grid, k, c[:, k], nearest[:, k, None]) for k in range(numModes)]
            for channel in range(2 ** numModes):
                perMode = [factors[k][(channel >> k) & 1] for k in range(numModes)]
                grid.values[channel] += torch.einsum(equation, h, *perMode).reshape(-1)


def _denseFactors(grid, k, centres, nearest):
    inside = ((torch.arange(grid.sizes[k])[None, :] - nearest).abs() <= grid.halfWindows[k]).to(torch.float64)
    g, dg = grid.gaussianFactors(k, grid.nodeCoordinates[k, :grid.sizes[k]][None, :], centres[:, None])
    return g * inside, dg * inside


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------

class LatentMetadynamics:
    """Well-tempered metadynamics on K = 1–3 slow modes of a CV module, as one ``TorchForce``.

    Mirrors ``openmm.app.Metadynamics``: construct it (it adds its force to ``system``), build the Simulation, then
    call :meth:`step` instead of ``simulation.step``. The bias is a grid read by cubic Hermite interpolation inside
    the model (see the module documentation for the design and its costs).

    Parameters
    ----------
    system : openmm.System
        The force is added here, in a force group of its own unless ``forceGroup`` is given.
    cvModule : torch.nn.Module or torch.jit.ScriptModule
        Follows the CV-module contract: ``forward(positions, boxvectors=None) -> (num_modes,)``, attributes
        ``num_modes`` and ``num_atoms_required``.
    ranges : sequence of (float, float)
        Grid range (lo, hi) of each biased mode, in mode units.
    widths : float or sequence of float
        Hill widths (Gaussian standard deviations) in mode units, positive.
    temperature : openmm.unit.Quantity or float
        Simulation temperature (K).
    biasFactor : float
        γ > 1: hills shrink as ``exp(−V / (k_B (γ − 1) T))``, and the CV samples the Boltzmann distribution at γ T.
    height : openmm.unit.Quantity or float
        Initial hill height (kJ/mol).
    frequency : int
        Steps between hills.
    gridWidth : int or sequence of int, optional
        Nodes per mode (end points included). Defaults to one node every ``width / POINTS_PER_WIDTH``.
    biasDir : str, optional
        Folder to save the bias into every ``saveFrequency`` steps (file ``bias.npz``; loadable with
        :meth:`loadBias`). Walkers do not share biases through it.
    saveFrequency : int, optional
        Multiple of ``frequency``; required with ``biasDir``.
    periodic : bool
        Hand the box vectors to the CV module (systems with periodic boundary conditions; a warning when the
        System is periodic and this is False). The modes themselves are not periodic: the grid ends at the
        ranges (``app.BiasVariable``'s periodic option has no counterpart here).
    cudaGraphs : bool
        Capture the module in a CUDA graph on the CUDA platform. Hills are then added without a branch, at the cost
        of one hill's worth of (zero-weighted) arithmetic every step. Hills and read-outs travel as Context global
        parameters; with the pinned openmm-torch build they reach the graph (checked on an H200), and :meth:`step`
        raises RuntimeError at the second hill on a build where they do not.
    forceGroup : int, optional
        Defaults to the highest group no force of ``system`` uses.
    stride : int
        Record the time series at every ``stride``-th hill.
    modes : sequence of int, optional
        Which modes of the CV module to bias, default all of them (then the module must have at most 3).
    wallForceConstant : openmm.unit.Quantity or float
        Flat-bottom wall outside the ranges, kJ/mol per squared mode unit; 0 (default) leaves the bias flat there.

    Attributes
    ----------
    forceGroup : int
    force : openmmtorch.TorchForce
        The force in ``system`` (replaced by :meth:`loadBias`).

    Examples
    --------
    >>> meta = LatentMetadynamics(system, cvModule, [(-4, 4), (-4, 4)], [0.2, 0.2], 300 * unit.kelvin,
    ...                           biasFactor=8, height=1.0 * unit.kilojoule_per_mole, frequency=500)  # doctest: +SKIP
    >>> meta.step(simulation, 100000)  # doctest: +SKIP
    >>> meta.getHills()[0].shape  # doctest: +SKIP
    (200, 2)
    """

    def __init__(self, system, cvModule, ranges, widths, temperature, biasFactor, height, frequency,
                 gridWidth=None, biasDir=None, saveFrequency=None, periodic=False, cudaGraphs=False,
                 forceGroup=None, stride=1, modes=None, wallForceConstant=0.0):
        self._modes = _checkModes(cvModule, modes)
        numModes = len(self._modes)
        self._lows, self._highs = _checkRanges(ranges, numModes)
        self._widths = _perMode(widths, numModes, "widths", float)
        if any(not w > 0 for w in self._widths):
            raise ValueError(f"every hill width must be positive, got {self._widths}")
        self._sizes = self._gridSizes(gridWidth, numModes)
        self.temperature = valueInUnit(temperature, unit.kelvin)
        if not 0.0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.biasFactor = float(biasFactor)
        if not 1.0 < self.biasFactor < math.inf:
            raise ValueError(f"biasFactor must be greater than 1 and finite (well-tempered metadynamics), got "
                             f"{biasFactor}")
        self.height = valueInUnit(height, unit.kilojoule_per_mole)
        if not 0.0 <= self.height < math.inf:
            raise ValueError(f"height must not be negative, got {height}")
        self.frequency = _checkedInt(frequency, "frequency")
        self.stride = _checkedInt(stride, "stride")
        self._wallForceConstant = valueInUnit(wallForceConstant, unit.kilojoule_per_mole)
        self._biasDir, self._saveFrequency = self._checkSaving(biasDir, saveFrequency)
        self._thermalEnergyDelta = (unit.MOLAR_GAS_CONSTANT_R * (self.biasFactor - 1.0) * self.temperature
                                    * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)
        _checkSystem(system, cvModule)
        warnIfBoxIsIgnored(system, periodic, "LatentMetadynamics")
        self._system, self._cvModule = system, cvModule
        self._periodic, self._cudaGraphs = bool(periodic), bool(cudaGraphs)
        self.forceGroup = freeForceGroup(system) if forceGroup is None else checkForceGroup(forceGroup)
        # Hill ids only grow, also across loadBias: a Context that keeps its parameters through reinitialize()
        # must never announce an id that the new grid takes for a hill it does not hold.
        self._lastHillId = 0
        self._reset(np.zeros((0, numModes)), np.zeros(0), np.zeros(0, dtype=np.int64), _emptyRecord())
        self.force = self._createForce()
        system.addForce(self.force)

    # -- running ---------------------------------------------------------------------------------------------

    def step(self, simulation, steps):
        """Advance ``simulation`` by ``steps`` steps, adding a hill every ``frequency`` steps.

        Parameters
        ----------
        simulation : openmm.app.Simulation
            Built on the System this object was added to.
        steps : int

        Raises
        ------
        RuntimeError
            When the Context's bias does not hold the hills this object deposited, e.g. a Context created after
            hills were added in another one (save the bias and load it before creating the new Context); or when
            the CV returns non-finite modes at a deposition (nothing is deposited, the bias so far is intact).
        """
        remaining = _checkedInt(steps, "steps", minimum=0)
        while remaining > 0:
            chunk = min(remaining, self.frequency - simulation.currentStep % self.frequency)
            simulation.step(chunk)
            remaining -= chunk
            if simulation.currentStep % self.frequency == 0:
                self._depositHill(simulation.context, simulation.currentStep)
            if self._saveFrequency and simulation.currentStep % self._saveFrequency == 0:
                self.saveBias(os.path.join(self._biasDir, "bias.npz"))

    def getCollectiveVariables(self, simulation):
        """The biased modes at the current positions (one model evaluation).

        Parameters
        ----------
        simulation : openmm.app.Simulation or openmm.Context

        Returns
        -------
        numpy.ndarray, shape (K,)
        """
        return self._readouts(contextOf(simulation))[0]

    # -- the bias ----------------------------------------------------------------------------------------------

    def getFreeEnergy(self):
        """Free energy on the grid, −γ/(γ − 1) V, as ``app.Metadynamics`` estimates it.

        Axis k runs over mode k (``app.Metadynamics`` orders its axes the other way round); the node coordinates
        are :meth:`getGridPoints`.

        Returns
        -------
        openmm.unit.Quantity
            numpy array of shape ``gridWidth`` in kJ/mol.
        """
        bias = self._currentGrid().values[0].numpy().reshape(self._sizes)
        return -self.biasFactor / (self.biasFactor - 1.0) * bias * unit.kilojoule_per_mole

    def getGridPoints(self):
        """Node coordinates of each mode: a list of K arrays (end points included)."""
        return [np.linspace(lo, hi, n) for lo, hi, n in zip(self._lows, self._highs, self._sizes)]

    def getBias(self, cvValues):
        """The bias the force applies (grid plus wall) at CV points, from this object's copy of the grid.

        Parameters
        ----------
        cvValues : array_like, shape (M, K) or (K,)

        Returns
        -------
        numpy.ndarray, shape (M,) (or a float for one point), kJ/mol
        """
        points = np.asarray(cvValues, dtype=np.float64)
        if points.shape[-1:] != (len(self._modes),) or points.ndim > 2:
            raise ValueError(f"cvValues must have shape (M, {len(self._modes)}) or ({len(self._modes)},), got "
                             f"{points.shape}")
        s = torch.as_tensor(points.reshape(-1, len(self._modes)))
        grid = self._currentGrid()
        with torch.no_grad():
            bias = grid.evaluate(s)[1].numpy()
        return float(bias[0]) if points.ndim == 1 else bias

    def getHills(self):
        """All hills so far: centres ``(n, K)`` in mode units and heights ``(n,)`` as a kJ/mol Quantity."""
        return self._centres.copy(), self._heights.copy() * unit.kilojoule_per_mole

    def getTimeSeries(self):
        """What was recorded at every ``stride``-th hill, as arrays ready for ``numpy.savez``.

        Returns
        -------
        dict
            ``step`` (n,), ``time_ps`` (n,), ``cv`` (n, K), ``bias_kj_mol`` (n,) (the bias at the CV point just
            before the hill) and ``height_kj_mol`` (n,). ``step`` and ``time_ps`` say when the hill was deposited;
            ``cv``, its centre, is the point of the last evaluation before it, usually one (outer) step earlier
            (see the module documentation); with ``cudaGraphs=True``, the point at the deposition.
        """
        series = {key: np.array(value) for key, value in self._record.items()}
        series["cv"] = series["cv"].reshape(-1, len(self._modes))
        return series

    # -- saving and restarting -----------------------------------------------------------------------------------

    def saveBias(self, path):
        """Write the grid, the hills, the time series and the settings to ``path`` (numpy ``.npz``), atomically."""
        grid = self._currentGrid()
        contents = dict(self._settings(), formatVersion=BIAS_FORMAT_VERSION, values=grid.values.numpy(),
                        hillCentres=self._centres, hillHeights=self._heights, hillSteps=self._hillSteps,
                        lastHillId=self._lastHillId, torchVersion=torch.__version__, openmmVersion=openmm.__version__)
        contents.update({f"record_{key}": value for key, value in self.getTimeSeries().items()})
        folder = os.path.dirname(os.path.abspath(path))
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".npz")
        try:
            with os.fdopen(handle, "wb") as file:
                np.savez(file, **contents)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o644)  # mkstemp's 0o600 would make the file private
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    def loadBias(self, path):
        """Continue from a bias saved by :meth:`saveBias` with the same grid and well-tempered settings.

        The force in the System is replaced by one whose grid starts from the loaded bias (it moves to the end of
        the System's force list). A Context created earlier still holds the force this removes: create the
        Simulation afterwards, or call ``simulation.context.reinitialize(preserveState=True)``, which rebuilds the
        Context from the System and keeps positions, velocities and time. To restart from a checkpoint or State,
        load one saved at the same step as the bias (both hold hills).

        Raises
        ------
        ValueError
            When the file is not a bias file of this version, or its grid or settings differ from this object's.
        """
        with np.load(path) as data:
            contents = {key: data[key] for key in data.files}
        self._checkLoaded(contents, path)
        record = {key[len("record_"):]: list(contents[key]) for key in contents if key.startswith("record_")}
        record["cv"] = [np.asarray(row) for row in record["cv"]]
        self._reset(contents["hillCentres"], contents["hillHeights"], contents["hillSteps"], record,
                    values=torch.as_tensor(contents["values"]))
        # Files written before ids could run ahead of the count hold no id: there the two were equal.
        saved = int(contents.get("lastHillId", len(self._heightList)))
        self._lastHillId = max(self._lastHillId, saved)
        self._replaceForce()

    # -- internals -----------------------------------------------------------------------------------------------

    def _reset(self, centres, heights, steps, record, values=None):
        """Set the driver's state: the grid copy (with nothing pending), the hill list and the time series."""
        self._grid = self._newGrid(values, len(heights))
        self._centreList = [np.asarray(c, dtype=np.float64) for c in centres]
        self._heightList = [float(h) for h in heights]
        self._stepList = [int(s) for s in steps]
        self._folded = len(self._heightList)
        self._record = record

    @property
    def _centres(self):
        return np.array(self._centreList, dtype=np.float64).reshape(-1, len(self._modes))

    @property
    def _heights(self):
        return np.array(self._heightList, dtype=np.float64)

    @property
    def _hillSteps(self):
        return np.array(self._stepList, dtype=np.int64)

    def _newGrid(self, values, hillCount, branchFree=False, lastHillId=None):
        return HermiteBiasGrid(self._lows, self._highs, self._sizes, self._widths, values, hillCount,
                               self._wallForceConstant, branchFree, lastHillId)

    def _currentGrid(self):
        """The driver's grid with every hill folded in (hills are folded lazily, in batches)."""
        pending = slice(self._folded, len(self._heightList))
        if pending.start < pending.stop:
            _depositDense(self._grid, self._centres[pending], self._heights[pending])
            self._folded = pending.stop
            self._grid.hillCount.fill_(float(self._folded))
            self._grid.lastHillId.fill_(float(self._folded))
        return self._grid

    def _createForce(self):
        grid = self._newGrid(self._currentGrid().values, len(self._heightList), branchFree=self._cudaGraphs,
                             lastHillId=self._lastHillId)
        moduleClass = _MetadynamicsModuleBox if self._periodic else _MetadynamicsModuleNoBox
        module = moduleClass(self._cvModule, self._modes, grid)
        parameters, readouts = _parameterOrder(len(self._modes), self._lastHillId, self._lows, self._highs)
        force = createTorchForce(module, periodic=self._periodic, cudaGraphs=self._cudaGraphs,
                                 globalParameters=parameters, energyParameterDerivatives=readouts,
                                 forceGroup=self.forceGroup)
        force.setName(FORCE_NAME)
        return force

    def _replaceForce(self):
        indices = [index for index in range(self._system.getNumForces())
                   if self._system.getForce(index).this == self.force.this]
        if not indices:
            raise RuntimeError("this LatentMetadynamics's force is no longer in its System; cannot replace it")
        self._system.removeForce(indices[0])
        self.force = self._createForce()
        self._system.addForce(self.force)

    def _readouts(self, context, lastEvaluation=False):
        """Modes, bias and hill count of ``context``'s module, from one evaluation of the bias force group.

        With ``lastEvaluation``, the modes and bias are those the module computed at its last evaluation for the
        integrator or a ``getState`` (read-outs do not count), and the model is not run; they are NaN when there
        was no such evaluation since the previous read-out of this kind.
        """
        context.setParameter(_READ_OUT, _READ_LAST if lastEvaluation else _READ_CURRENT)
        try:
            return self._readState(context)
        finally:
            context.setParameter(_READ_OUT, _EVALUATION)

    def _readState(self, context):
        state = context.getState(getParameterDerivatives=True, groups={self.forceGroup})
        derivatives = state.getEnergyParameterDerivatives()
        modes = np.array([derivatives[_modeReadout(k)] for k in range(len(self._modes))])
        return modes, derivatives[_BIAS_READOUT], int(round(derivatives[_COUNT_READOUT])), state

    def _depositHill(self, context, step):
        # The integrator evaluated the bias during the last step: its modes are a point of the trajectory at most
        # one step back, as good a hill centre as the current one, and reading them spares a model evaluation. A
        # captured graph evaluates the model at every read-out; without an evaluation since the previous hill (an
        # integrator that leaves the bias group out) the remembered modes are NaN. Both take the current modes.
        modes, bias, count, state = self._readouts(context, lastEvaluation=not self._cudaGraphs)
        if not np.isfinite(modes).all():
            modes, bias, count, state = self._readouts(context)
        if not (np.isfinite(modes).all() and math.isfinite(bias)):
            raise RuntimeError(f"the CV module returned non-finite modes {modes} (bias {bias}) at step {step}; no "
                               "hill was deposited, and the bias so far is intact (saveBias). Check the positions "
                               "(a simulation that blew up) and the CV's input atoms")
        if count != len(self._heightList):
            raise RuntimeError(
                f"the Context's bias holds {count} hills but this LatentMetadynamics deposited "
                f"{len(self._heightList)}. A Context holds the hills of the force it was created from plus those "
                "deposited in it since: one created or reinitialized later has lost the others (saveBias() and "
                "loadBias() before creating or reinitializing it), one created before loadBias() holds the replaced "
                "force (reinitialize it), one given a State or checkpoint of another step holds other hills "
                "(save the bias and the checkpoint at the same step), or this openmm-torch build does not pass "
                "changed global parameters to a CUDA graph (cudaGraphs=True)")
        height = self.height * math.exp(-bias / self._thermalEnergyDelta)
        for k, value in enumerate(modes):
            context.setParameter(_centreParameter(k), float(value))
        context.setParameter(_HEIGHT, height)
        self._lastHillId += 1
        context.setParameter(_HILL_ID, self._lastHillId)
        self._centreList.append(modes)
        self._heightList.append(height)
        self._stepList.append(int(step))
        if len(self._heightList) % self.stride == 0:
            self._recordHill(step, state.getTime().value_in_unit(unit.picosecond), modes, bias, height)

    def _recordHill(self, step, time, modes, bias, height):
        for key, value in (("step", step), ("time_ps", time), ("cv", modes), ("bias_kj_mol", bias),
                           ("height_kj_mol", height)):
            self._record[key].append(value)

    def _gridSizes(self, gridWidth, numModes):
        if gridWidth is None:
            return [int(math.ceil(POINTS_PER_WIDTH * (hi - lo) / w)) + 1
                    for lo, hi, w in zip(self._lows, self._highs, self._widths)]
        sizes = _perMode(gridWidth, numModes, "gridWidth", int)
        if any(n < 2 for n in sizes):
            raise ValueError(f"gridWidth needs at least 2 nodes per mode, got {sizes}")
        return sizes

    def _checkSaving(self, biasDir, saveFrequency):
        if (biasDir is None) != (saveFrequency is None):
            raise ValueError("biasDir and saveFrequency must be given together")
        if saveFrequency is None:
            return None, None
        saveFrequency = _checkedInt(saveFrequency, "saveFrequency")
        if saveFrequency % self.frequency:
            raise ValueError(f"saveFrequency ({saveFrequency}) must be a multiple of frequency ({self.frequency})")
        os.makedirs(biasDir, exist_ok=True)
        return biasDir, saveFrequency

    def _settings(self):
        return dict(modes=np.array(self._modes), lows=np.array(self._lows), highs=np.array(self._highs),
                    widths=np.array(self._widths), sizes=np.array(self._sizes), temperature=self.temperature,
                    biasFactor=self.biasFactor, height=self.height, wallForceConstant=self._wallForceConstant,
                    hillCutoff=HILL_CUTOFF)

    def _checkLoaded(self, contents, path):
        version = int(contents.get("formatVersion", -1))
        if version != BIAS_FORMAT_VERSION:
            raise ValueError(f"{path} is not a bias file of format version {BIAS_FORMAT_VERSION} (found {version})")
        for key, expected in self._settings().items():
            if key == "height":
                continue
            if key not in contents:
                raise ValueError(f"{path} has no {key!r}: it is not a complete LatentMetadynamics bias file")
            if not np.array_equal(np.asarray(contents[key]), np.asarray(expected)):
                raise ValueError(f"{path} was saved with {key}={contents[key]!r}, but this LatentMetadynamics has "
                                 f"{key}={expected!r}; the grid and the well-tempered settings must match")


# ---------------------------------------------------------------------------------------------------------------
# Input checks and small helpers
# ---------------------------------------------------------------------------------------------------------------

def _parameterOrder(numModes, lastHillId, lows, highs):
    """Global parameters of the force in the order ``forward`` takes them, and those whose derivatives are read.

    The derivative read-outs come first and in the order they are registered: some openmm-torch kernels look up
    the i-th energy parameter derivative in the i-th global parameter.
    """
    readouts = [_BIAS_READOUT, _COUNT_READOUT] + [_modeReadout(k) for k in range(numModes)]
    parameters = dict.fromkeys(readouts, 0.0)
    parameters.update({_READ_OUT: float(_EVALUATION), _HILL_ID: float(lastHillId), _HEIGHT: 0.0})
    parameters.update({_centreParameter(k): 0.5 * (lows[k] + highs[k]) for k in range(numModes)})
    return parameters, readouts


def _checkModes(cvModule, modes):
    if not hasattr(cvModule, "num_modes") or not hasattr(cvModule, "num_atoms_required"):
        raise ValueError("the CV module must have the attributes num_modes and num_atoms_required (see the "
                         "CV-module contract in nct_openmm.export)")
    numModes = int(cvModule.num_modes)
    if modes is None:
        modes = list(range(numModes))
    modes = [int(m) for m in modes]
    if not 1 <= len(modes) <= MAX_MODES:
        raise ValueError(f"metadynamics biases 1 to {MAX_MODES} modes, got {len(modes)}"
                         + ("; choose some with modes=" if len(modes) > MAX_MODES else ""))
    if any(not 0 <= m < numModes for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"modes must be distinct indices below the CV module's {numModes} modes, got {modes}")
    return modes


def _checkRanges(ranges, numModes):
    if np.ndim(ranges) != 2:
        raise ValueError(f"ranges needs one (lo, hi) pair for each of the {numModes} biased modes, e.g. "
                         f"[(-3, 3)] for one mode; got {ranges!r}")
    ranges = [tuple(float(x) for x in pair) for pair in ranges]
    if len(ranges) != numModes or any(len(pair) != 2 for pair in ranges):
        raise ValueError(f"ranges needs one (lo, hi) pair for each of the {numModes} biased modes, got {ranges}")
    if any(not lo < hi for lo, hi in ranges):
        raise ValueError(f"every range needs lo < hi, got {ranges}")
    return [lo for lo, _ in ranges], [hi for _, hi in ranges]


def _perMode(value, numModes, name, kind):
    values = [kind(v) for v in np.atleast_1d(value)]
    if len(values) == 1 and np.ndim(value) == 0:
        values = values * numModes
    if len(values) != numModes:
        raise ValueError(f"{name} needs one value for each of the {numModes} biased modes, got {len(values)}")
    return values


def _checkSystem(system, cvModule):
    required, available = int(cvModule.num_atoms_required), system.getNumParticles()
    if available < required:
        raise ValueError(f"the CV module needs at least {required} particles, but the System has {available}")
    if _HILL_ID in globalParameterNames(system):  # also for a force renamed by XmlSerializer
        raise ValueError("the System already holds a LatentMetadynamics force; use one per System (its global "
                         "parameter names are fixed)")


def _emptyRecord():
    return {"step": [], "time_ps": [], "cv": [], "bias_kj_mol": [], "height_kj_mol": []}


def _checkedInt(value, name, minimum=1):
    if isinstance(value, bool) or int(value) != value or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return int(value)
