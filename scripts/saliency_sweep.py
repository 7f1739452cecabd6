"""The saliency sweep figure: IoU with the unmodified model's maps against backbone FLOPs, per method.

Reads the results.json of several `vitbudget eval --task saliency` runs (each run: several methods at
one setting) and draws one line per method over the settings, with the Pareto front and the
baseline, plus a Markdown table of every point:

    python scripts/saliency_sweep.py runs/sal250 runs/sal_sweep_r8 runs/sal_sweep_r16 --out docs/figures/real/saliency_sweep.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitbudget.methods.labels import display_name, setting_label
from vitbudget.report.pareto import save_pareto

SWEPT = ("r", "rho", "ratio", "thr0", "alpha")  # the options a sweep varies; the rest stay at their defaults


def rows_of(run: Path) -> tuple[dict[str, dict], int]:
    """Sweep rows from one run: backbone-relative FLOPs (the decoder's cost is the same for every method) and IoU."""
    report = json.loads((run / "results.json").read_text())
    methods = report["methods"]
    base = methods["baseline"]
    base_backbone = base["gflops"] - base["gflops_head"]
    rows = {}
    for name, m in methods.items():
        options = {k: m[k] for k in SWEPT if k in m}
        label = "Baseline" if name == "baseline" else f"{display_name(name)} {setting_label(options)}"
        rows[label] = {"method": name, "options": options, "rel_flops": (m["gflops"] - m["gflops_head"]) / base_backbone,
                       "iou_mean": m["iou@0.5"], "mae": m["mae"], "pearson": m["pearson"], "rel_flops_with_head": m["rel_flops"],
                       "photos": report["data"]["images"], **({"throughput_ratio": m["throughput_ratio"]} if m.get("throughput_ratio") else {})}
    return rows, report["data"]["images"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of `vitbudget eval --task saliency`")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write (a .md table beside it)")
    args = parser.parse_args(argv)
    rows, photos = {}, set()
    for run in args.runs:
        more, n = rows_of(run)
        photos.add(n)
        for label, row in more.items():
            rows.setdefault(label, row)  # a setting measured twice (e.g. the baseline): the first run's
    title = f"saliency maps vs the unmodified model's (x: backbone FLOPs), {'/'.join(str(n) for n in sorted(photos))} photos (IoU of maps thresholded at 0.5)"
    save_pareto(rows, args.out, title=title, score="iou", score_label="IoU@0.5 with the unmodified maps", speed_key=None)
    lines = ["| method | photos | backbone rel. FLOPs | with the decoder | IoU@0.5 | MAE | Pearson |", "|---|---|---|---|---|---|---|"]
    for label, r in sorted(rows.items(), key=lambda kv: (kv[1]["method"], -kv[1]["rel_flops"])):
        lines.append(f"| {label} | {r['photos']} | {r['rel_flops']:.3f}× | {r['rel_flops_with_head']:.3f}× | {r['iou_mean']:.3f} | "
                     f"{r['mae']:.3f} | {r['pearson']:.3f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
