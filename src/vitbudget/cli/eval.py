"""`vitbudget eval`: accuracy, calibration, FLOPs and speed of methods on one dataset."""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

import numpy as np

from ..defaults import DEFAULT_DATA, DEFAULT_MODEL
from ..errors import ConfigError
from ..io import atomic_path, ensure_writable_dir, write_json, write_text
from ..methods import build_method, get_spec, load_method
from .options import (add_config_flag, add_method_option_flags, apply_run_config, check_repeats, method_help, method_name,
                      method_options, resolve_default)

EPILOG = """examples:
  vitbudget eval                                  # reference model on the full CIFAR-10 test set
  vitbudget eval --limit 1000 --no-speed          # quick check on a fixed 1000-image subset
  vitbudget eval --model my.safetensors --data imgs/ --split val --out runs/mine
  vitbudget eval --model deit_t.pth --arch deit_tiny_patch16_224 --data imagenet.tar --split val
  vitbudget eval --config runs/tune/config.json --data imgs/    # the setting `vitbudget tune` chose, on the test split

Writes OUT/results.json (every number, the machine and the command), OUT/results.md (a table)
and OUT/predictions.npz (per-image predictions for paired tests). Speed ratios compare each
method with the baseline, timed round-robin in the same run."""


def add_parser(sub) -> argparse.ArgumentParser:
    ev = sub.add_parser("eval", help="accuracy, calibration, FLOPs and speed of methods on a dataset",
                        description="Evaluate one or more methods on a ViT checkpoint and an ImageFolder dataset.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", default=None, help=f"checkpoint (.safetensors with .json sidecar, or a timm state dict with --arch); default: shared {DEFAULT_MODEL}")
    ev.add_argument("--arch", default=None, help="architecture name for a plain timm state dict, e.g. deit_tiny_patch16_224")
    ev.add_argument("--num-classes", type=int, default=None, help="override the head size of a --arch checkpoint")
    ev.add_argument("--data", default=None, help=f"ImageFolder directory or .tar/.tar.gz of one; default: shared {DEFAULT_DATA}")
    ev.add_argument("--split", default="test", help="split folder inside --data (default: test)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate a fixed pseudo-random subset of this many images")
    ev.add_argument("--batch-size", type=int, default=256, help="evaluation batch size (default 256)")
    ev.add_argument("--workers", type=int, default=None, help="data-loading processes (default: min(2, cores))")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    ev.add_argument("--method", action="append", default=None, type=method_name, metavar="NAME",
                    help=method_help("method to evaluate; repeat for several (the baseline is always included)"))
    ev.add_argument("--no-speed", action="store_true", help="skip latency and throughput measurement")
    ev.add_argument("--latency-repeats", type=int, default=50, help="batch-1 timing rounds per method, round-robin (default 50)")
    ev.add_argument("--throughput-repeats", type=int, default=10, help="batch-64 timing rounds per method, round-robin (default 10)")
    ev.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flag(ev)
    add_method_option_flags(ev)
    return ev


def run(args: argparse.Namespace) -> int:
    from ..data import EvalTransform, ImageFolder, subset_indices
    from ..eval.evaluate import evaluate, predictions_arrays
    from ..eval.machine import machine_info
    from ..models import load_model
    from ..report import results_table

    check_repeats(args)
    apply_run_config(args, method_list=True)
    out_dir = ensure_writable_dir(args.out)
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    data_path = resolve_default(args.data, DEFAULT_DATA, "data")
    overrides = {"num_classes": args.num_classes} if args.num_classes else {}
    model = load_model(model_path, arch=args.arch, **overrides).to(args.device)
    names = list(dict.fromkeys(["baseline", *(args.method or [])]))
    given = {k[4:] for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    unused = given - {f.name for n in names for f in dataclasses.fields(get_spec(n).options)}
    if unused:
        raise ConfigError(f"option(s) {', '.join('--' + u.replace('_', '-') for u in sorted(unused))} apply to none of the methods {names}")
    if args.arch is None:  # our format: a method checkpoint restores its trained parameters
        methods = {name: load_method(model_path, name, **method_options(args, name)).to(args.device) for name in names}
    else:
        methods = {name: build_method(name, model, **method_options(args, name)) for name in names}

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
