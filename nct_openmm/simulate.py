"""Langevin dynamics that writes training data: a DCD trajectory, a PDB topology and, for a run biased by
well-tempered metadynamics on the backbone dihedrals (Φ, Ψ), per-frame reweighting factors.

Examples
--------
>>> import tempfile
>>> from nct_openmm.systems import builtinSystem
>>> run = runLangevin(builtinSystem("ala2-vacuum"), tempfile.mkdtemp(), ns=0.0002, platform="Reference",
...                   reportInterval=0.02, progress=False)
>>> run.nFrames
10
"""
import dataclasses
import math
import os
import time

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
from scipy.interpolate import RegularGridInterpolator
from tqdm import tqdm

from nct_openmm.data import BOLTZMANN
from nct_openmm.systems import getPlatform, platformProperties, valueInUnit


@dataclasses.dataclass(frozen=True)
class LangevinRun:
    """What :func:`runLangevin` wrote and how fast it ran.

    Attributes
    ----------
    trajectory : str
        Path of the DCD file.
    topology : str
        Path of the PDB file with the starting structure.
    nFrames : int
        Frames in the DCD.
    ns : float
        Simulated time in ns.
    nsPerDay : float
        Speed of the dynamics alone (setup and minimization excluded).
    platform : str
        Name of the OpenMM platform that ran it.
    """

    trajectory: str
    topology: str
    nFrames: int
    ns: float
    nsPerDay: float
    platform: str
    weights: str = None


@dataclasses.dataclass(frozen=True)
class DihedralMetadynamics:
    """Settings of well-tempered metadynamics on the first backbone (Φ, Ψ) pair, for sampling both Φ basins.

    The run also writes ``weights.txt``: ``exp(V(Φ_t, Ψ_t)/kT)`` with the final bias ``V`` (normalised to mean 1),
    the factors that reweight its frames to the unbiased ensemble at the thermostat temperature (frames of the first
    ``discard`` fraction get weight 0, since the bias there is still far from its final shape).
    """

    biasFactor: float = 6.0
    height: float = 1.2  # kJ/mol
    width: float = 0.35  # rad
    frequency: int = 250  # steps
    gridWidth: int = 72
    discard: float = 0.1


