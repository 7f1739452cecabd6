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


def merged_size_map(state: TokenState, num_patches: int) -> TokenMap | None:
    """For merging methods (ToMe, MCTF): each surviving token's size at the patch it kept; blank where merged away."""
    if state.size is None:
        return None
    values = state.to_patch_grid(state.size.detach().float(), num_patches).cpu()
    return TokenMap(values=values, label="patches merged into the token (blank: merged away)", vmin=1.0)
