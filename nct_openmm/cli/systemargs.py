"""The molecule a command simulates: the same options and the same System for ``nct sample`` and ``nct metad``, so
that a model is biased in the Hamiltonian its training data came from."""
from nct_openmm.cli import CommandError
from nct_openmm.systems import BUILTIN_SYSTEMS, IMPLICIT_SOLVENT_FILES, builtinSystem, userSystem


def addSystemArguments(parser):
    """Add ``--system``, ``--pdb``, ``--prmtop``, ``--forcefield``, ``--inpcrd`` and ``--implicit-solvent``."""
    parser.add_argument("--system", help=f"a built-in system: {', '.join(BUILTIN_SYSTEMS)}")
    parser.add_argument("--pdb", help="a PDB file with hydrogens (only coordinates when given with --prmtop)")
    parser.add_argument("--prmtop", help="an Amber topology file (coordinates from --inpcrd or --pdb)")
    parser.add_argument("--forcefield", nargs="+", help="force-field XML files for --pdb (default: amber14 + TIP3P-FB)")
    parser.add_argument("--inpcrd", help="Amber coordinates for --prmtop")
    parser.add_argument(
        "--implicit-solvent", choices=sorted(IMPLICIT_SOLVENT_FILES), help="implicit solvent for --pdb or --prmtop"
    )


def molecularSystem(args):
    """The MolecularSystem the options of :func:`addSystemArguments` describe; CommandError for a bad combination."""
    if args.system is None:
        if args.pdb is None and args.prmtop is None:
            raise CommandError("give --system, --pdb or --prmtop")
        return userSystem(
            pdb=args.pdb,
            forcefield=args.forcefield,
            prmtop=args.prmtop,
            inpcrd=args.inpcrd,
            implicitSolvent=args.implicit_solvent,
        )
    fileOptions = {
        "--pdb": args.pdb,
        "--prmtop": args.prmtop,
        "--forcefield": args.forcefield,
        "--inpcrd": args.inpcrd,
        "--implicit-solvent": args.implicit_solvent,
    }
    conflicting = [flag for flag, value in fileOptions.items() if value is not None]
    if conflicting:
        raise CommandError(f"{', '.join(conflicting)} cannot be combined with --system")
    return builtinSystem(args.system)
