"""Training recipes: every setting of a run in one dataclass, stored with its checkpoints."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

CIFAR10_MEAN = (0.49140000343322754, 0.4821999967098236, 0.4465000033378601)
CIFAR10_STD = (0.24699999392032623, 0.2434999942779541, 0.26159998774528503)


@dataclass
class Recipe:
    name: str
    arch: dict[str, Any]  # ViTConfig keyword arguments
    epochs: float = 6
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: float = 0.5
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    seed: int = 0
    augment: str = "pad_crop_flip"  # or "none"
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD
    train_limit: int | None = None  # deterministic subset of the training split
    eval_limit: int | None = 2000  # per-epoch test subset; the final evaluation uses final_eval_limit
    final_eval_limit: int | None = None
    save_every_steps: int = 100
    # fine-tuning: (substring of a parameter name, lr multiplier); first match wins, default 1.0
    lr_scales: list[tuple[str, float]] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)  # substrings of parameter names to freeze
    distill_weight: float = 0.0  # KL(teacher || student) weight when a teacher is given
    method: str = "baseline"
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ConfigError("epochs, batch_size and lr must be positive")
        if self.augment not in ("pad_crop_flip", "none"):
            raise ConfigError(f"unknown augmentation {self.augment!r}; use 'pad_crop_flip' or 'none'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        for key in ("mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        d["lr_scales"] = [tuple(x) for x in d.get("lr_scales", [])]
        return cls(**d)

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


VIT_TINY_P4 = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, num_classes=10)

RECIPES: dict[str, Recipe] = {
    # Reproduces ../shared/models/vit_tiny_p4_cifar10 (its README's recipe): ~6500 s on 2 CPU cores.
    "vit_tiny_p4_cifar10": Recipe(name="vit_tiny_p4_cifar10", arch=VIT_TINY_P4),
    # A seconds-long run for tests and for checking an installation end to end.
    "smoke": Recipe(
        name="smoke",
        arch=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=10),
        epochs=2, batch_size=16, lr=2e-3, warmup_epochs=0.25, train_limit=128, eval_limit=64, final_eval_limit=64,
        save_every_steps=4,
    ),
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return recipe.replace(**overrides) if overrides else recipe
