"""ViT architecture configs, spelled with timm's `VisionTransformer` keyword names."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

POOLINGS = ("token", "avg", "token_avg")
ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000  # 0 = no head: the model returns pooled features (a backbone)
    global_pool: str = "token"  # 'token' (CLS), 'avg' (patch tokens) or 'token_avg' ([CLS, mean of patches], HF DINOv2's classifier)
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
    # Fields below were added after the first sidecars; their defaults are the earlier behaviour.
    act_layer: str = "gelu"  # MLP activation: 'gelu' (exact erf), 'gelu_tanh', 'quick_gelu' (OpenAI CLIP)
    dist_token: bool = False  # DeiT's distillation token (second prefix token) read by a second head, `head_dist`
    patch_bias: bool | None = None  # patch-embedding bias; None = timm's rule: none iff pre_norm (CLIP)

    def __post_init__(self) -> None:
        self._check_types_and_ranges()
        if self.global_pool not in POOLINGS:
            raise ConfigError(f"global_pool must be one of {', '.join(map(repr, POOLINGS))}, got {self.global_pool!r}")
        if self.global_pool in ("token", "token_avg") and not self.class_token:
            raise ConfigError(f"global_pool={self.global_pool!r} needs class_token=True")
        if self.act_layer not in ACTIVATIONS:
            raise ConfigError(f"act_layer must be one of {', '.join(map(repr, ACTIVATIONS))}, got {self.act_layer!r}")
        if self.dist_token and (not self.class_token or self.global_pool != "token" or self.reg_tokens or self.use_fc_norm):
            raise ConfigError("dist_token (DeiT distillation) needs class_token=True, global_pool='token', no register tokens and no fc_norm")
        if self.global_pool == "token_avg" and self.use_fc_norm:
            raise ConfigError("global_pool='token_avg' reads the final-normed tokens; it takes no fc_norm")
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
        for name in ("qkv_bias", "qk_norm", "class_token", "no_embed_class", "pre_norm", "dist_token"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        for name in ("fc_norm", "patch_bias"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise bad(name, "true, false or null")
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
        """Tokens before the patches, in this order: CLS, distillation token, registers."""
        return int(self.class_token) + int(self.dist_token) + self.reg_tokens

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled features the head reads (and a headless model returns)."""
        return 2 * self.embed_dim if self.global_pool == "token_avg" else self.embed_dim

    @property
    def use_patch_bias(self) -> bool:
        return not self.pre_norm if self.patch_bias is None else self.patch_bias

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
        ignored = {"norm_layer", "weight_init", "dynamic_img_size"}
        unknown = sorted(set(d) - known - ignored)
        if unknown:
            raise ConfigError(f"unsupported ViT config keys: {', '.join(unknown)} (supported: {', '.join(sorted(known))})")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as exc:
            raise ConfigError(f"invalid ViT config: {exc}") from exc


_WIDTHS = {"tiny": dict(embed_dim=192, num_heads=3), "small": dict(embed_dim=384, num_heads=6), "base": dict(embed_dim=768, num_heads=12)}


def _family(**shared: Any) -> dict[str, ViTConfig]:
    return {size: ViTConfig(depth=12, **_WIDTHS[size], **shared) for size in _WIDTHS}


# Shapes of the timm models whose state-dict files we load by name (`timm.create_model(name)`
# builds the same architecture; tests/test_timm_equivalence.py checks each against timm).
NAMED_CONFIGS: dict[str, ViTConfig] = {
    **{f"deit_{s}_patch16_224": c for s, c in _family().items()},
    **{f"deit_{s}_distilled_patch16_224": c for s, c in _family(dist_token=True).items()},
    # DeiT III: LayerScale, position embeddings on patches only
    **{f"deit3_{s}_patch16_224": c for s, c in _family(init_values=1e-6, no_embed_class=True).items() if s != "tiny"},
    **{f"vit_{s}_patch16_224": c for s, c in _family().items()},
    # DINOv2 backbones (no head; 518 px = a 37 x 37 grid of 14 px patches; set img_size=224 to resample)
    **{f"vit_{s}_patch14_dinov2": c for s, c in _family(img_size=518, patch_size=14, init_values=1e-5, num_classes=0).items() if s != "tiny"},
    **{f"vit_{s}_patch14_reg4_dinov2": c for s, c in _family(img_size=518, patch_size=14, init_values=1e-5, num_classes=0, reg_tokens=4,
                                                              no_embed_class=True).items() if s != "tiny"},
    # CLIP image towers: pre-norm, LayerNorm eps 1e-5, heads as timm's default weights (LAION fine-tuned: 1000
    # classes; MetaCLIP: the 512-d image projection); pass num_classes= for others (OpenAI's tower: 512)
    "vit_base_patch16_clip_224": ViTConfig(embed_dim=768, depth=12, num_heads=12, pre_norm=True, norm_eps=1e-5),
    "vit_base_patch16_clip_quickgelu_224": ViTConfig(embed_dim=768, depth=12, num_heads=12, pre_norm=True, norm_eps=1e-5, num_classes=512,
                                                     act_layer="quick_gelu"),
    "vit_tiny_p4_cifar10": ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=10),
}


def named_config(name: str, **overrides: Any) -> ViTConfig:
    if name not in NAMED_CONFIGS:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}")
    return NAMED_CONFIGS[name].replace(**overrides) if overrides else NAMED_CONFIGS[name]


INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass
class Preprocess:
    """How images become model input; stored in the checkpoint sidecar.

    resize: 'shortest' scales the short side to img_size / crop_pct and centre-crops (timm's
    eval); 'squash' resizes both sides to img_size / crop_pct, ignoring the aspect ratio, then
    centre-crops (Hugging Face's ViT image processor, crop_pct 1).
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    resize: str = "shortest"

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ConfigError(f"preprocess resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
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
        return {"mean": list(self.mean), "std": list(self.std), "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "resize": self.resize}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Preprocess":
        if not d:
            return cls()
        if not isinstance(d, dict):
            raise ConfigError(f"preprocess must be a mapping (mean, std, crop_pct, interpolation, resize), got {d!r:.80}")
        unknown = sorted(set(d) - {"mean", "std", "crop_pct", "interpolation", "resize"})
        if unknown:
            raise ConfigError(f"unknown preprocess keys: {', '.join(unknown)} (known: crop_pct, interpolation, mean, resize, std)")
        try:
            return cls(
                mean=tuple(float(v) for v in d.get("mean", cls.mean)),
                std=tuple(float(v) for v in d.get("std", cls.std)),
                crop_pct=float(d.get("crop_pct", 1.0)),
                interpolation=str(d.get("interpolation", "bilinear")),
                resize=str(d.get("resize", "shortest")),
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
    notes: list[str] = field(default_factory=list)  # what loading adapted (resampled positions...): printed by commands, not saved
