"""Export a ViT with its method to ONNX or a `torch.export` program, with the token savings kept.

    from vitbudget.export import export_method, load_exported
    result = export_method(method, "evit.onnx")     # or "evit.pt2", "evit.xml" (OpenVINO); format from the suffix
    run = load_exported("evit.onnx")                 # onnxruntime (CPU); run(images) -> logits
    run.metadata["preprocess"], run.metadata["classes"]

Only methods whose token counts are fixed by the input's shape export (every method but A-ViT's
removing path; A-ViT exports dense). The graph is traced once with a dynamic batch dimension;
the exported file is checked against PyTorch on a batch of another size before it is published.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..io import atomic_path
from ..methods.base import Method
from .metadata import export_metadata
from .onnx_file import OnnxRunner, check_opset, onnx_block_tokens, read_onnx_metadata, write_onnx
from .openvino_file import OpenVinoRunner, openvino_block_tokens, read_openvino_metadata, write_openvino
from .pt2_file import Pt2Runner, load_pt2, write_pt2
from .quantize import QUANTIZATION_NOTE, QUANTIZATIONS, check_quantize, quantize_onnx_int8
from .trace import EXAMPLE_BATCH, LogitsOnly, input_shape, program_block_tokens, trace

FORMATS = ("onnx", "torch-export", "openvino")
SUFFIXES = {".onnx": "onnx", ".pt2": "torch-export", ".xml": "openvino"}
VERIFY_BATCH = EXAMPLE_BATCH + 1  # another batch size than the traced one: the batch dimension must be free


@dataclass
class ExportResult:
    path: Path
    format: str
    metadata: dict[str, Any]
    max_abs_diff: float | None  # exported vs PyTorch logits on VERIFY_BATCH random images; None = not checked


def format_of(path: str | os.PathLike, fmt: str | None = None) -> str:
    """`fmt` if given, else from the suffix (.onnx, .pt2)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"cannot tell the format from {str(path)!r}: name it .onnx, .pt2 or .xml, or pass --format {'|'.join(FORMATS)}")
    return SUFFIXES[suffix]


def check_request(fmt: str, path: str | os.PathLike, opset: int | None) -> None:
    """What can be refused before anything is traced: an opset the exporter cannot write, or one for a non-ONNX file,
    and an OpenVINO IR not named .xml (its weights go beside it, as .bin)."""
    if opset is not None and fmt != "onnx":
        raise ConfigError(f"--opset applies to ONNX files only, not {fmt}")
    check_opset(opset)
    if fmt == "openvino" and Path(path).suffix.lower() != ".xml":
        raise ConfigError(f"an OpenVINO IR is an .xml file with its weights beside it in .bin; name the output .xml, not {str(path)!r}")


def export_method(
    method: Method, path: str | os.PathLike, fmt: str | None = None, *, source: str | None = None, verify: bool = True,
    opset: int | None = None, quantize: str | None = None,
) -> ExportResult:
    """Trace `method` (eval mode), write it atomically, and check the file reproduces PyTorch.

    `quantize="int8"` (ONNX only) stores the matrix products' weights as int8 (onnxruntime's dynamic
    quantization, `export.quantize`); `max_abs_diff` then measures the quantization error too.

    The file appears only once written and checked; with `verify`, the exported program runs on
    a fresh random batch of VERIFY_BATCH images and its largest logit difference is returned.
    ONNX verification needs onnxruntime; without it `max_abs_diff` is None.
    """
    fmt = format_of(path, fmt)
    check_request(fmt, path, opset)
    check_quantize(quantize, fmt)
    program = trace(method)
    tokens = program_block_tokens(program)
    device = next(iter(method.parameters()), torch.empty(0)).device
    images = torch.randn(*input_shape(method, VERIFY_BATCH), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        reference = method(images)
    metadata = export_metadata(method, tokens, reference.record, source)
    diff = None

    def check(runner) -> None:
        nonlocal diff
        if verify and runner is not None:
            diff = float((runner(images).to(reference.logits) - reference.logits).abs().max())

    if fmt == "openvino":
        write_openvino(program, path, metadata, verify=lambda xml: check(OpenVinoRunner(xml)))
        return ExportResult(Path(path), fmt, metadata, diff)
    with atomic_path(path) as tmp:
        if fmt == "onnx":
            write_onnx(program, tmp, metadata, opset)
            if quantize == "int8":
                quantize_onnx_int8(tmp, tmp)
                metadata = {**metadata, "quantization": QUANTIZATION_NOTE}
            runner = _onnx_runner_if_available(tmp)
        else:
            write_pt2(program, tmp, metadata)
            runner = Pt2Runner(tmp)
        check(runner)
    return ExportResult(Path(path), fmt, metadata, diff)


def _onnx_runner_if_available(path: Path) -> OnnxRunner | None:
    try:
        return OnnxRunner(path)
    except ConfigError:  # onnxruntime not installed: the file is written, just not checked
        return None


def _is_openvino(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".xml"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The vitbudget metadata of an exported file, any format."""
    if _is_openvino(path):
        return read_openvino_metadata(path)
    return load_pt2(path)[1] if zipfile.is_zipfile(path) else read_onnx_metadata(path)


def load_exported(path: str | os.PathLike, threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable images -> logits for an exported file (ONNX under onnxruntime CPU, .pt2, or OpenVINO .xml on CPU), with `.metadata`."""
    if _is_openvino(path):
        return OpenVinoRunner(path, threads=threads)
    return Pt2Runner(path) if zipfile.is_zipfile(path) else OnnxRunner(path, threads=threads)


def block_tokens(path: str | os.PathLike) -> dict[str, list[int]]:
    """Tokens entering each block's attention and MLP, read from the exported file's own graph."""
    if _is_openvino(path):
        return openvino_block_tokens(path)
    return program_block_tokens(load_pt2(path)[0]) if zipfile.is_zipfile(path) else onnx_block_tokens(path)


__all__ = [
    "ExportResult", "FORMATS", "LogitsOnly", "QUANTIZATIONS", "OnnxRunner", "OpenVinoRunner", "Pt2Runner", "block_tokens", "export_method", "format_of",
    "load_exported", "read_metadata", "trace",
]
