"""A-ViT (Yin et al., CVPR 2022): adaptive token halting, with halted tokens really removed.

Halting (as the paper): after every block, token t gets the score h = sigmoid(gamma * x[..., 0] - beta)
from channel 0 of the block OUTPUT (the residual stream; the channel keeps serving as a feature).
Per token, ACT: cumulative c += h, the last block forces h = 1, the token halts at the first block
where c >= 1 - eps. The remainder R starts at 1; a running token contributes out * h (R -= h), the
halting block contributes out * R; ponder rho = (blocks used) + R. The CLS token halts too, and the
output is head(norm(sum over blocks of CLS contributions)). Training adds
ponder_weight * mean(rho) + distr_weight * KL(prior || q) (see `AViT.extra_losses`).

Two executions of the same function:

* dense (training, or `dense=True`): every token stays in the tensor. Halted tokens are frozen
  (their features are no longer updated) and excluded as attention KEYS through the runtime's
  key mask, so running tokens see exactly what they would see if halted tokens were gone. We use
  the key mask rather than `TokenState.policy`: the policy softmax adds POLICY_EPS / N to every
  weight, i.e. halted tokens would still leak ~1e-6 of their values, while halting is a hard,
  non-differentiable decision anyway (as in the official code), so the policy's gradient path
  buys nothing here. Gradients flow through h (the CLS weights, R, rho and q) as in the paper.
  This is what the official code runs, training and inference (it zeroes halted tokens where
  we freeze them; the outputs are the same): no compute is saved.
* removing (inference, the default in eval mode): after each block, halted tokens are removed
  with `TokenState.compact` (per image, padded to the batch maximum with a key mask). Only the
  CLS output is read, so a halted patch token's only influence on the output is through the keys
  and values it offered while it was running; it needs no further bookkeeping once gone.
  When an image's CLS token halts, its output is final: nothing computed later can reach it, so
  the image's remaining tokens are all dropped and the image leaves the batch (rows are
  selected out; the record keeps per-image counts for the full batch). At batch 1 that is an
  early exit. The loop skips all bookkeeping in blocks where nothing halted (one host check per
  block) and ends once every image is done.

Both give the same logits (up to float reassociation in attention) and the same ExecutionRecord
token counts: a token is counted in a block if it is running there and its image's CLS is still
running — what the removing path executes and what FLOPs A-ViT reports. The dense path's widths
show that it ran all N tokens. `halting_depth(record)` gives, per original token (prefix first),
the number of blocks it executed (built on demand: the removing path only keeps what each block
ran); `token_map` draws it per patch.
The patch grid (`RunOutput.patch_grid`, docs/dense.md) holds each token at halting: the output of
the last block it ran (its own halting, or its image's CLS halting), the same in both executions.

The prior loss reads q, the per-block halting distribution. `q_mode` chooses its definition:

* 'reference' (default), `NVlabs/A-ViT`'s: q_l is the mean halting score of block l over all
  tokens, halted ones included. The official forward zeroes a halted token's input and both
  norm outputs and masks it as an attention key (a -1000 logit bias), so a halted token queries
  with qkv's bias alone over the running tokens, and its MLP sees zeros; its score is read off
  that output (`AViT.halted_output`: one vector per image, what every halted token of the
  image computes). Under stochastic depth (training with drop_path_rate > 0) the official block
  drops both branches per image, halted tokens included, so their output takes the same per-image
  draw as the image's running tokens in that block (`drop_path_keeps`).
* 'halted-zero': a halted token counts 0, so q_l is the running tokens' score mass per token;
  about the same where the official halted scores are ~sigmoid(-beta), not the reference.

Halted tokens leak nothing into the output in either execution, nor in the official code:
there, the -1000 key bias gives them exactly zero attention weight in float32, and their own
outputs are zeroed before the halting-weighted sum. Only q reads them.

`prior` chooses the Gaussian prior on halting depth the KL pulls q towards:

* 'normalized' (default; not the reference): a Gaussian over 1-based block numbers (halting at
  block l = l blocks executed) centred on target_depth, normalised to sum 1; the KL is the plain
  sum over blocks. The `avit_cifar10` recipe's distr_weight is calibrated for this form.
* 'reference', the official `get_distribution_target`: the Gaussian density at the 0-based
  block index (i.e. one block deeper for the same target_depth), rescaled so that its first
  int(target_depth) entries sum to 0.98 (so the whole does not sum to 1), and the KL of
  `nn.KLDivLoss(reduction='batchmean')` on a 1-D input: the sum over blocks divided by depth.

Also on purpose: q averages over the whole batch (the official `h[1:]` slices off the first
image, and is empty at batch 1); no device is hard-wired.

A-ViT has no learned parameters of its own, yet it needs a backbone fine-tuned for halting
(channel 0 must learn to carry the halting signal). It keeps one buffer, `halt_counts` (how many
tokens halted at each block during training), saved with its checkpoints under `method.`; so
`load_method(path, "avit")` of a checkpoint trained as anything else raises the standard
CheckpointError ("holds a 'baseline' checkpoint with no 'avit' parameters"), while loading an
A-ViT checkpoint as "baseline" gives its fine-tuned backbone without halting.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import ConfigError
from ..runtime.attention import multihead_attention
from ..runtime.token_map import TokenMap
from ..runtime.runner import NO_HOOKS, ExecutionRecord, RunOutput, drop_path_rate, run, run_block
from ..runtime.state import TokenState
from .base import Method
from .registry import register


Q_MODES = ("reference", "halted-zero")
PRIORS = ("normalized", "reference")


@dataclass(frozen=True)
class AViTOptions:
    gamma: float = field(default=10.0, metadata={"help": "avit: halting score scale, h = sigmoid(gamma * x[..., 0] - beta); > 0"})
    beta: float = field(default=30.0, metadata={"help": "avit: halting score offset beta"})
    eps: float = field(default=0.01, metadata={"help": "avit: a token halts when its cumulative score reaches 1 - eps; in (0, 1)"})
    target_depth: float = field(default=0.0, metadata={"help": "avit: mean of the Gaussian prior on halting depth, in [1, depth] blocks (0 = two thirds of the depth, 8 of 12)"})
    ponder_weight: float = field(default=5e-4, metadata={"help": "avit: weight of the ponder loss, mean over tokens of blocks used + remainder"})
    distr_weight: float = field(default=1e-3, metadata={"help": "avit: weight of KL(prior || per-block halting distribution)"})
    prior_std: float = field(default=1.0, metadata={"help": "avit: standard deviation (blocks) of the Gaussian depth prior; > 0"})
    halting: bool = field(default=True, metadata={"help": "avit: false runs the plain backbone (exactly the baseline's logits)"})
    dense: bool = field(default=False, metadata={"help": "avit: run inference dense + masked like the official code (same outputs, no speed-up)"})
    pack: bool = field(default=True, metadata={"help": "avit: run padded batches packed (per-token layers on real tokens only); false pads only, for comparison"})
    q_mode: str = field(default="reference", metadata={"help": "avit: halting distribution q of the prior loss: 'reference' (mean score over all tokens, halted ones scored as the official forward scores them) or 'halted-zero' (halted tokens count 0)"})
    prior: str = field(default="normalized", metadata={"help": "avit: depth prior: 'normalized' (Gaussian over 1-based blocks, sums to 1, KL summed) or 'reference' (the official target: 0-based, first target-depth entries sum to 0.98, KL averaged over blocks)"})

    def __post_init__(self) -> None:
        if not (self.gamma > 0 and math.isfinite(self.gamma)):
            raise ConfigError(f"--gamma must be a finite number > 0, got {self.gamma}")
        if not math.isfinite(self.beta):
            raise ConfigError(f"--beta must be finite, got {self.beta}")
        if not 0.0 < self.eps < 1.0:
            raise ConfigError(f"--eps must be in (0, 1) (tokens halt at cumulative score 1 - eps), got {self.eps}")
        if not (self.target_depth == 0 or self.target_depth >= 1):  # the upper bound needs the model
            raise ConfigError(f"--target-depth must be in [1, depth] blocks (or 0 for two thirds of the depth), got {self.target_depth}")
        if not (self.ponder_weight >= 0 and self.distr_weight >= 0):
            raise ConfigError(f"--ponder-weight and --distr-weight must be >= 0, got {self.ponder_weight}, {self.distr_weight}")
        if not (self.prior_std > 0 and math.isfinite(self.prior_std)):
            raise ConfigError(f"--prior-std must be a finite number > 0, got {self.prior_std}")
        if self.q_mode not in Q_MODES:
            raise ConfigError(f"--q-mode must be one of {', '.join(Q_MODES)}, got {self.q_mode!r}")
        if self.prior not in PRIORS:
            raise ConfigError(f"--prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")


def log_prior(depth: int, target: float, std: float, kind: str = "normalized") -> Tensor:
    """log of the depth prior (see the module docstring, `prior`).

    normalized: the Gaussian over block numbers 1..depth with mean `target`, normalised to sum 1.
    reference: the Gaussian density at block indices 0..depth-1 with mean `target`, rescaled so
    that its first int(target) entries sum to 0.98, as the official `get_distribution_target`.
    """
    if kind == "normalized":
        blocks = torch.arange(1, depth + 1, dtype=torch.float64)
        return (-0.5 * ((blocks - target) / std) ** 2).log_softmax(0).float()
    index = torch.arange(depth, dtype=torch.float64)
    density = torch.exp(-0.5 * ((index - target) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    head = density[: int(target)].sum()
    return (density * (0.98 / head)).log().float()


@contextlib.contextmanager
def drop_path_keeps(block: nn.Module) -> Iterator[dict[str, Tensor]]:
    """The per-image keeps (B,) bool that the block's active stochastic-depth modules drew while
    inside this context, by module name ('drop_path1', 'drop_path2'). A kept image's branch is
    non-zero, a dropped one's exactly zero."""
    keeps: dict[str, Tensor] = {}
    names = [name for name in ("drop_path1", "drop_path2") if getattr(block, name).training and drop_path_rate(getattr(block, name))]
    if not names:  # no stochastic depth here (eval, rate 0): no hooks, so compiled graphs stay whole
        yield keeps
        return

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if module.training and drop_path_rate(module):
                keeps[name] = output.detach().flatten(1).ne(0).any(dim=1)
        return hook

    handles = [getattr(block, name).register_forward_hook(record(name)) for name in names]
    try:
        yield keeps
    finally:
        for handle in handles:
            handle.remove()


