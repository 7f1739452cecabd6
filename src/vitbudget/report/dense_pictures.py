"""Dense maps side by side: one row per photo, the photo then each method's map (the baseline's first)."""
from __future__ import annotations

import os

import numpy as np
from torch import Tensor

from ..eval.dense_metrics import mean_abs_error
from ..io import atomic_path


def save_dense_maps(photos: list[np.ndarray], maps: dict[str, list[Tensor]], path: str | os.PathLike, *,
                    titles: list[str] | None = None, label: str = "saliency", scale: float = 2.2) -> None:
    """photos: (h, w, 3) floats in [0, 1]; maps[method][i]: (h, w) in [0, 1]. Written atomically as PNG.

    Each method's panel is titled with its mean absolute error to the first (baseline) map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(maps)
    cols = 1 + len(names)
    fig, axes = plt.subplots(len(photos), cols, figsize=(cols * scale, len(photos) * scale + 0.4), squeeze=False)
    layer = None
    for i, photo in enumerate(photos):
        axes[i, 0].imshow(photo)
        axes[i, 0].set_title(titles[i] if titles else "photo", fontsize=7)
        reference = maps[names[0]][i]
        for j, name in enumerate(names, start=1):
            layer = axes[i, j].imshow(maps[name][i].numpy(), cmap="magma", vmin=0, vmax=1, interpolation="bilinear")
            note = "" if j == 1 else f"\nMAE {mean_abs_error(maps[name][i], reference):.3f}"
            axes[i, j].set_title(f"{name}{note}", fontsize=7)
        for ax in axes[i]:
            ax.axis("off")
    if layer is not None:
        fig.colorbar(layer, ax=axes.ravel().tolist(), shrink=0.5, label=label)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
