"""Test-suite settings: one torch thread (OpenMM and torch otherwise fight over this machine's two cores, which
made small trainings ~30× slower), and the ``slow`` marker for the longer physics checks."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from molecular_fixtures import ala2_data, ala2_model, ala2_run  # noqa: E402,F401  (shared session fixtures)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a longer physics check (deselect with -m 'not slow')")
    torch.set_num_threads(1)
