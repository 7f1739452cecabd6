"""A latency model of this machine: one block's time against its token count, measured once and cached.

Timing every candidate of a sweep round-robin is what makes `vitbudget tune` slow, and most
candidates cannot meet a speed target anyway. A ViT's time is its blocks' time, and a block's
time depends on how many tokens it runs (and on the machine: CPU kernels move in steps, not in
proportion to FLOPs). So measure the curve t(n) of one dense block at the user's batch size for
every token count once, plus the fixed part (embedding, final norm, head), and predict a candidate
from the widths its blocks actually executed (`ExecutionRecord.attn_width`, padding included):

    predicted time = fixed + sum over executed blocks of t(width)

The prediction leaves out what a method adds around the blocks (ToMe's matching, SPOT's
statistics): it is the time the method would take with free bookkeeping, an upper bound on its
speed-up, and tune only times candidates whose bound reaches the target. Curves are cached per
machine, torch version, thread count, device, block shape and batch size.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..data.archive import cache_root
from ..io import write_json
from .machine import machine_info
from .speed import time_interleaved

VERSION = 1  # bump when the measurement changes: old cache entries are then measured again


@dataclass(frozen=True)
class LatencyModel:
    """Seconds per call: `block[n - 1]` is one block at n tokens, `fixed` the model without its blocks."""

    block: tuple[float, ...]
    fixed: float
    batch_size: int

    def block_time(self, tokens: float) -> float:
        """One block at `tokens` tokens (rounded up: a padded width runs as the next whole count)."""
        n = min(len(self.block), max(1, int(-(-tokens // 1))))
        return self.block[n - 1]

    def predict(self, widths: Sequence[float]) -> float:
        """A forward whose blocks ran these token widths (one entry per executed block)."""
        return self.fixed + sum(self.block_time(w) for w in widths)

    def to_dict(self) -> dict[str, Any]:
        return {"block": list(self.block), "fixed": self.fixed, "batch_size": self.batch_size}


def cache_key(model, batch_size: int, device: str | torch.device) -> dict[str, Any]:
    """What the curve depends on: the machine, torch, threads, device, the block's shape, the batch."""
    cfg = model.cfg
    info = machine_info(device)
    shape = {k: getattr(cfg, k) for k in ("embed_dim", "num_heads", "mlp_hidden", "depth", "num_patches", "num_prefix_tokens",
                                          "qkv_bias", "qk_norm", "act_layer") if hasattr(cfg, k)}
    shape["layerscale"] = getattr(cfg, "init_values", None) is not None
    return {"version": VERSION, "cpu": info.get("gpu") or info["cpu"], "torch": info["torch"], "threads": info["torch_threads"],
            "device": str(device), "shape": shape, "batch_size": batch_size}


def cache_file(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_root() / "latency" / f"{digest}.json"


@torch.inference_mode()
def measure(model, batch_size: int, device: str | torch.device = "cpu", repeats: int = 5, progress: bool = True) -> LatencyModel:
    """Time model.blocks[0] at every token count 1..N (median of `repeats`), and the whole dense model.

    The fixed part is the dense forward minus depth blocks at N tokens (never below zero). Random
    inputs: a block's time depends on its shapes only.
    """
    cfg, block = model.cfg, model.blocks[0]
    total = cfg.num_patches + cfg.num_prefix_tokens
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, total, cfg.embed_dim, generator=g).to(device)
    times = []
    for n in tqdm(range(1, total + 1), desc=f"latency model (batch {batch_size}, 1-{total} tokens)", unit="count", disable=not progress):
        ts = time_interleaved({"block": block}, [x[:, :n]], warmup=1, repeats=repeats)["block"]
        times.append(statistics.median(ts))
    images = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
    dense = statistics.median(time_interleaved({"model": model}, [images], warmup=1, repeats=repeats)["model"])
    return LatencyModel(tuple(times), max(0.0, dense - cfg.depth * times[-1]), batch_size)


def load_or_measure(model, batch_size: int, device: str | torch.device = "cpu", progress: bool = True) -> tuple[LatencyModel, bool]:
    """The cached curve for this machine and shape, else a fresh measurement (then cached). Returns (model, was cached)."""
    key = cache_key(model, batch_size, device)
    path = cache_file(key)
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == json.loads(json.dumps(key, default=str)):
            return LatencyModel(tuple(saved["block"]), saved["fixed"], saved["batch_size"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    fitted = measure(model, batch_size, device, progress=progress)
    try:
        write_json(path, {"key": key, **fitted.to_dict()})
    except OSError:
        pass  # an unwritable cache costs a re-measurement next time, nothing else
    return fitted, False


@torch.inference_mode()
def executed_widths(method, images: torch.Tensor) -> list[float]:
    """The token width each block of `method` executed on `images` (attention width, padding included)."""
    record = method(images).record
    return [float(w) for w in record.attn_width]


__all__ = ["LatencyModel", "cache_file", "cache_key", "executed_widths", "load_or_measure", "measure"]
