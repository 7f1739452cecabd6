"""Parity of PiToMe, ToFu and threshold merging with independent re-implementations, to 1e-5.

As in test_parity.py, each `reference_*` re-implements the published maths in this file's own
code, one image at a time with Python lists and an explicit softmax, driving only the model's
submodules:

* PiToMe: hchautran/PiToMe 550b5de, algo/pitome/merge.py (`pitome_vision`, `pitome`,
  `pitome_bsm`, `merge_wavg`) and algo/pitome/patch/deit.py (margins .75 - .75 l / L, BSM in the
  first ceil(L / 2) blocks, sizes never passed to attention);
* ToFu: Westlake-AI/OpenToMe 4b791cb, opentome/tome/tome.py `bipartite_soft_matching` mode
  'tofu' and opentome/timm/tofu.py (prune while l <= L // 2, then MLERP);
* threshold merging: ToMe's matching and weighted merge (test_parity.reference_tome_merge) with
  r per image = the number of matched pairs above the block's threshold.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_model
from test_parity import ATOL, attention, cfg, head, images, method_logits, mlp_half, perturbed, reference_tome_merge
from vitbudget import ConfigError
from vitbudget.methods import build_method
from vitbudget.runtime.cost import block_macs, macs_per_image, stem_macs


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def run_reference(model, x_images, step, prop_attn: bool = False):
    """Blocks with a per-image merge `step(block_index, x, size, metric) -> (x, size)` between attention and MLP."""
    x = model.embed(x_images)
    xs = [x[b] for b in range(x.shape[0])]
    sizes = [torch.ones(x.shape[1]) for _ in xs]
    for i, block in enumerate(model.blocks):
        out_xs, out_sizes = [], []
        for xi, si in zip(xs, sizes):
            bias = si.log()[None, None, None, :] if prop_attn else None
            out, _, k = attention(block.attn, block.norm1(xi[None]), bias)
            xi = xi + block.ls1(out)[0]
            xi, si = step(i, xi, si, k[0].mean(dim=0))
            out_xs.append(mlp_half(block, xi[None])[0])
            out_sizes.append(si)
        xs, sizes = out_xs, out_sizes
    return torch.cat([head(model, xi[None]) for xi in xs])


def weighted_rows(x, size, groups, order):
    """Rows `order` of a merge where `groups[j]` lists the tokens summed into token j: sum(x * s) / sum(s)."""
    rows, counts = [], []
    for j in order:
        members = [j] + groups.get(j, [])
        s = sum(size[m] for m in members)
        rows.append(sum(x[m] * size[m] for m in members) / s)
        counts.append(s)
    return torch.stack(rows), torch.stack(counts)


# ---------------------------------------------------------------------------------------------
# PiToMe
# ---------------------------------------------------------------------------------------------
def reference_pitome_step(x, size, metric, *, ratio, margin, alpha, bsm, prefix):
    T = x.shape[0] - prefix
    r = math.floor(T - T * ratio)
    if r <= 0:
        return x, size
    k = unit(metric[prefix:])
    sim = k @ k.T
    shifted = sim - margin
    elu = torch.where(shifted > 0, shifted, alpha * (torch.exp(shifted) - 1))
    energy = elu.sum(dim=1) / T
    ranked = sorted(range(T), key=lambda i: -float(energy[i]))
    groups: dict[int, list[int]] = {}
    if bsm:
        a_set, b_set = ranked[0::2], ranked[1::2]
        best = {a: max(b_set, key=lambda b: float(sim[a, b])) for a in a_set}
        edges = sorted(a_set, key=lambda a: -float(sim[a, best[a]]))
        for a in edges[:r]:
            groups.setdefault(best[a], []).append(a)
        order = edges[r:] + b_set
    else:
        mergeable, protected = ranked[: 2 * r], ranked[2 * r :]
        a_set, b_set = mergeable[0::2], mergeable[1::2]
        for a in a_set:
            groups.setdefault(max(b_set, key=lambda b: float(sim[a, b])), []).append(a)
        order = protected + b_set
    shift = lambda idx: idx + prefix  # noqa: E731
    rows, counts = weighted_rows(x, size, {shift(j): [shift(m) for m in ms] for j, ms in groups.items()}, [shift(j) for j in order])
    return torch.cat([x[:prefix], rows]), torch.cat([size[:prefix], counts])


def reference_pitome(model, x_images, ratio, margin=0.75, alpha=1.0, bsm_half="first", prop_attn=False):
    L = len(model.blocks)
    half = math.ceil(L / 2)
    uses_bsm = {"first": lambda i: i < half, "last": lambda i: i >= L - half, "none": lambda i: False}[bsm_half]

    def step(i, x, size, metric):
        return reference_pitome_step(x, size, metric, ratio=ratio, margin=margin * (1 - i / L), alpha=alpha, bsm=uses_bsm(i),
                                     prefix=model.num_prefix_tokens)

    return run_reference(model, x_images, step, prop_attn)


PITOME_CASES = {
    "deit-shape": (cfg(), dict(ratio=0.85)),
    "bsm-last-alpha": (cfg(), dict(ratio=0.8, bsm_half="last", energy_alpha=0.5)),
    "no-bsm-margin": (cfg(init_values=0.5, qk_norm=True), dict(ratio=0.75, bsm_half="none", margin=0.4)),
    "prop-attn": (cfg(), dict(ratio=0.85, prop_attn=True)),
    "registers": (cfg(reg_tokens=2), dict(ratio=0.85)),
    "avg-pool": (cfg(class_token=False, global_pool="avg"), dict(ratio=0.8)),
}


@pytest.mark.parametrize("case", PITOME_CASES)
def test_pitome_matches_the_reference(case):
    config, options = PITOME_CASES[case]
    model = perturbed(make_model(config))
    x = images()
    ref_opts = {("alpha" if k == "energy_alpha" else k): v for k, v in options.items()}
    with torch.no_grad():
        expected = reference_pitome(model, x, **ref_opts)
        out = method_logits("pitome", model, x, **options)
    assert torch.allclose(out.logits, expected, atol=ATOL), (out.logits - expected).abs().max()
    T = 64
    for block_tokens in out.record.mlp_tokens:  # r = floor(T - T * ratio) patch tokens merged per block
        T -= math.floor(T - T * options["ratio"])
        assert block_tokens.tolist() == [T + model.num_prefix_tokens] * 3


def test_pitome_ratio_one_is_the_baseline_and_bad_options_are_config_errors():
    model = perturbed(make_model(cfg()))
    x = images()
    with torch.no_grad():
        assert torch.equal(method_logits("pitome", model, x, ratio=1.0).logits, model(x))
    for bad in (dict(ratio=0.4), dict(energy_alpha=0.0), dict(bsm_half="middle")):
        with pytest.raises(ConfigError):
            build_method("pitome", model, **bad)


# ---------------------------------------------------------------------------------------------
# ToFu
# ---------------------------------------------------------------------------------------------
def tome_matching(metric, r: int, prefix: int):
    """ToMe's bipartite matching on one image: (merged A positions, their B partners, kept positions in order)."""
    t = metric.shape[0]
    m = unit(metric)
    a_pos = [i for i in range(0, t, 2) if i >= prefix]
    b_pos = [j for j in range(1, t, 2) if j >= prefix]
    partner = {a: max(b_pos, key=lambda b: float(m[a] @ m[b])) for a in a_pos}
    edges = sorted(a_pos, key=lambda a: -float(m[a] @ m[partner[a]]))
    merged = edges[:r]
    kept = list(range(prefix)) + (sorted(edges[r:]) if prefix else edges[r:]) + b_pos  # sorted with a class token only
    return merged, [partner[a] for a in merged], kept


