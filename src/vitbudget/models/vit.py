"""A Vision Transformer with timm's parameter names, so timm checkpoints load with strict=True.

The structure mirrors timm's `VisionTransformer` (forward_features / forward_head split, fused
attention). Attention runs through `runtime.attention.multihead_attention`, the same function
the token runtime uses, so the plain forward and the block runner cannot disagree.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..runtime.attention import multihead_attention
from .config import ModelInfo, ViTConfig
from .pos_embed import resample_abs_pos_embed


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool, eps: float, attn_drop: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return multihead_attention(self, x)[0]


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with (timm's `quick_gelu`)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """The MLP activation named in `ViTConfig.act_layer`."""
    return {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "quick_gelu": QuickGELU()}[name]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float, act_layer: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Block(nn.Module):
    # forward is exactly what runtime.runner.run_block computes with no hooks and no padding, so the runner calls it
    # directly then (batch-1 Python overhead); change one, change the other (tests/test_runner_fast_path.py)
    RUNNER_FORWARD = True

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, cfg.qkv_bias, cfg.qk_norm, cfg.norm_eps, cfg.attn_drop_rate)
        self.ls1 = LayerScale(dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, cfg.mlp_hidden, cfg.drop_rate, cfg.act_layer)
        self.ls2 = LayerScale(dim, cfg.init_values) if cfg.init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """timm-compatible ViT: `state_dict()` keys equal timm's for the same config."""

    #: embed() rejects NaN / inf input. The check reads the values (a host sync), which a traced
    #: program (torch.export, ONNX, torch.compile without graph breaks) cannot contain: tracing
    #: code turns it off with `unchecked_values` and checks eagerly, outside, with `check_input`.
    #: Under torch.compile it is always left out of the graph (`methods.compiled` checks first).
    check_values: bool = True

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.info = ModelInfo()  # preprocessing, class names, provenance (from the sidecar)
        dim = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.global_pool = cfg.global_pool
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim, bias=cfg.use_patch_bias)
        if cfg.class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.dist_token:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.reg_tokens:
            self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, dim))
        embed_len = cfg.num_patches + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.norm_pre = nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.Sequential(*[Block(cfg, rate) for rate in rates])
        self.norm = nn.Identity() if cfg.use_fc_norm else nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.fc_norm = nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.pooled_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if cfg.dist_token:
            self.head_dist = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- initialisation (timm's default 'trunc_normal(.02)' scheme) --
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cfg.class_token:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.cfg.dist_token:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if self.cfg.reg_tokens:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # -- input --
    def check_input(self, images: Tensor, values: bool | None = None) -> None:
        """Shape, channel and finiteness checks with messages a user can act on.

        The shape checks read only static sizes (safe under tracing); the finiteness check runs
        when `values` is True, or by default when `self.check_values` is, and never inside
        torch.compile (a data-dependent branch breaks the graph; compiled callers check eagerly).
        """
        cfg = self.cfg
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise InputError(f"expected a (batch, {cfg.in_chans}, H, W) image tensor, got {shape}")
        if images.shape[1] != cfg.in_chans:
            raise InputError(f"expected {cfg.in_chans} channels, got {images.shape[1]} (input shape {tuple(images.shape)})")
        if tuple(images.shape[2:]) != (cfg.img_size, cfg.img_size):
            raise InputError(
                f"expected {cfg.img_size}x{cfg.img_size} images, got {images.shape[2]}x{images.shape[3]}; "
                f"resize the input or call model.set_input_size({images.shape[2]}) to resample position embeddings"
            )
        if not images.is_floating_point():
            raise InputError(f"expected a floating-point image tensor, got {images.dtype}")
        if torch.compiler.is_compiling():
            return
        if (self.check_values if values is None else values) and not all_finite(images):
            raise InputError("input contains NaN or infinite values")

    def embed(self, images: Tensor) -> Tensor:
        """Images -> (B, prefix + patches, D) tokens with position embeddings, ready for block 0."""
        self.check_input(images)
        x = self.patch_embed(images)
        prefix = []
        if self.cfg.class_token:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.cfg.dist_token:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        if self.cfg.reg_tokens:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.cfg.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.norm_pre(self.pos_drop(x))

    def set_input_size(self, img_size: int, antialias: bool = True) -> None:
        """Resample position embeddings in place for a new square input size (timm's method: bicubic, antialiased)."""
        patch = self.cfg.patch_size
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < patch or img_size % patch:
            near = f" (nearest: {img_size // patch * patch} or {img_size // patch * patch + patch})" if isinstance(img_size, int) and img_size > patch else ""
            raise InputError(f"input size {img_size!r} is not a positive multiple of patch size {patch}{near}")
        grid = img_size // self.cfg.patch_size
        prefix = 0 if self.cfg.no_embed_class else self.num_prefix_tokens
        with torch.no_grad():
            new = resample_abs_pos_embed(self.pos_embed.data, (grid, grid), prefix, antialias=antialias)
        self.pos_embed = nn.Parameter(new, requires_grad=self.pos_embed.requires_grad)
        self.cfg = self.cfg.replace(img_size=img_size)

    # -- forward, split as in timm --
    def forward_features(self, images: Tensor) -> Tensor:
        return self.norm(self.blocks(self.embed(images)))

    def pool(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        patches = x[:, self.num_prefix_tokens :]
        if key_mask is None:
            mean = patches.mean(dim=1)
        else:
            weights = key_mask[:, self.num_prefix_tokens :, None].to(x.dtype)
            mean = (patches * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return torch.cat([x[:, 0], mean], dim=-1) if self.global_pool == "token_avg" else mean

    def forward_head(self, x: Tensor, key_mask: Tensor | None = None, pre_logits: bool = False) -> Tensor:
        """Logits, or pooled features with `pre_logits` (what a model with num_classes=0 returns).

        With a distillation token (timm's VisionTransformerDistilled at inference): the mean of the
        class head on CLS and the distillation head on the distillation token; features are the
        mean of the two tokens.
        """
        if self.cfg.dist_token:
            cls, dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
            return (cls + dist) / 2 if pre_logits else (self.head(cls) + self.head_dist(dist)) / 2
        x = self.head_drop(self.fc_norm(self.pool(x, key_mask)))
        return x if pre_logits else self.head(x)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for `num_classes` outputs (timm's name and init: trunc-normal 0.02, zero bias); 0 removes it."""
        self.cfg = self.cfg.replace(num_classes=num_classes)

        def fresh(width: int) -> nn.Module:
            if num_classes <= 0:
                return nn.Identity()
            head = nn.Linear(width, num_classes)
            nn.init.trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            return head

        self.head = fresh(self.cfg.pooled_dim)
        if self.cfg.dist_token:
            self.head_dist = fresh(self.cfg.embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token", "reg_token"}


def all_finite(x: Tensor) -> bool:
    """Whether every value of `x` is finite. One reduction in the common case: NaN and inf propagate
    through a sum, so a finite sum proves it; only a non-finite sum (a bad value, or huge finite
    values overflowing) pays the elementwise check. ~8x cheaper than isfinite().all() on an image."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


@contextlib.contextmanager
def unchecked_values(module: nn.Module) -> Iterator[None]:
    """Inside the block, every VisionTransformer in `module` skips the data-dependent NaN / inf check.

    For tracing (export, compile): the caller checks its inputs eagerly instead, e.g. with
    `model.check_input(images, values=True)`. The shape checks stay.
    """
    vits = [m for m in module.modules() if isinstance(m, VisionTransformer)]
    saved = [m.__dict__.get("check_values") for m in vits]
    for m in vits:
        m.check_values = False
    try:
        yield
    finally:
        for m, value in zip(vits, saved):
            if value is None:
                del m.check_values
            else:
                m.check_values = value
