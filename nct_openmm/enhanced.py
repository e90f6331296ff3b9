"""Enhanced-sampling runs with a trained model: well-tempered metadynamics on its slow modes, and the baselines
it is judged against (metadynamics on (Φ, Ψ), unbiased MD), summarised the same way.

OpenMM idiom (camelCase, MD units). Every run writes ``traj.dcd``, ``top.pdb`` and, when biased, per-frame
reweighting factors ``exp(V(s_t)/kT)`` of the final bias, so that :func:`summarizeRun` can count Φ transitions and
estimate ΔF(Φ>0 − Φ<0) for all protocols alike.
"""
import dataclasses
import json
import os
import warnings

import mdtraj
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import torch

from nct_openmm.analysis import (basin_free_energy, count_transitions, free_energy_surface, in_upper_basin,
                                 plot_free_energy_surface)
from nct_openmm.data import BOLTZMANN
from nct_openmm.export import slow_mode_module, student_module
from nct_openmm.forces import checkSystemCompatible, slowModeBiasVariables
from nct_openmm.integrators import mtsLangevinIntegrator
from nct_openmm.metadynamics import LatentMetadynamics
from nct_openmm.simulate import finalBiasFactors, startedSimulation, stepWithProgress, writeStructure
from nct_openmm.systems import getPlatform


class TemperatureMismatchWarning(UserWarning):
    """The model was trained at another temperature than the simulation runs at."""


@dataclasses.dataclass(frozen=True)
class SlowModeMetadynamicsSettings:
    """Well-tempered metadynamics on the ``modes`` slowest modes (unit-variance ε = ωQ, so one ``width`` fits all).

    ``margin`` widens the training range of every mode on both sides (in mode units) to make the bias grid; a
    flat-bottom wall of ``wallForceConstant`` (kJ/mol per squared mode unit) keeps the modes inside it. Frames of the
    first ``discard`` fraction get reweighting factor 0, as in
    :class:`nct_openmm.simulate.DihedralMetadynamics`: the bias there is still far from its final shape.

    Speed (``benchmarks/bias_overhead.py``): ``student`` evaluates a small network distilled from the flow
    (:func:`nct_openmm.export.student_module`; its errors go into the summary) instead of the flow;
    ``biasStride`` n applies the bias every n-th 2-fs step with
    :func:`nct_openmm.integrators.mtsLangevinIntegrator` (outer step n × 2 fs). Whether a stride is accurate depends
    on the CV: check the kinetic temperature and the free energy against a stride-1 run
    (``bias_overhead.py --mts-accuracy``). ``cudaGraphs`` captures the bias in a CUDA graph on the CUDA platform
    (ignored elsewhere): a GPU evaluation is then one graph replay instead of hundreds of kernel launches, which is
    what the GPU speed figures of ``benchmarks/RESULTS.md`` were measured with.
    """

    modes: int = 2
    biasFactor: float = 6.0
    height: float = 1.2  # kJ/mol
    width: float = 0.25  # mode units
    frequency: int = 250  # steps
    margin: float = 1.5
    wallForceConstant: float = 50.0
    naive: bool = False  # openmm.app.Metadynamics with one TorchForce per mode, for comparisons
    torchThreads: int = 1  # libtorch intra-op threads for the CV model (0: leave torch's setting alone)
    student: bool = False  # a distilled network instead of the flow
    studentSteps: int = 6000  # its training steps (about 3 min on one CPU core)
    studentFeatures: str = "internal"  # what it reads: "internal" or "distances" (no alignment; see student_module)
    biasStride: int = 1  # apply the bias every n-th step (multiple time stepping)
    cudaGraphs: bool = True  # capture the bias in a CUDA graph when the platform is CUDA
    discard: float = 0.1


