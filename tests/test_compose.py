"""Stacks (methods.compose): reducer + ABS on the survivors. No-op parts, batching, FLOPs, key masks,
merged tokens, token maps, training and checkpoints, registry and CLI."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_model
from test_avit import images, random_halting
from test_cost import counted_flops

from vitbudget import CheckpointError, ConfigError, Hooks
from vitbudget.cli import main
from vitbudget.methods import METHODS, Method, Stack, build_method, compose, load_method, register, save_method
from vitbudget.models import save_model
from vitbudget.runtime.cost import block_macs, macs_per_image

SCORES = ["entropy", "attnvar", "gradsim", "random"]
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
D, HID, C = TINY.embed_dim, TINY.mlp_hidden, TINY.num_classes

# reducer settings that do something on TINY (3 blocks, 16 patches), and their no-op settings
REDUCING = [
    ("tome", {"r": 2}),
    ("evit", {"rho": 0.7, "stages": "1"}),
    ("evit", {"rho": 0.7, "stages": "1,2", "fuse": True}),
    ("spot_heuristic", {"rho": 0.7, "stages": "1"}),
    ("dynamicvit", {"rho": 0.7, "stages": "1"}),
    ("spot", {"rho": 0.7, "stages": "1,2"}),
]
NO_OP = [("tome", {"r": 0}), ("evit", {"rho": 1.0, "stages": "1"}), ("spot_heuristic", {"rho": 1.0, "stages": "1"}), ("avit", {"halting": False})]


@pytest.fixture(scope="module")
def model():
    return make_model()


def forward(method, x=X):
    with torch.no_grad():
        return method.eval()(x)


def stack(model, reducer, opts, **abs_opts):
    return build_method(f"{reducer}+abs", model, **opts, **abs_opts)


# -- the two exact reductions -------------------------------------------------------------------------
@pytest.mark.parametrize("reducer, opts", REDUCING)
@pytest.mark.parametrize("score", ["entropy", "attnvar"])  # with alpha 0 no scorer runs; these two differ in hooks
def test_alpha_zero_is_the_reducer_exactly(model, reducer, opts, score):
    part = build_method(reducer, model, **opts)  # learned reducers draw their predictors: one instance for both
    alone = forward(part)
    out = forward(compose(part, build_method("abs", model, alpha=0.0, score=score)))
    assert torch.equal(out.logits, alone.logits)
    assert torch.equal(macs_per_image(TINY, out.record), macs_per_image(TINY, alone.record))
    assert "stack_refined" not in out.record.aux


@pytest.mark.parametrize("reducer, opts, score", [(*r, s) for r in NO_OP for s in SCORES if (r[0], s) != ("avit", "attnvar")])  # rejected: below
def test_no_op_reducer_is_abs_alone_exactly(model, reducer, opts, score):
    alone = forward(build_method("abs", model, alpha=0.25, score=score))
    out = forward(stack(model, reducer, opts, alpha=0.25, score=score))
    assert torch.equal(out.logits, alone.logits)
    assert torch.equal(macs_per_image(TINY, out.record), macs_per_image(TINY, alone.record))
    assert torch.equal(out.record.aux["abs_selected"], alone.record.aux["abs_selected"])  # patch ids = positions here


def test_avit_stack_alpha_zero_and_no_halting():
    halting_model, opts = random_halting()
    x = images(6, seed=3)
    assert torch.equal(forward(build_method("avit+abs", halting_model, alpha=0.0, **opts), x).logits,
                       forward(build_method("avit", halting_model, **opts), x).logits)


# -- batching --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reducer, opts, score", [
    (*REDUCING[0], "entropy"), (*REDUCING[0], "random"), (*REDUCING[0], "attnvar"),
    (*REDUCING[1], "attnvar"), (*REDUCING[2], "gradsim"), (*REDUCING[3], "entropy"),
])
@pytest.mark.slow
def test_batched_equals_one_by_one(model, reducer, opts, score):
    method = stack(model, reducer, opts, alpha=0.3, score=score)
    out = forward(method)
    for i in range(len(X)):
        one = forward(method, X[i : i + 1])
        assert torch.allclose(one.logits[0], out.logits[i], atol=1e-5)
        assert torch.equal(macs_per_image(TINY, one.record)[0], macs_per_image(TINY, out.record)[i])
        assert torch.equal(one.record.aux["stack_refined"][0], out.record.aux["stack_refined"][i])


@pytest.mark.parametrize("score", ["entropy", "gradsim", "random"])
@pytest.mark.slow
def test_avit_stack_refines_survivors_of_the_last_block(score):
    """Padded batches (key mask): batched = one by one = dense; k = round(alpha * tokens still running
    in the last block), none for images whose CLS halted earlier; FLOPs charge exactly that."""
    halting_model, opts = random_halting()
    cfg = halting_model.cfg
    x = images(8, seed=3)
    alpha = 0.3
    plain = forward(build_method("avit", halting_model, **opts), x)
    method = build_method("avit+abs", halting_model, alpha=alpha, score=score, **opts)
    out = forward(method, x)
    dense = forward(build_method("avit+abs", halting_model, alpha=alpha, score=score, dense=True, **opts), x)
    survivors = (plain.record.attn_tokens[-1] - 1).clamp(min=0)  # patch tokens that ran the last block (0: CLS halted earlier)
    k = torch.floor(alpha * survivors.double() + 0.5).long()
    assert (k == 0).any() and (k > 0).any(), "the design should give both kinds of image"
    assert torch.equal(out.record.aux["stack_refined"].sum(1), k)
    untouched = k == 0
    assert torch.equal(out.logits[untouched], plain.logits[untouched])
    assert not torch.allclose(out.logits[~untouched], plain.logits[~untouched])
    scorer = {"entropy": D * D + D * C, "gradsim": D, "random": 0}[score] * survivors.double()
    expected = torch.where(k > 0, block_macs((k + 1).double(), cfg) + scorer, scorer)
    assert torch.equal(macs_per_image(cfg, out.record) - macs_per_image(cfg, plain.record), expected)
    assert torch.allclose(dense.logits, out.logits, atol=1e-5)
    assert torch.equal(macs_per_image(cfg, dense.record), macs_per_image(cfg, out.record))
    for i in [int(k.argmin()), int(k.argmax()), 0]:  # an image not refined, one refined, the first
        one = forward(method, x[i : i + 1])
        assert torch.allclose(one.logits[0], out.logits[i], atol=1e-5)
        assert torch.equal(macs_per_image(cfg, one.record)[0], macs_per_image(cfg, out.record)[i])


def test_avit_stack_rejects_attnvar():
    with pytest.raises(ConfigError, match="attnvar"):
        build_method("avit+abs", make_model(), score="attnvar")


# -- FLOPs --------------------------------------------------------------------------------------------
def test_flops_charge_the_scorer_and_the_extra_block_on_survivors(model):
    """tome r 2 on 16 patches, 3 blocks: the entropy head scores the 12 tokens left after block 1;
    10 survive block 2, so alpha 0.25 refines round(2.5) = 3 of them plus the CLS token."""
    reducer = build_method("tome", model, r=2)
    method = stack(model, "tome", {"r": 2}, alpha=0.25, score="entropy")
    counted_reducer, alone = counted_flops(model, X, reducer)
    with torch.no_grad():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            out = method(X)
    extra = 12 * (D * D + D * C) + (12 * 4 * D * D + 2 * 4 * 4 * D)  # scorer + block on 4 tokens (mlp_ratio 4)
    assert extra == 66304
    assert torch.equal(macs_per_image(TINY, out.record) - macs_per_image(TINY, alone.record), torch.full((4,), float(extra), dtype=torch.float64))
    assert counter.get_total_flops() - counted_reducer == 2 * 4 * extra  # the counter: 2 per MAC, 4 images
    assert out.record.aux["stack_refined"].sum(1).tolist() == [3] * 4


# -- what the refiner sees ----------------------------------------------------------------------------
class Capture(Hooks):
    """Wraps a method's hooks and keeps the state after a given block."""

    def __init__(self, method, at):
        self.method, self.at, self.state = method, at, None

    def __getattribute__(self, name):
        if name in ("method", "at", "state", "after_block"):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "method"), name)

    def after_block(self, index, state, info, record):
        state = self.method.after_block(index, state, info, record)
        if index == self.at:
            self.state = state
        return state


