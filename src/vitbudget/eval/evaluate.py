"""Evaluate methods on a dataset: accuracy, calibration, FLOPs from executed tokens, speed.

Under torchrun the images are shared out by whole batches and the per-batch results gathered
back in order, so every number equals the single-process run's exactly; speed is timed on rank 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed
from ..data.loader import iterate, make_loader
from ..devices import autocast, resolve_device
from ..methods.base import Method
from . import metrics
from ..runtime.cost import dense_macs, executed_macs_per_image, macs_per_image
from .speed import speed_report, time_interleaved


@dataclass
class Predictions:
    logits: Tensor  # (N, C) float32
    labels: Tensor  # (N,)
    macs: Tensor  # (N,) float64, per image from its real token counts
    executed_macs: float  # mean per image including padding
    token_depth: Tensor  # (N,) float64, blocks executed per input token, averaged over the image's tokens
    features: bool = False  # `logits` are pooled features (a model without a head): nothing to score against labels

    def summary(self, base_macs: float) -> dict[str, float]:
        out = {} if self.features else metrics.summarize(self.logits, self.labels)
        out["gflops"] = float(self.macs.mean()) / 1e9
        out["gflops_p05"], out["gflops_p95"] = (float(q) / 1e9 for q in self.macs.quantile(torch.tensor([0.05, 0.95], dtype=torch.float64)))
        out["token_depth"] = float(self.token_depth.mean())
        out["gflops_executed"] = self.executed_macs / 1e9
        out["rel_flops"] = float(self.macs.mean()) / base_macs
        return out


@torch.inference_mode()
def predict(
    method: Method, dataset, indices: Sequence[int], batch_size: int = 256, workers: int | None = None,
    device: torch.device | str = "cpu", progress: bool = True, desc: str = "eval", dtype: torch.dtype | str = torch.float32,
) -> Predictions:
    """Run `method` over dataset[indices] in order; collect logits, labels and per-image FLOPs.

    Distributed: each rank runs whole batches of the single-process run (`distributed.deal_batches`)
    and every rank gets all of them back in order, so results do not depend on the process count.
    """
    method.eval()
    cfg = method.model.cfg
    mine = distributed.deal_batches(indices, batch_size)
    loader = make_loader(dataset, [i for _, batch in mine for i in batch], batch_size, workers)
    tokens_in = cfg.num_patches + cfg.num_prefix_tokens
    pieces = []  # (batch number, logits, labels, macs, executed macs x images, token depth)
    bar = tqdm(total=sum(len(batch) for _, batch in mine), desc=desc, unit="img", disable=not progress or not distributed.context().main, leave=False)
    for (number, _), (images, targets) in zip(mine, iterate(loader)):
        with autocast(device, dtype):  # a no-op for float32
            out = method(images.to(device))
        pieces.append((number, out.logits.float().cpu(), targets, macs_per_image(cfg, out.record),
                       executed_macs_per_image(cfg, out.record) * len(targets),
                       torch.stack(out.record.attn_tokens).sum(0).double().cpu() / tokens_in))
        bar.update(len(targets))
    bar.close()
    if distributed.context().world > 1:
        pieces = sorted((p for rank in distributed.all_gather(pieces) for p in rank), key=lambda p: p[0])
    _, logits, labels, macs, executed, depth = zip(*pieces)
    return Predictions(torch.cat(logits), torch.cat(labels), torch.cat(macs), float(sum(executed)) / len(indices), torch.cat(depth),
                       features=cfg.num_classes == 0)


def measure_speed(
    methods: dict[str, Method], dataset, indices: Sequence[int], device: torch.device | str = "cpu",
    latency_repeats: int = 50, throughput_batch: int = 64, throughput_repeats: int = 10, baseline: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Batch-1 latency over distinct images and batch-`throughput_batch` throughput, interleaved."""
    for m in methods.values():
        m.eval()
    n_single = min(16, len(indices))
    singles = [dataset[i][0][None].to(device) for i in indices[:n_single]]
    batch = torch.stack([dataset[i][0] for i in indices[:throughput_batch]]).to(device)
    fns = {name: m for name, m in methods.items()}
    lat = speed_report(time_interleaved(fns, singles, warmup=3, repeats=latency_repeats), 1, baseline)
    thr = speed_report(time_interleaved(fns, [batch], warmup=2, repeats=throughput_repeats), len(batch), baseline)
    out = {}
    for name in methods:
        out[name] = {
            "latency_b1_ms": lat[name]["median_ms"],
            "latency_ratio": lat[name].get("time_ratio"),
            f"throughput_b{len(batch)}": thr[name]["images_per_s"],
            "throughput_ratio": 1 / thr[name]["time_ratio"] if "time_ratio" in thr[name] else None,
            "throughput_batch": len(batch),
            "speed_repeats": {"latency": latency_repeats, "throughput": throughput_repeats},
        }
    return out


