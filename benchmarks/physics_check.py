"""Physics of the fast metadynamics path against the plain one: the same bias, and the same statistics.

- **plain**: ``openmm.app.Metadynamics`` with one ``TorchForce`` per CV inside ``CustomCVForce`` objects
  (:func:`nct_openmm.forces.slowModeBiasVariables`), its bias a spline refitted over the whole grid at every hill;
- **fast**: :class:`nct_openmm.metadynamics.LatentMetadynamics` (CVs and bias in one ``TorchForce``, a Hermite grid
  updated near each hill inside the Context), alone and with the bias applied every 8th step
  (:class:`nct_openmm.integrators.MTSLangevinMiddleIntegrator`, the lever behind the speed goals).

Alanine dipeptide, OBC2 implicit solvent, 300 K, Langevin 1/ps, 2 fs steps, Reference platform.

1. **Same bias.** The fast path deposits hills on the two slowest NCT modes of the shipped model; the same hills are
   added to ``app.Metadynamics`` on a grid of the same nodes. At frames of the run, the total potential energy and
   the forces of the two systems are compared with each other and with the exact sum of Gaussians over the CVs
   (float64, forces by autograd). Relative errors: ``|ΔE| / |E|`` and ``max_atoms |ΔF| / max_atoms |F|``; the bias
   alone in kJ/mol. Done at two grid spacings: what remains is each grid's interpolation error, and it shrinks with
   the spacing.
2. **Same statistics.** Well-tempered metadynamics on ``(sin Φ, cos Φ)`` (a smooth, non-periodic CV pair that
   drives Φ transitions; the shipped model's modes do not separate the Φ basins), every variant with the same seeds
   and length. Per run: committed Φ transitions between the basin cores
   (:func:`nct_openmm.analysis.dihedrals.count_transitions`) and the basin free-energy difference
   ``ΔF = F(Φ > 0 core) − F(Φ < 0 core)`` from the final bias, ``F = −γ/(γ − 1) V`` along the circle. Mean ± standard
   error over seeds, and ``z`` = (variant − plain) / combined standard error. ``--variants fast-mts2 fast-mts4``
   adds the fast path with the bias every 2nd / 4th step, to see how an MTS error grows with the stride (hills and
   frames every 0.496 ps instead of 0.5 at strides 4 and 8, a whole number of outer steps).

Usage::

    python benchmarks/physics_check.py                 # about 20 min on this 2-core CPU (4 seeds)
    python benchmarks/physics_check.py --quick --json out.json
    python benchmarks/physics_check.py --seeds 8 --variants fast-mts2 fast-mts4 fast-mts8   # error vs MTS stride
"""
import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np
import openmm
import torch
from openmm import app, unit
from scipy.interpolate import RegularGridInterpolator

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)

from nct_openmm.analysis.dihedrals import LOWER_CORE, UPPER_CORE, count_transitions  # noqa: E402
from nct_openmm.export import slow_mode_module  # noqa: E402
from nct_openmm.forces import slowModeBiasVariables  # noqa: E402
from nct_openmm.integrators import mtsLangevinIntegrator  # noqa: E402
from nct_openmm.metadynamics import LatentMetadynamics  # noqa: E402
from nct_openmm.slowmodes import SlowModeModel  # noqa: E402
from nct_openmm.systems import builtinSystem, getPlatform  # noqa: E402

