"""Training recipes: every setting of a run in one dataclass, stored with its checkpoints."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

CIFAR10_MEAN = (0.49140000343322754, 0.4821999967098236, 0.4465000033378601)
CIFAR10_STD = (0.24699999392032623, 0.2434999942779541, 0.26159998774528503)


AUGMENTATIONS = ("pad_crop_flip", "flip", "none")


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
    seed: int = 0  # initialisation, epoch order, augmentation; the train_limit subset is the same at every seed
    augment: str = "pad_crop_flip"  # AUGMENTATIONS; pad_crop_flip pads by img_size // 8 (4 px at 32 px)
    # normalisation of a model trained from scratch; None = computed from the training split (data.stats),
    # never another data set's. A fine-tuned model keeps its checkpoint's.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
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
    new_head: bool = False  # fine-tuning: a fresh head when the checkpoint's classes differ from the data's (or it has none)
    dtype: str = "fp32"  # 'bf16' / 'fp16': autocast mixed precision (fp16 with a gradient scaler, GPUs only)

    def __post_init__(self) -> None:
        if not (self.epochs > 0 and self.batch_size > 0 and self.lr > 0):  # also false for NaN
            raise ConfigError("epochs, batch_size and lr must be positive")
        if not all(math.isfinite(v) for v in (self.epochs, self.lr, self.min_lr, self.warmup_lr, self.warmup_epochs, self.weight_decay)):
            raise ConfigError("epochs, lr, min_lr, warmup_lr, warmup_epochs and weight_decay must be finite")
        if self.save_every_steps <= 0 or self.seed < 0:
            raise ConfigError(f"save_every_steps must be positive and seed >= 0, got {self.save_every_steps} and {self.seed}")
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {self.augment!r}; use one of {', '.join(AUGMENTATIONS)}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"unknown dtype {self.dtype!r}; use one of fp32, bf16, fp16")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("a recipe gives both mean and std, or neither (computed from the training split)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        for key in ("mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        d["lr_scales"] = [tuple(x) for x in d.get("lr_scales", [])]
        return cls(**d)

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)


# Transformer shapes for training from scratch; image size, patch size and classes come from flags or the data.
ARCHS: dict[str, dict[str, Any]] = {
    "vit_mini": dict(embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0),  # quick CPU experiments
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
}


def scratch(name: str = "scratch", *, arch: str | dict[str, Any] = "vit_tiny", img_size: int, patch_size: int, num_classes: int,
            **changes: Any) -> Recipe:
    """Train a ViT from random weights on any ImageFolder: the reference model's schedule (6 epochs at
    batch 128, AdamW lr 1e-3 with half an epoch of warm-up, cosine to 1e-5, label smoothing 0.1,
    pad-crop-flip), normalised with the training split's own mean and std unless given."""
    shape = ARCHS[arch] if isinstance(arch, str) else arch
    return Recipe(name=name, arch={"img_size": img_size, "patch_size": patch_size, **shape, "num_classes": num_classes}, **changes)


def finetune(name: str = "finetune", method: str = "baseline", **changes: Any) -> Recipe:
    """Fine-tune a checkpoint (`--init`) on any ImageFolder: one pass at batch 64, lr 1e-4 (0.1 epoch
    warm-up, cosine to 1e-6), a fresh head when the data's classes differ; the checkpoint's
    normalisation. The CIFAR-10 fine-tuning recipes are this with a fixed 10 000-image subset
    and KL distillation from the checkpoint they start from."""
    base = dict(
        name=name, arch={}, epochs=1, batch_size=64, lr=1e-4, min_lr=1e-6, warmup_lr=1e-6, warmup_epochs=0.1, eval_limit=1000,
        save_every_steps=25, method=method, new_head=True,
    )
    return Recipe(**{**base, **changes})


CIFAR10 = dict(mean=CIFAR10_MEAN, std=CIFAR10_STD)
VIT_TINY_P4 = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, num_classes=10)


