"""ToMe (Bolya et al., ICLR 2023): merge r token pairs per block by bipartite soft matching.

In every block, between the attention residual and the MLP: the patch tokens alternate into sets
A and B, each A token's most similar B token is found by cosine similarity of the head-averaged
keys, and the r most similar A tokens are merged into their B partners (size-weighted average).
Token sizes feed proportional attention (log size added to the attention logits by the runner).
Prefix tokens (CLS, registers) are never merged. Training-free; r = 0 is exactly the baseline.

r larger than half the patch tokens of the first block is a ConfigError; later blocks merge at
most half of what is left, as the reference does (min(r, n // 2)).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.attention import AttentionInfo
from ..runtime.runner import ExecutionRecord
from ..runtime.state import TokenState
from .base import Method
from .registry import register


@dataclass(frozen=True)
class ToMeOptions:
    r: int = field(default=8, metadata={"help": "tome: token pairs merged in every block (at most half the patch tokens)"})

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError(f"--r must be >= 0 (tokens merged per block), got {self.r}")


def bipartite_merge(state: TokenState, metric: Tensor, r: int) -> tuple[TokenState, float]:
    """Merge r tokens of set A into set B; returns the new state and the matching MACs per image.

    metric: (B, N, d) similarity features (head-averaged keys). Output order: prefix, unmerged A
    tokens (in their order), B tokens (in their order).
    """
    p = state.num_prefix
    size = state.size if state.size is not None else torch.ones(state.x.shape[:2], dtype=state.x.dtype, device=state.x.device)
    m = metric[:, p:]
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_m, b_m = m[:, ::2], m[:, 1::2]
    scores = a_m @ b_m.transpose(1, 2)  # (B, Na, Nb)
    node_max, node_idx = scores.max(dim=-1)
    order = node_max.argsort(dim=-1, descending=True)
    src = order[:, :r]  # A tokens merged away
    unm = order[:, r:].sort(dim=-1).values  # A tokens kept, in their order
    dst = node_idx.gather(1, src)  # their partners in B

    def split(t: Tensor):
        rest = t[:, p:]
        return t[:, :p], rest[:, ::2], rest[:, 1::2]

    def take(t: Tensor, idx: Tensor) -> Tensor:
        return t.gather(1, idx.reshape(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))

    xp, xa, xb = split(state.x)
    sp, sa, sb = split(size)
    d = xb.shape[-1]
    src_x, src_s = take(xa, src), take(sa, src)
    mass = (xb * sb[..., None]).scatter_add(1, dst[..., None].expand(-1, -1, d), src_x * src_s[..., None])
    sb_new = sb.scatter_add(1, dst, src_s)
    hit = torch.zeros_like(sb, dtype=torch.bool).scatter(1, dst, True)[..., None]
    xb = torch.where(hit, mass / sb_new[..., None], xb)  # untouched tokens stay bit-identical
    new_x = torch.cat([xp, take(xa, unm), xb], 1)
    new_size = torch.cat([sp, take(sa, unm), sb_new], 1)
    ip, ia, ib = split(state.patch_ids)
    new_ids = torch.cat([ip, take(ia, unm), ib], 1)
    new = state.replace(x=new_x, size=new_size, patch_ids=new_ids, extras={})
    return new, float(a_m.shape[1] * b_m.shape[1] * m.shape[-1])


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
        new, macs = bipartite_merge(state, info.keys.mean(dim=1), r)
        record.add_macs(macs)
        return new


register("tome", lambda model, opts: ToMe(model, opts), ToMeOptions,
         "ToMe: merge r token pairs per block by bipartite soft matching of keys, proportional attention (training-free)")
