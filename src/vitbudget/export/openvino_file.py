"""OpenVINO IR (`model.xml` + `model.bin`), read from the ONNX file that the same trace gives.

Why through ONNX and the runtime's own reader (`Core.read_model`) rather than `openvino.convert_model`:
the ONNX file is what the other formats are checked against (one trace, one graph), and
`convert_model` is the OVC tool, which sends usage telemetry unless the user opted out; the runtime
reader sends nothing. Weights stay float32 (`save_model` would halve them to fp16 by default) and
the runner asks the CPU plug-in for f32 inference (it picks bf16 on CPUs that have it), so the IR
reproduces PyTorch to float32 rounding. Metadata is stored as rt_info: one JSON string under `vitbudget`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from ..errors import CheckpointError, OutputError
from ..io import staging_dir_beside
from .onnx_file import require, write_onnx
from .trace import OUTPUT_NAME, tokens_by_block

SECTION = "vitbudget"


def write_openvino(program: torch.export.ExportedProgram, path: str | os.PathLike, metadata: dict[str, Any],
                   verify: Callable[[Path], None] | None = None) -> None:
    """Write `path` (.xml) and its .bin beside it; both appear only once written (and checked by `verify`).

    The pair is built in a temporary folder beside `path`; the .bin is moved first, so an .xml
    that exists always has its weights.
    """
    ov = require("openvino", "OpenVINO export")
    path = Path(path)
    work = staging_dir_beside(path)
    try:
        onnx_path, xml = work / "model.onnx", work / "model.xml"
        write_onnx(program, onnx_path, {})
        model = ov.Core().read_model(str(onnx_path))
        model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
        model.set_rt_info(json.dumps(metadata), [SECTION])
        ov.save_model(model, str(xml), compress_to_fp16=False)
        if verify is not None:
            verify(xml)
        os.replace(xml.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(xml, path)
    except OSError as exc:  # e.g. the disk filled up while writing
        path.with_suffix(".bin").unlink(missing_ok=True)
        raise OutputError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _read(path: str | os.PathLike):
    ov = require("openvino", "running OpenVINO files")
    core = ov.Core()
    try:
        return ov, core, core.read_model(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable IR is the same problem for the user
        raise CheckpointError(f"cannot read {str(path)!r} as an OpenVINO IR: {exc}") from exc


def read_openvino_metadata(path: str | os.PathLike) -> dict[str, Any]:
    return _metadata(_read(path)[2])


def _metadata(model) -> dict[str, Any]:
    if not model.has_rt_info([SECTION]):
        return {}
    return json.loads(model.get_rt_info([SECTION]).astype(str))


def openvino_block_tokens(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tokens entering each block's attention and MLP, from the IR's own shapes.

    OpenVINO names nodes after ONNX's, not after the blocks, so the layer norms (MVN) are taken in
    the graph's order: norm1, norm2 of each block, then the final norm. Methods that add blocks
    (ABS's extra block) are read past the model's depth and dropped.
    """
    _, _, model = _read(path)
    widths = [int(op.input(0).get_partial_shape()[1].get_length()) for op in model.get_ordered_ops() if op.get_type_name() == "MVN"]
    depth = _metadata(model)["model"]["config"]["depth"]
    return tokens_by_block({"norm1": dict(enumerate(widths[0:2 * depth:2])), "norm2": dict(enumerate(widths[1:2 * depth:2]))})


class OpenVinoRunner:
    """Logits of an OpenVINO IR on the CPU plug-in, in float32, for a (B, C, H, W) batch, any B >= 1."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        ov, core, model = _read(path)
        self.metadata = _metadata(model)
        config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})}
        self.compiled = core.compile_model(model, "CPU", config)

    def __call__(self, images: Tensor) -> Tensor:
        array = images.detach().cpu().numpy()
        return torch.from_numpy(self.compiled([array])[self.compiled.output(0)].copy())
