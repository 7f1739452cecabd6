"""MCTF and Zero-TPrune against independent re-implementations of their reference maths, to 1e-5.

MCTF: mlvlab/MCTF (`utils/mctf.py`, `models/modules/blocks.py`, `models/SA/MHSA.py`), re-read here
one image at a time: tokens are merged as explicit groups (lists of original positions), merged
features and attention are written as membership-matrix products, and the block runs as
`Block_DEIT.forward` does. Zero-TPrune: the formulas its module docstring cites (WPR as a loop of
A^T s per head, EIR/VHF, S-stage partition and similarity, I-stage), per image.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_model
from test_parity import ATOL, attention, cfg, head, images, method_logits, mlp_half, perturbed
from vitbudget import ConfigError
from vitbudget.methods import build_method
from vitbudget.runtime.cost import block_macs, macs_per_image, stem_macs


def sharp(model):
    """`perturbed`, then q and k x4 (peaked attention) and the head x20: on the plain perturbed model the
    logits move by ~1e-6 between MCTF's one-step-ahead and recomputed attention, below the tolerance;
    here by ~3e-4, so the parity tests tell the variants apart."""
    model = perturbed(model)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: 2 * model.cfg.embed_dim] *= 4
        model.head.weight *= 20
    return model


# ---------------------------------------------------------------------------------------------
# MCTF
# ---------------------------------------------------------------------------------------------
def reference_r(r, t: int, protected: int) -> int:
    """`mctf()`: the number of tokens a layer with t tokens merges."""
    if t - r < 10:
        r = t - 10
    return min(int((t - protected) * r) if r < 1 else r, (t - protected) // 2)


def reference_groups(x, probs, size, r: int, opts: dict) -> list[list[int]]:
    """One image: `bipartite_soft_matching` as groups of original positions, in output order."""
    t = x.shape[0]
    m = x / x.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
    info = 1 / probs.mean(dim=(0, 1))
    info = info / info.max()
    inv = 1 / size
    inv = inv / inv.max()
    score = torch.ones(len(a_pos), len(b_pos))
    if opts["tau_sim"]:
        score = score * ((m[a_pos] @ m[b_pos].T + 1) / 2) ** (1 / opts["tau_sim"])
    if opts["tau_info"]:
        score = score * torch.outer(info[a_pos], info[b_pos]) ** (1 / opts["tau_info"])
    if opts["tau_size"]:
        score = score * torch.outer(inv[a_pos], inv[b_pos]) ** (1 / opts["tau_size"])
    score[0, :] = -math.inf  # the class token (position 0, an A row)
    r1, r2 = (r // 2, r - r // 2) if opts["bidirection"] else (r, 0)
    best, partner = score.max(dim=1)
    order = sorted(range(len(a_pos)), key=lambda i: -float(best[i]))
    merged, kept = order[:r1], sorted(order[r1:])
    b_groups = [[b] for b in b_pos]
    for i in merged:
        b_groups[int(partner[i])].append(a_pos[i])
    a_groups = [[a_pos[i]] for i in kept]
    if not opts["bidirection"]:
        return a_groups + b_groups
    back = score[kept].T  # (B tokens, kept A tokens): the first step's scores
    best2, partner2 = back.max(dim=1)
    order2 = sorted(range(len(b_pos)), key=lambda j: -float(best2[j]))
    for j in order2[:r2]:
        a_groups[int(partner2[j])] += b_groups[j]
    return a_groups + [b_groups[j] for j in order2[r2:]]


def reference_pool(groups, x, probs, size, pooling: int):
    """`merge_wavg`: merged features, sizes and (keys summed, queries pooled) attention."""
    t = x.shape[0]
    member = torch.zeros(len(groups), t)
    for g, group in enumerate(groups):
        member[g, group] = 1.0
    new_size = member @ size
    keys = probs @ member.T  # (H, T, T'): merged keys' probabilities add up
    if pooling == 2:
        new_x = torch.stack([x[group].amax(dim=0) for group in groups])
        new_probs = torch.stack([keys[:, group].amax(dim=1) for group in groups], dim=1)
        return new_x, new_size, new_probs
    w = {0: size, 1: probs.mean(dim=(0, 1)) * size / size.max(), 3: torch.ones(t)}[pooling]
    weights = member * w  # (T', T)
    norm = weights.sum(dim=1)
    new_x = (weights @ x) / norm[:, None]
    new_probs = torch.einsum("gt,htk->hgk", weights, keys) / norm[None, :, None]
    return new_x, new_size, new_probs


def values_attention(attn, xn, probs):
    """`MHSA.forward` with a given attention: only the values come from the (merged) tokens."""
    n, c = xn.shape
    h = attn.num_heads
    v = attn.qkv(xn)[:, 2 * c :].reshape(n, h, c // h).transpose(0, 1)
    return attn.proj(attn.norm((probs @ v).transpose(0, 1).reshape(n, c)))


def reference_mctf(model, x_images, **o):
    opts = dict(r=16, layers=None, tau_sim=1.0, tau_info=20.0, tau_size=40.0, one_step_ahead=1, bidirection=True, pooling_type=1)
    opts.update(o)
    layers = opts["layers"] if opts["layers"] is not None else range(1, len(model.blocks))
    logits = []
    for img in model.embed(x_images):
        x, size = img, torch.ones(img.shape[0])
        for i, block in enumerate(model.blocks):
            active = i in layers
            bias = size.log()[None, None, :]
            if active and opts["one_step_ahead"]:
                r = reference_r(opts["r"], x.shape[0], 1)
                if r > 0:
                    _, probs, _ = attention(block.attn, block.norm1(x)[None], bias)
                    groups = reference_groups(x, probs[0], size, r, opts)
                    x, size, merged_probs = reference_pool(groups, x, probs[0], size, opts["pooling_type"])
                    if opts["one_step_ahead"] == 1:
                        x = x + block.ls1(values_attention(block.attn, block.norm1(x), merged_probs))
                        x = mlp_half(block, x[None])[0]
                        continue
                    bias = size.log()[None, None, :]
            out, probs, _ = attention(block.attn, block.norm1(x)[None], bias)
            x = mlp_half(block, (x + block.ls1(out[0]))[None])[0]
            if active and not opts["one_step_ahead"]:
                r = reference_r(opts["r"], x.shape[0], 1)
                if r > 0:
                    groups = reference_groups(x, probs[0], size, r, opts)
                    x, size, _ = reference_pool(groups, x, probs[0], size, opts["pooling_type"])
        logits.append(head(model, x[None])[0])
    return torch.stack(logits)


MCTF_CASES = {
    "defaults r16": ({}, dict(r=16)),
    "defaults r5": ({}, dict(r=5)),
    "one-way": ({}, dict(r=6, bidirection=False)),
    "size pooling": ({}, dict(r=6, pooling_type=0)),
    "max pooling": ({}, dict(r=6, pooling_type=2)),
    "mean pooling": ({}, dict(r=7, pooling_type=3)),
    "precise attention": ({}, dict(r=6, one_step_ahead=2)),
    "merge after the MLP": ({}, dict(r=6, one_step_ahead=0)),
    "similarity only": ({}, dict(r=6, tau_info=0.0, tau_size=0.0)),
    "ratio, layers 1,3": ({}, dict(r=0.35, layers=(1, 3))),
    "layerscale-qknorm": (dict(init_values=0.5, qk_norm=True), dict(r=6)),
}


def _mctf_flags(opts: dict) -> dict:
    flags = {k: v for k, v in opts.items() if k not in ("r", "layers")}
    flags.update({"r_ratio": opts["r"]} if opts["r"] < 1 else {"r": opts["r"]})
    if "layers" in opts:
        flags["activate_layer"] = ",".join(map(str, opts["layers"]))
    return flags


@pytest.mark.parametrize("case", MCTF_CASES)
@pytest.mark.slow
def test_mctf_matches_the_reference(case):
    changes, opts = MCTF_CASES[case]
    model = sharp(make_model(cfg(**changes)))
    x = images(2)
    with torch.no_grad():
        expected = reference_mctf(model, x, **opts)
        out = method_logits("mctf", model, x, **_mctf_flags(opts))
    assert torch.allclose(out.logits, expected, atol=ATOL), (case, (out.logits - expected).abs().max())
    assert (out.logits - model(x)).abs().max() > 10 * ATOL  # it really merged


@pytest.mark.parametrize("pooling", [0, 1, 2, 3])
@pytest.mark.parametrize("bidirection", [True, False])
def test_mctf_merge_step_matches_the_reference(pooling, bidirection):
    """One merge on random tokens, sizes and attention (rows that differ, unlike a model's similar
    tokens): features, sizes and the one-step-ahead attention, each image against `merge_wavg`."""
    from vitbudget.methods.mctf import MCTFOptions, merge
    from vitbudget.runtime.state import TokenState

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 21, 8, generator=g)
    size = 1 + torch.randint(0, 3, (2, 21), generator=g).float()
    probs = (3 * torch.randn(2, 2, 21, 21, generator=g)).softmax(dim=-1)
    opts = MCTFOptions(r=6, bidirection=bidirection, pooling_type=pooling)
    state = TokenState.initial(x, 1).replace(size=size)
    new, _ = merge(state, probs, 6, opts, ahead=True)
    ref = dict(tau_sim=1.0, tau_info=20.0, tau_size=40.0, bidirection=bidirection)
    for b in range(2):
        groups = reference_groups(x[b], probs[b], size[b], 6, ref)
        new_x, new_size, new_probs = reference_pool(groups, x[b], probs[b], size[b], pooling)
        assert torch.allclose(new.x[b], new_x, atol=1e-6) and torch.equal(new.size[b], new_size)
        assert torch.allclose(new.next_attention[b], new_probs, atol=1e-6)
        assert new.patch_ids[b].tolist() == [group[0] - 1 for group in groups]  # each slot keeps its first member's id


def test_mctf_token_counts_follow_the_references_rule():
    """r 30 on 65 tokens: 35, then the 10-token floor and the half bound: 65 - 30, 35 - 17, 18 - 8."""
    assert [reference_r(30, t, 1) for t in (65, 35, 18, 10)] == [30, 17, 8, 0]
    model = make_model(cfg())
    out = method_logits("mctf", model, images(1), r=30)
    assert [int(t[0]) for t in out.record.attn_tokens] == [65, 35, 18, 10]
    out = method_logits("mctf", model, images(1), r_ratio=0.35, activate_layer="1,2")
    assert [int(t[0]) for t in out.record.attn_tokens] == [65, 43, 29, 29]  # int(64 * 0.35) = 22, int(42 * 0.35) = 14
    small = make_model(cfg(patch_size=8))  # 17 tokens: the floor binds at 13 (r 4 -> 3), and stops merging at 10
    out = method_logits("mctf", small, images(1), r=4)
    assert [int(t[0]) for t in out.record.attn_tokens] == [17, 13, 10, 10]


def test_mctf_no_op_settings_are_the_baseline_exactly():
    model = make_model(cfg())
    x = images()
    with torch.no_grad():
        base = model(x)
        for opts in (dict(r=0), dict(r=0, one_step_ahead=0), dict(r=0, r_ratio=0.0, pooling_type=2)):
            assert torch.equal(method_logits("mctf", model, x, **opts).logits, base), opts


def test_mctf_flops_charge_the_tokens_executed_and_the_fusion():
    """r 6 in blocks 1..3 of a 65-token, 4-block, D 24, 3-head model: 65, 59, 53, 47 tokens; each
    merging block adds 2 t D^2 + t^2 D (q, k, q k^T before the merge) - 2 n D^2 - n^2 D (the value-only
    path after it) + Ta Tb D (matching) + H t n (merged attention)."""
    model = make_model(cfg())
    c = model.cfg
    out = method_logits("mctf", model, images(1), r=6)
    assert [int(t[0]) for t in out.record.attn_tokens] == [65, 59, 53, 47]
    d, h = c.embed_dim, c.num_heads
    extra = sum(2 * t * d**2 + t**2 * d - 2 * n * d**2 - n**2 * d + ((t + 1) // 2) * (t // 2) * d + h * t * n
                for t, n in ((65, 59), (59, 53), (53, 47)))
    expected = stem_macs(c) + sum(block_macs(n, c) for n in (65, 59, 53, 47)) + extra
    assert float(macs_per_image(c, out.record)[0]) == pytest.approx(expected, rel=1e-12)


def test_mctf_options_are_checked():
    model = make_model(cfg())
    for opts, match in [(dict(pooling_type=5), "--pooling-type"), (dict(r_ratio=1.5), "--r-ratio"), (dict(one_step_ahead=3), "--one-step-ahead"),
                        (dict(tau_info=-1.0), "--tau-info"), (dict(activate_layer="2,9"), "--activate-layer"), (dict(r=-1), "--r")]:
        with pytest.raises(ConfigError, match=match):
            build_method("mctf", model, **opts)


# ---------------------------------------------------------------------------------------------
# Zero-TPrune
# ---------------------------------------------------------------------------------------------
def reference_importance(probs, iters: int, eir: bool, vhf: tuple[float, float] | None):
    """One image: WPR per head (s_i <- sum_j s_j A[j, i], from 1/N), VHF on N*s, EIR (RMS) over heads."""
    h, n, _ = probs.shape
    per_head = []
    for a in probs:
        s = torch.full((n,), 1.0 / n)
        for _ in range(iters):
            s = torch.stack([(s * a[:, i]).sum() for i in range(n)])
        per_head.append(s)
    heads = list(range(h))
    if vhf is not None:
        passing = [k for k in heads if vhf[0] <= float((per_head[k] * n).var(unbiased=False)) <= vhf[1]]
        heads = passing or heads
    chosen = torch.stack([per_head[k] for k in heads])
    return (chosen**2).mean(dim=0).sqrt() if eir else chosen.mean(dim=0)


def reference_zerotprune(model, x_images, rho, stages, iters, s_fraction=0.5, partition="seq", eir=True, vhf=(0.01, 0.7)):
    p = model.num_prefix_tokens
    logits = []
    for img in model.embed(x_images):
        x = img
        for i, block in enumerate(model.blocks):
            out, probs, k = attention(block.attn, block.norm1(x)[None])
            x = mlp_half(block, (x + block.ls1(out[0]))[None])[0]
            if i not in stages:
                continue
            n = x.shape[0] - p
            keep = int(n * rho)
            imp = reference_importance(probs[0], iters[stages.index(i)], eir, vhf)[p:]
            ranked = sorted(range(n), key=lambda t: -float(imp[t]))
            b_set, a_set = (ranked[: n - n // 2], ranked[n - n // 2 :]) if partition == "seq" else (ranked[0::2], ranked[1::2])
            feat = k[0].mean(dim=0)[p:]
            feat = feat / feat.norm(dim=-1, keepdim=True)
            best = {a: max(float(feat[a] @ feat[b]) for b in b_set) for a in a_set}
            similar = sorted(a_set, key=lambda a: -best[a])[: min(round(s_fraction * (n - keep)), n // 2)]
            rest = [t for t in range(n) if t not in similar]
            kept = sorted(sorted(rest, key=lambda t: -float(imp[t]))[:keep])
            x = torch.cat([x[:p], x[[p + t for t in kept]]])
        logits.append(head(model, x[None])[0])
    return torch.stack(logits)


ZTP_CASES = {
    "defaults (auto iterations 30, 1)": ({}, dict(rho=0.7, stages=(1, 3), iters=(30, 1)), {}),
    "alternate partition": ({}, dict(rho=0.6, stages=(0, 2), iters=(30, 30), partition="alt"), dict(partition="alt")),
    "importance only, mean, no filter": ({}, dict(rho=0.7, stages=(1, 2), iters=(5, 2), s_fraction=0.0, eir=False, vhf=None),
                                         dict(s_fraction=0.0, eir=False, vhf=False, wpr_iters="5,2")),
    "similarity only, 3 iterations": ({}, dict(rho=0.5, stages=(2,), iters=(3,), s_fraction=1.0), dict(s_fraction=1.0, wpr_iters="3")),
    "registers": (dict(reg_tokens=2), dict(rho=0.7, stages=(1, 3), iters=(30, 1)), {}),
}


@pytest.mark.parametrize("case", ZTP_CASES)
@pytest.mark.slow
def test_zerotprune_matches_the_reference(case):
    changes, ref, flags = ZTP_CASES[case]
    model = sharp(make_model(cfg(depth=6, **changes)))
    x = images(2)
    with torch.no_grad():
        expected = reference_zerotprune(model, x, **ref)
        out = method_logits("zerotprune", model, x, rho=ref["rho"], stages=",".join(map(str, ref["stages"])), **flags)
    assert torch.allclose(out.logits, expected, atol=ATOL), (case, (out.logits - expected).abs().max())
    n, counts = 64, []
    for _ in ref["stages"]:
        n = int(n * ref["rho"])
        counts.append(n)
    assert [int(t[0]) for t in out.record.attn_tokens][ref["stages"][-1] + 1 :] == [model.num_prefix_tokens + counts[-1]] * (5 - ref["stages"][-1])


def test_zerotprune_vhf_falls_back_to_all_heads_and_filters_by_unit_mean_variance():
    from vitbudget.methods.zerotprune import ZeroTPruneOptions, aggregate

    uniform = torch.full((4,), 0.25)
    peaked = torch.tensor([0.1, 0.2, 0.3, 0.4])  # 4 s = 0.4 .. 1.6: variance 0.2, passes [0.01, 0.7]
    one_hot = torch.tensor([1.0, 0.0, 0.0, 0.0])  # variance 3: fails
    scores = torch.stack([uniform, peaked, one_hot])[None]
    assert torch.allclose(aggregate(scores, ZeroTPruneOptions()), peaked[None])
    both_fail = torch.stack([uniform, one_hot])[None]
    assert torch.allclose(aggregate(both_fail, ZeroTPruneOptions()), ((uniform**2 + one_hot**2) / 2).sqrt()[None])


def test_zerotprune_no_op_is_the_baseline_exactly_and_options_are_checked():
    model = make_model(cfg())
    x = images()
    with torch.no_grad():
        assert torch.equal(method_logits("zerotprune", model, x, rho=1.0, stages="1,2").logits, model(x))
    for opts, match in [(dict(stages="1,2", partition="zigzag"), "--partition"), (dict(stages="1,2", s_fraction=1.5), "--s-fraction"),
                        (dict(stages="1,2", wpr_iters="5"), "2 stages"), (dict(stages="1,2", wpr_iters="5,x"), "--wpr-iters"),
                        (dict(stages="1", vhf_min=0.8, vhf_max=0.7), "--vhf-min")]:
        with pytest.raises(ConfigError, match=match):
            build_method("zerotprune", model, **opts)


def test_zerotprune_flops_charge_pagerank_and_similarity():
    """Stages 1, 3 at rho 0.7 on 64 patches, 3 heads of 8, 4 blocks: 44 then 30 patches kept; WPR 30 and 1
    iterations (auto) x H N^2, the S-stage |A| |B| head_dim."""
    model = make_model(cfg())
    c = model.cfg
    out = method_logits("zerotprune", model, images(1), rho=0.7, stages="1,3")
    widths = [65, 65, 45, 45]
    assert [int(t[0]) for t in out.record.attn_tokens] == widths
    extra = 30 * 3 * 65**2 + 32 * 32 * 8 + 1 * 3 * 45**2 + 22 * 22 * 8
    assert float(out.record.extra_macs[0]) == extra
    assert float(macs_per_image(c, out.record)[0]) == pytest.approx(stem_macs(c) + sum(block_macs(n, c) for n in widths) + extra)


# ---------------------------------------------------------------------------------------------
# Both: stacks with ABS, token pictures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts", [("mctf", dict(r=4)), ("zerotprune", dict(stages="1,2"))])
@pytest.mark.slow
def test_stacks_with_abs_and_token_maps(name, opts):
    model = make_model(cfg())
    x = images(2)
    with torch.no_grad():
        alone = method_logits(name, model, x, **opts)
        none_refined = method_logits(name + "+abs", model, x, alpha=0.0, **opts)
        stack = build_method(name + "+abs", model, alpha=0.25, **opts).eval()
        refined = stack(x)
    assert torch.equal(none_refined.logits, alone.logits)  # alpha 0: exactly the reducer
    assert not torch.allclose(refined.logits, alone.logits)
    tmap = build_method(name, model, **opts).token_map(alone)
    assert tmap.values.shape == (2, 64) and tmap.label
    assert stack.token_map(refined).outline.sum() > 0


def test_tune_sweeps_both():
    from vitbudget.eval.tune import default_candidates, tome_rs

    cands = default_candidates(cfg(depth=12), families=["mctf", "zerotprune"], stacks=True)
    assert [c.options["r"] for c in cands if c.method == "mctf"] == tome_rs(64, 11) == [1, 2, 3, 5, 6]
    assert [c.options["rho"] for c in cands if c.method == "zerotprune"] == [0.5, 0.6, 0.7, 0.8, 0.9]
    assert {c.method for c in cands} == {"baseline", "mctf", "mctf+abs", "zerotprune", "zerotprune+abs"}
    assert any(c.label.startswith("MCTF r 5") for c in cands) and any(c.label.startswith("Zero-TPrune + ABS ρ 0.7") for c in cands)