def checkModelForSystem(model, molecularSystem, temperature):
    """Refuse a model that cannot describe this system; warn when it was trained at another temperature.

    Raises
    ------
    ValueError
        When the model's atom indices do not exist in the system or their elements (masses) differ.
    """
    indices = model.atom_indices
    n_atoms = molecularSystem.system.getNumParticles()
    if max(indices) >= n_atoms:
        raise ValueError(f"the model reads atom indices up to {max(indices)}, but the system has {n_atoms} atoms: "
                         "it was trained on another system")
    masses = np.array([molecularSystem.system.getParticleMass(i).value_in_unit(unit.dalton) for i in indices])
    expected = model.frame.masses.numpy()
    if not np.allclose(masses, expected, rtol=1e-3):
        raise ValueError("the masses of the model's atoms differ from this system's (another molecule or atom order)")
    if abs(model.temperature - temperature) > 1.0:
        warnings.warn(f"the model was trained on data at {model.temperature:.1f} K but the simulation runs at "
                      f"{temperature:.1f} K: its slow modes and their scaling describe the other temperature",
                      TemperatureMismatchWarning, stacklevel=2)


def _simulation(molecularSystem, system, temperature, seed, platform, timestep=0.002, biasGroup=None, stride=1):
    """Minimised and thermalised; with ``biasGroup``, MTS Langevin applying that group once per ``stride`` steps."""
    if biasGroup is None:
        integrator = openmm.LangevinMiddleIntegrator(temperature, 1.0, timestep)
    else:
        integrator = mtsLangevinIntegrator(system, biasGroup, stride, temperature, 1.0, timestep)
    return startedSimulation(molecularSystem, system, integrator, temperature, seed, platform)


def runSlowModeMetadynamics(model, molecularSystem, outDir, ns, temperature=None, settings=None, platform=None,
                            seed=0, reportInterval=0.1, progress=True):
    """Well-tempered metadynamics on the slow modes of ``model`` and its outputs in ``outDir``.

    Writes ``traj.dcd``, ``top.pdb``, ``cv.txt`` (time series at every hill), ``bias.npz`` (restartable with
    :meth:`LatentMetadynamics.loadBias`), ``fes_modes.npz``, ``weights.txt`` (final-bias reweighting factors per
    frame) and ``summary.json`` (see :func:`summarizeRun`).

    Parameters
    ----------
    model : nct_openmm.slowmodes.SlowModeModel
    molecularSystem : nct_openmm.systems.MolecularSystem
        Not modified (the bias goes into a copy of its System).
    outDir : str
    ns : float
        Simulated time.
    temperature : float, optional
        K; the model's training temperature by default.
    settings : SlowModeMetadynamicsSettings, optional
    platform : str, optional
    seed : int
    reportInterval : float
        ps between saved frames.
    progress : bool

    Returns
    -------
    dict
        The summary also written to ``summary.json``.
    """
    settings = settings or SlowModeMetadynamicsSettings()
    if settings.torchThreads:
        # A CV network this small gains nothing from intra-op threads, and on a busy CPU their spin-waiting made
        # every step ten times slower.
        torch.set_num_threads(settings.torchThreads)
    temperature = float(model.temperature if temperature is None else temperature)
    checkModelForSystem(model, molecularSystem, temperature)
    if settings.studentFeatures != "internal" and not settings.student:
        raise ValueError(f"studentFeatures={settings.studentFeatures!r} chooses what the student reads; set "
                         "student=True")
    if settings.biasStride < 1 or settings.frequency % settings.biasStride:
        raise ValueError(f"the bias stride must be a positive divisor of the hill frequency ({settings.frequency} "
                         f"steps), got {settings.biasStride}")
    if settings.naive and settings.biasStride > 1:
        raise ValueError("the naive comparison (app.Metadynamics) runs every step; it takes no bias stride")
    if not 0.0 <= settings.discard < 1.0:
        raise ValueError(f"discard is the fraction of early frames left out of the reweighting, in [0, 1), got "
                         f"{settings.discard}")
    if not ns > 0:
        raise ValueError(f"the run length must be positive, got {ns} ns")
    if os.path.exists(outDir) and not os.path.isdir(outDir):
        raise ValueError(f"the output folder {outDir} is a file")
    chosenPlatform = getPlatform(platform)
    cudaGraphs = settings.cudaGraphs and chosenPlatform.getName() == "CUDA"
    studentReport = None
    if settings.student:
        cv, studentReport = student_module(model, settings.modes, steps=settings.studentSteps, progress=progress,
                                           features=settings.studentFeatures)
    else:
        cv = slow_mode_module(model, settings.modes)
    system = openmm.XmlSerializer.clone(molecularSystem.system)
    checkSystemCompatible(system, cv)
    periodic = system.usesPeriodicBoundaryConditions()
    ranges = _biasRanges(model, settings)
    if settings.naive:
        variables = slowModeBiasVariables(cv, list(range(settings.modes)), _trainingRanges(model, settings.modes),
                                          settings.width, padding=settings.margin, periodic=periodic,
                                          cudaGraphs=cudaGraphs)
        bias = app.Metadynamics(system, variables, temperature, settings.biasFactor,
                                settings.height * unit.kilojoule_per_mole, settings.frequency)
    else:
        bias = LatentMetadynamics(system, cv, ranges, settings.width, temperature, settings.biasFactor,
                                  settings.height, settings.frequency // settings.biasStride, periodic=periodic,
                                  wallForceConstant=settings.wallForceConstant, cudaGraphs=cudaGraphs)
    stride = settings.biasStride
    biasGroup = None if settings.naive or stride == 1 else bias.forceGroup
    simulation = _simulation(molecularSystem, system, temperature, seed, chosenPlatform, biasGroup=biasGroup,
                             stride=stride)
    os.makedirs(outDir, exist_ok=True)
    writeStructure(simulation, os.path.join(outDir, "top.pdb"))
    stepsPerFrame = max(1, int(round(reportInterval / (0.002 * stride))))
    simulation.reporters.append(app.DCDReporter(os.path.join(outDir, "traj.dcd"), stepsPerFrame))
    seconds = stepWithProgress(lambda n: bias.step(simulation, n), int(round(ns * 500000 / stride)),
                               stepsPerFrame * 50, progress, "metadynamics")
    biasAt = _biasFunction(bias, cv, settings, temperature)
    weights = _reweightingFactors(biasAt, cv, os.path.join(outDir, "traj.dcd"), os.path.join(outDir, "top.pdb"),
                                  temperature, periodic, settings.discard)
    np.savetxt(os.path.join(outDir, "weights.txt"), weights, fmt="%.8g")
    if not settings.naive:
        bias.saveBias(os.path.join(outDir, "bias.npz"))
        _writeModeOutputs(bias, outDir)
    summary = summarizeRun(os.path.join(outDir, "traj.dcd"), os.path.join(outDir, "top.pdb"), temperature, weights)
    writeDihedralFreeEnergy(os.path.join(outDir, "traj.dcd"), os.path.join(outDir, "top.pdb"), temperature, weights,
                            outDir)
    summary.update(protocol="nct-metad" + ("-naive" if settings.naive else ""), ns=ns,
                   ns_per_day=ns * 86400.0 / seconds, settings=dataclasses.asdict(settings), seed=seed,
                   platform=simulation.context.getPlatform().getName(), cuda_graphs=cudaGraphs,
                   model_temperature=model.temperature,
                   student_report=studentReport, frame_interval_ps=stepsPerFrame * stride * 0.002)
    _writeSummary(summary, outDir)
    return summary


