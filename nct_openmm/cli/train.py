"""``nct train``: maximum-likelihood NCT of the slow modes of a molecule from trajectories.

Examples
--------
``nct train --traj run1.dcd run2.dcd --top top.pdb --temperature 300 --out model.pt``
"""
from nct_openmm.cli import CommandError, checkOutputFolder
from nct_openmm.data import load_trajectories
from nct_openmm.slowmodes import NCT


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "train", help="learn slow modes from trajectories (maximum likelihood in phase space)",
        description="Train an NCT model on trajectories and write it as one self-contained model file. The "
                    "validation split holds out whole trajectories when several are given.")
    parser.add_argument("--traj", nargs="+", required=True, help="trajectory files (any format mdtraj reads)")
    parser.add_argument("--top", required=True, help="topology file (PDB, prmtop, ...)")
    parser.add_argument("--select", default=None, help="mdtraj selection (default: heavy atoms of the solute)")
    parser.add_argument("--temperature", type=float, required=True, help="temperature of the data in K")
    parser.add_argument("--out", required=True, help="model file to write")
    parser.add_argument("--weights", nargs="+", help="per-frame weight files (one column), one per trajectory")
    parser.add_argument("--stride", type=int, default=1, help="read every STRIDE-th frame (default: 1)")
    parser.add_argument("--max-frames", type=int, help="subsample each trajectory to at most this many frames")
    parser.add_argument("--epochs", type=int, default=200,
                        help="upper bound on passes over the training frames (default: 200; early stopping "
                             "usually ends sooner)")
    parser.add_argument("--batch-size", type=int, default=256, help="frames per step (default: 256)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    parser.add_argument("--couplings", type=int, default=8, help="RealNVP couplings (default: 8)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units per conditioner layer (default: 64)")
    parser.add_argument("--patience", type=int, default=10, help="evaluations without improvement before stopping")
    parser.add_argument("--validation", type=float, default=0.2,
                        help="fraction of the trajectories held out for validation, whole ones; of one trajectory, "
                             "its last frames (default: 0.2)")
    parser.add_argument("--no-align", action="store_true",
                        help="keep rigid-body coordinates (only for systems held in space by external forces)")
    parser.add_argument("--checkpoint", help="checkpoint file; training resumes from it when it exists")
    parser.add_argument("--compile", action="store_true",
                        help="compile the training loss with torch.compile: faster steps after a compilation of tens "
                             "of seconds (needs a C++ compiler on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args):
    for name in ("batch_size", "epochs"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    checkOutputFolder(args.out, "--out")
    if args.checkpoint:
        checkOutputFolder(args.checkpoint, "--checkpoint")
    data = load_trajectories(args.traj, args.top, selection=args.select, stride=args.stride,
                             max_frames=args.max_frames, weights=args.weights)
    train, validation = data.split_by_trajectory(args.validation, args.seed)
    steps_per_epoch = max(1, train.n_frames // args.batch_size)
    estimator = NCT(args.temperature, n_couplings=args.couplings, hidden=args.hidden, align=not args.no_align,
                    batch_size=args.batch_size, max_steps=args.epochs * steps_per_epoch, lr=args.lr,
                    patience=args.patience, seed=args.seed, checkpoint=args.checkpoint,
                    progress=not args.no_progress, compile_loss=args.compile)
    model = estimator.fit(train, validation).fetch_model()
    model.save(args.out)
    summary = model.metadata["training"]
    frequencies = ", ".join(f"{w:.3g}" for w in model.frequencies[:4])
    print(f"wrote {args.out}: {len(model.atom_indices)} atoms, {model.n_modes} internal modes, "
          f"{summary['train_frames']} training / {summary['validation_frames']} validation frames, "
          f"validation NLL {summary['best_validation_nll']:.4g} after {summary['steps']} steps "
          f"({summary['stopped']}); slowest ω [1/ps]: {frequencies}")
    return 0
