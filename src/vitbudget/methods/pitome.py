"""PiToMe (Tran et al., NeurIPS 2024): merge by energy, keeping isolated tokens apart.

Follows hchautran/PiToMe at 550b5de (`algo/pitome/merge.py` `pitome_vision`, `pitome`,
`pitome_bsm`, `merge_wavg`; `algo/pitome/patch/deit.py` and `timm.py`), the code behind the
paper's image-classification numbers (`main_ic.py --algo pitome`). In every block, between the
attention residual and the MLP:

* the metric is the block's keys averaged over heads, of the T patch tokens (prefix dropped),
  L2-normalised; `sim` is their T x T cosine similarity (self-similarity included);
* energy_i = mean_j ELU(sim_ij - margin_l, alpha): a token in a dense cluster of similar tokens
  has high energy; the margin falls linearly with depth, margin_l = margin * (1 - l / depth)
  (the reference's 0.75 - 0.75 * l / L);
* r = floor(T - T * ratio) tokens merge away per block (the reference's ratio, 0.9125 default
  in main_ic.py);
* tokens are sorted by energy, highest first. In a *PiToMe* block the 2r highest-energy tokens
  are mergeable and the rest are protected: the mergeable ones alternate into A and B (energy
  ranks 0, 2, 4... and 1, 3, 5...), every A token merges into its most similar B token, and the
  result is [prefix, protected (energy order), B]. In a *BSM* block (the reference's
  `pitome_bsm`), all tokens alternate into A and B by energy rank and ToMe's bipartite soft
  matching merges the r best-matched A tokens: [prefix, unmerged A (match order), B]. The DeiT
  patch runs BSM in the first ceil(depth / 2) blocks and PiToMe in the rest (`--bsm-half
  first`); its MAE patch the other way round (`--bsm-half last`); `--bsm-half none` runs PiToMe
  in every block;
* merging is ToMe's size-weighted average (x * size and size summed, then divided).

Where the reference is ambiguous or narrower, and what is done here:

* It tracks sizes but never passes them to attention (`PiToMeBlock.forward` calls `self.attn`
  without `size`; its `prop_attn` flag is unused): no proportional attention is the default.
  `--prop-attn true` adds ToMe's log(size) bias, a documented deviation.
* It drops only the class token from the metric (a distillation token would be merged); here
  every prefix token (CLS, distillation, registers) is dropped and kept in front in its order.
  With one CLS this is the reference exactly.
* The paper's text calls high-energy tokens the ones to merge; so does the code (merge_idx =
  the first 2r of the energy order). Low-energy (isolated, informative) tokens are protected.
* The reference's `alpha` is `--energy-alpha` here: `--alpha` is ABS's refined fraction, and a
  stack (`pitome+abs`) needs every option name to say which part it belongs to.
* `ratio` below 0.5 would ask the PiToMe step for more than T/2 pairs (the reference then fails
  on shapes): a ConfigError here.

Training-free. ratio = 1 is exactly the baseline (the reference returns before merging). A block
where r = 0 (few tokens left) is left as it is: the reference would only reorder the tokens (BSM)
or fail on an empty maximum (PiToMe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.attention import AttentionInfo
from ..runtime.runner import ExecutionRecord, RunOutput
from ..runtime.state import TokenState
from ..runtime.token_map import TokenMap
from .base import Method
from .registry import register
from .tome import merged_token_map, sizes_of, with_sizes

BSM_HALVES = ("first", "last", "none")


@dataclass(frozen=True)
class PiToMeOptions:
    ratio: float = field(default=0.9125, metadata={"help": "pitome: fraction of patch tokens kept per block (r = floor(T - T*ratio) merge away)"})
    margin: float = field(default=0.75, metadata={"help": "pitome: energy margin in block 0, falling linearly to 0 at the last block"})
    energy_alpha: float = field(default=1.0, metadata={"help": "pitome: ELU alpha of the energy score (the reference's alpha)"})
    bsm_half: str = field(default="first", metadata={"help": "pitome: blocks that use bipartite matching over energy order: first (DeiT patch), last (MAE patch), none"})
    prop_attn: bool = field(default=False, metadata={"help": "pitome: add log(size) to attention logits (the reference does not)"})

    def __post_init__(self) -> None:
        if not 0.5 <= self.ratio <= 1.0:
            raise ConfigError(f"--ratio must be in [0.5, 1] (fraction of tokens kept per block), got {self.ratio}")
        if not self.energy_alpha > 0:
            raise ConfigError(f"--energy-alpha must be > 0 (ELU alpha), got {self.energy_alpha}")
        if self.bsm_half not in BSM_HALVES:
            raise ConfigError(f"--bsm-half must be one of {', '.join(BSM_HALVES)}, got {self.bsm_half!r}")


def energy_merge(state: TokenState, metric: Tensor, r: int, margin: float, alpha: float, bsm: bool, prop_attn: bool) -> tuple[TokenState, float]:
    """One PiToMe (or energy-ordered BSM) step on an unpadded state; returns it and the scoring MACs per image."""
    p = state.num_prefix
    x = state.x
    B, N, D = x.shape
    with torch.no_grad():
        m = F.normalize(metric[:, p:], p=2, dim=-1)
        T = m.shape[1]
        sim = m @ m.transpose(1, 2)
        energy = F.elu(sim - margin, alpha=alpha).mean(dim=-1)
        ranks = torch.argsort(energy, dim=-1, descending=True)
        if bsm:
            a, b = ranks[:, ::2], ranks[:, 1::2]
            scores = sim.gather(1, a[..., None].expand(-1, -1, T)).gather(2, b[:, None].expand(-1, a.shape[1], -1))
            node_max, node_idx = scores.max(dim=-1)
            order = node_max.argsort(dim=-1, descending=True)
            src, unm = a.gather(1, order[:, :r]), a.gather(1, order[:, r:])
            dst = b.gather(1, node_idx.gather(1, order[:, :r]))
            keep = torch.cat([unm, b], dim=1)
        else:
            a, b, protected = ranks[:, : 2 * r : 2], ranks[:, 1 : 2 * r : 2], ranks[:, 2 * r :]
            scores = sim.gather(1, a[..., None].expand(-1, -1, T)).gather(2, b[:, None].expand(-1, r, -1))
            src, dst = a, b.gather(1, scores.argmax(dim=-1))
            keep = torch.cat([protected, b], dim=1)
        src, dst, keep = src + p, dst + p, keep + p  # positions in the whole sequence
        keep = torch.cat([torch.arange(p, device=x.device).expand(B, -1), keep], dim=1)
    size = sizes_of(state)
    weighted = x * size[..., None]
    weighted = weighted.scatter_add(1, dst[..., None].expand(-1, -1, D), weighted.gather(1, src[..., None].expand(-1, -1, D)))
    size = size.scatter_add(1, dst, size.gather(1, src))
    new_size = size.gather(1, keep)
    new_x = weighted.gather(1, keep[..., None].expand(-1, -1, D)) / new_size[..., None]
    if p:
        new_x[:, :p] = x[:, :p]
    new = with_sizes(state, new_size, prop_attn, x=new_x, patch_ids=state.patch_ids.gather(1, keep), history=state.merged(src, dst))
    return new, float(T * T * m.shape[-1])


class PiToMe(Method):
    name = "pitome"

    def __init__(self, model: nn.Module, options: PiToMeOptions):
        super().__init__(model, options)
        depth = len(model.blocks)
        first_bsm = math.ceil(depth * 0.5)
        self.bsm = {"first": [i < first_bsm for i in range(depth)], "last": [i >= depth - first_bsm for i in range(depth)],
                    "none": [False] * depth}[options.bsm_half]
        # the reference's per-layer margins: .75 - .75 * (i / num_layers)
        self.margins = [options.margin - options.margin * (i / depth) for i in range(depth)]

    def needs_keys(self, index: int) -> bool:
        return self.options.ratio < 1.0

    def begin(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> TokenState:
        if self.options.ratio < 1.0 and (state.key_mask is not None or state.policy is not None):
            raise ConfigError("pitome needs equal token counts per image (no padding, no policy)")
        return state

    def after_attention(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        if self.options.ratio >= 1.0:
            return state
        T = state.width - state.num_prefix
        r = math.floor(T - T * self.options.ratio)  # the reference's expression, float for float
        if r <= 0:  # the reference would only reorder (BSM) or fail on an empty max (PiToMe)
            return state
        o = self.options
        new, macs = energy_merge(state, info.keys.mean(dim=1), r, self.margins[index], o.energy_alpha, self.bsm[index], o.prop_attn)
        record.add_macs(macs)
        return new

    def token_map(self, out: RunOutput) -> TokenMap | None:
        return merged_token_map(out, self.model.cfg.num_patches)


register("pitome", lambda model, opts: PiToMe(model, opts), PiToMeOptions,
         "PiToMe: energy-ordered merging that protects isolated tokens, size-weighted average (training-free)",
         label="PiToMe", kind="reducer")
