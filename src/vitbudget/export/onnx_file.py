"""ONNX files, converted from the `torch.export` program by torch's dynamo exporter (onnxscript).

Why that exporter: it converts the very program the `.pt2` format saves (one trace, two
formats), and it is the one PyTorch maintains; the TorchScript exporter (`dynamo=False`) is in
maintenance and fails on ToMe (`aten::scatter` with a boolean value has no alias analysis).
Merging is scatter-add then divide, which maps to ONNX ScatterElements(reduction="add") (opset
16+); nothing uses a mean-reducing scatter, which ONNX lacks (onnx/onnx#5100).
"""
from __future__ import annotations

import ast
import json
import os
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError
from .trace import INPUT_NAME, NORM_SCOPE, OUTPUT_NAME, quiet_torch, tokens_by_block

EXTRA = "pip install 'vitbudget[export]'"
# Opsets the dynamo exporter writes: it converts from its own (18, torchlib's) to the one asked for.
# Below 18 that conversion fails (no down-adapter for LayerNormalization, ReduceMean) and torch then
# silently keeps 18, so lower opsets are refused up front; above torch's maximum it has no registry.
MIN_OPSET = 18
MAX_OPSET = getattr(getattr(torch.onnx, "_constants", None), "ONNX_MAX_OPSET", 23)


def check_opset(opset: int | None) -> None:
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(f"ONNX opset {opset} is not supported: torch {torch.__version__}'s exporter writes opsets {MIN_OPSET} to {MAX_OPSET} "
                          "(default: its own choice)")


def require(module: str, purpose: str):
    """Import an optional package, or fail with the install line."""
    try:
        return __import__(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the optional package {module!r}: {EXTRA}") from None


def write_onnx(program: torch.export.ExportedProgram, path: str | os.PathLike, metadata: dict[str, Any], opset: int | None = None) -> None:
    """Convert and save; every top-level metadata entry becomes one `metadata_props` key (JSON value)."""
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export")
    check_opset(opset)
    with quiet_torch():
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, output_names=[OUTPUT_NAME], verbose=False)
    written = onnx_program.model.opset_imports.get("", None)
    if opset is not None and written != opset:  # the converter failed and torch kept its own opset
        raise ConfigError(f"torch's ONNX exporter could not write opset {opset} for this model (it made opset {written}); "
                          f"use --opset {written} or leave it unset")
    onnx_program.model.metadata_props.update({key: json.dumps(value) for key, value in metadata.items()})
    onnx_program.save(str(path))


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, Any]:
    onnx = require("onnx", "reading ONNX metadata")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {str(path)!r} as an ONNX model: {exc}") from exc
    return {p.key: json.loads(p.value) for p in model.metadata_props}


def onnx_block_tokens(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tokens entering each block's attention and MLP, from the shapes the ONNX file declares.

    A LayerNormalization belongs to `blocks.i.norm1` / `norm2` by the exporter's name scopes, or
    else by its weight's initializer name; its input is (batch, tokens, dim).
    """
    onnx = require("onnx", "reading ONNX shapes")
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in [*graph.value_info, *graph.input, *graph.output]}
    found: dict[str, dict[int, int]] = {"norm1": {}, "norm2": {}}
    for node in graph.node:
        if node.op_type != "LayerNormalization":
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta["pkg.torch.onnx.name_scopes"]) if "pkg.torch.onnx.name_scopes" in meta else []
        for name in [*scopes, node.input[1]]:
            match = NORM_SCOPE.search(name)
            if match and node.input[0] in shapes:
                found[match.group(2)].setdefault(int(match.group(1)), int(shapes[node.input[0]][1]))
                break
    return tokens_by_block(found)


class OnnxRunner:
    """Logits of an ONNX file under onnxruntime (CPU) for a (B, C, H, W) batch, any B >= 1."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, spinning: bool = True):
        """threads: onnxruntime's intra-op pool (default: its own, the physical cores). spinning=False
        stops idle pool threads from busy-waiting, which matters when several sessions take turns."""
        ort = require("onnxruntime", "running ONNX files")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.metadata = {k: json.loads(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()}

    def __call__(self, images: Tensor) -> Tensor:
        array = images.detach().cpu().numpy()
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])
