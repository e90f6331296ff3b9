"""OpenMM systems: built-in test systems, user input files, and platform choice.

Everything here speaks OpenMM: values are ``openmm.unit`` quantities or plain numbers in MD units (nm, ps, kJ/mol,
amu, K), and functions are camelCase. This is the only module of the package that chooses an OpenMM platform.

Examples
--------
>>> from nct_openmm.systems import builtinSystem, getPlatform
>>> ala2 = builtinSystem("ala2-vacuum")
>>> ala2.nAtoms
22
>>> getPlatform("reference").getName()
'Reference'
"""
import dataclasses
import logging
import math
import numbers
import os
import warnings

import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit

#: Names accepted by :func:`builtinSystem`.
BUILTIN_SYSTEMS = ("ala2-vacuum", "ala2-implicit", "ala2-explicit")

#: Force-field files used by :func:`userSystem` when none are given (both ship with OpenMM).
DEFAULT_FORCEFIELD = ("amber14-all.xml", "amber14/tip3pfb.xml")

#: Implicit-solvent models by name, with the OpenMM force-field file that adds each to an ``app.ForceField``.
IMPLICIT_SOLVENT_FILES = {
    "HCT": "implicit/hct.xml",
    "OBC1": "implicit/obc1.xml",
    "OBC2": "implicit/obc2.xml",
    "GBn": "implicit/gbn.xml",
    "GBn2": "implicit/gbn2.xml",
}

_GPU_PLATFORMS = ("CUDA", "OpenCL", "HIP")


def valueInUnit(value, targetUnit):
    """Return ``value`` as a float in ``targetUnit``; plain numbers are taken to be in that unit already.

    Examples
    --------
    >>> valueInUnit(2 * unit.femtoseconds, unit.picoseconds)
    0.002
    >>> valueInUnit(300, unit.kelvin)
    300.0
    """
    if unit.is_quantity(value):
        return value.value_in_unit(targetUnit)
    return float(value)


#: Force groups an OpenMM System offers (0-31).
NUM_FORCE_GROUPS = 32


