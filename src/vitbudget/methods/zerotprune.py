"""Zero-TPrune (Wang, Dedhia & Jha, CVPR 2024): training-free pruning from the attention graph.

No official code is public. Sources, formula by formula (what each one rests on):

* **I-stage, weighted PageRank (WPR)** [paper, sec. 3 / Algorithm 1; the first author's early code
  `Hongjiew/Transformer_pruning` `tokenrank_vit.py`, `get_importance`, commented-out loop
  `dist = dist @ M`]: per head h, A_h (N x N, rows = queries, rows sum to 1) is the adjacency matrix
  of the attention graph; s^0 = 1/N for every token (CLS included) and s^(t+1) = A_h^T s^t, i.e.
  s_i <- sum_j s_j A_h[j, i]: a token is important when important tokens attend to it. A fixed
  number of iterations `wpr_iters` (the paper iterates to convergence; fixed counts keep shapes and
  control flow static). `auto`: 30 in the first three blocks, 1 in the last three, 5 otherwise
  [paper's reported best ranges, 30-50 / 5-10 / 1, via a paper summary; low ends taken].
* **EIR aggregation** [paper; the same early code `mean(dist.pow(2), dim=1).pow(0.5)`]: a token's
  importance is the root mean square of its per-head scores (`eir false`: the plain mean).
* **VHF, variance-based head filter** [paper; thresholds [0.01, 0.7] via the summary]: heads whose
  score variance lies outside [`vhf_min`, `vhf_max`] are left out of the aggregation. AMBIGUOUS: the
  scale the variance is taken on. Raw scores sum to 1, so their variance is below 1/N and every head
  would fail a 0.01 floor; here the variance of N * s (unit mean) is used, on which a uniform head
  has 0 and a one-token head about N. If no head passes, all heads are used (also not specified).
* **S-stage, similarity** [paper sec. 3; partition/feature/metric names as in the ablations that the
  student re-implementation `MahdiarKhodabakhshi/Zero-TPrune` lists: "Seq", "Alt"; "Key"; "Cos"]:
  the patch tokens are split by importance into A (candidates) and B; each A token's score is its
  highest cosine similarity (keys averaged over heads, as ToMe) to any B token; the most similar A
  tokens are pruned (dropped, never merged: the paper avoids merging). `partition seq`: A = the
  less important half, B = the more important half; `alt`: tokens ranked by importance go
  alternately to B and A (B gets the most important). AMBIGUOUS: the paper's default partition and
  how the pruned tokens split between the S- and I-stage; `s_fraction` (default 0.5) of each
  stage's drops go to the S-stage, the rest to the I-stage.
* **Order in a pruning block** [paper, via the summary: "I'-stage -> S-stage -> I-stage"]: WPR
  ranks the tokens (I'), the S-stage drops similar ones, the I-stage drops the least important of
  the rest by the same scores (not re-ranked on the remaining graph: AMBIGUOUS).
* **Where and how much** [DeiT-S, 34.7 % fewer FLOPs in the paper; the early code prunes after the
  block's MLP and keeps int(n * retain_rate) of the n patch tokens]: `stages` 3,6,9 and `rho` 0.7,
  the EViT schedule, which gives that FLOPs saving on DeiT-S (0.65x); pruning acts at the END of each
  stage block (its MLP still runs on all tokens), keeping int(rho * n) patch tokens.

Prefix tokens (CLS, registers) take part in the graph (they are queries and keys) and are always
kept; only patch tokens are ranked. Kept tokens stay in their original order. FLOPs charge the WPR
iterations (iterations x H x N^2 per stage) and the similarity product (|A| x |B| x head_dim).
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
from .predictor import StagedOptions, check_stages_in_range, drop_stage_map, note_drops, parse_stages, top_index, truncated_keep_count
from .registry import register

PARTITIONS = ("seq", "alt")


@dataclass(frozen=True)
class ZeroTPruneOptions(StagedOptions):
    wpr_iters: str = field(default="auto", metadata={"help": "zerotprune: WPR iterations per stage, comma-separated, or auto (30 in the first three blocks, 1 in the last three, 5 between)"})
    eir: bool = field(default=True, metadata={"help": "zerotprune: aggregate heads by root mean square (EIR); false = mean"})
    vhf: bool = field(default=True, metadata={"help": "zerotprune: leave out heads whose score variance (unit-mean scores) is outside [vhf_min, vhf_max]"})
    vhf_min: float = field(default=0.01, metadata={"help": "zerotprune: lower variance bound of the head filter"})
    vhf_max: float = field(default=0.7, metadata={"help": "zerotprune: upper variance bound of the head filter"})
    s_fraction: float = field(default=0.5, metadata={"help": "zerotprune: fraction of each stage's dropped tokens chosen by similarity (S-stage); the rest by importance"})
    partition: str = field(default="seq", metadata={"help": "zerotprune: S-stage split by importance: seq (less important half vs the rest) or alt (alternate ranks)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.s_fraction <= 1.0:
            raise ConfigError(f"--s-fraction must be in [0, 1], got {self.s_fraction}")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"--partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if not 0.0 <= self.vhf_min <= self.vhf_max:
            raise ConfigError(f"--vhf-min and --vhf-max must satisfy 0 <= min <= max, got {self.vhf_min}, {self.vhf_max}")
        if self.wpr_iters != "auto":
            _parse_iters(self.wpr_iters)


def _parse_iters(text: str) -> tuple[int, ...]:
    try:
        iters = tuple(int(s) for s in text.replace(" ", "").split(",") if s)
    except ValueError:
        raise ConfigError(f"--wpr-iters takes 'auto' or comma-separated counts like '30,5,1', got {text!r}") from None
    if not iters or any(i < 1 for i in iters):
        raise ConfigError(f"--wpr-iters counts must be >= 1, got {text!r}")
    return iters


def auto_iterations(index: int, depth: int) -> int:
    """The paper's best WPR iteration counts by depth: early blocks need many, late blocks one."""
    return 30 if index < 3 else 1 if index >= depth - 3 else 5


