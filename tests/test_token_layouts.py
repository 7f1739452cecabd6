"""Every registered method on every token layout the model families bring: registers, average
pooling without a class token, a distillation token, [CLS, mean] pooling and no head at all.

A method either runs (its no-op setting reproduces the baseline, pruning keeps every prefix
token) or refuses the layout with a ConfigError that says why.
"""
from __future__ import annotations

import pytest
import torch

from conftest import TINY, make_model
from vitbudget import ConfigError, run
from vitbudget.methods import METHODS, build_method

LAYOUTS = {
    "registers": TINY.replace(reg_tokens=4),
    "avg-no-class-token": TINY.replace(class_token=False, global_pool="avg"),
    "avg-registers-no-class-token": TINY.replace(class_token=False, global_pool="avg", reg_tokens=2),
    "distillation-token": TINY.replace(dist_token=True),
    "cls-and-mean": TINY.replace(global_pool="token_avg"),
    "headless": TINY.replace(num_classes=0),
    "headless-dinov2-registers": TINY.replace(num_classes=0, reg_tokens=4, no_embed_class=True, init_values=0.1),
}
# what each method needs and these layouts lack: (method, layout) -> the reason its ConfigError gives
NO_CLS = ("avg-no-class-token", "avg-registers-no-class-token")
REFUSED = {
    **{("avit", layout): "class token" for layout in NO_CLS + ("cls-and-mean",)},
    ("avit", "distillation-token"): "distillation token",
    **{(method, layout): "(CLS|class token)" for method in ("evit", "dynamicvit", "spot", "spot_heuristic") for layout in NO_CLS},
}
SMALL = {"evit": {"stages": "1"}, "zerotprune": {"stages": "1,2"}, "spot": {"stages": "1,2"}, "dynamicvit": {"stages": "1,2"}, "spot_heuristic": {"stages": "1,2"}}
NO_OP = {
    "abs": {"alpha": 0.0}, "resolution": {"scale": 1.0}, "avit": {"halting": False}, "tome": {"r": 0}, "evit": {"rho": 1.0},
    "dynamicvit": {"rho": 1.0}, "spot": {"rho": 1.0}, "spot_heuristic": {"rho": 1.0}, "baseline": {},
}
PRUNING = {"abs": {"alpha": 0.5}, "tome": {"r": 3}, "evit": {"rho": 0.5}, "dynamicvit": {"rho": 0.5}, "spot": {"rho": 0.5},
           "spot_heuristic": {"rho": 0.5}, "avit": {"beta": -10.0}}


def cases():
    return [(layout, method) for layout in LAYOUTS for method in METHODS]


@pytest.mark.parametrize("layout, method", cases(), ids=[f"{m}-{lay}" for lay, m in cases()])
@pytest.mark.slow
def test_method_runs_or_refuses_clearly(layout, method):
    cfg = LAYOUTS[layout]
    model = make_model(cfg)
    x = torch.randn(3, 3, 32, 32)
    if (method, layout) in REFUSED:
        with pytest.raises(ConfigError, match=REFUSED[method, layout]):
            build_method(method, model, **SMALL.get(method, {}))
        return
    width = cfg.num_classes or cfg.pooled_dim
    with torch.no_grad():
        base = model(x)
        if method in NO_OP:  # the no-op setting is the baseline, whatever the prefix tokens and pooling
            out = build_method(method, model, **{**SMALL.get(method, {}), **NO_OP[method]}).eval()(x)
            assert torch.allclose(out.logits, base, atol=1e-5, rtol=1e-5)
        settings = {**SMALL.get(method, {}), **PRUNING.get(method, {})}
        out = build_method(method, model, **settings).eval()(x)
    assert out.logits.shape == (3, width) and bool(torch.isfinite(out.logits).all())
    p = cfg.num_prefix_tokens
    if method in PRUNING and method != "avit":  # every prefix token survives, first and in order
        state = out.state
        assert state.width < p + cfg.num_patches or method == "abs"
        assert (state.patch_ids[:, :p] == -1).all() and (state.patch_ids[:, p:] >= 0).all()


def test_headless_abs_scores_with_an_embed_dim_wide_random_head():
    """A backbone has no class count: ABS's entropy head gets embed_dim outputs, and its FLOPs count them."""
    model = make_model(TINY.replace(num_classes=0))
    abs_ = build_method("abs", model, alpha=0.25, score="entropy")
    assert abs_.head_w2.shape == (TINY.embed_dim, TINY.embed_dim)
    n = TINY.num_patches
    assert abs_.scorer_macs(n) == n * (TINY.embed_dim * TINY.embed_dim + TINY.embed_dim * TINY.embed_dim)
    scores = abs_(torch.randn(2, 3, 32, 32)).record.aux["abs_scores"]
    assert scores.std() > 0  # an empty head would give every token entropy 0


def test_headless_multicrop_averages_features():
    model = make_model(TINY.replace(num_classes=0))
    method = build_method("multicrop", model, crop_fraction=0.75).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([model(c) for c in method.crops(x).chunk(5)]).mean(0)
        assert torch.allclose(method(x).logits, expected, atol=1e-6)


def test_distilled_logits_average_both_heads_and_features_average_both_tokens():
    model = make_model(TINY.replace(dist_token=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.norm(model.blocks(model.embed(x)))
        assert torch.allclose(model(x), (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2)
        assert torch.allclose(model.forward_head(tokens, pre_logits=True), (tokens[:, 0] + tokens[:, 1]) / 2)
        assert torch.allclose(run(model, x).logits, model(x))
    assert model.cfg.num_prefix_tokens == 2 and {"dist_token", "head_dist.weight"} <= set(model.state_dict())


def test_cls_and_mean_pooling_concatenates_after_the_final_norm():
    model = make_model(TINY.replace(global_pool="token_avg"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.norm(model.blocks(model.embed(x)))
        pooled = torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)
        assert torch.allclose(model(x), model.head(pooled), atol=1e-6)
    assert model.head.in_features == 2 * TINY.embed_dim
