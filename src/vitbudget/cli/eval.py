"""`vitbudget eval`: accuracy, calibration, FLOPs and speed of methods on one dataset."""
from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np

from .. import distributed
from ..defaults import DEFAULT_DATA, DEFAULT_MODEL
from ..io import OutputDir, write_json, write_text
from ..methods import build_method, load_method
from .options import (add_common_flags, add_checkpoint_flags, add_class_mismatch_flag, add_config_flag, add_method_option_flags, apply_run_config,
                      check_unused_options, device_arg, label_source, method_help, method_name, method_options, open_dataset,
                      positive_int, resolve_default, workers_count)

EPILOG = """examples:
  vitbudget eval                                  # reference model on the full CIFAR-10 test set
  vitbudget eval --limit 1000 --no-speed          # quick check on a fixed 1000-image subset
  vitbudget eval --model my.safetensors --data imgs/ --split val --out runs/mine
  vitbudget eval --model deit_t.pth --arch deit_tiny_patch16_224 --data imagenet.tar --split val
  torchrun --standalone --nproc_per_node 4 -m vitbudget eval --method evit --device cuda --out runs/evit
      (whole batches dealt to 4 processes and gathered: the same results as one process; speed timed on rank 0)
  vitbudget eval --config runs/tune/config.json --data imgs/    # the setting `vitbudget tune` chose, on the test split
  vitbudget eval --task saliency --model vits14_saliency/ --data photos/ --method tome --out runs/sal
      (dense: maps vs the unmodified model's, OUT/maps.png side by side; docs/saliency.md)

Writes OUT/results.json (every number, the machine and the command), OUT/results.md (a table)
and OUT/predictions.npz (per-image predictions for paired tests). Speed ratios compare each
method with the baseline, timed round-robin in the same run."""


OUTPUT_FILES = ["results.json", "results.md", "predictions.npz"]


def add_parser(sub) -> argparse.ArgumentParser:
    ev = sub.add_parser("eval", help="accuracy, calibration, FLOPs and speed of methods on a dataset",
                        description="Evaluate one or more methods on a ViT checkpoint and an ImageFolder dataset.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(ev)
    add_common_flags(ev, out="runs/eval", dtype="fp32", batch_size=256, batch_help="evaluation batch size")
    ev.add_argument("--task", choices=["classification", "saliency"], default="classification",
                    help="classification (the ViT's own head), or saliency: the model directory's dense head on the patch grid, "
                         "scored against the unmodified model's maps (see docs/saliency.md; default classification)")
    ev.add_argument("--data", default=None, help=f"ImageFolder directory or .tar/.tar.gz of one; default: shared {DEFAULT_DATA}")
    ev.add_argument("--split", default="test", help="split folder inside --data (default: test)")
    ev.add_argument("--limit", type=positive_int, default=None, help="evaluate a fixed pseudo-random subset of this many images")
    ev.add_argument("--workers", type=workers_count, default=None, help="data-loading processes, 0 to 64 (default: min(2, cores))")
    ev.add_argument("--method", action="append", default=None, type=method_name, metavar="NAME",
                    help=method_help("method to evaluate; repeat for several (the baseline is always included)"))
    ev.add_argument("--no-speed", action="store_true", help="skip latency and throughput measurement")
    ev.add_argument("--compile", action="store_true", help="run every method under torch.compile (inputs still checked eagerly; A-ViT with graph breaks)")
    ev.add_argument("--latency-repeats", type=positive_int, default=50, help="batch-1 timing rounds per method, round-robin (default 50)")
    ev.add_argument("--throughput-repeats", type=positive_int, default=10, help="batch-64 timing rounds per method, round-robin (default 10)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    add_class_mismatch_flag(ev)
    add_config_flag(ev)
    add_method_option_flags(ev)
    return ev


def run(args: argparse.Namespace) -> int:
    """Under torchrun: one process per rank, images shared out, results gathered, rank 0 writes (see vitbudget.distributed)."""
    with distributed.session(args.device) as args.device:  # this rank's device (cuda:LOCAL_RANK under torchrun)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.task != "classification":
        from . import eval_dense

        return eval_dense.run(args)
    from ..data import EvalTransform, subset_indices
    from ..devices import autocast

    autocast(args.device, args.dtype)  # before any work: fp16 needs a GPU
    from ..data.stats import conversion_notes
    from ..eval.evaluate import evaluate, predictions_arrays
    from ..eval.machine import machine_info
    from ..models import load_model
    from ..report import results_table

    apply_run_config(args, method_list=True)
    out = OutputDir(args.out, OUTPUT_FILES)  # checked now, written only when everything succeeded
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    data_path = resolve_default(args.data, DEFAULT_DATA, "data")
    overrides = {"num_classes": args.num_classes} if args.num_classes else {}
    model = load_model(model_path, arch=args.arch, **overrides).to(args.device)
    if args.img_size is not None and args.img_size != model.cfg.img_size:
        model.set_input_size(args.img_size)
    names = list(dict.fromkeys(["baseline", *(args.method or [])]))
    check_unused_options(args, names)
    if args.arch is None:  # our format: a method checkpoint restores its trained parameters
        methods = {name: load_method(model_path, name, img_size=args.img_size, **method_options(args, name)).to(args.device) for name in names}
    else:
        methods = {name: build_method(name, model, **method_options(args, name)) for name in names}
    if args.compile:
        from ..methods.compiled import compile_method

        methods = {name: compile_method(method) for name, method in methods.items()}

    with distributed.local_main_first():  # one unpack of an archive per machine
        dataset = open_dataset(data_path, args.split, model, EvalTransform(model.cfg.img_size, model.info.preprocess), args.allow_class_mismatch)
    if distributed.context().main:
        for line in model.info.notes + conversion_notes(dataset, model.cfg.img_size, model.info.preprocess, f"{args.split} images"):
            print(line, file=sys.stderr)
    indices = subset_indices(len(dataset), args.limit)
    if len(indices) < len(dataset) and distributed.context().main:
        print(f"vitbudget: note: a fixed subset of {len(indices)} of the {len(dataset)} {args.split} images (--limit; "
              "the same images every run)", file=sys.stderr)
    results, preds = evaluate(methods, dataset, indices, batch_size=args.batch_size, workers=args.workers,
                              device=args.device, speed=not args.no_speed, progress=not args.quiet,
                              latency_repeats=args.latency_repeats, throughput_repeats=args.throughput_repeats, dtype=args.dtype)
    processes = distributed.context().world
    if not distributed.context().main:
        return 0
    report = {
        "command": "vitbudget " + shlex.join(sys.argv[1:]),
        "model": {"path": str(model_path), "name": model.info.name, "config": model.cfg.to_dict()},
        "data": {"path": str(data_path), "split": args.split, "images": len(indices), "of": len(dataset), "limit": args.limit,
                 "classes": dataset.classes, "labels": label_source(dataset)},
        "machine": machine_info(args.device),
        "processes": processes,  # speed, when timed, ran on rank 0 alone
        "dtype": args.dtype,
        "methods": results,
    }
    table = results_table(results)
    with out.publish() as stage:
        write_json(stage / "results.json", report)
        write_text(stage / "results.md", f"`{report['command']}` — {len(indices)} images, {report['machine']['cpu']}\n\n{table}")
        with open(stage / "predictions.npz", "wb") as fh:
            np.savez_compressed(fh, **predictions_arrays(preds))
    print(table)
    print(f"wrote {', '.join(str(out.path / name) for name in OUTPUT_FILES)}")
    return 0

