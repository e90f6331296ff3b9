"""``nct sample``: unbiased Langevin dynamics that writes ``traj.dcd`` and ``top.pdb`` for training.

Examples
--------
``nct sample --system ala2-vacuum --ns 1 --out data/ala2``

``nct sample --pdb protein.pdb --forcefield amber14-all.xml implicit/obc2.xml --ns 1 --out data/protein``

``nct sample --prmtop ala2.prmtop --inpcrd ala2.inpcrd --ns 1 --out data/ala2``

``nct sample --system ala2-vacuum --ns 8 --metadynamics --out data/ala2-biased`` (both Φ basins, with weights)
"""
import openmm.unit as unit

from nct_openmm.cli.systemargs import addSystemArguments, molecularSystem
from nct_openmm.simulate import DihedralMetadynamics, runLangevin
from nct_openmm.systems import getPlatform


def add_parser(subparsers):
    """Register the ``sample`` subcommand on ``subparsers``."""
    parser = subparsers.add_parser(
        "sample",
        help="run plain Langevin dynamics and save a trajectory for training",
        description="Run Langevin dynamics (LangevinMiddleIntegrator) and write OUT/traj.dcd and OUT/top.pdb.",
    )
    addSystemArguments(parser)
    parser.add_argument("--ns", type=float, required=True, help="length of the run in ns")
    parser.add_argument("--out", required=True, help="output folder (created if missing; its traj.dcd is replaced)")
    parser.add_argument("--temperature", type=float, default=300.0, help="temperature in K (default: 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--platform", help="OpenMM platform (default: the fastest available)")
    parser.add_argument("--precision", choices=("single", "mixed", "double"), help="CUDA/OpenCL precision")
    parser.add_argument("--threads", type=int, help="threads for the CPU platform")
    parser.add_argument("--timestep", type=float, default=2.0, help="time step in fs (default: 2)")
    parser.add_argument("--friction", type=float, default=1.0, help="friction in 1/ps (default: 1)")
    parser.add_argument("--report-interval", type=float, default=0.5, help="ps between saved frames (default: 0.5)")
    parser.add_argument("--no-minimize", action="store_true", help="start the dynamics without minimizing")
    parser.add_argument("--metadynamics", action="store_true",
                        help="bias the backbone (phi, psi) with well-tempered metadynamics so that both phi basins "
                             "are visited; writes OUT/weights.txt with per-frame reweighting factors for 'nct train "
                             "--weights'")
    parser.add_argument("--bias-factor", type=float, default=6.0, help="well-tempered bias factor (default: 6)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args):
    """Build the system named by ``args``, run the dynamics and print one line saying what was written."""
    # Checked before building the system, which can take seconds.
    platform = getPlatform(args.platform)
    molecule = molecularSystem(args)
    result = runLangevin(
        molecule,
        args.out,
        args.ns,
        temperature=args.temperature * unit.kelvin,
        seed=args.seed,
        platform=platform,
        timestep=args.timestep * unit.femtoseconds,
        friction=args.friction / unit.picosecond,
        reportInterval=args.report_interval * unit.picoseconds,
        minimize=not args.no_minimize,
        progress=not args.no_progress,
        precision=args.precision,
        threads=args.threads,
        metadynamics=DihedralMetadynamics(biasFactor=args.bias_factor) if args.metadynamics else None,
    )
    if result.weights:
        print(f"wrote reweighting factors to {result.weights}")
    print(
        f"wrote {result.nFrames} frames ({result.ns:g} ns of {molecule.name}, {molecule.nAtoms} atoms) "
        f"to {result.trajectory} with topology {result.topology}; {result.nsPerDay:.1f} ns/day on {result.platform}"
    )
    return 0
