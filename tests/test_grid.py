"""The patch grid (runtime.grid, RunOutput.patch_grid): every method gives every original patch its features.

No-op settings give the unmodified grid exactly; batched equals one-by-one; ToMe's unmerged grid equals
one built from a source map tracked by merging one-hot rows; a pruned patch holds its features at the
block it left (recorded by an independent hook); A-ViT holds a token at halting (replayed profile vs a
per-image loop over the blocks' own forward), and its removing and dense paths agree.
"""
from __future__ import annotations

import pytest
import torch
from conftest import make_model
from test_avit import images, random_halting

from vitbudget import ConfigError
from vitbudget.methods import METHODS, ToMe, build_method
from vitbudget.methods import mctf, pitome, thresh, tofu
from vitbudget.methods.abs import apply_extra_block
from vitbudget.methods.avit import AViTOptions, HaltingReplay, draw_halting_depths
from vitbudget.methods.tome import bipartite_merge
from vitbudget.models import ViTConfig
from vitbudget.runtime.state import TokenState

CFG = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)  # 4x4 patches + CLS
X = images(4, seed=5)

# every registered method at settings that change nothing; `depth` always adds a block, `multicrop` has no grid
NO_OP = {
    "baseline": {}, "tome": {"r": 0}, "evit": {"rho": 1.0, "stages": "1,2"}, "dynamicvit": {"rho": 1.0, "stages": "1,2"},
    "spot": {"rho": 1.0, "stages": "1,2"}, "spot_heuristic": {"rho": 1.0, "stages": "1,2"}, "abs": {"alpha": 0.0},
    "avit": {"halting": False}, "resolution": {"scale": 1.0},
    "tome+abs": {"r": 0, "alpha": 0.0}, "evit+abs": {"rho": 1.0, "stages": "1,2", "alpha": 0.0},
    "dynamicvit+abs": {"rho": 1.0, "stages": "1,2", "alpha": 0.0}, "spot+abs": {"rho": 1.0, "stages": "1,2", "alpha": 0.0},
    "spot_heuristic+abs": {"rho": 1.0, "stages": "1,2", "alpha": 0.0}, "avit+abs": {"halting": False, "alpha": 0.0},
    "mctf": {"r": 0}, "zerotprune": {"rho": 1.0, "stages": "1,2"}, "pitome": {"ratio": 1.0}, "tofu": {"r": 0},
    "thresh": {"thr0": 1.5},
}
NO_NO_OP = {"depth", "multicrop"}
REDUCING = [
    ("tome", {"r": 3}), ("evit", {"rho": 0.5, "stages": "1,2"}), ("evit", {"rho": 0.5, "stages": "1,2", "fuse": True}),
    ("dynamicvit", {"rho": 0.6, "stages": "1,2"}), ("spot", {"rho": 0.6, "stages": "1,2"}),
    ("spot_heuristic", {"rho": 0.6, "stages": "1,2"}), ("abs", {"alpha": 0.3}), ("depth", {}), ("resolution", {"scale": 1.5}),
    ("tome+abs", {"r": 3, "alpha": 0.3}), ("evit+abs", {"rho": 0.5, "stages": "1,2", "alpha": 0.3}),
    ("dynamicvit+abs", {"rho": 0.6, "stages": "1,2", "alpha": 0.3}), ("spot+abs", {"rho": 0.6, "stages": "1,2", "alpha": 0.3}),
    ("spot_heuristic+abs", {"rho": 0.6, "stages": "1,2", "alpha": 0.3}),
    ("mctf", {"r": 3}), ("mctf", {"r": 3, "one_step_ahead": 0}), ("zerotprune", {"rho": 0.5, "stages": "1,2"}),
    ("pitome", {"ratio": 0.8}), ("tofu", {"r": 2}), ("thresh", {"thr0": 0.7}),
]
PRUNING = [  # (method, options, where it drops: inside a stage block after attention (EViT), before it, or after it)
    ("evit", {"rho": 0.5, "stages": "1,2"}, "inside"), ("evit", {"rho": 0.5, "stages": "1,2", "fuse": True}, "inside"),
    ("dynamicvit", {"rho": 0.6, "stages": "1,3"}, "before"), ("spot", {"rho": 0.6, "stages": "1,2"}, "before"),
    ("spot_heuristic", {"rho": 0.6, "stages": "2,3"}, "before"), ("zerotprune", {"rho": 0.5, "stages": "1,2"}, "after"),
]


