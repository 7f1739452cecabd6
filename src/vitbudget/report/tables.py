"""Markdown tables from result dictionaries."""
from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    return format(value, spec)


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per method: accuracy, calibration, FLOPs, and speed as ratios to the baseline.

    A feature extractor (no head, no labels to score) gets a cosine-similarity column instead:
    each method's pooled features against the baseline's, averaged over images.
    """
    features = any("cosine_to_baseline" in r for r in results.values())
    score = "cos. sim. to baseline" if features else "top-1 % | ECE % | NLL"
    header = f"| method | {score} | GFLOPs/img | rel. FLOPs | b1 latency ms | b1 latency ratio | throughput img/s | throughput ratio |"
    rows = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for name, r in results.items():
        thr_key = next((k for k in r if k.startswith("throughput_b")), None)
        scores = (_fmt(r.get("cosine_to_baseline"), ".4f") if features else
                  f"{_fmt(r.get('top1'), '.2f')} | {_fmt(r.get('ece'), '.2f')} | {_fmt(r.get('nll'), '.3f')}")
        rows.append(
            f"| {name} | {scores} | "
            f"{_fmt(r.get('gflops'), '.4f')} | {_fmt(r.get('rel_flops'), '.3f')}× | {_fmt(r.get('latency_b1_ms'), '.2f')} | "
            f"{_fmt(r.get('latency_ratio'), '.3f')} | {_fmt(r.get(thr_key) if thr_key else None, '.0f')} | {_fmt(r.get('throughput_ratio'), '.3f')} |"
        )
    return "\n".join(rows) + "\n"
