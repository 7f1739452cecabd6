"""Threshold merging: a per-image token budget from a similarity threshold (training-free).

In every block, between the attention residual and the MLP, ToMe's bipartite matching
(head-averaged keys, A = even positions, B = odd, prefix tokens protected) pairs each A token
with its most similar B token, and *every* pair whose cosine similarity exceeds
thr_l = thr0 - decay * l (block l, from 0) merges, by ToMe's size-weighted average with
proportional attention. An image of sky merges much, a cluttered one little: each image keeps its
own number of tokens (at most half of its patch tokens merge per block, as ToMe's r).

* `--budget image` (default): images keep different counts and the batch runs *packed*: the
  merged state is compacted per image (real tokens first, padding after, a key mask), and the
  runner runs qkv, projections and MLP on the real tokens only (runtime.state.Packing), the
  attention product padded with the mask. Per-image token counts are in the ExecutionRecord
  (`attn_tokens` / `mlp_tokens`), so FLOPs are per image, from the tokens each image executed,
  plus its matching product. A batch gives each image exactly what it would get alone.
* `--budget batch`: the comparison at equal mean FLOPs. Each block counts the pairs above the
  threshold per image as above, takes the batch mean (rounded half up) and merges that many pairs
  in every image: ToMe with that r in that block. Its results depend on the batch an image is in.

Order after a merge: [prefix, unmerged A, B] per image, as ToMe with a class token (the unmerged
A tokens in position order, also without prefix tokens, where ToMe keeps its similarity order).
An image that merges nothing in a block keeps its order (as alone, where that block does not merge).
thr0 above 1 merges nothing and is exactly the baseline (cosine similarity is at most 1).
Shapes depend on the pixels: neither mode exports to a static graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.attention import AttentionInfo
from ..runtime.runner import ExecutionRecord, RunOutput
from ..runtime.state import TokenState
from ..runtime.token_map import TokenMap
from .base import Method
from .registry import register
from .tome import bipartite_merge, merged_token_map

BUDGETS = ("image", "batch")


@dataclass(frozen=True)
class ThreshOptions:
    thr0: float = field(default=0.9, metadata={"help": "thresh: merge every matched pair with key cosine similarity above thr0 - decay * block"})
    decay: float = field(default=0.0, metadata={"help": "thresh: how much the threshold falls per block"})
    budget: str = field(default="image", metadata={"help": "thresh: image (each image its own count, packed) or batch (the batch's mean count for all, ToMe-style)"})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.thr0) and math.isfinite(self.decay)):
            raise ConfigError(f"--thr0 and --decay must be finite, got {self.thr0}, {self.decay}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")


@dataclass
class Matching:
    """ToMe's A -> B matching of a (possibly padded) batch, with each image's count above the threshold."""

    node_max: Tensor  # (B, Na) best similarity of each A token (-inf: protected or padding)
    node_idx: Tensor  # (B, Na) its partner in B
    count: Tensor  # (B,) pairs to merge per image: above the threshold, at most half the patch tokens
    macs: Tensor  # (B,) the matching product per image, on its own tokens


def match(state: TokenState, metric: Tensor, thr: float) -> Matching:
    p, W = state.num_prefix, state.width
    n = state.num_tokens()
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
        pos = torch.arange(W, device=m.device)
        bad = (pos[None] < p) | (pos[None] >= n[:, None])  # protected prefix or padding
        scores = scores.masked_fill(bad[:, ::2, None] | bad[:, None, 1::2], float("-inf"))
        node_max, node_idx = scores.max(dim=-1)
        count = torch.minimum((node_max > thr).sum(dim=1), torch.div(n - p, 2, rounding_mode="floor").clamp_min(0))
    macs = ((n + 1) // 2 * (n // 2) * m.shape[-1]).double()
    return Matching(node_max, node_idx, count, macs)


def merge_per_image(state: TokenState, mt: Matching) -> TokenState:
    """Each image merges its `count` best-matched A tokens; the batch is compacted, padded, key-masked."""
    p, x = state.num_prefix, state.x
    B, W, D = x.shape
    n = state.num_tokens()
    with torch.no_grad():
        order = mt.node_max.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=x.device).expand(B, -1))
        merged = rank < mt.count[:, None]  # (B, Na): A tokens that go into their partner
        pos = torch.arange(W, device=x.device)
        gone = pos[None] >= n[:, None]
        gone[:, ::2] |= merged
        group = torch.where(pos < p, 0, torch.where(pos % 2 == 0, 1, 2))  # prefix, A, B
        # an image that merges nothing keeps its order, as it does alone (where this step does not run)
        group = torch.where(mt.count[:, None] > 0, group, 0)
        key = torch.where(gone, 3 * W + pos, group * W + pos)
        kept = n - mt.count
        width = int(kept.max())
        keep = key.argsort(dim=1)[:, :width]
        mask = torch.arange(width, device=x.device)[None] < kept[:, None]
        dst = mt.node_idx * 2 + 1
        a_pos = pos[::2].expand(B, -1)
        joined = torch.where(merged, dst, a_pos)  # for the patch grid: unmerged A tokens stay themselves
    size = state.size if state.size is not None else torch.ones(B, W, dtype=x.dtype, device=x.device)
    w = merged.to(x.dtype)
    weighted = x * size[..., None]
    weighted = weighted.scatter_add(1, dst[..., None].expand(-1, -1, D), weighted[:, ::2] * w[..., None])
    size = size.scatter_add(1, dst, size[:, ::2] * w)
    new_size = size.gather(1, keep)
    new_x = weighted.gather(1, keep[..., None].expand(-1, -1, D)) / new_size[..., None]
    if p:  # prefix tokens are never merged: exactly themselves
        new_x[:, :p] = x[:, :p]
    return state.replace(x=new_x, size=new_size.masked_fill(~mask, 1.0), patch_ids=state.patch_ids.gather(1, keep),
                         key_mask=None if bool(mask.all()) else mask, extras={}, history=state.merged(a_pos, joined))


class Thresh(Method):
    name = "thresh"

    @property
    def data_dependent_shapes(self) -> str | None:
        return "threshold merging merges as many pairs as pass the threshold, so its token counts depend on the pixels"

    def needs_keys(self, index: int) -> bool:
        return self.threshold(index) < 1.0

    def threshold(self, index: int) -> float:
        return self.options.thr0 - self.options.decay * index

    def begin(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> TokenState:
        if state.policy is not None:
            raise ConfigError("thresh runs at inference with tokens removed (no training policy)")
        return state

    def after_attention(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        if info.keys is None:
            return state
        metric = info.keys.mean(dim=1)
        mt = match(state, metric, self.threshold(index))
        record.add_macs(mt.macs)
        if self.options.budget == "batch":
            r = int(mt.count.double().mean().add(0.5).floor())  # the batch's mean count, rounded half up
            r = min(r, (state.width - state.num_prefix) // 2)
            return state if r <= 0 else bipartite_merge(state, metric, r)[0]
        if not bool(mt.count.any()):
            return state
        return merge_per_image(state, mt)

    def token_map(self, out: RunOutput) -> TokenMap | None:
        return merged_token_map(out, self.model.cfg.num_patches)


register("thresh", lambda model, opts: Thresh(model, opts), ThreshOptions,
         "threshold merging: every matched pair above a depth-decaying similarity merges, each image its own count, run packed (training-free)",
         label="Threshold merge", kind="reducer")
