"""FLOPs from the tokens each block actually executed (read off the ExecutionRecord beside it).

Convention: one multiply-accumulate = one FLOP, as DeiT, DynamicViT, A-ViT, EViT and fvcore
report "GFLOPs" (DeiT-Tiny at 224 px = 1.26 G). torch's FlopCounterMode counts a
multiply-accumulate as two; the cross-check test accounts for that factor.
Norms, softmax and activations are not counted (neither do those papers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .runner import ExecutionRecord

if TYPE_CHECKING:  # runtime sits below models; the config is only read, never built, here
    from ..models.config import ViTConfig


def projection_macs(n: Tensor | float, dim: int) -> Tensor | float:
    """qkv and output projections of attention on n tokens: 4·N·D²."""
    return 4 * n * dim**2


def attention_core_macs(n: Tensor | float, dim: int) -> Tensor | float:
    """The two N×N products (scores and weighted values) over all heads: 2·N²·D."""
    return 2 * n**2 * dim


def attention_macs(n: Tensor | float, dim: int) -> Tensor | float:
    """qkv + proj projections (4·N·D²) and the two N×N products (2·N²·D)."""
    return projection_macs(n, dim) + attention_core_macs(n, dim)


def mlp_macs(n: Tensor | float, dim: int, hidden: int) -> Tensor | float:
    return 2 * n * dim * hidden


def block_macs(n: Tensor | float, cfg: ViTConfig) -> Tensor | float:
    """One block on N tokens; 12·N·D² + 2·N²·D for mlp_ratio 4."""
    return attention_macs(n, cfg.embed_dim) + mlp_macs(n, cfg.embed_dim, cfg.mlp_hidden)


def stem_macs(cfg: ViTConfig) -> float:
    """Patch embedding (a conv with stride = kernel) plus the classifier head(s) (none without classes)."""
    embed = cfg.num_patches * cfg.in_chans * cfg.patch_size**2 * cfg.embed_dim
    head = cfg.pooled_dim * cfg.num_classes * (2 if cfg.dist_token else 1)  # a distilled DeiT has two heads
    return float(embed + head)


def dense_macs(cfg: ViTConfig) -> float:
    """The unmodified model: every block on all tokens."""
    n = cfg.num_patches + cfg.num_prefix_tokens
    return stem_macs(cfg) + cfg.depth * float(block_macs(n, cfg))


def macs_per_image(cfg: ViTConfig, record: ExecutionRecord) -> Tensor:
    """(B,) FLOPs each image needed, from its real (unpadded) token counts per block."""
    total = torch.full((record.batch_size,), stem_macs(cfg), dtype=torch.float64)
    for n_attn, n_mlp in zip(record.attn_tokens, record.mlp_tokens):
        total += attention_macs(n_attn.double().cpu(), cfg.embed_dim) + mlp_macs(n_mlp.double().cpu(), cfg.embed_dim, cfg.mlp_hidden)
    if record.extra_macs is not None:
        total += record.extra_macs
    return total


def executed_macs_per_image(cfg: ViTConfig, record: ExecutionRecord) -> float:
    """FLOPs per image the hardware ran, padding included (equals macs_per_image without padding)."""
    total = stem_macs(cfg)
    for attn_width, core_width, mlp_width in zip(record.attn_width, record.core_width, record.mlp_width, strict=True):
        total += projection_macs(float(attn_width), cfg.embed_dim) + attention_core_macs(float(core_width), cfg.embed_dim)
        total += mlp_macs(float(mlp_width), cfg.embed_dim, cfg.mlp_hidden)
    if record.extra_macs is not None:
        total += float(record.extra_macs.mean())
    return total
