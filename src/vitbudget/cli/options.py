"""What every command shares: method-option flags, defaults from shared/, small validators.

Flag values are checked where argparse parses them (the `type=` functions below), so a bad
value is one `vitbudget: error: argument --x: ...` line and exit 2 before anything loads;
problems with what a flag names (a model, data, an output directory) are exit 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any, Callable

from ..data.loader import MAX_WORKERS
from ..defaults import DEFAULT_MODEL, default_path
from ..devices import DTYPES
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
            kind = {bool: parse_bool, float: finite_float}.get(kind, kind)
            group.add_argument(flag, dest=f"opt_{field.name}", type=kind, default=None,
                               help=field.metadata.get("help", f"{spec.name} option") + f" (default {field.default})")
    return names


_UNSET = object()


def add_common_flags(parser: argparse.ArgumentParser, *, out: Any = _UNSET, out_help: str = "output directory", device: bool = True,
                     dtype: Any = _UNSET, batch_size: Any = _UNSET, batch_help: str = "batch size") -> None:
    """The flags every command spells the same way, defined (and validated) here once.

    out: default output path (None: required); dtype: default precision (None: the recipe's);
    batch_size: default (None: the recipe's). A flag whose argument is left unset is not added.
    """
    if out is not _UNSET:
        parser.add_argument("--out", required=out is None, default=out, help=out_help + ("" if out is None else f" (default {out})"))
    if device:
        parser.add_argument("--device", type=device_arg, default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    if dtype is not _UNSET:
        parser.add_argument("--dtype", choices=list(DTYPES), default=dtype,
                            help="fp32, or bf16 / fp16 autocast (fp16: GPUs only); softmax, norms and ε terms stay float32"
                                 + (f" (default {dtype})" if dtype else " (default: the recipe's)"))
    if batch_size is not _UNSET:
        parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                            help=batch_help + (f" (default {batch_size})" if batch_size else " (default: the recipe's)"))


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    """--model, and --arch / --num-classes for plain timm state dicts."""
    parser.add_argument("--model", default=None, help=f"checkpoint (.safetensors with .json sidecar, or a timm state dict with --arch); default: shared {DEFAULT_MODEL}")
    parser.add_argument("--arch", default=None, help="architecture name for a plain timm state dict, e.g. deit_tiny_patch16_224")
    parser.add_argument("--num-classes", type=positive_int, default=None, help="override the head size of a --arch checkpoint")
    parser.add_argument("--img-size", type=positive_int, default=None,
                        help="run at this input size instead of the model's (position embeddings resampled once, bicubic)")


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
    if path is None and what == "data":  # outside the repository: CIFAR-10 from its official source
        print("vitbudget: note: no shared/ folder found: the default data is CIFAR-10, downloaded once into the cache (--data cifar10)",
              file=sys.stderr)
        return "cifar10"
    if path is None:
        raise ConfigError(f"no --{what} given and no shared/ directory found: pass --{what} (a file, a Hugging Face directory "
                          f"or hf-hub:ORG/NAME), or set VITBUDGET_SHARED")
    return path


def method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(get_spec(method).options)}
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None and k[4:] in fields}


# -- argparse `type=` functions: one clear line per bad value --
def bounded(kind: Callable[[str], Any], what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse `type=`: `kind(text)` where `ok` holds, else one line saying `what` was expected."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = bounded(int, "a positive integer", lambda v: v > 0)
nonnegative_int = bounded(int, "an integer >= 0", lambda v: v >= 0)
finite_float = bounded(float, "a finite number", math.isfinite)
positive_float = bounded(float, "a positive finite number", lambda v: math.isfinite(v) and v > 0)
nonnegative_float = bounded(float, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
workers_count = bounded(int, f"a number of worker processes from 0 to {MAX_WORKERS}", lambda v: 0 <= v <= MAX_WORKERS)


def device_arg(text: str) -> str:
    """A device this machine has (cpu, cuda[:N], mps); checked at parse time."""
    from ..devices import resolve_device

    try:
        return str(resolve_device(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def split_list(text: str) -> list[str]:
    """'test' or 'a,b,c': at least one non-empty split name, none twice."""
    splits = [s.strip() for s in text.split(",")]
    if not all(splits):
        raise argparse.ArgumentTypeError(f"expected split names separated by commas, got {text!r}")
    if len(set(splits)) != len(splits):
        raise argparse.ArgumentTypeError(f"a split is named twice in {text!r}")
    return splits


# -- data for a model: labels by class name --
def add_class_mismatch_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-class-mismatch", action="store_true",
                        help="evaluate even when class folders are not the model's classes (labels then follow sorted folder names)")


def open_dataset(path: str, split: str | None, model, transform, allow_class_mismatch: bool = False, said: set[str] | None = None):
    """ImageFolder whose labels are the model's output indices (by class name where the model has names).

    Prints a note on stderr whenever labels do not simply follow the model's own names; `said`
    collects the notes already printed, so a command opening several splits says each once.
    """
    from ..data import ImageFolder
    from ..errors import DataError

    headless = model.cfg.num_classes == 0  # a backbone: features are compared, labels unused
    dataset = ImageFolder(path, split, transform, label_names=None if headless else model.info.classes,
                          allow_class_mismatch=allow_class_mismatch, unlabeled=headless)
    if not headless and max(dataset.class_to_idx.values()) >= model.cfg.num_classes:
        raise DataError(f"the data has {len(dataset.classes)} class folders but the model only {model.cfg.num_classes} outputs "
                        f"(folders: {', '.join(dataset.classes)})")
    said = set() if said is None else said
    if dataset.label_note and dataset.label_note not in said:
        said.add(dataset.label_note)
        print(f"vitbudget: note: {dataset.label_note}", file=sys.stderr)
    return dataset


def label_source(dataset) -> str:
    """How a dataset's labels were assigned, for results files (see data.folder.class_labels)."""
    return "the model's class names" if dataset.labels_by_name else "sorted class-folder names"


def check_unused_options(args: argparse.Namespace, names: list[str]) -> None:
    """A method-option flag that none of the chosen methods has is a mistake, not a silent no-op."""
    given = {k[4:] for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    unused = given - {f.name for n in names for f in dataclasses.fields(get_spec(n).options)}
    if unused:
        raise ConfigError(f"option(s) {', '.join('--' + u.replace('_', '-') for u in sorted(unused))} apply to none of the methods {names}")


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
