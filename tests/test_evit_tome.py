"""EViT and ToMe: exact baselines at rho=1 / r=0, token counts, batching, FLOPs, bad options."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY, make_model
from test_cost import counted_flops
from vitbudget import ConfigError, run
from vitbudget.runtime.cost import macs_per_image
from vitbudget.methods import build_method
from vitbudget.methods.tome import bipartite_merge
from vitbudget.runtime.state import TokenState

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model():
    return make_model()


def logits(method, x=X):
    with torch.no_grad():
        return method.eval()(x)


@pytest.mark.slow
def test_evit_rho_one_and_tome_r_zero_are_exactly_the_baseline(model):
    base = run(model, X).logits
    for name, opts in [("evit", dict(rho=1.0, stages="1,2")), ("evit", dict(rho=1.0, stages="0", fuse=True)), ("tome", dict(r=0))]:
        out = logits(build_method(name, model, **opts))
        assert torch.equal(out.logits, base), (name, opts)
        assert out.record.extra_macs is None


@pytest.mark.parametrize("fuse", [False, True])
def test_evit_keeps_ceil_rho_of_current_patches_by_cls_attention(model, fuse):
    out = logits(build_method("evit", model, rho=0.7, stages="0,2", fuse=fuse))
    n0 = TINY.num_patches  # 16
    k1 = math.ceil(0.7 * n0)  # 12 (+1 fused)
    k2 = math.ceil(0.7 * (k1 + fuse))
    attn = [int(t[0]) for t in out.record.attn_tokens]
    mlp = [int(t[0]) for t in out.record.mlp_tokens]
    assert attn == [17, 1 + k1 + fuse, 1 + k1 + fuse]
    assert mlp == [1 + k1 + fuse, 1 + k1 + fuse, 1 + k2 + fuse]
    drop = out.record.aux["drop_stage"]
    if not fuse:
        assert ((drop == 3).sum(1) == k2).all()
    assert set(drop.unique().tolist()) <= {1.0, 2.0, 3.0}
    assert ((drop == 1).sum(1) == n0 - k1).all()


def test_evit_selection_matches_direct_cls_attention(model):
    """Stage in block 0: the kept patches are the top-k of block 0's head-averaged CLS attention."""
    from vitbudget.runtime.attention import multihead_attention

    with torch.no_grad():
        h = model.embed(X)
        _, info = multihead_attention(model.blocks[0].attn, model.blocks[0].norm1(h), need_probs=True)
    expected = info.probs[:, :, 0, 1:].mean(1).topk(12, dim=1).indices.sort(1).values
    out = logits(build_method("evit", model, rho=0.7, stages="0"))
    kept = (out.record.aux["drop_stage"] == 2).nonzero()[:, 1].reshape(4, 12)
    assert torch.equal(kept, expected)


@pytest.mark.parametrize("normalize", [False, True])
def test_evit_fused_token_is_the_attention_weighted_sum(model, normalize):
    """The reference sums the dropped tokens weighted by CLS attention; fuse_normalize divides by the weights' sum."""
    method = build_method("evit", model, rho=0.5, stages="0", fuse=True, fuse_normalize=normalize).eval()
    seen = {}
    orig = method.after_attention

    def spy(index, state, info, record):
        new = orig(index, state, info, record)
        if index == 0:
            seen.update(before=state, probs=info.probs, after=new)
        return new

    method.after_attention = spy
    with torch.no_grad():
        method(X)
    before, after, probs = seen["before"], seen["after"], seen["probs"]
    cls = probs[:, :, 0, 1:].mean(1)
    kept = after.patch_ids[:, 1:-1]
    for b in range(4):
        dropped = torch.tensor([i for i in range(16) if i not in kept[b].tolist()])
        w = cls[b, dropped] / (cls[b, dropped].sum() if normalize else 1.0)
        assert not normalize or float(cls[b, dropped].sum()) < 0.9  # the two differ
        assert torch.allclose(after.x[b, -1], (before.x[b, 1 + dropped] * w[:, None]).sum(0), atol=1e-6)
    assert (after.patch_ids[:, -1] == -1).all()


@pytest.mark.parametrize("name,opts", [("evit", dict(rho=0.6, stages="1,2")), ("evit", dict(rho=0.6, stages="1,2", fuse=True)), ("tome", dict(r=4))])
@pytest.mark.slow
def test_batched_equals_one_by_one(model, name, opts):
    method = build_method(name, model, **opts)
    full = logits(method).logits
    for i in range(4):
        assert torch.allclose(full[i], logits(method, X[i : i + 1]).logits[0], atol=1e-5)


