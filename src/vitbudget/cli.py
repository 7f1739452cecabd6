"""The `vitbudget` command: evaluate and train token-budget methods on ViTs."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__
from .defaults import DEFAULT_DATA, DEFAULT_MODEL, default_path
from .errors import ConfigError, VitbudgetError
from .io import atomic_path, ensure_writable_dir, write_json, write_text
from .methods import METHODS, build_method, load_method

EVAL_EPILOG = """examples:
  vitbudget eval                                  # reference model on the full CIFAR-10 test set
  vitbudget eval --limit 1000 --no-speed          # quick check on a fixed 1000-image subset
  vitbudget eval --model my.safetensors --data imgs/ --split val --out runs/mine
  vitbudget eval --model deit_t.pth --arch deit_tiny_patch16_224 --data imagenet.tar --split val

Writes OUT/results.json (every number, the machine and the command), OUT/results.md (a table)
and OUT/predictions.npz (per-image predictions for paired tests). Speed ratios compare each
method with the baseline, timed round-robin in the same run."""

TRAIN_EPILOG = """examples:
  vitbudget train --recipe smoke --out runs/smoke          # seconds: checks an installation
  vitbudget train --recipe vit_tiny_p4_cifar10 --out runs/ref   # reproduces the reference model (~2 h, 2 cores)
  vitbudget train --recipe vit_tiny_p4_cifar10 --init ref.safetensors --epochs 2 --lr 1e-4 --out runs/ft
  vitbudget train --recipe spot_cifar10 --init ref.safetensors --out runs/spot      # teacher = --init
  vitbudget train --recipe avit_cifar10 --init ref.safetensors --target-depth 6 --out runs/avit_d6

