"""Tests of nct_openmm.systems: platform choice, built-in and user systems, the harmonic chain's normal modes."""
import numpy as np
import openmm
import openmm.app as app
import openmm.unit as unit
import pytest

from nct_openmm import systems


def test_get_platform_by_name_is_case_insensitive():
    assert systems.getPlatform("reference").getName() == "Reference"


def test_get_platform_default_is_the_fastest():
    assert systems.getPlatform().getName() == systems.availablePlatforms()[-1]


def test_unknown_platform_lists_the_available_ones():
    with pytest.raises(ValueError, match="'Nonsense'.*available platforms: .*Reference"):
        systems.getPlatform("Nonsense")


def test_missing_gpu_platform_explains_the_plugin_failure():
    if "CUDA" in systems.availablePlatforms():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="'CUDA' is not available") as error:
        systems.getPlatform("CUDA")
    if openmm.Platform.getPluginLoadFailures():
        assert "libOpenMMCUDA" in str(error.value)
    assert "\n" not in str(error.value)


def test_platform_properties():
    assert systems.platformProperties(systems.getPlatform("Reference")) == {}
    assert systems.platformProperties(systems.getPlatform("CPU"), threads=1) == {"Threads": "1"}
    with pytest.raises(ValueError, match="no Precision property"):
        systems.platformProperties(systems.getPlatform("CPU"), precision="double")
    with pytest.raises(ValueError, match="positive integer"):
        systems.platformProperties(systems.getPlatform("CPU"), threads=0)


def _constraintsAreHBonds(molecularSystem):
    atoms = list(molecularSystem.topology.atoms())
    hydrogen = app.element.hydrogen
    for i in range(molecularSystem.system.getNumConstraints()):
        first, second, _ = molecularSystem.system.getConstraintParameters(i)
        if hydrogen not in (atoms[first].element, atoms[second].element):
            return False
    return True


@pytest.mark.parametrize(
    "name, nAtoms, extraForce",
    [("ala2-vacuum", 22, None), ("ala2-implicit", 22, "GBSAOBCForce"), ("ala2-explicit", 2269, "NonbondedForce")],
)
def test_builtin_systems(name, nAtoms, extraForce):
    molecularSystem = systems.builtinSystem(name)
    assert molecularSystem.name == name
    assert molecularSystem.nAtoms == nAtoms == molecularSystem.topology.getNumAtoms()
    assert molecularSystem.positions.shape == (nAtoms, 3)
    nHydrogens = sum(atom.element == app.element.hydrogen for atom in molecularSystem.topology.atoms())
    # HBonds: one constraint per hydrogen, plus the H-H distance of each rigid water.
    nWaters = (nAtoms - 22) // 3
    assert molecularSystem.system.getNumConstraints() == nHydrogens + nWaters
    assert _constraintsAreHBonds(molecularSystem)
    forceNames = {force.__class__.__name__ for force in molecularSystem.system.getForces()}
    if extraForce:
        assert extraForce in forceNames
    assert molecularSystem.system.usesPeriodicBoundaryConditions() == (name == "ala2-explicit")


def test_unknown_builtin_system_lists_the_choices():
    with pytest.raises(ValueError, match="'ala3'.*ala2-vacuum, ala2-implicit, ala2-explicit"):
        systems.builtinSystem("ala3")


def _finiteDifferenceHessian(molecularSystem, step=1e-4):
    """Hessian (kJ/mol/nm²) from central differences of the OpenMM forces on Reference (double precision)."""
    context = openmm.Context(
        molecularSystem.system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    x0 = molecularSystem.positions.value_in_unit(unit.nanometer).ravel()
    hessian = np.empty((x0.size, x0.size))

    def forces(x):
        context.setPositions(x.reshape(-1, 3))
        state = context.getState(getForces=True)
        return state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer).ravel()

    for i in range(x0.size):
        shift = np.zeros_like(x0)
        shift[i] = step
        hessian[i] = -(forces(x0 + shift) - forces(x0 - shift)) / (2 * step)
    return 0.5 * (hessian + hessian.T)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_harmonic_chain_frequencies_match_the_openmm_hessian(n):
    mass, k, factor = 12.0, 1000.0, 100.0
    chain = systems.harmonicChainSystem(n, mass=mass * unit.amu, k=k, perpendicularFactor=factor)
    hessian = _finiteDifferenceHessian(chain)
    masses = np.array([chain.system.getParticleMass(i).value_in_unit(unit.amu) for i in range(n)])
    inverseSqrtMass = np.repeat(masses, 3) ** -0.5
    eigenvalues = np.linalg.eigvalsh(hessian * np.outer(inverseSqrtMass, inverseSqrtMass))
    omega = np.sqrt(eigenvalues)

    np.testing.assert_allclose(omega[:n], systems.harmonicChainFrequencies(n, mass=mass, k=k), rtol=1e-6)
    np.testing.assert_allclose(omega[n:], np.sqrt(factor * k / mass), rtol=1e-6)


