"""Agreement of two dense maps of one image (a method's vs the unmodified model's), per image.

Each function takes two maps of the same shape (any shape: only the photo's part of a
letterboxed map should be passed) and returns a float; reports average them over images.
"""
from __future__ import annotations

import torch
from torch import Tensor


def mean_abs_error(pred: Tensor, ref: Tensor) -> float:
    return float((pred.double() - ref.double()).abs().mean())


def iou_at(pred: Tensor, ref: Tensor, threshold: float = 0.5) -> float:
    """IoU of the regions above `threshold`; 1.0 when neither map has any (they agree: nothing salient)."""
    a, b = pred > threshold, ref > threshold
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def pearson(pred: Tensor, ref: Tensor) -> float:
    """Pearson correlation over pixels; NaN when either map is constant (correlation undefined)."""
    a, b = pred.double().flatten(), ref.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float("nan") if denom == 0 else float((a * b).sum()) / denom


METRICS = {"mae": mean_abs_error, "iou@0.5": iou_at, "pearson": pearson}


def compare(preds: list[Tensor], refs: list[Tensor]) -> dict[str, float]:
    """Mean of each metric over images (NaN Pearson values, from constant maps, are left out of its mean)."""
    out = {}
    for name, fn in METRICS.items():
        values = torch.tensor([fn(p, r) for p, r in zip(preds, refs, strict=True)], dtype=torch.float64)
        out[name] = float(values.nanmean()) if len(values) else float("nan")
    return out


def confusion(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(K, K) counts, rows = target class, columns = predicted; pixels labelled `ignore_index` are skipped."""
    keep = target != ignore_index
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(conf: Tensor) -> tuple[float, list[float]]:
    """mIoU over classes present in the targets or predictions (as mmseg: absent classes are NaN, left out)."""
    conf = conf.double()
    inter = conf.diag()
    union = conf.sum(0) + conf.sum(1) - inter
    per_class = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    return float(per_class.nanmean()), per_class.tolist()
