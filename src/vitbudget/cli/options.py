"""What every command shares: method-option flags, defaults from shared/, small validators."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..defaults import default_path
from ..errors import ConfigError
from ..methods import METHODS, get_spec


def add_method_option_flags(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per option field of any registered method (shared names share a flag)."""
    names: list[str] = []
    group = parser.add_argument_group("method options (each applies to the methods that have it)")
    for spec in METHODS.values():
        for field in dataclasses.fields(spec.options):
            flag = "--" + field.name.replace("_", "-")
            if field.name in names or flag in parser._option_string_actions:  # e.g. train's own --seed
                continue
            names.append(field.name)
            kind = type(field.default) if field.default is not dataclasses.MISSING and field.default is not None else str
            kind = {bool: parse_bool}.get(kind, kind)
            group.add_argument(flag, dest=f"opt_{field.name}", type=kind, default=None,
                               help=field.metadata.get("help", f"{spec.name} option") + f" (default {field.default})")
    return names


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def resolve_default(value: str | None, relative: str, what: str) -> str:
    if value is not None:
        return value
    path = default_path(relative)
    if path is None:
        raise ConfigError(f"no --{what} given and no shared/ directory found (set VITBUDGET_SHARED)")
    return path


def method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(get_spec(method).options)}
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None and k[4:] in fields}


def check_repeats(args: argparse.Namespace) -> None:
    if args.latency_repeats <= 0 or args.throughput_repeats <= 0:
        raise ConfigError(f"--latency-repeats and --throughput-repeats must be positive, got {args.latency_repeats}, {args.throughput_repeats}")


def method_name(text: str) -> str:
    """argparse type of --method: a registered method, or a stack REDUCER+abs (e.g. tome+abs)."""
    try:
        get_spec(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} ({exc})") from None
    return text


def method_help(what: str) -> str:
    return f"{what}: one of {', '.join(sorted(METHODS))}, or a stack REDUCER+abs (e.g. tome+abs, evit+abs)"


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="run config written by `vitbudget tune` (method, options, model); flags given on the command line win")


def apply_run_config(args: argparse.Namespace, *, method_list: bool = False):
    """Fill what the command line left unset from `--config FILE`; returns the RunConfig (or None).

    --model (with --arch, --num-classes) comes from the file unless given. --method and its options
    come from the file unless --method is given (an explicit method replaces the file's, and the
    file's options with it); an option flag given on the command line overrides the file's value.
    """
    from ..runconfig import read_run_config

    if getattr(args, "config", None) is None:
        return None
    config = read_run_config(args.config)
    if getattr(args, "model", None) is None and config.model is not None:
        args.model = config.model
        for name in ("arch", "num_classes"):
            if hasattr(args, name) and getattr(args, name) is None:
                setattr(args, name, getattr(config, name))
    if hasattr(args, "method") and args.method is None:
        args.method = [config.method] if method_list else config.method
        for name, value in config.options.items():
            if getattr(args, f"opt_{name}", None) is None:
                setattr(args, f"opt_{name}", value)
    return config
