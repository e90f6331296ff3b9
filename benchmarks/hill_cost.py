"""Cost of one hill deposition: LatentMetadynamics against openmm.app.Metadynamics.

Both designs bias the same K modes of alanine dipeptide (vacuum, 22 atoms) on the same grid: by default a cheap
stand-in CV, with ``--model`` the K slowest modes of a trained flow (exported as ``nct export`` does). The cost of a
hill is the wall time it adds to a run: the deposition code of each design (read the CVs, compute the
well-tempered height, hand the hill to the Context) followed by one evaluation of the bias force group, which
forces the Context to absorb the hill, minus that evaluation alone. app.Metadynamics absorbs a hill by refitting its
spline over the whole grid (``updateParametersInContext``); LatentMetadynamics adds it inside the model, in a window
of a few hill widths around its centre.

Usage::

    python benchmarks/hill_cost.py              # grids 90, 200 (K=1); 90², 200² (K=2); 50³ (K=3); under 5 min
    python benchmarks/hill_cost.py --quick      # two small grids, a few hills, under 30 s
    python benchmarks/hill_cost.py --json out.json
    python benchmarks/hill_cost.py --model models/alanine_dipeptide.pt
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import openmm
import torch
from openmm import app, unit

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)
sys.path.insert(0, os.path.join(REPOSITORY, "tests"))

from cv_standin import StandInModes  # noqa: E402
from nct_openmm.export import slow_mode_module  # noqa: E402
from nct_openmm.forces import SlowModeCV  # noqa: E402
from nct_openmm.metadynamics import LatentMetadynamics  # noqa: E402
from nct_openmm.slowmodes import SlowModeModel  # noqa: E402
from nct_openmm.systems import builtinSystem  # noqa: E402

CASES = [(1, 90), (1, 200), (2, 90), (2, 200), (3, 50)]
QUICK_CASES = [(1, 90), (2, 90)]
HEAVY_ATOMS = [1, 4, 5, 6, 8, 10, 14, 15, 16, 18]
RANGE, WIDTH, TEMPERATURE, BIAS_FACTOR, HEIGHT = (-3.0, 3.0), 0.3, 300.0, 5.0, 1.0


def main(argv=None):
    options = _parseArguments(argv)
    torch.set_num_threads(1)
    cases = QUICK_CASES if options.quick else CASES
    hills = options.hills or (4 if options.quick else 15)
    model = SlowModeModel.load(options.model) if options.model else None
    rows = [measureCase(numModes, gridWidth, hills, options.platform, _cvModule(model, numModes))
            for numModes, gridWidth in cases]
    printTable(rows)
    if options.json:
        with open(options.json, "w") as file:
            json.dump({"platform": options.platform, "hills_per_case": hills, "cv": options.model or "stand-in",
                       "cases": rows}, file, indent=2)


def _cvModule(model, numModes):
    return StandInModes(HEAVY_ATOMS, num_modes=numModes) if model is None else slow_mode_module(model, numModes)


def _ratio(value):
    # A hill cheaper than the timer's noise leaves no measurable difference to divide by.
    return "n/a" if value is None else f"{value:.1f}"


def _parseArguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small grids and a few hills (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--hills", type=int, help="hills timed per case (default 15, quick 4)")
    parser.add_argument("--platform", default="Reference", help="OpenMM platform (default Reference)")
    parser.add_argument("--model", metavar="PATH", help="bias the slowest modes of this trained model instead of "
                        "the stand-in CV")
    return parser.parse_args(argv)


def measureCase(numModes, gridWidth, hills, platform, cvModule):
    """Milliseconds per hill of both designs for K = ``numModes`` modes of ``cvModule`` on a grid of ``gridWidth``
    nodes per mode.

    Also reports the milliseconds of one evaluation of each design's bias force group, for scale: a
    LatentMetadynamics hill reads the modes of the last evaluation without running the model, so it costs a
    fraction of one, while app.Metadynamics evaluates its CVs again and refits its spline.
    """
    ours, oursEvaluation = _timeDesign(_latentDeposition, cvModule, numModes, gridWidth, hills, platform)
    openmms, openmmEvaluation = _timeDesign(_openmmDeposition, cvModule, numModes, gridWidth, hills, platform)
    return {"modes": numModes, "grid": f"{gridWidth}^{numModes}", "nodes": gridWidth ** numModes,
            "latent_ms": ours, "app_metadynamics_ms": openmms, "speedup": openmms / ours if ours > 0 else None,
            "latent_evaluation_ms": oursEvaluation, "app_metadynamics_evaluation_ms": openmmEvaluation}


def _timeDesign(setUp, cvModule, numModes, gridWidth, hills, platform):
    simulation, deposit, group = setUp(cvModule, numModes, gridWidth, platform)
    context = simulation.context
    simulation.step(10)

    def evaluate():
        context.getState(getEnergy=True, groups={group})

    def depositAndEvaluate():
        deposit(context)
        evaluate()

    depositAndEvaluate()
    withHill = _medianSeconds(depositAndEvaluate, hills)
    alone = _medianSeconds(evaluate, hills)
    return 1000.0 * max(withHill - alone, 0.0), 1000.0 * alone


def _medianSeconds(function, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _latentDeposition(cvModule, numModes, gridWidth, platform):
    ala2 = builtinSystem("ala2-vacuum")
    meta = LatentMetadynamics(ala2.system, cvModule, [RANGE] * numModes, WIDTH, TEMPERATURE, BIAS_FACTOR, HEIGHT,
                              frequency=1000, gridWidth=gridWidth)
    simulation = _simulation(ala2, platform)
    # The deposition LatentMetadynamics.step runs at every frequency-th step.
    return simulation, lambda context: meta._depositHill(context, 0), meta.forceGroup


def _openmmDeposition(cvModule, numModes, gridWidth, platform):
    ala2 = builtinSystem("ala2-vacuum")
    variables = []
    for mode in range(numModes):
        collectiveVariable = openmm.CustomCVForce("s")
        collectiveVariable.addCollectiveVariable("s", SlowModeCV(cvModule, mode))
        variables.append(app.BiasVariable(collectiveVariable, *RANGE, WIDTH, False, gridWidth))
    meta = app.Metadynamics(ala2.system, variables, TEMPERATURE * unit.kelvin, BIAS_FACTOR,
                            HEIGHT * unit.kilojoule_per_mole, frequency=1000)
    simulation = _simulation(ala2, platform)
    group = meta._force.getForceGroup()

    def deposit(context):
        # The body of app.Metadynamics.step at a deposition step.
        position = meta._force.getCollectiveVariableValues(context)
        energy = context.getState(getEnergy=True, groups={group}).getPotentialEnergy()
        height = meta.height * np.exp(-energy / (unit.MOLAR_GAS_CONSTANT_R * meta._deltaT))
        meta._addGaussian(position, height, context)

    return simulation, deposit, group


def _simulation(ala2, platform):
    integrator = openmm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, 1 / unit.picosecond,
                                                 0.002 * unit.picoseconds)
    simulation = app.Simulation(ala2.topology, ala2.system, integrator, openmm.Platform.getPlatformByName(platform))
    simulation.context.setPositions(ala2.positions)
    return simulation


def printTable(rows):
    print("ms per hill (ms per bias evaluation, for scale)")
    print(f"{'K':>2} {'grid':>7} {'nodes':>8} {'LatentMetadynamics':>22} {'app.Metadynamics':>22} {'ratio':>7}")
    for row in rows:
        ours = f"{row['latent_ms']:.3f} ({row['latent_evaluation_ms']:.3f})"
        theirs = f"{row['app_metadynamics_ms']:.3f} ({row['app_metadynamics_evaluation_ms']:.3f})"
        ratio = _ratio(row["speedup"])
        print(f"{row['modes']:>2} {row['grid']:>7} {row['nodes']:>8} {ours:>22} {theirs:>22} {ratio:>7}")


if __name__ == "__main__":
    main()
