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

import openmm.unit as unit
import pytest
import torch

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