def halting_depth(record: ExecutionRecord) -> Tensor:
    """(B, N) blocks each original token executed (prefix first), from an A-ViT run's record.

    The dense path records it directly; the removing path keeps, per block, which images and
    token positions ran, and the map is one bincount over those, built only when asked for.
    """
    if "avit_depth" not in record.aux:
        trace, tokens = record.aux["avit_trace"]
        batch, flat = record.batch_size, []
        for active, pos, key_mask in trace:
            rows = torch.arange(batch, device=pos.device) if active is None else active
            index = rows[:, None] * tokens + pos
            flat.append(index.reshape(-1) if key_mask is None else index[key_mask])
        record.aux["avit_depth"] = torch.bincount(torch.cat(flat), minlength=batch * tokens).view(batch, tokens)
    return record.aux["avit_depth"]


class AViT(Method):
    """Adaptive token halting; `forward` removes halted tokens in eval mode, masks them in training."""

    name = "avit"

    def __init__(self, model: nn.Module, options: AViTOptions):
        super().__init__(model, options)
        cfg = model.cfg
        if not cfg.class_token or cfg.global_pool != "token":
            raise ConfigError("avit reads the halting-weighted CLS token; the model needs a class token and global_pool='token'")
        if cfg.dist_token:
            raise ConfigError("avit reads the halting-weighted CLS token alone; a distilled DeiT's second head (distillation token) has no halting readout")
        self.depth = cfg.depth
        self.target_depth = float(options.target_depth) if options.target_depth else 2.0 * cfg.depth / 3.0
        if not 1.0 <= self.target_depth <= cfg.depth:
            raise ConfigError(f"--target-depth must be in [1, {cfg.depth}] (the model has {cfg.depth} blocks), got {options.target_depth}")
        self.register_buffer("log_prior", log_prior(cfg.depth, self.target_depth, options.prior_std, options.prior), persistent=False)
        # Saved with the checkpoint (see the module docstring): tokens halting at each block in training.
        self.register_buffer("halt_counts", torch.zeros(cfg.depth))

    @property
    def data_dependent_shapes(self) -> str | None:
        if self.options.halting and not self.options.dense:
            return ("A-ViT removes halted tokens, so how many tokens each block runs depends on the pixels; "
                    "--dense true gives the same logits with fixed shapes (every token computed as in the official code, no speed-up)")
        return None

    def describe(self) -> dict:
        return {**super().describe(), "target_depth": self.target_depth}

    def halting_score(self, x: Tensor) -> Tensor:
        """(B, N) halting score from channel 0 of block outputs x (B, N, D)."""
        return torch.sigmoid(x[..., 0] * self.options.gamma - self.options.beta)

    def forward(self, images: Tensor) -> RunOutput:
        if not self.options.halting:
            return run(self.model, images)
        if self.training or self.options.dense:
            return self.forward_dense(images)
        return self.forward_removing(images)

    def finish(self, model: nn.Module, state: TokenState, record: ExecutionRecord) -> Tensor:
        """state.x is (B, 1, D): the halting-weighted sum of CLS outputs; final norm, then head."""
        return model.forward_head(model.norm(state.x))

    def _finish(self, acc: Tensor, record: ExecutionRecord, last: TokenState) -> RunOutput:
        """The readout state (B, 1, D); its history ends with `last`, the tokens as they were when the
        run stopped (with earlier snapshots: each patch's state at halting, for the patch grid)."""
        B = acc.shape[0]
        state = TokenState(x=acc[:, None], patch_ids=torch.full((B, 1), -1, device=acc.device, dtype=torch.long), num_prefix=1,
                           history=last.history + (last.snapshot(),))
        return RunOutput(logits=self.finish(self.model, state, record), state=state, record=record, model=self.model)

    # -- dense + masked: training, and the official code's inference --
    def forward_dense(self, images: Tensor) -> RunOutput:
        model, depth, threshold = self.model, self.depth, 1.0 - self.options.eps
        state = TokenState.initial(model.embed(images), model.num_prefix_tokens)
        B, N, D = state.x.shape
        record = ExecutionRecord(batch_size=B)
        x = state.x
        c, rho = x.new_zeros(B, N), x.new_zeros(B, N)
        R = x.new_ones(B, N)
        running = torch.ones(B, N, dtype=torch.bool, device=x.device)
        acc = x.new_zeros(B, D)
        executed = torch.zeros(B, N, dtype=torch.long, device=x.device)
        at_halting = x  # each token's output of the last block the removing path would run it in (patch grid)
        halt_depth = torch.full((B, N), depth, dtype=torch.long, device=x.device)
        q, halted_per_block = [], []
        for i, block in enumerate(model.blocks):
            needed = running & running[:, :1]  # what the removing path runs: own ACT running and CLS running
            if not torch.compiler.is_compiling() and bool(running.all()):  # traced: always the mask (same maths)
                key_mask = None
            else:  # halted tokens are no keys; an image with nothing running keeps all (its rows are discarded)
                key_mask = running | ~running.any(dim=1, keepdim=True)
            # training packs the running tokens (same maths, less work); dense inference computes
            # every token as the official code does, to show what that costs
            with drop_path_keeps(block) as keeps:  # the per-image draws, for the halted tokens' scores in q
                out = run_block(block, i, state.replace(x=x, key_mask=key_mask), NO_HOOKS, record, pack=self.training).x
            at_halting = out if key_mask is None else torch.where(needed[..., None], out, at_halting)
            counts = needed.sum(dim=1)
            record.attn_tokens[-1], record.mlp_tokens[-1] = counts, counts
            h_raw = self.halting_score(out)
            live = running.to(x.dtype)
            if key_mask is None or self.options.q_mode == "halted-zero":
                q.append((h_raw * live).mean())  # over all tokens; halted ones (if any) add 0
            else:  # halted tokens scored on the output the official forward gives them
                h_halted = self.halting_score(self.halted_output(block, x, running, keeps))  # (B,)
                q.append(torch.where(running, h_raw, h_halted[:, None]).mean())
            h = torch.ones_like(h_raw) if i == depth - 1 else h_raw
            c = c + h * live
            halt_now = running & (c >= threshold)
            still = running & ~halt_now
            w = torch.where(halt_now, R, h * still)
            acc = acc + out[:, 0] * w[:, :1]
            rho = rho + live + torch.where(halt_now, R, torch.zeros_like(R))
            R = R - h * still
            executed += needed
            halt_depth = torch.where(halt_now, torch.full_like(halt_depth, i + 1), halt_depth)
            halted_per_block.append(halt_now.sum())
            x = torch.where(running[..., None], out, x)  # halted tokens are frozen
            running = still
        if self.training:
            with torch.no_grad():
                self.halt_counts += distributed.global_sum(torch.stack(halted_per_block).to(self.halt_counts))  # all ranks' tokens
        record.aux.update(avit_depth=executed, avit_ponder=rho, avit_q=torch.stack(q), avit_halt_depth=halt_depth)
        record.aux["avit_last"] = (state.replace(x=out, key_mask=needed), None)  # what the last block ran (stacks)
        return self._finish(acc, record, state.replace(x=at_halting))

    @staticmethod
    def halted_output(block: nn.Module, x: Tensor, running: Tensor, keeps: dict[str, Tensor] | None = None) -> Tensor:
        """(B, D): what the official forward computes, in `block`, for each image's halted tokens.

        There, a halted token's input and both norm outputs are zeroed and its key is masked, so
        it queries with qkv's bias alone over the running tokens (over itself where nothing runs,
        which gives the same value bias), and its MLP sees zeros: ls1(attention) + ls2(mlp(0)),
        one vector per image, each branch under the image's stochastic-depth draw (`keeps`, from
        `drop_path_keeps`; none: no drop path). `x`: (B, N, D) block input; `running`: (B, N) bool.
        """
        B, N, D = x.shape
        probe = torch.cat([block.norm1(x), x.new_zeros(B, 1, D)], dim=1)  # a zero-input query appended
        keys = torch.cat([running, ~running.any(dim=1, keepdim=True)], dim=1)
        attn_out, _ = multihead_attention(block.attn, probe, key_mask=keys)
        branches = {"drop_path1": block.ls1(attn_out[:, -1]), "drop_path2": block.ls2(block.mlp(x.new_zeros(1, D))).expand(B, D)}
        for name, keep in (keeps or {}).items():  # as DropPath: branch * keep / (1 - rate)
            branches[name] = branches[name] * keep[:, None].to(x.dtype) / (1 - drop_path_rate(getattr(block, name)))
        return branches["drop_path1"] + branches["drop_path2"]

    # -- removing: inference --
    def forward_removing(self, images: Tensor) -> RunOutput:
        """Halted tokens leave the tensor after the block they halt in; finished images leave the batch.

        The loop keeps its bookkeeping to a few small ops per block (at batch 1 a block of this
        model takes about 1 ms, so overhead would eat the savings): `c` and each token's original
        position travel with the tokens as extras, and the per-token depth map is built once at
        the end, on demand, from the positions each block ran (`halting_depth`).
        """
        if images.shape[0] == 1 and images.device.type == "cpu" and not torch.is_grad_enabled():
            return self._forward_single_cpu(images)
        model, depth, threshold = self.model, self.depth, 1.0 - self.options.eps
        x = model.embed(images)
        B, N, D = x.shape
        position = torch.arange(N, device=x.device).expand(B, N)
        state = TokenState.initial(x, model.num_prefix_tokens).replace(extras={"avit_pos": position, "avit_c": x.new_zeros(B, N)})
        record = ExecutionRecord(batch_size=B)
        output = x.new_zeros(B, D)  # final CLS sums, per image of the full batch
        acc, R = x.new_zeros(B, D), x.new_ones(B)  # CLS sum and remainder of the images still in the batch
        active: Tensor | None = None  # their indices in the full batch; None = all of them
        trace = []  # per block: (active, positions, key mask) of the tokens it ran
        for i, block in enumerate(model.blocks):
            trace.append((active, state.extras["avit_pos"], state.key_mask))
            if active is None:
                state = run_block(block, i, state, NO_HOOKS, record, pack=self.options.pack)
            else:
                state = self._run_subbatch(block, i, state, active, record)
            out = state.x
            cls = out[:, 0]
            if i == depth - 1:  # everything halts; CLS contributes its remainder
                record.aux["avit_last"] = (state, active)  # what the last block ran, for stacks (methods.compose)
                acc.addcmul_(cls, R[:, None])
                output = acc if active is None else output.index_copy(0, active, acc)
                break
            # In place and few ops: at batch 1 each small op costs ~10 us, a block ~1 ms.
            # `c` and `acc`/`R` are this loop's own tensors (made here, by compact or by selection).
            h = self.block_scores(out, i, active, state.extras["avit_pos"])
            c = state.extras["avit_c"].add_(h)  # padding holds -inf (below), so it never halts
            if float(c.max()) < threshold:  # the common case: nothing halts, only the CLS sum moves
                acc.addcmul_(cls, h[:, :1])
                R.sub_(h[:, 0])
                continue
            halt = c >= threshold
            halt_cls, hc = halt[:, 0], h[:, 0]
            acc.addcmul_(cls, torch.where(halt_cls, R, hc)[:, None])
            R.sub_(hc)
            keep = ~halt & ~halt_cls[:, None]  # a finished CLS takes its image's tokens with it
            if bool(halt_cls.any()):
                done, rows = halt_cls.nonzero().squeeze(1), (~halt_cls).nonzero().squeeze(1)
                full = torch.arange(B, device=x.device) if active is None else active
                output = output.index_copy(0, full[done], acc[done])
                if rows.numel() == 0:  # every image finished: the remaining blocks run nothing
                    zeros = torch.zeros(B, dtype=torch.long, device=x.device)
                    for _ in range(i + 1, depth):
                        record.attn_tokens.append(zeros)
                        record.mlp_tokens.append(zeros)
                        record.add_widths(0, 0, 0)
                    break
                active, acc, R, keep = full[rows], acc[rows], R[rows], keep[rows]
                state = state.select_images(rows)
            state = state.compact(keep)
            if state.key_mask is not None:
                state.extras["avit_c"] = state.extras["avit_c"].masked_fill(~state.key_mask, float("-inf"))
        record.aux["avit_trace"] = (trace, N)
        return self._finish(output, record, state)

    def _forward_single_cpu(self, images: Tensor) -> RunOutput:
        """`forward_removing` for one image on the CPU, its ACT bookkeeping in NumPy.

        At batch 1 a block of the 32-px model takes ~1.5 ms and every small torch op ~10-20 us, so
        the removing loop's per-token arithmetic (scores, cumulative sums, thresholds, indices:
        a few dozen numbers per block) would eat much of what removal saves. Here it costs ~1 us a
        step. The halting score goes through the same torch sigmoid as the batched path, and the
        float32 sums are the same IEEE operations, so halting decisions are identical.
        """
        model, depth, threshold = self.model, self.depth, np.float32(1.0 - self.options.eps)
        x = model.embed(images)
        N = x.shape[1]
        state = TokenState.initial(x, model.num_prefix_tokens)
        record = ExecutionRecord(batch_size=1)
        pos = np.arange(N)  # original position of each current token
        c = np.zeros(N, dtype=np.float32)
        acc, R = x.new_zeros(x.shape[-1]), np.float32(1.0)
        trace = []
        for i, block in enumerate(model.blocks):
            trace.append((None, torch.from_numpy(pos)[None], None))
            state = run_block(block, i, state, NO_HOOKS, record)
            cls = state.x[0, 0]
            if i == depth - 1:
                record.aux["avit_last"] = (state, None)
                acc.add_(cls, alpha=float(R))
                break
            h = self.single_scores(state.x, i, pos)
            c += h
            halted = c >= threshold
            if halted[0]:  # CLS halts: it contributes its remainder and the image is done
                acc.add_(cls, alpha=float(R))
                zeros = torch.zeros(1, dtype=torch.long)
                for _ in range(i + 1, depth):
                    record.attn_tokens.append(zeros)
                    record.mlp_tokens.append(zeros)
                    record.add_widths(0, 0, 0)
                break
            acc.add_(cls, alpha=float(h[0]))
            R = R - h[0]
            if halted.any():
                keep = np.flatnonzero(~halted)
                pos, c = pos[keep], c[keep]
                state = state.gather(torch.from_numpy(keep)[None])
        record.aux["avit_trace"] = (trace, N)
        return self._finish(acc[None], record, state)

    # -- halting scores of the removing path (`HaltingReplay` scripts them) --
    def block_scores(self, out: Tensor, index: int, active: Tensor | None, positions: Tensor) -> Tensor:
        """(B', W) halting scores after block `index` of the images still running (`active`, None =
        all) for tokens at original `positions`; in place on a fresh tensor, few ops (batch-1 cost)."""
        return out[..., 0].mul(self.options.gamma).sub_(self.options.beta).sigmoid_()

    def single_scores(self, x: Tensor, index: int, positions: np.ndarray) -> np.ndarray:
        """`block_scores` of the one-image CPU path, as a float32 NumPy row (same IEEE operations)."""
        z = x[0, :, 0].numpy() * np.float32(self.options.gamma) - np.float32(self.options.beta)
        return torch.sigmoid(torch.from_numpy(z)).numpy()

    def _run_subbatch(self, block: nn.Module, index: int, state: TokenState, active: Tensor, record: ExecutionRecord) -> TokenState:
        """Run a block on the images still in the batch; record per-image counts for the full batch."""
        scratch = ExecutionRecord(batch_size=len(active), _packings=record._packings)  # packings live as long as their masks
        state = run_block(block, index, state, NO_HOOKS, scratch, pack=self.options.pack)
        zeros = torch.zeros(record.batch_size, dtype=torch.long, device=active.device)
        record.attn_tokens.append(zeros.index_copy(0, active, scratch.attn_tokens[0]))
        record.mlp_tokens.append(zeros.index_copy(0, active, scratch.mlp_tokens[0]))
        # widths per image of the full batch, where finished images ran nothing: linear terms scale
        # with the running fraction f, the N x N products too, hence a core side of sqrt(f) * W
        f = len(active) / record.batch_size
        record.add_widths(f * scratch.attn_width[0], math.sqrt(f) * scratch.core_width[0], f * scratch.mlp_width[0])
        return state

    # -- training losses and pictures --
    def extra_losses(self, out: RunOutput, targets: Tensor, teacher: RunOutput | None) -> dict[str, Tensor]:
        """ponder_weight · mean ρ over tokens and batch; distr_weight · KL(prior ‖ q).

        q_l = mean halting score h of block l (before the last block's forcing) over all tokens of
        the batch, halted tokens scored per `q_mode` (module docstring); normalised to sum 1 and
        clamped to [0.01, 0.99] as the official code. KL(prior ‖ q) = Σ_l prior_l (log prior_l −
        log q_l): the official direction (`F.kl_div(q.log(), prior)`), mass-covering, so q must put
        halting mass wherever the prior does; summed over blocks for the normalised prior (the
        true KL), averaged over blocks for the reference prior (the official `batchmean`).
        """
        if not self.options.halting:
            return {}
        aux = out.record.aux
        if "avit_ponder" not in aux:
            raise ValueError("A-ViT losses need the dense forward (training mode or dense=True); this output came from the removing inference path")
        q = distributed.global_mean(aux["avit_q"])  # the whole batch's halting distribution, also under torchrun
        q = (q / q.sum().clamp(min=torch.finfo(q.dtype).tiny)).clamp(0.01, 0.99)
        log_prior_ = self.log_prior.to(q.dtype)
        kl = (log_prior_.exp() * (log_prior_ - q.log())).sum()
        if self.options.prior == "reference":
            kl = kl / q.numel()
        return {"ponder": self.options.ponder_weight * aux["avit_ponder"].mean(), "distr": self.options.distr_weight * kl}

    def token_map(self, out: RunOutput) -> TokenMap | None:
        if "avit_depth" not in out.record.aux and "avit_trace" not in out.record.aux:
            return None
        depth = halting_depth(out.record)
        p = self.model.num_prefix_tokens
        return TokenMap(values=depth[:, p:].float().cpu(), label="blocks executed (halting depth)", vmin=1.0, vmax=float(self.depth))