def runLangevin(
    molecularSystem,
    outDir,
    ns,
    temperature=300.0 * unit.kelvin,
    seed=0,
    platform=None,
    timestep=2.0 * unit.femtoseconds,
    friction=1.0 / unit.picosecond,
    reportInterval=0.5 * unit.picoseconds,
    minimize=True,
    progress=True,
    precision=None,
    threads=None,
    metadynamics=None,
):
    """Run Langevin dynamics (``LangevinMiddleIntegrator``) and write ``outDir/traj.dcd`` and ``outDir/top.pdb``.

    ``outDir`` is created if missing; ``traj.dcd`` and ``top.pdb`` already there are overwritten, and a
    ``weights.txt`` of an earlier biased run is removed (or rewritten by a biased one). ``top.pdb`` holds
    the structure the dynamics starts from (after minimization, if any). The same ``seed`` on the Reference platform
    gives the same trajectory; other platforms may differ in the last bits between runs.

    Parameters
    ----------
    molecularSystem : nct_openmm.systems.MolecularSystem
        Left unchanged.
    outDir : str
    ns : float
        Length of the run in ns; rounded to a whole number of steps.
    temperature : Quantity or float
        Thermostat temperature (K); also the temperature of the initial velocities.
    seed : int
        Non-negative seed for the thermostat noise and the initial velocities. OpenMM reads a seed of 0 as "pick one
        at random", so ``seed + 1`` is what OpenMM gets.
    platform : str or openmm.Platform, optional
        As in :func:`nct_openmm.systems.getPlatform`; None picks the fastest.
    timestep : Quantity or float
        Integration step (ps if a plain number).
    friction : Quantity or float
        Langevin friction coefficient (1/ps).
    reportInterval : Quantity or float
        Time between saved frames (ps); a whole number of steps.
    minimize : bool
        Minimize the energy before the dynamics.
    progress : bool
        Show a tqdm progress bar over the steps.
    precision, threads : optional
        Passed to :func:`nct_openmm.systems.platformProperties`.
    metadynamics : DihedralMetadynamics, optional
        Bias the backbone (Φ, Ψ) with well-tempered metadynamics and write ``outDir/weights.txt``.

    Returns
    -------
    LangevinRun

    Raises
    ------
    ValueError
        For an unavailable platform, a negative seed, a report interval that is not a whole number of steps, or a
        run shorter than one report interval.
    """
    stepsPerFrame, nSteps = _stepCounts(ns, timestep, reportInterval)
    _openmmSeed(seed)  # bad seeds and platforms are refused before anything is built
    platform = getPlatform(platform)
    temperatureK = valueInUnit(temperature, unit.kelvin)

    system = molecularSystem.system
    bias = None
    if metadynamics is not None:
        system = openmm.XmlSerializer.clone(system)
        bias = _dihedralMetadynamics(molecularSystem.topology, system, temperatureK, metadynamics)
    integrator = openmm.LangevinMiddleIntegrator(
        temperatureK, valueInUnit(friction, unit.picosecond**-1), valueInUnit(timestep, unit.picoseconds)
    )
    simulation = startedSimulation(molecularSystem, system, integrator, temperatureK, seed, platform, minimize,
                                   precision, threads)

    os.makedirs(outDir, exist_ok=True)
    topologyPath = os.path.join(outDir, "top.pdb")
    trajectoryPath = os.path.join(outDir, "traj.dcd")
    staleWeights = os.path.join(outDir, "weights.txt")
    if bias is None and os.path.exists(staleWeights):
        # Left by an earlier biased run into this folder, it would pair its factors with the new frames.
        os.remove(staleWeights)
    writeStructure(simulation, topologyPath)
    simulation.reporters.append(app.DCDReporter(trajectoryPath, stepsPerFrame))

    step = simulation.step if bias is None else (lambda steps: bias.step(simulation, steps))
    seconds = stepWithProgress(step, nSteps, stepsPerFrame, progress, molecularSystem.name)
    weightsPath = None
    if bias is not None:
        weightsPath = os.path.join(outDir, "weights.txt")
        _writeReweightingFactors(bias, trajectoryPath, topologyPath, temperatureK, metadynamics, weightsPath)
    simulatedNs = nSteps * valueInUnit(timestep, unit.nanoseconds)
    return LangevinRun(
        trajectory=trajectoryPath,
        topology=topologyPath,
        nFrames=nSteps // stepsPerFrame,
        ns=simulatedNs,
        nsPerDay=simulatedNs * 86400.0 / seconds,
        platform=simulation.context.getPlatform().getName(),
        weights=weightsPath,
    )


def _backboneTorsions(topology):
    """Atom indices of the first Φ and Ψ of an OpenMM topology (via mdtraj), with a clear error if it has none."""
    mdTopology = mdtraj.Topology.from_openmm(topology)
    probe = mdtraj.Trajectory(np.zeros((1, mdTopology.n_atoms, 3)), mdTopology)
    phi, psi = mdtraj.compute_phi(probe)[0], mdtraj.compute_psi(probe)[0]
    if len(phi) == 0 or len(psi) == 0:
        raise ValueError("dihedral metadynamics needs a peptide backbone with a Φ and a Ψ dihedral")
    return [int(i) for i in phi[0]], [int(i) for i in psi[0]]


def _dihedralMetadynamics(topology, system, temperatureK, settings):
    variables = []
    for atoms in _backboneTorsions(topology):
        torsion = openmm.CustomTorsionForce("theta")
        torsion.addTorsion(*atoms)
        variables.append(app.BiasVariable(torsion, -math.pi, math.pi, settings.width, True, settings.gridWidth))
    return app.Metadynamics(system, variables, temperatureK, settings.biasFactor,
                            settings.height * unit.kilojoule_per_mole, settings.frequency)


def _writeReweightingFactors(bias, trajectoryPath, topologyPath, temperatureK, settings, path):
    """Final-bias reweighting factors ``exp(V(s_t)/kT)`` for every saved frame; see :class:`DihedralMetadynamics`."""
    traj = mdtraj.load(trajectoryPath, top=topologyPath)
    angles = np.stack([mdtraj.compute_phi(traj)[1][:, 0], mdtraj.compute_psi(traj)[1][:, 0]], axis=1)
    # getFreeEnergy() is −(T + ΔT)/ΔT · V on the (Ψ, Φ)-indexed grid; recover V and interpolate it per frame,
    # bilinearly between the nodes, which span [−π, π] with both ends (the force itself uses a bicubic spline;
    # the nearest node, used before, was off by up to half a node spacing: about 0.5 kT on a 5° grid).
    free = np.asarray(bias.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole))
    deltaT = temperatureK * (settings.biasFactor - 1.0)
    biasGrid = -deltaT / (temperatureK + deltaT) * free
    nodes = np.linspace(-math.pi, math.pi, biasGrid.shape[0])
    finalBias = RegularGridInterpolator((nodes, nodes), biasGrid)(angles[:, ::-1])
    weights = finalBiasFactors(finalBias, BOLTZMANN * temperatureK, settings.discard)
    np.savetxt(path, weights, fmt="%.8g", header="reweighting factor per frame (final-bias well-tempered metadynamics)")


