"""The ``sparsesr`` command: parse arguments, call one library function, print, exit.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its arguments
and sets ``func`` to a ``_run_<name>(args) -> int`` that calls the library. Library
imports happen inside the runners so ``sparsesr upscale`` never pays for training code.
User errors (``SparseSRError``) become one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sparsesr import __version__
from sparsesr.errors import SparseSRError


# --- subcommands: one block each ------------------------------------------------------------


# (train, eval, ... are added here)


# --- entry point ----------------------------------------------------------------------------

_SUBCOMMANDS: list = []  # filled at the bottom of the file, in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsesr",
        description="Train, prune, export and run sparse super-resolution networks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SparseSRError as exc:
        print(f"sparsesr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparsesr {args.command}: interrupted", file=sys.stderr)
        return 130


_SUBCOMMANDS.extend([])

if __name__ == "__main__":
    sys.exit(main())