def evaluate(
    methods: dict[str, Method], dataset, indices: Sequence[int], *, batch_size: int = 256, workers: int | None = None,
    device: torch.device | str = "cpu", speed: bool = True, progress: bool = True, baseline: str | None = None,
    latency_repeats: int = 50, throughput_repeats: int = 10, dtype: torch.dtype | str = torch.float32,
) -> tuple[dict[str, dict[str, Any]], dict[str, Predictions]]:
    """Every method's metrics on the same images; speed ratios are against `baseline` (first method by default).

    Distributed: every rank gets the same results; speed is timed on rank 0 only (the others wait).
    """
    device = resolve_device(device)
    baseline = baseline or next(iter(methods))
    results, preds = {}, {}
    for name, method in methods.items():
        pred = predict(method, dataset, indices, batch_size, workers, device, progress, desc=name, dtype=dtype)
        preds[name] = pred
        results[name] = {**method.describe(), **pred.summary(dense_macs(method.base_cfg))}
    if speed and distributed.context().main:
        with autocast(device, dtype):
            timed = measure_speed(methods, dataset, indices, device, latency_repeats=latency_repeats,
                                  throughput_repeats=throughput_repeats, baseline=baseline)
        for name, entry in timed.items():
            results[name].update(entry)
    if baseline in preds and preds[baseline].features:  # no labels to score: similarity to the baseline's features
        for name, pred in preds.items():
            results[name]["cosine_to_baseline"] = float(metrics.cosine_similarity(pred.logits, preds[baseline].logits).mean())
    elif baseline in preds:
        for name, pred in preds.items():
            if name != baseline:
                results[name]["mcnemar_vs_baseline"] = metrics.mcnemar(
                    (pred.logits.argmax(1) == pred.labels).numpy(), (preds[baseline].logits.argmax(1) == preds[baseline].labels).numpy()
                )
    return results, preds


def predictions_arrays(preds: dict[str, Predictions]) -> dict[str, np.ndarray]:
    """Per-image arrays for later paired tests (McNemar, bootstrap): labels, predictions, confidences, FLOPs
    (feature extractors: cosine similarity to the baseline's features instead of predictions)."""
    arrays: dict[str, np.ndarray] = {}
    reference = next(iter(preds.values()), None)
    for name, p in preds.items():
        arrays["labels"] = p.labels.numpy()
        arrays[f"{name}/macs"] = p.macs.numpy()
        arrays[f"{name}/token_depth"] = p.token_depth.numpy()
        if p.features:  # per-image cosine similarity to the first (baseline) method's features
            arrays[f"{name}/cosine"] = metrics.cosine_similarity(p.logits, reference.logits).numpy()
            continue
        probs = p.logits.softmax(dim=1)
        arrays[f"{name}/pred"] = p.logits.argmax(1).numpy()
        arrays[f"{name}/confidence"] = probs.max(dim=1).values.numpy()
    return arrays