def _finetune(name: str, method: str, **changes: Any) -> Recipe:
    """The shared CIFAR-10 fine-tuning budget of the token-reduction recipes (see RECIPES)."""
    return finetune(name, method, **{**dict(arch=VIT_TINY_P4, train_limit=10000, final_eval_limit=1000, distill_weight=0.5, new_head=False,
                                            **CIFAR10), **changes})


# Generic recipes resolved against the data (`recipe_for_data`): any image folder.
GENERIC = ("scratch", "finetune")

RECIPES: dict[str, Recipe] = {
    # Reproduces ../shared/models/vit_tiny_p4_cifar10 (its README's recipe): ~6500 s on 2 CPU cores.
    "vit_tiny_p4_cifar10": scratch("vit_tiny_p4_cifar10", img_size=32, patch_size=4, num_classes=10, **CIFAR10),
    # A seconds-long run for tests and for checking an installation end to end.
    "smoke": scratch(
        "smoke", arch=dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0), img_size=32, patch_size=8, num_classes=10,
        epochs=2, batch_size=16, lr=2e-3, warmup_epochs=0.25, train_limit=128, eval_limit=64, final_eval_limit=64,
        save_every_steps=4, **CIFAR10,
    ),
    # VIT_TINY_P4 with 8 outputs on `vitbudget make-counting` scenes (classes 03..10 = 3..10 objects).
    # mean/std measured on 4000 training images of the default set (seed 0, 32 px). Flips only:
    # random crops could cut objects out and change the count. 2 epochs of a fixed 12000-scene
    # subset = 188 steps (about 8 min on 2 idle cores at ~2.6 s/step); raise with --epochs.
    "count_vit_p4": scratch(
        "count_vit_p4", img_size=32, patch_size=4, num_classes=8, epochs=2, batch_size=128, lr=1e-3,
        train_limit=12000,
        warmup_epochs=0.2, augment="flip", mean=(0.7528, 0.7413, 0.7331), std=(0.2067, 0.1917, 0.2187),
        eval_limit=500, save_every_steps=50,
    ),
    # ABS "tuned": train only the extra block (a copy of the last block) with the backbone frozen,
    # one pass over a fixed 10 000-image training subset at the reference's augmentation.
    # `depth_tune` is the same budget for uniform depth's extra block: the control that separates
    # selective refinement from simply training one more block.
    **{
        name: _finetune(
            name, method, batch_size=128, lr=3e-4, warmup_epochs=0.1, save_every_steps=20, distill_weight=0.0, freeze=["model."],
            method_options=options,
        )
        for name, method, options in [("abs_tune", "abs", {"alpha": 0.2, "score": "entropy"}), ("depth_tune", "depth", {})]
    },
    # A-ViT (halting on channel 0; pick --target-depth) on the shared fine-tuning budget below.
    # The paper fine-tunes 100 epochs of ImageNet; for this tiny schedule the ponder weight is
    # 10x the official 5e-4, and the prior weight 1e-2 on our true KL (a normalised prior, summed
    # over blocks) is about 37x the official 1e-3 on its unnormalised prior averaged over 12 blocks.
    "avit_cifar10": _finetune("avit_cifar10", "avit", method_options={"ponder_weight": 5e-3, "distr_weight": 1e-2}),
    # Fine-tuning the reference for token reduction. One shared budget, so methods compare
    # fairly: a fixed 10 000-image training subset, one pass at batch 64 (156 steps, about 6 min
    # on 2 idle CPU cores), the reference's augmentation, backbone lr 1e-4 (SPOT's 1e-3 at batch
    # 512, scaled to 64 and shortened), warm-up 0.1 epoch, KL to the frozen reference as teacher
    # (weight 0.5; pass --teacher). The papers fine-tune 30-100 epochs of ImageNet. Raise
    # --train-limit / --epochs for a real run; `finetune_cifar10` is the same budget with no
    # method, the control that separates a method from the extra training itself.
    # Predictor learning rates follow each reference: SPOT trains its predictors at 10x the
    # backbone; DynamicViT's code trains the backbone at 0.01x the base rate (its
    # `--lr_scale 0.01`), i.e. the predictors at 100x the backbone (its backbone also stays
    # frozen for the first 5 of 30 epochs, which a one-pass budget does not reproduce); it keeps
    # the class token and position embedding frozen throughout, and so does this recipe.
    **{
        name: _finetune(name, method, **extra)
        for name, method, extra in [
            ("finetune_cifar10", "baseline", {}),
            ("spot_cifar10", "spot", dict(lr_scales=[("predictors", 10.0)], method_options={"rho": 0.7})),
            ("dynamicvit_cifar10", "dynamicvit", dict(lr_scales=[("predictors", 100.0)], freeze=["cls_token", "pos_embed"],
                                                      method_options={"rho": 0.7})),
            ("evit_cifar10", "evit", dict(method_options={"rho": 0.7})),
        ]
    },
}


