"""Accuracy against compute, the picture a user looks at first: one colour and one line per method
family, the Pareto front marked, the baseline as reference lines, labels that do not overlap,
and, when speed was measured, the same against measured speed-up beside the FLOPs panel.

Rows are suite or tuner rows: {"method", "options", "model"?, "rel_flops", "top1_mean", "top1_std"?,
and a speed column such as "speedup" or "throughput_ratio"}. A family is a method on one
checkpoint (EViT training-free and EViT fine-tuned are two families); its points are joined in
order of the x axis and labelled by their setting (ρ 0.7, r 4, α 0.2), the family by the legend;
a stack (ToMe + ABS) is drawn in its reducer's colour, dashed, with hollow markers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_path
from ..methods.labels import display_name, setting_label

SPEED_KEYS = {  # row key -> axis label; the first one present in the rows is drawn
    "speedup": "measured speed-up ×",
    "throughput_ratio": "measured batch-64 throughput speed-up ×",
}
MARKERS = "osD^vPX*<>hp"


def family_of(row: dict[str, Any]) -> str:
    """The legend name of a row's family: method (+ checkpoint folder when the row has its own)."""
    if row.get("family"):
        return row["family"]
    name = display_name(row.get("method", "?"))
    model = row.get("model")
    return f"{name} ({Path(model).parent.name or Path(model).stem})" if model else name


def is_reference(row: dict[str, Any]) -> bool:
    return row.get("method") == "baseline" and not row.get("model")


