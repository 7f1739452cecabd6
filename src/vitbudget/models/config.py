"""ViT architecture configs, spelled with timm's `VisionTransformer` keyword names."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"  # 'token' (CLS) or 'avg'
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: float | None = None  # LayerScale init; None = no LayerScale
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    pre_norm: bool = False
    fc_norm: bool | None = None  # None: timm's default, fc_norm iff global_pool == 'avg'
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        self._check_types_and_ranges()
        if self.global_pool not in ("token", "avg"):
            raise ConfigError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ConfigError("global_pool='token' needs class_token=True")
        if self.embed_dim % self.num_heads:
            raise ConfigError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    def _check_types_and_ranges(self) -> None:
        """Every field's type and range, so a bad sidecar is one ConfigError and never a ZeroDivisionError later."""
        def bad(name: str, what: str) -> ConfigError:
            return ConfigError(f"ViT config {name} must be {what}, got {getattr(self, name)!r}")

        minimum = {"img_size": 1, "patch_size": 1, "in_chans": 1, "num_classes": 0, "embed_dim": 1, "depth": 1, "num_heads": 1, "reg_tokens": 0}
        for name, low in minimum.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"an integer >= {low}")
        for name in ("qkv_bias", "qk_norm", "class_token", "no_embed_class", "pre_norm"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        if self.fc_norm is not None and not isinstance(self.fc_norm, bool):
            raise bad("fc_norm", "true, false or null")
        for name in ("mlp_ratio", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
                raise bad(name, "a positive number")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise bad(name, "a number in [0, 1)")
        if self.init_values is not None and (isinstance(self.init_values, bool) or not isinstance(self.init_values, (int, float))
                                             or not math.isfinite(self.init_values)):
            raise bad("init_values", "a finite number or null")
        if self.embed_dim * self.mlp_ratio < 1:
            raise ConfigError(f"ViT config embed_dim * mlp_ratio must be at least 1, got {self.embed_dim} * {self.mlp_ratio}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def replace(self, **changes: Any) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"a ViT config must be a mapping of keyword arguments, got {type(d).__name__}: {d!r:.80}")
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = {"norm_layer", "act_layer", "weight_init", "dynamic_img_size"}
        unknown = sorted(set(d) - known - ignored)
        if unknown:
            raise ConfigError(f"unsupported ViT config keys: {', '.join(unknown)} (supported: {', '.join(sorted(known))})")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"invalid ViT config: {exc}") from exc


# Shapes of the timm models whose state-dict files we load by name.
NAMED_CONFIGS: dict[str, ViTConfig] = {
    "deit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_tiny_p4_cifar10": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=10),
}


def named_config(name: str, **overrides: Any) -> ViTConfig:
    if name not in NAMED_CONFIGS:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}")
    return NAMED_CONFIGS[name].replace(**overrides) if overrides else NAMED_CONFIGS[name]


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass
class Preprocess:
    """How images become model input; stored in the checkpoint sidecar."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise ConfigError(f"preprocess {name} must be 3 finite numbers (R, G, B), got {list(values)!r}")
        if not all(v > 0 for v in self.std):
            raise ConfigError(f"preprocess std must be positive, got {list(self.std)!r}")
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)) or not 0 < self.crop_pct <= 1:
            raise ConfigError(f"preprocess crop_pct must be in (0, 1], got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"preprocess interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct, "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Preprocess":
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise ConfigError(f"preprocess must be a mapping (mean, std, crop_pct, interpolation), got {d!r:.80}")
        unknown = sorted(set(d) - {"mean", "std", "crop_pct", "interpolation"})
        if unknown:
            raise ConfigError(f"unknown preprocess keys: {', '.join(unknown)} (known: crop_pct, interpolation, mean, std)")
        try:
            return cls(
                mean=tuple(float(v) for v in d.get("mean", cls.mean)),
                std=tuple(float(v) for v in d.get("std", cls.std)),
                crop_pct=float(d.get("crop_pct", 1.0)),
                interpolation=str(d.get("interpolation", "bilinear")),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid preprocess {d!r:.120}: {exc}") from None


@dataclass
class ModelInfo:
    """Everything the sidecar says about a checkpoint beyond its weights."""

    name: str = "vit"
    preprocess: Preprocess = field(default_factory=Preprocess)
    classes: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