def test_tome_token_counts_sizes_and_flops():
    from vitbudget.models import ViTConfig

    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    model = make_model(cfg)
    method = build_method("tome", model, r=4).eval()
    counted, out = counted_flops(model, X[:2], method)
    assert [int(t[0]) for t in out.record.mlp_tokens] == [13, 9, 5]  # 16 patches, then at most half of what is left
    assert out.state.size[:, 1:].sum(1).tolist() == [16.0, 16.0]  # every patch is somewhere
    ours = macs_per_image(cfg, out.record)
    assert counted == pytest.approx(2 * float(ours.sum()), rel=1e-9)  # blocks + matching matmul
    assert float(out.record.extra_macs[0]) == 16 * (9 * 8 + 7 * 6 + 5 * 4)  # Na*Nb*head_dim per block, sets over all 17, 13, 9 tokens


def test_bipartite_merge_conserves_mass_and_keeps_prefix():
    g = torch.Generator().manual_seed(3)
    state = TokenState.initial(torch.randn(3, 11, 5, generator=g), num_prefix=1)
    state = state.replace(size=torch.rand(3, 11, generator=g) + 0.5)
    new, macs = bipartite_merge(state, torch.randn(3, 11, 4, generator=g), r=3)
    assert new.width == 8 and macs == 6 * 5 * 4  # A: 6 even positions of 11, B: 5 odd ones
    assert torch.allclose((new.x * new.size[..., None]).sum(1), (state.x * state.size[..., None]).sum(1), atol=1e-5)
    assert torch.equal(new.x[:, 0], state.x[:, 0]) and (new.patch_ids[:, 0] == -1).all()
    assert torch.allclose(new.size.sum(1), state.size.sum(1))


def test_tome_merges_duplicate_tokens_first():
    x = torch.randn(1, 9, 4)
    x[0, 2] = x[0, 1]  # patch 1 (position 2: set A) duplicates patch 0 (position 1: set B)
    state = TokenState.initial(x, num_prefix=1)
    metric = x.clone()
    new, _ = bipartite_merge(state, metric, r=1)
    assert 1 not in new.patch_ids[0].tolist() and new.size[0, new.patch_ids[0].tolist().index(0)] == 2
    # order: CLS, unmerged A (patches 3, 5, 7 at positions 4, 6, 8), B (patches 0, 2, 4, 6)
    assert new.patch_ids[0].tolist() == [-1, 3, 5, 7, 0, 2, 4, 6]


@pytest.mark.parametrize("name,opts,match", [
    ("evit", dict(rho=0.0), "rho"), ("evit", dict(rho=1.5), "rho"), ("evit", dict(rho=float("nan")), "rho"),
    ("evit", dict(stages="1,1"), "increasing"), ("evit", dict(stages="2,1"), "increasing"), ("evit", dict(stages="3"), "outside"),
    ("evit", dict(stages="x"), "comma"), ("evit", dict(stages="-1"), ">= 0"),
    ("tome", dict(r=9), "more than half"), ("tome", dict(r=-1), ">= 0"),
])
def test_bad_options_are_config_errors(model, name, opts, match):
    with pytest.raises(ConfigError, match=match):
        build_method(name, model, **opts)


def test_cli_takes_the_new_flags():
    from vitbudget.cli import build_parser

    args = build_parser().parse_args(["eval", "--method", "evit", "--rho", "0.5", "--fuse", "true", "--method", "tome", "--r", "3", "--stages", "2,4"])
    assert args.opt_rho == 0.5 and args.opt_fuse is True and args.opt_r == 3 and args.opt_stages == "2,4"


def test_tome_caps_r_at_half_the_patch_tokens_left_so_cls_is_never_merged():
    """r = 8 on 16 patches halves what is left in every block: 16 -> 8 -> 4 -> 2 -> 1, then nothing
    (r <= (N - prefix) // 2 = 0). Without the prefix in the cap, the last two tokens (CLS, one
    patch) would merge: the CLS's mass would land in the patch."""
    from vitbudget.models import ViTConfig

    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=6, num_heads=2, num_classes=10)
    model = make_model(cfg)
    out = logits(build_method("tome", model, r=8), X[:2])
    assert [int(t[0]) for t in out.record.mlp_tokens] == [9, 5, 3, 2, 2, 2]
    assert out.state.size.tolist() == [[1.0, 16.0]] * 2  # CLS alone, every patch in the one token left
    assert out.state.patch_ids[:, 0].tolist() == [-1, -1]


def test_evit_stage_keeping_every_token_changes_nothing(model):
    """rho 0.99 keeps ceil(0.99 * 16) = 16 of 16 patches: the stage returns the state as it is, with no
    fused token (it would be a zero-weight token that still takes attention)."""
    base = run(model, X).logits
    out = logits(build_method("evit", model, rho=0.99, stages="1", fuse=True))
    assert torch.allclose(out.logits, base, atol=1e-6)  # block 1 runs an explicit softmax (EViT reads it), not SDPA
    assert [int(t[0]) for t in out.record.mlp_tokens] == [17, 17, 17]
    assert out.state.width == 17 and (out.state.patch_ids[:, 1:] >= 0).all()
