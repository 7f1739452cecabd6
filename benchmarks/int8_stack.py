"""Int8 stacked on token reduction, in onnxruntime: accuracy kept, speed-ups multiplied, in one table.

Each method is exported twice from the real reference classifier (models/vits14_cifar10, 112 px):
fp32 ONNX, and the same graph with int8 matrix products (`vitbudget export --quantize int8`,
onnxruntime's dynamic quantization). Per file: top-1 on a fixed subset of the CIFAR-10 test
split (run by onnxruntime itself) and its agreement with the fp32 file's predictions; batch-1
latency and batch-64 throughput, every file timed round-robin in the same rounds, as speed-ups
over the fp32 baseline file. The table puts the measured speed-up of "method + int8" next to the
product of the two measured separately (token reduction alone x int8 alone): equal means the two
savings stack.

    python benchmarks/int8_stack.py --limit 1000 --repeats-b1 30 --repeats-b64 4 --out runs/int8_stack   # ~6 min, 2 idle cores
    python benchmarks/int8_stack.py --tiny --out runs/int8_tiny                                           # seconds: checks the script
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from vitbudget.data import EvalTransform, ImageFolder, subset_indices
from vitbudget.defaults import DEFAULT_DATA, default_path
from vitbudget.eval.machine import machine_info
from vitbudget.eval.speed import fraction_of_ideal, speed_report, time_interleaved
from vitbudget.export import OnnxRunner, export_method
from vitbudget.io import ensure_writable_dir, write_json, write_text
from vitbudget.methods import build_method
from vitbudget.models import ViTConfig, VisionTransformer, load_model

REAL_MODEL = Path(__file__).resolve().parents[1] / "models" / "vits14_cifar10.safetensors"
METHODS = [("baseline", {}), ("tome", {"r": 4}), ("evit", {"rho": 0.7})]
TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def accuracy(runner, dataset, indices, batch: int = 64) -> tuple[float, torch.Tensor]:
    preds, labels = [], []
    for start in range(0, len(indices), batch):
        items = [dataset[i] for i in indices[start:start + batch]]
        preds.append(runner(torch.stack([x for x, _ in items])).argmax(1))
        labels += [y for _, y in items]
    pred = torch.cat(preds)
    return 100.0 * float((pred == torch.tensor(labels)).float().mean()), pred


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=1000, help="test images for accuracy (fixed subset; default 1000)")
    parser.add_argument("--repeats-b1", type=int, default=30)
    parser.add_argument("--repeats-b64", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: torch's, the physical cores)")
    parser.add_argument("--tiny", action="store_true", help="a random 32-px toy ViT on random images, 2 rounds: checks the script")
    parser.add_argument("--out", default="runs/int8_stack")
    args = parser.parse_args(argv)
    out = ensure_writable_dir(args.out)
    threads = args.threads or torch.get_num_threads()
    if args.tiny:
        torch.manual_seed(0)
        model, dataset, indices = VisionTransformer(TINY).eval(), None, []
        args.repeats_b1 = args.repeats_b64 = 2
        methods = [("baseline", {}), ("tome", {"r": 1}), ("evit", {"rho": 0.7, "stages": "1,2"})]
    else:
        model = load_model(REAL_MODEL).eval()
        data = default_path(DEFAULT_DATA)
        if data is None:
            sys.exit("the CIFAR-10 archive needs the shared folder (set VITBUDGET_SHARED)")
        dataset = ImageFolder(data, "test", EvalTransform(model.cfg.img_size, model.info.preprocess), label_names=model.info.classes)
        indices = subset_indices(len(dataset), args.limit)
        methods = METHODS
    rows, runners = [], {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name, options in methods:
            method = build_method(name, model, **options).eval()
            for precision in ("fp32", "int8"):
                result = export_method(method, Path(tmp) / f"{name}-{precision}.onnx", quantize=None if precision == "fp32" else "int8")
                key = f"{name}/{precision}"
                runners[key] = OnnxRunner(result.path, threads=threads, spinning=False)
                row = {"method": name, "options": options, "precision": precision, "rel_flops": result.metadata["rel_flops"],
                       "max_abs_diff_vs_pytorch": result.max_abs_diff}
                if indices:
                    row["top1"], row["pred"] = accuracy(runners[key], dataset, indices)
                rows.append(row)
                print(f"exported {key}: rel. FLOPs {row['rel_flops']:.3f}" + (f", top-1 {row['top1']:.2f} %" if indices else ""), flush=True)
        for row in rows:
            if "pred" in row:
                fp32 = next(r for r in rows if r["method"] == row["method"] and r["precision"] == "fp32")
                row["agreement_with_fp32"] = 100.0 * float((row.pop("pred") == fp32["pred"]).float().mean()) if row is not fp32 else 100.0
        for row in rows:
            row.pop("pred", None)
        cfg = model.cfg
        g = torch.Generator().manual_seed(0)
        for batch, repeats, count in ((1, args.repeats_b1, 16), (64, args.repeats_b64, 2)):
            inputs = [torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g) for _ in range(count)]
            report = speed_report(time_interleaved(runners, inputs, warmup=2, repeats=repeats), batch, baseline="baseline/fp32")
            for row in rows:
                entry = report[f"{row['method']}/{row['precision']}"]
                speedup = 1.0 / entry["time_ratio"]
                row[f"b{batch}"] = {"median_ms": entry["median_ms"], "speedup": speedup, "repeats": repeats}
            for row in rows:  # the product of the two savings measured alone, next to the stack's own
                alone = next(r for r in rows if r["method"] == row["method"] and r["precision"] == "fp32")[f"b{batch}"]["speedup"]
                int8_alone = next(r for r in rows if r["method"] == "baseline" and r["precision"] == row["precision"])[f"b{batch}"]["speedup"]
                row[f"b{batch}"]["product_of_parts"] = alone * int8_alone
                ideal_flops = row["rel_flops"]  # int8 changes no FLOP count: the fraction of ideal is the token saving's
                row[f"b{batch}"]["token_fraction_of_ideal"] = fraction_of_ideal(row[f"b{batch}"]["speedup"] / int8_alone, ideal_flops)
    import onnxruntime

    command = "python benchmarks/int8_stack.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = {"command": command, "machine": {**machine_info(), "threads": threads}, "onnxruntime": onnxruntime.__version__,
              "model": "tiny random" if args.tiny else str(REAL_MODEL.name), "images": len(indices), "rows": rows}
    lines = [f"`{command}` — {result['machine']['cpu']}, {threads} threads, onnxruntime {onnxruntime.__version__}, "
             f"{'random toy model' if args.tiny else f'{REAL_MODEL.name}, {len(indices)} CIFAR-10 test images'}\n",
             "| method | precision | rel. FLOPs | top-1 % | agreement with fp32 % | b1 speed-up | b1 product of parts | b64 speed-up | b64 product of parts |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = " ".join([r["method"], *(f"{k} {v}" for k, v in r["options"].items())])
        top1 = f"{r['top1']:.2f}" if "top1" in r else "–"
        agree = f"{r['agreement_with_fp32']:.1f}" if "agreement_with_fp32" in r else "–"
        lines.append(f"| {label} | {r['precision']} | {r['rel_flops']:.3f}× | {top1} | {agree} | {r['b1']['speedup']:.3f}× | "
                     f"{r['b1']['product_of_parts']:.3f}× | {r['b64']['speedup']:.3f}× | {r['b64']['product_of_parts']:.3f}× |")
    lines.append("\nSpeed-ups over the fp32 baseline file, medians of per-round ratios, all files round-robin in the same rounds. "
                 "Product of parts = (method alone, fp32) × (int8 alone, baseline): a stack's speed-up equal to it means the savings multiply.")
    write_json(out / "int8_stack.json", result)
    write_text(out / "int8_stack.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
