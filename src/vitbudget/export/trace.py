"""Trace a method into one `torch.export` program: images in, logits out, batch size free.

Both file formats start here (ONNX is converted from this program), so they compute the same
graph. The method's own code runs unchanged while tracing: its record keeping (token counts,
drop maps, MACs) is traced too, but reaches no output, so the exported graph drops it.
"""
from __future__ import annotations

import contextlib
import io
import os
import logging
import re
import sys
import warnings
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..methods.base import Method
from ..methods.compiled import compile_support
from ..models.vit import unchecked_values

EXAMPLE_BATCH = 2  # traced with 2 images; 0 and 1 would be specialised into the graph
INPUT_NAME, OUTPUT_NAME = "images", "logits"
NORM_SCOPE = re.compile(r"(?:^|\.)model\.blocks\.(\d+)\.(norm1|norm2)(?:\.weight)?$")

@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence what torch's tracer and exporter log and warn on the way (a whole graph dumped with a
    data-dependent guard, the ONNX version converter's traceback, deprecations): nothing a user of
    vitbudget can act on. What fails is raised, and the CLI says it in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), _silenced_output():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


@contextlib.contextmanager
def _silenced_output() -> Iterator[None]:
    """stdout and stderr to nowhere, at the Python and the file-descriptor level (the tracer prints
    a failing graph from code that bypasses logging)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


class LogitsOnly(nn.Module):
    """A method as a function of images alone, which is what an exported file computes."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = method

    def forward(self, images: Tensor) -> Tensor:
        return self.method(images).logits


def input_shape(method: Method, batch: int) -> tuple[int, int, int, int]:
    """The images a method takes: the size of the model it was given (resolution scaling resizes inside)."""
    cfg = method.base_cfg
    return (batch, cfg.in_chans, cfg.img_size, cfg.img_size)


def check_exportable(method: Method) -> None:
    """Methods whose inference path has data-dependent shapes fail here, before tracing, with what to do instead."""
    reason = method.data_dependent_shapes
    if reason is not None:
        raise ConfigError(f"{method.name} cannot be exported: a static graph needs fixed token counts (data-dependent shapes): {reason}")


def trace(method: Method, device: torch.device | str | None = None) -> torch.export.ExportedProgram:
    """`torch.export` of the method in eval mode, with a dynamic batch dimension (1 and up).

    The input check for NaN / inf (a data-dependent host sync) stays out of the graph: callers of
    the exported file check their inputs themselves.
    """
    check_exportable(method)
    method.eval()
    if device is None:
        device = next(iter(method.parameters()), torch.empty(0)).device
    example = torch.randn(*input_shape(method, EXAMPLE_BATCH), device=device)
    batch = torch.export.Dim("batch", min=1)
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    try:
        with unchecked_values(method), quiet_torch():
            return torch.export.export(LogitsOnly(method), (example,), dynamic_shapes={INPUT_NAME: {0: batch}})
    except GuardOnDataDependentSymNode as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"{method.name} cannot be exported: its inference path has data-dependent shapes or control flow "
            f"({type(exc).__name__}: {first})"
        ) from None


def program_block_tokens(program: torch.export.ExportedProgram) -> dict[str, list[int]]:
    """Tokens entering each block's attention (norm1) and MLP (norm2), read off the traced graph's shapes.

    This is what the exported file will run, whatever the method's record says.
    """
    params = program.graph_signature.inputs_to_parameters
    found: dict[str, dict[int, int]] = {"norm1": {}, "norm2": {}}
    for node in program.graph.nodes:
        if node.op != "call_function" or "layer_norm" not in str(node.target) or len(node.args) < 3:
            continue
        weight = node.args[2]
        match = NORM_SCOPE.search(params.get(getattr(weight, "name", ""), ""))
        if match:
            found[match.group(2)].setdefault(int(match.group(1)), int(node.args[0].meta["val"].shape[1]))
    return tokens_by_block(found)


def tokens_by_block(found: dict[str, dict[int, int]]) -> dict[str, list[int]]:
    """{'attention': [...], 'mlp': [...]} in block order; blocks that ran more than once keep their first."""
    return {"attention": [found["norm1"][i] for i in sorted(found["norm1"])], "mlp": [found["norm2"][i] for i in sorted(found["norm2"])]}
