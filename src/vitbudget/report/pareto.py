"""Accuracy against compute: one point per method, so trade-off curves (a rho sweep, target depths) read at a glance."""
from __future__ import annotations

import os
from typing import Any

from ..io import atomic_path


def save_pareto(rows: dict[str, dict[str, Any]], path: str | os.PathLike, *, title: str = "") -> None:
    """Top-1 (mean ± std over seeds) against GFLOPs per image, one labelled point per suite row; PNG, atomic.

    Rows whose labels share a prefix before " ρ" / " d" (e.g. "SPOT ρ 0.5", "SPOT ρ 0.7") are
    joined by a line in GFLOPs order, so each method's sweep reads as a curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    families: dict[str, list[tuple[float, float]]] = {}
    score = "top1" if all("top1_mean" in r for r in rows.values()) else "cosine"  # feature extractors: cosine to the reference
    for label, r in rows.items():
        x, y, err = r["gflops"], r[f"{score}_mean"], r.get(f"{score}_std") or 0.0
        ax.errorbar([x], [y], yerr=[err] if err else None, fmt="o", ms=5, capsize=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        families.setdefault(_family(label), []).append((x, y))
    for points in families.values():
        if len(points) > 1:
            points.sort()
            ax.plot(*zip(*points), "-", lw=0.8, color="grey", alpha=0.7)
    ax.set_xlabel("GFLOPs per image (from executed tokens)")
    ax.set_ylabel("top-1 %" if score == "top1" else "cosine similarity to the reference's features")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _family(label: str) -> str:
    for marker in (" ρ", " d", " r "):
        if marker in label:
            return label.split(marker)[0]
    return label
