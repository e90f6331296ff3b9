"""Session-scoped data shared by the test modules (registered in conftest.py): made once per test session.

- ``ala2_run``: 0.1 ns of alanine dipeptide in vacuum on the Reference platform (1000 frames, 0.1 ps apart).
- ``ala2_data``: that trajectory loaded with the default selection (the 10 heavy atoms).
- ``ala2_model``: a tiny NCT trained on it (2 couplings, 16 hidden units, 100 steps) and its model file.

Training runs with one torch thread: on two shared cores, two libtorch threads fighting other processes made the
same 100 steps more than ten times slower.
"""
import contextlib
import os
from types import SimpleNamespace

import mdtraj
import numpy as np
import openmm.unit as unit
import pytest
import torch
from scipy.spatial.transform import Rotation

from nct_openmm.data import load_trajectories
from nct_openmm.simulate import runLangevin
from nct_openmm.slowmodes import NCT
from nct_openmm.systems import builtinSystem

ALA2_HEAVY_ATOMS = [1, 4, 5, 6, 8, 10, 14, 15, 16, 18]
TEMPERATURE = 300.0


@contextlib.contextmanager
def torch_threads(n):
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def phi_turned(ala2, degrees):
    """Alanine dipeptide's positions ``(T, n, 3)`` with φ turned by each of ``degrees`` from ``ala2.positions``
    (an extended structure, φ = ψ = 180°): the atoms on the CA side of the N–CA bond rotate about it."""
    positions = np.asarray(ala2.positions.value_in_unit(unit.nanometer))
    topology = mdtraj.Topology.from_openmm(ala2.topology)
    _, n, ca, _ = mdtraj.compute_phi(mdtraj.Trajectory(positions[None], topology))[0][0]
    neighbours = {atom.index: set() for atom in topology.atoms}
    for a, b in topology.bonds:
        neighbours[a.index].add(b.index)
        neighbours[b.index].add(a.index)
    moving, frontier = {ca}, [ca]
    while frontier:  # breadth first from CA, never back across the N–CA bond
        frontier = sorted(set().union(*(neighbours[atom] for atom in frontier)) - moving - {n})
        moving.update(frontier)
    moving = sorted(moving)
    axis = (positions[ca] - positions[n]) / np.linalg.norm(positions[ca] - positions[n])
    turned = np.repeat(positions[None], len(degrees), axis=0)
    for structure, angle in zip(turned, np.radians(degrees)):
        structure[moving] = Rotation.from_rotvec(angle * axis).apply(positions[moving] - positions[ca]) + positions[ca]
    return turned


def tiny_estimator(**options):
    """An NCT small enough to train in seconds."""
    settings = dict(n_couplings=2, hidden=16, max_steps=100, progress=False)
    settings.update(options)
    return NCT(TEMPERATURE, **settings)


@pytest.fixture(scope="session")
def ala2_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ala2-vacuum")
    return runLangevin(builtinSystem("ala2-vacuum"), str(folder), ns=0.1, platform="Reference", seed=1,
                       reportInterval=0.1 * unit.picoseconds, progress=False)


@pytest.fixture(scope="session")
def ala2_data(ala2_run):
    return load_trajectories([ala2_run.trajectory], ala2_run.topology)


@pytest.fixture(scope="session")
def ala2_model(ala2_data, tmp_path_factory):
    """``SimpleNamespace(model, path)``: the trained SlowModeModel and the file it was saved to."""
    with torch_threads(1):
        model = tiny_estimator().fit(ala2_data).fetch_model()
    path = os.path.join(str(tmp_path_factory.mktemp("ala2-model")), "model.pt")
    model.save(path)
    return SimpleNamespace(model=model, path=path)
