"""SPOT (redundant token detection from attention dynamics) and its non-learned heuristic.

SPOT's predictor sees, per head and per patch token still kept, D^A = [A(CLS->t), A(t->CLS), row
mean, column mean, row variance, column variance of the non-CLS block] of the attention of the
block just before the stage, the same statistics of the running mean D^M and running variance
D^Sigma of the attention maps of all blocks so far (restricted to kept tokens), and the token
embedding remapped to d_remap and split local / global (DynamicViT's predictor when the
attention features are removed). Training and inference are DynamicViT's (see predictor.py).

Cost: the running statistics need the attention probabilities of every block before the last
stage (blocks 0..8 for stages 3,6,9), so those blocks run an explicit softmax instead of fused
SDPA; the element-wise work (running second moment, variances) is added to the FLOPs.
The running sums are per-token extras (B, N, H, N): rows travel with `gather`, and the column
axis is gathered with the same index at each stage (`predictor.gather_tokens`).

`spot_heuristic` (SPOT's Table 7): no predictor; keep the top ceil(rho^k N) tokens by CLS
attention averaged over heads and over all blocks so far.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..report.token_maps import TokenMap
from ..runtime.attention import AttentionInfo
from ..runtime.runner import ExecutionRecord, RunOutput
from ..runtime.state import TokenState
from .base import Method
from .dynamicvit import DynamicViTOptions
from .predictor import (PredictorMethod, StagedOptions, check_stages_in_range, drop_stage_map, keep_count, note_drops,
                        parse_stages, resolve_d_remap, top_index)
from .registry import register


@dataclass(frozen=True)
class SPOTOptions(DynamicViTOptions):
    token_distill: float = field(default=0.0, metadata={"help": "dynamicvit/spot: weight of the MSE between final kept tokens and the teacher's (dynamicvit 0.5, spot 0)"})
    no_means: bool = field(default=False, metadata={"help": "spot ablation: drop the running-mean statistics D^M"})
    no_variances: bool = field(default=False, metadata={"help": "spot ablation: drop the running-variance statistics D^Sigma"})
    no_dynamics: bool = field(default=False, metadata={"help": "spot ablation: drop D^M and D^Sigma (only the previous block's attention)"})
    d_remap: float = field(default=1.0, metadata={"help": "spot: token-embedding remap width: a fraction of the embed dim (1 = D, 0.5 = D/2, 0 = no embedding) or a width > 1"})
    head_average: bool = field(default=False, metadata={"help": "spot ablation: average the attention statistics over heads"})
    shared_predictor: bool = field(default=False, metadata={"help": "spot ablation: one predictor shared by all stages"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_remap < 0 or self.d_remap != self.d_remap:
            raise ConfigError(f"--d-remap must be >= 0, got {self.d_remap}")


class SPOT(PredictorMethod):
    name = "spot"

    def __init__(self, model: nn.Module, options: SPOTOptions):
        super().__init__(model, options)
        sources = ["A"]
        if not options.no_dynamics:
            if not options.no_means:
                sources.append("M")
            if not options.no_variances:
                sources.append("S")
        self.sources = tuple(sources)
        self.setup(d_remap=resolve_d_remap(options.d_remap, model.cfg.embed_dim), head_average=options.head_average,
                   shared=options.shared_predictor)


@dataclass(frozen=True)
class HeuristicOptions(StagedOptions):
    """The heuristic's options are exactly the shared rho and stages."""


class SPOTHeuristic(Method):
    """Training-free: CLS attention averaged over heads and blocks so far, top ceil(rho^k N) kept before each stage."""

    name = "spot_heuristic"

    def __init__(self, model: nn.Module, options: HeuristicOptions):
        super().__init__(model, options)
        cfg = model.cfg
        if not cfg.class_token:
            raise ConfigError("spot_heuristic ranks tokens by CLS attention; this model has no class token")
        self.stages = parse_stages(options.stages)
        check_stages_in_range(self.stages, cfg.depth, first=1)
        self.counts = [keep_count(options.rho ** (k + 1), cfg.num_patches) for k in range(len(self.stages))]
        self.active = any(c < cfg.num_patches for c in self.counts)

    def needs_probs(self, index: int) -> bool:
        return self.active and index < self.stages[-1]

    def after_block(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        if not self.needs_probs(index):
            return state
        cls = info.probs[:, :, 0, :].mean(dim=1)  # (B, N) head-averaged CLS attention to every token
        prev = state.extras.get("cls_attn_sum")
        return state.replace(extras={**state.extras, "cls_attn_sum": cls if prev is None else prev + cls})

    def before_block(self, index: int, state: TokenState, record: ExecutionRecord) -> TokenState:
        if not self.active or index not in self.stages:
            return state
        k = self.stages.index(index)
        score = state.extras["cls_attn_sum"][:, state.num_prefix :] / index
        new = state.gather(top_index(state, score, self.counts[k]))
        note_drops(record, state, new, k + 1, self.model.cfg.num_patches, len(self.stages))
        if k == len(self.stages) - 1:
            new = new.replace(extras={n: t for n, t in new.extras.items() if n != "cls_attn_sum"})
        return new

    def token_map(self, out: RunOutput) -> TokenMap | None:
        return drop_stage_map(out)


register("spot", lambda model, opts: SPOT(model, opts), SPOTOptions,
         "SPOT: learned predictors on token embeddings + attention statistics and their running mean/variance (needs training)")
register("spot_heuristic", lambda model, opts: SPOTHeuristic(model, opts), HeuristicOptions,
         "SPOT's Table-7 heuristic: keep tokens by CLS attention averaged over heads and blocks so far (training-free)")
