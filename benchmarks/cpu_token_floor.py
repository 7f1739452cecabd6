"""How time scales with token count on this machine, for the reference model.

Runs the reference ViT with every block fed the first K tokens (K = 65 ... 5), batch 1 and
batch 64, round-robin, and the MLP's two matrix products alone for every row count 40-65 at
batch 1. Shows why token reduction pays less at batch 1 on a CPU (a fixed per-op floor) and
that GEMM time is not monotone in the row count.

    python benchmarks/cpu_token_floor.py --out runs/cpu_token_floor.json
"""
from __future__ import annotations

import argparse
import statistics

import torch

import vitbudget as vb
from vitbudget import Hooks, run
from vitbudget.defaults import DEFAULT_MODEL, default_path
from vitbudget.eval.machine import machine_info
from vitbudget.eval.speed import time_interleaved
from vitbudget.io import write_json


class FirstTokens(Hooks):
    """Keep the first k tokens from the start: every block runs k tokens."""

    def __init__(self, k: int):
        self.k = k

    def begin(self, model, state, record):
        return state.gather(torch.arange(self.k)[None].expand(state.batch_size, -1))


def median_ms(fns, x, repeats):
    """Median milliseconds per call of each fn, timed round-robin by the library's own timer."""
    times = time_interleaved(fns, [x], warmup=1, repeats=repeats)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_path(DEFAULT_MODEL))
    parser.add_argument("--out", default="runs/cpu_token_floor.json")
    args = parser.parse_args()
    model = vb.load_model(args.model).eval()
    counts = (65, 49, 33, 17, 5)
    result = {"machine": machine_info(), "model": args.model, "tokens": {}, "mlp_gemm_us": {}}
    for batch, repeats in ((1, 60), (64, 8)):
        x = torch.randn(batch, 3, model.cfg.img_size, model.cfg.img_size)
        fns = {k: (lambda k: lambda t: run(model, t, FirstTokens(k)))(k) for k in counts}
        ms = median_ms(fns, x, repeats)
        result["tokens"][f"batch_{batch}"] = {str(k): {"ms": v, "ratio": v / ms[65]} for k, v in ms.items()}
        print(f"batch {batch}: " + "  ".join(f"{k} tokens {v:.1f} ms ({v / ms[65]:.2f})" for k, v in ms.items()))
    mlp = model.blocks[0].mlp
    for m in range(40, 66):
        x = torch.randn(1, m, model.cfg.embed_dim)
        result["mlp_gemm_us"][str(m)] = 1000 * median_ms({"mlp": lambda t: mlp.fc2(mlp.fc1(t))}, x, 200)["mlp"]
    print("MLP GEMMs at batch 1, us by row count: " + " ".join(f"{m}:{v:.0f}" for m, v in result["mlp_gemm_us"].items()))
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