def test_harmonic_chain_starts_at_its_minimum():
    chain = systems.harmonicChainSystem(4)
    reference = openmm.Platform.getPlatformByName("Reference")
    context = openmm.Context(chain.system, openmm.VerletIntegrator(0.001), reference)
    context.setPositions(chain.positions)
    state = context.getState(getEnergy=True, getForces=True)
    assert state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) == pytest.approx(0.0, abs=1e-12)
    forces = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    np.testing.assert_allclose(forces, 0.0, atol=1e-9)
    assert chain.topology.getNumAtoms() == 4 and chain.topology.getNumBonds() == 3


def test_harmonic_chain_frequencies_are_ascending_and_in_inverse_ps():
    omega = systems.harmonicChainFrequencies(3, mass=1.0 * unit.dalton, k=1.0)
    assert np.all(np.diff(omega) > 0)
    np.testing.assert_allclose(omega, 2 * np.sin(np.pi * np.arange(1, 4) / 8))


@pytest.fixture
def ala2Pdb(tmp_path):
    ala2 = systems.builtinSystem("ala2-vacuum")
    path = tmp_path / "ala2.pdb"
    with open(path, "w") as handle:
        app.PDBFile.writeFile(ala2.topology, ala2.positions, handle)
    return str(path)


def test_user_system_from_pdb_and_forcefield(ala2Pdb):
    ala2 = systems.userSystem(pdb=ala2Pdb, forcefield=["amber14-all.xml"])
    assert ala2.name == "ala2"
    assert ala2.nAtoms == 22
    assert ala2.system.getNumConstraints() == 12
    assert not ala2.system.usesPeriodicBoundaryConditions()


def test_user_system_pdb_with_implicit_solvent(ala2Pdb):
    ala2 = systems.userSystem(pdb=ala2Pdb, forcefield=["amber14-all.xml"], implicitSolvent=app.OBC2)
    assert "CustomGBForce" in {force.__class__.__name__ for force in ala2.system.getForces()}


def test_user_system_from_amber_files(ala2Pdb):
    testsystems = systems._openmmtoolsTestsystems()
    prmtop = testsystems.get_data_filename("data/alanine-dipeptide-gbsa/alanine-dipeptide.prmtop")
    fromInpcrd = systems.userSystem(
        prmtop=prmtop, inpcrd=testsystems.get_data_filename("data/alanine-dipeptide-gbsa/alanine-dipeptide.crd")
    )
    fromPdb = systems.userSystem(prmtop=prmtop, pdb=ala2Pdb, implicitSolvent="OBC2")
    assert fromInpcrd.nAtoms == fromPdb.nAtoms == 22
    np.testing.assert_allclose(
        fromInpcrd.positions.value_in_unit(unit.nanometer), fromPdb.positions.value_in_unit(unit.nanometer), atol=1e-3
    )


def test_user_system_errors(tmp_path, ala2Pdb):
    with pytest.raises(FileNotFoundError, match="missing.pdb"):
        systems.userSystem(pdb=str(tmp_path / "missing.pdb"))
    with pytest.raises(ValueError, match="cannot read force field"):
        systems.userSystem(pdb=ala2Pdb, forcefield=["no-such-forcefield.xml"])
    with pytest.raises(ValueError, match="unknown implicit-solvent model 'GB99'"):
        systems.userSystem(pdb=ala2Pdb, implicitSolvent="GB99")
    with pytest.raises(ValueError, match="needs a prmtop"):
        systems.userSystem(inpcrd=ala2Pdb)
    with pytest.raises(ValueError, match="give a PDB file"):
        systems.userSystem()