def test_scores_follow_the_tokens_through_a_merge_after_scoring(model):
    """ToMe merges inside the last block, after the entropy score was taken: every survivor keeps the
    score of the token whose patch id it carries, and the refined tokens are the top k of those."""
    from vitbudget import run

    alpha, r = 0.4, 2
    method = stack(model, "tome", {"r": r}, alpha=alpha, score="entropy")
    out = forward(method)
    capture = Capture(build_method("tome", model, r=r), TINY.depth - 2)
    with torch.no_grad():
        final = run(model, X, capture).state
        h = F.relu(F.linear(capture.state.x[:, 1:], method.refiner.head_w1, method.refiner.head_b1))
        logp = F.linear(h, method.refiner.head_w2, method.refiner.head_b2).log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)  # (B, 12) for the tokens before the last block
    for b in range(len(X)):
        by_id = dict(zip(capture.state.patch_ids[b, 1:].tolist(), entropy[b].tolist()))
        survivors = final.patch_ids[b, 1:].tolist()
        k = math.floor(alpha * len(survivors) + 0.5)
        expected = sorted(sorted(survivors, key=lambda i: -by_id[i])[:k])
        assert sorted(out.record.aux["abs_selected"][b].tolist()) == expected


def test_merged_tokens_attend_proportionally_in_the_extra_block(model):
    """alpha 1 refines every survivor: the logits equal an independent extra block with log-size bias."""
    from vitbudget import run

    method = stack(model, "tome", {"r": 2}, alpha=1.0, score="gradsim")
    out = forward(method)
    with torch.no_grad():
        final = run(model, X, build_method("tome", model, r=2)).state
        blk, x = method.refiner.block, final.x
        B, N, _ = x.shape
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, N, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + final.size.log()[:, None, None, :]
        a = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + blk.attn.proj(a)
        x = x + blk.mlp(blk.norm2(x))
        expected = model.forward_head(model.norm(x))
    assert torch.allclose(out.logits, expected, atol=1e-5)
    assert final.size is not None and (final.size > 1).any()


