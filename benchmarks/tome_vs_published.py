"""Our ToMe against the published ToMe (facebookresearch/ToMe) on the same timm model and weights.

Nothing of theirs is in this repository: their package is imported from a checkout you name
(--tome-repo), its timm patch (`tome.patch.timm`) is applied to timm's own VisionTransformer, and
both are timed round-robin (`eval.speed.time_interleaved`) with timm's plain forward and our
runner, on a random-init model (speed at fixed r does not depend on the weights). The logits of
the two ToMe implementations are compared first (they compute the same merging).

    mkdir -p /tmp/tome && git -C /path/to/ToMe.git archive HEAD | tar -x -C /tmp/tome
    python benchmarks/tome_vs_published.py --tome-repo /tmp/tome --archs deit_tiny_patch16_224,deit_small_patch16_224 \\
        --r 13 --batch-sizes 1,64 --out runs/tome_vs_published
    python benchmarks/tome_vs_published.py --tome-repo /tmp/tome --archs deit_tiny_patch16_224 --batch-sizes 1 --repeats 3 --out /tmp/t  # check

Writes OUT/tome_vs_published.json and .md: per arch and batch size, ms per batch of each, and
"ours vs published" = median over rounds of published time / our time (> 1: ours is faster).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from vitbudget.eval.machine import write_benchmark_rows
from vitbudget.eval.speed import paired_ratio, time_interleaved
from vitbudget.io import ensure_writable_dir
from vitbudget.methods import build_method
from vitbudget.models import VisionTransformer, named_config
from vitbudget.models.timm_compat import import_timm, timm_vit


def import_published_tome(repo: Path):
    if not (repo / "tome" / "patch" / "timm.py").is_file():
        sys.exit(f"--tome-repo {repo} has no tome/patch/timm.py (a checkout of facebookresearch/ToMe)")
    import_timm()  # their patch imports timm
    sys.path.insert(0, str(repo))
    import tome

    return tome


def bench_arch(arch: str, tome, args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    cfg = named_config(arch)
    timm_model = timm_vit(cfg)
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    ours_tome = build_method("tome", ours, r=args.r).eval()
    theirs = copy.deepcopy(timm_model)
    tome.patch.timm(theirs)
    theirs.r = args.r
    theirs.eval()
    g = torch.Generator().manual_seed(0)
    check = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=g)
    with torch.inference_mode():
        diff = float((ours_tome(check).logits - theirs(check)).abs().max())
    print(f"{arch}: max |our ToMe logits - published ToMe logits| = {diff:.2e}", flush=True)
    fns = {"timm": timm_model, "published_tome": theirs, "ours_baseline": ours_tome.model, "ours_tome": ours_tome}
    rows = []
    for batch in args.batch_sizes:
        inputs = [torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g) for _ in range(4 if batch <= 8 else 2)]
        times = time_interleaved(fns, inputs, warmup=args.warmup, repeats=args.repeats)
        row = {"arch": arch, "r": args.r, "batch_size": batch, "max_abs_logit_diff": diff, "repeats": args.repeats,
               "ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
               "ours_vs_published": 1 / paired_ratio(times["ours_tome"], times["published_tome"]),
               "published_speedup_vs_timm": 1 / paired_ratio(times["published_tome"], times["timm"]),
               "ours_speedup_vs_timm": 1 / paired_ratio(times["ours_tome"], times["timm"])}
        rows.append(row)
        print(f"{arch} batch {batch}: ours vs published {row['ours_vs_published']:.3f}x", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ["arch", "r", "batch", "timm ms", "published ToMe ms", "our ToMe ms", "published speed-up vs timm", "ours vs timm",
            "ours vs published", "max Δlogits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['arch']} | {r['r']} | {r['batch_size']} | {ms['timm']:.2f} | {ms['published_tome']:.2f} | {ms['ours_tome']:.2f} | "
                     f"{r['published_speedup_vs_timm']:.2f}× | {r['ours_speedup_vs_timm']:.2f}× | {r['ours_vs_published']:.3f}× | "
                     f"{r['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tome-repo", type=Path, required=True, help="a checkout of facebookresearch/ToMe (the directory holding tome/)")
    parser.add_argument("--archs", default="deit_tiny_patch16_224,deit_small_patch16_224", help="comma-separated timm architectures")
    parser.add_argument("--r", type=int, default=13, help="tokens merged per block (default 13, the ToMe paper's DeiT setting)")
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per batch size (default 30)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/tome_vs_published")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = ensure_writable_dir(args.out)
    tome = import_published_tome(args.tome_repo.resolve())
    with torch.inference_mode():
        rows = [row for arch in args.archs.split(",") for row in bench_arch(arch, tome, args)]
    write_benchmark_rows(out, "tome_vs_published", "benchmarks/tome_vs_published.py", argv, rows, table(rows))
    print(table(rows))
    return {"rows": rows}


if __name__ == "__main__":
    main()
