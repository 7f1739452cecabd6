"""What the patch grid costs: assembling it (ToMe's unmerge, EViT's fill) as a fraction of the reduced backbone.

A random-init ViT-S/14-shaped model at 224 px (16 x 16 patches + CLS, LayerScale, as the
vits14 reference). For each method, the method's forward (the reduced backbone, no grad) and
`RunOutput.patch_grid(norm=True)` on one of its outputs are timed round-robin by the library's
timer; the ratio of medians is the overhead (the target is <= 5 %). The run itself keeps only
references for the grid, so the forward is the method's own time.

    python benchmarks/grid_overhead.py --batch 1 16 --repeats 20 --out runs/grid_overhead.json
"""
from __future__ import annotations

import argparse
import statistics

import torch

from vitbudget.eval.machine import machine_info
from vitbudget.eval.speed import time_interleaved
from vitbudget.io import write_json
from vitbudget.methods import build_method
from vitbudget.models import VisionTransformer, named_config

METHODS = {"tome": {"r": 13}, "evit": {"rho": 0.7, "stages": "3,6,9"}}


@torch.inference_mode()
def measure(method, batch: int, warmup: int, repeats: int) -> dict[str, float]:
    cfg = method.model.cfg
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    out = method(x)
    times = time_interleaved({"backbone": method, "grid": lambda _: out.patch_grid(norm=True)}, [x], warmup=warmup, repeats=repeats)
    backbone, grid = (1000 * statistics.median(times[k]) for k in ("backbone", "grid"))
    return {"backbone_ms": backbone, "grid_ms": grid, "fraction": grid / backbone, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = VisionTransformer(named_config("vit_small_patch14_dinov2", img_size=224, num_classes=1000)).eval()
    result = {"machine": machine_info(), "model": "random-init ViT-S/14, 224 px", "methods": METHODS, "results": {}}
    for name, opts in METHODS.items():
        method = build_method(name, model, **opts).eval()
        for batch in args.batch:
            entry = measure(method, batch, args.warmup, args.repeats)
            result["results"][f"{name}/batch_{batch}"] = entry
            print(f"{name:5s} batch {batch:3d}: backbone {entry['backbone_ms']:.1f} ms, grid {entry['grid_ms']:.2f} ms "
                  f"({100 * entry['fraction']:.1f} %)")
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