def test_compose_from_python_equals_the_named_stack(model):
    named = forward(stack(model, "evit", {"rho": 0.7, "stages": "1"}, alpha=0.3, score="entropy"))
    made = compose(build_method("evit", model, rho=0.7, stages="1"), build_method("abs", model, alpha=0.3, score="entropy"))
    assert isinstance(made, Stack) and made.name == "evit+abs"
    assert torch.equal(forward(made).logits, named.logits)
    assert made.describe() == {"method": "evit+abs", "rho": 0.7, "stages": "1", "fuse": False, "fuse_normalize": False, "alpha": 0.3, "score": "entropy", "seed": 0, "hidden": 0}
    with pytest.raises(ConfigError, match="same model"):
        Stack(model, build_method("tome", model), build_method("abs", make_model(seed=1)))


# -- token maps ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_token_maps_show_both_layers(model):
    method = stack(model, "evit", {"rho": 0.7, "stages": "1"}, alpha=0.3)
    out = forward(method)
    tmap = method.token_map(out)
    assert torch.equal(tmap.values, build_method("evit", model, rho=0.7, stages="1").token_map(forward(build_method("evit", model, rho=0.7, stages="1"))).values)
    assert tmap.outline.shape == (4, 16) and tmap.outline.sum(1).tolist() == [round(0.3 * 12)] * 4
    assert (tmap.values[tmap.outline] == 2).all(), "only kept tokens can be refined"
    assert "refined" in tmap.label and "dropped" in tmap.label
    tome = stack(model, "tome", {"r": 2}, alpha=0.3)
    tmap = tome.token_map(forward(tome))
    sizes = torch.nan_to_num(tmap.values)
    assert sizes.sum(1).tolist() == [16.0] * 4  # every patch is in exactly one surviving token
    assert not tmap.values[tmap.outline].isnan().any(), "refined tokens are survivors"
    assert "merged" in tmap.label