def wpr(attn: Tensor, iterations: int) -> Tensor:
    """(B, H, N) weighted PageRank per head: s <- A^T s from the uniform distribution."""
    B, H, N, _ = attn.shape
    s = attn.new_full((B, H, 1, N), 1.0 / N)
    for _ in range(iterations):
        s = s @ attn
    return s[:, :, 0]


def aggregate(scores: Tensor, options: ZeroTPruneOptions) -> Tensor:
    """(B, N) token importance from per-head scores (B, H, N): EIR (root mean square) over the heads VHF keeps."""
    keep = torch.ones(scores.shape[:2], dtype=scores.dtype, device=scores.device)
    if options.vhf:
        var = (scores * scores.shape[-1]).var(dim=-1, unbiased=False)
        keep = ((var >= options.vhf_min) & (var <= options.vhf_max)).to(scores.dtype)
        keep = torch.where(keep.sum(dim=1, keepdim=True) > 0, keep, torch.ones_like(keep))  # no head passes: all
    w = keep[..., None] / keep.sum(dim=1)[:, None, None]
    if options.eir:
        return ((scores * scores) * w).sum(dim=1).sqrt()
    return (scores * w).sum(dim=1)


def similar_drops(importance: Tensor, metric: Tensor, count: int, partition: str) -> Tensor:
    """(B, count) indices (into the n patch tokens) the S-stage drops: A tokens most similar to B."""
    n = importance.shape[1]
    ranked = importance.argsort(dim=1, descending=True)  # most important first
    if partition == "seq":
        b_idx, a_idx = ranked[:, : n - n // 2], ranked[:, n - n // 2 :]
    else:
        b_idx, a_idx = ranked[:, 0::2], ranked[:, 1::2]
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    d = m.shape[-1]
    a = m.gather(1, a_idx[..., None].expand(-1, -1, d))
    b = m.gather(1, b_idx[..., None].expand(-1, -1, d))
    best = (a @ b.transpose(1, 2)).amax(dim=-1)
    return a_idx.gather(1, best.topk(count, dim=1).indices)


class ZeroTPrune(Method):
    name = "zerotprune"

    def __init__(self, model: nn.Module, options: ZeroTPruneOptions):
        super().__init__(model, options)
        depth = model.cfg.depth
        self.stages = parse_stages(options.stages)
        check_stages_in_range(self.stages, depth)
        if options.wpr_iters == "auto":
            self.iterations = tuple(auto_iterations(s, depth) for s in self.stages)
        else:
            self.iterations = _parse_iters(options.wpr_iters)
            if len(self.iterations) != len(self.stages):
                raise ConfigError(f"--wpr-iters gives {len(self.iterations)} counts for {len(self.stages)} stages ({options.stages})")
        self.active = options.rho < 1.0

    def needs_probs(self, index: int) -> bool:
        return self.active and index in self.stages

    def needs_keys(self, index: int) -> bool:
        return self.needs_probs(index) and self.options.s_fraction > 0

    def after_block(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        if not self.needs_probs(index):
            return state
        if state.key_mask is not None or state.policy is not None:
            raise ConfigError("zerotprune needs equal token counts per image (no padding, no policy)")
        p, n = state.num_prefix, state.width - state.num_prefix
        k = truncated_keep_count(self.options.rho, n)
        drops = n - k
        if drops <= 0:
            return state
        stage = self.stages.index(index)
        attn = info.probs
        _, H, N, _ = attn.shape
        iterations = self.iterations[stage]
        importance = aggregate(wpr(attn, iterations), self.options)[:, p:]  # I'-stage: rank only
        macs = iterations * H * N * N
        s_drops = min(round(self.options.s_fraction * drops), n // 2)
        if s_drops > 0:  # S-stage: the dropped get -inf importance, so the I-stage keeps the k best of the rest
            metric = info.keys.mean(dim=1)[:, p:]
            dropped = similar_drops(importance, metric, s_drops, self.options.partition)
            importance = importance.scatter(1, dropped, float("-inf"))
            macs += (n // 2) * (n - n // 2) * metric.shape[-1]  # |A| x |B| x head_dim (both partitions)
        new = state.gather(top_index(state, importance, k))  # I-stage
        record.add_macs(float(macs))
        note_drops(record, state, new, stage + 1, self.model.cfg.num_patches, len(self.stages))
        return new

    def token_map(self, out: RunOutput) -> TokenMap | None:
        return drop_stage_map(out)


register("zerotprune", lambda model, opts: ZeroTPrune(model, opts), ZeroTPruneOptions,
         "Zero-TPrune: prune by weighted PageRank on the attention graph and by key similarity, blocks 3/6/9 (training-free)",
         label="Zero-TPrune", kind="reducer")
