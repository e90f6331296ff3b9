"""``nct metad``: well-tempered metadynamics on the slow modes of a trained model."""
from nct_openmm.cli import CommandError, checkStudentFeatures
from nct_openmm.cli.systemargs import addSystemArguments, molecularSystem
from nct_openmm.export import STUDENT_FEATURES
from nct_openmm.slowmodes import SlowModeModel
from nct_openmm.systems import getPlatform


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "metad", help="well-tempered metadynamics on a model's slowest modes",
        description="Run well-tempered metadynamics on the K slowest modes of MODEL (all modes in one TorchForce) "
                    "and write the CV time series, the bias, the free energy in mode space, a trajectory, "
                    "reweighting factors and OUT/summary.json (ns, ns_per_day, phi_transitions, delta_f).")
    parser.add_argument("--model", required=True, help="model file from 'nct train'")
    addSystemArguments(parser)
    parser.add_argument("--modes", type=int, default=2, help="slow modes to bias, 1-3 (default: 2)")
    parser.add_argument("--ns", type=float, required=True, help="simulated time in ns")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--temperature", type=float, help="K (default: the model's training temperature)")
    parser.add_argument("--bias-factor", type=float, default=6.0, help="well-tempered bias factor (default: 6)")
    parser.add_argument("--height", type=float, default=1.2, help="initial hill height in kJ/mol (default: 1.2)")
    parser.add_argument("--width", type=float, default=0.25, help="hill width in mode units (default: 0.25)")
    parser.add_argument("--frequency", type=int, default=250, help="steps between hills (default: 250)")
    parser.add_argument("--naive", action="store_true",
                        help="use openmm.app.Metadynamics with one TorchForce per mode (for comparison)")
    parser.add_argument("--student", action="store_true",
                        help="bias through a small network distilled from the flow (faster; its errors are reported)")
    parser.add_argument("--student-steps", type=int, default=6000,
                        help="distillation steps of --student (default: 6000, about 3 min on one core)")
    parser.add_argument("--student-features", choices=STUDENT_FEATURES, default="internal",
                        help="what --student reads: the flow's aligned internal coordinates (default) or all "
                             "interatomic distances (no alignment: fewer operations per step, most on a GPU)")
    parser.add_argument("--bias-stride", type=int, default=1,
                        help="apply the bias every n-th 2-fs step by multiple time stepping (default: 1; 4 kept "
                             "the free energy in the checks made, 8 did not for every CV: see the README)")
    parser.add_argument("--platform", help="OpenMM platform (default: the fastest available)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="on the CUDA platform, launch the bias's kernels one by one instead of replaying them "
                             "from a CUDA graph (slower; for an openmm-torch build whose graphs fail)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args):
    # Imported here: it loads openmm-torch, and a broken openmm-torch install must not take down the other commands.
    from nct_openmm.enhanced import SlowModeMetadynamicsSettings, runSlowModeMetadynamics

    getPlatform(args.platform)  # fail on a bad platform before anything slow
    if not 1 <= args.modes <= 3:
        raise CommandError(f"--modes must be 1, 2 or 3, got {args.modes}")
    if args.bias_stride < 1 or args.frequency % args.bias_stride:
        raise CommandError(f"--bias-stride must be a positive divisor of --frequency ({args.frequency}), "
                           f"got {args.bias_stride}")
    if args.naive and args.student:
        raise CommandError("--naive runs the plain comparison with the flow; it takes no --student")
    checkStudentFeatures(args)
    model = SlowModeModel.load(args.model)
    molecule = molecularSystem(args)
    settings = SlowModeMetadynamicsSettings(modes=args.modes, biasFactor=args.bias_factor, height=args.height,
                                            width=args.width, frequency=args.frequency, naive=args.naive,
                                            student=args.student, studentSteps=args.student_steps,
                                            studentFeatures=args.student_features,
                                            biasStride=args.bias_stride, cudaGraphs=not args.no_cuda_graphs)
    summary = runSlowModeMetadynamics(model, molecule, args.out, args.ns, args.temperature, settings,
                                      args.platform, args.seed, progress=not args.no_progress)
    print(f"{summary['ns']:g} ns of metadynamics on {args.modes} slow modes at {summary['ns_per_day']:.1f} ns/day "
          f"({summary['platform']}): {summary['phi_transitions']} phi transitions, "
          f"dF(phi>0 - phi<0) = {summary['delta_f']:.2f} +- {summary['delta_f_error']:.2f} kJ/mol; "
          f"outputs in {args.out}")
    return 0
