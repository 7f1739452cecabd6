"""Exported speed: onnxruntime (CPU) batch-1 latency and batch-64 throughput of methods vs the baseline.

Every method is exported to ONNX (`vitbudget.export`), loaded in onnxruntime with the same
thread count, and timed round-robin with the baseline (`eval.speed.time_interleaved`: ratios
share the machine's noise). The same methods run eagerly in PyTorch in the same rounds, so the
table shows whether exporting keeps the speed-up. Per method: rel. FLOPs (executed tokens),
ideal speed-up = 1 / rel. FLOPs, measured speed-up = median over rounds of baseline time /
method time, fraction of ideal = measured speed-up x rel. FLOPs. With --openvino every method
is also exported as an OpenVINO IR (.xml, f32 on the CPU plug-in) and timed, as a third backend,
next to onnxruntime: the same speed-up and fraction of the ideal per batch size.

Models: `deit_s` is a random-initialised DeiT-S at 224 px (197 tokens); the speed of a method
with fixed token counts does not depend on the weights (learned predictors are random too), only
on the shapes. `real` is the committed real reference (ViT-S/14 at 112 px, 65 tokens, trained
weights); `reference` is the shared 32-px CIFAR model (65 tokens: overhead-bound). A-ViT is
left out: its exportable dense form runs every token (no speed-up by construction).

    python benchmarks/onnx_speed.py --out runs/onnx_speed            # both models (~20 min, 2 idle cores)
    python benchmarks/onnx_speed.py --models reference --repeats-b1 20 --repeats-b64 3
    python benchmarks/onnx_speed.py --tiny --out runs/onnx_speed_tiny   # seconds: checks the script
    python benchmarks/onnx_speed.py --models reference --openvino --out runs/exported_speed   # + OpenVINO
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from vitbudget.defaults import DEFAULT_MODEL, default_path
from vitbudget.eval.machine import machine_info
from vitbudget.eval.speed import fraction_of_ideal, speed_report, time_interleaved
from vitbudget.export import OnnxRunner, OpenVinoRunner, export_method
from vitbudget.io import ensure_writable_dir, write_json, write_text
from vitbudget.methods import build_method
from vitbudget.models import VisionTransformer, ViTConfig, load_model, named_config

# (method, options); ToMe's r: the ToMe paper's DeiT-S setting (13); for the 64-patch reference
# r = 4 (about the same 0.6x FLOPs); 2 for the 16-patch toy
METHODS = [("baseline", {}), ("evit", {"rho": 0.7}), ("tome", None), ("dynamicvit", {"rho": 0.7}), ("spot", {"rho": 0.7}),
           ("spot_heuristic", {"rho": 0.7}), ("abs", {"alpha": 0.2}), ("depth", {})]
TOME_R = {"deit_s": 13, "real": 4, "reference": 4, "tiny": 2}
BACKENDS = ("ort", "ov", "eager")  # onnxruntime, OpenVINO, PyTorch eager
TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2, num_classes=10)


REAL_MODEL = Path(__file__).resolve().parents[1] / "models" / "vits14_cifar10.safetensors"


def build_model(name: str) -> VisionTransformer:
    torch.manual_seed(0)
    if name == "deit_s":
        return VisionTransformer(named_config("deit_small_patch16_224")).eval()
    if name == "tiny":
        return VisionTransformer(TINY).eval()
    if name == "reference":
        path = default_path(DEFAULT_MODEL)
        if path is None or not Path(path).is_file():
            sys.exit("the reference model needs the shared folder (set VITBUDGET_SHARED)")
        return load_model(path).eval()
    if name == "real":
        return load_model(REAL_MODEL).eval()
    sys.exit(f"unknown model {name!r}; use deit_s, real, reference or tiny")


def time_methods(fns: dict[str, Any], inputs: list[torch.Tensor], batch: int, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    """Each backend's methods round-robin among themselves, with ratios to that backend's baseline.

    The backends take turns as whole blocks, not call by call: each one's idle threads (onnxruntime's
    pools, OpenMP's) would otherwise still hold the cores when the other starts.
    """
    report = {}
    for backend in BACKENDS:
        mine = {name: fn for name, fn in fns.items() if name.startswith(backend + "/")}
        if mine:
            times = time_interleaved(mine, inputs, warmup=warmup, repeats=repeats)
            report.update(speed_report(times, batch, baseline=f"{backend}/baseline"))
    return report


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    model = build_model(name)
    chosen = [(m, {"r": TOME_R[name]} if m == "tome" else opts) for m, opts in METHODS if args.methods is None or m in args.methods]
    rows, fns = [], {}
    for method_name, options in chosen:
        label = " ".join([method_name, *(f"{k} {v}" for k, v in options.items())])
        method = build_method(method_name, model, **options).eval()
        result = export_method(method, workdir / f"{name}-{method_name}.onnx")
        rows.append({"model": name, "label": label, "method": method_name, "options": options,
                     "rel_flops": result.metadata["rel_flops"], "gflops": result.metadata["gflops"],
                     "tokens": result.metadata["tokens"]["attention"], "max_abs_diff": result.max_abs_diff})
        fns[f"ort/{method_name}"] = OnnxRunner(result.path, threads=args.threads, spinning=False)
        if args.openvino:
            fns[f"ov/{method_name}"] = OpenVinoRunner(export_method(method, workdir / f"{name}-{method_name}.xml").path, threads=args.threads)
        if not args.no_eager:
            fns[f"eager/{method_name}"] = method
        print(f"{name}: exported {label} (rel. FLOPs {rows[-1]['rel_flops']:.3f}, max |Δlogits| {result.max_abs_diff:.1e})", flush=True)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    for batch, repeats, warmup, count in ((1, args.repeats_b1, 3, 16), (64, args.repeats_b64, 2, 2)):
        inputs = [torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g) for _ in range(count)]
        report = time_methods(fns, inputs, batch, repeats, warmup)
        for row in rows:
            for backend in BACKENDS:
                entry = report.get(f"{backend}/{row['method']}")
                if entry is None:
                    continue
                speedup = 1.0 / entry["time_ratio"]  # median over rounds of baseline time / method time
                row[f"{backend}_b{batch}"] = {
                    "median_ms": entry["median_ms"], "images_per_s": entry["images_per_s"], "speedup": speedup,
                    "fraction_of_ideal": fraction_of_ideal(speedup, row["rel_flops"]), "repeats": entry["repeats"],
                }
        print(f"{name}: timed batch {batch}", flush=True)
    return rows


def table(rows: list[dict[str, Any]], eager: bool, openvino: bool = False) -> str:
    head = ["model", "method", "rel. FLOPs", "ideal speed-up", "b1 ms", "b1 speed-up", "b1 fraction", "b64 img/s", "b64 speed-up", "b64 fraction"]
    if openvino:
        head += ["OpenVINO b1 ms", "OpenVINO b1 fraction", "OpenVINO b64 img/s", "OpenVINO b64 fraction"]
    if eager:
        head += ["eager b1 fraction", "eager b64 fraction"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b1, b64 = r.get("ort_b1", {}), r.get("ort_b64", {})
        cells = [r["model"], r["label"], f"{r['rel_flops']:.3f}×", f"{1 / r['rel_flops']:.2f}×",
                 f"{b1.get('median_ms', float('nan')):.2f}", f"{b1.get('speedup', float('nan')):.2f}×", f"{b1.get('fraction_of_ideal', float('nan')):.2f}",
                 f"{b64.get('images_per_s', float('nan')):.0f}", f"{b64.get('speedup', float('nan')):.2f}×", f"{b64.get('fraction_of_ideal', float('nan')):.2f}"]
        if openvino:
            ov1, ov64 = r.get("ov_b1", {}), r.get("ov_b64", {})
            cells += [f"{ov1.get('median_ms', float('nan')):.2f}", f"{ov1.get('fraction_of_ideal', float('nan')):.2f}",
                      f"{ov64.get('images_per_s', float('nan')):.0f}", f"{ov64.get('fraction_of_ideal', float('nan')):.2f}"]
        if eager:
            cells += [f"{r.get('eager_b1', {}).get('fraction_of_ideal', float('nan')):.2f}", f"{r.get('eager_b64', {}).get('fraction_of_ideal', float('nan')):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="deit_s,reference", help="comma-separated: deit_s, real, reference, tiny (default deit_s,reference)")
    parser.add_argument("--methods", default=None, help="comma-separated method names to keep (default: all; the baseline is always kept)")
    parser.add_argument("--threads", type=int, default=None, help="threads for onnxruntime and torch (default: torch's, the physical cores)")
    parser.add_argument("--repeats-b1", type=int, default=50, help="batch-1 rounds (default 50)")
    parser.add_argument("--repeats-b64", type=int, default=8, help="batch-64 rounds (default 8)")
    parser.add_argument("--no-eager", action="store_true", help="time the exported files only")
    parser.add_argument("--openvino", action="store_true", help="also export OpenVINO IR and time it (needs the `openvino` extra)")
    parser.add_argument("--tiny", action="store_true", help="a 32-px toy ViT and 2 rounds: checks the script in seconds")
    parser.add_argument("--out", default="runs/onnx_speed", help="output directory: onnx_speed.json and onnx_speed.md")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.repeats_b1, args.repeats_b64 = "tiny", 2, 2
    if args.methods is not None:
        args.methods = {"baseline", *args.methods.split(",")}
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = args.threads or torch.get_num_threads()
    out = ensure_writable_dir(args.out)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name in args.models.split(","):
            rows += bench_model(name, args, Path(tmp))
    command = "python benchmarks/onnx_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    machine = {**machine_info(), "threads": args.threads}
    import onnxruntime

    result = {"command": command, "machine": machine, "onnxruntime": onnxruntime.__version__, "rows": rows}
    versions = f"onnxruntime {onnxruntime.__version__}"
    if args.openvino:
        import openvino

        result["openvino"] = openvino.__version__
        versions += f", OpenVINO {openvino.__version__}"
    write_json(out / "onnx_speed.json", result)
    md = f"`{command}` — {machine['cpu']}, {machine['cores']} cores, {args.threads} threads, torch {machine['torch']}, {versions}\n\n"
    write_text(out / "onnx_speed.md", md + table(rows, not args.no_eager, args.openvino))
    print(table(rows, not args.no_eager, args.openvino))
    print(f"wrote {out / 'onnx_speed.json'}, {out / 'onnx_speed.md'}")
    return result


if __name__ == "__main__":
    main()
