"""Speed of biased MD: plain MD against two ways of running well-tempered metadynamics on learned slow modes.

Alanine dipeptide, 300 K, Langevin with 2 fs inner steps and bonds to hydrogen constrained; metadynamics on the
2 slowest modes of a flow-shaped CV model: a SlowModeModel with the reference architecture (8 RealNVP couplings,
2 hidden layers of 128, on the 10 heavy atoms, 24 internal coordinates). Without ``--model`` the flow is untrained:
it starts at the harmonic (PCA) limit of 20 ps of plain MD in vacuum and its couplings' output layers are drawn at
random, so that every coupling does real work; the arithmetic per evaluation is that of a trained model.

Variants, all on the same system and platform, built once and timed in turns inside one process:

- ``plain``: no bias;
- ``plain-mts``: no bias, integrated by the MTS integrator (:class:`nct_openmm.integrators.MTSLangevinMiddleIntegrator`,
  every force at every 2 fs step): the cost of that integrator alone, which bounds what the MTS variants can reach;
- ``naive``: ``openmm.app.Metadynamics`` with one ``TorchForce`` per mode (``slowModeBiasVariables``), i.e. two
  evaluations of the CV model per step plus a spline over the grid;
- ``nct``: ``LatentMetadynamics``: both modes and the grid bias in one ``TorchForce``;
- ``nct-mts4`` / ``nct-mts8``: the same force in its own group, applied every 4th / 8th inner step by
  ``MTSLangevinMiddleIntegrator`` (outer step 8 / 16 fs);
- ``nct-mts8-symmetric`` / ``student-mts8-symmetric`` (not run by default): the same with
  ``openmm.MTSLangevinIntegrator``, whose symmetric splitting evaluates the fast forces once more per outer step;
- ``nct-float64``: ``nct`` with the CV model exported in float64 instead of float32;
- ``student`` / ``student-mts8`` (and ``student-mts4`` / ``student-mts16``, not run by default; the latter needs
  ``--steps`` a multiple of 16):
  ``nct`` / ``nct-mts8`` with a small network distilled from the flow (:func:`nct_openmm.export.student_module`,
  2 hidden layers of 128) as the CV. Distilled here with few steps (``--student-steps``): its cost per evaluation
  does not depend on how well it is fitted;
- ``dstudent`` / ``dstudent-mts4`` / ``dstudent-mts8`` (not run by default): the same with a student that reads
  interatomic distances (``student_module(..., features="distances")``), so the CV needs no alignment;
- ``floor`` / ``floor-mts8`` (not run by default): a ``TorchForce`` whose model is one small sum of squares of the
  CV atoms' positions, every step / every 8th step: the cost of openmm-torch itself, a floor that no CV model
  evaluated through a ``TorchForce`` can beat.

Timing: every round runs each variant (in a rotating order) for ``--steps`` inner steps, repeated until it has
run for ``--min-seconds``; hills every ps in every variant. ns/day is the median over rounds; the ratio to plain
is the median of the per-round ratios, with their min–max spread, so that a load spike on a shared machine hits
one round of one variant rather than the whole comparison.

``--mts-accuracy`` adds a separate measurement of what applying the bias less often costs in accuracy: a bias is
grown once (stride 1) on alanine dipeptide in vacuum, then held fixed while runs of equal simulated length with the
bias applied every 1st, 2nd, 4th, 8th and 16th step sample it (two seeds each; the second stride-1 seed gives the
noise floor). Runs that blow up are reported as such.

Usage::

    python benchmarks/bias_overhead.py                     # ala2-implicit, Reference platform, under 5 min
    python benchmarks/bias_overhead.py --system ala2-explicit --platform CPU --steps 100 --rounds 3
    python benchmarks/bias_overhead.py --quick --json rows.json      # smoke test, under 30 s
    python benchmarks/bias_overhead.py --mts-accuracy --accuracy-json accuracy.json
"""
import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np
import openmm
import torch
from openmm import app, unit

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)

