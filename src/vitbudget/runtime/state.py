"""TokenState: the tokens a ViT is working on, and where each came from."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass
class TokenState:
    """Token features plus per-token bookkeeping that must travel with them.

    x: (B, N, D) features; prefix tokens (CLS, registers) come first.
    patch_ids: (B, N) original patch index of every token; -1 for prefix tokens.
    key_mask: (B, N) bool, False = padding (images in a batch kept different counts).
    policy: (B, N) float keep mask for training-mode masking (tokens stay, attention ignores them).
    size: (B, N) float number of original patches a token stands for (merging).
    extras: per-token tensors (B, N, ...) a method wants gathered along with the tokens.
    batch_index: (B,) index of each image in the batch the run began with (images can leave a
        batch: `select_images`); None = that batch, in order.
    history: what the patch grid (`runtime.grid`) needs of tokens no longer here, oldest first:
        a `Snapshot` of the state before tokens left it (`gather`, `compact`, `select_images`,
        `mask`) and a `Merge` per merging step. Only references to tensors the run made anyway:
        nothing is computed for it until a grid is asked for.
    next_attention: (B, H, N, N) attention probabilities the next block uses instead of its own
        softmax(q k^T) (MCTF's one-step-ahead attention); set in `before_block`, consumed by that block.
    """

    x: Tensor
    patch_ids: Tensor
    num_prefix: int
    key_mask: Tensor | None = None
    policy: Tensor | None = None
    size: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    batch_index: Tensor | None = None
    history: tuple = ()
    next_attention: Tensor | None = None

    @classmethod
    def initial(cls, x: Tensor, num_prefix: int) -> "TokenState":
        B, N, _ = x.shape
        ids = torch.arange(N, device=x.device) - num_prefix
        ids = ids.clamp(min=-1).expand(B, N)
        return cls(x=x, patch_ids=ids, num_prefix=num_prefix)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def width(self) -> int:
        """Tokens per image as executed, padding included."""
        return self.x.shape[1]

    def num_tokens(self) -> Tensor:
        """(B,) real tokens per image, padding excluded."""
        if self.key_mask is None:
            return torch.full((self.batch_size,), self.width, device=self.x.device, dtype=torch.long)
        return self.key_mask.sum(dim=1)

    def replace(self, **changes) -> "TokenState":
        """A copy with `changes`; a shallow copy rather than dataclasses.replace, which costs
        ~20 us a call (the runner replaces the state twice per block)."""
        unknown = changes.keys() - self.__dataclass_fields__.keys()
        if unknown:
            raise TypeError(f"TokenState has no field(s) {sorted(unknown)}")
        new = copy.copy(self)
        new.__dict__.update(changes)
        return new

    def _per_token_fields(self) -> dict[str, Tensor]:
        fields = {"x": self.x, "patch_ids": self.patch_ids}
        for name in ("key_mask", "policy", "size"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return fields

    def gather(self, index: Tensor) -> "TokenState":
        """Keep tokens `index` (B, K) of every image, in that order, with all their bookkeeping."""
        def take(t: Tensor) -> Tensor:
            idx = index.reshape(*index.shape, *([1] * (t.dim() - 2))).expand(*index.shape, *t.shape[2:])
            return t.gather(1, idx)

        new = {name: take(t) for name, t in self._per_token_fields().items()}
        extras = {name: take(t) for name, t in self.extras.items()}
        return self.replace(**new, extras=extras, history=self.history + (self.snapshot(),))

    def snapshot(self) -> "Snapshot":
        """These tokens as they are now (references, no copy), for the patch grid."""
        return Snapshot(self.x, self.patch_ids, self.key_mask, self.policy, self.batch_index)

    def merged(self, src: Tensor, dst: Tensor) -> tuple:
        """`history` after tokens at positions `src` (B, r) merged into those at `dst` (B, r) of this state.

        dst is where each src token's patches end up after this step (a token that absorbed others
        is never a src elsewhere in the same step, so chains of one step are resolved first, as
        MCTF's bidirectional merge). A src pointing to itself stays: images merging different
        counts pad their rows that way, and a step may list every position (MCTF's slot map).
        Padding (key_mask False) is ignored."""
        return self.history + (Merge(self.patch_ids, src, dst, self.batch_index, self.key_mask),)

    def mask(self, policy: Tensor) -> "TokenState":
        """The state under a new keep `policy` (training-mode pruning); tokens it drops keep, for the
        patch grid, their features as they are now (the masked path keeps computing them)."""
        return self.replace(policy=policy, history=self.history + (self.snapshot(),))

    def select_images(self, rows: Tensor) -> "TokenState":
        """Images `rows` (indices into this batch) with all their bookkeeping; the others leave the run."""
        changes = {name: t.index_select(0, rows) for name, t in self._per_token_fields().items()}
        extras = {name: t.index_select(0, rows) for name, t in self.extras.items()}
        index = rows if self.batch_index is None else self.batch_index.index_select(0, rows)
        return self.replace(**changes, extras=extras, batch_index=index, history=self.history + (self.snapshot(),))

    def keep_top_patches(self, scores: Tensor, k: int) -> "TokenState":
        """Keep the prefix and the k highest-scoring patch tokens, in their original order.

        scores: (B, N - num_prefix) for the current patch tokens.
        """
        top = scores.topk(k, dim=1).indices.sort(dim=1).values + self.num_prefix
        prefix = torch.arange(self.num_prefix, device=top.device).expand(top.shape[0], -1)
        return self.gather(torch.cat([prefix, top], dim=1))

    def compact(self, keep: Tensor) -> "TokenState":
        """Remove tokens where `keep` (B, N) is False, padding each image to the batch maximum.

        Kept tokens keep their relative order; `key_mask` marks the padding so attention
        ignores it. With equal counts per image there is no padding and no mask.
        An image whose `keep` row selects nothing keeps its first real token (the CLS token where
        there is one): a row of padding only would leave attention no key, and softmax over no
        key is NaN. To drop an image altogether, select it out of the batch instead.
        """
        if self.key_mask is not None:
            keep = keep & self.key_mask
        empty = ~keep.any(dim=1, keepdim=True)  # (B, 1)
        if bool(empty.any()):
            real = self.key_mask if self.key_mask is not None else torch.ones_like(keep)
            first = real & (real.cumsum(dim=1) == 1)  # each image's first real token
            keep = keep | (empty & first)
        if self.batch_size == 1:  # nothing to pad: a plain index, no sort and no mask
            return self.gather(keep[0].nonzero().T).replace(key_mask=None)
        counts = keep.sum(dim=1)
        width = int(counts.max())
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        new = self.gather(order)
        mask = keep.gather(1, order)
        return new.replace(key_mask=None if bool(mask.all()) else mask)

    def to_patch_grid(self, values: Tensor, num_patches: int, fill: float = float("nan")) -> Tensor:
        """Scatter per-token values (B, N) back to (B, num_patches) by original patch index."""
        out = torch.full((self.batch_size, num_patches + 1), fill, dtype=values.dtype, device=values.device)
        ids = self.patch_ids.clone()
        ids[ids < 0] = num_patches  # prefix and padding land in a discarded slot
        if self.key_mask is not None:
            ids[~self.key_mask] = num_patches
        out.scatter_(1, ids, values)
        return out[:, :num_patches]


class Snapshot(NamedTuple):
    """Tokens of a state at one moment (what `TokenState.snapshot` keeps): a patch that leaves
    afterwards has these features in the patch grid. Real tokens: key_mask and policy > 0.5."""

    x: Tensor
    patch_ids: Tensor
    key_mask: Tensor | None
    policy: Tensor | None
    batch_index: Tensor | None


class Merge(NamedTuple):
    """One merging step: tokens at positions `src` (B, r) of a state with `patch_ids` (B, N) joined
    those at `dst`; in the patch grid, their patches take the features of the token they joined.
    Positions where `key_mask` is False are padding, not tokens."""

    patch_ids: Tensor
    src: Tensor
    dst: Tensor
    batch_index: Tensor | None
    key_mask: Tensor | None = None


@dataclass
class Packing:
    """Where the real tokens of a padded (B, W) layout sit among its B*W rows.

    Per-token layers (norms, qkv, proj, MLP: most of a block's FLOPs) run on the packed (T, C)
    real tokens; only the attention product needs the padded layout. Built once per key mask.
    """

    rows: Tensor  # (T,) indices into the flattened (B*W) rows
    batch: int
    width: int

    @classmethod
    def of(cls, key_mask: Tensor) -> "Packing":
        B, W = key_mask.shape
        return cls(rows=key_mask.reshape(-1).nonzero().squeeze(1), batch=B, width=W)

    @property
    def tokens_per_image(self) -> float:
        return self.rows.numel() / self.batch

    def cu_seqlens(self) -> Tensor:
        """(B + 1,) int32 offsets of each image's tokens among the T packed rows (rows are image-major),
        as variable-length attention kernels take them; built once per packing."""
        cached = self.__dict__.get("_cu_seqlens")
        if cached is None:
            counts = torch.bincount(torch.div(self.rows, self.width, rounding_mode="floor"), minlength=self.batch)
            cached = self.__dict__["_cu_seqlens"] = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        return cached

    def pack(self, x: Tensor) -> Tensor:
        """(B, W, C) -> (T, C)."""
        return x.reshape(self.batch * self.width, -1).index_select(0, self.rows)

    def unpack(self, packed: Tensor, into: Tensor | None = None) -> Tensor:
        """(T, C) -> (B, W, C): the real rows of `into` (zeros if None) replaced; padding kept."""
        c = packed.shape[-1]
        base = packed.new_zeros(self.batch * self.width, c) if into is None else into.reshape(self.batch * self.width, c)
        return base.index_copy(0, self.rows, packed).view(self.batch, self.width, c)