@pytest.fixture(scope="module")
def model():
    return make_model(CFG)


def run(method, x=X):
    with torch.no_grad():
        return method.eval()(x)


def unmodified(model, x=X):
    """(B, 4, 4, C) final-normed patch tokens of the plain model, prefix dropped."""
    with torch.no_grad():
        return model.forward_features(x)[:, model.num_prefix_tokens :].reshape(x.shape[0], 4, 4, -1)


def test_baseline_grid_is_the_final_patch_tokens_without_prefix_or_registers():
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, reg_tokens=2)
    model = make_model(cfg)
    out = run(build_method("baseline", model))
    with torch.no_grad():
        pre = model.blocks(model.embed(X))[:, 3:]
    assert torch.equal(out.patch_grid(), unmodified(model))
    assert torch.equal(out.patch_grid(norm=False), pre.reshape(4, 4, 4, -1))
    assert torch.allclose(model.norm(out.patch_grid(norm=False)), out.patch_grid(), atol=1e-6)


def test_every_method_is_covered():
    assert set(METHODS) <= set(NO_OP) | NO_NO_OP, "a new method needs its no-op settings here"


@pytest.mark.parametrize("name", sorted(NO_OP))
def test_no_op_settings_give_the_unmodified_grid(model, name):
    grid = run(build_method(name, model, **NO_OP[name])).patch_grid()
    assert grid.shape == (4, 4, 4, CFG.embed_dim)
    assert (grid - unmodified(model)).abs().max() <= 1e-6


