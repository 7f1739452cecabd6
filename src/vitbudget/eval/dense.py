"""Dense tasks under token methods: method -> patch grid (final norm) -> head, compared with the
unmodified model's maps, with FLOPs (backbone from executed tokens + the head's analytic MACs)
and speed measured round-robin like classification's."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data.letterbox import Box, crop_to_photo
from ..data.loader import iterate, make_loader
from ..devices import resolve_device
from ..runtime.cost import dense_macs, macs_per_image
from . import dense_metrics
from .evaluate import measure_speed
from .speed import fraction_of_ideal


class DensePipeline(nn.Module):
    """A method and a dense head as one module: what is timed, and what maps come from."""

    def __init__(self, method: nn.Module, head: nn.Module):
        super().__init__()
        self.method, self.head = method, head

    def forward(self, images: Tensor):
        out = self.method(images)
        return self.head(out.patch_grid(norm=True), tuple(images.shape[-2:])), out

    def head_macs(self) -> float:
        side = self.method.model.cfg.grid_size
        return self.head.macs(side, side)


@torch.inference_mode()
def predict_maps(pipeline: DensePipeline, dataset, indices: Sequence[int], batch_size: int, workers: int | None,
                 device: torch.device, progress: bool, desc: str) -> tuple[list[Tensor], Tensor]:
    """Each photo's map cropped to the photo's part of the letterboxed input, and FLOPs per image (backbone + head)."""
    pipeline.eval()
    cfg = pipeline.method.model.cfg
    maps, macs = [], []
    for images, boxes in tqdm(iterate(make_loader(dataset, list(indices), batch_size, workers)), desc=desc, unit="batch",
                              disable=not progress, leave=False):
        batch_maps, out = pipeline(images.to(device))
        maps += [crop_to_photo(m.float().cpu(), Box.from_tensor(b)) for m, b in zip(batch_maps, boxes)]
        macs.append(macs_per_image(cfg, out.record) + pipeline.head_macs())
    return maps, torch.cat(macs)


def evaluate_dense(
    methods: dict[str, nn.Module], head: nn.Module, dataset, indices: Sequence[int], *, batch_size: int = 32,
    workers: int | None = None, device: torch.device | str = "cpu", speed: bool = True, progress: bool = True,
    latency_repeats: int = 50, throughput_repeats: int = 10,
) -> tuple[dict[str, dict[str, Any]], dict[str, list[Tensor]]]:
    """Every method's maps against the first method's (the baseline): MAE, IoU at 0.5, Pearson; FLOPs; speed."""
    device = resolve_device(device)
    head = head.to(device).eval()
    pipelines = {name: DensePipeline(method, head) for name, method in methods.items()}
    baseline = next(iter(methods))
    results, maps = {}, {}
    for name, pipe in pipelines.items():
        maps[name], macs = predict_maps(pipe, dataset, indices, batch_size, workers, device, progress, name)
        base = dense_macs(pipe.method.base_cfg) + pipe.head_macs()
        results[name] = {**pipe.method.describe(), **dense_metrics.compare(maps[name], maps[baseline]),
                         "gflops": float(macs.mean()) / 1e9, "gflops_head": pipe.head_macs() / 1e9,
                         "rel_flops": float(macs.mean()) / base}
    if speed:
        timed = measure_speed(pipelines, dataset, indices, device, latency_repeats=latency_repeats,
                              throughput_repeats=throughput_repeats, baseline=baseline)
        for name, entry in timed.items():
            ratio = entry["throughput_ratio"]
            entry["fraction_of_ideal"] = None if name == baseline or ratio is None else fraction_of_ideal(ratio, results[name]["rel_flops"])
            results[name].update(entry)
    return results, maps


def dense_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per method: agreement with the baseline's maps, FLOPs, speed."""
    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    rows = ["| method | MAE | IoU@0.5 | Pearson | GFLOPs/img (head) | rel. FLOPs | throughput ratio | of ideal |",
            "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['mae']:.4f} | {r['iou@0.5']:.3f} | {r['pearson']:.4f} | {r['gflops']:.3f} ({r['gflops_head']:.3f}) | "
                    f"{r['rel_flops']:.3f}× | {fmt(r.get('throughput_ratio'), '.3f')} | {fmt(r.get('fraction_of_ideal'), '.2f')} |")
    return "\n".join(rows) + "\n"