Checkpoints go to OUT/train_state.pt every --save-every steps and at each epoch end; run the
same command again to resume after an interruption. The final model is OUT/model.safetensors
with its JSON sidecar (config, preprocessing, recipe, per-epoch log, test metrics)."""


def _method_option_flags(parser: argparse.ArgumentParser) -> list[str]:
    """One flag per option field of any registered method (shared names share a flag)."""
    names: list[str] = []
    group = parser.add_argument_group("method options (each applies to the methods that have it)")
    for spec in METHODS.values():
        for field in dataclasses.fields(spec.options):
            flag = "--" + field.name.replace("_", "-")
            if field.name in names or flag in parser._option_string_actions:  # e.g. train's own --seed
                continue
            names.append(field.name)
            kind = type(field.default) if field.default is not dataclasses.MISSING and field.default is not None else str
            kind = {bool: _parse_bool}.get(kind, kind)
            group.add_argument(flag, dest=f"opt_{field.name}", type=kind, default=None,
                               help=field.metadata.get("help", f"{spec.name} option") + f" (default {field.default})")
    return names


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitbudget", description="Spend a Vision Transformer's compute where the tokens matter.")
    parser.add_argument("--version", action="version", version=f"vitbudget {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{eval,train,bench,viz,corrupt,make-counting}")

    ev = sub.add_parser("eval", help="accuracy, calibration, FLOPs and speed of methods on a dataset",
                        description="Evaluate one or more methods on a ViT checkpoint and an ImageFolder dataset.",
                        epilog=EVAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", default=None, help=f"checkpoint (.safetensors with .json sidecar, or a timm state dict with --arch); default: shared {DEFAULT_MODEL}")
    ev.add_argument("--arch", default=None, help="architecture name for a plain timm state dict, e.g. deit_tiny_patch16_224")
    ev.add_argument("--num-classes", type=int, default=None, help="override the head size of a --arch checkpoint")
    ev.add_argument("--data", default=None, help=f"ImageFolder directory or .tar/.tar.gz of one; default: shared {DEFAULT_DATA}")
    ev.add_argument("--split", default="test", help="split folder inside --data (default: test)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate a fixed pseudo-random subset of this many images")
    ev.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    ev.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(2, cores))")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    ev.add_argument("--method", action="append", default=None, choices=sorted(METHODS), help="method to evaluate; repeat for several (the baseline is always included)")
    ev.add_argument("--no-speed", action="store_true", help="skip latency and throughput measurement")
    ev.add_argument("--latency-repeats", type=int, default=50, help="batch-1 timing rounds per method, round-robin (default 50)")
    ev.add_argument("--throughput-repeats", type=int, default=10, help="batch-64 timing rounds per method, round-robin (default 10)")
    ev.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    _method_option_flags(ev)

    be = sub.add_parser("bench", help="a suite of methods x seeds: mean ± std, paired tests, speed (paper tables)",
                        description="Run a suite (several methods, seeds where a method is random) on the same images.",
                        epilog="examples:\n  vitbudget bench --suite abs --out runs/abs_table1            # ABS Tables 1/3/4\n"
                               "  vitbudget bench --suite abs-ablation --out runs/abs_table5\n"
                               "  vitbudget bench --suite abs-short --data DIR --split gaussian_noise,fog --no-speed --out runs/abs_c\n"
                               "  vitbudget bench --suite benchmarks/spot_table1.json --out runs/spot_table1   # entries with their own checkpoints\n\n"
                               "A suite file is JSON: {\"entries\": [{\"label\": \"SPOT\", \"method\": \"spot\", \"model\": \"runs/spot/model.safetensors\",\n"
                               "\"options\": {\"rho\": 0.7}, \"seeded\": false}, ...]}; the first entry is the reference for ratios and tests,\n"
                               "an entry without \"model\" uses --model.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    from .eval.suite import SUITES

    be.add_argument("--suite", required=True, metavar="NAME|FILE.json", help=f"named suite ({', '.join(sorted(SUITES))}) or a JSON suite file")
    be.add_argument("--model", default=None, help="checkpoint (default: the shared reference model)")
    be.add_argument("--data", default=None, help="ImageFolder directory or archive (default: shared CIFAR-10)")
    be.add_argument("--split", default="test", help="split folder, or several separated by commas (one table each plus a summary)")
    be.add_argument("--limit", type=int, default=None, help="fixed pseudo-random subset of this many images per split")
    be.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 for methods with random parts (default 5)")
    be.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    be.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(2, cores))")
    be.add_argument("--device", default="cpu", help="torch device (default cpu)")
    be.add_argument("--no-speed", action="store_true", help="skip latency and throughput")
    be.add_argument("--latency-repeats", type=int, default=50, help="batch-1 timing rounds per method, round-robin (default 50)")
    be.add_argument("--throughput-repeats", type=int, default=10, help="batch-64 timing rounds per method, round-robin (default 10)")
    be.add_argument("--out", default="runs/bench", help="output directory (default runs/bench)")
    be.add_argument("--quiet", action="store_true", help="no progress bars")

    vz = sub.add_parser("viz", help="draw which tokens a method chose, per image, as PNG",
                        description="Run a method on a few images and draw its token map (selected / halted / dropped tokens).",
                        epilog="example:\n  vitbudget viz --method abs --alpha 0.2 --num-images 8 --out runs/viz",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    vz.add_argument("--method", required=True, choices=sorted(METHODS), help="method whose choices to draw")
    vz.add_argument("--model", default=None, help="checkpoint (default: the shared reference model)")
    vz.add_argument("--data", default=None, help="ImageFolder directory or archive (default: shared CIFAR-10)")
    vz.add_argument("--split", default="test", help="split folder (default: test)")
    vz.add_argument("--num-images", type=int, default=8, help="images to draw (default 8)")
    vz.add_argument("--out", default="runs/viz", help="output directory (default runs/viz)")
    _method_option_flags(vz)

    tr = sub.add_parser("train", help="train a ViT (or a method around one) with a recipe; resumable",
                        description="Train or fine-tune with a named recipe. Re-running the same command resumes.",
                        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .train.recipes import RECIPES

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
    tr.add_argument("--method", default=None, choices=sorted(METHODS), help="train this method around the ViT (default: the recipe's)")
    tr.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(2, cores))")
    tr.add_argument("--device", default="cpu", help="torch device (default cpu)")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    _method_option_flags(tr)
    _add_data_commands(sub)
    return parser


CORRUPT_EPILOG = """examples:
  vitbudget corrupt --out ~/.cache/vitbudget/cifar10c-s3-2000 --limit 2000     # 15 corruptions of the shared test set
  vitbudget corrupt --data imgs/ --split val --out corrupted --corruptions fog,snow --severity 5
  vitbudget eval --data ~/.cache/vitbudget/cifar10c-s3-2000 --split fog --out runs/fog   # evaluate one corruption

