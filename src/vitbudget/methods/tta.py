"""Global test-time compute baselines ABS is compared with: more pixels, more views, more depth.

Each spends its extra compute on every token alike, which is what ABS's selective refinement
is measured against. All are post hoc; only `depth` adds a module (a copy of the last block).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.cost import block_macs, stem_macs
from ..runtime.grid import FINAL_TOKENS, NO_GRID
from ..models.config import ViTConfig
from ..runtime.runner import ExecutionRecord, RunOutput, run
from ..runtime.state import TokenState
from .abs import apply_extra_block, round_half_up
from .base import Method
from .registry import NoOptions, register


def _resize(images: Tensor, size: int) -> Tensor:
    """Bilinear, as the paper's resolution scaling; a no-op at the same size (exactly)."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


# -- resolution scaling --
@dataclass(frozen=True)
class ResolutionOptions:
    scale: float = field(default=1.3, metadata={"help": "resolution: input side multiplier (patch grid rounded half up)"})

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ConfigError(f"--scale must be a positive number, got {self.scale}")


class Resolution(Method):
    """Upsample the (normalised) input and run a copy of the model with resampled position embeddings.

    `self.model` is the resized copy, so per-image FLOPs (more tokens, bigger stem) come from its
    config; `base_cfg` stays the original model's, so rel. FLOPs compare with the original.
    """

    name = "resolution"

    MAX_PATCHES = 4096  # a 64x64 grid: beyond it attention memory, not accuracy, decides whether a run survives

    def __init__(self, model: nn.Module, options: ResolutionOptions):
        cfg = model.cfg
        grid = max(1, round_half_up(cfg.grid_size * options.scale))
        if grid * grid > self.MAX_PATCHES:
            limit = math.isqrt(self.MAX_PATCHES)
            raise ConfigError(f"--scale {options.scale:g} turns the {cfg.grid_size}x{cfg.grid_size} patch grid into {grid}x{grid} "
                              f"({grid * grid} tokens per image); the limit is {self.MAX_PATCHES} ({limit}x{limit}, "
                              f"--scale {limit / cfg.grid_size:g} for this model)")
        resized = copy.deepcopy(model)
        resized.set_input_size(grid * cfg.patch_size)
        super().__init__(resized, options)
        self.source_cfg = cfg

    @property
    def base_cfg(self) -> ViTConfig:
        return self.source_cfg

    def forward(self, images: Tensor) -> RunOutput:
        return run(self.model, _resize(images, self.model.cfg.img_size), self)


# -- multi-crop --
@dataclass(frozen=True)
class MultiCropOptions:
    crop_fraction: float = field(default=0.875, metadata={"help": "multicrop: crop side as a fraction of the image side, in (0, 1]"})

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ConfigError(f"--crop-fraction must be in (0, 1], got {self.crop_fraction}")


MULTICROP_NO_GRID = ("multicrop has no single patch grid: its five crops see different parts of the image; "
                     "take the grid of a single-view method")


class MultiCrop(Method):
    """Centre and four corner crops, each resized back to the input size; probabilities averaged.

    The five views run as one 5B batch. Returned logits are log(mean crop probabilities), so
    argmax, ECE and NLL all see the averaged distribution; a model without a head (num_classes=0)
    returns the mean of the five views' pooled features. The record lists every pass's
    blocks, crop after crop (5 x depth entries of (B,) token counts), plus 4 extra stems as
    extra MACs: summing token counts over crops would misprice attention's N^2 term.
    """

    name = "multicrop"
    NUM_CROPS = 5

    def crops(self, images: Tensor) -> Tensor:
        size = images.shape[-1]
        c = min(size, max(1, round_half_up(self.options.crop_fraction * size)))
        far, mid = size - c, (size - c) // 2
        corners = [(mid, mid), (0, 0), (0, far), (far, 0), (far, far)]
        return torch.cat([_resize(images[..., t : t + c, l : l + c], size) for t, l in corners])

    def forward(self, images: Tensor) -> RunOutput:
        B = images.shape[0]
        self.model.check_input(images)
        out = run(self.model, self.crops(images), self)
        if self.model.cfg.num_classes == 0:  # features: nothing to turn into probabilities
            logits = out.logits.reshape(self.NUM_CROPS, B, -1).mean(dim=0)
        else:
            logp = out.logits.float().log_softmax(dim=-1).reshape(self.NUM_CROPS, B, -1)
            logits = torch.logsumexp(logp, dim=0) - math.log(self.NUM_CROPS)
        return RunOutput(logits=logits, state=out.state, record=self._fold(out.record, B), model=self.model)

    def _fold(self, inner: ExecutionRecord, B: int) -> ExecutionRecord:
        """A (5B)-image record -> a B-image record charging each image its five passes."""
        record = ExecutionRecord(batch_size=B, aux={"multicrop_crops": self.NUM_CROPS, NO_GRID: MULTICROP_NO_GRID})
        for crop in range(self.NUM_CROPS):
            record.attn_tokens += [t.reshape(self.NUM_CROPS, B)[crop] for t in inner.attn_tokens]
            record.mlp_tokens += [t.reshape(self.NUM_CROPS, B)[crop] for t in inner.mlp_tokens]
            record.attn_width += inner.attn_width
            record.core_width += inner.core_width
            record.mlp_width += inner.mlp_width
        record.add_macs((self.NUM_CROPS - 1) * stem_macs(self.model.cfg))  # cost.stem_macs counts one stem
        if inner.extra_macs is not None:
            record.add_macs(inner.extra_macs.reshape(self.NUM_CROPS, B).sum(dim=0))
        return record


# -- uniform depth --
class UniformDepth(Method):
    """One extra block (a copy of the last) on all tokens after the last block, then norm and head."""

    name = "depth"
    post_hoc = True  # the extra block is a copy of the backbone's last block

    def __init__(self, model: nn.Module, options: NoOptions):
        super().__init__(model, options)
        self.block = copy.deepcopy(model.blocks[-1])

    def finish(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> Tensor:
        x = apply_extra_block(self.block, state.x, state.key_mask)
        record.add_macs(block_macs(state.num_tokens().cpu().double(), model.cfg))
        record.aux[FINAL_TOKENS] = state.replace(x=x)
        return model.forward_head(model.norm(x), state.key_mask)


register("resolution", lambda model, opts: Resolution(model, opts), ResolutionOptions,
         "resolution scaling: bilinear upsampling and resampled position embeddings",
         label="Res scale", kind="test-time")
register("multicrop", lambda model, opts: MultiCrop(model, opts), MultiCropOptions,
         "multi-crop: probabilities averaged over centre and four corner crops",
         label="Multi-crop", kind="test-time")
register("depth", lambda model, opts: UniformDepth(model, opts), NoOptions,
         "uniform depth: one extra copy of the last block on all tokens",
         label="Uniform depth", kind="test-time")