@pytest.mark.parametrize("name, opts", REDUCING, ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.slow
def test_batched_equals_one_by_one(model, name, opts):
    method = build_method(name, model, **opts)
    out = run(method)
    grid, pre = out.patch_grid(), out.patch_grid(norm=False)
    side = 6 if name == "resolution" else 4  # resolution scaling's grid is its upsampled one
    assert grid.shape == pre.shape == (4, side, side, CFG.embed_dim) and torch.isfinite(grid).all()
    assert torch.allclose(model.norm(pre), grid, atol=1e-6)
    assert not torch.allclose(grid, unmodified(model), atol=1e-3) if side == 4 else True
    single = torch.cat([run(method, X[i : i + 1]).patch_grid() for i in range(4)])
    assert (single - grid).abs().max() <= 1e-5


def test_avit_removing_equals_dense_and_batched_equals_one_by_one():
    model, opts = random_halting()
    x = images(8, seed=3)
    removing, dense = build_method("avit", model, **opts), build_method("avit", model, dense=True, **opts)
    grid = run(removing, x).patch_grid()
    assert torch.isfinite(grid).all() and not torch.allclose(grid, unmodified(model, x), atol=1e-3)
    assert (run(dense, x).patch_grid() - grid).abs().max() <= 1e-5
    unpacked = build_method("avit", model, pack=False, **opts)
    assert (run(unpacked, x).patch_grid() - grid).abs().max() <= 1e-5
    single = torch.cat([run(removing, x[i : i + 1]).patch_grid() for i in range(8)])
    assert (single - grid).abs().max() <= 1e-5
    stack = build_method("avit+abs", model, alpha=0.3, **opts)
    refined = run(stack, x)
    changed = (refined.patch_grid() - grid).abs().amax(-1).flatten(1) > 1e-6
    assert changed.any() and torch.equal(changed, refined.record.aux["stack_refined"])  # exactly the refined patches moved
    assert (torch.cat([run(stack, x[i : i + 1]).patch_grid() for i in range(8)]) - refined.patch_grid()).abs().max() <= 1e-5


@pytest.mark.slow
def test_avit_grid_holds_each_token_at_halting():
    """A replayed halting profile (some images finish early) against a per-image loop over blocks' own forward."""
    model = make_model(CFG)
    depths = draw_halting_depths(3, 17, CFG.depth, mean=2.5, std=1.5, seed=0)
    depths[1, 0] = 2  # image 1's CLS halts after block 2: its remaining tokens stop there too
    depths[2, 0] = 1
    x = images(3, seed=1)
    grid = run(HaltingReplay(model, AViTOptions(), depths), x).patch_grid(norm=False)
    with torch.no_grad():
        for b in range(3):
            stop = torch.minimum(depths[b], depths[b, 0])  # blocks each token runs
            cur = model.embed(x[b : b + 1])
            for i, block in enumerate(model.blocks):
                running = (stop > i).nonzero().squeeze(1)
                if running.numel():
                    cur[:, running] = block(cur[:, running])
            assert (grid[b].reshape(16, -1) - cur[0, 1:]).abs().max() <= 1e-5
            one = run(HaltingReplay(model, AViTOptions(), depths[b : b + 1]), x[b : b + 1]).patch_grid(norm=False)
            assert (one[0] - grid[b]).abs().max() <= 1e-5


class SourceTracking(ToMe):
    """ToMe that also merges a one-hot source map (rows: tokens, columns: original tokens) with the same
    matching, as ToMe's reference tracks sources: a patch belongs to the token whose row covers it."""

    def begin(self, model, state, record):
        state = super().begin(model, state, record)
        record.aux["source"] = torch.eye(state.width).expand(state.batch_size, -1, -1)
        return state

    def after_attention(self, index, state, info, record):
        r = min(self.options.r, (state.width - state.num_prefix) // 2)
        if r > 0:
            shadow = state.replace(x=record.aux["source"])
            record.aux["source"] = bipartite_merge(shadow, info.keys.mean(dim=1), r)[0].x
        return super().after_attention(index, state, info, record)


def test_tome_unmerges_by_its_source_map(model):
    from vitbudget.methods.tome import ToMeOptions

    out = run(SourceTracking(model, ToMeOptions(r=3)))
    source = out.record.aux["source"][:, 1:, 1:] > 0  # (B, final patch tokens, 16 patches)
    assert torch.equal(source.sum(dim=1), torch.ones(4, 16, dtype=torch.long))  # each patch in exactly one token
    assert out.state.width < 10  # merging happened
    owner = source.float().argmax(dim=1)  # (B, 16) token of each patch
    final = out.state.x[:, 1:]
    expected = torch.stack([final[b, owner[b]] for b in range(4)])
    assert torch.equal(out.patch_grid(norm=False).reshape(4, 16, -1), expected)
    assert torch.equal(out.patch_grid().reshape(4, 16, -1), model.norm(expected))


def per_patch(state) -> torch.Tensor:
    """(B, 16, C) features of the real tokens of `state` by patch id, NaN elsewhere (a plain loop)."""
    out = torch.full((state.batch_size, 16, state.x.shape[-1]), float("nan"))
    for b in range(state.batch_size):
        for t, pid in enumerate(state.patch_ids[b].tolist()):
            if pid >= 0 and (state.key_mask is None or state.key_mask[b, t]):
                out[b, pid] = state.x[b, t]
    return out


@pytest.mark.parametrize("name, opts, where", PRUNING, ids=lambda v: v if isinstance(v, str) else "")
def test_pruned_patch_holds_its_features_at_the_drop_block(model, name, opts, where):
    method = build_method(name, model, **opts).eval()
    seen = {}
    after_attention, after_block = method.after_attention, method.after_block

    def spy_attention(index, state, info, record):
        seen["mid", index] = per_patch(state)  # what EViT prunes from
        return after_attention(index, state, info, record)

    def spy_block(index, state, info, record):
        seen["out", index] = per_patch(state)  # block output: what a stage before block index + 1 prunes from
        return after_block(index, state, info, record)

    method.after_attention, method.after_block = spy_attention, spy_block
    out = run(method)
    stages = [int(s) for s in opts["stages"].split(",")]
    drop = out.record.aux["drop_stage"]  # (B, 16): stage 1..K at which a patch left, K + 1 = kept
    assert (drop <= len(stages)).any()
    expected = per_patch(out.state)
    for k, block in enumerate(stages, start=1):
        at = seen["mid", block] if where == "inside" else seen["out", block - 1 if where == "before" else block]
        expected[drop == k] = at[drop == k]
    assert torch.isfinite(expected).all()
    assert torch.equal(out.patch_grid(norm=False).reshape(4, 16, -1), expected)


def test_masked_training_path_fills_like_the_removing_path(model):
    """DynamicViT with the inference masks fed to the masked path: dropped tokens keep being computed there,
    but the grid holds them at their drop block, as removal does (the policy softmax leaks ~1e-6)."""
    method = build_method("dynamicvit", model, rho=0.6, stages="1,3")
    removed = run(method)
    method.fixed_keep = removed.record.aux["kept_ids"]
    masked = run(method)
    assert masked.state.policy is not None
    assert (masked.patch_grid() - removed.patch_grid()).abs().max() <= 1e-4


def test_abs_writes_refined_tokens_back(model):
    out = run(build_method("abs", model, alpha=0.25))
    selected = out.record.aux["abs_selected"]  # (B, k) patch indices
    with torch.no_grad():
        x = model.blocks(model.embed(X))
        index = torch.cat([torch.zeros(4, 1, dtype=torch.long), selected + 1], dim=1)
        refined = apply_extra_block(build_method("abs", model, alpha=0.25).block, torch.stack([x[b, index[b]] for b in range(4)]))
        for b in range(4):
            x[b, index[b]] = refined[b]
    assert torch.allclose(out.patch_grid(norm=False).reshape(4, 16, -1), x[:, 1:], atol=1e-6)


@pytest.mark.parametrize("reducer, opts", [("tome", {"r": 3}), ("evit", {"rho": 0.5, "stages": "1,2"})])
def test_stacks_change_only_the_refined_patches(model, reducer, opts):
    alone = run(build_method(reducer, model, **opts)).patch_grid()
    stacked = run(build_method(f"{reducer}+abs", model, alpha=0.3, **opts))
    changed = (stacked.patch_grid() - alone).abs().amax(-1).flatten(1) > 1e-6
    refined = stacked.record.aux["stack_refined"]  # (B, 16) patches whose token the extra block refined
    if reducer == "tome":  # a refined token's merged patches move with it
        assert changed.sum() > refined.sum()
        assert torch.equal(changed & refined, refined)
    else:
        assert torch.equal(changed, refined)


def test_grid_is_differentiable_in_training(model):
    method = build_method("evit", model, rho=0.5, stages="1,2").train()
    out = method(X)
    out.patch_grid().square().mean().backward()
    assert model.patch_embed.proj.weight.grad is not None and torch.isfinite(model.patch_embed.proj.weight.grad).all()
    model.zero_grad()


def test_multicrop_has_no_single_grid(model):
    out = run(build_method("multicrop", model))
    with pytest.raises(ConfigError, match="multicrop has no single patch grid"):
        out.patch_grid()


@pytest.mark.parametrize("name, opts", [("tome", {"r": 3}), ("evit", {"rho": 0.5, "stages": "1,2", "fuse": True})])
@pytest.mark.slow
def test_compiled_runs_give_the_same_grid(model, name, opts):
    """The run's grid bookkeeping (references in TokenState.history) survives torch.compile without a graph break."""
    from vitbudget.methods.compiled import CompiledMethod

    method = build_method(name, model, **opts).eval()
    torch._dynamo.reset()
    compiled = CompiledMethod(method, fullgraph=True, backend="eager")
    with torch.no_grad():
        eager, out = method(X), compiled(X)
    torch.testing.assert_close(out.patch_grid(), eager.patch_grid(), rtol=1e-5, atol=1e-5)


def _shadow_step(fn):
    """A merging step f(state, ...) -> new state (or (new state, macs)) re-run on one-hot source rows."""
    def step(state, source, *args, **kwargs):
        out = fn(state.replace(x=source), *args, **kwargs)
        return (out if isinstance(out, TokenState) else out[0]).x
    return step


def _mctf_shadow(state, source, attn, r, options, ahead):
    """MCTF's slot map from its own matching (the block input is the metric, so the rows cannot stand in for x)."""
    dest, _ = mctf.match(state.x, attn.mean(dim=(1, 2)), state.size, r, state.num_prefix, options)
    return mctf._pool_tokens(source, dest, state.width - r, 1)


# (method, options, module, the merging step the method calls, how to carry source rows through it)
MERGING = [
    ("mctf", {"r": 3}, mctf, "merge", _mctf_shadow),
    ("mctf", {"r": 3, "one_step_ahead": 0, "pooling_type": 2}, mctf, "merge", _mctf_shadow),
    ("pitome", {"ratio": 0.8}, pitome, "energy_merge", _shadow_step(pitome.energy_merge)),
    ("pitome", {"ratio": 0.8, "bsm_half": "none"}, pitome, "energy_merge", _shadow_step(pitome.energy_merge)),
    ("tofu", {"r": 2}, tofu, "tofu_step", _shadow_step(tofu.tofu_step)),
    ("thresh", {"thr0": 0.7}, thresh, "merge_per_image", _shadow_step(thresh.merge_per_image)),
    ("thresh", {"thr0": 0.7, "budget": "batch"}, thresh, "bipartite_merge", _shadow_step(bipartite_merge)),
]


@pytest.mark.parametrize("name, opts, module, fn, shadow", MERGING, ids=lambda v: v if isinstance(v, str) else "")
def test_merged_patch_gets_the_token_it_joined(model, monkeypatch, name, opts, module, fn, shadow):
    """One-hot source rows (tokens x original tokens) carried through every merging step by the method's own
    matching: a patch whose row ends in a final token has that token's features; one whose rows vanished
    (ToFu's pruning) has its token's features at the step it was dropped."""
    real = getattr(module, fn)
    track = {"source": torch.eye(17).expand(4, -1, -1), "left": torch.full((4, 16, CFG.embed_dim), float("nan")), "merges": 0}

    def spy(state, *args, **kwargs):
        out = real(state, *args, **kwargs)
        new = out if isinstance(out, TokenState) else out[0]
        source = shadow(state, track["source"], *args, **kwargs)
        was, now = covered(state, track["source"]), covered(new, source)
        assert not (now & ~was).any()
        owner = track["source"][:, :, 1:].argmax(dim=1)  # (B, 16) token that covered each patch before the step
        for b, p in (was & ~now).nonzero().tolist():
            track["left"][b, p] = state.x[b, owner[b, p]]
        track["source"], track["merges"] = source, track["merges"] + int((new.width < state.width) or new.key_mask is not None)
        return out

    monkeypatch.setattr(module, fn, spy)
    out = run(build_method(name, model, **opts))
    assert track["merges"] >= 2
    final = covered(out.state, track["source"])
    assert torch.equal(torch.isnan(track["left"][..., 0]), final)  # every patch ends in a token or left at one step
    owner = track["source"][:, :, 1:].masked_fill(~real_rows(out.state)[..., None], 0).argmax(dim=1)
    expected = torch.where(final[..., None], torch.stack([out.state.x[b, owner[b]] for b in range(4)]), track["left"])
    if name == "tofu":
        assert (~final).any() and (track["source"][:, 1:, 1:] > 0).sum(dim=2).amax() > 1  # pruned and fused patches
    assert torch.equal(out.patch_grid(norm=False).reshape(4, 16, -1), expected)


def real_rows(state) -> torch.Tensor:
    return torch.ones(state.x.shape[:2], dtype=torch.bool) if state.key_mask is None else state.key_mask


def covered(state, source) -> torch.Tensor:
    """(B, 16) patches some real token of `state` covers, by its source rows (padding rows are stale copies)."""
    rows = (source[:, :, 1:] > 0) & real_rows(state)[..., None]
    assert rows.sum(dim=1).amax() <= 1  # each patch in at most one token
    return rows.any(dim=1)
