"""Int8 ONNX files: onnxruntime's dynamic quantization stacked on token reduction.

Dynamic quantization stores the weights of every MatMul / Gemm as int8 (per tensor, symmetric)
and quantizes their activations to uint8 at run time, per call: no calibration data, the token
savings untouched (the graph keeps its gathers, merges and smaller shapes). Only the matrix
products change, so the logits move by quantization error, not by a different computation.

Two repairs the quantizer needs on torch's dynamo-exported files: some of the exporter's
intermediate `value_info` entries disagree with ONNX shape inference (which the quantizer runs
first), so they are set aside while it runs and put back after (they carry the static token
counts that `block_tokens` reads); and the quantizer's own metadata entries are not JSON, so the
file gets the exported metadata back, plus a "quantization" entry.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import ConfigError

QUANTIZATIONS = ("int8",)
QUANTIZATION_NOTE = {"scheme": "dynamic", "weights": "int8 per tensor", "activations": "uint8, quantized per call",
                     "ops": ["MatMul", "Gemm"], "tool": "onnxruntime.quantization.quantize_dynamic"}


def check_quantize(quantize: str | None, fmt: str) -> None:
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZATIONS)}")
    if fmt != "onnx":
        raise ConfigError(f"--quantize {quantize} applies to ONNX files only (onnxruntime's dynamic quantization), not {fmt}")


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write `src` (an exported fp32 ONNX file) to `dst` with int8 dynamic quantization, metadata kept."""
    import onnx
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise ConfigError("--quantize int8 needs onnxruntime: pip install 'vitbudget[export]'") from None

    model = onnx.load(str(src))
    metadata = {p.key: p.value for p in model.metadata_props}
    declared = list(model.graph.value_info)
    del model.graph.value_info[:]
    with tempfile.TemporaryDirectory(dir=Path(dst).parent) as tmp:
        clean, quantized = Path(tmp) / "clean.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, str(clean))
        quantize_dynamic(str(clean), str(quantized), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        out = onnx.load(str(quantized))
    # the exporter's shapes back where the tensor still exists: they carry the static token counts
    # (`block_tokens` reads them) that re-inference through the pruning ops leaves symbolic
    produced = {name for node in out.graph.node for name in node.output}
    kept = [v for v in declared if v.name in produced]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    del out.metadata_props[:]
    for key, value in {**metadata, "quantization": json.dumps(QUANTIZATION_NOTE)}.items():
        entry = out.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(out, str(dst))