TEMPERATURE = 300.0
STEP_PS = 0.002
PHI_ATOMS = (4, 6, 8, 14)  # C, N, CA, C of ACE-ALA-NME
MODEL = os.path.join(REPOSITORY, "models", "alanine_dipeptide.pt")
# Same-bias settings: the NCT modes, hills every 50 steps, larger than in production so that 100 of them make a
# bias of tens of kJ/mol; a range wide enough that the frames stay inside the grid (outside it both paths continue
# the bias flat, by design, and neither equals the Gaussian sum there).
MODE_RANGE, MODE_WIDTH, MODE_HEIGHT, MODE_FREQUENCY = (-6.0, 6.0), 0.3, 2.0, 50
# Both paths on the same grid: LatentMetadynamics' default spacing (a third of a hill width), then half of it.
MODE_NODES = (121, 241)
# Statistics settings: (sin Φ, cos Φ), the hill schedule of nct_openmm.simulate.DihedralMetadynamics.
RING_RANGE, RING_WIDTH, RING_HEIGHT, RING_FREQUENCY, RING_NODES, BIAS_FACTOR = (-1.3, 1.3), 0.15, 1.2, 250, 66, 6.0
FRAME_STEPS = 250
STRIDES = {"plain": 1, "fast": 1, "fast-mts2": 2, "fast-mts4": 4, "fast-mts8": 8}
DEFAULT_VARIANTS = ("plain", "fast", "fast-mts8")


class PhiRing(torch.nn.Module):
    """``(sin Φ, cos Φ)`` of the backbone dihedral Φ, in the CV-module contract (``forward(positions, boxvectors)``,
    ``num_modes``, ``num_atoms_required``). Sine and cosine come from the two dot products whose ``atan2`` is Φ,
    so there is no branch cut."""

    def __init__(self, atoms=PHI_ATOMS):
        super().__init__()
        self.register_buffer("atoms", torch.tensor(atoms, dtype=torch.long))
        self.num_modes = 2
        self.num_atoms_required = max(atoms) + 1

    def forward(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = positions[self.atoms].to(torch.float64)
        b1, b2, b3 = x[1] - x[0], x[2] - x[1], x[3] - x[2]
        n1, n2 = torch.linalg.cross(b1, b2), torch.linalg.cross(b2, b3)
        y = torch.linalg.norm(b2) * torch.dot(b1, n2)
        c = torch.dot(n1, n2)
        r = torch.sqrt(y * y + c * c)
        return torch.stack([y / r, c / r]).to(positions.dtype)


def main(argv=None):
    options = _parseArguments(argv)
    if options.quick:
        options.hills, options.frames, options.seeds, options.ps = 6, 3, 1, 2.0
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = {"settings": {"hills": options.hills, "frames": options.frames, "seeds": options.seeds,
                           "ps_per_run": options.ps, "platform": "Reference"}}
    result["same_bias"] = {str(nodes): measureSameBias(options, nodes) for nodes in MODE_NODES}
    _write(result, options.json)
    result["statistics"] = measureStatistics(options)
    result["seconds"] = time.perf_counter() - started
    _write(result, options.json)
    printReport(result)
    return result


def _parseArguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test: few hills, frames, one short run")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--hills", type=int, default=100, help="hills deposited for the same-bias check")
    parser.add_argument("--frames", type=int, default=10, help="frames compared in the same-bias check")
    parser.add_argument("--seeds", type=int, default=4, help="runs per variant for the statistics (default 4)")
    parser.add_argument("--ps", type=float, default=250.0, help="length of each run in ps (default 250)")
    parser.add_argument("--variants", nargs="+", choices=list(STRIDES), default=list(DEFAULT_VARIANTS),
                        help="variants of the statistics (plain is always added: z is against it; default: "
                             f"{' '.join(DEFAULT_VARIANTS)}; fast-mtsN applies the bias every N-th step)")
    options = parser.parse_args(argv)
    options.variants = ["plain"] + [name for name in options.variants if name != "plain"]
    return options


def _write(result, path):
    if path:
        with open(path, "w") as file:
            json.dump(result, file, indent=2)


# ---------------------------------------------------------------------------------------------------------------
# 1. Same bias
# ---------------------------------------------------------------------------------------------------------------

