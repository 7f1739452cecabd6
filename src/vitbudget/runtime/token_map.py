"""TokenMap: what a method chose, per original patch, read off a run for pictures (report draws it)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .state import TokenState


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


def size_map(state: TokenState, size: Tensor, num_patches: int) -> TokenMap:
    """Merging methods' picture: each surviving token's size (patches merged into it) at the patch it kept."""
    values = state.to_patch_grid(size.detach().float(), num_patches).cpu()
    return TokenMap(values=values, label="patches merged into the token (blank: merged away)", vmin=1.0)