def reference_tofu_step(x, metric, r: int, prefix: int, fuse: bool, mlerp: str):
    r = min(r, (x.shape[0] - prefix) // 2)
    if r <= 0:
        return x
    merged, partners, kept = tome_matching(metric, r, prefix)
    if not fuse:
        return x[kept]
    rows = []
    for j in kept:
        members = [j] + [a for a, b in zip(merged, partners) if b == j]
        if len(members) == 1:
            rows.append(x[j])
            continue
        mean = sum(x[m] for m in members) / len(members)
        largest = max(float(x[m].norm()) for m in members)
        divisor = x[j].norm() if mlerp == "reference" else mean.norm()
        rows.append(mean / divisor * largest)
    return torch.stack(rows)


def reference_tofu(model, x_images, r: int, mlerp: str = "reference"):
    L = len(model.blocks)

    def step(i, x, size, metric):
        return reference_tofu_step(x, metric, r, model.num_prefix_tokens, i > L // 2, mlerp), size[: x.shape[0]]

    return run_reference(model, x_images, step)


@pytest.mark.parametrize("config", [cfg(depth=6), cfg(depth=6, reg_tokens=3, init_values=0.5), cfg(depth=6, class_token=False, global_pool="avg")],
                         ids=["cls", "registers", "avg-pool"])
@pytest.mark.parametrize("mlerp", ["reference", "paper"])
@pytest.mark.slow
def test_tofu_matches_the_reference(config, mlerp):
    """Six blocks: pruning in blocks 0-3, MLERP in 4-5 (in the last block alone it could not reach CLS)."""
    model = perturbed(make_model(config))
    x = images()
    with torch.no_grad():
        expected = reference_tofu(model, x, 5, mlerp)
        out = method_logits("tofu", model, x, r=5, mlerp=mlerp)
    assert torch.allclose(out.logits, expected, atol=ATOL), (out.logits - expected).abs().max()


def test_tofu_mlerp_keeps_the_largest_norm_and_r0_is_the_baseline():
    from vitbudget.methods.tofu import tofu_step
    from vitbudget.runtime.state import TokenState

    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]]])  # CLS; A = positions 0 (CLS), 2; B = 1, 3
    state = TokenState.initial(x, 1)
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [1.0, 0.0], [0.0, 1.0]]])  # A token 2 matches B token 1
    new, _ = tofu_step(state, metric, 1, fuse=True, mlerp="paper")
    fused = (x[0, 1] + x[0, 2]) / 2  # A token 2 goes into B token 1 (cos 1)
    assert torch.allclose(new.x[0, 1], fused / fused.norm() * 2.0)  # the paper: unit mean times the larger norm (2)
    new, _ = tofu_step(state, metric, 1, fuse=True, mlerp="reference")
    assert torch.allclose(new.x[0, 1], fused / 1.0 * 2.0)  # the code: divided by the B token's own norm (1)
    model = perturbed(make_model(cfg()))
    with torch.no_grad():
        assert torch.equal(method_logits("tofu", model, images(), r=0).logits, model(images()))


