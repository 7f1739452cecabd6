"""`vitbudget bench`: a suite of methods x seeds on the same images, with paired tests and speed."""
from __future__ import annotations

import argparse
import shlex
import sys

from .. import distributed
from ..defaults import DEFAULT_DATA, DEFAULT_MODEL
from ..errors import ConfigError
from ..io import ensure_writable_dir, write_json, write_text
from .options import check_repeats, resolve_default

EPILOG = """examples:
  vitbudget bench --suite abs --out runs/abs_table1            # ABS Tables 1/3/4
  vitbudget bench --suite abs-ablation --out runs/abs_table5
  vitbudget bench --suite abs-short --data DIR --split gaussian_noise,fog --no-speed --out runs/abs_c
  vitbudget bench --suite benchmarks/spot_table1.json --out runs/spot_table1   # entries with their own checkpoints

A suite file is JSON: {"entries": [{"label": "SPOT", "method": "spot", "model": "runs/spot/model.safetensors",
"options": {"rho": 0.7}, "seeded": false}, ...]}; the first entry is the reference for ratios and tests,
an entry without "model" uses --model."""


def add_parser(sub) -> argparse.ArgumentParser:
    from ..eval.suite import SUITES

    be = sub.add_parser("bench", help="a suite of methods x seeds: mean ± std, paired tests, speed (paper tables)",
                        description="Run a suite (several methods, seeds where a method is random) on the same images.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return be


def run(args: argparse.Namespace) -> int:
    """Under torchrun: one process per rank, images shared out, results gathered, rank 0 times and writes (see vitbudget.distributed)."""
    with distributed.session(args.device) as args.device:  # this rank's device (cuda:LOCAL_RANK under torchrun)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..data import EvalTransform, ImageFolder, subset_indices
    from ..eval.machine import describe_machine, machine_info
    from ..eval.suite import load_suite, run_suite, suite_table
    from ..models import load_model
    from ..report import save_pareto

    check_repeats(args)
    out_dir = ensure_writable_dir(args.out)
    if args.seeds <= 0:
        raise ConfigError(f"--seeds must be positive, got {args.seeds}")
    entries = load_suite(args.suite)
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    data_path = resolve_default(args.data, DEFAULT_DATA, "data")
    model = load_model(model_path)
    transform = EvalTransform(model.cfg.img_size, model.info.preprocess)
    splits = [s for s in args.split.split(",") if s]
    with distributed.local_main_first():
        datasets = {split: ImageFolder(data_path, split, transform) for split in splits}  # fail fast on a bad split
    main = distributed.context().main
    machine = machine_info(args.device)
    command = "vitbudget " + shlex.join(sys.argv[1:])
    results = {}
    for split, dataset in datasets.items():
        indices = subset_indices(len(dataset), args.limit)
        result = run_suite(entries, model_path, dataset, indices, seeds=list(range(args.seeds)), batch_size=args.batch_size,
                           workers=args.workers, device=args.device, speed=not args.no_speed, progress=not args.quiet,
                           latency_repeats=args.latency_repeats, throughput_repeats=args.throughput_repeats)
        results[split] = result
        if not main:
            continue
        table = suite_table(result)
        header = f"`{command}` — split `{split}`, {len(indices)} images, model `{model.info.name}`, {describe_machine(machine)}\n\n"
        write_text(out_dir / f"{split}.md", header + table)
        save_pareto(result["rows"], out_dir / f"{split}_pareto.png", title=f"{args.suite} — {split}, {len(indices)} images, {model.info.name}")
        print(f"\n## {split}\n{table}")
    if not main:
        return 0
    report = {"command": command, "suite": args.suite, "model": str(model_path), "data": str(data_path), "machine": machine,
              "processes": distributed.context().world, "splits": results}
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
