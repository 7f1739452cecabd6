"""Parity with the reference implementations, on the same weights and inputs, to 1e-5.

Each `reference_*` function below re-implements, in this file's own code, the maths of the
method's published reference as read from it: facebookresearch/ToMe (tome/merge.py,
tome/patch/timm.py), youweiliang/evit (evit.py), raoyongming/DynamicViT (models/dyvit.py,
losses.py), NVlabs/A-ViT (timm/models/act_vision_transformer.py, engine_act.py, utils.py) and
the ABS paper (section 3; no code was published). They drive a model's own submodules (norm1,
attn.qkv, q/k-norm, proj, ls1, mlp, ls2, norm2), so they share weights with vitbudget's
methods and nothing else: attention is written out with an explicit softmax, tokens are
ordered the way the reference orders them, and nothing goes through vitbudget's runtime.

Where vitbudget generalises a reference (several prefix tokens, average pooling), the reference
maths is generalised the same documented way, and the one-prefix case is the reference as is.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from vitbudget import ConfigError, from_timm
from vitbudget.methods import build_method
from vitbudget.models import ViTConfig

ATOL = 1e-5
SHAPE = dict(img_size=32, patch_size=4, embed_dim=24, depth=4, num_heads=3, num_classes=10)  # 64 patches


def cfg(**changes) -> ViTConfig:
    return ViTConfig(**{**SHAPE, **changes})


def images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def perturbed(model, seed: int = 0):
    """Random weights far from init, so heads disagree and attention is not uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * p.std().nan_to_num(0.02).clamp_min(0.02) * torch.randn(p.shape, generator=g))
    return model


def attention(attn, xn: torch.Tensor, bias: torch.Tensor | None = None):
    """Multi-head self-attention from an attention module's weights: (output, probs, keys)."""
    B, N, C = xn.shape
    H = attn.num_heads
    q, k, v = attn.qkv(xn).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(attn.norm(out)), probs, k


def mlp_half(block, x: torch.Tensor) -> torch.Tensor:
    return x + block.ls2(block.mlp(block.norm2(x)))


def head(model, x: torch.Tensor) -> torch.Tensor:
    """Final norm, pooling (CLS, or the mean of the non-prefix tokens) and the classifier."""
    x = model.norm(x)
    pooled = x[:, 0] if model.global_pool == "token" else x[:, model.num_prefix_tokens :].mean(dim=1)
    return model.head(model.fc_norm(pooled))


def method_logits(name: str, model, x: torch.Tensor, train: bool = False, **options):
    method = build_method(name, model, **options)
    method.train(train)
    with torch.no_grad():
        return method(x)