# -- training and checkpoints ----------------------------------------------------------------------------
def test_training_mode_runs_the_reducer_and_eval_recopies_the_block(model):
    m = make_model()
    method = stack(m, "dynamicvit", {"rho": 0.7, "stages": "1"}, alpha=0.3)
    assert not method.training, "a stack is built ready to evaluate"
    method.train()
    torch.manual_seed(0)
    a = method(X)
    torch.manual_seed(0)
    b = method.reducer(X)
    assert torch.equal(a.logits, b.logits) and "stack_refined" not in a.record.aux
    assert set(method.extra_losses(a, torch.zeros(4, dtype=torch.long), None)) == {"rate"}
    with torch.no_grad():
        m.blocks[-1].mlp.fc2.weight.add_(1.0)  # the backbone trains
    method.eval()
    assert torch.equal(method.refiner.block.mlp.fc2.weight, m.blocks[-1].mlp.fc2.weight)


@pytest.mark.slow
def test_checkpoints_share_the_trained_reducer(tmp_path):
    m = make_model()
    m.info.classes = [f"class{c:02d}" for c in range(10)]
    method = stack(m, "dynamicvit", {"rho": 0.6, "stages": "1"}, alpha=0.3)
    with torch.no_grad():
        for p in method.reducer.predictors.parameters():
            p.add_(torch.randn_like(p))
    path = save_method(method, tmp_path / "stack.safetensors")
    restored = load_method(path)
    assert isinstance(restored, Stack) and restored.reducer.options.rho == 0.6 and restored.refiner.options.alpha == 0.3
    assert torch.equal(forward(restored).logits, forward(method).logits)
    part = load_method(path, "dynamicvit")  # a stack's checkpoint as its reducer
    assert part.name == "dynamicvit" and part.options.rho == 0.6
    assert torch.equal(forward(part).logits, forward(method.reducer).logits)
    alone = save_method(method.reducer, tmp_path / "dyn.safetensors")  # a reducer's checkpoint as its stack
    again = load_method(alone, "dynamicvit+abs", alpha=0.3)
    assert again.reducer.options.rho == 0.6
    assert torch.equal(forward(again).logits, forward(method).logits)
    plain = save_model(m, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no 'dynamicvit\\+abs' parameters"):
        load_method(plain, "dynamicvit+abs", stages="1")
    assert load_method(plain, "tome+abs", r=2).name == "tome+abs"  # training-free stacks load from any ViT


@pytest.mark.slow
def test_train_cli_trains_a_stack(tmp_path, capsys, image_folder):
    out = tmp_path / "run"
    argv = ["train", "--recipe", "smoke", "--data", str(image_folder), "--out", str(out), "--quiet", "--workers", "0",
            "--train-limit", "32", "--batch-size", "8", "--epochs", "1", "--method", "dynamicvit+abs", "--stages", "1", "--alpha", "0.5"]
    assert main(argv) == 0, capsys.readouterr().err
    restored = load_method(out / "model.safetensors")
    assert restored.name == "dynamicvit+abs" and restored.refiner.options.alpha == 0.5
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar["method"]["name"] == "dynamicvit+abs"


# -- registry and options ---------------------------------------------------------------------------------
def test_options_go_to_the_part_that_has_them(model):
    method = build_method("tome+abs", model, r=3, alpha=0.1, score="gradsim")
    assert method.reducer.options.r == 3 and (method.refiner.options.alpha, method.refiner.options.score) == (0.1, "gradsim")
    with pytest.raises(ConfigError, match="--rho.*do not apply to method 'tome\\+abs'"):
        build_method("tome+abs", model, rho=0.5)
    with pytest.raises(ConfigError, match="--alpha must be in"):
        build_method("tome+abs", model, alpha=2.0)


@pytest.mark.parametrize("name, message", [
    ("abs+tome", "write the reducer first"),
    ("tome+depth", "not a refiner"),
    ("depth+abs", "not a token reducer"),
    ("tome+abs+abs", "two names"),
    ("nope+abs", "unknown method 'nope'"),
    ("tome+", "two names"),
])
def test_bad_stack_names(model, name, message):
    with pytest.raises(ConfigError, match=message):
        build_method(name, model)


@dataclass(frozen=True)
class SeededOptions:
    seed: int = 0


def test_an_option_both_parts_have_is_ambiguous(model):
    register("toy_reducer", lambda m, o: Method(m, o), SeededOptions, "test only", kind="reducer")  # a reducer: stacks take it
    try:
        with pytest.raises(ConfigError, match="option\\(s\\) seed belong to both parts"):
            build_method("toy_reducer+abs", model)
    finally:
        del METHODS["toy_reducer"]


# -- command line ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_and_viz_take_a_stack(tmp_path, capsys, checkpoint, image_folder):
    argv = ["eval", "--model", str(checkpoint), "--data", str(image_folder), "--out", str(tmp_path / "e"), "--quiet", "--workers", "0",
            "--no-speed", "--method", "tome", "--method", "tome+abs", "--r", "2", "--alpha", "0.25"]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "e" / "results.json").read_text())["methods"]
    assert results["tome+abs"]["method"] == "tome+abs" and results["tome+abs"]["r"] == 2
    assert results["tome"]["rel_flops"] < results["tome+abs"]["rel_flops"] < 1
    argv = ["viz", "--model", str(checkpoint), "--data", str(image_folder), "--out", str(tmp_path / "v"), "--method", "evit+abs",
            "--stages", "1", "--num-images", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "v" / "evit+abs_tokens.png").read_bytes().startswith(b"\x89PNG")


