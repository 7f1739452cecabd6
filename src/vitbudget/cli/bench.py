"""`vitbudget bench`: a suite of methods x seeds on the same images, with paired tests and speed."""
from __future__ import annotations

import argparse
import os
import shlex
import sys

from .. import distributed
from ..defaults import DEFAULT_DATA, DEFAULT_MODEL
from ..errors import ConfigError
from ..io import OutputDir, write_json, write_text
from .options import (add_common_flags, add_class_mismatch_flag, add_config_flag, apply_run_config, device_arg, label_source, open_dataset, positive_int,
                      resolve_default, split_list, workers_count)

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
    add_common_flags(be, out="runs/bench", batch_size=256, batch_help="evaluation batch size")
    be.add_argument("--model", default=None, help="checkpoint (default: the shared reference model)")
    be.add_argument("--data", default=None, help="ImageFolder directory or archive (default: shared CIFAR-10)")
    be.add_argument("--split", type=split_list, default="test", help="split folder, or several separated by commas (one table each plus a summary)")
    be.add_argument("--limit", type=positive_int, default=None, help="fixed pseudo-random subset of this many images per split")
    be.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1 for methods with random parts (default 5)")
    be.add_argument("--workers", type=workers_count, default=None, help="data-loading processes, 0 to 64 (default: min(2, cores))")
    be.add_argument("--no-speed", action="store_true", help="skip latency and throughput")
    be.add_argument("--compile", action="store_true", help="run every method under torch.compile (inputs still checked eagerly; A-ViT with graph breaks)")
    be.add_argument("--latency-repeats", type=positive_int, default=50, help="batch-1 timing rounds per method, round-robin (default 50)")
    be.add_argument("--throughput-repeats", type=positive_int, default=10, help="batch-64 timing rounds per method, round-robin (default 10)")
    be.add_argument("--quiet", action="store_true", help="no progress bars")
    add_class_mismatch_flag(be)
    add_config_flag(be)
    return be


def run(args: argparse.Namespace) -> int:
    """Under torchrun: one process per rank, images shared out, results gathered, rank 0 times and writes (see vitbudget.distributed)."""
    with distributed.session(args.device) as args.device:  # this rank's device (cuda:LOCAL_RANK under torchrun)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from ..data import EvalTransform, subset_indices
    from ..eval.machine import describe_machine, machine_info
    from ..eval.suite import BASELINE, check_suite_classes, load_suite, paired_table, run_suite, suite_table
    from ..models import load_model
    from ..report import save_pareto

    config = apply_run_config(args)
    if args.suite is None and config is None:
        raise ConfigError("give --suite NAME|FILE.json, or --config FILE to compare a tuned setting with the baseline")
    splits = args.split
    stems = {split: file_stem(split) for split in splits}
    files = ["bench.json", *(f"{stems[s]}{suffix}" for s in splits for suffix in (".md", "_pareto.png"))] + (["summary.md"] if len(splits) > 1 else [])
    if len(set(files)) != len(files):
        raise ConfigError(f"splits {', '.join(splits)} would write files of the same name ({', '.join(files)})")
    out = OutputDir(args.out, files)  # checked now, written only when every split succeeded
    entries = load_suite(args.suite) if args.suite is not None else [BASELINE]
    if config is not None:
        entries = [*entries, config_entry(config, {e.label for e in entries})]
    model_path = resolve_default(args.model, DEFAULT_MODEL, "model")
    data_path = resolve_default(args.data, DEFAULT_DATA, "data")
    model = load_model(model_path)
    check_suite_classes(entries, model_path, model.info.classes)
    transform = EvalTransform(model.cfg.img_size, model.info.preprocess)
    said: set[str] = set()
    with distributed.local_main_first():  # one unpack of an archive per machine
        datasets = {split: open_dataset(data_path, split, model, transform, args.allow_class_mismatch, said) for split in splits}  # fail fast
    main = distributed.context().main
    machine = machine_info(args.device)
    command = "vitbudget " + shlex.join(sys.argv[1:])
    results, texts, plots = {}, {}, {}
    for split, dataset in datasets.items():
        indices = subset_indices(len(dataset), args.limit)
        result = run_suite(entries, model_path, dataset, indices, seeds=list(range(args.seeds)), batch_size=args.batch_size,
                           workers=args.workers, device=args.device, speed=not args.no_speed, progress=not args.quiet,
                           latency_repeats=args.latency_repeats, throughput_repeats=args.throughput_repeats,
                           compile=args.compile)
        results[split] = {**result, "classes": dataset.classes, "labels": label_source(dataset)}
        if not main:
            continue
        table = suite_table(result)
        pairs = paired_table(result)
        if pairs:
            table += "\nPaired against the entries each names in \"versus\" (same images):\n\n" + pairs
        header = f"`{command}` — split `{split}`, {len(indices)} images, model `{model.info.name}`, {describe_machine(machine)}\n\n"
        texts[f"{stems[split]}.md"] = header + table
        plots[f"{stems[split]}_pareto.png"] = (result["rows"], f"{args.suite or args.config} — {split}, {len(indices)} images, {model.info.name}")
        print(f"\n## {split}\n{table}")
    if not main:
        return 0
    report = {"command": command, "suite": args.suite, "config": args.config, "model": str(model_path), "data": str(data_path),
              "machine": machine, "processes": distributed.context().world, "splits": results}
    if len(results) > 1:
        summary = robustness_table(results)
        texts["summary.md"] = f"`{command}` — top-1 % per split (mean over seeds)\n\n{summary}"
        print(summary)
    with out.publish() as stage:
        for name, text in texts.items():
            write_text(stage / name, text)
        for name, (rows, title) in plots.items():
            save_pareto(rows, stage / name, title=title)
        write_json(stage / "bench.json", report)
    print(f"wrote {out.path}: {', '.join(files)}")
    return 0


def file_stem(split: str) -> str:
    """A split name as a file name: 'fog' -> 'fog', 'a/b' -> 'a_b', '.' (the data root) -> 'root'."""
    stem = split.strip("/").replace("/", "_").replace(os.sep, "_")
    return stem if stem not in ("", ".", "..") else "root"


def robustness_table(results: dict[str, dict]) -> str:
    """Rows: methods; columns: splits (e.g. corruption types) and their mean; cells: top-1 mean (cosine for a backbone)."""
    splits = list(results)
    labels = list(next(iter(results.values()))["rows"])
    key = "top1_mean" if "top1_mean" in results[splits[0]]["rows"][labels[0]] else "cosine_mean"
    lines = ["| method | " + " | ".join(splits) + " | mean |", "|---|" + "---|" * (len(splits) + 1)]
    for label in labels:
        values = [results[s]["rows"][label][key] for s in splits]
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
