"""ToMe (Bolya et al., ICLR 2023): merge r token pairs per block by bipartite soft matching.

What `facebookresearch/ToMe` computes (`tome/merge.py` `bipartite_soft_matching` with
`class_token=True`, `merge_wavg`, and its timm patch), in every block between the attention
residual and the MLP:

* the metric is the block's keys averaged over heads (after q/k-norm where the model has one),
  cosine-normalised, over the WHOLE sequence;
* set A is the even positions of the sequence (the CLS token included), set B the odd ones;
  the CLS token is protected by scoring its A row -inf;
* each A token's most similar B token is its partner; the r A tokens with the highest
  similarity merge into their partners: (x * size) and size are summed (scatter-add) and the
  sums divided, a size-weighted average; r = min(r, (tokens - protected) // 2);
* the result is ordered [CLS, unmerged A tokens in their order, B tokens], so which set a
  token falls in next block depends on this order (the parity carries from block to block);
* token sizes feed proportional attention: log(size) is added to the attention logits (the
  runner does this for any state with `size`).

Generalised to several prefix tokens (registers, a distillation token): every prefix token is
protected (its A row or its B column scores -inf; the reference protects CLS this way and the
distillation token by its B column), and the prefix tokens stay at the front in their original
order, followed by the unmerged A tokens and the B tokens. With one prefix token this is the
reference exactly; with CLS + distillation token it is the reference's `distill_token=True`.
With no prefix token (global average pooling) the unmerged A tokens keep the reference's
order (most similar first), which it sorts only when there is a class token.

Under bf16 / fp16 autocast the similarities are computed in that dtype, as the reference does
under AMP; `score_fp32` (`--score-fp32 true`) computes them in float32 instead, so that the
merges are those of a float32 run up to the rounding of the keys themselves.

Merging is export-safe (gather, scatter-add, divide; never scatter_reduce "mean", which ONNX
cannot express). Training-free; r = 0 is exactly the baseline. r larger than half the patch
tokens is a ConfigError; later blocks merge at most half of what is left.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.attention import AttentionInfo
from ..runtime.runner import ExecutionRecord, RunOutput
from ..runtime.state import TokenState
from ..runtime.token_map import TokenMap, size_map
from .base import Method
from .registry import register


@dataclass(frozen=True)
class ToMeOptions:
    r: int = field(default=8, metadata={"help": "tome/mctf: tokens merged in every (mctf: every active) block (at most half the patch tokens)"})
    score_fp32: bool = field(default=False, metadata={"help": "tome: compute the matching similarities in float32 under bf16 / fp16 "
                                                               "autocast (default false: in the compute dtype, as the reference under AMP)"})

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError(f"--r must be >= 0 (tokens merged per block), got {self.r}")


def bipartite_match(state: TokenState, metric: Tensor, r: int, score_fp32: bool = False) -> tuple[Tensor, Tensor, Tensor, float]:
    """ToMe's matching: which r tokens of set A (even positions) go into which of set B (odd positions).

    metric: (B, N, d) similarity features of every token (head-averaged keys). Returns, as positions
    in the sequence, the A tokens merged away (B, r), their partners (B, r) and the tokens kept
    (B, N - r) ordered [prefix, unmerged A, B] (see the module docstring), and the matching MACs per
    image (the A x B similarity product). ToFu (methods.tofu) matches the same way. score_fp32: the
    similarities in float32, autocast off (in bf16 near-equal similarities round to ties and the
    matching differs from float32's).
    """
    p = state.num_prefix
    pa, pb = (p + 1) // 2, p // 2  # prefix tokens at even (A) and odd (B) positions
    precise = torch.autocast(metric.device.type, enabled=False) if score_fp32 else contextlib.nullcontext()
    with torch.no_grad(), precise:  # the matching is a discrete choice, as in the reference
        if score_fp32:
            metric = metric.float()
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a_m, b_m = m[:, ::2], m[:, 1::2]
        scores = a_m @ b_m.transpose(1, 2)  # (B, Na, Nb), a fresh tensor: protect in place
        if pa:
            scores[:, :pa] = float("-inf")
        if pb:
            scores[:, :, :pb] = float("-inf")
        node_max, node_idx = scores.max(dim=-1)
        order = node_max.argsort(dim=-1, descending=True)
        src = order[:, :r]  # A tokens merged away
        unm = order[:, r:]  # A tokens kept
        if p:  # the reference sorts them when there is a class token, so that it stays first
            unm = unm.sort(dim=-1).values[:, pa:]  # protected A tokens sort first: drop them here
        # positions in the whole sequence (A = even, B = odd): one gather per tensor below, not three
        src_pos, dst_pos = src * 2, node_idx.gather(1, src).mul_(2).add_(1)
        prefix_pos, b_pos = _fixed_positions(state.width, p, metric.device)
        B = metric.shape[0]
        keep = torch.cat([prefix_pos.expand(B, -1), unm * 2, b_pos.expand(B, -1)], dim=1)
    return src_pos, dst_pos, keep, float(a_m.shape[1] * b_m.shape[1] * m.shape[-1])


def bipartite_merge(state: TokenState, metric: Tensor, r: int, score_fp32: bool = False) -> tuple[TokenState, float]:
    """Merge r tokens of set A into set B by ToMe's matching and size-weighted average.

    Returns the new state, ordered [prefix, unmerged A, B], and the matching MACs per image.
    """
    src_pos, dst_pos, keep, macs = bipartite_match(state, metric, r, score_fp32)
    x, p = state.x, state.num_prefix
    size = state.size if state.size is not None else torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    # size-weighted sums: B partners receive their A sources' x * size and size (scatter-add), then
    # every kept token is divided by its size: (x * s) / s for untouched tokens, as the reference
    d = x.shape[-1]
    weighted = x * size[..., None]
    weighted = weighted.scatter_add(1, dst_pos[..., None].expand(-1, -1, d), weighted.gather(1, src_pos[..., None].expand(-1, -1, d)))
    size = size.scatter_add(1, dst_pos, size.gather(1, src_pos))
    new_size = size.gather(1, keep)
    new_x = weighted.gather(1, keep[..., None].expand(-1, -1, d)) / new_size[..., None]
    if p:  # prefix tokens are never merged: exactly themselves, whatever their size
        new_x[:, :p] = x[:, :p]
    new = state.replace(x=new_x, size=new_size, patch_ids=state.patch_ids.gather(1, keep), extras={},
                        history=state.merged(src_pos, dst_pos))
    return new, macs


SIZE = "merge_size"  # sizes ride in extras when they must not bias attention (PiToMe, ToFu)


def sizes_of(state: TokenState) -> Tensor:
    """(B, N) sizes of merged tokens, from `size` (proportional attention) or the extras (none); ones if unmerged."""
    size = state.size if state.size is not None else state.extras.get(SIZE)
    return size if size is not None else torch.ones(state.x.shape[:2], dtype=state.x.dtype, device=state.x.device)


def with_sizes(state: TokenState, size: Tensor, prop_attn: bool, **changes) -> TokenState:
    """`state` with new sizes where they belong: `size` biases attention, the extras do not."""
    if prop_attn:
        return state.replace(size=size, extras={}, **changes)
    return state.replace(size=None, extras={SIZE: size}, **changes)


def merged_token_map(out: RunOutput, num_patches: int) -> TokenMap:
    """Each surviving token's size at the patch it kept (blank: merged or pruned away)."""
    return size_map(out.state, sizes_of(out.state), num_patches)


def _fixed_positions(n: int, p: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(1, p) prefix positions and (1, Nb - p // 2) positions of the unprotected B tokens: the same for
    every block of a given width, so built once rather than per block (fresh while tracing: a
    cached tensor must never be a tracer's fake one)."""
    if torch.compiler.is_compiling():
        return _positions(n, p, device)
    return _cached_positions(n, p, device)


def _positions(n: int, p: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.arange(p, device=device)[None], torch.arange(p // 2 * 2 + 1, n, 2, device=device)[None]


_cached_positions = functools.lru_cache(maxsize=64)(_positions)


class ToMe(Method):
    name = "tome"

    def __init__(self, model: nn.Module, options: ToMeOptions):
        super().__init__(model, options)
        n = model.cfg.num_patches
        if options.r > n // 2:
            raise ConfigError(f"--r {options.r} merges more than half of the {n} patch tokens per block (at most {n // 2})")

    def needs_keys(self, index: int) -> bool:
        return self.options.r > 0

    def begin(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> TokenState:
        if self.options.r == 0:
            return state
        if state.key_mask is not None or state.policy is not None:
            raise ConfigError("tome needs equal token counts per image (no padding, no policy)")
        return state.replace(size=torch.ones(state.x.shape[:2], dtype=state.x.dtype, device=state.x.device))

    def after_attention(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        r = min(self.options.r, (state.width - state.num_prefix) // 2)
        if r <= 0:
            return state
        new, macs = bipartite_merge(state, info.keys.mean(dim=1), r, self.options.score_fp32)
        record.add_macs(macs)
        return new

    def token_map(self, out: RunOutput) -> TokenMap | None:
        return merged_token_map(out, self.model.cfg.num_patches)


register("tome", lambda model, opts: ToMe(model, opts), ToMeOptions,
         "ToMe: merge r token pairs per block by bipartite soft matching of keys, proportional attention (training-free)",
         label="ToMe", kind="reducer")