def _trainingRanges(model, modes):
    ranges = model.metadata.get("mode_ranges")
    if not ranges:
        return [(-3.0, 3.0)] * modes
    return [tuple(r) for r in ranges[:modes]]


def _biasRanges(model, settings):
    return [(lo - settings.margin, hi + settings.margin) for lo, hi in _trainingRanges(model, settings.modes)]


def _biasFunction(bias, cv, settings, temperature):
    """The final bias as a function of CV values (kJ/mol)."""
    if not settings.naive:
        return bias.getBias
    free = np.asarray(bias.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole))
    grids = [np.linspace(v.minValue, v.maxValue, v.gridWidth) for v in bias.variables]
    factor = -(settings.biasFactor - 1.0) / settings.biasFactor  # getFreeEnergy() is −γ/(γ − 1) · V
    from scipy.interpolate import RegularGridInterpolator

    # app.Metadynamics orders its grid axes last variable first. Outside its grid OpenMM's tabulated function is
    # 0: frames there ran without bias and get none.
    interpolator = RegularGridInterpolator(grids[::-1], factor * free, bounds_error=False, fill_value=0.0)
    return lambda values: interpolator(np.asarray(values)[:, ::-1])


def _reweightingFactors(biasAt, cv, trajectory, topology, temperature, periodic, discard):
    """``exp(V(s_t)/kT)`` per saved frame with the final bias, 0 for the first ``discard`` fraction, normalised to
    mean 1."""
    traj = mdtraj.load(trajectory, top=topology)
    return finalBiasFactors(biasAt(modeValues(cv, traj, periodic)), BOLTZMANN * temperature, discard)