from nct_openmm.backend import createTorchForce  # noqa: E402
from nct_openmm.core import FlowConfig, model_from_data  # noqa: E402
from nct_openmm.data import thermal_energy  # noqa: E402
from nct_openmm.export import slow_mode_module, student_module  # noqa: E402
from nct_openmm.forces import slowModeBiasVariables  # noqa: E402
from nct_openmm.geometry import InternalFrame, spanning_tree  # noqa: E402
from nct_openmm.integrators import biasGroups, mtsLangevinIntegrator  # noqa: E402
from nct_openmm.metadynamics import LatentMetadynamics  # noqa: E402
from nct_openmm.slowmodes import SlowModeModel, average_structure  # noqa: E402
from nct_openmm.systems import builtinSystem, getPlatform, platformProperties  # noqa: E402

HEAVY_ATOMS = [1, 4, 5, 6, 8, 10, 14, 15, 16, 18]
TEMPERATURE = 300.0
STEP_PS = 0.002
FRICTION = 1.0  # 1/ps
MODES = 2
RANGE, WIDTH, BIAS_FACTOR, HEIGHT = (-4.0, 4.0), 0.3, 6.0, 1.0
HILL_PS = 1.0
VARIANTS = ("plain", "plain-mts", "naive", "nct", "nct-mts4", "nct-mts8", "nct-float64", "student", "student-mts8",
            "floor", "floor-mts8", "student-mts16", "nct-mts8-symmetric", "student-mts8-symmetric", "student-mts4",
            "dstudent", "dstudent-mts4", "dstudent-mts8")
DEFAULT_VARIANTS = VARIANTS[:9]
MTS_STRIDES = {"nct-mts4": 4, "nct-mts8": 8, "student-mts8": 8, "floor-mts8": 8, "student-mts16": 16,
               "nct-mts8-symmetric": 8, "student-mts8-symmetric": 8, "student-mts4": 4, "dstudent-mts4": 4,
               "dstudent-mts8": 8}
STUDENT_INPUTS = {"student": "internal", "dstudent": "distances"}  # student_module's features of each kind


def main(argv=None):
    options = _parseArguments(argv)
    if options.quick:
        options.steps, options.rounds, options.min_seconds, options.student_steps = 40, 2, 0.2, 20
        options.systems = options.systems or ["ala2-vacuum"]
        options.accuracy_build_ps, options.accuracy_ps = 1.0, 1.0
    options.systems = options.systems or ["ala2-implicit"]
    largest = max(MTS_STRIDES.get(name, 1) for name in options.variants)
    if options.steps % largest or options.steps < largest:
        raise SystemExit(f"--steps must be a positive multiple of {largest} (the largest MTS stride of the variants), "
                         f"got {options.steps}")
    with _torchThreads(options.torch_threads):
        model = loadModel(options.model)
        rows = []
        for platformName in options.platforms:
            for systemName in options.systems:
                rows += measureSystem(model, systemName, _platformFor(platformName, systemName), options)
        printTable(rows, options)
        if options.json:
            with open(options.json, "w") as file:
                json.dump(rows, file, indent=2)
        if options.mts_accuracy:
            accuracy = measureMtsAccuracy(model, options)
            printAccuracy(accuracy)
            if options.accuracy_json:
                with open(options.accuracy_json, "w") as file:
                    json.dump(accuracy, file, indent=2)
    return rows


