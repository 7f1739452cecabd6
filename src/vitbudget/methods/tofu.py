"""ToFu (Kim et al., WACV 2024, "Token Fusion"): prune in early blocks, merge with MLERP late.

The paper published no code. This follows Westlake-AI/OpenToMe at 4b791cb
(`opentome/timm/tofu.py`, `opentome/tome/tome.py` `bipartite_soft_matching`, mode "tofu"),
which agrees with hchautran/PiToMe's `algo/tofu` (550b5de) on the merge maths and the layer
split, and takes r tokens per block like ToMe (PiToMe's copy takes a keep ratio instead, with T
counting the class token). In every block, between the attention residual and the MLP:

* ToMe's bipartite soft matching (methods.tome.bipartite_match: head-averaged keys, A = even
  positions, B = odd, prefix tokens protected, r = min(r, (tokens - prefix) // 2));
* blocks i <= depth // 2 *prune*: the r matched A tokens are dropped, nothing is averaged (the
  reference's 'prune' strategy, which its merge function falls through to [unmerged A, B]);
* later blocks *fuse* with the norm-preserving MLERP: a B token and the A tokens matched to it
  are averaged (unweighted mean, B included), then rescaled to the largest norm among them;
* result order [prefix, unmerged A (sorted), B], as ToMe.

Where the references are ambiguous, and what is done here:

* MLERP's divisor. The paper normalises the averaged vector by its own norm
  (mean / ||mean|| * max norm). Both re-implementations divide by the norm of the B token
  *before* averaging (`dst / dst_norm * n` with `dst_norm` taken before `scatter_reduce`). The
  default follows the code (`--mlerp reference`); `--mlerp paper` is the paper's formula.
* Proportional attention: both pass `prop_attn=True` but never track sizes (no `merge_wavg`),
  so attention is never biased and merges are not size-weighted. Same here. Sizes are counted
  only for the token picture (in extras, never in attention).

Training-free; r = 0 is exactly the baseline.
"""
from __future__ import annotations

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
from .tome import ToMeOptions, bipartite_match, merged_token_map, sizes_of, with_sizes

MLERP = ("reference", "paper")


@dataclass(frozen=True)
class ToFuOptions(ToMeOptions):
    mlerp: str = field(default="reference", metadata={"help": "tofu: MLERP divisor: reference (norm of the B token before fusing, as the code) or paper (norm of the fused mean)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mlerp not in MLERP:
            raise ConfigError(f"--mlerp must be one of {', '.join(MLERP)}, got {self.mlerp!r}")


def tofu_step(state: TokenState, metric: Tensor, r: int, fuse: bool, mlerp: str) -> tuple[TokenState, float]:
    """Prune (fuse=False) or MLERP-fuse the r matched A tokens into their B partners."""
    src, dst, keep, macs = bipartite_match(state, metric, r)
    size = sizes_of(state)
    size = size.scatter_add(1, dst, size.gather(1, src)).gather(1, keep)
    if not fuse:
        return with_sizes(state.gather(keep), size, False), macs
    x, p = state.x, state.num_prefix
    d = x.shape[-1]
    moved = x.gather(1, src[..., None].expand(-1, -1, d))
    summed = x.scatter_add(1, dst[..., None].expand(-1, -1, d), moved)
    count = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device).scatter_add(1, dst, torch.ones_like(dst, dtype=x.dtype))
    mean = summed / count[..., None]
    norm = x.norm(dim=-1)
    largest = norm.scatter_reduce(1, dst, moved.norm(dim=-1), reduce="amax")  # include_self: the B token's own norm
    divisor = norm if mlerp == "reference" else mean.norm(dim=-1)
    fused = mean / divisor[..., None] * largest[..., None]
    new_x = fused.gather(1, keep[..., None].expand(-1, -1, d))
    if p:  # prefix tokens are never fused: exactly themselves
        new_x[:, :p] = x[:, :p]
    return with_sizes(state, size, False, x=new_x, patch_ids=state.patch_ids.gather(1, keep), history=state.merged(src, dst)), macs


class ToFu(Method):
    name = "tofu"

    def __init__(self, model: nn.Module, options: ToFuOptions):
        super().__init__(model, options)
        n = model.cfg.num_patches
        if options.r > n // 2:
            raise ConfigError(f"--r {options.r} merges more than half of the {n} patch tokens per block (at most {n // 2})")
        self.last_prune = len(model.blocks) // 2  # the reference: 'tofu' if i > L // 2 else 'prune'

    def needs_keys(self, index: int) -> bool:
        return self.options.r > 0

    def begin(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> TokenState:
        if self.options.r > 0 and (state.key_mask is not None or state.policy is not None):
            raise ConfigError("tofu needs equal token counts per image (no padding, no policy)")
        return state

    def after_attention(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        r = min(self.options.r, (state.width - state.num_prefix) // 2)
        if r <= 0:
            return state
        new, macs = tofu_step(state, info.keys.mean(dim=1), r, index > self.last_prune, self.options.mlerp)
        record.add_macs(macs)
        return new

    def token_map(self, out: RunOutput) -> TokenMap | None:
        return merged_token_map(out, self.model.cfg.num_patches)


register("tofu", lambda model, opts: ToFu(model, opts), ToFuOptions,
         "ToFu: ToMe's matching; prune in the first half of the blocks, norm-preserving MLERP merge after (training-free)",
         label="ToFu", kind="reducer")
