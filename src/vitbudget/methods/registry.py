"""Methods by name, each with a dataclass of options that the CLI turns into flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError
from .base import Baseline, Method


@dataclass(frozen=True)
class NoOptions:
    """The baseline takes no options."""


KINDS = ("baseline", "reducer", "refiner", "test-time", "stack")


@dataclass(frozen=True)
class MethodSpec:
    """Everything the CLI, tune, stacks, reports and checkpoints need to know about a method, in one place.

    kind: 'reducer' (drops, merges or halts tokens: can be followed by ABS in a stack), 'refiner'
    (ABS), 'test-time' (global test-time baselines), 'baseline', 'stack'. trains: it has learned
    parts, so its numbers mean something only after `recipe` trained them. Whether its shapes are
    data-dependent can depend on its options, so each Method answers `data_dependent_shapes` itself.
    """

    name: str
    build: Callable[[nn.Module, Any], Method]
    options: type
    summary: str
    label: str = ""
    kind: str = "reducer"
    trains: bool = False
    recipe: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")


METHODS: dict[str, MethodSpec] = {}
# Stacks `REDUCER+abs` are made on first use by methods.compose, which installs itself here on
# import (registry never imports compose: compose builds on registry, not the other way round).
_stack_resolver: Callable[[str], MethodSpec] | None = None


def set_stack_resolver(resolver: Callable[[str], MethodSpec]) -> None:
    global _stack_resolver
    _stack_resolver = resolver


def register(name: str, build: Callable[[nn.Module, Any], Method], options: type, summary: str, *, label: str = "",
             kind: str = "reducer", trains: bool = False, recipe: str | None = None) -> None:
    """Make a method known by `name` with its facts (see MethodSpec); the CLI's flags come from `options`."""
    METHODS[name] = MethodSpec(name, build, options, summary, label=label or name, kind=kind, trains=trains, recipe=recipe)


def names_of(kind: str) -> list[str]:
    """Registered methods of one kind, in registration order (e.g. the reducers a stack accepts)."""
    return [name for name, spec in METHODS.items() if spec.kind == kind]


register("baseline", lambda model, opts: Baseline(model, opts), NoOptions, "the unmodified ViT", label="Baseline", kind="baseline")


def make_options(name: str, values: dict[str, Any]) -> Any:
    """Build `name`'s options dataclass; an option the method does not have is an error."""
    spec = get_spec(name)
    fields = {f.name for f in dataclasses.fields(spec.options)}
    unknown = sorted(set(values) - fields)
    if unknown:
        flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise ConfigError(f"option(s) {flags} do not apply to method {name!r} (its options: {', '.join(sorted(fields)) or 'none'})")
    try:
        return spec.options(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid options for {name!r}: {exc}") from exc


def get_spec(name: str) -> MethodSpec:
    """A registered method, or a stack `REDUCER+abs` (methods.compose), made on first use."""
    if name in METHODS:
        return METHODS[name]
    if "+" in name and _stack_resolver is not None:
        return _stack_resolver(name)
    raise ConfigError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}, or a stack REDUCER+abs (e.g. tome+abs)")


def build_method(name: str, model: nn.Module, **options: Any) -> Method:
    """`build_method('baseline', model)`: the named method wrapped around a loaded ViT, in eval mode.

    Eval mode, like a loaded model: a method's training path (soft masks, Gumbel noise, dense
    halting) is what `train` asks for with `.train()`, never what a user gets by default.
    """
    return get_spec(name).build(model, make_options(name, options)).eval()
