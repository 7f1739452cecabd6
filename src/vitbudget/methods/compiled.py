"""A method under `torch.compile`, with the input validation kept eager, outside the graph.

Every method with fixed token counts (all but those whose `data_dependent_shapes` says why not:
A-ViT's removing path, and stacks refining after A-ViT) compiles into one graph per input shape:
`torch.compile(method, fullgraph=True)` finds no break on the hot path (tests/test_compile.py). The model's NaN / inf check reads the values
(a host sync that would split the graph), so the compiled region leaves it out and
`CompiledMethod` runs it eagerly first: bad input fails the same way, compiled or not.

The wrapper answers what callers ask of a method (`model`, `base_cfg`, `describe`, `name`,
`options`, `token_map`) and returns the method's own `RunOutput`, so evaluation, FLOPs and
speed code take either.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.runner import RunOutput
from .base import Method


def compile_support(method: Method) -> str | None:
    """Why `method` cannot compile into a graph without breaks (its `data_dependent_shapes`), or None when it can."""
    return method.data_dependent_shapes


class CompiledMethod(nn.Module):
    """`method` with its forward compiled; inputs are checked eagerly (shapes, dtype, NaN / inf) first.

    fullgraph: refuse graph breaks (an error at the first call) instead of splitting the graph;
    methods with data-dependent shapes (see `compile_support`) are compiled with breaks allowed.
    """

    def __init__(self, method: Method, *, fullgraph: bool | None = None, dynamic: bool | None = False,
                 mode: str | None = None, backend: str = "inductor"):
        super().__init__()
        self.method = method
        reason = compile_support(method)
        if fullgraph and reason:
            raise ConfigError(f"{method.name} cannot compile without graph breaks: {reason}")
        self.fullgraph = reason is None if fullgraph is None else fullgraph
        # not a submodule: the method's parameters are registered once, under `method`
        object.__setattr__(self, "compiled", torch.compile(method, fullgraph=self.fullgraph, dynamic=dynamic, mode=mode, backend=backend))

    def forward(self, images: Tensor) -> RunOutput:
        self.method.model.check_input(images, values=True)
        return self.compiled(images)

    # -- what callers read off a method --
    @property
    def model(self) -> nn.Module:
        return self.method.model

    @property
    def base_cfg(self):
        return self.method.base_cfg

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def options(self) -> Any:
        return self.method.options

    def describe(self) -> dict[str, Any]:
        return {**self.method.describe(), "compiled": True}

    def token_map(self, out: RunOutput):
        return self.method.token_map(out)


def compile_method(method: Method, **kwargs: Any) -> CompiledMethod:
    """`CompiledMethod(method, **kwargs)`: compiled on its first call, once per input shape."""
    return CompiledMethod(method, **kwargs)
