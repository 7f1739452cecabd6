"""`vitbudget bench`: a suite of methods x seeds on the same images, with paired tests and speed."""
from __future__ import annotations

import argparse
import shlex
import sys

from ..defaults import DEFAULT_DATA, DEFAULT_MODEL
from ..errors import ConfigError
from ..io import ensure_writable_dir, write_json, write_text
from .options import add_config_flag, apply_run_config, check_repeats, resolve_default

EPILOG = """examples:
  vitbudget bench --suite abs --out runs/abs_table1            # ABS Tables 1/3/4
  vitbudget bench --suite abs-ablation --out runs/abs_table5
  vitbudget bench --suite abs-short --data DIR --split gaussian_noise,fog --no-speed --out runs/abs_c
  vitbudget bench --suite benchmarks/spot_table1.json --out runs/spot_table1   # entries with their own checkpoints
  vitbudget bench --config runs/tune/config.json --out runs/chosen   # the tuned setting against the baseline, with seeds

A suite file is JSON: {"entries": [{"label": "SPOT", "method": "spot", "model": "runs/spot/model.safetensors",
"options": {"rho": 0.7}, "seeded": false}, ...]}; the first entry is the reference for ratios and tests,
an entry without "model" uses --model."""


def add_parser(sub) -> argparse.ArgumentParser:
    from ..eval.suite import SUITES

    be = sub.add_parser("bench", help="a suite of methods x seeds: mean ± std, paired tests, speed (paper tables)",
                        description="Run a suite (several methods, seeds where a method is random) on the same images.",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    be.add_argument("--suite", default=None, metavar="NAME|FILE.json",
                    help=f"named suite ({', '.join(sorted(SUITES))}) or a JSON suite file (required unless --config)")
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
    add_config_flag(be)
    return be


def run(args: argparse.Namespace) -> int:
    from ..data import EvalTransform, ImageFolder, subset_indices
    from ..eval.machine import describe_machine, machine_info
    from ..eval.suite import BASELINE, load_suite, paired_table, run_suite, suite_table
    from ..models import load_model
    from ..report import save_pareto

    check_repeats(args)
    out_dir = ensure_writable_dir(args.out)
    if args.seeds <= 0:
        raise ConfigError(f"--seeds must be positive, got {args.seeds}")
    config = apply_run_config(args)
    if args.suite is None and config is None:
        raise ConfigError("give --suite NAME|FILE.json, or --config FILE to compare a tuned setting with the baseline")
    entries = load_suite(args.suite) if args.suite is not None else [BASELINE]
    if config is not None:
        entries = [*entries, config_entry(config, {e.label for e in entries})]
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    data_path = resolve_default(args.data, DEFAULT_DATA, "data")
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
        pairs = paired_table(result)
        if pairs:
            table += "\nPaired against the entries each names in \"versus\" (same images):\n\n" + pairs
        header = f"`{command}` — split `{split}`, {len(indices)} images, model `{model.info.name}`, {describe_machine(machine)}\n\n"
        write_text(out_dir / f"{split}.md", header + table)
        save_pareto(result["rows"], out_dir / f"{split}_pareto.png", title=f"{args.suite or args.config} — {split}, {len(indices)} images, {model.info.name}")
        print(f"\n## {split}\n{table}")
    report = {"command": command, "suite": args.suite, "config": args.config, "model": str(model_path), "data": str(data_path), "machine": machine, "splits": results}
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


def config_entry(config, taken: set[str]):
    """The suite entry of a run config: its method and options on the suite's model, seeded if the method has a seed."""
    import dataclasses

    from ..eval.suite import SuiteEntry
    from ..methods import get_spec
    from ..methods.labels import display_name, setting_label

    seeded = "seed" in {f.name for f in dataclasses.fields(get_spec(config.method).options)} and "seed" not in config.options
    label = f"{display_name(config.method)} {setting_label(config.options)} (config)".replace("  ", " ")
    while label in taken:
        label += "'"
    return SuiteEntry(label, config.method, dict(config.options), seeded=seeded)
