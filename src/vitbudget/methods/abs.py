"""ABS, Attention Budget Scheduling: one extra block refines only the top-k patch tokens.

After the model's last block, patch tokens are scored (entropy of a random shallow head on the
penultimate block, last-block CLS-attention variance across heads, feature norm, or random: a
per-image random choice, see `ABS.random_scores`),
the prefix tokens plus the k = round(alpha * N) best patches go through one extra transformer
block initialised as a copy of the last block, and the refined tokens are scattered back into
their positions before the final norm and head. Post-hoc: nothing is trained.

Prefix tokens (CLS and registers) are always refined alongside the selection, so the extra
block costs block_macs(k + prefix). A model without a class token (global_pool='avg') refines
its registers, if any, and the selected patches; the scatter-back changes the pooled patches.
`attnvar` needs a CLS query and is rejected for such models. A model without a head
(num_classes=0, a feature extractor) has no class count for the entropy head: it uses as many
random outputs as the embedding width.

The method's own tensors are post hoc: the extra block starts as a copy of the backbone's last
block (`post_hoc = True`: any ViT checkpoint serves; a tuned variant would save its block), and
the entropy head is regenerated from `seed`, so it is a non-persistent buffer.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from ..runtime.cost import block_macs
from ..runtime.grid import FINAL_TOKENS
from ..runtime.token_map import TokenMap
from ..runtime.attention import AttentionInfo, multihead_attention
from ..runtime.runner import ExecutionRecord, RunOutput
from ..runtime.state import TokenState
from .base import Method
from .registry import register

SCORES = ("entropy", "attnvar", "gradsim", "random")
HASH_MODULUS = 2**31 - 1  # a prime: key * a_j < 2^62 stays exact in int64


def round_half_up(x: float) -> int:
    """Python's round() rounds halves to even (round(2.5) == 2); budgets should not."""
    return math.floor(x + 0.5)


