"""Execute a ViT block by block, letting a method act on the tokens between blocks.

Methods never fork the block forward: the runner drives each block's own submodules (norm1,
attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2) and records how many tokens every block
actually executed, which is what cost accounting reads.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import grid
from .attention import AttentionInfo, multihead_attention
from .state import Packing, TokenState


class Hooks:
    """A method's view of the forward pass. Every step defaults to doing nothing.

    Subclass (usually together with nn.Module, to carry parameters) and override what you need.
    """

    def needs_probs(self, index: int) -> bool:
        """Whether block `index` must materialise attention probabilities (explicit softmax)."""
        return False

    def needs_keys(self, index: int) -> bool:
        return False

    def begin(self, model: nn.Module, state: TokenState, record: "ExecutionRecord") -> TokenState:
        return state

    def before_block(self, index: int, state: TokenState, record: "ExecutionRecord") -> TokenState:
        return state

    def after_attention(self, index: int, state: TokenState, info: AttentionInfo, record: "ExecutionRecord") -> TokenState:
        """Between the attention residual and the MLP (where ToMe merges, EViT prunes)."""
        return state

    def after_block(self, index: int, state: TokenState, info: AttentionInfo, record: "ExecutionRecord") -> TokenState:
        return state

    def finish(self, model: nn.Module, state: TokenState, record: "ExecutionRecord") -> Tensor:
        """Final norm, pooling and head; methods that change the readout override this."""
        return model.forward_head(model.norm(state.x), state.key_mask)


NO_HOOKS = Hooks()


@dataclass
class ExecutionRecord:
    """Tokens each block actually executed, per image, plus method overhead in MACs.

    attn_tokens[i] / mlp_tokens[i]: (B,) real tokens in block i's attention / MLP.
    What the hardware ran, per image, padding included (floats where a block ran part of the
    batch or packed tokens): attn_width[i] tokens through qkv and the output projection,
    core_width[i] the side of the N x N attention products, mlp_width[i] tokens through the MLP.
    extra_macs: (B,) scorers, predictors and extra blocks a method added.
    """

    batch_size: int
    attn_tokens: list[Tensor] = field(default_factory=list)
    mlp_tokens: list[Tensor] = field(default_factory=list)
    attn_width: list[float] = field(default_factory=list)
    core_width: list[float] = field(default_factory=list)
    mlp_width: list[float] = field(default_factory=list)
    _tensor_macs: Tensor | None = field(default=None, repr=False)
    _scalar_macs: float | None = field(default=None, repr=False)  # per-image MACs added as plain numbers (no op per block)
    aux: dict[str, Any] = field(default_factory=dict)
    _counts: dict[tuple[int, torch.device], Tensor] = field(default_factory=dict, repr=False)
    _packings: dict[int, tuple[Tensor, Packing]] = field(default_factory=dict, repr=False)

    def add_macs(self, macs: Tensor | float) -> None:
        """Add MACs per image: a number (the same for every image; summed in Python, no tensor op) or a (B,) tensor."""
        if isinstance(macs, (int, float)):
            self._scalar_macs = (self._scalar_macs or 0.0) + float(macs)
            return
        macs = torch.as_tensor(macs, dtype=torch.float64).expand(self.batch_size).cpu()
        self._tensor_macs = macs.clone() if self._tensor_macs is None else self._tensor_macs + macs

    @property
    def extra_macs(self) -> Tensor | None:
        """(B,) float64 MACs the method added (scorers, predictors, extra blocks), or None if it added none."""
        if self._tensor_macs is None:
            return None if self._scalar_macs is None else torch.full((self.batch_size,), self._scalar_macs, dtype=torch.float64)
        return self._tensor_macs if self._scalar_macs is None else self._tensor_macs + self._scalar_macs

    def add_widths(self, attn: float, core: float, mlp: float) -> None:
        self.attn_width.append(attn)
        self.core_width.append(core)
        self.mlp_width.append(mlp)

    def tokens_of(self, state: TokenState) -> Tensor:
        """(B,) real tokens of `state`; unpadded widths share one cached tensor (no op per block)."""
        if state.key_mask is not None:
            return state.key_mask.sum(dim=1)
        key = (state.width, state.x.device)
        if key not in self._counts:
            self._counts[key] = state.num_tokens()
        return self._counts[key]

    def packing_of(self, key_mask: Tensor) -> Packing:
        """The packing of a key mask, built once while that mask lives (blocks between compactions share it)."""
        hit = self._packings.get(id(key_mask))
        if hit is None or hit[0] is not key_mask:
            hit = self._packings[id(key_mask)] = (key_mask, Packing.of(key_mask))
        return hit[1]


@dataclass
class RunOutput:
    logits: Tensor
    state: TokenState
    record: ExecutionRecord
    model: nn.Module | None = field(default=None, repr=False)  # the ViT that ran (its norm and patch grid)

    def patch_grid(self, norm: bool = True) -> Tensor:
        """(B, H, W, C) features of every original patch, whatever the method did to its token
        (merged, pruned, halted, refined; see `runtime.grid`); norm=False: before the final norm."""
        return grid.patch_grid(self, self.model, norm)


PACK_MIN_PADDING = 1 / 16  # pack when at least this fraction of a padded batch is padding


def run_block(
    block: nn.Module, index: int, state: TokenState, hooks: Hooks, record: ExecutionRecord, *, pack: bool = True,
) -> TokenState:
    """One timm-layout block, with the hooks' attention needs and the token counts recorded.

    A padded batch (images kept different counts) runs its per-token layers on the packed real
    tokens and only the attention product padded, unless little of the batch is padding or `pack`
    is False (padding rows are then computed and discarded, as masked implementations do). A hook
    acting between attention and MLP is handed the padded state; the MLP then runs packed by the
    key mask the hook left (per-image threshold merging changes it there).
    """
    if _plain(block, state, hooks):  # nothing to ask, pack or mask: the block's own forward, fewer Python steps
        _record_plain(record, state, 1)
        return state.replace(x=block(state.x))
    need_probs, need_keys = hooks.needs_probs(index), hooks.needs_keys(index)
    given = state.next_attention
    if given is not None:
        state = state.replace(next_attention=None)
    packing = _packing(state, record) if pack and given is None else None
    bias = None if state.size is None else state.size.log()[:, None, None, :].to(state.x.dtype)
    x = state.x if packing is None else packing.pack(state.x)
    attn_out, info = multihead_attention(
        block.attn, block.norm1(x), key_mask=state.key_mask, bias=bias, policy=state.policy,
        need_probs=need_probs, need_keys=need_keys, packing=packing, probs=given,
    )
    tokens = record.tokens_of(state)
    record.attn_tokens.append(tokens)  # stays on device: no sync per block
    attn_width, core_width = (state.width if packing is None else packing.tokens_per_image), state.width
    x = x + _per_sample(block.drop_path1, block.ls1(attn_out), packing)
    if packing is not None and type(hooks).after_attention is Hooks.after_attention:  # stays packed through the MLP
        x = x + _per_sample(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), packing)
        record.mlp_tokens.append(tokens)
        record.add_widths(attn_width, core_width, attn_width)
        return hooks.after_block(index, state.replace(x=packing.unpack(x, into=state.x)), info, record)
    state = state.replace(x=x if packing is None else packing.unpack(x, into=state.x))
    after = hooks.after_attention(index, state, info, record)
    same = after.x.shape == state.x.shape and after.key_mask is state.key_mask
    state = after
    record.mlp_tokens.append(tokens if same else record.tokens_of(state))
    packing = (packing if same else _packing(state, record)) if pack else None
    x = state.x if packing is None else packing.pack(state.x)
    x = x + _per_sample(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), packing)
    record.add_widths(attn_width, core_width, state.width if packing is None else packing.tokens_per_image)
    return hooks.after_block(index, state.replace(x=x if packing is None else packing.unpack(x, into=state.x)), info, record)


def _plain(block: nn.Module, state: TokenState, hooks: Hooks) -> bool:
    """Whether the block may run as `block(x)`: a block whose forward is the runner's own sequence
    (`RUNNER_FORWARD`), hooks that act on none of its steps, and no padding, sizes, policy or given attention."""
    return (getattr(block, "RUNNER_FORWARD", False) and state.key_mask is None and state.size is None and state.policy is None
            and state.next_attention is None and not _overridden(type(hooks)) & _BLOCK_STEPS)


_BLOCK_STEPS = frozenset({"needs_probs", "needs_keys", "after_attention", "after_block"})


@functools.lru_cache(maxsize=None)
def _overridden(hooks_type: type) -> frozenset[str]:
    """The Hooks steps a class overrides (asked once per class, not per block)."""
    return frozenset(step for step in ("before_block", *_BLOCK_STEPS) if getattr(hooks_type, step) is not getattr(Hooks, step))


def _run_plain(blocks: nn.Module, state: TokenState, record: ExecutionRecord) -> TokenState:
    """Every block as `block(x)`, back to back, recorded as run_block records them (batch-1 Python overhead)."""
    x = state.x
    for block in blocks:
        x = block(x)
    _record_plain(record, state, len(blocks))
    return state.replace(x=x)


def _record_plain(record: ExecutionRecord, state: TokenState, blocks: int) -> None:
    """What run_block records for `blocks` plain blocks: every token through attention and MLP, no padding."""
    tokens, width = record.tokens_of(state), state.width
    for _ in range(blocks):
        record.attn_tokens.append(tokens)
        record.mlp_tokens.append(tokens)
        record.add_widths(width, width, width)


def _per_sample(drop_path: nn.Module, branch: Tensor, packing: Packing | None) -> Tensor:
    """Stochastic depth on packed (T, C) rows, per image as on the padded (B, W, C) layout.

    DropPath draws one keep per leading index: on packed rows that would drop single tokens.
    In training it runs on the padded layout, so it drops whole images with the same random
    draws as the unpacked path (packed equals padded under the same seed); otherwise (eval,
    rate 0, Identity, no packing) it is called as is.
    """
    if packing is None or not (drop_path.training and drop_path_rate(drop_path)):
        return drop_path(branch)
    return packing.pack(drop_path(packing.unpack(branch)))


def drop_path_rate(drop_path: nn.Module) -> float:
    """A stochastic-depth module's drop rate: ours (`p`), timm's (`drop_prob`), 0 for nn.Identity."""
    return float(getattr(drop_path, "p", getattr(drop_path, "drop_prob", 0.0)))


def _packing(state: TokenState, record: ExecutionRecord) -> Packing | None:
    if state.key_mask is None or state.policy is not None:
        return None
    packing = record.packing_of(state.key_mask)
    if packing.rows.numel() > (1 - PACK_MIN_PADDING) * state.key_mask.numel():
        return None
    return packing


def run(model: nn.Module, images: Tensor, hooks: Hooks | None = None) -> RunOutput:
    """Forward `images` through `model` block by block; with no hooks this equals `model(images)`."""
    hooks = hooks or NO_HOOKS
    state = TokenState.initial(model.embed(images), model.num_prefix_tokens)
    record = ExecutionRecord(batch_size=images.shape[0])
    state = hooks.begin(model, state, record)
    if "before_block" not in _overridden(type(hooks)) and all(_plain(block, state, hooks) for block in model.blocks):
        state = _run_plain(model.blocks, state, record)  # nothing acts anywhere between the blocks
    else:
        for index, block in enumerate(model.blocks):
            state = hooks.before_block(index, state, record)
            state = run_block(block, index, state, hooks, record)
    logits = hooks.finish(model, state, record)
    return RunOutput(logits=logits, state=state, record=record, model=model)