def modeValues(cv, traj, periodic=False):
    """The CV module's modes ``(T, K)`` for every frame of an mdtraj trajectory of the whole system."""
    boxes = traj.unitcell_vectors if periodic else None
    with torch.no_grad():
        rows = [cv(torch.as_tensor(traj.xyz[i], dtype=torch.float32),
                   None if boxes is None else torch.as_tensor(boxes[i], dtype=torch.float32))
                for i in range(traj.n_frames)]
    return torch.stack(rows).double().numpy()


def writeDihedralFreeEnergy(trajectory, topology, temperature, weights, outDir, bins=36):
    """F(Φ, Ψ) by reweighting (``fes_phipsi.npz`` and ``.png``, degrees, kJ/mol); nothing for non-peptides."""
    traj = mdtraj.load(trajectory, top=topology)
    phi, psi = mdtraj.compute_phi(traj)[1], mdtraj.compute_psi(traj)[1]
    if phi.shape[1] == 0 or psi.shape[1] == 0:
        return None
    angles = np.degrees(np.stack([phi[:, 0], psi[:, 0]], axis=1))
    free, edges = free_energy_surface(angles, BOLTZMANN * temperature, weights, bins, [(-180, 180), (-180, 180)])
    np.savez(os.path.join(outDir, "fes_phipsi.npz"), free_energy=free, phi_edges=edges[0], psi_edges=edges[1])
    return plot_free_energy_surface(free, edges, os.path.join(outDir, "fes_phipsi.png"), ("Φ (deg)", "Ψ (deg)"))


def _writeModeOutputs(bias, outDir):
    series = bias.getTimeSeries()
    header = "step time_ps " + " ".join(f"s{k}" for k in range(series["cv"].shape[1])) + " bias_kj_mol height_kj_mol"
    columns = [series["step"], series["time_ps"], series["cv"], series["bias_kj_mol"], series["height_kj_mol"]]
    table = np.column_stack(columns) if len(series["step"]) else np.zeros((0, 4 + series["cv"].shape[1]))
    np.savetxt(os.path.join(outDir, "cv.txt"), table, header=header, fmt="%.6g")
    fes = bias.getFreeEnergy().value_in_unit(unit.kilojoule_per_mole)
    grids = bias.getGridPoints()
    np.savez(os.path.join(outDir, "fes_modes.npz"), free_energy=fes - fes.min(),
             **{f"mode{k}": g for k, g in enumerate(grids)})
    if len(grids) == 2:
        edges = [np.concatenate([g - 0.5 * (g[1] - g[0]), [g[-1] + 0.5 * (g[1] - g[0])]]) for g in grids]
        plot_free_energy_surface(fes - fes.min(), edges, os.path.join(outDir, "fes_modes.png"), ("mode 0", "mode 1"))


def summarizeRun(trajectory, topology, temperature, weights=None):
    """Φ transitions and ΔF(Φ>0 − Φ<0) of a peptide run (weights reweight a biased run).

    Returns
    -------
    dict
        ``phi_transitions`` (committed crossings between the Φ<0 and Φ>0 basin cores), ``frames``, ``delta_f`` and
        ``delta_f_error`` (kJ/mol, block averaging over 5 blocks), ``phi_positive_fraction`` (weighted). The Φ>0
        basin is 0° < Φ < 120° (C7ax, αL; :data:`nct_openmm.analysis.dihedrals.UPPER_BASIN`), the other one the rest
        of the circle.
    """
    traj = mdtraj.load(trajectory, top=topology)
    phi = mdtraj.compute_phi(traj)[1][:, 0]
    kT = BOLTZMANN * temperature
    w = None if weights is None else np.asarray(weights, dtype=float)
    deltaF, error = basin_free_energy(phi, kT, weights=w)
    fraction = float(np.average(in_upper_basin(phi), weights=w))
    return {"phi_transitions": int(count_transitions(phi)), "frames": int(len(phi)), "delta_f": float(deltaF),
            "delta_f_error": float(error), "phi_positive_fraction": fraction, "temperature": temperature}


def _writeSummary(summary, outDir):
    with open(os.path.join(outDir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2, default=float)