def test_cli_rejects_a_bad_stack_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--method", "abs+tome"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "invalid choice: 'abs+tome'" in err and "write the reducer first" in err


@pytest.mark.slow
def test_suite_entries_pair_a_stack_with_its_parts(tmp_path, capsys, checkpoint, image_folder):
    from vitbudget.data import EvalTransform, ImageFolder, subset_indices
    from vitbudget.eval import metrics
    from vitbudget.eval.evaluate import predict

    other = make_model(seed=5)  # another backbone: its predictions differ from the reference's
    other.info.classes = [f"class{c:02d}" for c in range(10)]
    other_path = save_model(other, tmp_path / "other.safetensors")
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"entries": [
        {"label": "Baseline", "method": "baseline"},
        {"label": "ToMe r 2", "method": "tome", "options": {"r": 2}},
        {"label": "other", "method": "baseline", "model": str(other_path)},
        {"label": "stack", "method": "tome+abs", "options": {"r": 2, "alpha": 0.5}, "seeded": True, "versus": ["ToMe r 2", "other"]},
    ]}))
    argv = ["bench", "--suite", str(suite), "--model", str(checkpoint), "--data", str(image_folder), "--out", str(tmp_path / "b"),
            "--quiet", "--workers", "0", "--no-speed", "--limit", "24", "--seeds", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["splits"]["test"]["rows"]
    pair = rows["stack"]["versus"]["ToMe r 2"]
    assert set(rows["stack"]["versus"]) == {"ToMe r 2", "other"} and "versus" not in rows["ToMe r 2"]
    assert pair["top1_gain"] == pytest.approx(rows["stack"]["top1_mean"] - rows["ToMe r 2"]["top1_mean"])
    dataset = ImageFolder(image_folder, "test", EvalTransform(32, load_method(checkpoint).model.info.preprocess))
    idx = subset_indices(len(dataset), 24)
    model = load_method(checkpoint).model
    a = predict(build_method("tome+abs", model, r=2, alpha=0.5, seed=0), dataset, idx, workers=0, progress=False)
    b = predict(build_method("tome", model, r=2), dataset, idx, workers=0, progress=False)
    ok_a, ok_b = (a.logits.argmax(1) == a.labels).numpy(), (b.logits.argmax(1) == b.labels).numpy()
    assert (pair["mcnemar_seed0"]["only_a"], pair["mcnemar_seed0"]["only_b"]) == (int((ok_a & ~ok_b).sum()), int((~ok_a & ok_b).sum()))
    assert pair["ece_bootstrap_seed0"]["delta"] == pytest.approx(100 * (metrics.ece(a.logits, a.labels) - metrics.ece(b.logits, b.labels)))
    c = predict(load_method(other_path), dataset, idx, workers=0, progress=False)
    ok_c = (c.logits.argmax(1) == c.labels).numpy()
    counts = rows["stack"]["versus"]["other"]["mcnemar_seed0"]
    assert (counts["only_a"], counts["only_b"]) == (int((ok_a & ~ok_c).sum()), int((~ok_a & ok_c).sum()))
    assert (ok_c != (predict(load_method(checkpoint), dataset, idx, workers=0, progress=False).logits.argmax(1) == c.labels).numpy()).any()
    assert "| stack | ToMe r 2 |" in (tmp_path / "b" / "test.md").read_text()


def test_ece_difference_bootstrap():
    from vitbudget.eval import metrics

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (400,), generator=g)
    logits = torch.randn(400, 10, generator=g) * 3
    same = metrics.ece_difference(logits, logits, labels, samples=200)
    assert same == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p_value": 1.0}
    sharper = metrics.ece_difference(logits * 2, logits, labels, samples=200)  # overconfident: worse calibration
    assert sharper["delta"] == pytest.approx(100 * (metrics.ece(logits * 2, labels) - metrics.ece(logits, labels)))
    assert 0 < sharper["ci_low"] <= sharper["delta"] <= sharper["ci_high"] and sharper["p_value"] < 0.05