def measureSameBias(options, nodes):
    """Energies and forces of the fast and the plain path with the same hills on grids of ``nodes`` per mode, and of
    the exact Gaussian sum."""
    molecule = builtinSystem("ala2-implicit")
    module = slow_mode_module(SlowModeModel.load(MODEL), 2, torch.float64)
    platform = getPlatform("Reference")
    fastSystem, plainSystem = (openmm.XmlSerializer.clone(molecule.system) for _ in range(2))
    bare = openmm.Context(openmm.XmlSerializer.clone(molecule.system), openmm.VerletIntegrator(0.001), platform)
    fast = LatentMetadynamics(fastSystem, module, [MODE_RANGE] * 2, MODE_WIDTH, TEMPERATURE, BIAS_FACTOR,
                              MODE_HEIGHT, MODE_FREQUENCY, gridWidth=nodes)
    integrator = _langevin(fastSystem)
    integrator.setRandomNumberSeed(1)
    simulation = app.Simulation(molecule.topology, fastSystem, integrator, platform)
    simulation.context.setPositions(molecule.positions)
    simulation.minimizeEnergy(maxIterations=200)
    simulation.context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 1)
    # Frames halfway between depositions: at a deposition the system sits on the newest hill's peak, where every
    # interpolant of the grid is at its worst.
    fast.step(simulation, options.hills * MODE_FREQUENCY + MODE_FREQUENCY // 2)
    frames = _framesOf(fast, simulation, options.frames, MODE_FREQUENCY)
    centres, heights = fast.getHills()
    heights = heights.value_in_unit(unit.kilojoule_per_mole)

    variables = slowModeBiasVariables(module, [0, 1], [MODE_RANGE] * 2, MODE_WIDTH, padding=0.0,
                                      gridWidth=nodes)
    plain = app.Metadynamics(plainSystem, variables, TEMPERATURE * unit.kelvin, BIAS_FACTOR,
                             MODE_HEIGHT * unit.kilojoule_per_mole, MODE_FREQUENCY)
    plainContext = openmm.Context(plainSystem, openmm.VerletIntegrator(0.001), platform)
    for centre, height in zip(centres, heights):
        plain._addGaussian(list(centre), height * unit.kilojoule_per_mole, plainContext)

    rows = []
    for positions in frames:
        fastE, fastF = _energyAndForces(simulation.context, positions)
        plainE, plainF = _energyAndForces(plainContext, positions)
        bareE, bareF = _energyAndForces(bare, positions)
        biasE, biasF = _exactBias(module, positions, centres, heights, MODE_WIDTH)
        exactE, exactF = bareE + biasE, bareF + biasF
        rows.append({"bias_kj_mol": biasE, "energy_kj_mol": exactE, "cv": module(torch.as_tensor(positions)).tolist(),
                     "fast_vs_plain": _relative(fastE, fastF, plainE, plainF),
                     "fast_vs_exact": _relative(fastE, fastF, exactE, exactF),
                     "plain_vs_exact": _relative(plainE, plainF, exactE, exactF),
                     "bias_error_fast_kj_mol": abs(fastE - exactE), "bias_error_plain_kj_mol": abs(plainE - exactE)})
    inside = all(MODE_RANGE[0] < value < MODE_RANGE[1] for row in rows for value in row["cv"])
    return {"nodes_per_mode": nodes, "spacing_per_width": (MODE_RANGE[1] - MODE_RANGE[0]) / (nodes - 1) / MODE_WIDTH,
            "hills": len(heights), "max_height_kj_mol": float(max(heights)), "frames": rows, "inside_grid": inside,
            "summary": {key: {kind: max(row[key][kind] for row in rows) for kind in ("energy", "forces")}
                        for key in ("fast_vs_plain", "fast_vs_exact", "plain_vs_exact")}}


def _langevin(system, stride=1, biasGroup=None):
    if stride == 1:
        return openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1 / unit.picosecond,
                                               STEP_PS * unit.picoseconds)
    return mtsLangevinIntegrator(system, biasGroup, stride, TEMPERATURE * unit.kelvin, 1 / unit.picosecond,
                                 STEP_PS * unit.picoseconds)


def _framesOf(meta, simulation, count, steps):
    frames = []
    for _ in range(count):
        meta.step(simulation, steps)
        frames.append(simulation.context.getState(getPositions=True).getPositions(asNumpy=True)
                      .value_in_unit(unit.nanometer))
    return frames


def _energyAndForces(context, positions):
    context.setPositions(positions)
    state = context.getState(getEnergy=True, getForces=True)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole),
            state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer))


