"""`vitbudget tune`: the method and setting that meet a target speed-up (or FLOPs) on this machine."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..defaults import DEFAULT_DATA, DEFAULT_MODEL
from ..errors import CheckpointError, ConfigError
from ..io import OutputDir, write_json, write_text
from .options import (add_common_flags, add_checkpoint_flags, add_class_mismatch_flag, device_arg, finite_float, label_source, nonnegative_int, open_dataset,
                      positive_int, resolve_default, workers_count)

EPILOG = """examples:
  vitbudget tune --model my.safetensors --data imgs/ --target-speedup 1.5          # batch 1, this machine
  vitbudget tune --model my.safetensors --data imgs/ --target-speedup 1.3 --batch-size 64 --out runs/tune64
  vitbudget tune --model deit_s.pth --arch deit_small_patch16_224 --data imagenet/ --target-flops 0.6
  vitbudget tune ... --checkpoint runs/ft/spot/model.safetensors --checkpoint runs/ft/avit/model.safetensors
  vitbudget eval --config runs/tune/config.json --data imgs/     # then: the chosen setting, once, on the test split

Candidates: the baseline; EViT, the SPOT heuristic and Zero-TPrune over rho 0.5..0.9; ToMe, ToFu and
MCTF over r scaled to the model; PiToMe over its keep ratio; threshold merging over its threshold
(--methods picks families); each of them followed by ABS (a stack, --stack-alpha); every --checkpoint (a trained method,
read from its sidecar) and its stack. Accuracy comes from --holdout images of the TRAINING split
(never the test split); speed is first predicted from this machine's latency model (one block's
time against its token count at --batch-size, measured once and cached), then measured here for
the candidates that can meet the target (all with --time-all), round-robin.
Writes OUT/tune.json, OUT/tune.md (the table), OUT/pareto.png (top-1 against FLOPs and measured
speed-up) and OUT/config.json (the recommended setting, for eval/bench --config). All four are
published together or not at all (nothing when no candidate meets the target). A killed or
failed run resumes its accuracy measurements when run again with the same --out (any target)."""


OUTPUT_FILES = ["tune.json", "tune.md", "pareto.png", "config.json"]  # config.json last: its presence means the rest is there
STATE_FILE = ".tune_state.json"  # accuracy so far; kept until the results are published


def add_parser(sub) -> argparse.ArgumentParser:
    tu = sub.add_parser("tune", help="recommend a method and setting for a target speed-up on this machine (start here)",
                        description="Sweep the training-free methods, their stacks with ABS and your trained checkpoints; "
                                    "recommend the most accurate setting that meets a target speed-up or FLOPs.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_flags(tu)
    tu.add_argument("--data", default=None, help=f"ImageFolder directory or archive with a train/ split (default: shared {DEFAULT_DATA})")
    add_common_flags(tu, out="runs/tune", batch_size=1, batch_help="batch size the speed-up is measured at (at most --holdout)")
    tu.add_argument("--split", default="train", help="split the held-out images come from (default train; never test)")
    tu.add_argument("--holdout", type=positive_int, default=1000, help="held-out images of --split that measure accuracy (default 1000)")
    tu.add_argument("--target-speedup", type=float, default=None, help="measured speed-up over the baseline to reach, e.g. 1.5")
    tu.add_argument("--target-flops", type=float, default=None, help="relative FLOPs to stay under, e.g. 0.6")
    tu.add_argument("--checkpoint", action="append", default=[], metavar="PATH", help="a trained method checkpoint to include (repeatable)")
    tu.add_argument("--methods", default=None, help="training-free families to sweep, comma-separated (default: all of them)")
    tu.add_argument("--no-stacks", action="store_true", help="do not try REDUCER+abs stacks")
    tu.add_argument("--stack-alpha", type=finite_float, default=0.2, help="ABS alpha of the stacks (default 0.2)")
    tu.add_argument("--no-speed", action="store_true", help="skip timing (only with --target-flops): a FLOPs-only answer")
    tu.add_argument("--time-all", action="store_true", help="time every candidate, not only those the latency model predicts can meet the target")
    tu.add_argument("--repeats", type=positive_int, default=30, help="round-robin timing rounds (default 30)")
    tu.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed calls per candidate before timing (default 3)")
    tu.add_argument("--eval-batch-size", type=positive_int, default=256, help="batch size of the accuracy pass (default 256)")
    tu.add_argument("--workers", type=workers_count, default=None, help="data-loading processes, 0 to 64 (default: min(2, cores))")
    tu.add_argument("--quiet", action="store_true", help="no progress bars")
    add_class_mismatch_flag(tu)
    return tu


def run(args: argparse.Namespace) -> int:
    from ..data import EvalTransform, holdout_indices
    from ..eval.machine import describe_machine, machine_info
    from ..eval.tune import FAMILIES, NoCandidateMeetsTarget, default_candidates, holdout_indices, tune, tune_table
    from ..methods import build_method, load_method
    from ..models import load_model
    from ..models.loading import read_sidecar, sidecar_path
    from ..report import save_pareto
    from ..runconfig import RunConfig, write_run_config

    if args.split == "test":
        raise ConfigError("the tuner never reads the test split: tune on held-out training images (--split train, the default) "
                          "or a validation split, then measure the chosen setting with `vitbudget eval --config OUT/config.json`")
    if args.target_speedup is None and args.target_flops is None:
        raise ConfigError("give a target: --target-speedup X (measured on this machine) and/or --target-flops F (relative FLOPs)")
    out = OutputDir(args.out, OUTPUT_FILES)  # checked now, written only when everything succeeded
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    data_path = resolve_default(args.data, DEFAULT_DATA, "data")
    overrides = {"num_classes": args.num_classes} if args.num_classes else {}
    model = load_model(model_path, arch=args.arch, **overrides).to(args.device)
    if model.cfg.num_classes == 0:
        raise ConfigError(f"{model_path!r} has no classification head: the tuner ranks candidates by top-1")
    checkpoints = []
    for path in args.checkpoint:
        if not Path(path).is_file():
            raise CheckpointError(f"--checkpoint {path!r} not found")
        saved = read_sidecar(sidecar_path(path)).get("method") or {"name": "baseline"}
        checkpoints.append((str(Path(path).resolve()), saved["name"]))
    families = FAMILIES if args.methods is None else [f for f in args.methods.split(",") if f]
    candidates = default_candidates(model.cfg, families=families, stacks=not args.no_stacks, stack_alpha=args.stack_alpha, checkpoints=checkpoints)
    # labels by the model's class names, as `eval` assigns them (--allow-class-mismatch the same way)
    dataset = open_dataset(data_path, args.split, model, EvalTransform(model.cfg.img_size, model.info.preprocess), args.allow_class_mismatch)
    indices = holdout_indices(len(dataset), args.holdout)

    def build(c):
        if c.model is not None:
            return load_method(c.model, c.method, **c.options)
        return build_method(c.method, model, **c.options)

    state_path = out.path / STATE_FILE
    result = tune(model, model_path, dataset, indices, candidates, target_speedup=args.target_speedup, target_flops=args.target_flops,
                  batch_size=args.batch_size, device=args.device, repeats=args.repeats, warmup=args.warmup,
                  eval_batch_size=args.eval_batch_size, workers=args.workers, progress=not args.quiet,
                  state_path=state_path, build=build, speed=not args.no_speed, time_all=args.time_all)
    machine = machine_info(args.device)
    command = "vitbudget " + shlex.join(sys.argv[1:])
    table = tune_table(result)
    print(table)
    chosen = result["recommended"]
    if chosen is None:  # nothing is published: an earlier run's answer stays as it was
        label, best = max(result["rows"].items(), key=lambda kv: (kv[1]["speedup"] or 0.0, -kv[1]["rel_flops"]))
        speed = "" if best["speedup"] is None else f" at {best['speedup']:.2f}x,"
        raise NoCandidateMeetsTarget(
            f"no candidate meets the target on this machine (closest: {label}{speed} {best['rel_flops']:.2f}x FLOPs); nothing written, "
            f"the table is above. Lower the target, try another --batch-size, or pass trained checkpoints with --checkpoint "
            f"(the accuracy measured is kept: a rerun with the same --out skips it)")
    report = {"command": command, "model": str(model_path), "arch": args.arch,
              "data": {"path": str(data_path), "split": args.split, "holdout": len(indices), "of": len(dataset),
                       "classes": dataset.classes, "labels": label_source(dataset)},
              "machine": machine, **result}
    row = result["rows"][chosen]
    model_file = row["model"] or str(Path(model_path).resolve())
    notes = {"tool": command, "label": chosen, "held_out_top1": row["top1_mean"], "rel_flops": row["rel_flops"], "speedup": row["speedup"],
             "target_speedup": args.target_speedup, "target_flops": args.target_flops, "held_out_images": len(indices),
             "split": args.split, "data": str(data_path), "machine": describe_machine(machine)}
    measured = "" if args.no_speed else f" and measured speed-up (batch {args.batch_size}, {describe_machine(machine)})"
    title = f"{model.info.name or Path(model_path).stem}: top-1 on {len(indices)} held-out {args.split} images against FLOPs{measured}"
    with out.publish() as stage:
        write_json(stage / "tune.json", report)
        write_text(stage / "tune.md", f"`{command}` — {describe_machine(machine)}\n\n{table}")
        save_pareto(result["rows"], stage / "pareto.png", title=title, speed_key=None if args.no_speed else "speedup",
                    target_flops=args.target_flops, target_speedup=args.target_speedup, highlight=chosen)
        write_run_config(stage / "config.json", RunConfig(
            method=row["method"], options=dict(row["options"]), model=model_file, arch=None if row["model"] else args.arch,
            num_classes=None if row["model"] else args.num_classes, batch_size=None if args.no_speed else args.batch_size,
            device=args.device, notes=notes))
    state_path.unlink(missing_ok=True)
    speed = "" if row["speedup"] is None else f", {row['speedup']:.2f}x measured speed-up at batch {args.batch_size}"
    print(f"recommended: {chosen} — held-out top-1 {row['top1_mean']:.2f} %, {row['rel_flops']:.3f}x FLOPs{speed}")
    print(f"wrote {', '.join(str(out.path / name) for name in OUTPUT_FILES)}")
    print(f"next: vitbudget eval --config {out.path / 'config.json'}" + (f" --data {args.data}" if args.data else ""))
    return 0