class HaltingReplay(AViT):
    """A-ViT's removing inference with a scripted halting profile instead of learned scores: for speed.

    A-ViT's speed depends on where tokens halt, which a trained backbone decides. To time it on
    any backbone (random init included), this replays a profile: `depths` (B, N) gives, for each
    image of a batch of B and each original token (prefix first), the number of blocks it runs;
    the score is 1 in its last block and 0 before, so it halts exactly there. Everything else
    (removal, compaction, packing, finished images leaving the batch) is A-ViT's own loop.
    Draw profiles with `draw_halting_depths`. Its logits mean nothing; its token counts and time do.
    """

    name = "avit"

    def __init__(self, model: nn.Module, options: AViTOptions, depths: Tensor):
        super().__init__(model, options)
        self.set_depths(depths)

    def set_depths(self, depths: Tensor) -> None:
        n = self.model.cfg.num_patches + self.model.num_prefix_tokens
        if depths.dim() != 2 or depths.shape[1] != n:
            raise ConfigError(f"a halting profile needs (batch, {n}) depths, got {tuple(depths.shape)}")
        if int(depths.min()) < 1 or int(depths.max()) > self.depth:
            raise ConfigError(f"halting depths must lie in [1, {self.depth}] blocks")
        self.depths = depths.long()
        self._single = self.depths[0].numpy() if self.depths.shape[0] == 1 else None

    def forward(self, images: Tensor) -> RunOutput:
        if images.shape[0] != self.depths.shape[0]:
            raise ConfigError(f"the halting profile is for batches of {self.depths.shape[0]}, got {images.shape[0]} images")
        return self.forward_removing(images)

    def block_scores(self, out: Tensor, index: int, active: Tensor | None, positions: Tensor) -> Tensor:
        depths = self.depths.to(out.device)
        rows = depths if active is None else depths.index_select(0, active)
        return (rows.gather(1, positions) == index + 1).to(out.dtype)

    def single_scores(self, x: Tensor, index: int, positions: np.ndarray) -> np.ndarray:
        return (self._single[positions] == index + 1).astype(np.float32)


def draw_halting_depths(batch: int, tokens: int, depth: int, mean: float, std: float, seed: int = 0) -> Tensor:
    """(batch, tokens) halting depths: every patch token's depth drawn i.i.d. from N(mean, std),
    rounded and clipped to [1, depth]; the prefix (CLS, first column) runs all `depth` blocks, as
    the readout needs it to the end. Per-image mean depths then vary as a sample of `tokens - 1`."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(batch, tokens, generator=g, dtype=torch.float64) * std + mean).round().clamp(1, depth).long()
    d[:, 0] = depth
    return d


register("avit", lambda model, opts: AViT(model, opts), AViTOptions,
         "A-ViT: adaptive per-token halting (ACT on channel 0); halted tokens removed at inference, batched",
         label="A-ViT", kind="reducer", trains=True, recipe="avit_cifar10")
