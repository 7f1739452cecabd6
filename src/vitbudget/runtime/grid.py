"""The patch grid a dense head reads: every original patch's final features, (B, H, W, C).

PLACEHOLDER (saliency branch): handles only runs that kept every token in place; the lead
replaces it with the version that works for every method (dropped, merged, halted tokens).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..errors import ConfigError


def patch_grid(out, model: nn.Module, norm: bool = True) -> Tensor:
    """Final tokens without the prefix, reshaped to the grid; the final norm applied when `norm`."""
    state, prefix, side = out.state, model.num_prefix_tokens, model.cfg.grid_size
    if state.key_mask is not None or state.width != prefix + side * side:
        raise ConfigError("patch_grid: this placeholder handles only runs that kept every token")
    x = model.norm(state.x) if norm else state.x
    return x[:, prefix:].reshape(x.shape[0], side, side, x.shape[-1])
