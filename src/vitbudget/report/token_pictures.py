"""Pictures of which tokens a method chose: per-patch values and outlines drawn over the image."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..io import atomic_path
from ..models.config import Preprocess
from ..runtime.token_map import TokenMap


def denormalize(images: Tensor, preprocess: Preprocess) -> np.ndarray:
    """(B, 3, H, W) normalised tensor -> (B, H, W, 3) float array in [0, 1] for display."""
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return (images.detach().cpu().float() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def save_token_maps(
    images: np.ndarray, token_map: TokenMap, patch_size: int, path: str | os.PathLike, *,
    titles: list[str] | None = None, suptitle: str | None = None, columns: int = 4, scale: float = 2.4,
) -> None:
    """One panel per image: the picture, the value layer, outlined patches; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n, h, w, _ = images.shape
    grid_w = w // patch_size
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * scale, rows * scale + 0.6), squeeze=False)
    values = token_map.values.detach().cpu().float().numpy() if token_map.values is not None else None
    outline = token_map.outline.detach().cpu().numpy() if token_map.outline is not None else None
    vmin = token_map.vmin if token_map.vmin is not None else (np.nanmin(values) if values is not None else 0)
    vmax = token_map.vmax if token_map.vmax is not None else (np.nanmax(values) if values is not None else 1)
    layer = None
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i], interpolation="nearest")
        if values is not None:
            grid = values[i].reshape(-1, grid_w)
            layer = ax.imshow(grid, cmap="viridis", alpha=0.55, vmin=vmin, vmax=vmax, interpolation="nearest",
                              extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        if outline is not None:
            for p in np.flatnonzero(outline[i]):
                r, c = divmod(int(p), grid_w)
                ax.add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size,
                                       fill=False, edgecolor="red", linewidth=1.2))
        if titles:
            ax.set_title(titles[i], fontsize=8)
    if layer is not None:
        fig.colorbar(layer, ax=axes.ravel().tolist(), shrink=0.6, label=token_map.label)
    if suptitle:
        import textwrap

        fig.suptitle(textwrap.fill(suptitle, width=12 * columns * scale), fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