# ---------------------------------------------------------------------------------------------
# Threshold merging
# ---------------------------------------------------------------------------------------------
def pairs_above(metric, thr: float, prefix: int) -> int:
    """ToMe's matching on one image: how many A tokens' best B similarity exceeds thr (at most half the patches)."""
    m = unit(metric)
    t = m.shape[0]
    a_pos = [i for i in range(0, t, 2) if i >= prefix]
    b_pos = [j for j in range(1, t, 2) if j >= prefix]
    count = sum(1 for a in a_pos if max(float(m[a] @ m[b]) for b in b_pos) > thr) if b_pos else 0
    return min(count, (t - prefix) // 2)


def reference_thresh(model, x_images, thr0: float, decay: float, budget: str = "image"):
    """Per image alone (budget image), or r = the batch's mean count rounded half up in every image (batch)."""
    p = model.num_prefix_tokens
    x = model.embed(x_images)
    xs, sizes = [x[b] for b in range(x.shape[0])], [torch.ones(x.shape[1]) for _ in range(x.shape[0])]
    counts = []
    for i, block in enumerate(model.blocks):
        thr = thr0 - decay * i
        mids, metrics = [], []
        for xi, si in zip(xs, sizes):
            out, _, k = attention(block.attn, block.norm1(xi[None]), si.log()[None, None, None, :])
            mids.append(xi + block.ls1(out)[0])
            metrics.append(k[0].mean(dim=0))
        rs = [pairs_above(mt, thr, p) for mt in metrics]
        if budget == "batch":
            rs = [math.floor(sum(rs) / len(rs) + 0.5)] * len(rs)
        merged = [reference_tome_merge(xi, si, mt, r, p) for xi, si, mt, r in zip(mids, sizes, metrics, rs)]
        xs = [mlp_half(block, xi[None])[0] for xi, _ in merged]
        sizes = [si for _, si in merged]
        counts.append([xi.shape[0] for xi in xs])
    return torch.cat([head(model, xi[None]) for xi in xs]), counts


def mixed_images():
    """Flat, smooth and noisy images: very different numbers of similar tokens."""
    g = torch.Generator().manual_seed(3)
    flat = torch.ones(1, 3, 32, 32) * 0.3
    smooth = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).clone()
    noisy = torch.randn(2, 3, 32, 32, generator=g)
    return torch.cat([noisy[:1], flat, smooth, noisy[1:]])


THRESH = dict(thr0=0.95, decay=0.02)


def thresh_model(**changes):
    return perturbed(make_model(cfg(**changes)), seed=1)


