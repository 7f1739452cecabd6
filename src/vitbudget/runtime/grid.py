"""The full patch-token grid of any run: dense prediction (saliency, segmentation) reads it.

Every original patch gets the features of where it ended up (DESIGN.md, "tasks beyond
classification"):

* a patch whose token reached the end: that token's final features (after ABS refinement when
  a method refines them: `FINAL_TOKENS`);
* a patch whose token was merged (ToMe, PiToMe, ToFu's fusion, MCTF, threshold merging): the features of the token it was merged into, by
  following `Merge` steps from merged-away tokens to the token they joined;
* a patch whose token left before the end (pruned, halted, its image finished): its features in
  the last `Snapshot` that held it, i.e. at the block where it left (pre-norm).

The run only keeps references (`TokenState.history`); the grid is assembled here, on demand,
with a few whole-batch copies per recorded step (no loop over images or patches).
Prefix tokens and tokens without a patch (EViT's fused token) never land in the grid.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .state import Merge, Snapshot

if TYPE_CHECKING:
    from .runner import RunOutput

#: record.aux key: the pre-norm TokenState the readout was computed from, where a method's `finish`
#: changed the tokens after the last block (ABS, uniform depth) so that `RunOutput.state` is not it.
FINAL_TOKENS = "final_tokens_state"
#: record.aux key: why this run has no single patch grid (e.g. multi-crop's five views).
NO_GRID = "no_patch_grid"


def patch_grid(out: RunOutput, model: nn.Module, norm: bool = True) -> Tensor:
    """(B, H, W, C) features of every original patch of `out`'s run, H = W = `model`'s patch grid.

    norm: apply the model's final norm (`model.norm`) to the whole grid, as the classifier reads
    tokens; False gives the pre-norm features (every stored feature is pre-norm).
    Patches the run lost track of (none for the methods here) are NaN.
    """
    if NO_GRID in out.record.aux:
        raise ConfigError(out.record.aux[NO_GRID])
    state = out.record.aux.get(FINAL_TOKENS, out.state)
    cfg = model.cfg
    P, B, D = cfg.num_patches, out.record.batch_size, state.x.shape[-1]
    slots = P + 1  # slot P of each image collects prefix, padding and patch-less tokens, then is dropped
    canvas = state.x.new_full((B * slots, D), float("nan"))
    parent = None  # flat canvas row each row takes its features from (merged patches)
    merges = 0
    for entry in state.history + (state.snapshot(),):
        if isinstance(entry, Merge):
            parent = torch.arange(B * slots, device=canvas.device) if parent is None else parent
            src, dst = (_flat_rows(entry.patch_ids.gather(1, pos), None if entry.key_mask is None else entry.key_mask.gather(1, pos),
                                   entry.batch_index, slots) for pos in (entry.src, entry.dst))
            parent = parent.index_copy(0, src.reshape(-1), dst.reshape(-1))
            merges += 1
            continue
        live = _live(entry)
        rows = _flat_rows(entry.patch_ids, live, entry.batch_index, slots)
        canvas = canvas.index_copy(0, rows.reshape(-1), entry.x.reshape(-1, D).to(canvas.dtype))
    if parent is not None:  # follow merged-away patches to the token that absorbed them: pointer jumping
        for _ in range(math.ceil(math.log2(merges + 1))):
            parent = parent.index_select(0, parent)
        canvas = canvas.index_select(0, parent)
    grid = canvas.view(B, slots, D)[:, :P]
    if norm:
        grid = model.norm(grid)
    return grid.reshape(B, cfg.grid_size, cfg.grid_size, D)


def _live(entry: Snapshot) -> Tensor | None:
    """(B, N) bool real tokens of a snapshot (not padding, not masked out by a policy), or None = all."""
    live = entry.key_mask
    if entry.policy is not None:
        kept = entry.policy > 0.5
        live = kept if live is None else live & kept
    return live


def _flat_rows(patch_ids: Tensor, live: Tensor | None, batch_index: Tensor | None, slots: int) -> Tensor:
    """(B', N) canvas rows of tokens: image * slots + patch id, the discard slot for tokens without one."""
    discard = slots - 1
    ids = patch_ids.masked_fill(patch_ids < 0, discard)
    if live is not None:
        ids = ids.masked_fill(~live, discard)
    images = torch.arange(ids.shape[0], device=ids.device) if batch_index is None else batch_index
    return ids + images[:, None] * slots
