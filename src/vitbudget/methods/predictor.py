"""Shared machinery of the pruning methods: stage parsing, drop tracking, attention statistics,
and the learned keep/drop predictor that DynamicViT and SPOT share.

DynamicViT is the predictor on token embeddings only; SPOT adds attention-map statistics of the
block just before each stage and of the running mean / variance of attention over all blocks so
far. Training uses hard Gumbel-softmax masks applied through `TokenState.policy` (masked
softmax, dense compute, gradients reach the predictors); inference keeps the top
int(N * rho^k) tokens by keep score, N the model's patch count, as DynamicViT's reference
(`int(init_n * token_ratio[k])`: 137, 96, 67 of 196 at rho 0.7), and really removes the others
(fixed counts: batched). EViT rounds up instead (`keep_count`): the rule is per method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed
from ..errors import ConfigError
from ..runtime.token_map import TokenMap
from ..runtime.attention import AttentionInfo
from ..runtime.runner import ExecutionRecord, RunOutput
from ..runtime.state import TokenState
from .base import Method

# per-token tensors whose LAST axis is also a token axis (attention columns): gathered on both axes
COLUMN_EXTRAS_SUFFIX = "@cols"


# -- options helpers ---------------------------------------------------------------------------
def parse_stages(text: str | Sequence[int], flag: str = "--stages") -> tuple[int, ...]:
    """'3,6,9' or (3, 6, 9) (from Python) -> (3, 6, 9); non-negative, strictly increasing, at least one."""
    try:
        if isinstance(text, (list, tuple)):
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in text):
                raise ValueError
            stages = tuple(text)
        else:
            stages = tuple(int(s) for s in str(text).replace(" ", "").split(",") if s != "")
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated block indices like '3,6,9', got {text!r}") from None
    if not stages:
        raise ConfigError(f"{flag} needs at least one block index, got {text!r}")
    if any(s < 0 for s in stages):
        raise ConfigError(f"{flag} block indices must be >= 0, got {text!r}")
    if any(b <= a for a, b in zip(stages, stages[1:])):
        raise ConfigError(f"{flag} must be strictly increasing, got {text!r}")
    return stages


def check_stages_in_range(stages: Sequence[int], depth: int, first: int = 0, flag: str = "--stages") -> None:
    bad = [s for s in stages if not first <= s < depth]
    if bad:
        raise ConfigError(f"{flag} {','.join(map(str, stages))}: block indices {bad} are outside [{first}, {depth - 1}] for this {depth}-block model")


def check_rho(rho: float) -> None:
    if not 0.0 < rho <= 1.0:  # also rejects NaN
        raise ConfigError(f"--rho must be in (0, 1] (a keep ratio), got {rho}")


def keep_count(fraction: float, n: int) -> int:
    """EViT's rule: ceil(fraction * n) of the float product, as its reference computes it
    (`math.ceil(keep_rate * (N - 1))`: 0.7 * 64 = 44.8 -> 45, 0.5 * 64 -> 32, and also
    0.56 * 25 = 14.000000000000002 -> 15), at least 1."""
    return max(1, min(n, math.ceil(fraction * n)))


def truncated_keep_count(ratio: float, n: int) -> int:
    """DynamicViT's rule: int(n * ratio), with `ratio` = rho ** k as a Python float, computed as its
    reference does (196 at rho 0.7: 137, 96, 67; 64: 44, 31, 21), so the same float noise truncates
    the same way. At least 1, where the reference would keep no patch at all."""
    return max(1, min(n, int(n * ratio)))


# -- bookkeeping shared by all pruning methods ---------------------------------------------------
def note_drops(record: ExecutionRecord, before: TokenState, after: TokenState, stage_no: int, num_patches: int, num_stages: int) -> None:
    """record.aux['drop_stage'] (B, P): the stage (1..K) at which each patch was dropped; K+1 = kept to the end."""
    if "drop_stage" not in record.aux:
        record.aux["drop_stage"] = torch.full((before.batch_size, num_patches), float(num_stages + 1))
        record.aux["num_stages"] = num_stages
    ones_b = torch.ones(before.patch_ids.shape, dtype=torch.float32, device=before.x.device)
    ones_a = torch.ones(after.patch_ids.shape, dtype=torch.float32, device=after.x.device)
    was = before.to_patch_grid(ones_b, num_patches, fill=0.0).cpu() > 0
    now = after.to_patch_grid(ones_a, num_patches, fill=0.0).cpu() > 0
    record.aux["drop_stage"][was & ~now] = float(stage_no)


def drop_stage_map(out: RunOutput) -> TokenMap | None:
    values = out.record.aux.get("drop_stage")
    if values is None:
        return None
    k = out.record.aux["num_stages"]
    return TokenMap(values=values, label=f"stage at which the token was dropped ({k + 1} = kept)", vmin=1, vmax=k + 1)


def gather_tokens(state: TokenState, index: Tensor) -> TokenState:
    """state.gather(index), and extras named '*@cols' (B, N, ..., N) gathered along their last axis too."""
    new = state.gather(index)
    extras = dict(new.extras)
    for name, t in extras.items():
        if name.endswith(COLUMN_EXTRAS_SUFFIX):
            idx = index.reshape(index.shape[0], *([1] * (t.dim() - 2)), index.shape[1]).expand(*t.shape[:-1], index.shape[1])
            extras[name] = t.gather(-1, idx)
    return new.replace(extras=extras)


def top_index(state: TokenState, scores: Tensor, k: int) -> Tensor:
    """(B, prefix + k) token indices: the prefix, then the k best patches in their current order."""
    top = scores.topk(k, dim=1).indices.sort(dim=1).values + state.num_prefix
    prefix = torch.arange(state.num_prefix, device=top.device).expand(top.shape[0], -1)
    return torch.cat([prefix, top], dim=1)


# -- attention statistics (SPOT, eqs. 3-9) --------------------------------------------------------
def attention_stats(attn: Tensor, keep: Tensor | None = None, num_prefix: int = 1) -> Tensor:
    """D^A of SPOT for each head and patch token: (..., B, N_p, H, 6) raw statistics.

    attn: (..., B, H, N, N) attention (or a running mean / variance map of it; leading axes, e.g.
    several maps stacked, are carried along); row 0 is the CLS token.
    keep: (B, N_p) 0/1 mask of patch tokens still kept (masked training path); None = all present.
    Features: [A(CLS->t), A(t->CLS), row mean, column mean, row variance, column variance] of the
    non-CLS block, rows and columns restricted to kept tokens (population variance, eq. 7-8).
    """
    p = num_prefix
    cls_out = attn[..., 0, p:]  # (..., B, H, Np)
    cls_in = attn[..., p:, 0]
    block = attn[..., p:, p:]  # (..., B, H, Np, Np): [t, j] = t attends to j
    if keep is None:  # two passes with means: torch.var along a strided axis is ~10x slower on the CPU
        row_mean, col_mean = block.mean(-1), block.mean(-2)
        row_var = (block - row_mean[..., None]).square_().mean(-1)
        col_var = (block - col_mean[..., None, :]).square_().mean(-2)
    else:
        m = keep.to(attn.dtype)
        n = m.sum(-1).clamp_min(1.0)[:, None, None]  # (B, 1, 1)
        mc = m[:, None, None, :]  # over columns j
        mr = m[:, None, :, None]  # over rows i
        row_mean = (block * mc).sum(-1) / n
        col_mean = (block * mr).sum(-2) / n
        row_var = (((block - row_mean[..., None]) ** 2) * mc).sum(-1) / n
        col_var = (((block - col_mean[..., None, :]) ** 2) * mr).sum(-2) / n
    stats = torch.stack([cls_out, cls_in, row_mean, col_mean, row_var, col_var], dim=-1)  # (..., B, H, Np, 6)
    return stats.transpose(-3, -2)


def stats_scale(n: Tensor | float, dtype=torch.float32, device=None) -> Tensor:
    """Scale attention statistics to O(1): probabilities and means by N (1 = uniform), variances by N^2."""
    n = torch.as_tensor(n, dtype=dtype, device=device)
    return torch.stack([n, n, n, n, n * n, n * n], dim=-1)


# -- the predictor ------------------------------------------------------------------------------
class TokenPredictor(nn.Module):
    """Keep/drop logits per patch token.

    Embedding part (d_remap > 0): LayerNorm -> Linear(C, d_remap) -> GELU; the first half is local,
    the second half averaged over kept tokens is global (DynamicViT). Attention features (SPOT)
    are concatenated, giving E inputs. Then Linear(E, E/2) -> GELU -> Linear(E/2, E/4) -> GELU ->
    Linear(E/4, 2), log-softmax; index 0 = keep. For DynamicViT E = C, its reference's C/2, C/4;
    for SPOT the widths follow E: only then do the predictor GFLOPs the SPOT paper reports fit
    (DeiT-T 0.032 G; DeiT-S 0.129 G, 0.106 G head-averaged, < 0.01 G with d_remap = 0).
    """

    def __init__(self, dim: int, d_remap: int, att_features: int):
        super().__init__()
        self.dim, self.d_remap, self.att_features = dim, d_remap, att_features
        if d_remap:
            self.norm = nn.LayerNorm(dim)
            self.remap = nn.Linear(dim, d_remap)
        e = d_remap + att_features
        h1, h2 = max(e // 2, 2), max(e // 4, 2)
        self.widths = (e, h1, h2, 2)
        self.mlp = nn.Sequential(nn.Linear(self.widths[0], h1), nn.GELU(), nn.Linear(h1, h2), nn.GELU(), nn.Linear(h2, 2))

    def forward(self, x: Tensor, att: Tensor | None, policy: Tensor | None) -> Tensor:
        """x: (B, Np, C) patch tokens; att: (B, Np, F) or None; policy: (B, Np) kept mask or None."""
        parts = []
        if self.d_remap:
            z = F.gelu(self.remap(self.norm(x)))
            local, glob = z.chunk(2, dim=-1)
            if policy is None:
                g = glob.mean(dim=1, keepdim=True)
            else:
                w = policy[..., None].to(glob.dtype)
                g = (glob * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
            parts += [local, g.expand(-1, x.shape[1], -1)]
        if self.att_features:
            parts.append(att)
        return self.mlp(torch.cat(parts, dim=-1)).log_softmax(dim=-1)

    def macs(self, n: float) -> float:
        """Multiply-adds of the Linear layers for n tokens (what FlopCounterMode counts, halved)."""
        w = self.widths
        remap = self.dim * self.d_remap if self.d_remap else 0
        return float(n * (remap + w[0] * w[1] + w[1] * w[2] + w[2] * w[3]))


def resolve_d_remap(value: float, dim: int) -> int:
    """d_remap as given: 0 = no embedding, a fraction in (0, 1] of C, or an absolute width > 1."""
    if value < 0 or value != value:
        raise ConfigError(f"--d-remap must be >= 0 (0, a fraction of the embedding dim, or a width), got {value}")
    width = round(value * dim) if value <= 1 else int(value)
    if value > 1 and value != int(value):
        raise ConfigError(f"--d-remap above 1 is a width and must be an integer, got {value}")
    if width and (width < 2 or width % 2):
        raise ConfigError(f"--d-remap gives width {width}; it must be even (local and global halves), or 0")
    return width


class PredictorMethod(Method):
    """Learned token pruning at `stages` with keep ratios rho^k (DynamicViT; SPOT adds attention features).

    Subclasses set `sources` (which attention maps feed the predictor: 'A' the previous block,
    'M' running mean, 'S' running variance) and call `setup` with `d_remap`, `head_average` and
    `stats`, the indices into attention_stats' six statistics that are fed (SPOT's Table 2
    ablations drop the row/column means 2, 3 or variances 4, 5 from every source).
    """

    sources: tuple[str, ...] = ()
    token_loss = "mse"  # distance between final kept tokens and the teacher's: "mse" (DynamicViT) or "cosine" (SPOT)

    def setup(self, d_remap: int, head_average: bool, shared: bool, stats: tuple[int, ...] = tuple(range(6))) -> None:
        cfg = self.model.cfg
        if not cfg.class_token:
            raise ConfigError(f"{self.name} reads the CLS token (readout and attention features); this model has none")
        opts = self.options
        self.stages = parse_stages(opts.stages)
        check_stages_in_range(self.stages, cfg.depth, first=1 if self.sources else 0)
        self.num_patches = cfg.num_patches
        self.ratios = [opts.rho ** (k + 1) for k in range(len(self.stages))]
        self.counts = [truncated_keep_count(r, cfg.num_patches) for r in self.ratios]
        self.head_average = head_average
        self.stats = stats
        heads = 1 if head_average else cfg.num_heads
        att = len(stats) * len(self.sources) * heads
        n_pred = 1 if shared else len(self.stages)
        self.predictors = nn.ModuleList(TokenPredictor(cfg.embed_dim, d_remap, att) for _ in range(n_pred))
        self.fixed_keep: list[Tensor] | None = None  # tests: patch ids to keep per stage on the masked path
        self.capture = False  # tests: keep raw statistics and attention maps in record.aux

    # -- which path --
    @property
    def masked(self) -> bool:
        """Training (or fixed masks): dense compute with a policy mask; otherwise real removal."""
        return self.training or self.fixed_keep is not None

    @property
    def active(self) -> bool:
        return self.masked or any(c < self.num_patches for c in self.counts)

    def predictor(self, k: int) -> TokenPredictor:
        return self.predictors[0 if len(self.predictors) == 1 else k]

    # -- running attention statistics (SPOT) --
    @property
    def dynamics(self) -> bool:
        return "M" in self.sources or "S" in self.sources

    def needs_probs(self, index: int) -> bool:
        if not self.sources or not self.active:
            return False
        if self.dynamics:
            return index < self.stages[-1]
        return index + 1 in self.stages

    def after_block(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        if not self.needs_probs(index):
            return state
        rows = info.probs.detach().transpose(1, 2)  # (B, N, H, N): token rows first so gather() moves them
        extras = dict(state.extras)
        if self.capture:
            record.aux.setdefault("probs", []).append((info.probs.detach().clone(), state.patch_ids.clone()))
        b, n, h, _ = rows.shape
        if self.dynamics:  # running sums, accumulated in place: this method made them (first block, or a stage's gather)
            s1, s2 = extras.get("spot_s1" + COLUMN_EXTRAS_SUFFIX), extras.get("spot_s2" + COLUMN_EXTRAS_SUFFIX)
            extras["spot_s1" + COLUMN_EXTRAS_SUFFIX] = rows.clone(memory_format=torch.contiguous_format) if s1 is None else s1.add_(rows)
            extras["spot_s2" + COLUMN_EXTRAS_SUFFIX] = rows * rows if s2 is None else s2.addcmul_(rows, rows)
            record.add_macs(float(h * n * n))  # the square-and-add of the running second moment
        if index + 1 in self.stages:
            extras["spot_last" + COLUMN_EXTRAS_SUFFIX] = rows
        return state.replace(extras=extras)

    def attention_features(self, index: int, state: TokenState, keep: Tensor | None, record: ExecutionRecord) -> Tensor | None:
        """(B, Np, F) scaled SPOT features for the stage before block `index`."""
        if not self.sources:
            return None
        ex, p = state.extras, state.num_prefix
        maps = {}
        if "A" in self.sources:
            maps["A"] = ex["spot_last" + COLUMN_EXTRAS_SUFFIX]
        if self.dynamics:
            mean = ex["spot_s1" + COLUMN_EXTRAS_SUFFIX] / index  # blocks 0..index-1
            if "M" in self.sources:
                maps["M"] = mean
            if "S" in self.sources:
                maps["S"] = (ex["spot_s2" + COLUMN_EXTRAS_SUFFIX] / index - mean * mean).clamp_min(0)
        if keep is None:
            scale = stats_scale(float(state.width - p), state.x.dtype, state.x.device)  # (6,)
        else:
            scale = stats_scale(keep.sum(-1).clamp_min(1).to(state.x.dtype), state.x.dtype)[:, None, None, :]  # (B, 1, 1, 6)
        # all sources in one pass (few ops matter at batch 1): (S, B, Np, H, 6)
        stats = attention_stats(torch.stack([maps[name] for name in self.sources]).transpose(2, 3), keep, p)
        if self.capture:
            raw = dict(zip(self.sources, stats.unbind(0)))
            record.aux.setdefault("spot_stats", []).append({"patch_ids": state.patch_ids[:, p:].clone(), "keep": keep, **raw})
        if self.head_average:
            stats = stats.mean(dim=3, keepdim=True)
        stats = stats * scale
        if len(self.stats) < 6:
            stats = stats[..., list(self.stats)]
        h, npt = maps[self.sources[0]].shape[2], state.width - p
        if 4 in self.stats or 5 in self.stats:
            record.add_macs(float(len(self.sources) * 2 * h * npt * npt))  # squared deviations for row and column variances
        return stats.permute(1, 2, 3, 0, 4).flatten(2)  # (B, Np, H * S * stats): per head, per source, per statistic

    # -- stages --
    def before_block(self, index: int, state: TokenState, record: ExecutionRecord) -> TokenState:
        if index not in self.stages or not self.active:
            return state
        k = self.stages.index(index)
        p = state.num_prefix
        prev = None if state.policy is None else state.policy[:, p:]
        att = self.attention_features(index, state, prev if self.masked else None, record)
        logp = self.predictor(k)(state.x[:, p:], att, prev if self.masked else None)
        record.add_macs(self.predictor(k).macs(state.width - p))
        if self.masked:
            state = self._mask_stage(k, state, logp, prev, record)
        else:
            before = state
            index_ = top_index(state, logp[..., 0], self.counts[k])
            state = gather_tokens(state, index_)
            record.aux.setdefault("kept_ids", []).append(state.patch_ids[:, p:].clone())
            note_drops(record, before, state, k + 1, self.num_patches, len(self.stages))
        if k == len(self.stages) - 1:  # running maps are not needed after the last stage
            state = state.replace(extras={n: t for n, t in state.extras.items() if not n.startswith("spot_")})
        return state

    def _mask_stage(self, k: int, state: TokenState, logp: Tensor, prev: Tensor | None, record: ExecutionRecord) -> TokenState:
        p = state.num_prefix
        if self.fixed_keep is not None:
            ids = self.fixed_keep[k].to(state.patch_ids.device)
            hard = (state.patch_ids[:, p:, None] == ids[:, None, :]).any(-1).to(state.x.dtype)
        else:
            hard = F.gumbel_softmax(logp, tau=1.0, hard=True)[..., 0]
        keep = hard if prev is None else hard * prev  # monotone: once dropped, dropped for good
        record.aux.setdefault("decisions", []).append(keep)
        policy = torch.cat([torch.ones_like(keep[:, :p]) if p else keep[:, :0], keep], dim=1)
        return state.mask(policy)

    def finish(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> Tensor:
        if state.policy is None:
            return super().finish(model, state, record)
        mask = state.policy > 0.5
        if state.key_mask is not None:
            mask = mask & state.key_mask
        return model.forward_head(model.norm(state.x), mask)

    # -- training losses --
    def extra_losses(self, out: RunOutput, targets: Tensor, teacher: RunOutput | None) -> dict[str, Tensor]:
        decisions = out.record.aux.get("decisions")
        losses: dict[str, Tensor] = {}
        if not decisions:
            return losses
        rate = sum(((d.mean(dim=1) - r) ** 2).mean() for d, r in zip(decisions, self.ratios)) / len(decisions)
        losses["rate"] = self.options.rate_weight * rate
        if self.options.token_distill and teacher is not None and out.state.policy is not None:
            p = out.state.num_prefix
            mask = out.state.policy[:, p:] > 0.5
            student = self.model.norm(out.state.x[:, p:][mask])
            target = teacher.record.aux["final_tokens"][:, p:][mask]
            # a mean over kept tokens, whose number varies per image: over all ranks' tokens under torchrun
            if self.token_loss == "cosine":  # SPOT eq. 14: 1 - cos over the retained tokens
                total, count = (1 - F.cosine_similarity(student, target, dim=-1)).sum(), student.shape[0]
            else:  # MSE over the elements of the retained tokens
                total, count = (student - target).square().sum(), student.numel()
            count = distributed.global_sum(torch.tensor(float(count), device=total.device))
            if count > 0:
                losses["token_distill"] = self.options.token_distill * distributed.global_sum(total) / count
        return losses

    def token_map(self, out: RunOutput) -> TokenMap | None:
        return drop_stage_map(out)


@dataclass(frozen=True)
class StagedOptions:
    """Options every stage-wise pruning method shares (EViT, DynamicViT, SPOT and its heuristic)."""

    rho: float = field(default=0.7, metadata={"help": "evit/dynamicvit/spot/spot_heuristic: keep ratio per stage in (0, 1] (learned methods keep rho^k of the patches at stage k)"})
    stages: str = field(default="3,6,9", metadata={"help": "evit/dynamicvit/spot/spot_heuristic: comma-separated 0-based block indices where tokens are pruned"})

    def __post_init__(self) -> None:
        check_rho(self.rho)
        parse_stages(self.stages)
