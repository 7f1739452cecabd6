"""Method stacks: a token reducer, then ABS refinement of the tokens that survive it.

`compose(reducer, refiner)` (or the name `REDUCER+abs`, e.g. `tome+abs`) runs both on the one
block runner: the reducer's hooks act in every block as they would alone; ABS scores tokens where
it would alone (entropy after the penultimate block, attention variance in the last block) and,
in `finish`, one extra block (a copy of the last) refines the prefix plus the top α of the patch
tokens still there. What that means, precisely:

* **α counts survivors**: an image refines k = round_half_up(α · n) tokens, n = its patch tokens
  that reach the end (merged tokens count once; EViT's fused token counts as one; padding does
  not). So α = 0 is exactly the reducer, and a no-op reducer (n = N) is exactly ABS alone. An
  image with k = 0 is not refined at all (its CLS does not run the extra block either).
* **Tokens the scorer saw later changed** (ToMe merges inside the last block, after the entropy
  score was taken; EViT drops inside the last block after its attention gave `attnvar`): a token
  keeps the score of the token whose patch id it carries (a merged token: its destination's
  score), whatever the token counts. EViT's fused token is scored like any token, except when it
  was made after the scores were taken (it has no patch id to carry them by): it is not refined.
* **Merged tokens attend proportionally** in the extra block too (log size added to its attention
  logits), as the ToMe'd backbone's own blocks do; padded tokens are masked as keys.
* **FLOPs charge what ran**: per image the scorer on the tokens it scored plus
  block_macs(k + prefix) for the extra block, on top of the reducer's own executed tokens.
* **A-ViT** (`avit+abs`) halts tokens inside its own loop, and its readout is the halting-weighted
  sum of CLS states. The stack refines, per image, the tokens still running in the last block
  (an image whose CLS halted earlier has none: it is not refined), with that readout in the CLS
  slot; the head reads the refined readout. Scores come from those tokens' last-block outputs (A-ViT
  keeps no per-token penultimate state), so `--score attnvar`, which needs the last block's
  attention probabilities, is rejected for `avit+abs`. With `--halting false` the stack is ABS alone.
* **Training** trains the reducer (ABS is post hoc): in training mode a stack runs its reducer
  alone, and its losses are the reducer's. The extra block is re-copied from the backbone's last
  block when a trained stack returns to eval mode, so it is always "a copy of the last block".
  Checkpoints hold the reducer's parameters under `method.reducer.`; a trained reducer's own
  checkpoint loads as its stack and a stack's as its reducer (`checkpoint.load_method`).

Options are one flat set, each going to the part that has it (`--r 4 --alpha 0.2`); an option
both parts had would be ambiguous and makes the stack name a ConfigError.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..runtime.attention import AttentionInfo
from ..runtime.cost import block_macs
from ..runtime.grid import FINAL_TOKENS
from ..runtime.runner import NO_HOOKS, ExecutionRecord, RunOutput, run, run_block
from ..runtime.state import TokenState
from ..runtime.token_map import TokenMap
from .abs import ABS
from .avit import AViT
from .base import Method
from .registry import MethodSpec, get_spec, names_of, set_stack_resolver


ABS_SCORE = "abs_score"  # the extra in which ABS's hooks leave their (B, patch tokens) scores
TOKEN_SCORE = "stack_abs_score"  # the same scores per token (prefix -inf), so they travel with reductions
PRE_ATTENTION = "stack_pre_attention"  # the state a block's attention saw, when the reducer changed it after


class Stack(Method):
    """A token reducer followed by ABS on the survivors. Build with `compose` or `build_method('tome+abs', ...)`."""

    def __init__(self, model: nn.Module, reducer: Method, refiner: ABS, options: Any = None):
        super().__init__(model, options)
        if reducer.model is not model or refiner.model is not model:
            raise ConfigError("the parts of a stack must wrap the same model")
        self.reducer, self.refiner = reducer, refiner
        self.name = f"{reducer.name}+{refiner.name}"
        self.alpha = float(refiner.options.alpha)
        self.halting_reducer = isinstance(reducer, AViT)
        if self.halting_reducer and refiner.options.score == "attnvar":
            raise ConfigError("avit+abs: --score attnvar reads the last block's attention probabilities, which A-ViT's "
                              "inference does not materialise; use --score entropy, gradsim or random")
        self._backbone_trained = False
        self.train(False)  # a test-time method: built ready to evaluate; `.train()` trains the reducer

    # -- which path --
    @property
    def data_dependent_shapes(self) -> str | None:
        """The reducer's reason; after A-ViT (dense too) also the refined count, which follows the tokens still running."""
        if self.halting_reducer and self.reducer.options.halting and self.refining:
            return ("ABS refines the top alpha of the tokens A-ViT still runs in its last block, so how many it refines "
                    "depends on the pixels (dense or not); avit --dense true alone, or a fixed-count stack such as tome+abs, has fixed shapes")
        return self.reducer.data_dependent_shapes

    @property
    def refining(self) -> bool:
        return self.refiner.k > 0  # round(alpha * N) == 0 means round(alpha * n) == 0 for every n <= N

    def forward(self, images: Tensor) -> RunOutput:
        if self.training:  # the refiner is test-time only: training a stack trains its reducer
            return self.reducer(images)
        with self.refiner.per_image_draw(images):
            if self.halting_reducer and self.reducer.options.halting:
                return self._forward_halting(images)
            return run(self.model, images, self)

    def train(self, mode: bool = True) -> "Stack":
        super().train(mode)
        if mode:
            self._backbone_trained = True
        elif self._backbone_trained:  # the extra block is a copy of the last block as it is now
            self.refiner.block.load_state_dict(self.model.blocks[-1].state_dict())
            self._backbone_trained = False
        return self

    # -- hooks: the reducer's, with ABS scoring where it would alone --
    def needs_probs(self, index: int) -> bool:
        return self.reducer.needs_probs(index) or self.refiner.needs_probs(index)

    def needs_keys(self, index: int) -> bool:
        return self.reducer.needs_keys(index) or self.refiner.needs_keys(index)

    def begin(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> TokenState:
        state = _carry_scores(state, self.reducer.begin(model, state, record), model.cfg.num_patches)
        return state  # ABS's begin only stashes its random draw, which a stack reads by patch id (`_final_scores`)

    def before_block(self, index: int, state: TokenState, record: ExecutionRecord) -> TokenState:
        state = _carry_scores(state, self.reducer.before_block(index, state, record), self.model.cfg.num_patches)
        return self.refiner.before_block(index, state, record)

    def after_attention(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        new = self.reducer.after_attention(index, state, info, record)
        if new is not state and self.refining:
            record.aux[PRE_ATTENTION] = state  # attention-based scores of this block describe these tokens
        return self.refiner.after_attention(index, _carry_scores(state, new, self.model.cfg.num_patches), info, record)

    def after_block(self, index: int, state: TokenState, info: AttentionInfo, record: ExecutionRecord) -> TokenState:
        state = _carry_scores(state, self.reducer.after_block(index, state, info, record), self.model.cfg.num_patches)
        pre = record.aux.pop(PRE_ATTENTION, None)
        return self._take_scores(state, self.refiner.after_block(index, state, info, record), record, pre)

    def _take_scores(self, state: TokenState, scored: TokenState, record: ExecutionRecord, pre: TokenState | None = None) -> TokenState:
        """Move the (B, patch tokens) scores ABS just computed into a per-token extra of `state`."""
        if scored is state or ABS_SCORE not in scored.extras:
            return scored
        score, p = scored.extras[ABS_SCORE].float(), state.num_prefix
        attention_based = pre is not None and self.refiner.options.score == "attnvar"
        source = pre if attention_based else state  # the tokens the scores describe; carried by patch id
        if score.shape[1] != source.width - p:
            raise RuntimeError(f"ABS scored {score.shape[1]} tokens; the stack holds {state.width - p}")
        per_token = torch.cat([score.new_full((score.shape[0], p), float("-inf")), score], dim=1)
        if source is not state:
            per_token = _realign(source, state, per_token, self.model.cfg.num_patches)
        record.aux["stack_scored_tokens"] = _patch_counts(source)
        extras = {k: v for k, v in scored.extras.items() if k != ABS_SCORE}
        return state.replace(extras={**extras, TOKEN_SCORE: per_token})

    def finish(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> Tensor:
        if self.refining:
            state, macs, _ = self.refine(state, record)
            record.add_macs(macs)
            record.aux[FINAL_TOKENS] = state
        return self.reducer.finish(model, state, record)

    # -- the refinement itself --
    def refine(self, state: TokenState, record: ExecutionRecord) -> tuple[TokenState, Tensor, Tensor]:
        """The extra block on the prefix + top round(α·n) patch tokens of each image; returns the
        refined state, the FLOPs each image spent (scorer + extra block) and the refined patches (B, P)."""
        p, B, cfg, device = state.num_prefix, state.batch_size, self.model.cfg, state.x.device
        real = None if state.key_mask is None else state.key_mask[:, p:]
        n = _patch_counts(state)
        k = torch.floor(self.alpha * n.double() + 0.5).long()  # round half up, per image
        scored = record.aux.pop("stack_scored_tokens", None)
        tokens = state.extras.get(TOKEN_SCORE)
        scores = tokens[:, p:] if tokens is not None else self._final_scores(state)
        scorer = float(self.refiner.scorer_macs(1)) * (n if scored is None else scored).double().cpu()
        # without padding every image has the same n, so k is known from shapes alone (no host sync: compiles, exports)
        kmax = int(math.floor(self.alpha * (state.width - p) + 0.5)) if real is None else int(k.max())
        grid = torch.zeros(B, cfg.num_patches, dtype=torch.bool)
        if kmax == 0:
            return state, scorer, grid
        if real is not None:
            scores = scores.masked_fill(~real, float("-inf"))
        top = scores.topk(kmax, dim=1).indices  # best first
        chosen = torch.arange(kmax, device=device)[None] < k[:, None]
        position, order = top.sort(dim=1)  # in token order, as ABS alone
        chosen = chosen.gather(1, order)
        prefix = torch.arange(p, device=device).expand(B, -1)
        index = torch.cat([prefix, position + p], dim=1)
        refined_here = torch.cat([(k > 0)[:, None].expand(B, p), chosen], dim=1)
        key_mask = None  # unpadded: kmax > 0 here, so every image refines all kmax tokens
        if real is not None:  # images with nothing to refine run all-masked rows that are discarded; a row must attend to something
            key_mask = refined_here | ~refined_here.any(dim=1, keepdim=True)
            key_mask = None if bool(key_mask.all()) else key_mask
        sub = state.gather(index).replace(extras={}, policy=None, key_mask=key_mask)
        out = run_block(self.refiner.block, cfg.depth, sub, NO_HOOKS, ExecutionRecord(batch_size=B)).x
        out = torch.where(refined_here[..., None], out, sub.x)
        x = state.x.scatter(1, index[..., None].expand(-1, -1, state.x.shape[-1]), out)
        k = k.cpu()
        extra = torch.where(k > 0, block_macs((k + p).double(), cfg), torch.zeros((), dtype=torch.float64))
        ids = state.patch_ids[:, p:].gather(1, position)
        ids = torch.where(chosen & (ids >= 0), ids, torch.full_like(ids, -1)).cpu()  # original patch ids, -1 = none
        slot = torch.where(ids >= 0, ids, torch.full_like(ids, cfg.num_patches))
        grid = torch.zeros(B, cfg.num_patches + 1, dtype=torch.bool).scatter_(1, slot, True)[:, : cfg.num_patches]
        record.aux["abs_selected"] = ids
        record.aux["stack_refined"] = grid
        return state.replace(x=x), scorer + extra, grid

    def _final_scores(self, state: TokenState) -> Tensor:
        """Scores ABS takes from the final tokens. The random draw is indexed by original patch id, so it
        does not depend on where a reducer left a token (merged, compacted, padded); tokens without a
        patch id (EViT's fused token) are never drawn."""
        if self.refiner.options.score != "random":
            return self.refiner.scores(state).float()
        p = state.num_prefix
        draw = self.refiner.drawn.float()  # (B, P): one value per original patch (`ABS.per_image_draw`)
        ids = state.patch_ids[:, p:]
        return torch.where(ids >= 0, draw.gather(1, ids.clamp(min=0)), torch.full_like(ids, float("-inf"), dtype=draw.dtype))

    # -- A-ViT: refine after its own halting loop --
    def _forward_halting(self, images: Tensor) -> RunOutput:
        out = self.reducer(images)
        record = out.record
        last = record.aux.pop("avit_last", None)
        if not self.refining or last is None:  # nothing ran the last block: nothing to refine
            return out
        last_state, active = last
        B = record.batch_size
        rows = torch.arange(B, device=images.device) if active is None else active
        readout = out.state.x[:, 0]
        x = last_state.x.clone()
        x[:, 0] = readout.index_select(0, rows)  # the halting-weighted CLS takes the CLS slot
        tokens = TokenState(x=x, patch_ids=last_state.patch_ids, num_prefix=last_state.num_prefix, key_mask=last_state.key_mask,
                            batch_index=last_state.batch_index)
        if self.refiner.drawn is not None:  # the random draw of the images still running
            self.refiner.drawn = self.refiner.drawn.index_select(0, rows)
        tokens = self._take_scores(tokens, self.refiner.after_block(self.model.cfg.depth - 2, tokens, AttentionInfo(), record), record)
        refined, macs, grid = self.refine(tokens, record)
        rows_cpu = rows.cpu()
        record.add_macs(torch.zeros(B, dtype=torch.float64).index_copy(0, rows_cpu, macs))
        record.aux["stack_refined"] = torch.zeros(B, grid.shape[1], dtype=torch.bool).index_copy(0, rows_cpu, grid)
        if "abs_selected" in record.aux:
            ids = record.aux["abs_selected"]
            record.aux["abs_selected"] = torch.full((B, ids.shape[1]), -1, dtype=ids.dtype).index_copy(0, rows_cpu, ids)
        final = out.state.replace(x=readout.index_copy(0, rows, refined.x[:, 0])[:, None])
        record.aux[FINAL_TOKENS] = out.state.replace(history=out.state.history + (refined.snapshot(),))  # refined written back
        return RunOutput(logits=self.reducer.finish(self.model, final, record), state=out.state, record=record, model=self.model)

    # -- training, pictures, reports --
    def extra_losses(self, out: RunOutput, targets: Tensor, teacher: RunOutput | None) -> dict[str, Tensor]:
        return self.reducer.extra_losses(out, targets, teacher)

    def token_map(self, out: RunOutput) -> TokenMap | None:
        """The reducer's layer (drop stage, halting depth; ToMe: merged sizes) with the refined patches outlined."""
        base = self.reducer.token_map(out)
        refined = out.record.aux.get("stack_refined")
        if base is None and refined is None:
            return None
        label = (base.label + "; " if base is not None else "") + "outlined: refined by ABS"
        if base is None:
            return TokenMap(outline=refined, label=label)
        return dataclasses.replace(base, outline=refined, label=label)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for part in (self.reducer, self.refiner):
            out.update({k: v for k, v in part.describe().items() if k != "method"})
        return out

    def checkpoint_parts(self) -> dict[str, Method]:
        """Parts whose own tensors a checkpoint holds: the reducer (ABS's block is a copy of the backbone's)."""
        return {"reducer": self.reducer}


def _patch_counts(state: TokenState) -> Tensor:
    """(B,) real tokens after the prefix, on the state's device."""
    if state.key_mask is None:
        return torch.full((state.batch_size,), state.width - state.num_prefix, dtype=torch.long, device=state.x.device)
    return state.key_mask[:, state.num_prefix :].sum(dim=1)


def _realign(before: TokenState, after: TokenState, values: Tensor, num_patches: int) -> Tensor:
    """Per-token values of `before` for the tokens of `after`, matched by original patch id (-inf if none)."""
    grid = before.to_patch_grid(values, num_patches, fill=float("-inf"))
    ids = after.patch_ids
    found = (ids >= 0) & (ids < grid.shape[1])
    return torch.where(found, grid.gather(1, ids.clamp(0, grid.shape[1] - 1)), torch.full_like(ids, float("-inf"), dtype=values.dtype))


def _carry_scores(before: TokenState, after: TokenState, num_patches: int) -> TokenState:
    """Reducers that rebuild the state (ToMe's merge) drop extras; the scores follow the patch ids."""
    if TOKEN_SCORE in before.extras and TOKEN_SCORE not in after.extras:
        return after.replace(extras={**after.extras, TOKEN_SCORE: _realign(before, after, before.extras[TOKEN_SCORE], num_patches)})
    return after


# -- building stacks --------------------------------------------------------------------------------
def compose(reducer: Method, refiner: Method) -> Stack:
    """`compose(build_method('tome', m, r=4), build_method('abs', m, alpha=0.2))`: ToMe, then ABS on its survivors."""
    check_parts(reducer.name, refiner.name)
    options = stack_options_class(reducer.name, refiner.name)(**dataclasses.asdict(reducer.options), **dataclasses.asdict(refiner.options))
    return Stack(reducer.model, reducer, refiner, options)


def check_parts(reducer: str, refiner: str) -> None:
    reducers, refiners = names_of("reducer"), names_of("refiner")
    if reducer in refiners and refiner in reducers:
        raise ConfigError(f"stack {reducer}+{refiner}: write the reducer first ({refiner}+{reducer}): tokens are reduced, then ABS refines the survivors")
    if reducer not in reducers:
        raise ConfigError(f"stack {reducer}+{refiner}: {reducer!r} is not a token reducer; stacks are REDUCER+abs with REDUCER one of {', '.join(reducers)}")
    if refiner not in refiners:
        raise ConfigError(f"stack {reducer}+{refiner}: {refiner!r} is not a refiner; stacks are REDUCER+abs")


_OPTION_CLASSES: dict[tuple[str, str], type] = {}


def stack_options_class(reducer: str, refiner: str) -> type:
    """One flat frozen dataclass with both parts' options; building it validates both."""
    key = (reducer, refiner)
    if key in _OPTION_CLASSES:
        return _OPTION_CLASSES[key]
    parts = {reducer: get_spec(reducer).options, refiner: get_spec(refiner).options}
    fields = {name: dataclasses.fields(cls) for name, cls in parts.items()}
    both = sorted({f.name for f in fields[reducer]} & {f.name for f in fields[refiner]})
    if both:
        raise ConfigError(f"stack {reducer}+{refiner}: option(s) {', '.join(both)} belong to both parts, so a flag could not say which")

    def copy(f: dataclasses.Field):
        default = {"default": f.default} if f.default is not dataclasses.MISSING else {"default_factory": f.default_factory}
        return f.name, f.type, dataclasses.field(metadata=f.metadata, **default)

    def split(self) -> dict[str, Any]:
        """Each part's own options object."""
        return {name: cls(**{f.name: getattr(self, f.name) for f in fields[name]}) for name, cls in parts.items()}

    def post_init(self) -> None:
        split(self)

    cls = dataclasses.make_dataclass(
        f"{reducer.title().replace('_', '')}{refiner.title()}Options", [copy(f) for name in parts for f in fields[name]],
        frozen=True, namespace={"__post_init__": post_init, "split": split, "parts": (reducer, refiner)},
    )
    _OPTION_CLASSES[key] = cls
    return cls


def stack_spec(name: str) -> MethodSpec:
    """The registry entry of `REDUCER+REFINER`, made on first use."""
    names = name.split("+")
    if len(names) != 2 or not all(names):
        raise ConfigError(f"method {name!r}: a stack is two names, REDUCER+abs (e.g. tome+abs)")
    reducer, refiner = names
    for part in names:
        get_spec(part)
    check_parts(reducer, refiner)
    options = stack_options_class(reducer, refiner)

    def build(model: nn.Module, opts: Any) -> Stack:
        split = opts.split()
        parts = {part: get_spec(part).build(model, split[part]) for part in names}
        return Stack(model, parts[reducer], parts[refiner], opts)

    parts = [get_spec(reducer), get_spec(refiner)]
    return MethodSpec(name, build, options, f"{reducer}, then ABS refines the top alpha of its surviving tokens",
                      label=" + ".join(p.label for p in parts), kind="stack", trains=parts[0].trains, recipe=parts[0].recipe)


set_stack_resolver(stack_spec)
