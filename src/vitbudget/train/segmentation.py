"""A linear segmentation probe on a frozen ViT (DINOv2's linear evaluation): BatchNorm + 1x1 conv on the
final-normed patch grid, logits upsampled bilinearly to the mask size, cross-entropy ignoring 255.

The backbone is frozen, so the baseline's grids are computed once and the head trains on them; methods
are then scored by running each (method -> patch grid -> the trained head) on the validation images.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..data.loader import iterate, make_loader
from ..data.segmentation import IGNORE_INDEX
from ..eval.dense_metrics import confusion, mean_iou
from ..models.heads import LinearSegHead


@torch.inference_mode()
def grids_and_masks(method: nn.Module, dataset, batch_size: int, workers: int | None, device) -> tuple[Tensor, Tensor]:
    """(N, H, W, C) final-normed patch grids and (N, S, S) masks of a whole split."""
    method.eval()
    grids, masks = [], []
    for images, target in iterate(make_loader(dataset, range(len(dataset)), batch_size, workers)):
        grids.append(method(images.to(device)).patch_grid(norm=True).float().cpu())
        masks.append(target)
    return torch.cat(grids), torch.cat(masks)


def train_linear_head(grids: Tensor, masks: Tensor, num_classes: int, *, epochs: int = 30, lr: float = 1e-3,
                      batch_size: int = 16, weight_decay: float = 1e-4, seed: int = 0, device="cpu") -> tuple[LinearSegHead, list[float]]:
    """AdamW with a cosine schedule on the cached grids; returns the head (eval mode) and the mean loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = LinearSegHead(grids.shape[-1], num_classes).to(device)
    steps_per_epoch = -(-len(grids) // batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    losses = []
    for _ in range(epochs):
        head.train()
        order, total = torch.randperm(len(grids), generator=gen), 0.0
        for start in range(0, len(grids), batch_size):
            idx = order[start:start + batch_size]
            target = masks[idx].to(device)
            logits = head(grids[idx].to(device), tuple(target.shape[-2:]))
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(grids))
    return head.eval(), losses


@torch.inference_mode()
def segmentation_miou(method: nn.Module, head: LinearSegHead, dataset, batch_size: int, workers: int | None, device) -> dict[str, Any]:
    """mIoU (and per-class IoU, pixel accuracy) of method -> patch grid -> head on `dataset`."""
    method.eval()
    head.eval()
    conf = torch.zeros(head.num_classes, head.num_classes, dtype=torch.long)
    for images, target in iterate(make_loader(dataset, range(len(dataset)), batch_size, workers)):
        logits = head(method(images.to(device)).patch_grid(norm=True), tuple(target.shape[-2:]))
        conf += confusion(logits.argmax(1).cpu(), target, head.num_classes, IGNORE_INDEX)
    miou, per_class = mean_iou(conf)
    return {"miou": miou, "per_class_iou": per_class, "pixel_accuracy": float(conf.diag().sum()) / max(int(conf.sum()), 1)}
