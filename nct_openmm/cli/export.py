"""``nct export``: write the slow modes of a model as a TorchScript collective variable."""
import torch

from nct_openmm.export import export_slow_modes
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
    parser.set_defaults(func=run)


def run(args):
    model = SlowModeModel.load(args.model)
    export_slow_modes(model, args.out, args.modes, torch.float64 if args.double else torch.float32)
    print(f"wrote {args.out}: {args.modes} slowest modes of {args.model} "
          f"(ω = {', '.join(f'{w:.3g}' for w in model.frequencies[:args.modes])} 1/ps)")
    return 0
