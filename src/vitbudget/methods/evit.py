"""EViT (Liang et al., ICLR 2022): keep the tokens the CLS token attends to most.

What `youweiliang/evit` (`evit.py`) computes: inside each block of `stages` (0-based 3, 6, 9),
between the attention residual and the MLP, the top ceil(rho * (N - 1)) of the current non-CLS
tokens by CLS attention (averaged over heads) are kept; N - 1 counts a fused token of an
earlier stage, which competes like any other. With `fuse`, the dropped ones become one extra
token at the end: the sum of their features weighted by their raw CLS attention (EViT's
"inattentive token fusion": no division, the weights sum to the attention mass dropped).
`fuse_normalize` divides by that mass instead (a weighted average; not the reference).

Kept tokens stay in their original order, where the reference orders them by score. Attention,
the MLP and the CLS readout are permutation-equivariant, so this changes no logit (beyond float
summation order); it keeps `patch_ids` in grid order for the token maps. Generalised to several
prefix tokens (registers): all of them are kept, and the CLS attention ranks the others.
No parameters: training-free, and also fine-tunable since pruning is a plain gather.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from ..runtime.token_map import TokenMap
from ..runtime.attention import AttentionInfo
from ..runtime.runner import ExecutionRecord, RunOutput
from ..runtime.state import TokenState
from .base import Method
from .predictor import StagedOptions, check_stages_in_range, drop_stage_map, keep_count, note_drops, parse_stages, top_index
from .registry import register


@dataclass(frozen=True)
class EViTOptions(StagedOptions):
    fuse: bool = field(default=False, metadata={"help": "evit: fuse the dropped tokens into one token, their features summed with their CLS attention as weights (the reference)"})
    fuse_normalize: bool = field(default=False, metadata={"help": "evit: divide the fused token by the dropped attention mass (a weighted average; not the reference)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fuse_normalize and not self.fuse:
            raise ConfigError("--fuse-normalize applies to the fused token: pass --fuse true as well")


class EViT(Method):
    name = "evit"

    def __init__(self, model: nn.Module, options: EViTOptions):
        super().__init__(model, options)
        cfg = model.cfg
        if not cfg.class_token:
            raise ConfigError("evit ranks tokens by CLS attention; this model has no class token")
        self.stages = parse_stages(options.stages)
        check_stages_in_range(self.stages, cfg.depth)
        self.active = options.rho < 1.0

    def needs_probs(self, index: int) -> bool:
        return self.active and index in self.stages

    def after_attention(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        if not self.needs_probs(index):
            return state
        p = state.num_prefix
        n = state.width - p
        k = keep_count(self.options.rho, n)
        if k >= n:
            return state
        cls = info.probs[:, :, 0, p:].mean(dim=1)  # (B, n)
        index_ = top_index(state, cls, k)
        new = state.gather(index_)
        if self.options.fuse:
            dropped = torch.ones_like(cls, dtype=torch.bool).scatter(1, index_[:, p:] - p, False)
            w = cls * dropped
            if self.options.fuse_normalize:
                w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
            fused = (state.x[:, p:] * w[..., None]).sum(dim=1, keepdim=True)
            ids = torch.full_like(new.patch_ids[:, :1], -1)
            extras = {name: torch.cat([t, t[:, :1]], 1) for name, t in new.extras.items()}
            new = new.replace(x=torch.cat([new.x, fused], 1), patch_ids=torch.cat([new.patch_ids, ids], 1), extras=extras)
        note_drops(record, state, new, self.stages.index(index) + 1, self.model.cfg.num_patches, len(self.stages))
        return new

    def token_map(self, out: RunOutput) -> TokenMap | None:
        return drop_stage_map(out)


register("evit", lambda model, opts: EViT(model, opts), EViTOptions,
         "EViT: keep the top rho of tokens by CLS attention inside blocks 3/6/9, optionally fuse the rest into one token (training-free)",
         label="EViT", kind="reducer")