def apply_extra_block(block: nn.Module, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """A block outside the model's stack, through its own submodules as `runner.run_block` does.

    It never touches an ExecutionRecord: token lists there mean the model's own blocks, so
    callers add the extra block's cost with `record.add_macs(block_macs(n, cfg))`.
    """
    attn_out, _ = multihead_attention(block.attn, block.norm1(x), key_mask=key_mask)
    x = x + block.drop_path1(block.ls1(attn_out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


@dataclass(frozen=True)
class ABSOptions:
    alpha: float = field(default=0.2, metadata={"help": "abs: fraction of patch tokens refined by the extra block, in [0, 1]"})
    score: str = field(default="entropy", metadata={"help": f"abs: token scorer, one of {', '.join(SCORES)}"})
    seed: int = field(default=0, metadata={"help": "abs: seed of the random entropy head and of the random scorer"})
    hidden: int = field(default=0, metadata={"help": "abs: hidden width of the entropy head (0 = embed dim)"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:  # also rejects NaN
            raise ConfigError(f"--alpha must be in [0, 1] (a fraction of patch tokens), got {self.alpha}")
        if self.score not in SCORES:
            raise ConfigError(f"--score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.hidden < 0:
            raise ConfigError(f"--hidden must be >= 0 (0 = embed dim), got {self.hidden}")


class ABS(Method):
    """Scores tokens in hooks, refines the top-k in `finish`; k = 0 is exactly the baseline."""

    name = "abs"
    post_hoc = True  # own tensors are initialised from the backbone, not trained

    def __init__(self, model: nn.Module, options: ABSOptions):
        super().__init__(model, options)
        cfg = model.cfg
        self.k = round_half_up(options.alpha * cfg.num_patches)
        if options.score == "attnvar" and not cfg.class_token:
            raise ConfigError("--score attnvar needs a class token (it reads CLS-to-token attention); this model has none")
        if options.score == "entropy" and cfg.depth < 2:
            raise ConfigError("--score entropy reads the penultimate block; the model needs depth >= 2")
        self.drawn: Tensor | None = None  # random scorer: this run's per-image draw (`per_image_draw`), else None
        self.block = copy.deepcopy(model.blocks[-1])  # a submodule: a tuned variant can train it
        self.hidden = options.hidden or cfg.embed_dim
        self.head_classes = cfg.num_classes or cfg.embed_dim  # a headless backbone: embed_dim random outputs
        if options.score == "entropy":
            self._init_entropy_head(cfg.embed_dim, self.hidden, self.head_classes, options.seed)
        if options.score == "random":  # the hash's constants, from `seed` (see `random_scores`)
            g = torch.Generator().manual_seed(options.seed)
            pixels = cfg.in_chans * cfg.img_size * cfg.img_size
            self.register_buffer("pixel_weights", torch.randint(1, 2**20, (pixels,), generator=g), persistent=False)
            self.register_buffer("position_hash", torch.randint(1, HASH_MODULUS, (2, cfg.num_patches), generator=g), persistent=False)

    def _init_entropy_head(self, dim: int, hidden: int, classes: int, seed: int) -> None:
        """nn.Linear's default init from a local generator: buffers (never trained, moved by .to()),
        non-persistent because `seed` regenerates them."""
        g = torch.Generator().manual_seed(seed)
        for name, (fan_in, fan_out) in {"1": (dim, hidden), "2": (hidden, classes)}.items():
            bound = 1.0 / math.sqrt(fan_in)
            self.register_buffer(f"head_w{name}", (torch.rand(fan_out, fan_in, generator=g) * 2 - 1) * bound, persistent=False)
            self.register_buffer(f"head_b{name}", (torch.rand(fan_out, generator=g) * 2 - 1) * bound, persistent=False)

    def forward(self, images: Tensor) -> RunOutput:
        with self.per_image_draw(images):
            return super().forward(images)

    @contextlib.contextmanager
    def per_image_draw(self, images: Tensor) -> Iterator[None]:
        """Random scorer: this batch's per-image draw, read by `begin` (and a stack), for one run only."""
        self.drawn = self.random_scores(images) if self.k > 0 and self.options.score == "random" else None
        try:
            yield
        finally:
            self.drawn = None

    def begin(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> TokenState:
        return state if self.drawn is None else state.replace(extras={**state.extras, "abs_score": self.drawn})

    def random_scores(self, images: Tensor) -> Tensor:
        """(B, N) uniform-looking scores in [0, 1), drawn per image: the paper's Random row is a per-image choice.

        A seeded hash of the image, in integer tensor ops so exported and compiled programs keep
        it: pixels quantised to 1/1024, an exact int64 weighted sum into a key (mod a prime), then
        per position ((key * a_j + b_j) mod p) / p with random a_j, b_j. Exact integer sums do
        not depend on reduction order, so a draw depends on the image and `seed` only: not on
        the batch an image is in nor on its position (batched equals one-by-one); different
        images and seeds draw different positions. Byte-identical images draw the same ones.
        """
        b = images.shape[0]
        q = torch.round(images.detach().float().reshape(b, -1).clamp(-1e6, 1e6) * 1024).long()
        if q.shape[1] != self.pixel_weights.numel():
            raise InputError(f"abs --score random: images of {q.shape[1]} values, the model takes {self.pixel_weights.numel()}")
        key = torch.remainder((q * self.pixel_weights).sum(dim=1, keepdim=True), HASH_MODULUS)  # |q*w| < 2^51: exact
        a, c = self.position_hash
        return torch.remainder(key * a + c, HASH_MODULUS).double().div(HASH_MODULUS).float()

    # -- scoring, stashed in state.extras so it travels with the tokens --
    def needs_probs(self, index: int) -> bool:
        return self.k > 0 and self.options.score == "attnvar" and index == self.model.cfg.depth - 1

    def after_block(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        if self.k == 0:
            return state
        depth, p = self.model.cfg.depth, state.num_prefix
        score = None
        if self.options.score == "entropy" and index == depth - 2:
            h = F.relu(F.linear(state.x[:, p:], self.head_w1, self.head_b1))
            logp = F.linear(h, self.head_w2, self.head_b2).float().log_softmax(dim=-1)
            score = -(logp.exp() * logp).sum(dim=-1)
        elif self.options.score == "attnvar" and index == depth - 1:
            score = info.probs[:, :, 0, p:].float().var(dim=1, unbiased=False)  # CLS query, over heads
        return state if score is None else state.replace(extras={**state.extras, "abs_score": score})

    def scores(self, state: TokenState) -> Tensor:
        """(B, N) patch scores, higher = refined."""
        kind, p = self.options.score, state.num_prefix
        if kind in ("entropy", "attnvar"):
            return state.extras["abs_score"]
        if kind == "gradsim":
            return state.x[:, p:].float().norm(dim=-1)
        return state.extras["abs_score"]  # random: drawn per image before the run (`forward`)

    def scorer_macs(self, n: int) -> float:
        """Per-image overhead. attnvar: 0, the probabilities are the attention the block computes anyway."""
        cfg, kind = self.model.cfg, self.options.score
        if kind == "entropy":
            return float(n * (cfg.embed_dim * self.hidden + self.hidden * self.head_classes))
        return float(n * cfg.embed_dim) if kind == "gradsim" else 0.0

    def finish(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> Tensor:
        if self.k == 0:
            return super().finish(model, state, record)
        p, n = state.num_prefix, state.width - state.num_prefix
        scores = self.scores(state)
        selected = scores.topk(self.k, dim=1).indices.sort(dim=1).values  # (B, k) patch indices
        prefix = torch.arange(p, device=selected.device).expand(state.batch_size, -1)
        index = torch.cat([prefix, selected + p], dim=1)[..., None].expand(-1, -1, state.x.shape[-1])
        refined = apply_extra_block(self.block, state.x.gather(1, index))
        x = state.x.scatter(1, index, refined)
        record.add_macs(self.scorer_macs(n) + float(block_macs(self.k + p, model.cfg)))
        record.aux["abs_selected"] = selected.cpu()
        record.aux["abs_scores"] = scores.detach().float().cpu()
        record.aux[FINAL_TOKENS] = state.replace(x=x)
        return model.forward_head(model.norm(x), state.key_mask)

    def token_map(self, out: RunOutput) -> TokenMap | None:
        """Scores as the colour layer, refined patches outlined; None when nothing was refined (k = 0)."""
        if "abs_selected" not in out.record.aux:
            return None
        scores = out.record.aux["abs_scores"]
        outline = torch.zeros(scores.shape, dtype=torch.bool).scatter(1, out.record.aux["abs_selected"], True)
        return TokenMap(values=scores, outline=outline, label=f"{self.options.score} score (outlined: refined)")


register("abs", lambda model, opts: ABS(model, opts), ABSOptions,
         "ABS: one extra block (copy of the last) refines the top alpha of patch tokens post hoc",
         label="ABS", kind="refiner")
