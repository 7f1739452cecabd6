"""The block runner's own cost at batch 1: timm's forward, our model's forward and the runner's baseline on the same weights.

Rounds rotate their order (`time_interleaved(rotate=True)`), so a difference of about 1 % is not a
position effect. Rows, each as the median over rounds of its time / timm's time:
- `model`: our VisionTransformer's own forward (the same aten operations as timm's, plus the
  input's finiteness check); `model, no value check`: the same with `check_values = False`;
- `runner`: the baseline method through `runtime.runner.run` (plain blocks run as `block(x)`);
- `runner, general path`: the same with that fast path switched off (every block through
  `run_block`'s hook steps), i.e. what the runner cost before it.
DeiT-T / DeiT-S are random-init (speed does not depend on the weights); `real` is the committed
classifier (models/vits14_cifar10.safetensors).

    python benchmarks/runner_overhead.py --archs deit_tiny_patch16_224,deit_small_patch16_224,real --rounds 200 --out runs/runner_overhead

Writes OUT/runner_overhead.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import statistics
from typing import Any

import torch

from vitbudget.eval.machine import write_benchmark_rows
from vitbudget.eval.speed import paired_ratio, time_interleaved
from vitbudget.io import ensure_writable_dir
from vitbudget.methods import build_method
from vitbudget.models import VisionTransformer, load_model, named_config
from vitbudget.models.timm_compat import timm_vit
from vitbudget.runtime import runner

REAL = "models/vits14_cifar10.safetensors"


def general_path(method):
    """The method run with the runner's plain-block fast path off."""
    def call(images):
        plain = runner._plain
        runner._plain = lambda *args: False
        try:
            return method(images)
        finally:
            runner._plain = plain
    return call


def bench_arch(arch: str, rounds: int) -> dict[str, Any]:
    torch.manual_seed(0)
    ours = load_model(REAL) if arch == "real" else VisionTransformer(named_config(arch)).eval()
    cfg = ours.cfg
    theirs = timm_vit(cfg.replace(patch_bias=None) if cfg.patch_bias is not None else cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    unchecked = copy.deepcopy(ours)
    unchecked.check_values = False
    baseline = build_method("baseline", ours)
    fns = {"timm": theirs.eval(), "model": ours, "model, no value check": unchecked, "runner": baseline,
           "runner, general path": general_path(baseline)}
    inputs = [torch.randn(1, 3, cfg.img_size, cfg.img_size) for _ in range(4)]
    with torch.inference_mode():
        diff = float((baseline(inputs[0]).logits - theirs(inputs[0])).abs().max())
        times = time_interleaved(fns, inputs, warmup=5, repeats=rounds, rotate=True)
    row = {"arch": arch, "rounds": rounds, "max_abs_logit_diff_vs_timm": diff,
           "ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
           "time_over_timm": {k: paired_ratio(v, times["timm"]) for k, v in times.items()}}
    print(f"{arch}: " + ", ".join(f"{k} {v:.4f}" for k, v in row["time_over_timm"].items()), flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    names = list(rows[0]["ms"])
    lines = ["| arch | timm ms | " + " | ".join(f"{n} / timm" for n in names[1:]) + " | max Δlogits |", "|" + "---|" * (len(names) + 2)]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['ms']['timm']:.2f} | " + " | ".join(f"{r['time_over_timm'][n]:.4f}" for n in names[1:])
                     + f" | {r['max_abs_logit_diff_vs_timm']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="deit_tiny_patch16_224,deit_small_patch16_224,real",
                        help="comma-separated timm architectures, or 'real' for the committed classifier")
    parser.add_argument("--rounds", type=int, default=200, help="timed rounds (default 200)")
    parser.add_argument("--out", default="runs/runner_overhead")
    args = parser.parse_args(argv)
    out = ensure_writable_dir(args.out)
    rows = [bench_arch(arch, args.rounds) for arch in args.archs.split(",")]
    write_benchmark_rows(out, "runner_overhead", "benchmarks/runner_overhead.py", argv, rows, table(rows))
    print(table(rows))
    return {"rows": rows}


if __name__ == "__main__":
    main()
