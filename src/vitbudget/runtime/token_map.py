"""TokenMap: what a method chose, per original patch, read off a run for pictures (report draws it)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class TokenMap:
    """Per-patch picture data for a batch, in original patch order (row-major grid).

    values: (B, P) float, NaN where a patch has no value; drawn as a translucent colour layer.
    outline: (B, P) bool, patches to outline (e.g. the tokens ABS refined).
    label: what `values` mean, for the colour bar (e.g. "halting depth").
    """

    values: Tensor | None = None
    outline: Tensor | None = None
    label: str = ""
    vmin: float | None = None
    vmax: float | None = None
