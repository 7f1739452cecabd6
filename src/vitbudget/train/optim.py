"""Parameter groups (weight decay, per-group learning rates, frozen parameters) and the LR schedule."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .recipes import Recipe


def lr_scale_for(name: str, scales: list[tuple[str, float]]) -> float:
    for pattern, scale in scales:
        if pattern in name:
            return scale
    return 1.0


def param_groups(module: nn.Module, recipe: Recipe) -> list[dict]:
    """AdamW groups keyed by (lr scale, decay); frozen parameters get requires_grad=False.

    Weight decay applies to matrices only: not to biases, norms, tokens or position embeddings.
    """
    no_decay_names = set()
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            no_decay_names |= {f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay()}
    groups: dict[tuple[float, bool], list] = {}
    frozen = 0
    for name, param in module.named_parameters():
        if any(pattern in name for pattern in recipe.freeze):
            param.requires_grad_(False)
            frozen += 1
            continue
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in no_decay_names
        groups.setdefault((lr_scale_for(name, recipe.lr_scales), decay), []).append(param)
    if not groups:
        raise ConfigError(f"no trainable parameters left (freeze patterns {recipe.freeze} matched all {frozen})")
    return [
        {"params": params, "lr_scale": scale, "weight_decay": recipe.weight_decay if decay else 0.0}
        for (scale, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]


def make_optimizer(module: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(module, recipe), lr=recipe.lr)


def lr_at(step: int, total_steps: int, steps_per_epoch: int, recipe: Recipe) -> float:
    """Linear warm-up from warmup_lr, then cosine from lr to min_lr (timm's per-step schedule)."""
    warmup = int(recipe.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return recipe.warmup_lr + (recipe.lr - recipe.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