def _exactBias(module, positions, centres, heights, width):
    """``Σ h exp(−|s − c|² / 2σ²)`` at the CVs of ``positions`` and its forces, float64."""
    x = torch.tensor(np.asarray(positions), dtype=torch.float64, requires_grad=True)
    s = module(x)
    d2 = ((s[None, :] - torch.as_tensor(centres)) ** 2).sum(-1)
    energy = (torch.as_tensor(heights) * torch.exp(-0.5 * d2 / width ** 2)).sum()
    gradient, = torch.autograd.grad(energy, x)
    return float(energy.detach()), -gradient.numpy()


def _relative(energy, forces, energyReference, forcesReference):
    return {"energy": abs(energy - energyReference) / abs(energyReference),
            "forces": float(np.linalg.norm(forces - forcesReference, axis=1).max()
                            / np.linalg.norm(forcesReference, axis=1).max())}


# ---------------------------------------------------------------------------------------------------------------
# 2. Same statistics
# ---------------------------------------------------------------------------------------------------------------

def measureStatistics(options):
    """Φ transitions and basin ΔF per variant and seed, and their comparison with the plain path."""
    molecule = builtinSystem("ala2-implicit")
    start = _minimized(molecule)
    runs = {name: [runRing(molecule, start, name, seed, options.ps) for seed in range(1, options.seeds + 1)]
            for name in options.variants}
    summary = {name: {key: _meanAndError([run[key] for run in rows]) for key in ("transitions", "delta_f_kj_mol")}
               for name, rows in runs.items()}
    for name, row in summary.items():
        for key, value in row.items():
            value["z_vs_plain"] = _z(value, summary["plain"][key])
    return {"runs": runs, "summary": summary}


def _minimized(molecule):
    context = openmm.Context(openmm.XmlSerializer.clone(molecule.system), openmm.VerletIntegrator(0.001),
                             getPlatform("Reference"))
    context.setPositions(molecule.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    return context.getState(getPositions=True).getPositions(asNumpy=True)


def runRing(molecule, start, name, seed, ps):
    """One well-tempered run on (sin Φ, cos Φ): Φ every ``FRAME_STEPS`` inner steps, transitions, ΔF, speed."""
    system = openmm.XmlSerializer.clone(molecule.system)
    stride = STRIDES[name]
    module = torch.jit.script(PhiRing())
    if name == "plain":
        variables = slowModeBiasVariables(module, [0, 1], [RING_RANGE] * 2, RING_WIDTH, padding=0.0,
                                          gridWidth=RING_NODES)
        meta = app.Metadynamics(system, variables, TEMPERATURE * unit.kelvin, BIAS_FACTOR,
                                RING_HEIGHT * unit.kilojoule_per_mole, RING_FREQUENCY)
        integrator = _langevin(system)
    else:
        meta = LatentMetadynamics(system, module, [RING_RANGE] * 2, RING_WIDTH, TEMPERATURE, BIAS_FACTOR,
                                  RING_HEIGHT, RING_FREQUENCY // stride, gridWidth=RING_NODES)
        integrator = _langevin(system, stride, meta.forceGroup)
    integrator.setRandomNumberSeed(seed)
    simulation = app.Simulation(molecule.topology, system, integrator, getPlatform("Reference"))
    simulation.context.setPositions(start)
    simulation.context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, seed)
    phi = []
    began = time.perf_counter()
    for _ in range(int(round(ps / (FRAME_STEPS * STEP_PS)))):
        meta.step(simulation, FRAME_STEPS // stride)
        sine, cosine = module(torch.as_tensor(simulation.context.getState(getPositions=True)
                                              .getPositions(asNumpy=True).value_in_unit(unit.nanometer))).tolist()
        phi.append(math.atan2(sine, cosine))
    seconds = time.perf_counter() - began
    return {"seed": seed, "transitions": int(count_transitions(np.array(phi))),
            "delta_f_kj_mol": basinFreeEnergyDifference(_freeEnergyOnRing(meta)),
            "ns_per_day": ps * 1e-3 / (seconds / 86400.0)}


def _freeEnergyOnRing(meta):
    """``F(Φ)`` (kJ/mol) on a 1° grid of Φ, from the final bias of either metadynamics class."""
    phi = np.deg2rad(np.arange(-180.0, 180.0, 1.0))
    points = np.stack([np.sin(phi), np.cos(phi)], axis=1)
    if isinstance(meta, LatentMetadynamics):
        bias = meta.getBias(points)
        free = -BIAS_FACTOR / (BIAS_FACTOR - 1.0) * bias
    else:
        grid = np.linspace(*RING_RANGE, RING_NODES)
        # app.Metadynamics orders its axes the other way round: [second CV, first CV].
        table = meta.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole).T
        free = RegularGridInterpolator((grid, grid), table, method="cubic")(points)
    return phi, free


def basinFreeEnergyDifference(profile):
    """``F(upper core) − F(lower core)`` in kJ/mol from a Φ profile on a uniform grid."""
    phi, free = profile
    kT = (unit.MOLAR_GAS_CONSTANT_R * TEMPERATURE * unit.kelvin).value_in_unit(unit.kilojoule_per_mole)

    def basin(core):
        inside = (phi >= core[0]) & (phi <= core[1])
        values = -free[inside] / kT
        return -kT * (np.logaddexp.reduce(values))

    return float(basin(UPPER_CORE) - basin(LOWER_CORE))


def _meanAndError(values):
    values = np.asarray(values, dtype=float)
    error = values.std(ddof=1) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "standard_error": float(error), "values": values.tolist()}