def isInteger(value):
    """Whether ``value`` is an integer (Python's or numpy's), not a bool and not a float that happens to be whole."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def contextOf(simulation):
    """The ``Context`` of an ``app.Simulation``, or the argument itself when it is a ``Context``."""
    return simulation.context if hasattr(simulation, "context") else simulation


def checkForceGroup(group):
    """``group`` as an int, or a ValueError naming the allowed range."""
    if not isInteger(group) or not 0 <= group < NUM_FORCE_GROUPS:
        raise ValueError(f"forceGroup must be an integer from 0 to {NUM_FORCE_GROUPS - 1}, got {group!r}")
    return int(group)


def usedForceGroups(system):
    """Every force group whose forces ``system`` computes, reciprocal-space groups of nonbonded forces included.

    Examples
    --------
    >>> system = openmm.System()
    >>> nonbonded = openmm.NonbondedForce(); nonbonded.setReciprocalSpaceForceGroup(4); _ = system.addForce(nonbonded)
    >>> sorted(usedForceGroups(system))
    [0, 4]
    """
    groups = set()
    for force in system.getForces():
        groups.add(force.getForceGroup())
        if isinstance(force, openmm.NonbondedForce) and force.getReciprocalSpaceForceGroup() >= 0:
            groups.add(force.getReciprocalSpaceForceGroup())
    return groups


def warnIfBoxIsIgnored(system, periodic, what):
    """Warn when ``system`` is periodic but a CV force ``what`` was built with ``periodic=False``.

    The CV module then gets no box vectors and cannot make its molecule whole, so its values jump whenever the
    molecule is split across the boundary (positions may be wrapped into the box, as on GPU platforms).
    """
    if system.usesPeriodicBoundaryConditions() and not periodic:
        warnings.warn(f"the System uses periodic boundary conditions but {what} was given periodic=False: its CV "
                      "module gets no box vectors, so a molecule split across the boundary gives wrong values; "
                      "pass periodic=True", UserWarning, stacklevel=3)


def freeForceGroup(system):
    """The highest force group no force of ``system`` uses (as ``app.Metadynamics`` chooses; reciprocal-space
    groups count as used).

    Examples
    --------
    >>> freeForceGroup(openmm.System())
    31
    """
    free = sorted(set(range(NUM_FORCE_GROUPS)) - usedForceGroups(system))
    if not free:
        raise ValueError(f"all {NUM_FORCE_GROUPS} force groups of the System are in use; pass forceGroup= to "
                         "share one with another force")
    return free[-1]


def availablePlatforms():
    """Names of the OpenMM platforms that loaded in this process, slowest first.

    Examples
    --------
    >>> "Reference" in availablePlatforms()
    True
    """
    platforms = [openmm.Platform.getPlatform(i) for i in range(openmm.Platform.getNumPlatforms())]
    return [platform.getName() for platform in sorted(platforms, key=lambda p: p.getSpeed())]


def getPlatform(name=None, threads=None):
    """Return the OpenMM platform called ``name`` (case-insensitive), or the fastest one if ``name`` is None.

    Parameters
    ----------
    name : str or openmm.Platform, optional
        ``"Reference"``, ``"CPU"``, ``"CUDA"``, ``"OpenCL"``... A Platform is returned as it is.
    threads : int, optional
        Worker threads for the CPU platform. This sets the platform's process-wide default (OpenMM has no
        per-Platform-object setting); other platforms ignore it. :func:`platformProperties` sets it per Context.

    Returns
    -------
    openmm.Platform

    Raises
    ------
    ValueError
        If no such platform loaded. The message lists the platforms that did, and for a GPU platform the plugin
        load failures that usually explain why it is missing.

    Examples
    --------
    >>> getPlatform("cpu").getName()
    'CPU'
    """
    if isinstance(name, openmm.Platform):
        platform = name
    elif name is None:
        platform = openmm.Platform.getPlatformByName(availablePlatforms()[-1])
    else:
        platform = openmm.Platform.getPlatformByName(_canonicalPlatformName(name))
    if threads is not None and platform.getName() == "CPU":
        platform.setPropertyDefaultValue("Threads", str(_positiveInt(threads, "threads")))
    return platform


def _canonicalPlatformName(name):
    available = availablePlatforms()
    for candidate in available:
        if candidate.lower() == str(name).lower():
            return candidate
    message = f"OpenMM platform {name!r} is not available; available platforms: {', '.join(available)}"
    gpuName = next((gpu for gpu in _GPU_PLATFORMS if gpu.lower() == str(name).lower()), None)
    if gpuName is not None:
        # Only the platform's own library: the plugins that depend on it fail as a consequence.
        failures = [f for f in openmm.Platform.getPluginLoadFailures() if f"/libOpenMM{gpuName}." in f]
        if failures:
            message += f"; plugin load failures: {' | '.join(' '.join(f.split()) for f in failures)}"
    raise ValueError(message)


def platformProperties(platform, precision=None, threads=None):
    """Context properties for ``platform``: ``Precision`` on CUDA/OpenCL/HIP (default ``"mixed"``), ``Threads`` on CPU.

    Parameters
    ----------
    platform : openmm.Platform
    precision : {"single", "mixed", "double"}, optional
        Only the GPU platforms have a choice; asking another platform for one raises ValueError (Reference always
        runs in double, CPU in mixed precision).
    threads : int, optional
        CPU worker threads; ignored by the other platforms.

    Returns
    -------
    dict
        ``{property name: string value}``, ready for ``openmm.Context`` or ``app.Simulation``.

    Examples
    --------
    >>> platformProperties(getPlatform("CPU"), threads=2)
    {'Threads': '2'}
    >>> platformProperties(getPlatform("Reference"))
    {}
    """
    name = platform.getName()
    properties = {}
    if name in _GPU_PLATFORMS:
        properties["Precision"] = precision or "mixed"
    elif precision is not None:
        raise ValueError(f"the {name} platform has no Precision property; choose a GPU platform (CUDA, OpenCL, HIP) "
                         f"for {precision!r}")
    if name == "CPU" and threads is not None:
        properties["Threads"] = str(_positiveInt(threads, "threads"))
    return properties


def _positiveInt(value, what):
    if int(value) != value or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


@dataclasses.dataclass
class MolecularSystem:
    """An OpenMM system with the topology and starting positions that go with it.

    Attributes
    ----------
    topology : openmm.app.Topology
    system : openmm.System
    positions : openmm.unit.Quantity
        ``(nAtoms, 3)`` starting positions in nm.
    name : str

    Examples
    --------
    >>> chain = harmonicChainSystem(3)
    >>> chain.name, chain.nAtoms
    ('harmonic-chain-3', 3)
    """

    topology: app.Topology
    system: openmm.System
    positions: unit.Quantity
    name: str

    @property
    def nAtoms(self):
        """Number of particles in the system."""
        return self.system.getNumParticles()


def builtinSystem(name):
    """Build one of the :data:`BUILTIN_SYSTEMS`: alanine dipeptide from ``openmmtools.testsystems`` (Amber ff96).

    ``ala2-vacuum`` has no cutoff; ``ala2-implicit`` uses OBC2 (openmmtools' ``AlanineDipeptideImplicit`` uses OBC1,
    so it is built here from the same Amber files); ``ala2-explicit`` is 2269 atoms of TIP3P with PME. All three
    constrain bonds to hydrogen (and keep water rigid), so a 2 fs step is stable.

    Parameters
    ----------
    name : str

    Returns
    -------
    MolecularSystem

    Raises
    ------
    ValueError
        For a name not in :data:`BUILTIN_SYSTEMS`.

    Examples
    --------
    >>> builtinSystem("ala2-implicit").system.getNumConstraints()
    12
    """
    builders = {"ala2-vacuum": _ala2Vacuum, "ala2-implicit": _ala2Implicit, "ala2-explicit": _ala2Explicit}
    if name not in builders:
        raise ValueError(f"unknown built-in system {name!r}; choose one of {', '.join(BUILTIN_SYSTEMS)}")
    return builders[name]()


def _openmmtoolsTestsystems():
    # pymbar, pulled in by openmmtools, logs a timeseries warning and a "JAX NOT FOUND" banner on import.
    pymbarLogger = logging.getLogger("pymbar")
    previousLevel = pymbarLogger.level
    pymbarLogger.setLevel(logging.ERROR)
    try:
        import openmmtools.testsystems as testsystems
    finally:
        pymbarLogger.setLevel(previousLevel)
    return testsystems


def _fromTestSystem(testSystem, name):
    return MolecularSystem(testSystem.topology, testSystem.system, testSystem.positions, name)


def _ala2Vacuum():
    testsystems = _openmmtoolsTestsystems()
    return _fromTestSystem(testsystems.AlanineDipeptideVacuum(constraints=app.HBonds), "ala2-vacuum")


def _ala2Implicit():
    testsystems = _openmmtoolsTestsystems()
    folder = "data/alanine-dipeptide-gbsa/alanine-dipeptide"
    ala2 = userSystem(
        prmtop=testsystems.get_data_filename(f"{folder}.prmtop"),
        inpcrd=testsystems.get_data_filename(f"{folder}.crd"),
        implicitSolvent="OBC2",
    )
    return dataclasses.replace(ala2, name="ala2-implicit")


def _ala2Explicit():
    testsystems = _openmmtoolsTestsystems()
    return _fromTestSystem(testsystems.AlanineDipeptideExplicit(constraints=app.HBonds), "ala2-explicit")


def userSystem(pdb=None, forcefield=None, prmtop=None, inpcrd=None, implicitSolvent=None, nonbondedMethod=None):
    """Build a system from a PDB file and force-field XML files, or from Amber prmtop and coordinates.

    Give either ``pdb`` (with ``forcefield``), or ``prmtop`` with ``inpcrd`` or ``pdb`` for the coordinates. Bonds to
    hydrogen are constrained and water is rigid.

    Parameters
    ----------
    pdb : str, optional
        A PDB file with all hydrogens. With ``prmtop``, only its coordinates are used.
    forcefield : sequence of str, optional
        Force-field XML files for ``app.ForceField`` (files shipped with OpenMM may be named without a folder).
        Defaults to :data:`DEFAULT_FORCEFIELD`. Not allowed with ``prmtop``, which carries its own parameters.
    prmtop, inpcrd : str, optional
        Amber topology and coordinate files.
    implicitSolvent : str or app implicit-solvent model, optional
        One of :data:`IMPLICIT_SOLVENT_FILES` (``"OBC2"``, or ``app.OBC2``...). With a PDB, the matching
        ``implicit/*.xml`` file is appended to the force field.
    nonbondedMethod : app nonbonded method, optional
        Defaults to ``app.PME`` if the topology has a periodic box and ``app.NoCutoff`` otherwise.

    Returns
    -------
    MolecularSystem
        Named after the PDB or prmtop file.

    Raises
    ------
    FileNotFoundError
        If an input file is missing.
    ValueError
        For an invalid combination of inputs, an unknown implicit-solvent model, a force-field file OpenMM cannot
        locate, or residues the force field has no template for.

    Examples
    --------
    >>> import tempfile
    >>> ala2 = builtinSystem("ala2-vacuum")
    >>> path = os.path.join(tempfile.mkdtemp(), "ala2.pdb")
    >>> with open(path, "w") as handle:
    ...     app.PDBFile.writeFile(ala2.topology, ala2.positions, handle)
    >>> userSystem(pdb=path, forcefield=["amber14-all.xml"]).nAtoms
    22
    """
    for path in (pdb, prmtop, inpcrd):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
    solventModel = _implicitSolventName(implicitSolvent)
    if prmtop is not None:
        if forcefield is not None:
            raise ValueError("give force-field files or a prmtop, not both: the prmtop carries its own parameters")
        return _amberSystem(prmtop, inpcrd, pdb, solventModel, nonbondedMethod)
    if inpcrd is not None:
        raise ValueError("an inpcrd file needs a prmtop file to go with it")
    if pdb is None:
        raise ValueError("give a PDB file (with force-field files) or an Amber prmtop file")
    return _forceFieldSystem(pdb, forcefield or DEFAULT_FORCEFIELD, solventModel, nonbondedMethod)


def _implicitSolventName(model):
    if model is None:
        return None
    # app.OBC2 and friends are classes whose string form is their name.
    name = model.__name__ if isinstance(model, type) else str(model)
    if name not in IMPLICIT_SOLVENT_FILES:
        raise ValueError(f"unknown implicit-solvent model {name!r}; choose one of {', '.join(IMPLICIT_SOLVENT_FILES)}")
    return name


def _defaultNonbondedMethod(topology, nonbondedMethod):
    if nonbondedMethod is not None:
        return nonbondedMethod
    return app.NoCutoff if topology.getPeriodicBoxVectors() is None else app.PME


def _forceFieldSystem(pdbPath, forcefieldFiles, solventModel, nonbondedMethod):
    pdb = app.PDBFile(pdbPath)
    files = list(forcefieldFiles) + ([IMPLICIT_SOLVENT_FILES[solventModel]] if solventModel else [])
    try:
        forceField = app.ForceField(*files)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read force field {files}: {error}") from error
    system = forceField.createSystem(
        pdb.topology,
        nonbondedMethod=_defaultNonbondedMethod(pdb.topology, nonbondedMethod),
        constraints=app.HBonds,
        rigidWater=True,
    )
    return MolecularSystem(pdb.topology, system, pdb.getPositions(asNumpy=True), _stem(pdbPath))


def _amberSystem(prmtopPath, inpcrdPath, pdbPath, solventModel, nonbondedMethod):
    if (inpcrdPath is None) == (pdbPath is None):
        raise ValueError("a prmtop file needs coordinates from exactly one of an inpcrd or a PDB file")
    prmtop = app.AmberPrmtopFile(prmtopPath)
    coordinates = app.AmberInpcrdFile(inpcrdPath) if inpcrdPath else app.PDBFile(pdbPath)
    implicitModel = getattr(app, solventModel) if solventModel else None
    system = prmtop.createSystem(
        nonbondedMethod=_defaultNonbondedMethod(prmtop.topology, nonbondedMethod),
        constraints=app.HBonds,
        rigidWater=True,
        implicitSolvent=implicitModel,
    )
    positions = coordinates.getPositions(asNumpy=True)
    if len(positions) != system.getNumParticles():
        raise ValueError(
            f"the coordinates have {len(positions)} atoms but {prmtopPath} has {system.getNumParticles()}"
        )
    return MolecularSystem(prmtop.topology, system, positions, _stem(prmtopPath))


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def harmonicChainSystem(
    n,
    mass=12.0 * unit.amu,
    k=1000.0 * unit.kilojoule_per_mole / unit.nanometer**2,
    spacing=0.3 * unit.nanometer,
    perpendicularFactor=100.0,
):
    """A chain of ``n`` particles on the x axis with fixed ends: a test system with known normal modes.

    Neighbours are joined by springs of stiffness ``k`` and rest length ``spacing``; the end particles are joined by
    the same spring to wall points one ``spacing`` beyond them. The starting positions are the minimum, where every
    spring is at rest length, so the springs add no stiffness across the chain, and the y and z coordinates feel only
    their tethers to 0, of stiffness ``perpendicularFactor * k``. The x modes then have the frequencies of
    :func:`harmonicChainFrequencies` and the y/z modes all have ``sqrt(perpendicularFactor * k / mass)``, which is
    above every x mode when ``perpendicularFactor > 4``.

    Parameters
    ----------
    n : int
        Number of particles.
    mass : Quantity or float
        Mass of each particle (amu).
    k : Quantity or float
        Spring stiffness (kJ/mol/nm²).
    spacing : Quantity or float
        Rest length of the springs (nm).
    perpendicularFactor : float
        Stiffness of the y and z tethers relative to ``k``.

    Returns
    -------
    MolecularSystem
        Carbon-like particles, one residue each, at x = 0, spacing, ..., (n - 1) spacing.

    Examples
    --------
    >>> chain = harmonicChainSystem(4)
    >>> [force.__class__.__name__ for force in chain.system.getForces()]
    ['CustomBondForce', 'CustomExternalForce', 'CustomExternalForce']
    """
    n = _positiveInt(n, "n")
    if perpendicularFactor <= 0:
        raise ValueError(f"perpendicularFactor must be positive, got {perpendicularFactor!r}")
    massValue = valueInUnit(mass, unit.amu)
    kValue = valueInUnit(k, unit.kilojoule_per_mole / unit.nanometer**2)
    spacingValue = valueInUnit(spacing, unit.nanometer)

    system = openmm.System()
    for _ in range(n):
        system.addParticle(massValue)
    system.addForce(_chainSprings(n, kValue, spacingValue))
    system.addForce(_wallSprings(n, kValue, spacingValue))
    system.addForce(_perpendicularTethers(n, perpendicularFactor * kValue))

    positions = np.zeros((n, 3))
    positions[:, 0] = spacingValue * np.arange(n)
    return MolecularSystem(_chainTopology(n), system, positions * unit.nanometer, f"harmonic-chain-{n}")


def _chainSprings(n, k, restLength):
    force = openmm.CustomBondForce("0.5*k*(r-r0)^2")
    force.addPerBondParameter("k")
    force.addPerBondParameter("r0")
    for i in range(n - 1):
        force.addBond(i, i + 1, [k, restLength])
    return force


def _wallSprings(n, k, restLength):
    force = openmm.CustomExternalForce("0.5*k*(sqrt((x-xWall)^2+y^2+z^2)-r0)^2")
    for name in ("k", "r0", "xWall"):
        force.addPerParticleParameter(name)
    force.addParticle(0, [k, restLength, -restLength])
    # With one particle the same particle is tethered to both walls.
    force.addParticle(n - 1, [k, restLength, n * restLength])
    return force


def _perpendicularTethers(n, kPerpendicular):
    force = openmm.CustomExternalForce("0.5*kPerpendicular*(y^2+z^2)")
    force.addPerParticleParameter("kPerpendicular")
    for i in range(n):
        force.addParticle(i, [kPerpendicular])
    return force


def _chainTopology(n):
    topology = app.Topology()
    chain = topology.addChain()
    atoms = []
    for i in range(n):
        residue = topology.addResidue("CHN", chain, id=str(i + 1))
        atoms.append(topology.addAtom("C", app.element.carbon, residue))
    for first, second in zip(atoms, atoms[1:]):
        topology.addBond(first, second)
    return topology


def harmonicChainFrequencies(n, mass=12.0 * unit.amu, k=1000.0 * unit.kilojoule_per_mole / unit.nanometer**2):
    """Analytic angular frequencies (1/ps, ascending) of the x modes of :func:`harmonicChainSystem`.

    ``omega_j = 2 sqrt(k / m) sin(pi j / (2n + 2))`` for j = 1..n; with k in kJ/mol/nm² and m in amu, sqrt(k/m) is
    in 1/ps.

    Examples
    --------
    >>> harmonicChainFrequencies(1, mass=1.0, k=4.0)
    array([2.82842712])
    """
    n = _positiveInt(n, "n")
    massValue = valueInUnit(mass, unit.amu)
    kValue = valueInUnit(k, unit.kilojoule_per_mole / unit.nanometer**2)
    j = np.arange(1, n + 1)
    return 2.0 * math.sqrt(kValue / massValue) * np.sin(np.pi * j / (2 * n + 2))