# The real reference classifier: the pretrained ViT-S/14 of ../shared/models/vits14_saliency
# (DINOv2 architecture, fine-tuned for saliency) fine-tuned for CIFAR-10 classification at
# 112 px (8 x 8 = 64 patches + CLS; images upsampled from 32 px), pass `--init` that directory.
# Cost measured on 2 idle CPU cores (full fine-tune, batch 32): 8.4 img/s at 112 px, 3.8 at
# 168, 2.1 at 224, i.e. 99 / 220 / 399 min per 50 000-image epoch; so 112 px, the patch
# embedding and the first four blocks frozen (no backward through them), one pass over a fixed
# 30 000-image subset. New head at 10x the backbone lr, blocks 4-7 at 0.5x (a coarse layer decay).
VITS14 = dict(img_size=112)
RECIPES.update({
    "vits14_cifar10": finetune(
        "vits14_cifar10", arch=VITS14, epochs=1, batch_size=64, lr=1e-4, min_lr=1e-6, warmup_epochs=0.05, train_limit=30000,
        eval_limit=1000, final_eval_limit=2000, save_every_steps=10,
        freeze=["patch_embed.", "cls_token", "pos_embed", *(f"blocks.{i}." for i in range(4))],
        lr_scales=[("head", 10.0), *((f"blocks.{i}.", 0.5) for i in range(4, 8))],
    ),
    # Stage 2 (`--init` the stage-1 model above): a further 0.32 epoch (16 000 images drawn from the
    # whole training split, so most are new to the model) at a lower peak lr, first four blocks still frozen.
    "vits14_cifar10_stage2": finetune(
        "vits14_cifar10_stage2", arch=VITS14, epochs=0.32, batch_size=64, lr=3e-5, min_lr=1e-6, warmup_epochs=0.02, train_limit=None,
        eval_limit=1000, final_eval_limit=1000, save_every_steps=10, new_head=False,
        freeze=["patch_embed.", "cls_token", "pos_embed", *(f"blocks.{i}." for i in range(4))],
        lr_scales=[("head", 3.0), *((f"blocks.{i}.", 0.5) for i in range(4, 8))],
    ),
    # Control: a linear probe (head only, backbone frozen) at the same resolution and augmentation.
    "vits14_cifar10_probe": finetune(
        "vits14_cifar10_probe", arch=VITS14, epochs=1, batch_size=64, lr=1e-3, min_lr=1e-5, warmup_epochs=0.05, train_limit=5000,
        eval_limit=1000, final_eval_limit=2000, save_every_steps=10, freeze=["blocks.", "patch_embed.", "cls_token", "pos_embed", "model.norm."],
    ),
})

