"""``nct export``: write the slow modes of a model as a TorchScript collective variable."""
import torch

from nct_openmm.cli import checkOutputFolder, checkStudentFeatures
from nct_openmm.export import STUDENT_FEATURES, export_slow_modes, export_student
from nct_openmm.slowmodes import SlowModeModel


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "export", help="write the K slowest modes as a TorchScript CV (for openmm-torch TorchForce)",
        description="The file loads with torch.jit.load; forward(positions (N, 3) nm, boxvectors=None) returns the "
                    "K slowest modes, scaled to unit variance, slowest first.")
    parser.add_argument("model", help="model file")
    parser.add_argument("--modes", type=int, default=2, help="number of slow modes (default: 2)")
    parser.add_argument("--out", required=True, help="TorchScript file to write")
    parser.add_argument("--double", action="store_true", help="compute in float64 (default: float32)")
    parser.add_argument("--student", action="store_true",
                        help="export a small network distilled from the flow (fast at MD time; prints its errors)")
    parser.add_argument("--student-steps", type=int, default=6000,
                        help="distillation steps of --student (default: 6000, about 3 min on one core)")
    parser.add_argument("--student-features", choices=STUDENT_FEATURES, default="internal",
                        help="what --student reads: the flow's aligned internal coordinates (default) or all "
                             "interatomic distances (no alignment: fewer operations per step, most on a GPU)")
    parser.set_defaults(func=run)


def run(args):
    checkStudentFeatures(args)
    checkOutputFolder(args.out, "--out")  # before a distillation of minutes
    model = SlowModeModel.load(args.model)
    dtype = torch.float64 if args.double else torch.float32
    if args.student:
        report = export_student(model, args.out, args.modes, dtype, steps=args.student_steps,
                                features=args.student_features)
        print(f"distilled student on {args.student_features} features: rms error "
              f"{report['value_rms_thermal']:.3f} (thermal), {report['value_rms']:.3f} (slow modes spread "
              f"x{report['spread']:g}) mode units; gradient error {100 * report['gradient_relative']:.1f} %")
    else:
        export_slow_modes(model, args.out, args.modes, dtype)
    print(f"wrote {args.out}: {args.modes} slowest modes of {args.model} "
          f"(ω = {', '.join(f'{w:.3g}' for w in model.frequencies[:args.modes])} 1/ps)")
    return 0
