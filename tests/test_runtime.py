"""Block runner and TokenState: exact equivalence with the plain forward, removal vs masking, batching."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY
from vitbudget import Hooks, TokenState, run
from vitbudget.runtime.attention import multihead_attention


class DropPerImage(Hooks):
    """Before block `at`, keep a different, given set of patch tokens in each image."""

    def __init__(self, at: int, keep: torch.Tensor, mode: str):
        self.at, self.keep, self.mode = at, keep, mode  # keep: (B, N) bool incl. prefix

    def before_block(self, index, state, record):
        if index != self.at:
            return state
        if self.mode == "remove":
            return state.compact(self.keep)
        return state.replace(policy=self.keep.float())


class NeedsProbs(Hooks):
    def needs_probs(self, index):
        return True


def random_keep(batch: int, n: int, seed: int, min_keep: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, n, generator=g) < 0.5
    keep[:, 0] = True  # CLS stays
    keep[:, 1 : 1 + min_keep] = True
    return keep


def test_runner_equals_plain_forward_exactly(tiny_model):
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        out = run(tiny_model, x)
        assert torch.equal(out.logits, tiny_model(x))
    assert [int(t[0]) for t in out.record.attn_tokens] == [17] * TINY.depth


def test_explicit_softmax_path_matches_sdpa(tiny_model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(run(tiny_model, x, NeedsProbs()).logits, tiny_model(x), atol=1e-5)


def test_attention_probs_are_a_distribution(tiny_model):
    h = torch.randn(2, 17, 32)
    _, info = multihead_attention(tiny_model.blocks[0].attn, h, need_probs=True, need_keys=True)
    assert info.probs.shape == (2, 2, 17, 17) and info.keys.shape == (2, 2, 17, 16)
    assert torch.allclose(info.probs.sum(-1), torch.ones(2, 2, 17), atol=1e-6)


def test_padded_batch_equals_one_by_one(tiny_model):
    """Images keep different numbers of tokens; the padded batch gives each image's own logits."""
    x = torch.randn(6, 3, 32, 32)
    keep = random_keep(6, 17, seed=1)
    with torch.no_grad():
        out = run(tiny_model, x, DropPerImage(1, keep, "remove"))
        for i in range(6):
            alone = run(tiny_model, x[i : i + 1], DropPerImage(1, keep[i : i + 1], "remove"))
            assert torch.allclose(out.logits[i], alone.logits[0], atol=1e-5)
    assert out.record.attn_tokens[0].tolist() == [17] * 6
    assert out.record.attn_tokens[1].tolist() == keep.sum(1).tolist()
    assert out.record.core_width[1] == int(keep.sum(1).max())  # the attention product is padded
    assert out.record.attn_width[1] == pytest.approx(keep.sum(1).float().mean())  # projections and MLP run packed
    assert out.record.mlp_width[1] == pytest.approx(keep.sum(1).float().mean())


@pytest.mark.parametrize("hooks", ["plain", "needs_probs"])
def test_packed_block_equals_padded_block(tiny_model, monkeypatch, hooks):
    """Per-token layers on packed real tokens give the padded computation's real tokens, probabilities too."""
    import vitbudget.runtime.runner as runner

    x = torch.randn(5, 3, 32, 32)
    keep = random_keep(5, 17, seed=3)
    class Drop(DropPerImage, NeedsProbs if hooks == "needs_probs" else Hooks):
        pass
    with torch.no_grad():
        packed = run(tiny_model, x, Drop(1, keep, "remove"))
        monkeypatch.setattr(runner, "PACK_MIN_PADDING", 1.1)  # never pack
        padded = run(tiny_model, x, Drop(1, keep, "remove"))
    assert packed.record.attn_width[1] < padded.record.attn_width[1] == int(keep.sum(1).max())
    assert torch.allclose(packed.logits, padded.logits, atol=1e-5)
    real = packed.state.key_mask
    assert torch.allclose(packed.state.x[real], padded.state.x[real], atol=1e-5)


def test_removal_equals_masking_for_the_same_hard_mask(tiny_model):
    """Masking (policy softmax, dense compute) and removal agree on what kept tokens see."""
    x = torch.randn(4, 3, 32, 32)
    keep = random_keep(4, 17, seed=2)
    with torch.no_grad():
        removed = run(tiny_model, x, DropPerImage(1, keep, "remove")).logits
        masked = run(tiny_model, x, DropPerImage(1, keep, "mask")).logits
    assert torch.allclose(removed, masked, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), n=st.integers(2, 12), seed=st.integers(0, 10_000))