# Trained token reduction on the real reference (`--init models/vits14_cifar10.safetensors --teacher` the
# same file): the toy model's shared budget scaled to what fits a CPU session on this 22 M-parameter
# model: one pass over a fixed 2 048-image subset (32 steps at batch 64, ~5 min on 2 idle cores),
# the classifier's frozen early blocks, KL to the classifier (weight 0.5), each reference's
# predictor learning rates (see the CIFAR-10 recipes above). A stated budget, far below the papers'
# 30-100 ImageNet epochs: what the learned parts reach in minutes, not what they can reach.
_VITS14_FROZEN = ["patch_embed.", "cls_token", "pos_embed", *(f"blocks.{i}." for i in range(4))]
RECIPES.update({
    name: finetune(
        name, method, arch=VITS14, train_limit=2048, eval_limit=500, final_eval_limit=1000, save_every_steps=8, new_head=False,
        distill_weight=0.5, warmup_epochs=0.1, lr=5e-5, freeze=_VITS14_FROZEN, **extra,
    )
    for name, method, extra in [
        ("finetune_vits14", "baseline", {}),
        ("spot_vits14", "spot", dict(lr_scales=[("predictors", 10.0)], method_options={"rho": 0.7})),
        ("dynamicvit_vits14", "dynamicvit", dict(lr_scales=[("predictors", 100.0)], method_options={"rho": 0.7})),
        ("avit_vits14", "avit", dict(method_options={"ponder_weight": 5e-3, "distr_weight": 1e-2})),
    ]
})


def get_recipe(name: str, **overrides: Any) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return recipe.replace(**overrides) if overrides else recipe


def dataset_name(data: str | os.PathLike) -> str:
    """The data's folder or archive name without archive suffixes: 'flowers' for flowers.tar.gz."""
    name = Path(data).resolve().name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return name


def recipe_for_data(
    kind: str, data: str | os.PathLike, *, init: Any = None, arch: str = "vit_tiny", img_size: int | None = None,
    patch_size: int | None = None, num_classes: int | None = None, **changes: Any,
) -> tuple[Recipe, list[str]]:
    """A generic recipe ('scratch' or 'finetune') resolved against an ImageFolder with train/ (and test/ or val/).

    scratch: image size, patch size and class count from the arguments, else from the data (the most
    common short side among sampled images; patches of 4, 8 or 16 px for a grid of at most ~14 x 14;
    the training classes). finetune: the --init checkpoint's architecture (resize it first with
    `model.set_input_size`), a new head if the data's classes differ. The model is named
    f"{kind}_{data name}". Returns the recipe and one line per choice made from the data.
    """
    from ..data import ImageFolder
    from ..data.stats import default_patch_size, infer_img_size

    if kind not in GENERIC:
        raise ConfigError(f"unknown generic recipe {kind!r}; use one of {', '.join(GENERIC)}")
    name = f"{kind}_{dataset_name(data)}"
    if kind == "finetune":
        if init is None:
            raise ConfigError("recipe 'finetune' starts from a checkpoint: pass --init CKPT (or use --recipe scratch)")
        if num_classes is not None or patch_size is not None:
            raise ConfigError("recipe 'finetune' keeps the checkpoint's patch size and takes its classes from the data")
        return finetune(name, arch=init.cfg.to_dict(), **changes), []
    if init is not None:
        raise ConfigError("recipe 'scratch' trains from random weights; to start from --init use --recipe finetune")
    if arch not in ARCHS:
        raise ConfigError(f"unknown --arch {arch!r}; available: {', '.join(ARCHS)}")
    train = ImageFolder(data, "train")
    chosen = []
    if patch_size is None:
        patch_size = default_patch_size(img_size or infer_img_size(train))
        chosen.append(f"patch size {patch_size}")
    if img_size is None:
        img_size = infer_img_size(train, patch_size)
        chosen.append(f"image size {img_size} (the most common short side, to a multiple of the patch size)")
    if num_classes is None:
        num_classes = len(train.classes)
        chosen.append(f"{num_classes} classes")
    notes = [f"{name}: from the data: {', '.join(chosen)}"] if chosen else []
    return scratch(name, arch=arch, img_size=img_size, patch_size=patch_size, num_classes=num_classes, **changes), notes
