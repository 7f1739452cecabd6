"""What every command shares: method-option flags, defaults from shared/, small validators."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..defaults import DEFAULT_MODEL, default_path
from ..errors import ConfigError
from ..methods import METHODS


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


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """--model, and --arch / --num-classes for plain timm state dicts."""
    parser.add_argument("--model", default=None, help=f"checkpoint (.safetensors with .json sidecar, or a timm state dict with --arch); default: shared {DEFAULT_MODEL}")
    parser.add_argument("--arch", default=None, help="architecture name for a plain timm state dict, e.g. deit_tiny_patch16_224")
    parser.add_argument("--num-classes", type=int, default=None, help="override the head size of a --arch checkpoint")


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
    fields = {f.name for f in dataclasses.fields(METHODS[method].options)}
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None and k[4:] in fields}


def check_repeats(args: argparse.Namespace) -> None:
    if args.latency_repeats <= 0 or args.throughput_repeats <= 0:
        raise ConfigError(f"--latency-repeats and --throughput-repeats must be positive, got {args.latency_repeats}, {args.throughput_repeats}")


def check_unused_options(args: argparse.Namespace, names: list[str]) -> None:
    """A method-option flag that none of the chosen methods has is a mistake, not a silent no-op."""
    given = {k[4:] for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    unused = given - {f.name for n in names for f in dataclasses.fields(METHODS[n].options)}
    if unused:
        raise ConfigError(f"option(s) {', '.join('--' + u.replace('_', '-') for u in sorted(unused))} apply to none of the methods {names}")