@pytest.mark.slow
def test_thresh_batched_packed_equals_one_by_one_and_the_reference():
    model = thresh_model()
    x = mixed_images()
    with torch.no_grad():
        expected, counts = reference_thresh(model, x, **THRESH)
        out = method_logits("thresh", model, x, **THRESH)
        alone = torch.cat([method_logits("thresh", model, x[b : b + 1], **THRESH).logits for b in range(len(x))])
    assert len({tuple(c) for c in zip(*counts)}) > 2, counts  # heterogeneous: images keep different counts
    assert torch.allclose(out.logits, alone, atol=ATOL), (out.logits - alone).abs().max()
    assert torch.allclose(out.logits, expected, atol=ATOL), (out.logits - expected).abs().max()
    assert [t.tolist() for t in out.record.mlp_tokens] == counts  # per-image counts in the record
    assert [t.tolist() for t in out.record.attn_tokens[1:]] == counts[:-1]
    assert any(w < c for w, c in zip(out.record.attn_width, out.record.core_width))  # blocks ran packed


@pytest.mark.slow
def test_thresh_flops_are_per_image_from_executed_tokens():
    model = thresh_model()
    config = model.cfg
    x = mixed_images()
    with torch.no_grad():
        out = method_logits("thresh", model, x, **THRESH)
        _, counts = reference_thresh(model, x, **THRESH)
    n0 = config.num_patches + 1
    head_dim = config.embed_dim // config.num_heads
    for b in range(len(x)):
        attn_n = [n0] + [c[b] for c in counts[:-1]]
        expected = stem_macs(config)
        for n_attn, n_mlp in zip(attn_n, [c[b] for c in counts]):
            expected += float(block_macs(n_attn, config)) - 2 * n_attn * config.embed_dim * config.mlp_hidden
            expected += 2 * n_mlp * config.embed_dim * config.mlp_hidden
            expected += (n_attn + 1) // 2 * (n_attn // 2) * head_dim  # the matching product on its own tokens
        assert macs_per_image(config, out.record)[b].item() == pytest.approx(expected, rel=1e-12)


def test_thresh_above_one_is_exactly_the_baseline():
    model = thresh_model()
    x = mixed_images()
    with torch.no_grad():
        base = build_method("baseline", model)(x)
        for budget in ("image", "batch"):
            out = method_logits("thresh", model, x, thr0=1.01, decay=0.0, budget=budget)
            assert torch.equal(out.logits, base.logits)
            assert out.record.mlp_tokens[-1].tolist() == [65] * len(x)


def test_thresh_batch_budget_is_tome_with_the_mean_count():
    model = thresh_model(reg_tokens=1)
    x = mixed_images()
    with torch.no_grad():
        expected, counts = reference_thresh(model, x, budget="batch", **THRESH)
        out = method_logits("thresh", model, x, budget="batch", **THRESH)
    assert torch.allclose(out.logits, expected, atol=ATOL), (out.logits - expected).abs().max()
    assert all(len(set(c)) == 1 for c in counts)
    assert [t.tolist() for t in out.record.mlp_tokens] == counts


def test_thresh_refuses_export_and_bad_budget():
    from vitbudget.export.trace import check_exportable
    from vitbudget.methods.compiled import compile_support

    model = thresh_model()
    with pytest.raises(ConfigError, match="depend on the pixels"):
        check_exportable(build_method("thresh", model))
    assert "depend on the pixels" in compile_support(build_method("thresh+abs", model))  # torch.compile allows graph breaks
    assert compile_support(build_method("pitome", model)) is None and compile_support(build_method("tofu", model)) is None
    with pytest.raises(ConfigError, match="--budget"):
        build_method("thresh", model, budget="dataset")


# ---------------------------------------------------------------------------------------------
# Stacks with ABS and token pictures
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options", [("pitome", dict(ratio=0.85)), ("tofu", dict(r=5)), ("thresh", THRESH)])
@pytest.mark.slow
def test_new_methods_stack_with_abs_and_draw_merged_sizes(name, options):
    model = thresh_model()
    x = mixed_images()
    with torch.no_grad():
        alone = build_method(name, model, **options)(x)
        stack = build_method(f"{name}+abs", model, alpha=0.25, **options)
        out = stack(x)
    assert torch.equal(out.record.mlp_tokens[-1], alone.record.mlp_tokens[-1])  # the reducer acts as it would alone
    survivors = out.record.mlp_tokens[-1] - 1
    assert torch.equal(out.record.aux["stack_refined"].sum(dim=1), (survivors * 0.25 + 0.5).floor().long())  # α of the survivors
    sizes = build_method(name, model, **options).token_map(alone).values
    kept = ~sizes.isnan()
    assert torch.equal(kept.sum(dim=1), survivors)  # one value per surviving token, at the patch it kept
    if name != "tofu":  # merged sizes add up to the patches (ToFu prunes some in its early blocks)
        assert torch.equal(sizes.nan_to_num(0).sum(dim=1), torch.full((len(x),), 64.0))
