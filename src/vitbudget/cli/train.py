"""`vitbudget train`: train a ViT, or a method around one, with a named recipe; resumable."""
from __future__ import annotations

import argparse
import json
import math
import sys

from .. import distributed
from ..defaults import DEFAULT_DATA
from ..errors import ConfigError
from .options import (add_common_flags, add_method_option_flags, device_arg, method_help, method_name, method_options, nonnegative_float, nonnegative_int, positive_float, positive_int,
                      resolve_default, workers_count)

EPILOG = """examples:
  vitbudget train --recipe scratch --data flowers/ --out runs/flowers   # any ImageFolder (train/ + test/ or val/)
  vitbudget train --recipe scratch --data flowers/ --arch vit_small --img-size 64 --patch-size 8 --epochs 30 --out runs/f64
  vitbudget train --recipe finetune --init model_dir_or.safetensors --data flowers/ --out runs/ft_flowers
  vitbudget train --recipe smoke --out runs/smoke          # seconds: checks an installation
  vitbudget train --recipe vit_tiny_p4_cifar10 --out runs/ref   # reproduces the reference model (~2 h, 2 cores)
  vitbudget train --recipe vit_tiny_p4_cifar10 --init ref.safetensors --epochs 2 --lr 1e-4 --out runs/ft
  vitbudget train --recipe spot_cifar10 --init ref.safetensors --out runs/spot      # teacher = --init
  vitbudget train --task segmentation --data ade_like/ --init vits14_saliency/ --method tome --out runs/seg
      (linear head on the frozen backbone's patch grid; mIoU of baseline and the method; docs/saliency.md)
  vitbudget train --recipe avit_cifar10 --init ref.safetensors --target-depth 6 --out runs/avit_d6
  torchrun --standalone --nproc_per_node 4 -m vitbudget train --recipe spot_cifar10 --init ref.safetensors --device cuda --out runs/spot
      (DDP: the recipe's global batch split over 4 processes; rank 0 writes; resume with 4 again)

Checkpoints go to OUT/train_state.pt every --save-every steps and at each epoch end; run the
same command again to resume after an interruption. The final model is OUT/model.safetensors
with its JSON sidecar (config, preprocessing, recipe, per-epoch log, test metrics)."""


def add_parser(sub) -> argparse.ArgumentParser:
    from ..train.recipes import ARCHS, GENERIC, RECIPES

    tr = sub.add_parser("train", help="train a ViT (or a method around one) with a recipe; resumable",
                        description="Train or fine-tune with a named recipe. Re-running the same command resumes.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--recipe", default=None, choices=[*GENERIC, *sorted(RECIPES)],
                    help="'scratch' or 'finetune' for any image folder (sizes, classes and normalisation from the data), or a named preset "
                         "(required for classification)")
    tr.add_argument("--task", choices=["classification", "segmentation"], default="classification",
                    help="classification (recipes), or segmentation: a linear head on the frozen --init backbone's patch grid, trained on "
                         "--data images/ + annotations/ (training/, validation/), mIoU of the baseline and --method (docs/saliency.md)")
    tr.add_argument("--arch", default=None, choices=sorted(ARCHS), help="scratch: transformer shape (default vit_tiny)")
    tr.add_argument("--img-size", type=positive_int, default=None, help="scratch: input size (default: the data's most common short side); "
                    "finetune: resample the checkpoint's position embeddings to this size")
    tr.add_argument("--patch-size", type=positive_int, default=None, help="scratch: patch size (default 4/8/16 px for images up to 32/96/larger)")
    tr.add_argument("--num-classes", type=positive_int, default=None, help="scratch: outputs (default: the training split's classes)")
    tr.add_argument("--eval-split", default=None, help="held-out split evaluated after each epoch (default: test, else val)")
    tr.add_argument("--data", default=None, help=f"ImageFolder with train/ and test/ splits, or an archive; default: shared {DEFAULT_DATA}")
    add_common_flags(tr, out=None, out_help="run directory: checkpoints, final model, log", dtype=None, batch_size=None)
    tr.add_argument("--init", default=None, help="start from this checkpoint instead of random weights (fine-tuning)")
    tr.add_argument("--teacher", default=None, help="frozen teacher checkpoint for distillation (default for distilling recipes: --init)")
    tr.add_argument("--distill-weight", type=nonnegative_float, default=None, help="weight of KL(teacher||student)")
    tr.add_argument("--epochs", type=positive_float, default=None, help="override the recipe's epochs")
    tr.add_argument("--lr", type=positive_float, default=None, help="override the recipe's peak learning rate")
    tr.add_argument("--seed", type=nonnegative_int, default=None, help="override the recipe's seed (initialisation, order, augmentation; never which --train-limit images)")
    tr.add_argument("--train-limit", type=positive_int, default=None, help="train on a fixed subset of this many images (the same at every --seed; disjoint from `tune`'s hold-out)")
    tr.add_argument("--eval-limit", type=positive_int, default=None, help="test images evaluated after each epoch")
    tr.add_argument("--save-every", type=positive_int, default=None, help="checkpoint every N steps")
    tr.add_argument("--freeze", action="append", default=None, help="freeze parameters whose name contains this (repeatable)")
    tr.add_argument("--lr-scale", action="append", default=None, metavar="PATTERN=SCALE", help="learning-rate multiplier for parameters whose name contains PATTERN (repeatable)")
    tr.add_argument("--method", default=None, type=method_name, metavar="NAME",
                    help=method_help("train this method around the ViT (default: the recipe's); a stack trains its reducer"))
    tr.add_argument("--workers", type=workers_count, default=None, help="data-loading processes, 0 to 64 (default: min(2, cores))")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    add_method_option_flags(tr)
    return tr


