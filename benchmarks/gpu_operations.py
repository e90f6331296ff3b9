"""Operations per bias evaluation on the GPU code path, counted on this machine's CPU.

Inside a CUDA graph, a LatentMetadynamics evaluation is a serial chain of small kernels, and its cost grows with
their number (``RESULTS.md`` section 1b). This script counts them where no GPU is lent: it runs the bias module
with the choices made for CUDA (the SVD-free alignment of :func:`nct_openmm.geometry.polar_rotation`, the
branch-free hill update of ``cudaGraphs=True``) on the CPU under ``torch.profiler`` and counts the aten operations
that launch kernels (an upper bound: some, like a ``to`` to the same dtype, launch none), for the whole
evaluation (forward and the backward that gives forces) and for its parts.

Usage::

    python benchmarks/gpu_operations.py              # the shipped model's flow CV and two students, 2 modes; ~25 s
    python benchmarks/gpu_operations.py --quick      # a student distilled in a few steps
    python benchmarks/gpu_operations.py --json out.json
"""
import argparse
import contextlib
import json
import os
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPOSITORY)

import nct_openmm.export as export  # noqa: E402
from nct_openmm.core.distill import fit_student  # noqa: E402
from nct_openmm.geometry import PairDistances  # noqa: E402
from nct_openmm.metadynamics import (_HEIGHT, _HILL_ID, HermiteBiasGrid, _centreParameter,  # noqa: E402
                                     _MetadynamicsModuleNoBox, _parameterOrder)
from nct_openmm.slowmodes import SlowModeModel  # noqa: E402
from nct_openmm.systems import builtinSystem  # noqa: E402

MODEL = os.path.join(REPOSITORY, "models", "alanine_dipeptide.pt")
MODES, RANGE, WIDTH, GRID_NODES = 2, 3.0, 0.3, 61
#: Operations that launch no kernel: views, and allocations without initialisation.
NO_KERNEL = {"aten::alias", "aten::as_strided", "aten::detach", "aten::detach_", "aten::diagonal", "aten::expand",
             "aten::lift_fresh", "aten::narrow", "aten::permute", "aten::reshape", "aten::select", "aten::slice",
             "aten::squeeze", "aten::t", "aten::transpose", "aten::unsqueeze", "aten::view", "aten::_unsafe_view",
             "aten::empty", "aten::new_empty", "aten::resolve_conj", "aten::resolve_neg"}


def main(argv=None):
    options = _parseArguments(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = SlowModeModel.load(MODEL)
    settings = dict(steps=20 if options.quick else 300, samples=1024 if options.quick else 8192, progress=False)
    cvs = {"student": export.StudentModule(model, fit_student(model.flow, MODES, **settings)[0]),
           "student-distances": export.StudentModule(model, fit_student(
               model.flow, MODES, features=PairDistances(model.frame), **settings)[0]),
           "flow": export.SlowModeModule(model, MODES)}
    positions = _positions()
    with cudaAlignment():
        rows = [dict(cv=name, **countParts(cv, positions)) for name, cv in cvs.items()]
    printTable(rows)
    if options.json:
        with open(options.json, "w") as file:
            json.dump(rows, file, indent=2)


def _parseArguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a student distilled in a few steps (smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the counts as JSON")
    return parser.parse_args(argv)


@contextlib.contextmanager
def cudaAlignment():
    """Within the block, the exported CVs (run eagerly) align as they do on CUDA tensors."""
    saved = export.kabsch_align_saving
    export.kabsch_align_saving = lambda x, reference, masses, iterative=False: saved(x, reference, masses, True)
    try:
        yield
    finally:
        export.kabsch_align_saving = saved


def _positions():
    ala2 = builtinSystem("ala2-vacuum")
    return torch.tensor(ala2.positions.value_in_unit(ala2.positions.unit), dtype=torch.float32)


def countParts(cv, positions):
    """Non-view operations of a whole evaluation and of its parts, whether the evaluation is free of SVDs, and its
    most frequent operations."""
    grid = HermiteBiasGrid([-RANGE] * MODES, [RANGE] * MODES, [GRID_NODES] * MODES, [WIDTH] * MODES,
                           branchFree=True)
    module = _MetadynamicsModuleNoBox(cv, list(range(MODES)), grid)
    defaults, _ = _parameterOrder(MODES, 0, [-RANGE] * MODES, [RANGE] * MODES)
    hill = {_HILL_ID: 1.0, _HEIGHT: 1.0, **{_centreParameter(k): 0.1 for k in range(MODES)}}
    parameters = [torch.tensor(hill.get(name, value)) for name, value in defaults.items()]

    def evaluation():
        x = positions.clone().requires_grad_(True)
        torch.autograd.grad(module(x, *parameters), x)

    x = cv.input.selected(positions)
    y, saved = cv.input.transform_saving(x)
    _, jacobian = cv.modes_and_jacobian(y, True)
    s = torch.full((1, MODES), 0.1, dtype=torch.float64)
    centres = [torch.tensor(0.2, dtype=torch.float64)] * MODES
    hill = torch.tensor(1.0, dtype=torch.float64)
    # Branch-free, a hill already in the grid costs what a new one does, and the id is made outside the count.
    hillId = torch.tensor(1.0)
    whole, operations = _count(evaluation)
    with torch.no_grad():
        return {
            "evaluation": whole,
            "svd_free": "aten::linalg_svd" not in operations and "aten::_linalg_svd" not in operations,
            "input": _count(lambda: cv.input.transform_saving(x))[0],
            "input_pullback": _count(lambda: cv.input.pullback(saved, jacobian.t()))[0],
            "network": _count(lambda: cv.modes_and_jacobian(y, True))[0],
            "grid_lookup": _count(lambda: grid.evaluate(s))[0],
            "hill_update": _count(lambda: grid.addHill(hillId, centres, hill))[0],
            "most_frequent": dict(operations.most_common(8)),
        }


def _count(function):
    function()  # warm-up: first calls allocate and initialise
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    names = [event.name for event in profiler.events() if event.name.startswith("aten::")
             and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::"))]
    kernels = Counter(name for name in names if name not in NO_KERNEL)
    return sum(kernels.values()), kernels


def printTable(rows):
    parts = ["evaluation", "input", "input_pullback", "network", "grid_lookup", "hill_update"]
    print("kernel-launching aten operations per evaluation, GPU code path (forward + backward; parts outside autograd)")
    print(f"{'cv':>17} " + " ".join(f"{part:>14}" for part in parts))
    for row in rows:
        print(f"{row['cv']:>17} " + " ".join(f"{row[part]:>14}" for part in parts))
    for row in rows:
        print(f"most frequent ({row['cv']}): {row['most_frequent']}")


if __name__ == "__main__":
    main()