def _parseArguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="ala2-vacuum (unless --system), 2 rounds of 40 steps: a smoke test")
    parser.add_argument("--json", metavar="PATH", help="write the rows {platform, system, variant, ns_per_day, "
                                                       "ratio_to_plain, ...} as a JSON list")
    parser.add_argument("--platform", dest="platforms", nargs="+", default=["auto"],
                        help="OpenMM platforms (Reference, CPU, CUDA, ...); 'auto' (default) is Reference for "
                             "vacuum/implicit and CPU for explicit water")
    parser.add_argument("--system", dest="systems", nargs="+",
                        choices=["ala2-implicit", "ala2-explicit", "ala2-vacuum"],
                        help="systems to measure (default ala2-implicit)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                        help="variants to measure (plain is always added)")
    parser.add_argument("--steps", type=int, default=504, help="inner 2-fs steps per timed chunk (default 504, "
                                                               "a multiple of 8)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of all variants (default 5)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="repeat a variant's chunk within a round until this long (default 1 s)")
    parser.add_argument("--model", metavar="PATH", help="a trained model file (default: an untrained flow of the "
                                                        "reference architecture)")
    parser.add_argument("--threads", type=int, default=1, help="CPU platform threads (default 1)")
    parser.add_argument("--torch-threads", type=int, default=1, help="libtorch intra-op threads (default 1)")
    parser.add_argument("--student-steps", type=int, default=300,
                        help="distillation steps of the student variants (default 300; speed only)")
    parser.add_argument("--cuda-graphs", action="store_true", help="capture the TorchForces in CUDA graphs (CUDA)")
    parser.add_argument("--mts-accuracy", action="store_true",
                        help="also measure the accuracy cost of MTS for a fixed bias (ala2-vacuum)")
    parser.add_argument("--accuracy-build-ps", type=float, default=20.0,
                        help="ps of metadynamics that grow the fixed bias (default 20)")
    parser.add_argument("--accuracy-ps", type=float, default=40.0,
                        help="ps of each fixed-bias sampling run (default 40)")
    parser.add_argument("--accuracy-json", metavar="PATH", help="write the MTS-accuracy results as JSON")
    parser.add_argument("--accuracy-cv", choices=("flow", "student"), default="flow",
                        help="CV of the MTS-accuracy runs: the flow, or a student distilled with default settings")
    return parser.parse_args(argv)


@contextlib.contextmanager
def _torchThreads(count):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _platformFor(name, systemName):
    if name == "auto":
        name = "CPU" if systemName == "ala2-explicit" else "Reference"
    return getPlatform(name)


# ---------------------------------------------------------------------------------------------------------------
# The CV model
# ---------------------------------------------------------------------------------------------------------------

def loadModel(path=None, seed=0):
    """A trained SlowModeModel from ``path``, or an untrained one of the reference architecture (see the module
    docstring)."""
    if path:
        return SlowModeModel.load(path)
    ala2 = builtinSystem("ala2-vacuum")
    positions = _plainFrames(ala2, frames=400, interval=0.05, seed=seed)[:, HEAVY_ATOMS]
    masses = np.array([ala2.system.getParticleMass(i).value_in_unit(unit.amu) for i in HEAVY_ATOMS])
    local = {atom: k for k, atom in enumerate(HEAVY_ATOMS)}
    bonds = [(local[a.index], local[b.index]) for a, b in ala2.topology.bonds()
             if a.index in local and b.index in local]
    reference = average_structure(positions, masses)
    frame = InternalFrame(HEAVY_ATOMS, torch.as_tensor(masses), torch.as_tensor(reference),
                          thermal_energy(TEMPERATURE), spanning_tree(len(HEAVY_ATOMS), bonds))
    with torch.no_grad():
        u = frame.internal(torch.as_tensor(positions, dtype=torch.float64)).float()
    flow = model_from_data(FlowConfig(dim=frame.dim, n_couplings=8, hidden=128, depth=2, seed=seed), u)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in flow.layers:
            if hasattr(layer, "net"):
                last = layer.net[-1]
                last.weight.copy_(0.05 * torch.randn(last.weight.shape, generator=generator))
                last.bias.copy_(0.05 * torch.randn(last.bias.shape, generator=generator))
    flow.fix_mode_signs(u)
    return SlowModeModel(frame, flow, {"temperature": TEMPERATURE,
                                       "note": "untrained benchmark model (random coupling outputs)"})


def _plainFrames(ala2, frames, interval, seed):
    """``frames`` positions (nm) of plain Langevin MD, ``interval`` ps apart, after a short minimisation."""
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, FRICTION / unit.picosecond,
                                                 STEP_PS * unit.picoseconds)
    integrator.setRandomNumberSeed(seed + 1)
    context = openmm.Context(openmm.XmlSerializer.clone(ala2.system), integrator, getPlatform("Reference"))
    context.setPositions(ala2.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)
    context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, seed + 1)
    integrator.step(500)
    stepsPerFrame = max(1, int(round(interval / STEP_PS)))
    out = []
    for _ in range(frames):
        integrator.step(stepsPerFrame)
        out.append(context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    return np.array(out)


# ---------------------------------------------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------------------------------------------

class Variant:
    """One simulation and how to advance it by a given simulated time."""

    def __init__(self, name, simulation, advance, stride):
        self.name, self.simulation, self.advance, self.stride = name, simulation, advance, stride

    def run(self, innerSteps):
        self.advance(innerSteps // self.stride)


def buildVariants(model, systemName, platform, options, names):
    """Every requested variant of ``systemName`` on ``platform``, equilibrated from the same positions."""
    molecule = builtinSystem(systemName)
    periodic = molecule.system.usesPeriodicBoundaryConditions()
    start = _minimizedPositions(molecule, platform, options)
    modules = {torch.float32: slow_mode_module(model, MODES, torch.float32)}
    cudaGraphs = options.cuda_graphs and platform.getName() == "CUDA"
    variants = []
    for name in names:
        system = openmm.XmlSerializer.clone(molecule.system)
        stride = MTS_STRIDES.get(name, 1)
        advance, biasGroup = None, None  # plain and plain-mts stay so
        if name.startswith("floor"):
            biasGroup = max(force.getForceGroup() for force in system.getForces()) + 1
            system.addForce(createTorchForce(FloorModel(HEAVY_ATOMS), periodic=periodic, cudaGraphs=cudaGraphs,
                                             forceGroup=biasGroup))
        elif name == "naive":
            variables = slowModeBiasVariables(modules[torch.float32], list(range(MODES)), [RANGE] * MODES,
                                              WIDTH, padding=0.0, gridWidth=_gridNodes(), periodic=periodic,
                                              cudaGraphs=cudaGraphs)
            advance = _BoundStepper(app.Metadynamics(system, variables, TEMPERATURE * unit.kelvin, BIAS_FACTOR,
                                                     HEIGHT * unit.kilojoule_per_mole, _hillFrequency(1)))
        elif name.startswith(("nct", "student", "dstudent")):
            dtype = torch.float64 if name == "nct-float64" else torch.float32
            key = name.split("-")[0] if "student" in name else dtype
            if key not in modules:
                modules[key] = (student_module(model, MODES, steps=options.student_steps, samples=8192,
                                               progress=False, features=STUDENT_INPUTS[key])[0]
                                if key in STUDENT_INPUTS else slow_mode_module(model, MODES, dtype))
            meta = LatentMetadynamics(system, modules[key], [RANGE] * MODES, WIDTH, TEMPERATURE * unit.kelvin,
                                      BIAS_FACTOR, HEIGHT * unit.kilojoule_per_mole, _hillFrequency(stride),
                                      gridWidth=_gridNodes(), periodic=periodic, cudaGraphs=cudaGraphs)
            advance, biasGroup = _BoundStepper(meta), meta.forceGroup
        if name == "plain-mts":
            integrator = _integrator(system, 1, None, mts=True)
        else:
            integrator = _integrator(system, stride, None if stride == 1 else biasGroup,
                                     symmetric=name.endswith("-symmetric"))
        simulation = app.Simulation(molecule.topology, system, integrator, platform, _properties(platform, options))
        simulation.context.setPositions(start)
        simulation.context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, 1)
        if advance is None:
            advance = simulation.step
        else:
            advance.simulation = simulation
        variants.append(Variant(name, simulation, advance, stride))
    return variants


class FloorModel(torch.nn.Module):
    """The cheapest model worth a TorchForce: a weak harmonic tether of the CV atoms to the origin."""

    def __init__(self, atoms: List[int]):
        super().__init__()
        self.register_buffer("atoms", torch.tensor(atoms, dtype=torch.long))

    def forward(self, positions: torch.Tensor, boxvectors: Optional[torch.Tensor] = None) -> torch.Tensor:
        return 1e-3 * (positions[self.atoms] ** 2).sum()


class _BoundStepper:
    """``meta.step(simulation, n)`` as a one-argument callable; the simulation is bound once it exists (it needs
    the System the metadynamics force was added to)."""

    def __init__(self, meta):
        self.meta, self.simulation = meta, None

    def __call__(self, steps):
        self.meta.step(self.simulation, steps)


def _gridNodes():
    return int(math.ceil(3 * (RANGE[1] - RANGE[0]) / WIDTH)) + 1


def _hillFrequency(stride):
    """Steps (outer steps under MTS) between hills: one hill per ``HILL_PS`` of simulated time."""
    return max(1, int(round(HILL_PS / (STEP_PS * stride))))


def _integrator(system, stride, biasGroup, mts=False, symmetric=False):
    """LangevinMiddleIntegrator at 2 fs; with a bias group (or ``mts``), MTSLangevinMiddleIntegrator applying the
    bias group once and every other group ``stride`` times per outer step (``symmetric``: OpenMM's
    MTSLangevinIntegrator with the same groups)."""
    temperature, friction = TEMPERATURE * unit.kelvin, FRICTION / unit.picosecond
    if biasGroup is None and not mts:
        return openmm.LangevinMiddleIntegrator(temperature, friction, STEP_PS * unit.picoseconds)
    if symmetric:
        return openmm.MTSLangevinIntegrator(temperature, friction, stride * STEP_PS * unit.picoseconds,
                                            biasGroups(system, biasGroup, stride))
    return mtsLangevinIntegrator(system, biasGroup, stride, temperature, friction, STEP_PS * unit.picoseconds)


def _properties(platform, options):
    return platformProperties(platform, threads=options.threads if platform.getName() == "CPU" else None)


def _minimizedPositions(molecule, platform, options):
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, FRICTION / unit.picosecond,
                                                 STEP_PS * unit.picoseconds)
    context = openmm.Context(openmm.XmlSerializer.clone(molecule.system), integrator, platform,
                             _properties(platform, options))
    context.setPositions(molecule.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 100)
    return context.getState(getPositions=True).getPositions()