def test_attnvar_scores_follow_patch_ids_when_evit_drops_one_token_in_the_last_block(model):
    """EViT --fuse in the last block dropping exactly one token keeps the token count (n - 1 + fused),
    yet reorders the tokens: the scores of that block's attention must follow the patch ids, not the
    positions. Expected: the last block's CLS-attention variance over heads, computed here, by patch id;
    the fused token (no patch id, absent when the scores were taken) is never refined."""
    from vitbudget import run

    alpha, n = 0.5, TINY.num_patches
    opts = {"rho": (n - 1) / n, "stages": str(TINY.depth - 1), "fuse": True}
    out = forward(stack(model, "evit", opts, alpha=alpha, score="attnvar"))
    with torch.no_grad():
        final = run(model, X, build_method("evit", model, **opts)).state
        x = model.embed(X)
        for blk in model.blocks[:-1]:
            x = blk(x)
        blk = model.blocks[-1]
        B, N, _ = x.shape
        qkv = blk.attn.qkv(blk.norm1(x)).reshape(B, N, 3, blk.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        probs = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        var = probs[:, :, 0, 1:].var(dim=1, unbiased=False)  # (B, 16), patch i at position i
    assert final.width - 1 == n  # one dropped, one fused: the count is unchanged
    for b in range(len(X)):
        survivors = final.patch_ids[b, 1:].tolist()
        assert survivors[-1] == -1  # the fused token
        real = [i for i in survivors if i >= 0]
        k = math.floor(alpha * len(survivors) + 0.5)
        expected = sorted(sorted(real, key=lambda i: -var[b, i].item())[:k])
        assert sorted(out.record.aux["abs_selected"][b].tolist()) == expected
