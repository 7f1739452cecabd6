"""SPOT (redundant token detection from attention dynamics) and its non-learned heuristic.

SPOT's predictor sees, per head and per patch token still kept, D^A = [A(CLS->t), A(t->CLS), row
mean, column mean, row variance, column variance of the non-CLS block] of the attention of the
block just before the stage, the same statistics of the running mean D^M and running variance
D^Sigma of the attention maps of all blocks so far (restricted to kept tokens), and the token
embedding remapped to d_remap and split local / global (DynamicViT's predictor when the
attention features are removed). Training and inference are DynamicViT's (see predictor.py),
except the predictor's hidden widths follow its input width E (E/2, E/4: what the paper's
predictor GFLOPs imply) and the optional token loss is 1 - cosine (the paper's eq. 14).

Beyond the paper: the statistics are scaled to O(1) before the MLP (probabilities and means
times the number of kept tokens, variances times its square), so that a uniform attention row
reads 1 whatever the token count; the paper feeds them raw.

Ablations (the paper's Table 2): `no_means` drops the row and column means from all three
sources, `no_variances` the row and column variances, `no_dynamics` D^M and D^Sigma; Table 7:
`d_remap` 0 and the heuristic below; Table 8: `head_average`, `shared_predictor`.

Cost: the running statistics need the attention probabilities of every block before the last
stage (blocks 0..8 for stages 3,6,9), so those blocks run an explicit softmax instead of fused
SDPA; the element-wise work (running second moment, variances) is added to the FLOPs.
The running sums are per-token extras (B, N, H, N): rows travel with `gather`, and the column
axis is gathered with the same index at each stage (`predictor.gather_tokens`).

Keep counts follow DynamicViT's setup, which SPOT adopts: int(N * rho^k) patches at stage k
(`predictor.truncated_keep_count`), N the model's patch count; the heuristic uses the same.

`spot_heuristic` (SPOT's Table 7): no predictor; keep the top int(N * rho^k) tokens by CLS
attention averaged over heads and over all blocks so far.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..errors import ConfigError
from ..runtime.token_map import TokenMap
from ..runtime.attention import AttentionInfo
from ..runtime.runner import ExecutionRecord, RunOutput
from ..runtime.state import TokenState
from .base import Method
from .dynamicvit import DynamicViTOptions
from .predictor import (PredictorMethod, StagedOptions, check_stages_in_range, drop_stage_map, note_drops, parse_stages,
                        resolve_d_remap, top_index, truncated_keep_count)
from .registry import register


@dataclass(frozen=True)
class SPOTOptions(DynamicViTOptions):
    token_distill: float = field(default=0.0, metadata={"help": "dynamicvit/spot: weight of the token loss on final kept tokens vs the teacher's (dynamicvit: MSE, 0.5; spot: 1 - cosine, 0)"})
    no_means: bool = field(default=False, metadata={"help": "spot ablation (Table 2): drop the row and column means from D^A, D^M and D^Sigma"})
    no_variances: bool = field(default=False, metadata={"help": "spot ablation (Table 2): drop the row and column variances from D^A, D^M and D^Sigma"})
    no_dynamics: bool = field(default=False, metadata={"help": "spot ablation (Table 2): drop D^M and D^Sigma (only the previous block's attention)"})
    d_remap: float = field(default=1.0, metadata={"help": "spot: token-embedding remap width: a fraction of the embed dim (1 = D, 0.5 = D/2, 0 = no embedding) or a width > 1"})
    head_average: bool = field(default=False, metadata={"help": "spot ablation: average the attention statistics over heads"})
    shared_predictor: bool = field(default=False, metadata={"help": "spot ablation: one predictor shared by all stages"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_remap < 0 or self.d_remap != self.d_remap:
            raise ConfigError(f"--d-remap must be >= 0, got {self.d_remap}")


class SPOT(PredictorMethod):
    name = "spot"
    token_loss = "cosine"

    def __init__(self, model: nn.Module, options: SPOTOptions):
        super().__init__(model, options)
        self.sources = ("A",) if options.no_dynamics else ("A", "M", "S")
        dropped = ({2, 3} if options.no_means else set()) | ({4, 5} if options.no_variances else set())
        self.setup(d_remap=resolve_d_remap(options.d_remap, model.cfg.embed_dim), head_average=options.head_average,
                   shared=options.shared_predictor, stats=tuple(i for i in range(6) if i not in dropped))


@dataclass(frozen=True)
class HeuristicOptions(StagedOptions):
    """The heuristic's options are exactly the shared rho and stages."""


class SPOTHeuristic(Method):
    """Training-free: CLS attention averaged over heads and blocks so far, top int(N rho^k) kept before each stage."""

    name = "spot_heuristic"

    def __init__(self, model: nn.Module, options: HeuristicOptions):
        super().__init__(model, options)
        cfg = model.cfg
        if not cfg.class_token:
            raise ConfigError("spot_heuristic ranks tokens by CLS attention; this model has no class token")
        self.stages = parse_stages(options.stages)
        check_stages_in_range(self.stages, cfg.depth, first=1)
        self.counts = [truncated_keep_count(options.rho ** (k + 1), cfg.num_patches) for k in range(len(self.stages))]
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
         "SPOT: learned predictors on token embeddings + attention statistics and their running mean/variance (needs training)",
         label="SPOT", kind="reducer", trains=True, recipe="spot_cifar10")
register("spot_heuristic", lambda model, opts: SPOTHeuristic(model, opts), HeuristicOptions,
         "SPOT's Table-7 heuristic: keep tokens by CLS attention averaged over heads and blocks so far (training-free)",
         label="SPOT heuristic", kind="reducer")