def finalBiasFactors(finalBias, kT, discard):
    """Reweighting factors ``exp(V_t/kT)`` of frames at which the final bias is ``V_t`` (the unit of ``kT``), 0 for
    the first ``discard`` fraction (the bias there is still far from its final shape), normalised to mean 1.

    Examples
    --------
    >>> finalBiasFactors(np.array([5.0, 0.0, np.log(3.0)]), 1.0, 1 / 3).tolist()
    [0.0, 0.75, 2.25]
    """
    logWeights = np.asarray(finalBias, dtype=float) / kT
    logWeights[: int(discard * len(logWeights))] = -np.inf
    weights = np.exp(logWeights - logWeights.max())
    return weights * len(weights) / weights.sum()


def _stepCounts(ns, timestep, reportInterval):
    timestepPs = valueInUnit(timestep, unit.picoseconds)
    framesSteps = valueInUnit(reportInterval, unit.picoseconds) / timestepPs
    stepsPerFrame = round(framesSteps)
    if stepsPerFrame < 1 or abs(framesSteps - stepsPerFrame) > 1e-6 * framesSteps:
        raise ValueError(f"the report interval must be a whole number of {timestepPs} ps steps")
    nSteps = round(ns * 1000.0 / timestepPs)
    if nSteps < stepsPerFrame:
        raise ValueError(f"{ns} ns is shorter than one report interval ({stepsPerFrame} steps); nothing would be saved")
    return stepsPerFrame, nSteps


def _openmmSeed(seed):
    if int(seed) != seed or not 0 <= seed < 2**31 - 1:
        raise ValueError(f"seed must be an integer in [0, 2**31 - 2], got {seed!r}")
    return int(seed) + 1


def startedSimulation(molecularSystem, system, integrator, temperature, seed, platform=None, minimize=True,
                      precision=None, threads=None):
    """An ``app.Simulation`` of ``system`` (the molecule's own, or a biased copy) ready for dynamics.

    ``integrator`` gets the random seed ``seed + 1`` (OpenMM reads 0 as "pick one"); the Context starts at the
    molecule's positions, minimised if ``minimize``, with Maxwell–Boltzmann velocities at ``temperature`` drawn with
    the same seed. ``platform``, ``precision`` and ``threads`` as in :func:`runLangevin`.

    Examples
    --------
    >>> from nct_openmm.systems import builtinSystem
    >>> ala2 = builtinSystem("ala2-vacuum")
    >>> integrator = openmm.LangevinMiddleIntegrator(300, 1, 0.002)
    >>> startedSimulation(ala2, ala2.system, integrator, 300, seed=0, platform="Reference").currentStep
    0
    """
    openmmSeed = _openmmSeed(seed)
    integrator.setRandomNumberSeed(openmmSeed)
    chosenPlatform = getPlatform(platform)
    simulation = app.Simulation(molecularSystem.topology, system, integrator, chosenPlatform,
                                platformProperties(chosenPlatform, precision=precision, threads=threads))
    simulation.context.setPositions(molecularSystem.positions)
    if minimize:
        simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(temperature, openmmSeed)
    return simulation


def writeStructure(simulation, path):
    """Write the Context's current positions with the Simulation's topology as a PDB file."""
    positions = simulation.context.getState(getPositions=True).getPositions()
    with open(path, "w") as handle:
        app.PDBFile.writeFile(simulation.topology, positions, handle)


def stepWithProgress(step, nSteps, chunk, progress, name):
    """Call ``step(n)`` in chunks of ``chunk`` steps, updating the bar after each; return the wall time."""
    start = time.perf_counter()
    with tqdm(total=nSteps, desc=f"sampling {name}", unit="step", disable=not progress) as bar:
        done = 0
        while done < nSteps:
            steps = min(chunk, nSteps - done)
            step(steps)
            done += steps
            bar.update(steps)
    return time.perf_counter() - start
