"""Unbiased Langevin dynamics that writes the training data: a DCD trajectory and a PDB topology.

Example
-------
>>> import tempfile
>>> from nct_openmm.systems import builtinSystem
>>> run = runLangevin(builtinSystem("ala2-vacuum"), tempfile.mkdtemp(), ns=0.0002, platform="Reference",
...                   reportInterval=0.02, progress=False)
>>> run.nFrames
10
"""
import dataclasses
import os
import time

import openmm
import openmm.app as app
import openmm.unit as unit
from tqdm import tqdm

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
):
    """Run Langevin dynamics (``LangevinMiddleIntegrator``) and write ``outDir/traj.dcd`` and ``outDir/top.pdb``.

    ``outDir`` is created if missing; ``traj.dcd`` and ``top.pdb`` already there are overwritten. ``top.pdb`` holds
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
    openmmSeed = _openmmSeed(seed)
    chosenPlatform = getPlatform(platform)
    temperatureK = valueInUnit(temperature, unit.kelvin)

    integrator = openmm.LangevinMiddleIntegrator(
        temperatureK, valueInUnit(friction, unit.picosecond**-1), valueInUnit(timestep, unit.picoseconds)
    )
    integrator.setRandomNumberSeed(openmmSeed)
    simulation = app.Simulation(
        molecularSystem.topology,
        molecularSystem.system,
        integrator,
        chosenPlatform,
        platformProperties(chosenPlatform, precision=precision, threads=threads),
    )
    simulation.context.setPositions(molecularSystem.positions)
    if minimize:
        simulation.minimizeEnergy()
    simulation.context.setVelocitiesToTemperature(temperatureK, openmmSeed)

    os.makedirs(outDir, exist_ok=True)
    topologyPath = os.path.join(outDir, "top.pdb")
    trajectoryPath = os.path.join(outDir, "traj.dcd")
    _writeStartingStructure(simulation, topologyPath)
    simulation.reporters.append(app.DCDReporter(trajectoryPath, stepsPerFrame))

    seconds = _stepWithProgress(simulation, nSteps, stepsPerFrame, progress, molecularSystem.name)
    simulatedNs = nSteps * valueInUnit(timestep, unit.nanoseconds)
    return LangevinRun(
        trajectory=trajectoryPath,
        topology=topologyPath,
        nFrames=nSteps // stepsPerFrame,
        ns=simulatedNs,
        nsPerDay=simulatedNs * 86400.0 / seconds,
        platform=chosenPlatform.getName(),
    )


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


def _writeStartingStructure(simulation, path):
    positions = simulation.context.getState(getPositions=True).getPositions()
    with open(path, "w") as handle:
        app.PDBFile.writeFile(simulation.topology, positions, handle)


def _stepWithProgress(simulation, nSteps, chunk, progress, name):
    """Step in chunks of ``chunk`` steps, updating the bar after each; return the wall time of the stepping."""
    start = time.perf_counter()
    with tqdm(total=nSteps, desc=f"sampling {name}", unit="step", disable=not progress) as bar:
        done = 0
        while done < nSteps:
            steps = min(chunk, nSteps - done)
            simulation.step(steps)
            done += steps
            bar.update(steps)
    return time.perf_counter() - start