Writes OUT/<corruption>/<class>/<image>.png (lossless), one ImageFolder per corruption, so the
corruption's name is the --split to evaluate it. Needs the optional package imagecorruptions-imaug
(pip install 'vitbudget[robustness]'). It implements the ImageNet-C constants: at 32 px these are
harsher than the published CIFAR-10-C at the same severity (see vitbudget/data/corruptions.py).
--limit keeps the same images as `vitbudget eval --limit`. A finished corruption is not redone."""

COUNTING_EPILOG = """examples:
  vitbudget make-counting --out ~/.cache/vitbudget/counting-32
  vitbudget train --recipe count_vit_p4 --data ~/.cache/vitbudget/counting-32 --out runs/count_vit

Writes OUT/{train,test}/<count>/<index>.png with classes 03..10 (3 to 10 objects, balanced).
Deterministic in --seed; an existing complete output with the same arguments is reused."""


def _add_data_commands(sub) -> None:
    from .data.corruptions import CORRUPTIONS

    co = sub.add_parser("corrupt", help="write common-corruption copies (CIFAR-10-C style) of an ImageFolder split",
                        description="Apply common corruptions (imagecorruptions-imaug) to every image of a split, reproducibly.",
                        epilog=CORRUPT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    co.add_argument("--data", default=None, help=f"ImageFolder directory or .tar/.tar.gz of one; default: shared {DEFAULT_DATA}")
    co.add_argument("--split", default="test", help="split folder inside --data; '.' for --data itself (default: test)")
    co.add_argument("--out", required=True, help="output directory: OUT/<corruption>/<class>/<image>.png")
    co.add_argument("--corruptions", default=None, help=f"comma-separated names (default: all 15: {','.join(CORRUPTIONS)})")
    co.add_argument("--severity", type=int, default=3, help="1 to 5 (default 3)")
    co.add_argument("--limit", type=int, default=None, help="corrupt a fixed pseudo-random subset of this many images (as eval --limit)")
    co.add_argument("--seed", type=int, default=0, help="seed of the corruptions' randomness (default 0)")
    co.add_argument("--quiet", action="store_true", help="no progress bars")

    mc = sub.add_parser("make-counting", help="generate a CLEVR-Count-like data set of 3-10 shapes",
                        description="Generate procedural counting scenes as an ImageFolder with train/ and test/ splits.",
                        epilog=COUNTING_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    mc.add_argument("--out", required=True, help="output directory")
    mc.add_argument("--train", type=int, default=20000, help="training images (default 20000)")
    mc.add_argument("--test", type=int, default=2000, help="test images (default 2000)")
    mc.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    mc.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    mc.add_argument("--quiet", action="store_true", help="no progress bars")


def _resolve(value: str | None, relative: str, what: str) -> str:
    if value is not None:
        return value
    path = default_path(relative)
    if path is None:
        raise ConfigError(f"no --{what} given and no shared/ directory found (set VITBUDGET_SHARED)")
    return path


def _method_options(args: argparse.Namespace, method: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(METHODS[method].options)}
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None and k[4:] in fields}


def _check_repeats(args: argparse.Namespace) -> None:
    if args.latency_repeats <= 0 or args.throughput_repeats <= 0:
        raise ConfigError(f"--latency-repeats and --throughput-repeats must be positive, got {args.latency_repeats}, {args.throughput_repeats}")


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import EvalTransform, ImageFolder, subset_indices
    from .eval.evaluate import evaluate, predictions_arrays
    from .eval.machine import machine_info
    from .models import load_model
    from .report import results_table

    _check_repeats(args)
    out_dir = ensure_writable_dir(args.out)
    model_path = _resolve(args.model, DEFAULT_MODEL, "model")
    data_path = _resolve(args.data, DEFAULT_DATA, "data")
    overrides = {"num_classes": args.num_classes} if args.num_classes else {}
    model = load_model(model_path, arch=args.arch, **overrides).to(args.device)
    names = list(dict.fromkeys(["baseline", *(args.method or [])]))
    given = {k[4:] for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    unused = given - {f.name for n in names for f in dataclasses.fields(METHODS[n].options)}
    if unused:
        raise ConfigError(f"option(s) {', '.join('--' + u.replace('_', '-') for u in sorted(unused))} apply to none of the methods {names}")
    if args.arch is None:  # our format: a method checkpoint restores its trained parameters
        methods = {name: load_method(model_path, name, **_method_options(args, name)).to(args.device) for name in names}
    else:
        methods = {name: build_method(name, model, **_method_options(args, name)) for name in names}

    dataset = ImageFolder(data_path, args.split, EvalTransform(model.cfg.img_size, model.info.preprocess))
    if model.info.classes and dataset.classes != model.info.classes:
        print(f"warning: dataset classes {dataset.classes[:5]}... differ from the model's {model.info.classes[:5]}...", file=sys.stderr)
    if len(dataset.classes) > model.cfg.num_classes:
        raise ConfigError(f"dataset has {len(dataset.classes)} classes but the model only {model.cfg.num_classes} outputs")
    indices = subset_indices(len(dataset), args.limit)
    results, preds = evaluate(methods, dataset, indices, batch_size=args.batch_size, workers=args.workers,
                              device=args.device, speed=not args.no_speed, progress=not args.quiet,
                              latency_repeats=args.latency_repeats, throughput_repeats=args.throughput_repeats)
    report = {
        "command": "vitbudget " + shlex.join(sys.argv[1:]),
        "model": {"path": str(model_path), "name": model.info.name, "config": model.cfg.to_dict()},
        "data": {"path": str(data_path), "split": args.split, "images": len(indices), "of": len(dataset), "limit": args.limit},
        "machine": machine_info(args.device),
        "methods": results,
    }
    table = results_table(results)
    write_json(out_dir / "results.json", report)
    write_text(out_dir / "results.md", f"`{report['command']}` — {len(indices)} images, {report['machine']['cpu']}\n\n{table}")
    with atomic_path(out_dir / "predictions.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **predictions_arrays(preds))
    print(table)
    print(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {out_dir / 'predictions.npz'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .data import EvalTransform, ImageFolder, subset_indices
    from .eval.machine import describe_machine, machine_info
    from .eval.suite import load_suite, run_suite, suite_table
    from .report import save_pareto
    from .models import load_model

    _check_repeats(args)
    out_dir = ensure_writable_dir(args.out)
    if args.seeds <= 0:
        raise ConfigError(f"--seeds must be positive, got {args.seeds}")
    entries = load_suite(args.suite)
    model_path = _resolve(args.model, DEFAULT_MODEL, "model")
    data_path = _resolve(args.data, DEFAULT_DATA, "data")
    model = load_model(model_path)
    transform = EvalTransform(model.cfg.img_size, model.info.preprocess)
    splits = [s for s in args.split.split(",") if s]
    datasets = {split: ImageFolder(data_path, split, transform) for split in splits}  # fail fast on a bad split
    machine = machine_info(args.device)
    command = "vitbudget " + shlex.join(sys.argv[1:])
    results = {}
    for split, dataset in datasets.items():
        indices = subset_indices(len(dataset), args.limit)
        result = run_suite(entries, model_path, dataset, indices, seeds=list(range(args.seeds)), batch_size=args.batch_size,
                           workers=args.workers, device=args.device, speed=not args.no_speed, progress=not args.quiet,
                           latency_repeats=args.latency_repeats, throughput_repeats=args.throughput_repeats)
        results[split] = result
        table = suite_table(result)
        header = f"`{command}` — split `{split}`, {len(indices)} images, model `{model.info.name}`, {describe_machine(machine)}\n\n"
        write_text(out_dir / f"{split}.md", header + table)
        save_pareto(result["rows"], out_dir / f"{split}_pareto.png", title=f"{args.suite} — {split}, {len(indices)} images, {model.info.name}")
        print(f"\n## {split}\n{table}")
    report = {"command": command, "suite": args.suite, "model": str(model_path), "data": str(data_path), "machine": machine, "splits": results}
    if len(results) > 1:
        summary = robustness_table(results)
        write_text(out_dir / "summary.md", f"`{command}` — top-1 % per split (mean over seeds)\n\n{summary}")
        print(summary)
    write_json(out_dir / "bench.json", report)
    print(f"wrote {out_dir}")
    return 0


def robustness_table(results: dict[str, dict]) -> str:
    """Rows: methods; columns: splits (e.g. corruption types) and their mean; cells: top-1 mean."""
    splits = list(results)
    labels = list(next(iter(results.values()))["rows"])
    lines = ["| method | " + " | ".join(splits) + " | mean |", "|---|" + "---|" * (len(splits) + 1)]
    for label in labels:
        values = [results[s]["rows"][label]["top1_mean"] for s in splits]
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {sum(values) / len(values):.2f} |")
    return "\n".join(lines) + "\n"


def cmd_viz(args: argparse.Namespace) -> int:
    from .data import EvalTransform, ImageFolder, subset_indices
    from .models import load_model
    from .report import denormalize, save_token_maps

    out_dir = ensure_writable_dir(args.out)
    model_path = _resolve(args.model, DEFAULT_MODEL, "model")
    model = load_model(model_path)
    method = load_method(model_path, args.method, **_method_options(args, args.method))
    dataset = ImageFolder(_resolve(args.data, DEFAULT_DATA, "data"), args.split, EvalTransform(model.cfg.img_size, model.info.preprocess))
    if args.num_images <= 0:
        raise ConfigError(f"--num-images must be positive, got {args.num_images}")
    indices = subset_indices(len(dataset), args.num_images)
    images = torch.stack([dataset[i][0] for i in indices])
    labels = [dataset.targets[i] for i in indices]
    with torch.inference_mode():
        out = method(images)
    token_map = method.token_map(out)
    if token_map is None:
        raise ConfigError(f"method {args.method!r} draws no token map")
    names = dataset.classes
    preds = out.logits.argmax(1).tolist()
    titles = [f"{names[t]} → {names[p]}" for t, p in zip(labels, preds)]
    desc = ", ".join(f"{k}={v}" for k, v in method.describe().items() if k != "method")
    path = out_dir / f"{args.method}_tokens.png"
    save_token_maps(denormalize(images, model.info.preprocess), token_map, model.cfg.patch_size, path,
                    titles=titles, suptitle=f"{args.method} ({desc}) — true → predicted")
    print(f"wrote {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .models import load_model
    from .train import Trainer, get_recipe

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
    method_options = _method_options(args, recipe.method)
    if method_options:
        recipe = recipe.replace(method_options={**recipe.method_options, **method_options})
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
    data = _resolve(args.data, DEFAULT_DATA, "data")
    trainer = Trainer(recipe, data, args.out, init=init, teacher=teacher, device=args.device, workers=args.workers, progress=not args.quiet)
    if trainer.state_path.is_file():
        print(f"resuming from {trainer.state_path}", file=sys.stderr)
    result = trainer.fit()
    print(json.dumps({"model": str(result.model_path), **result.metrics}, indent=1))
    return 0


def cmd_corrupt(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from .data import resolve_split_dir
    from .data.corruptions import check_corruption, corrupt_folder, parse_corruptions
    from .data.corruptions import package_version as corruptions_version

    names = parse_corruptions(args.corruptions)
    check_corruption(names[0], args.severity)
    if args.limit is not None and args.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {args.limit}")
    src = resolve_split_dir(_resolve(args.data, DEFAULT_DATA, "data"), args.split)
    out_dir = ensure_writable_dir(args.out)
    start = time.perf_counter()
    for name in tqdm(names, desc="corruptions", unit="corruption", disable=args.quiet):
        corrupt_folder(src, out_dir / name, name, args.severity, args.seed, args.limit, progress=not args.quiet)
    print(f"wrote {len(names)} corruption(s) at severity {args.severity} of {src} to {out_dir}/<corruption>/ "
          f"in {time.perf_counter() - start:.0f} s (imagecorruptions-imaug {corruptions_version()})")
    print(f"evaluate one with: vitbudget eval --data {out_dir} --split {names[0]}")
    return 0


def cmd_make_counting(args: argparse.Namespace) -> int:
    import time

    from .data.counting import make_counting

    start = time.perf_counter()
    out = make_counting(args.out, train=args.train, test=args.test, size=args.size, seed=args.seed, progress=not args.quiet)
    print(f"wrote {out}/{{train,test}}/<count>/ ({args.train} + {args.test} images, {args.size} px) in {time.perf_counter() - start:.0f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"eval": cmd_eval, "train": cmd_train, "viz": cmd_viz, "bench": cmd_bench, "corrupt": cmd_corrupt, "make-counting": cmd_make_counting}[args.command](args)
    except VitbudgetError as exc:
        print(f"vitbudget: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vitbudget: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