def test_compact_keeps_order_and_bookkeeping(batch, n, seed):
    g = torch.Generator().manual_seed(seed)
    state = TokenState.initial(torch.randn(batch, n, 3, generator=g), num_prefix=1)
    state.extras["stat"] = torch.arange(n).float().expand(batch, n).clone()
    keep = torch.rand(batch, n, generator=g) < 0.6
    keep[:, 0] = True
    new = state.compact(keep)
    assert new.num_tokens().tolist() == keep.sum(1).tolist()
    for b in range(batch):
        k = int(keep[b].sum())
        ids = new.patch_ids[b, :k]
        expected = (torch.nonzero(keep[b]).flatten() - 1).clamp(min=-1)
        assert ids.tolist() == expected.tolist()  # original order kept
        assert torch.equal(new.x[b, :k], state.x[b, keep[b]])
        assert torch.equal(new.extras["stat"][b, :k], torch.nonzero(keep[b]).flatten().float())


def test_keep_top_patches_and_grid_scatter():
    state = TokenState.initial(torch.randn(2, 5, 4), num_prefix=1)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.8, 0.1, 0.2, 0.7]])
    kept = state.keep_top_patches(scores, 2)
    assert kept.patch_ids.tolist() == [[-1, 1, 2], [-1, 0, 3]]
    grid = kept.to_patch_grid(torch.ones(2, 3), num_patches=4, fill=0.0)
    assert grid.tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]


def test_gradients_flow_through_policy(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    policy = torch.ones(2, 17, requires_grad=True)

    class Soft(Hooks):
        def before_block(self, index, state, record):
            return state.replace(policy=policy) if index == 1 else state

    run(tiny_model, x, Soft()).logits.sum().backward()
    assert policy.grad is not None and torch.isfinite(policy.grad).all() and policy.grad.abs().sum() > 0


@pytest.mark.parametrize("sizes", [False, True])
def test_token_sizes_add_proportional_attention(tiny_model, sizes):
    """With all sizes 1, proportional attention (log size bias) is a no-op."""
    x = torch.randn(2, 3, 32, 32)

    class Sized(Hooks):
        def begin(self, model, state, record):
            return state.replace(size=torch.ones(state.batch_size, state.width)) if sizes else state

    with torch.no_grad():
        assert torch.allclose(run(tiny_model, x, Sized()).logits, tiny_model(x), atol=1e-6)


class EmptyRow(NeedsProbs):
    """Before block 1, image 1 keeps nothing (and image 0 only its first patches): explicit softmax after."""

    def before_block(self, index, state, record):
        if index != 1:
            return state
        keep = torch.zeros(state.x.shape[:2], dtype=torch.bool)
        keep[0, 2:9] = True
        return state.compact(keep)


def test_compact_never_leaves_an_image_without_a_key(tiny_model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = run(tiny_model, x, EmptyRow())
    assert torch.isfinite(out.logits).all()
    assert out.record.attn_tokens[1].tolist() == [7, 1, 1]  # empty images keep their first real token (CLS)
    state = TokenState.initial(torch.randn(2, 5, 3), num_prefix=1)
    padded = state.compact(torch.tensor([[False, True, False, True, True], [False, False, True, False, True]]))
    again = padded.compact(torch.zeros(2, 3, dtype=torch.bool))  # with a key mask: the first real token stays
    assert again.patch_ids.tolist() == [[0], [1]] and again.key_mask is None
    single = state.compact(torch.zeros(2, 5, dtype=torch.bool)[:1])
    assert single.width == 1 and single.patch_ids.tolist() == [[-1]]


def test_drop_path_on_packed_tokens_drops_whole_images(monkeypatch):
    """Training with stochastic depth: packed rows get the padded path's per-image draws, same seed."""
    import vitbudget.runtime.runner as runner
    from conftest import make_model

    model = make_model(TINY.replace(drop_path_rate=0.5)).train()
    x = torch.randn(6, 3, 32, 32)
    keep = random_keep(6, 17, seed=4)

    def forward(seed):
        torch.manual_seed(seed)
        return run(model, x, DropPerImage(1, keep, "remove"))

    with torch.no_grad():
        packed = forward(0)
        assert packed.record.attn_width[1] < packed.record.core_width[1]  # block 1 ran packed
        monkeypatch.setattr(runner, "PACK_MIN_PADDING", 1.1)  # never pack
        padded = forward(0)
        other = forward(1)
    assert torch.allclose(packed.logits, padded.logits, atol=1e-5)
    assert not torch.allclose(padded.logits, other.logits, atol=1e-3)  # the draws matter
