"""`vitbudget train`: train a ViT, or a method around one, with a named recipe; resumable."""
from __future__ import annotations

import argparse
import json
import sys

from ..defaults import DEFAULT_DATA
from ..errors import ConfigError
from .options import add_method_option_flags, method_help, method_name, method_options, resolve_default

EPILOG = """examples:
  vitbudget train --recipe smoke --out runs/smoke          # seconds: checks an installation
  vitbudget train --recipe vit_tiny_p4_cifar10 --out runs/ref   # reproduces the reference model (~2 h, 2 cores)
  vitbudget train --recipe vit_tiny_p4_cifar10 --init ref.safetensors --epochs 2 --lr 1e-4 --out runs/ft
  vitbudget train --recipe spot_cifar10 --init ref.safetensors --out runs/spot      # teacher = --init
  vitbudget train --recipe avit_cifar10 --init ref.safetensors --target-depth 6 --out runs/avit_d6

Checkpoints go to OUT/train_state.pt every --save-every steps and at each epoch end; run the
same command again to resume after an interruption. The final model is OUT/model.safetensors
with its JSON sidecar (config, preprocessing, recipe, per-epoch log, test metrics)."""


def add_parser(sub) -> argparse.ArgumentParser:
    from ..train.recipes import RECIPES

    tr = sub.add_parser("train", help="train a ViT (or a method around one) with a recipe; resumable",
                        description="Train or fine-tune with a named recipe. Re-running the same command resumes.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("--recipe", required=True, choices=sorted(RECIPES), help="named recipe")
    tr.add_argument("--data", default=None, help=f"ImageFolder with train/ and test/ splits, or an archive; default: shared {DEFAULT_DATA}")
    tr.add_argument("--out", required=True, help="run directory: checkpoints, final model, log")
    tr.add_argument("--init", default=None, help="start from this checkpoint instead of random weights (fine-tuning)")
    tr.add_argument("--teacher", default=None, help="frozen teacher checkpoint for distillation (default for distilling recipes: --init)")
    tr.add_argument("--distill-weight", type=float, default=None, help="weight of KL(teacher||student)")
    tr.add_argument("--epochs", type=float, default=None, help="override the recipe's epochs")
    tr.add_argument("--lr", type=float, default=None, help="override the recipe's peak learning rate")
    tr.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size")
    tr.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    tr.add_argument("--train-limit", type=int, default=None, help="train on a fixed subset of this many images")
    tr.add_argument("--eval-limit", type=int, default=None, help="test images evaluated after each epoch")
    tr.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    tr.add_argument("--freeze", action="append", default=None, help="freeze parameters whose name contains this (repeatable)")
    tr.add_argument("--lr-scale", action="append", default=None, metavar="PATTERN=SCALE", help="learning-rate multiplier for parameters whose name contains PATTERN (repeatable)")
    tr.add_argument("--method", default=None, type=method_name, metavar="NAME",
                    help=method_help("train this method around the ViT (default: the recipe's); a stack trains its reducer"))
    tr.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(2, cores))")
    tr.add_argument("--device", default="cpu", help="torch device (default cpu)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    add_method_option_flags(tr)
    return tr


def run(args: argparse.Namespace) -> int:
    from ..models import load_model
    from ..train import Trainer, get_recipe

    lr_scales = None
    if args.lr_scale:
        try:
            lr_scales = [(p, float(s)) for p, s in (item.rsplit("=", 1) for item in args.lr_scale)]
        except ValueError:
            raise ConfigError(f"--lr-scale takes PATTERN=SCALE, got {args.lr_scale}") from None
    recipe = get_recipe(
        args.recipe, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed, train_limit=args.train_limit,
        eval_limit=args.eval_limit, save_every_steps=args.save_every, freeze=args.freeze, lr_scales=lr_scales,
        distill_weight=args.distill_weight, method=args.method,
    )
    options = method_options(args, recipe.method)
    if options:
        recipe = recipe.replace(method_options={**recipe.method_options, **options})
    init = load_model(args.init) if args.init else None
    if init is not None:
        recipe = recipe.replace(arch=init.cfg.to_dict())
    teacher = load_model(args.teacher) if args.teacher else None
    if teacher is not None and not recipe.distill_weight:
        recipe = recipe.replace(distill_weight=0.5)
    if teacher is None and recipe.distill_weight:  # the papers distil from the model they fine-tune
        if args.init is None:
            raise ConfigError(f"recipe {recipe.name!r} distils from a teacher: pass --init CKPT (the teacher defaults to it) or --teacher CKPT")
        teacher = load_model(args.init)
    data = resolve_default(args.data, DEFAULT_DATA, "data")
    trainer = Trainer(recipe, data, args.out, init=init, teacher=teacher, device=args.device, workers=args.workers, progress=not args.quiet)
    if trainer.state_path.is_file():
        print(f"resuming from {trainer.state_path}", file=sys.stderr)
    result = trainer.fit()
    print(json.dumps({"model": str(result.model_path), **result.metrics}, indent=1))
    return 0
