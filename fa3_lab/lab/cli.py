"""`python -m fa3_lab` — the lab's command line.

Each subcommand lives in its own module ``fa3_lab/lab/<name>.py`` that defines

* ``HELP``: one line for the command list,
* ``add_arguments(parser)``: its options (argparse),
* ``run(args) -> int``: the work; the exit status is returned.

Modules import torch, NumPy and friends inside ``run`` so that ``--help`` stays instant.
Bad input exits with status 2 and a one-line reason (argparse's own behaviour for unknown
subcommands and bad option values; :class:`UsageError` for checks made later).
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module.  Order is the order of `python -m fa3_lab --help`.
SUBCOMMANDS = ["info", "tour", "bench", "table3", "sass", "trace", "student"]


class UsageError(Exception):
    """Raised by a subcommand for bad input; printed as one line, exit status 2."""


def _available():
    for name in SUBCOMMANDS:
        try:
            yield name, importlib.import_module(f"fa3_lab.lab.{name}")
        except ModuleNotFoundError as e:  # a subcommand whose module has not landed yet
            if e.name != f"fa3_lab.lab.{name}":
                raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fa3_lab",
        description="fa3-lab: FlashAttention-3 from NumPy to a Hopper kernel.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, mod in _available():
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
