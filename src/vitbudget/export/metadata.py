"""What travels inside an exported file: how to feed it, what its outputs mean, what made it.

A user with only the file (and onnxruntime) needs the input contract (size, normalisation,
layout), the class names, and which method with which options produced it. The same dict is
stored in both formats: ONNX `metadata_props` (one JSON value per key) and an extra file in the
`.pt2` archive.
"""
from __future__ import annotations

from typing import Any

import torch

from ..methods.base import Method
from ..methods.checkpoint import method_entry
from ..runtime.cost import dense_macs, macs_per_image
from ..runtime.runner import ExecutionRecord
from .trace import INPUT_NAME, OUTPUT_NAME, input_shape

FORMAT_VERSION = 1


def export_metadata(method: Method, tokens: dict[str, list[int]], record: ExecutionRecord, source: str | None = None) -> dict[str, Any]:
    """The metadata of `method` exported; `record` is an eager run's (FLOPs per image), `tokens` the graph's."""
    from .. import __version__

    model, cfg = method.model, method.base_cfg
    pre = model.info.preprocess.to_dict()
    _, chans, height, width = input_shape(method, 1)
    macs = float(macs_per_image(method.model.cfg, record).mean())
    return {
        "vitbudget_version": __version__,
        "format_version": FORMAT_VERSION,
        "method": method_entry(method),
        "model": {"name": model.info.name, "config": cfg.to_dict(), "source": source},
        "preprocess": {**pre, "img_size": cfg.img_size},
        "classes": list(model.info.classes or []),
        "input": {
            "name": INPUT_NAME, "shape": ["batch", chans, height, width], "dtype": "float32",
            "layout": f"NCHW RGB, resized and centre-cropped to {height}x{width}, scaled to [0, 1], then (x - mean) / std",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", cfg.num_classes], "meaning": "class logits (softmax for probabilities)"},
        "tokens": tokens,
        "gflops": macs / 1e9,
        "rel_flops": macs / dense_macs(cfg),
        "torch_version": torch.__version__,
    }