def pareto_front(points: Sequence[tuple[float, float]], lower_x_is_better: bool) -> list[int]:
    """Indices of points no other point beats on both axes (higher y; lower or higher x), in x order."""
    sign = 1 if lower_x_is_better else -1
    order = sorted(range(len(points)), key=lambda i: (sign * points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def pareto_figure(rows: dict[str, dict[str, Any]], *, title: str = "", speed_key: str | None = None,
                  target_flops: float | None = None, target_speedup: float | None = None, highlight: str | None = None,
                  score: str | None = None, score_label: str | None = None):
    """The figure (matplotlib, Agg): a FLOPs panel, and a speed panel when `speed_key` (or the first
    of SPEED_KEYS found) is in at least two rows. The y axis is rows' `{score}_mean` (default: top-1, or
    cosine for feature extractors; e.g. score="iou" for dense maps). Returns (figure, axes, {axes: [label texts]})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if speed_key is None:
        speed_key = next((k for k in SPEED_KEYS if sum(r.get(k) is not None for r in rows.values()) >= 2), None)
    axes_spec = [("rel_flops", "relative FLOPs (from executed tokens; lower is cheaper)", True)]
    if speed_key is not None:
        axes_spec.append((speed_key, SPEED_KEYS.get(speed_key, speed_key), False))
    if score is None:
        score = "top1" if all("top1_mean" in r for r in rows.values()) else "cosine"  # feature extractors: cosine to the reference
    ylabel = score_label or {"top1": "top-1 %", "cosine": "cosine similarity to the reference's features"}.get(score, score)
    fig, axes = plt.subplots(1, len(axes_spec), figsize=(6.4 * len(axes_spec), 4.8), squeeze=False)
    axes = list(axes[0])
    families: dict[str, list[str]] = {}
    for label, row in rows.items():
        if not is_reference(row):
            families.setdefault(family_of(row), []).append(label)
    style = family_styles(rows, families, plt)
    pending = {}
    for ax, (key, xlabel, lower_better) in zip(axes, axes_spec):
        plotted = {label: (float(r[key]), float(r[f"{score}_mean"])) for label, r in rows.items() if r.get(key) is not None}
        for label, row in rows.items():
            if is_reference(row) and label in plotted:
                x, y = plotted[label]
                ax.axhline(y, color="0.35", lw=0.9, ls=":", zorder=1)
                ax.axvline(x, color="0.35", lw=0.9, ls=":", zorder=1)
                ax.plot([x], [y], marker="*", ms=12, color="black", zorder=4, label="baseline (reference lines)" if ax is axes[0] else None)
        for fam, labels in families.items():
            colour, marker, dashed = style[fam]
            pts = sorted((plotted[lb] + (lb,) for lb in labels if lb in plotted))
            if not pts:
                continue
            line = "--" if dashed else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], line, color=colour, lw=1.2, alpha=0.8, zorder=2, gid=fam)
            for x, y, lb in pts:
                err = rows[lb].get(f"{score}_std") or 0.0
                ax.errorbar([x], [y], yerr=[err] if err else None, fmt=marker, ms=6, color=colour, capsize=3, zorder=3,
                            mfc="white" if dashed else colour, mec="black" if lb == highlight else colour, mew=1.8 if lb == highlight else 1.0)
            ax.plot([], [], line + marker, color=colour, mfc="white" if dashed else colour, label=fam)  # one legend entry per family
        labels = list(plotted)
        front = [labels[i] for i in pareto_front([plotted[lb] for lb in labels], lower_better)]
        if len(front) > 1:
            fx, fy = zip(*(plotted[lb] for lb in front))
            ax.step(fx, fy, where="post" if lower_better else "pre", color="0.2", lw=2.2, alpha=0.25, zorder=0,
                    label="Pareto front" if ax is axes[0] else None)
            ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="0.2", lw=0.9, zorder=5)
        target = target_flops if key == "rel_flops" else target_speedup
        if target is not None:
            ax.axvline(target, color="tab:red", lw=1.2, ls="--", zorder=1, label=None)
            ax.annotate("target", (target, 1), xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points",
                        color="tab:red", fontsize=7)
        if highlight in plotted:
            ax.annotate("recommended", plotted[highlight], xytext=(0, 16), textcoords="offset points", ha="center", fontsize=7,
                        fontweight="bold", arrowprops={"arrowstyle": "-", "color": "black", "lw": 0.6})
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.margins(x=0.08, y=0.12)
        points = [(plotted[lb], setting_label(rows[lb].get("options") or {}), style[family_of(rows[lb])][0]) for lb in labels
                  if not is_reference(rows[lb])]
        pending[ax] = ([p for p in points if p[1]], [plotted[lb] for lb in labels])
    if title:
        fig.suptitle(title, fontsize=9)
    handles, names = [], []
    for ax in axes:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06 + 0.045 * ((len(names) - 1) // 4), 1, 0.96 if title else 1))
    texts = {ax: place_labels(fig, ax, *pending[ax]) for ax in axes}  # after the layout: placement works in pixels
    return fig, axes, texts


def family_styles(rows, families: dict[str, list[str]], plt) -> dict[str, tuple]:
    """(colour, marker, dashed) per family. A stack REDUCER+abs shares its reducer's colour and marker,
    dashed with hollow markers, so each pair reads at a glance; every other family has its own colour."""
    stacks = {}
    for fam, labels in families.items():
        method = rows[labels[0]].get("method", "")
        if "+" in method:
            part = {**rows[labels[0]], "method": method.split("+")[0], "family": None}
            if family_of(part) in families:
                stacks[fam] = family_of(part)
    own = [fam for fam in families if fam not in stacks]
    cmap = plt.get_cmap("tab10" if len(own) <= 10 else "tab20")
    style = {fam: (cmap(i % cmap.N), MARKERS[i % len(MARKERS)], False) for i, fam in enumerate(own)}
    for fam, reducer in stacks.items():
        style[fam] = (*style[reducer][:2], True)
    return style


# label offsets in points, nearest first: right, above, left, below, diagonals, then farther out
_OFFSETS = [(6, 3, "left"), (0, 8, "center"), (-6, 3, "right"), (0, -13, "center"), (6, -11, "left"), (-6, -11, "right"),
            (8, 10, "left"), (-8, 10, "right")]
_OFFSETS += [(2 * dx, 2 * dy, ha) for dx, dy, ha in _OFFSETS] + [(3 * dx, 3 * dy, ha) for dx, dy, ha in _OFFSETS]


def place_labels(fig, ax, points, markers) -> list:
    """Greedy placement: each label takes the first offset whose box overlaps no placed label and no
    marker (else the least-overlapping one). Returns the text artists."""
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    boxes = []
    for x, y in markers:  # keep labels off the points themselves
        px, py = to_px((x, y))
        boxes.append((px - 4, py - 4, px + 4, py + 4))
    texts = []
    for (x, y), text, colour in points:
        best = None
        for dx, dy, ha in _OFFSETS:
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, fontsize=7, color=colour, zorder=6)
            bb = t.get_window_extent(renderer)
            box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
            overlap = sum(_area(box, other) for other in boxes)
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, t, box)
            else:
                t.remove()
            if overlap == 0:
                break
        boxes.append(best[2])
        texts.append(best[1])
    return texts


def _area(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def save_pareto(rows: dict[str, dict[str, Any]], path: str | os.PathLike, *, title: str = "", **kwargs: Any) -> None:
    """Write `pareto_figure(rows, ...)` as a PNG, atomically."""
    import matplotlib.pyplot as plt

    fig, _, _ = pareto_figure(rows, title=title, **kwargs)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
