"""The one place where a TorchScript module becomes an OpenMM force.

Everything in nct_openmm that hands a torch model to OpenMM goes through :func:`createTorchForce`, so that a second
backend (upstream openmm-torch is moving from ``TorchForce`` to ``PythonTorchForce``) can be added here alone.
"""
import contextlib
import io
import warnings
from xml.etree import ElementTree

import openmm
import torch

from .export import script

with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
    # The acellera build imports the deprecated ``simtk.openmm`` and warns about it on every import.
    import openmmtorch


def createTorchForce(module, periodic=False, cudaGraphs=False, globalParameters=None,
                     energyParameterDerivatives=(), forceGroup=None):
    """Wrap a TorchScript module in an openmm-torch ``TorchForce``.

    Parameters
    ----------
    module : torch.nn.Module or torch.jit.ScriptModule
        Takes positions ``(N, 3)`` in nm (and the box vectors when ``periodic``), then one scalar tensor per global
        parameter in the order given; returns the energy in kJ/mol. Scripted here if it is not already.
    periodic : bool
        Pass the box vectors to the module as its second argument.
    cudaGraphs : bool
        Capture forward and backward in a CUDA graph on the CUDA platform (ignored elsewhere).
    globalParameters : dict, optional
        Name → default value of the Context parameters the module reads, in its argument order.
    energyParameterDerivatives : sequence of str
        Global parameters whose energy derivative OpenMM should report (``State.getEnergyParameterDerivatives``).
    forceGroup : int, optional
        Force group to put the force in.

    Returns
    -------
    openmmtorch.TorchForce

    Examples
    --------
    >>> import torch
    >>> class Harmonic(torch.nn.Module):
    ...     def forward(self, positions):
    ...         return (positions ** 2).sum()
    >>> force = createTorchForce(torch.jit.script(Harmonic()))  # doctest: +SKIP
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=DeprecationWarning)
        force = openmmtorch.TorchForce(script(module))
    force.setUsesPeriodicBoundaryConditions(bool(periodic))
    if cudaGraphs:
        force.setProperty("useCUDAGraphs", "true")
    for name, value in (globalParameters or {}).items():
        force.addGlobalParameter(name, float(value))
    for name in energyParameterDerivatives:
        force.addEnergyParameterDerivative(name)
    if forceGroup is not None:
        force.setForceGroup(int(forceGroup))
    return force


def globalParameterNames(system):
    """Names of the global parameters of all forces of ``system``.

    Plugin forces such as ``TorchForce`` come back from ``System.getForce`` as plain ``Force`` objects without
    their accessors (and, after a trip through ``XmlSerializer``, without their name): their serialized XML lists
    the parameters instead.
    """
    names = set()
    for force in system.getForces():
        if hasattr(force, "getNumGlobalParameters"):
            names.update(force.getGlobalParameterName(i) for i in range(force.getNumGlobalParameters()))
        else:
            root = ElementTree.fromstring(openmm.XmlSerializer.serialize(force))
            names.update(parameter.get("name") for group in root.iter("GlobalParameters") for parameter in group)
    return names
