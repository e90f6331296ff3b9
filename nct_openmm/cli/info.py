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
        print(f"training     {_trainingLine(training)}")
    print(f"versions     {info.get('versions')}")
    print(f"spectrum ω [1/ps] (slowest first), span {frequencies[-1] / frequencies[0]:.3g}:")
    for k, omega in enumerate(frequencies):
        print(f"  {k:3d}  {omega:10.4g}")
    return 0


def _trainingLine(training):
    """What the training did, with the figures its method records (a variational fit has no validation NLL)."""
    figures = [f"{training['train_frames']} frames"] if "train_frames" in training else []
    if isinstance(training.get("best_validation_nll"), (int, float)):
        figures.append(f"validation NLL {training['best_validation_nll']:.4g}")
    if isinstance(training.get("free_energy"), (int, float)):
        figures.append(f"free energy {training['free_energy']:.4g} kT")
    figures.append(f"{training.get('steps')} steps, {training.get('seconds', 0):.0f} s")
    return f"{training.get('method')}; " + ", ".join(figures)
