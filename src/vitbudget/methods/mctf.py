"""MCTF (Lee, Choi & Kim, CVPR 2024): multi-criteria token fusion with one-step-ahead attention.

What `mlvlab/MCTF` computes (`utils/mctf.py` `mctf`, `bipartite_soft_matching`, `merge_wavg`;
`models/modules/blocks.py` `Block_DEIT`; `models/SA/MHSA.py`), training-free (its `--r_evals` on a
plain DeiT; its 30-epoch token-distillation fine-tuning is not part of this method). Its evaluation
script's defaults are this module's defaults (`--mctf_type [16,0,0,1,1,1,20,40,1,1,0]`,
`--activate_layer [1..11]`); option names are the reference's:

* in every block of `activate_layer` (default: all but the first), with `one_step_ahead` 1, BEFORE
  the attention: the block's attention A = softmax(q k^T * scale + log size) is computed from its
  input (q and k only), the block's INPUT tokens x are merged, A is merged with them, and the block
  runs with that merged A ("one-step-ahead attention"): only the values are computed from the merged
  tokens, attention output = A' v. Then the MLP on the merged tokens;
* r tokens merged per layer: `r` (tokens) or `r_ratio` (the reference's r < 1: a fraction of the
  current patch tokens, MCTF-Fast uses 0.35 at layers 3,6,9); then, as the reference:
  if t - r < 10: r = t - 10; r = min(r, (t - prefix) // 2) with t the current tokens;
* bipartite matching on the metric x (the block input, cosine-normalised): A = even, B = odd
  positions; score(a, b) = W_sim * W_info * W_size with
  W_sim = ((cos(a, b) + 1) / 2) ** (1 / tau_sim),
  W_info = (i_a * i_b) ** (1 / tau_info), i = 1 / (attention a token receives, averaged over heads and
  queries), divided by its max over the tokens (less-attended tokens merge first),
  W_size = (z_a * z_b) ** (1 / tau_size), z = 1 / size divided by its max;
  a tau of 0 turns its criterion off (factor 1), as the reference;
* `bidirection` (default on): r1 = r // 2 A tokens merge into their best B partners (ToMe's step),
  then r2 = r - r1 B tokens (the merged results included) merge into their best unmerged A tokens,
  scored with the same first-step scores; the result is ordered [unmerged A (sorted), unmerged B
  (best score first)], so the next layer's even/odd split depends on it, as in the reference;
* `pooling_type` of a merged token: 1 (default) attention-weighted, w = received attention * size /
  max size, x' = sum(w x) / sum(w); 0 size-weighted (ToMe); 2 max; 3 plain mean. The merged
  attention sums merged keys' probabilities and pools merged queries' rows the same way (weighted
  by w for 0/1/3, max for 2). Sizes add up and feed proportional attention (log size) in every later
  block, as `prop_attn` 1 (the reference's default; 0 is not offered);
* `one_step_ahead` 2 ("precise"): the attention is recomputed from the merged tokens with their new
  sizes instead; 0: merge at the END of the block (after the MLP), with that block's own attention.

Generalised to several prefix tokens (registers): each prefix token's A row and B column score -inf
(the reference protects the first `num_protected` A rows, which for CLS alone is the same, but for
CLS + distillation token protects the token at position 2 instead of the distillation token at 1),
and prefix tokens are moved to the front in their original order. With only a CLS token this is the
reference exactly. Without prefix tokens the unmerged A tokens keep the reference's order (best first).
Where the reference would crash (fewer than 10 tokens before merging makes r negative), nothing merges.

Merging is scatter-add based (no scatter_reduce "mean"), shapes are fixed by r: exportable.
FLOPs charge what ran: per active block the extra q/k projection and q k^T on the tokens before the
merge, minus what the value-only path saves, plus the matching (Ta x Tb x D) and one multiply per
entry of the merged attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.attention import AttentionInfo, attention_probs
from ..runtime.runner import ExecutionRecord, RunOutput
from ..runtime.state import TokenState
from ..runtime.token_map import TokenMap
from .base import Method
from .tome import merged_token_map
from .predictor import check_stages_in_range, parse_stages
from .registry import register

POOLING = {0: "size", 1: "attention", 2: "max", 3: "mean"}
MIN_TOKENS = 10  # the reference never merges below 10 tokens


@dataclass(frozen=True)
class MCTFOptions:
    r: int = field(default=16, metadata={"help": "tome/mctf: tokens merged per block (mctf: per active block)"})
    r_ratio: float = field(default=0.0, metadata={"help": "mctf: if > 0, merge this fraction of the current patch tokens per active block instead of --r (the reference's r < 1; MCTF-Fast: 0.35)"})
    activate_layer: str = field(default="auto", metadata={"help": "mctf: 0-based blocks that merge, comma-separated; auto = all but the first (the reference's 1..11 on 12 blocks)"})
    tau_sim: float = field(default=1.0, metadata={"help": "mctf: temperature of the similarity criterion (0 = off)"})
    tau_info: float = field(default=20.0, metadata={"help": "mctf: temperature of the informativeness criterion (attention received; 0 = off)"})
    tau_size: float = field(default=40.0, metadata={"help": "mctf: temperature of the size criterion (0 = off)"})
    one_step_ahead: int = field(default=1, metadata={"help": "mctf: 1 merge before attention and reuse the merged attention; 2 recompute it (precise); 0 merge after the MLP"})
    bidirection: bool = field(default=True, metadata={"help": "mctf: bidirectional bipartite matching (A->B, then B->A)"})
    pooling_type: int = field(default=1, metadata={"help": "mctf: merged-token pooling: 1 attention-weighted, 0 size-weighted, 2 max, 3 mean"})

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError(f"--r must be >= 0 (tokens merged per block), got {self.r}")
        if not 0.0 <= self.r_ratio < 1.0:
            raise ConfigError(f"--r-ratio must be in [0, 1) (a fraction of the patch tokens), got {self.r_ratio}")
        for name in ("tau_sim", "tau_info", "tau_size"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 (0 turns the criterion off), got {getattr(self, name)}")
        if self.one_step_ahead not in (0, 1, 2):
            raise ConfigError(f"--one-step-ahead must be 0, 1 or 2, got {self.one_step_ahead}")
        if self.pooling_type not in POOLING:
            raise ConfigError(f"--pooling-type must be one of {sorted(POOLING)} ({', '.join(f'{k} {v}' for k, v in POOLING.items())}), got {self.pooling_type}")
        if self.activate_layer != "auto":
            parse_stages(self.activate_layer, "--activate-layer")

    @property
    def active(self) -> bool:
        return self.r > 0 or self.r_ratio > 0


def layer_r(options: MCTFOptions, t: int, p: int) -> int:
    """Tokens a block with t tokens (p of them prefix) merges, by the reference's rule (see module docstring)."""
    r: float = options.r_ratio if options.r_ratio > 0 else options.r
    if t - r < MIN_TOKENS:
        r = t - MIN_TOKENS
    r = min(int((t - p) * r) if r < 1 else int(r), (t - p) // 2)
    return max(r, 0)


def match(metric: Tensor, received: Tensor | None, size: Tensor | None, r: int, p: int, options: MCTFOptions) -> tuple[Tensor, Tensor]:
    """Multi-criteria bipartite matching; returns dest (B, T): the new slot of every token, and keep
    (B, T - r): the original position of the token whose identity each slot keeps (its patch id)."""
    B, T, _ = metric.shape
    r1, r2 = (r // 2, r - r // 2) if options.bidirection else (r, 0)
    with torch.no_grad():
        m = metric.float()
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]
        ta, tb = a.shape[1], b.shape[1]
        scores = ((a @ b.transpose(1, 2) + 1) / 2) ** (1 / options.tau_sim) if options.tau_sim else a.new_ones(B, ta, tb)
        for tau, value in ((options.tau_info, received), (options.tau_size, size)):
            if tau and value is not None:
                inv = 1 / value.float()
                inv = inv / inv.amax(dim=1, keepdim=True)
                scores = scores * (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1 / tau)
        pa, pb = (p + 1) // 2, p // 2  # prefix tokens at even (A) and odd (B) positions
        if pa:
            scores[:, :pa] = float("-inf")
        if pb:
            scores[:, :, :pb] = float("-inf")
        node_max, node_idx = scores.max(dim=-1)
        edges = node_max.argsort(dim=-1, descending=True)
        unm, src = edges[:, r1:], edges[:, :r1]
        dst = node_idx.gather(1, src)
        if p:
            unm = unm.sort(dim=-1).values
        nu = ta - r1
        if options.bidirection:
            back = scores.gather(1, unm[..., None].expand(-1, -1, tb)).transpose(1, 2)  # (B, Tb, nu)
            if pb:
                back[:, :pb] = float("-inf")  # prefix B tokens never merge into A
            node_max2, node_idx2 = back.max(dim=-1)
            edges2 = node_max2.sort(dim=-1, descending=True).indices
            unm2, src2 = edges2[:, r2:], edges2[:, :r2]
            slots = torch.arange(nu, nu + tb - r2, device=m.device).expand(B, -1)
            b_dest = torch.zeros(B, tb, dtype=torch.long, device=m.device).scatter(1, unm2, slots).scatter(1, src2, node_idx2.gather(1, src2))
            b_keep = unm2 * 2 + 1
        else:
            b_dest = torch.arange(nu, nu + tb, device=m.device).expand(B, -1)
            b_keep = torch.arange(1, T, 2, device=m.device).expand(B, -1)
        a_dest = torch.zeros(B, ta, dtype=torch.long, device=m.device)
        a_dest = a_dest.scatter(1, unm, torch.arange(nu, device=m.device).expand(B, -1)).scatter(1, src, b_dest.gather(1, dst))
        dest = torch.cat([a_dest, b_dest], dim=1).gather(1, _interleave(T, m.device).expand(B, -1))
        keep = torch.cat([unm * 2, b_keep], dim=1)
        if p > 1:  # prefix tokens first, in their order (one prefix token is already slot 0)
            rank = torch.where(keep < p, keep, p + torch.arange(keep.shape[1], device=m.device).expand(B, -1))
            order = rank.argsort(dim=1)
            dest = order.argsort(dim=1).gather(1, dest)
            keep = keep.gather(1, order)
    return dest, keep


def _interleave(t: int, device: torch.device) -> Tensor:
    """(1, t) index into [even positions, odd positions] that restores sequence order."""
    return torch.cat([torch.arange(0, t, 2, device=device), torch.arange(1, t, 2, device=device)]).argsort()[None]


def _pool_tokens(values: Tensor, dest: Tensor, n: int, dim: int, reduce: str = "sum") -> Tensor:
    """Sum (or max) of `values` over the tokens that share a slot, along `dim` (the token axis)."""
    shape = [1] * values.dim()
    shape[0], shape[dim] = dest.shape[0], dest.shape[1]
    index = dest.reshape(shape).expand(values.shape)
    out_shape = list(values.shape)
    out_shape[dim] = n
    out = values.new_zeros(out_shape)
    if reduce == "sum":
        return out.scatter_add(dim, index, values)
    return out.scatter_reduce(dim, index, values, reduce="amax", include_self=False)


def merge(state: TokenState, attn: Tensor, r: int, options: MCTFOptions, ahead: bool) -> tuple[TokenState, float]:
    """Merge r tokens of `state` (its x is also the metric) by `match`, with `attn` (B, H, T, T) the
    attention of these tokens. Returns the merged state (with the merged attention as its
    `next_attention` when `ahead`) and the matching MACs per image."""
    x, p = state.x, state.num_prefix
    B, T, D = x.shape
    size = state.size if state.size is not None else x.new_ones(B, T)
    received = attn.mean(dim=(1, 2))  # (B, T) attention each token receives, over heads and queries
    dest, keep = match(x, received, state.size, r, p, options)
    n = T - r
    new_size = _pool_tokens(size, dest, n, 1)
    merged_attn = None
    if options.pooling_type == 2:
        new_x = _pool_tokens(x, dest, n, 1, "amax")
        if ahead:
            merged_attn = _pool_tokens(_pool_tokens(attn, dest, n, 3), dest, n, 2, "amax")
    else:
        if options.pooling_type == 1:
            w = received * (size.float() / size.float().amax(dim=1, keepdim=True))
        else:
            w = size.float() if options.pooling_type == 0 else torch.ones_like(received)
        norm = _pool_tokens(w, dest, n, 1)
        new_x = (_pool_tokens(x * w[..., None].to(x.dtype), dest, n, 1) / norm[..., None].to(x.dtype))
        if ahead:
            keys = _pool_tokens(attn, dest, n, 3)
            merged_attn = _pool_tokens(keys * w[:, None, :, None], dest, n, 2) / norm[:, None, :, None]
    every = torch.arange(T, device=x.device).expand(B, -1)  # each token joins the one whose identity its slot keeps
    new = state.replace(x=new_x, size=new_size, patch_ids=state.patch_ids.gather(1, keep), extras={}, next_attention=merged_attn,
                        history=state.merged(every, keep.gather(1, dest)))
    ta, tb = (T + 1) // 2, T // 2
    macs = ta * tb * D + (attn.shape[1] * T * n if ahead else 0)
    return new, float(macs)


class MCTF(Method):
    name = "mctf"

    def __init__(self, model: nn.Module, options: MCTFOptions):
        super().__init__(model, options)
        depth = model.cfg.depth
        self.layers = tuple(range(1, depth)) if options.activate_layer == "auto" else parse_stages(options.activate_layer, "--activate-layer")
        check_stages_in_range(self.layers, depth, flag="--activate-layer")

    def _merges(self, index: int) -> bool:
        return self.options.active and index in self.layers

    def needs_probs(self, index: int) -> bool:
        return self.options.one_step_ahead == 0 and self._merges(index)

    def begin(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> TokenState:
        if not self.options.active:
            return state
        if state.key_mask is not None or state.policy is not None:
            raise ConfigError("mctf needs equal token counts per image (no padding, no policy)")
        return state.replace(size=torch.ones(state.x.shape[:2], dtype=state.x.dtype, device=state.x.device))

    def before_block(self, index: int, state: TokenState, record: ExecutionRecord) -> TokenState:
        if self.options.one_step_ahead == 0 or not self._merges(index):
            return state
        r = layer_r(self.options, state.width, state.num_prefix)
        if r <= 0:
            return state
        block, cfg = self.model.blocks[index], self.model.cfg
        bias = state.size.log()[:, None, None, :].to(state.x.dtype)
        ahead = self.options.one_step_ahead == 1
        attn = attention_probs(block.attn, block.norm1(state.x), bias)
        if not ahead:  # "precise": the reference takes it under no_grad, then recomputes attention
            attn = attn.detach()
        new, macs = merge(state, attn, r, self.options, ahead)
        t, n, d = state.width, new.width, cfg.embed_dim
        extra = 2 * t * d**2 + t**2 * d  # q, k and q k^T on the tokens before the merge
        if ahead:  # the block then runs only v and the projection, and A' v, on the merged tokens
            extra -= 2 * n * d**2 + n**2 * d
        record.add_macs(macs + extra)
        return new

    def after_block(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        if self.options.one_step_ahead != 0 or not self._merges(index):
            return state
        r = layer_r(self.options, state.width, state.num_prefix)
        if r <= 0:
            return state
        new, macs = merge(state, info.probs, r, self.options, ahead=False)
        record.add_macs(macs)
        return new

    def token_map(self, out: RunOutput) -> TokenMap | None:
        return merged_token_map(out, self.model.cfg.num_patches)


register("mctf", lambda model, opts: MCTF(model, opts), MCTFOptions,
         "MCTF: multi-criteria (similarity, attention, size) bidirectional token fusion with one-step-ahead attention (training-free)",
         label="MCTF", kind="reducer")
