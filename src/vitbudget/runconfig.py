"""Run-config files: a method, its options and the checkpoint it runs on, as one small JSON file.

`vitbudget tune` writes one for the setting it recommends; `eval`, `bench` (and `speed`, `export`)
read it with `--config FILE`, so the chosen setting is then measured on the test split exactly as
tuned. Flags given on the command line win over the file (see `cli.options.apply_run_config`).

    {"format": "vitbudget-run-config", "version": 1,
     "method": "tome+abs", "options": {"r": 4, "alpha": 0.2},
     "model": "/abs/path/model.safetensors", "arch": null, "num_classes": null,
     "batch_size": 1, "device": "cpu", "notes": {...what the tuner measured...}}

A relative "model" path is taken from the config file's folder. Everything is checked when the
file is read: unknown keys, an unknown method or option, a missing checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError
from .io import write_json

FORMAT = "vitbudget-run-config"
VERSION = 1


@dataclass(frozen=True)
class RunConfig:
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None  # checkpoint; None = the command's default
    arch: str | None = None  # timm architecture name of a plain state-dict checkpoint
    num_classes: int | None = None  # head size override for an --arch checkpoint
    batch_size: int | None = None  # the batch size a tuned speed-up was measured at
    device: str | None = None  # the device it was measured on
    notes: dict[str, Any] = field(default_factory=dict)  # free-form: what the tuner measured, the target

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}


def write_run_config(path: str | os.PathLike, config: RunConfig) -> Path:
    """Validate and write atomically."""
    _check(config, Path(path).parent, str(path))
    return write_json(path, config.to_dict())


def read_run_config(path: str | os.PathLike) -> RunConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ConfigError(f"config file {str(path)!r} is not a vitbudget run config (no \"format\": \"{FORMAT}\")")
    if raw.get("version") != VERSION:
        raise ConfigError(f"config file {str(path)!r} has version {raw.get('version')!r}; this vitbudget reads version {VERSION}")
    body = {k: v for k, v in raw.items() if k not in ("format", "version")}
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ConfigError(f"config file {str(path)!r}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if not isinstance(body.get("method"), str) or not isinstance(body.get("options", {}), dict):
        raise ConfigError(f"config file {str(path)!r}: needs \"method\" (a name) and \"options\" (an object)")
    config = RunConfig(**body)
    if config.model is not None and not Path(config.model).is_absolute():
        config = dataclasses.replace(config, model=str(path.parent / config.model))
    _check(config, path.parent, str(path))
    return config


def _check(config: RunConfig, base: Path, where: str) -> None:
    from .methods import make_options

    try:
        _check_option_types(config.method, config.options)
        make_options(config.method, config.options)
    except ConfigError as exc:
        raise ConfigError(f"config file {where!r}: {exc}") from None
    if config.model is not None:
        model = Path(config.model) if Path(config.model).is_absolute() else base / config.model
        if not model.exists():  # a checkpoint file, or a Hugging Face directory
            raise CheckpointError(f"config file {where!r}: checkpoint {config.model!r} not found")
    if config.batch_size is not None and (not isinstance(config.batch_size, int) or config.batch_size <= 0):
        raise ConfigError(f"config file {where!r}: batch_size must be a positive integer, got {config.batch_size!r}")


# JSON kinds an option of each Python type accepts (the type of its default, as the CLI's flags parse it)
_KINDS: dict[type, tuple[str, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a finite number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _check_option_types(method: str, options: dict[str, Any]) -> None:
    """A JSON value of the wrong kind ("r": 2.5 or "abc") fails here, not later inside the method.

    Options dataclasses check ranges, not types (a command-line flag is parsed to its type first).
    """
    from .methods import get_spec

    defaults = {f.name: f.default for f in dataclasses.fields(get_spec(method).options)}
    for name, value in options.items():
        kind = type(defaults.get(name))
        if kind in _KINDS and not _KINDS[kind][1](value):
            raise ConfigError(f"option {name!r} of {method!r} must be {_KINDS[kind][0]}, got {json.dumps(value)}")
