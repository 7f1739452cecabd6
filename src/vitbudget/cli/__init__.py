"""The `vitbudget` command. One module per subcommand, each with `add_parser(sub)` and `run(args)`."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .. import __version__
from ..errors import VitbudgetError
from . import bench, corrupt, counting, train, tune, viz
from . import eval as eval_

# subcommand name -> module; the order is the order of `vitbudget --help`
COMMANDS = {"eval": eval_, "train": train, "bench": bench, "viz": viz, "corrupt": corrupt, "make-counting": counting}
COMMANDS = {"tune": tune, **COMMANDS}  # the first command a new user with their own model runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitbudget", description="Spend a Vision Transformer's compute where the tokens matter.")
    parser.add_argument("--version", action="version", version=f"vitbudget {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except VitbudgetError as exc:
        print(f"vitbudget: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vitbudget: interrupted", file=sys.stderr)
        return 130