def run(args: argparse.Namespace) -> int:
    """Under torchrun: one process per rank, DDP with each global batch split over ranks, rank 0 writes (see vitbudget.distributed)."""
    with distributed.session(args.device) as args.device:  # this rank's device (cuda:LOCAL_RANK under torchrun)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.task == "segmentation":
        from . import train_seg

        return train_seg.run(args)
    if args.recipe is None:
        raise ConfigError("the following argument is required: --recipe (or --task segmentation)")
    from ..models import load_model
    from ..train import GENERIC, Trainer, get_recipe, recipe_for_data

    lr_scales = None
    if args.lr_scale:
        try:
            lr_scales = [(p, float(s)) for p, s in (item.rsplit("=", 1) for item in args.lr_scale)]
        except ValueError:
            raise ConfigError(f"--lr-scale takes PATTERN=SCALE, got {args.lr_scale}") from None
        if not all(math.isfinite(s) and s >= 0 for _, s in lr_scales):
            raise ConfigError(f"--lr-scale SCALE must be a finite number >= 0, got {args.lr_scale}")
    overrides = dict(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, train_limit=args.train_limit,
        eval_limit=args.eval_limit, save_every_steps=args.save_every, freeze=args.freeze, lr_scales=lr_scales,
        distill_weight=args.distill_weight, method=args.method, dtype=args.dtype,
    )
    data = resolve_default(args.data, DEFAULT_DATA, "data")
    init = load_model(args.init) if args.init else None
    notes: list[str] = list(init.info.notes) if init is not None else []
    if args.recipe in GENERIC:
        if init is not None and args.img_size and args.img_size != init.cfg.img_size:
            notes.append(f"note: --img-size {args.img_size}: the checkpoint's position embeddings resampled from {init.cfg.img_size} px")
            init.set_input_size(args.img_size)
        recipe, chosen = recipe_for_data(args.recipe, data, init=init, arch=args.arch or "vit_tiny", img_size=None if init else args.img_size,
                                         patch_size=args.patch_size, num_classes=args.num_classes)
        notes += chosen
        recipe = recipe.replace(**{k: v for k, v in overrides.items() if v is not None})
    else:
        shape = {"--arch": args.arch, "--img-size": args.img_size, "--patch-size": args.patch_size, "--num-classes": args.num_classes}
        given = [flag for flag, value in shape.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to the generic recipes 'scratch' and 'finetune', not to preset {args.recipe!r}")
        recipe = get_recipe(args.recipe, **overrides)
    options = method_options(args, recipe.method)
    if options:
        recipe = recipe.replace(method_options={**recipe.method_options, **options})
    if init is not None:
        size = recipe.arch.get("img_size")  # a preset that fine-tunes at its own resolution
        if args.recipe not in GENERIC and size and size != init.cfg.img_size:
            notes.append(f"note: recipe {recipe.name!r} runs at {size} px: the checkpoint's position embeddings resampled from {init.cfg.img_size} px")
            init.set_input_size(size)
        recipe = recipe.replace(arch=init.cfg.to_dict())
    teacher = load_model(args.teacher) if args.teacher else None
    if teacher is not None and not recipe.distill_weight:
        recipe = recipe.replace(distill_weight=0.5)
    if teacher is None and recipe.distill_weight:  # the papers distil from the model they fine-tune
        if args.init is None:
            raise ConfigError(f"recipe {recipe.name!r} distils from a teacher: pass --init CKPT (the teacher defaults to it) or --teacher CKPT")
        teacher = load_model(args.init)
    trainer = Trainer(recipe, data, args.out, init=init, teacher=teacher, device=args.device, workers=args.workers, progress=not args.quiet,
                      eval_split=args.eval_split)
    main = distributed.context().main
    if main:
        for line in notes + trainer.notes:
            print(line, file=sys.stderr)
    if trainer.state_path.is_file() and main:
        print(f"resuming from {trainer.state_path}", file=sys.stderr)
    result = trainer.fit()
    if main:
        print(json.dumps({"model": str(result.model_path), **result.metrics}, indent=1))
    return 0