def _z(value, plain):
    combined = math.hypot(value["standard_error"], plain["standard_error"])
    return (value["mean"] - plain["mean"]) / combined if combined > 0 else float("nan")


def _printSameBias(same):
    print(f"same bias, grid spacing {same['spacing_per_width']:.2f} hill widths ({same['nodes_per_mode']}² nodes): "
          f"{same['hills']} hills (largest {same['max_height_kj_mol']:.2f} kJ/mol) on the two slowest NCT modes, "
          f"{len(same['frames'])} frames (all inside the grid: {same['inside_grid']}); worst relative error of the "
          "total energy / forces:")
    for key, label in (("fast_vs_plain", "fast vs plain"), ("fast_vs_exact", "fast vs exact Gaussian sum"),
                       ("plain_vs_exact", "plain vs exact Gaussian sum")):
        row = same["summary"][key]
        print(f"  {label:>30}: energy {row['energy']:.1e}, forces {row['forces']:.1e}")
    print(f"  bias at the frames {min(r['bias_kj_mol'] for r in same['frames']):.1f}-"
          f"{max(r['bias_kj_mol'] for r in same['frames']):.1f} kJ/mol; largest energy error fast "
          f"{max(r['bias_error_fast_kj_mol'] for r in same['frames']):.1e}, plain "
          f"{max(r['bias_error_plain_kj_mol'] for r in same['frames']):.1e} kJ/mol")


def printReport(result):
    for same in result["same_bias"].values():
        _printSameBias(same)
    statistics = result["statistics"]["summary"]
    settings = result["settings"]
    print()
    print(f"statistics: (sin Φ, cos Φ) metadynamics, {settings['seeds']} seeds x {settings['ps_per_run']:g} ps per "
          "variant (mean ± standard error; z against plain)")
    print(f"{'variant':>10} {'transitions':>18} {'z':>6} {'ΔF kJ/mol':>18} {'z':>6} {'ns/day':>8}")
    for name, row in statistics.items():
        runs = result["statistics"]["runs"][name]
        speed = np.median([run["ns_per_day"] for run in runs])
        t, f = row["transitions"], row["delta_f_kj_mol"]
        print(f"{name:>10} {t['mean']:>9.1f} ± {t['standard_error']:<6.1f} {t['z_vs_plain']:>6.2f} "
              f"{f['mean']:>9.2f} ± {f['standard_error']:<6.2f} {f['z_vs_plain']:>6.2f} {speed:>8.0f}")


if __name__ == "__main__":
    main()
