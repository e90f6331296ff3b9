"""The ``nct`` command line: a thin layer that parses arguments and calls the library.

Each subcommand lives in its own module of this package and exposes ``add_parser(subparsers)``, which registers the
subcommand and sets ``func`` (called with the parsed arguments, returning an exit code).
"""
import argparse
import importlib
import os
import pickle
import sys

import openmm

from nct_openmm.messages import error_line

#: Subcommand modules, in the order ``nct --help`` lists them.
SUBCOMMANDS = ("sample", "train", "info", "analyze", "export", "metad")


class CommandError(Exception):
    """A user-facing error: printed as one line, without a traceback."""


def checkOutputFolder(path, option):
    """Fail now, not after the work, when the file ``path`` cannot be written: its folder does not exist, or it is
    a folder itself."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CommandError(f"the folder of {option} does not exist: {folder}")
    if os.path.isdir(path):
        raise CommandError(f"{option} {path} is a folder; give a file name")


def checkStudentFeatures(args):
    """``--student-features`` only means something with ``--student``."""
    if args.student_features != "internal" and not args.student:
        raise CommandError("--student-features chooses what --student reads; add --student")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="nct",
        description="Learn slow collective variables with neural canonical transformations and bias OpenMM with them.",
    )
    from nct_openmm import __version__

    parser.add_argument("--version", action="version", version=f"nct_openmm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"nct_openmm.cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"nct_openmm.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (CommandError, ValueError, OSError, RuntimeError, ArithmeticError, pickle.UnpicklingError,
            openmm.OpenMMException) as error:
        # One line: the first of the message (OpenMM and torch append their own tracebacks below it).
        print(f"nct {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