# ---------------------------------------------------------------------------------------------
# ToMe: bipartite soft matching over the whole sequence, A = even positions (CLS included).
# ---------------------------------------------------------------------------------------------
def reference_tome_merge(x, size, metric, r: int, prefix: int):
    """One image: `bipartite_soft_matching` + `merge_wavg` of ToMe's reference.

    prefix = 1 is the reference's class_token=True; 2 its class_token + distill_token (the
    second prefix token sits at position 1, the first B token, protected by its column); more
    prefix tokens are protected the same way (A rows at even, B columns at odd positions).
    """
    t = x.shape[0]
    r = min(r, (t - prefix) // 2)
    if r <= 0:
        return x, size
    m = metric / metric.norm(dim=-1, keepdim=True)
    a_pos, b_pos = list(range(0, t, 2)), list(range(1, t, 2))
    sim = m[a_pos] @ m[b_pos].T
    for i, pos in enumerate(a_pos):
        if pos < prefix:
            sim[i, :] = -math.inf
    for j, pos in enumerate(b_pos):
        if pos < prefix:
            sim[:, j] = -math.inf
    best, partner = sim.max(dim=1)
    edges = best.argsort(descending=True).tolist()
    merged, kept = edges[:r], edges[r:]
    if prefix:
        kept = sorted(kept)
    mass = {j: x[b] * size[b] for j, b in enumerate(b_pos)}
    count = {j: size[b].clone() for j, b in enumerate(b_pos)}
    for i in merged:
        j = int(partner[i])
        mass[j] = mass[j] + x[a_pos[i]] * size[a_pos[i]]
        count[j] = count[j] + size[a_pos[i]]
    a_rows = [(x[a_pos[i]] * size[a_pos[i]], size[a_pos[i]], a_pos[i]) for i in kept]
    b_rows = [(mass[j], count[j], b) for j, b in enumerate(b_pos)]
    rows = a_rows + b_rows
    rows = [row for row in rows if row[2] < prefix] + [row for row in rows if row[2] >= prefix]  # prefix first, in order
    rows = sorted(rows[:prefix], key=lambda row: row[2]) + rows[prefix:]
    new_x = torch.stack([s / c for s, c, _ in rows])
    new_size = torch.stack([c for _, c, _ in rows])
    return new_x, new_size


def reference_tome(model, embed, x_images, r: int):
    """ToMe's timm patch: prop. attention (log size), merge between attention and MLP, r every block."""
    x = embed(x_images)
    prefix = model.num_prefix_tokens
    size = None
    for block in model.blocks:
        bias = None if size is None else size.log()[:, None, None, :]
        out, _, k = attention(block.attn, block.norm1(x), bias)
        x = x + block.ls1(out)
        metric = k.mean(dim=1)
        if size is None:
            size = torch.ones(x.shape[:2])
        merged = [reference_tome_merge(x[b], size[b], metric[b], r, prefix) for b in range(x.shape[0])]
        x, size = torch.stack([m[0] for m in merged]), torch.stack([m[1] for m in merged])
        x = mlp_half(block, x)
    return head(model, x)


TOME_CASES = {
    "deit-shape": (cfg(), (2, 8)),
    "layerscale-qknorm": (cfg(init_values=0.5, qk_norm=True), (4,)),
    "one-register (=distill token)": (cfg(reg_tokens=1), (5,)),
    "four-registers": (cfg(reg_tokens=4), (7,)),
    "avg-pool": (cfg(class_token=False, global_pool="avg"), (4,)),
    "avg-pool-registers": (cfg(class_token=False, global_pool="avg", reg_tokens=3), (4,)),
}


@pytest.mark.parametrize("case", TOME_CASES)
@pytest.mark.slow
def test_tome_matches_the_reference(case):
    config, rs = TOME_CASES[case]
    model = perturbed(make_model(config))
    x = images()
    with torch.no_grad():
        for r in rs:
            expected = reference_tome(model, model.embed, x, r)
            out = method_logits("tome", model, x, r=r)
            assert torch.allclose(out.logits, expected, atol=ATOL), (case, r, (out.logits - expected).abs().max())


@pytest.mark.slow
def test_tome_matches_the_reference_on_a_timm_model():
    from test_timm_equivalence import _import_timm, _timm_vit

    timm = _import_timm()
    for config in (cfg(), cfg(reg_tokens=2, init_values=0.3)):
        theirs = perturbed(_timm_vit(timm, config))
        embed = lambda imgs: theirs.norm_pre(theirs.patch_drop(theirs._pos_embed(theirs.patch_embed(imgs))))
        x = images()
        with torch.no_grad():
            expected = reference_tome(theirs, embed, x, 6)
            out = method_logits("tome", from_timm(theirs), x, r=6)
        assert torch.allclose(out.logits, expected, atol=ATOL), (out.logits - expected).abs().max()


# ---------------------------------------------------------------------------------------------
# EViT: top ceil(rho (N-1)) by CLS attention, in score order; fused token = raw weighted sum.
# ---------------------------------------------------------------------------------------------
def reference_evit(model, x_images, rho: float, stages, fuse: bool):
    x = model.embed(x_images)
    p = model.num_prefix_tokens  # the reference has one prefix token (CLS); registers are kept alike
    for i, block in enumerate(model.blocks):
        out, probs, _ = attention(block.attn, block.norm1(x))
        x = x + block.ls1(out)
        n = x.shape[1] - p
        left = math.ceil(rho * n)
        if i in stages and left < n:
            cls_attn = probs[:, :, 0, p:].mean(dim=1)  # (B, n)
            _, idx = cls_attn.topk(left, dim=1, largest=True, sorted=True)  # score order, as the reference
            rest = x[:, p:]
            kept = rest.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
            parts = [x[:, :p], kept]
            if fuse:
                dropped = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
                compl = torch.stack([row.nonzero().flatten() for row in dropped])  # ascending
                w = cls_attn.gather(1, compl)
                parts.append((rest.gather(1, compl[..., None].expand(-1, -1, x.shape[-1])) * w[..., None]).sum(1, keepdim=True))
            x = torch.cat(parts, dim=1)
        x = mlp_half(block, x)
    return head(model, x)


@pytest.mark.parametrize("config", [cfg(), cfg(reg_tokens=2), cfg(global_pool="avg")], ids=["cls", "registers", "cls+avg-pool"])
@pytest.mark.parametrize("fuse", [False, True])
def test_evit_matches_the_reference(config, fuse):
    model = perturbed(make_model(config))
    x = images()
    with torch.no_grad():
        for rho, stages in [(0.7, (1, 2)), (0.5, (0, 1, 3))]:
            expected = reference_evit(model, x, rho, stages, fuse)
            out = method_logits("evit", model, x, rho=rho, stages=",".join(map(str, stages)), fuse=fuse)
            assert torch.allclose(out.logits, expected, atol=ATOL), (rho, (out.logits - expected).abs().max())


def test_evit_normalised_fusion_needs_fusion():
    with pytest.raises(ConfigError, match="--fuse true"):
        build_method("evit", make_model(cfg()), fuse_normalize=True)


def test_evit_keep_count_is_the_references_float_ceil():
    from vitbudget.methods.predictor import keep_count

    assert [keep_count(0.7, n) for n in (64, 45, 46)] == [45, 32, 33]
    assert keep_count(0.56, 25) == math.ceil(0.56 * 25) == 15  # 0.56 * 25 = 14.000000000000002 in floats


# ---------------------------------------------------------------------------------------------
# DynamicViT: int(N rho^k) kept at inference (score order); Gumbel masks + policy softmax in training.
# ---------------------------------------------------------------------------------------------
def reference_predictor(pred, x, policy):
    """PredictorLG: LayerNorm -> Linear -> GELU, local / policy-weighted global halves, MLP, log-softmax."""
    z = F.gelu(pred.remap(pred.norm(x)))
    c = z.shape[-1]
    local, glob = z[..., : c // 2], z[..., c // 2 :]
    glob = (glob * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
    return pred.mlp(torch.cat([local, glob.expand(-1, x.shape[1], -1)], dim=-1)).log_softmax(dim=-1)


def policy_attention(attn, xn, policy, eps=1e-6):
    """DynamicViT's softmax_with_policy: kept keys only, a dropped token still attends to itself."""
    B, N, C = xn.shape
    H = attn.num_heads
    q, k, v = attn.qkv(xn).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    keep = policy.reshape(B, 1, 1, N)
    keep = keep + (1.0 - keep) * torch.eye(N).view(1, 1, N, N)
    w = (logits - logits.max(dim=-1, keepdim=True).values).exp() * keep
    probs = (w + eps / N) / (w.sum(dim=-1, keepdim=True) + eps)
    out = (probs @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(attn.norm(out))


def reference_dynamicvit(method, x_images, train: bool):
    """VisionTransformerDiffPruning.forward: (logits, hard decisions per stage)."""
    model, p = method.model, method.model.num_prefix_tokens
    x = model.embed(x_images)
    B, n0 = x.shape[0], model.cfg.num_patches
    prev = torch.ones(B, n0, 1)
    policy = torch.ones(B, p + n0, 1)
    ratios = [method.options.rho ** (k + 1) for k in range(len(method.stages))]  # [rho, rho ** 2, rho ** 3]
    decisions = []
    for i, block in enumerate(model.blocks):
        if i in method.stages:
            k = method.stages.index(i)
            score = reference_predictor(method.predictor(k), x[:, p:], prev)
            if train:
                hard = F.gumbel_softmax(score, hard=True)[:, :, 0:1] * prev
                decisions.append(hard[..., 0])
                policy = torch.cat([torch.ones(B, p, 1), hard], dim=1)
                prev = hard
            else:
                keep = int(n0 * ratios[k])
                order = score[:, :, 0].argsort(dim=1, descending=True)[:, :keep]  # score order, as the reference
                x = torch.cat([x[:, :p], x[:, p:].gather(1, order[..., None].expand(-1, -1, x.shape[-1]))], dim=1)
                prev = prev.gather(1, order[..., None])
                decisions.append(order)
        if train:
            x = x + block.ls1(policy_attention(block.attn, block.norm1(x), policy[..., 0]))
        else:
            x = x + block.ls1(attention(block.attn, block.norm1(x))[0])
        x = mlp_half(block, x)
    return head(model, x), decisions


DVIT_CONFIGS = {"cls": cfg(depth=5), "registers": cfg(depth=5, reg_tokens=2), "cls+avg-pool": cfg(depth=5, global_pool="avg")}


@pytest.mark.parametrize("name,config", [("dynamicvit", c) for c in DVIT_CONFIGS] + [("spot", "cls")])
@pytest.mark.slow
def test_dynamicvit_inference_keeps_the_references_tokens(name, config):
    model = perturbed(make_model(DVIT_CONFIGS[config]))
    torch.manual_seed(0)
    method = build_method(name, model, rho=0.7, stages="1,2,4").eval()
    for pred in method.predictors:  # trained-looking predictors: scores that spread
        perturbed(pred, seed=1)
    x = images(4)
    assert method.counts == [44, 31, 21]  # int(64 * 0.7 ** k), the reference's rule (not ceil: 45, 32, 22)
    with torch.no_grad():
        out = method(x)
        if name == "dynamicvit":
            expected, orders = reference_dynamicvit(method, x, train=False)
            assert torch.allclose(out.logits, expected, atol=ATOL), (out.logits - expected).abs().max()
    assert [int(t[0]) for t in out.record.attn_tokens][1:] == [model.num_prefix_tokens + c for c in (44, 31, 31, 21)]


@pytest.mark.parametrize("config", ["cls", "registers"])
@pytest.mark.slow
def test_dynamicvit_training_masks_match_the_reference(config):
    model = perturbed(make_model(DVIT_CONFIGS[config]))
    torch.manual_seed(0)
    method = build_method("dynamicvit", model, rho=0.5, stages="1,2,4")
    for pred in method.predictors:
        perturbed(pred, seed=1)
    x = images(4)
    with torch.no_grad():
        torch.manual_seed(7)  # both draw the same Gumbel noise: same shapes, same order
        expected, ref_decisions = reference_dynamicvit(method.train(), x, train=True)
        torch.manual_seed(7)
        out = method.train()(x)
    decisions = out.record.aux["decisions"]
    assert all(torch.equal(d, r) for d, r in zip(decisions, ref_decisions))
    assert 0 < float(decisions[-1].mean()) < float(decisions[0].mean()) < 1
    assert torch.allclose(out.logits, expected, atol=ATOL), (out.logits - expected).abs().max()
    # the keep-rate loss of losses.py: sum_k mean_b (kept fraction - rho^k)^2, over K, times ratio_weight
    rate = sum(((d.mean(dim=1) - 0.5 ** (k + 1)) ** 2).mean() for k, d in enumerate(ref_decisions)) / 3
    losses = method.extra_losses(out, torch.zeros(4, dtype=torch.long), None)
    assert torch.allclose(losses["rate"], 2.0 * rate, atol=1e-7)


def test_spot_heuristic_uses_the_same_counts():
    method = build_method("spot_heuristic", make_model(cfg(depth=5)), rho=0.7, stages="1,2,4")
    assert method.counts == [44, 31, 21]


# ---------------------------------------------------------------------------------------------
# A-ViT: the official dense forward (zeroed, masked halted tokens), ponder, q and the prior loss.
# ---------------------------------------------------------------------------------------------
def reference_avit(model, x_images, gamma: float, beta: float, eps: float = 0.01):
    """forward_features_act_token + Block_ACT.forward_act: (logits, mean ponder, q per block).
    Stochastic depth (a model in training mode with drop_path_rate > 0) wraps both branches of every
    token, halted ones included, with one draw per image, as the official block does."""
    x = model.embed(x_images)
    B, N, _ = x.shape
    c, R, mask, rho = torch.zeros(B, N), torch.ones(B, N), torch.ones(B, N), torch.zeros(B, N)
    output, out, q = 0.0, x, []
    depth = len(model.blocks)
    for i, block in enumerate(model.blocks):
        out = out * mask[..., None]  # halted tokens' inputs are zeroed
        live = mask[..., None]
        xn = block.norm1(out * live) * live
        a, _, _ = attention(block.attn, xn, bias=((1 - mask) * -1000.0)[:, None, None, :])
        y = out + block.drop_path1(block.ls1(a))
        y = y + block.drop_path2(block.ls2(block.mlp(block.norm2(y * live) * live)))
        h = torch.sigmoid(y[..., 0] * gamma - beta)
        q.append(h.mean())  # every token of every image (the official h[1:] drops image 0: not reproduced)
        block_output = y * live
        if i == depth - 1:
            h = torch.ones(B, N)
        c = c + h
        rho = rho + mask
        reached = (c > 1 - eps).float() * mask
        halting_part = block_output * (R * reached)[..., None]
        rho = rho + R * reached
        not_reached = (c < 1 - eps).float()
        R = R - not_reached * h
        output = output + halting_part + block_output * (h * not_reached)[..., None]
        mask = not_reached
        out = y
    return head(model, output), rho.mean(), torch.stack(q)


def official_prior_kl(q: torch.Tensor, depth: int, target: int, std: float = 1.0) -> torch.Tensor:
    """engine_act.py: q / sum, clamp [0.01, 0.99]; KLDivLoss(batchmean)(q.log(), get_distribution_target())."""
    index = torch.arange(depth, dtype=torch.float64)
    pdf = torch.exp(-0.5 * ((index - target) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    prior = (pdf * (0.98 / pdf[:target].sum())).float()
    q = (q / q.sum()).clamp(0.01, 0.99)
    return F.kl_div(q.log(), prior, reduction="batchmean")


def halting_model(config: ViTConfig, seed: int = 1):
    """Random weights whose channel 0 moves with the image: tokens halt at many different blocks,
    and a halted token's official (zero-input) score is far from 0 (gamma 3, beta 2)."""
    model = make_model(config, seed)
    with torch.no_grad():
        model.patch_embed.proj.weight[0] *= 20
        for block in model.blocks:
            block.attn.proj.weight[0] *= 40
            block.attn.proj.bias[0] += 0.4
    return model


@pytest.mark.parametrize("config", [cfg(depth=6, patch_size=8), cfg(depth=6, patch_size=8, reg_tokens=2)], ids=["cls", "registers"])
def test_avit_matches_the_official_forward_ponder_and_prior(config):
    model = halting_model(config)
    opts = dict(gamma=3.0, beta=2.0, target_depth=4.0)
    x = images(5, seed=3)
    with torch.no_grad():
        expected, ponder, q = reference_avit(model, x, opts["gamma"], opts["beta"])
        dense = build_method("avit", model, dense=True, **opts).eval()(x)
        removing = build_method("avit", model, **opts).eval()(x)
    assert torch.allclose(dense.logits, expected, atol=ATOL), (dense.logits - expected).abs().max()
    assert torch.allclose(removing.logits, expected, atol=ATOL), (removing.logits - expected).abs().max()
    # training mode (dense, packed) gives the ponder, q and the official prior loss
    method = build_method("avit", model, prior="reference", ponder_weight=1.0, distr_weight=1.0, **opts).train()
    out = method(x)
    aux = out.record.aux
    assert torch.allclose(out.logits, expected, atol=ATOL)
    assert torch.allclose(aux["avit_ponder"].mean(), ponder, atol=ATOL)
    assert torch.allclose(aux["avit_q"], q, atol=ATOL), (aux["avit_q"] - q).abs().max()
    halted_share = float((aux["avit_halt_depth"] < 6).float().mean())
    assert 0.2 < halted_share < 1.0  # tokens halt at different blocks, so halted scores enter q
    losses = method.extra_losses(out, None, None)
    assert torch.allclose(losses["ponder"], ponder, atol=ATOL)
    assert torch.allclose(losses["distr"], official_prior_kl(q, 6, 4), atol=ATOL)


def test_avit_q_under_stochastic_depth_matches_the_official_forward():
    """With drop path on, the official block applies each image's draw to its halted tokens' outputs too,
    so their scores in q are dropped (or scaled by 1 / keep) with the image: q follows them."""
    model = halting_model(cfg(depth=6, patch_size=8, drop_path_rate=0.5))
    opts = dict(gamma=3.0, beta=2.0, target_depth=4.0)
    x = images(8, seed=3)
    method = build_method("avit", model, **opts).train()
    with torch.no_grad():
        torch.manual_seed(11)  # both draw the same per-image keeps: same shapes, same order (drop_path1, drop_path2)
        expected, ponder, q = reference_avit(model, x, opts["gamma"], opts["beta"])
        torch.manual_seed(11)
        out = method(x)
        torch.manual_seed(11)
        plain = reference_avit(model.eval(), x, opts["gamma"], opts["beta"])[2]
    aux = out.record.aux
    assert torch.allclose(out.logits, expected, atol=ATOL)
    assert torch.allclose(aux["avit_ponder"].mean(), ponder, atol=ATOL)
    assert torch.allclose(aux["avit_q"], q, atol=ATOL), (aux["avit_q"] - q).abs().max()
    assert 0.2 < float((aux["avit_halt_depth"] < 6).float().mean()) < 1.0
    assert (q - plain).abs().max() > 1e-2  # the draws do change q


def test_avit_q_modes_differ_where_halted_scores_do():
    """'halted-zero' is the named alternative: halted tokens add 0 to q instead of their official score."""
    model = halting_model(cfg(depth=6, patch_size=8))
    x = images(5, seed=3)
    _, _, q = reference_avit(model, x, 3.0, 2.0)
    out = build_method("avit", model, gamma=3.0, beta=2.0, q_mode="halted-zero").train()(x)
    zero_q = out.record.aux["avit_q"]
    assert torch.allclose(zero_q[0], q[0], atol=ATOL)  # nothing has halted before block 1
    assert (zero_q[1:] < q[1:] - 1e-3).all()
    with pytest.raises(ConfigError, match="--q-mode"):
        build_method("avit", model, q_mode="official")
    with pytest.raises(ConfigError, match="--prior"):
        build_method("avit", model, prior="gaussian")


# ---------------------------------------------------------------------------------------------
# ABS (paper, section 3): score patches, refine [CLS, top alpha N] with a copy of the last block.
# ---------------------------------------------------------------------------------------------
def reference_abs(method, x_images):
    model, opts = method.model, method.options
    p = model.num_prefix_tokens
    x = model.embed(x_images)
    penultimate, last_probs = None, None
    for i, block in enumerate(model.blocks):
        out, probs, _ = attention(block.attn, block.norm1(x))
        x = mlp_half(block, x + block.ls1(out))
        if i == len(model.blocks) - 2:
            penultimate = x
        last_probs = probs
    if opts.score == "entropy":  # a random linear + ReLU + classifier on the penultimate tokens
        logits = F.linear(F.relu(F.linear(penultimate[:, p:], method.head_w1, method.head_b1)), method.head_w2, method.head_b2)
        prob = logits.softmax(dim=-1)
        score = -(prob * prob.log()).sum(dim=-1)
    elif opts.score == "attnvar":  # variance over heads of the last block's CLS attention
        score = last_probs[:, :, 0, p:].var(dim=1, unbiased=False)
    elif opts.score == "gradsim":  # final feature norm
        score = x[:, p:].norm(dim=-1)
    else:
        score = method.random_scores(x_images)
    k = math.floor(opts.alpha * model.cfg.num_patches + 0.5)
    refined = x.clone()
    for b in range(x.shape[0]):
        idx = torch.cat([torch.arange(p), p + score[b].topk(k).indices])
        z = x[b, idx][None]
        out, _, _ = attention(method.block.attn, method.block.norm1(z))
        z = mlp_half(method.block, z + method.block.ls1(out))
        refined[b, idx] = z[0]
    return head(model, refined)


ABS_CONFIGS = {"cls": cfg(), "registers": cfg(reg_tokens=2), "avg-pool": cfg(class_token=False, global_pool="avg")}


@pytest.mark.parametrize("score,config", [(s, c) for c in ABS_CONFIGS for s in ("entropy", "attnvar", "gradsim", "random")
                                          if not (s == "attnvar" and c == "avg-pool")])  # attnvar needs CLS: tests/test_abs.py
def test_abs_scorers_match_the_papers_pipeline(score, config):
    model = perturbed(make_model(ABS_CONFIGS[config]))
    method = build_method("abs", model, alpha=0.2, score=score, seed=3).eval()
    x = images(2)
    with torch.no_grad():
        expected = reference_abs(method, x)
        out = method(x)
    assert torch.allclose(out.logits, expected, atol=ATOL), (out.logits - expected).abs().max()


# ---------------------------------------------------------------------------------------------
# Methods that read the CLS token say so, clearly, for models without one.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["evit", "dynamicvit", "spot", "spot_heuristic", "avit"])
def test_cls_methods_reject_models_without_a_class_token(name):
    model = make_model(cfg(class_token=False, global_pool="avg", reg_tokens=1))
    with pytest.raises(ConfigError, match="class token|CLS"):
        build_method(name, model)


def test_recipes_use_each_references_predictor_learning_rate():
    from vitbudget.train import get_recipe

    assert get_recipe("dynamicvit_cifar10").lr_scales == [("predictors", 100.0)]  # backbone at 0.01x (its --lr_scale)
    assert get_recipe("spot_cifar10").lr_scales == [("predictors", 10.0)]


def test_dynamicvit_recipe_freezes_cls_token_and_pos_embed_as_its_reference():
    """raoyongming/DynamicViT fine-tunes with the class token and position embedding frozen: the
    optimizer built from the recipe leaves them out (requires_grad False) and trains the rest."""
    from vitbudget.train import get_recipe
    from vitbudget.train.optim import make_optimizer

    method = build_method("dynamicvit", make_model(), rho=0.7, stages="1").train()
    optimizer = make_optimizer(method, get_recipe("dynamicvit_cifar10"))
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    names = {name: id(p) in in_groups for name, p in method.named_parameters()}
    assert not names["model.cls_token"] and not names["model.pos_embed"]
    assert not method.model.cls_token.requires_grad and not method.model.pos_embed.requires_grad
    assert all(trainable for name, trainable in names.items() if name not in ("model.cls_token", "model.pos_embed"))
