"""The `vitbudget` command. One module per subcommand, each with `add_parser(sub)` and `run(args)`."""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Sequence

from .. import __version__, distributed
from ..errors import VitbudgetError
from . import bench, corrupt, counting, train, tune, viz
from . import export as export_
from . import eval as eval_
from . import speed

# subcommand name -> module; the order is the order of `vitbudget --help`
COMMANDS = {"eval": eval_, "train": train, "bench": bench, "viz": viz, "corrupt": corrupt, "make-counting": counting, "export": export_}
COMMANDS = {"tune": tune, **COMMANDS}  # the first command a new user with their own model runs
COMMANDS["speed"] = speed


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `vitbudget: error: ...`, exit 2, no usage dump (`--help` stays full).

    Subcommand parsers are this class too (argparse makes them with the parent's class).
    """

    def error(self, message: str):
        self.exit(2, f"vitbudget: error: {message} (see `{self.prog} --help`)\n" if distributed.reports_failure() else None)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vitbudget", description="Spend a Vision Transformer's compute where the tokens matter.")
    parser.add_argument("--version", action="version", version=f"vitbudget {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """parse_args, except that an unknown option names the subcommand and the closest valid options."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        flags = [f for f in sub._option_string_actions if f.startswith("--")]
        close = sorted({m for u in unknown if u.startswith("-") for m in difflib.get_close_matches(u.split("=")[0], flags, n=3, cutoff=0.7)})
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        sub.error(f"unrecognized argument(s) {' '.join(unknown)}{hint}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return COMMANDS[args.command].run(args)
    except VitbudgetError as exc:
        _erase_progress_bars()
        if distributed.reports_failure():
            message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            print(f"vitbudget: error: {distributed.rank_label()}{message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _erase_progress_bars()
        print("vitbudget: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if distributed.broken_by_peer(exc):
            return 1  # under torchrun: a collective broke because another rank failed, and that rank said why
        distributed.record_failure()  # a bug: its traceback follows; the other ranks' broken collectives stay quiet
        raise


def _erase_progress_bars() -> None:
    """Erase the progress bars an error interrupted (tqdm keeps the open ones), so that its line stands alone."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.leave = False
        bar.close()
