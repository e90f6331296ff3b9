"""``nct info``: the metadata and frequency spectrum of a model file."""
import json

from nct_openmm.slowmodes import SlowModeModel


def add_parser(subparsers):
    parser = subparsers.add_parser("info", help="print a model's metadata and frequency spectrum")
    parser.add_argument("model", help="model file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def run(args):
    info = SlowModeModel.load(args.model).summary()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    training = info.get("training", {})
    frequencies = info["frequencies"]
    print(f"model        {args.model}")
    print(f"atoms        {len(info['atom_indices'])} (indices {info['atom_indices']})")
    print(f"temperature  {info['temperature']:.2f} K")
    print(f"modes        {info['n_internal_modes']} internal coordinates of {3 * len(info['atom_indices'])} "
          "Cartesian ones")
    if training:
        print(f"training     {training.get('method')}; {training.get('train_frames')} frames, "
              f"validation NLL {training.get('best_validation_nll'):.4g}, {training.get('steps')} steps, "
              f"{training.get('seconds', 0):.0f} s")
    print(f"versions     {info.get('versions')}")
    print(f"spectrum ω [1/ps] (slowest first), span {frequencies[-1] / frequencies[0]:.3g}:")
    for k, omega in enumerate(frequencies):
        print(f"  {k:3d}  {omega:10.4g}")
    return 0