def measureSystem(model, systemName, platform, options):
    """Rows ``{platform, system, variant, ns_per_day, ratio_to_plain, ...}`` for one system on one platform."""
    names = ["plain"] + [name for name in options.variants if name != "plain"]
    variants = buildVariants(model, systemName, platform, options, names)
    failures = {}
    for variant in list(variants):
        # TorchScript profiles the first calls, then optimises.
        _runOrDrop(variant, variants, failures, lambda v: v.run(8 * max(1, options.steps // 40)))
    timings = {variant.name: [] for variant in variants}
    for round_ in range(options.rounds):
        shift = round_ % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            _runOrDrop(variant, variants, failures, lambda v: timings[v.name].append(
                _nsPerDay(v, options.steps, options.min_seconds)))
    rounds = min(len(values) for name, values in timings.items() if name not in failures)
    ratios = {name: [v / p for v, p in zip(values[:rounds], timings["plain"][:rounds])]
              for name, values in timings.items() if name not in failures}
    rows = [{"platform": platform.getName(), "system": systemName, "variant": name, "ns_per_day": None,
             "ratio_to_plain": None, "error": message} for name, message in failures.items()]
    plainMs = _msPer2fs(statistics.median(timings["plain"]))
    for name in [name for name in names if name not in failures]:
        nsPerDay = statistics.median(timings[name])
        rows.append({"platform": platform.getName(), "system": systemName, "variant": name,
                     "ns_per_day": nsPerDay, "ms_per_2fs": _msPer2fs(nsPerDay),
                     "bias_ms_per_2fs": _msPer2fs(nsPerDay) - plainMs,
                     "ratio_to_plain": statistics.median(ratios[name]),
                     "ratio_min": min(ratios[name]), "ratio_max": max(ratios[name]),
                     "rounds": options.rounds, "steps_per_chunk": options.steps,
                     "bias_stride": MTS_STRIDES.get(name, 1), "cv_dtype": _dtypeName(name)})
    return rows


def _runOrDrop(variant, variants, failures, action):
    """Run ``action(variant)``; if it raises, drop the variant from ``variants`` and keep the first line of the error
    (a variant that does not work on this platform must not end the measurement of the others)."""
    if variant not in variants:
        return
    try:
        action(variant)
    except Exception as error:  # reported in the table and the JSON, not hidden
        lines = str(error).strip().splitlines() or [""]
        failures[variant.name] = f"{type(error).__name__}: {lines[0]}"
        variants.remove(variant)


def _msPer2fs(nsPerDay):
    """Wall-clock ms per 2 fs of simulated time."""
    return 86400.0 * 1e3 * STEP_PS * 1e-3 / nsPerDay


def _dtypeName(variant):
    if variant.startswith(("plain", "floor")):
        return None
    return "float64" if variant == "nct-float64" else "float32"


def _nsPerDay(variant, innerSteps, minSeconds):
    """Simulated ns per wall-clock day of chunks of ``innerSteps`` inner steps, run for at least ``minSeconds``."""
    chunks, start = 0, time.perf_counter()
    while True:
        variant.run(innerSteps)
        chunks += 1
        elapsed = time.perf_counter() - start
        if elapsed >= minSeconds:
            break
    return chunks * innerSteps * STEP_PS * 1e-3 / elapsed * 86400.0


def printTable(rows, options):
    print(f"ns/day of biased MD against plain MD (median of {options.rounds} interleaved rounds; ratio: median of "
          "per-round ratios [min-max])")
    width = max([len("variant")] + [len(row["variant"]) for row in rows])
    print(f"{'platform':>9} {'system':>14} {'variant':>{width}} {'ns/day':>9} {'% of plain':>11} {'spread':>15} "
          f"{'ms/2fs':>8} {'bias ms/2fs':>12}")
    for row in rows:
        if row["ns_per_day"] is None:
            print(f"{row['platform']:>9} {row['system']:>14} {row['variant']:>{width}}   failed: {row['error']}")
            continue
        spread = f"[{100 * row['ratio_min']:.1f}-{100 * row['ratio_max']:.1f}]"
        print(f"{row['platform']:>9} {row['system']:>14} {row['variant']:>{width}} {row['ns_per_day']:>9.2f} "
              f"{100 * row['ratio_to_plain']:>10.1f}% {spread:>15} {row['ms_per_2fs']:>8.3f} "
              f"{row['bias_ms_per_2fs']:>12.3f}")


# ---------------------------------------------------------------------------------------------------------------
# Accuracy of MTS for the bias
# ---------------------------------------------------------------------------------------------------------------

ACCURACY_FREQUENCY_PS = 0.2
ACCURACY_HEIGHT = 2.0
SAMPLE_PS = 0.1
#: (label, stride, seed); the first is the reference, the second its noise floor.
ACCURACY_RUNS = (("stride 1", 1, 1), ("stride 1, seed 2", 1, 2), ("stride 2", 2, 1), ("stride 2, seed 2", 2, 2),
                 ("stride 4", 4, 1), ("stride 4, seed 2", 4, 2), ("stride 8", 8, 1), ("stride 8, seed 2", 8, 2),
                 ("stride 16", 16, 1), ("stride 16, seed 2", 16, 2))
#: A mode beyond this many standard deviations (or a non-finite one) ends a run as blown up: the molecule is torn.
BLOWN_UP = 50.0


def measureMtsAccuracy(model, options):
    """Fixed-bias runs of equal simulated length with the bias applied every 1st, 2nd, 4th, 8th, 16th step (ala2
    vacuum), two seeds each (:data:`ACCURACY_RUNS`).

    Returns a dict with the settings and one entry per run: the kinetic temperature, ⟨V⟩ with a block error, the
    mode means, the RMS
    difference of the free-energy profile along each mode from the first stride-1 run, whether and when the run
    blew up, and its wall time.
    """
    molecule = builtinSystem("ala2-vacuum")
    platformName = options.platforms[0]
    platform = _platformFor(platformName, "ala2-vacuum")
    if options.accuracy_cv == "student":
        module, report = student_module(model, MODES, progress=False)
    else:
        module, report = slow_mode_module(model, MODES, torch.float32), None
    start = _minimizedPositions(molecule, platform, options)
    runs = []
    with tempfile.TemporaryDirectory(prefix="nct-mts-accuracy-") as folder:
        biasPath = os.path.join(folder, "bias.npz")
        buildStart = time.perf_counter()
        meta, simulation = _fixedBiasRun(molecule, module, platform, options, start, stride=1, seed=11,
                                         frequencyPs=ACCURACY_FREQUENCY_PS)
        meta.step(simulation, _innerSteps(options.accuracy_build_ps))
        meta.saveBias(biasPath)
        hills = len(meta.getHills()[1])
        maxBias = float(np.max(meta.getBias(_gridPoints(meta))))
        buildSeconds = time.perf_counter() - buildStart
        for label, stride, seed in ACCURACY_RUNS:
            meta, simulation = _fixedBiasRun(molecule, module, platform, options, start, stride, seed,
                                             frequencyPs=None, biasPath=biasPath)
            runStart = time.perf_counter()
            samples = _sampleFixedBias(meta, simulation, stride, options.accuracy_ps)
            runs.append(dict(label=label, stride=stride, seed=seed, seconds=time.perf_counter() - runStart,
                             samples=samples))
    reference = runs[0]["samples"]
    results = []
    for run in runs:
        s, bias, finite = run["samples"]["s"], run["samples"]["bias"], run["samples"]["finite"]
        meanBias, errorBias = _blockMean(bias)
        results.append({"label": run["label"], "stride": run["stride"], "seed": run["seed"],
                        "outer_step_fs": 2 * run["stride"], "samples": int(len(bias)), "finite": bool(finite),
                        "failed_at_ps": run["samples"]["failed_at_ps"],
                        "mean_bias_kj_mol": meanBias, "mean_bias_error": errorBias,
                        "mean_s0": _mean(s[:, 0]), "mean_s1": _mean(s[:, 1]),
                        "kinetic_temperature_k": _mean(run["samples"]["temperature"]),
                        "profile_rms_vs_stride1_kj_mol": [_profileRms(reference, run["samples"], k)
                                                          for k in range(MODES)],
                        "seconds": run["seconds"]})
    return {"system": "ala2-vacuum", "platform": platform.getName(), "temperature_k": TEMPERATURE,
            "bias_build_ps": options.accuracy_build_ps, "bias_hills": hills, "bias_max_kj_mol": maxBias,
            "bias_build_seconds": buildSeconds, "sample_ps": options.accuracy_ps, "sample_interval_ps": SAMPLE_PS,
            "friction_per_ps": FRICTION, "cv": options.accuracy_cv, "student_report": report, "runs": results}


def _innerSteps(ps):
    return max(16, int(round(ps / STEP_PS / 16)) * 16)


def _gridPoints(meta):
    axes = meta.getGridPoints()
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(axes))


def _fixedBiasRun(molecule, module, platform, options, start, stride, seed, frequencyPs, biasPath=None):
    """A LatentMetadynamics simulation; with ``biasPath`` its bias is loaded and never grows (sample with
    ``simulation.step``). The integrator is MTSLangevinMiddleIntegrator for every stride, so only the stride differs."""
    system = openmm.XmlSerializer.clone(molecule.system)
    frequency = 10 ** 9 if frequencyPs is None else max(1, int(round(frequencyPs / STEP_PS)))
    meta = LatentMetadynamics(system, module, [RANGE] * MODES, WIDTH, TEMPERATURE * unit.kelvin, BIAS_FACTOR,
                              ACCURACY_HEIGHT * unit.kilojoule_per_mole, frequency, gridWidth=_gridNodes())
    if biasPath is not None:
        meta.loadBias(biasPath)
    integrator = mtsLangevinIntegrator(system, meta.forceGroup, stride, TEMPERATURE * unit.kelvin,
                                       FRICTION / unit.picosecond, STEP_PS * unit.picoseconds)
    integrator.setRandomNumberSeed(seed)
    simulation = app.Simulation(molecule.topology, system, integrator, platform, _properties(platform, options))
    simulation.context.setPositions(start)
    simulation.context.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, seed)
    return meta, simulation


def _sampleFixedBias(meta, simulation, stride, ps):
    """Modes and bias every SAMPLE_PS over ``ps`` (after discarding the first tenth as equilibration)."""
    outerPerSample = max(1, int(round(SAMPLE_PS / (STEP_PS * stride))))
    count = max(10, int(round(ps / SAMPLE_PS)))
    discard = count // 10
    values, kinetic = [], []
    failedAtPs = None
    for index in range(count + discard):
        try:
            simulation.step(outerPerSample)
            s = meta.getCollectiveVariables(simulation)
            energy = simulation.context.getState(getEnergy=True).getKineticEnergy()
        except openmm.OpenMMException:
            s = np.full(MODES, np.nan)  # NaN positions make the CV model's alignment fail
        if not np.all(np.isfinite(s)) or np.max(np.abs(s)) > BLOWN_UP:
            failedAtPs = (index + 1) * outerPerSample * stride * STEP_PS
            break
        if index >= discard:
            values.append(s)
            kinetic.append(energy.value_in_unit(unit.kilojoule_per_mole))
    s = np.array(values).reshape(-1, MODES)
    bias = np.asarray(meta.getBias(s)).reshape(-1) if len(s) else np.zeros(0)
    temperature = 2.0 * np.array(kinetic) / (_degreesOfFreedom(simulation.system) * thermal_energy(1.0))
    return {"s": s, "bias": bias, "temperature": temperature, "finite": failedAtPs is None,
            "failed_at_ps": failedAtPs}


def _degreesOfFreedom(system):
    removesMotion = any(isinstance(force, openmm.CMMotionRemover) for force in system.getForces())
    return 3 * system.getNumParticles() - system.getNumConstraints() - (3 if removesMotion else 0)


def _mean(values):
    return float(np.mean(values)) if len(values) else float("nan")


def _blockMean(values, blocks=8):
    values = np.asarray(values, dtype=float)
    if len(values) < 2 * blocks:
        return (float(np.mean(values)) if len(values) else float("nan")), float("nan")
    means = [block.mean() for block in np.array_split(values, blocks)]
    return float(np.mean(values)), float(np.std(means, ddof=1) / math.sqrt(blocks))


def _profileRms(reference, other, mode, bins=10, minimumCount=10):
    """RMS difference (kJ/mol) between two runs' unbiased free-energy profiles along ``mode``,
    F(s) = −kT ln h(s) − ⟨V⟩(s), on the bins (2nd–98th percentile of the reference) populated in both, after
    removing the population-weighted mean difference; NaN when fewer than 3 bins qualify."""
    kT = thermal_energy(TEMPERATURE)
    edges = np.linspace(*np.percentile(reference["s"][:, mode], [2, 98]), bins + 1)

    def profile(samples):
        counts, _ = np.histogram(samples["s"][:, mode], bins=edges)
        biasSum, _ = np.histogram(samples["s"][:, mode], bins=edges, weights=samples["bias"])
        with np.errstate(divide="ignore", invalid="ignore"):
            return counts, -kT * np.log(counts) - biasSum / counts

    countsA, fA = profile(reference)
    countsB, fB = profile(other)
    both = (countsA >= minimumCount) & (countsB >= minimumCount)
    if both.sum() < 3:
        return float("nan")
    weights = (countsA + countsB)[both]
    difference = (fA - fB)[both]
    difference = difference - np.average(difference, weights=weights)
    return float(np.sqrt(np.average(difference ** 2, weights=weights)))


def printAccuracy(accuracy):
    print()
    print(f"MTS accuracy, fixed bias ({accuracy['bias_hills']} hills from {accuracy['bias_build_ps']:g} ps of "
          f"metadynamics, max {accuracy['bias_max_kj_mol']:.1f} kJ/mol), CV: {accuracy['cv']}, {accuracy['system']}, "
          f"{accuracy['platform']}, {accuracy['sample_ps']:g} ps per run, friction {accuracy['friction_per_ps']:g}/ps")
    print(f"{'run':>22} {'outer fs':>8} {'T_kin K':>8} {'<V> kJ/mol':>16} {'<s0>':>7} {'<s1>':>7} "
          f"{'F(s0), F(s1) rms':>18} {'wall s':>7}")
    for run in accuracy["runs"]:
        bias = f"{run['mean_bias_kj_mol']:.2f} ± {run['mean_bias_error']:.2f}"
        first, second = run["profile_rms_vs_stride1_kj_mol"]
        rms = "reference" if run is accuracy["runs"][0] else f"{first:.2f}, {second:.2f}"
        flag = "" if run["finite"] else f" (blew up after {run['failed_at_ps']:.1f} ps)"
        print(f"{run['label']:>22} {run['outer_step_fs']:>8} {run['kinetic_temperature_k']:>8.0f} {bias:>16} "
              f"{run['mean_s0']:>7.2f} "
              f"{run['mean_s1']:>7.2f} {rms:>18} {run['seconds']:>7.1f}{flag}")


if __name__ == "__main__":
    main()
