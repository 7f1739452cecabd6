"""DynamicViT, SPOT and the SPOT heuristic: baselines, masked == removed, running statistics,
batching, FLOPs, checkpoints, options, and a training step that reaches the predictors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from test_cost import counted_flops
from vitbudget import CheckpointError, ConfigError, run
from vitbudget.runtime.cost import macs_per_image
from vitbudget.methods import build_method, load_method, save_method
from vitbudget.methods.base import run_teacher
from vitbudget.methods.predictor import attention_stats
from vitbudget.models.loading import save_model

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
STAGES = dict(stages="1,2")


@pytest.fixture(scope="module")
def model():
    return make_model()


def build(name, model, seed=0, **opts):
    torch.manual_seed(seed)
    return build_method(name, model, **{**STAGES, **opts}).eval()


def forward(method, x=X):
    with torch.no_grad():
        return method(x)


@pytest.mark.parametrize("name", ["dynamicvit", "spot", "spot_heuristic"])
def test_rho_one_is_exactly_the_baseline(model, name):
    out = forward(build(name, model, rho=1.0))
    assert torch.equal(out.logits, run(model, X).logits)


@pytest.mark.parametrize("name", ["dynamicvit", "spot", "spot_heuristic"])
def test_inference_keeps_int_n_rho_k_tokens_batched_equals_one_by_one(model, name):
    method = build(name, model, rho=0.6)
    out = forward(method)
    assert [int(t[0]) for t in out.record.attn_tokens] == [17, 1 + 9, 1 + 5]  # int(16*.6), int(16*.36): DynamicViT's rule
    assert out.record.attn_width == [17, 10, 6]  # fixed counts: no padding
    for i in range(4):
        assert torch.allclose(out.logits[i], forward(method, X[i : i + 1]).logits[0], atol=1e-5)
    drop = out.record.aux["drop_stage"]
    assert ((drop == 1).sum(1) == 7).all() and ((drop == 3).sum(1) == 5).all()
    assert method.token_map(out).values.shape == (4, 16)


@pytest.mark.parametrize("name,opts", [("dynamicvit", {}), ("spot", {}), ("spot", dict(head_average=True, d_remap=0.5))])
def test_removal_equals_masked_path_for_the_same_masks(model, name, opts):
    method = build(name, model, rho=0.6, **opts)
    method.capture = True
    removed = forward(method)
    method.fixed_keep = removed.record.aux["kept_ids"]  # the masks inference chose, fed to the masked path
    masked = forward(method)
    assert masked.state.width == 17 and masked.state.policy is not None
    assert torch.allclose(removed.logits, masked.logits, atol=1e-4)
    # the predictor saw the same features on both paths: its keep decisions agree
    for k, ids in enumerate(removed.record.aux["kept_ids"]):
        m = masked.record.aux["decisions"][k]
        assert (m.sum(1) == ids.shape[1]).all()
    if name == "spot":  # statistics restricted to kept tokens equal those of the removed path
        for r, m in zip(removed.record.aux["spot_stats"], masked.record.aux["spot_stats"]):
            for src in method.sources:
                keep = m["keep"] if m["keep"] is not None else torch.ones(4, 16)
                masked_rows = torch.stack([m[src][b][keep[b] > 0.5] for b in range(4)])
                assert torch.allclose(r[src], masked_rows, atol=1e-5), src


def test_training_masks_are_monotone_and_keep_cls(model):
    method = build("spot", model, rho=0.6)
    method.train()
    torch.manual_seed(0)
    out = method(X)
    d = out.record.aux["decisions"]
    assert len(d) == 2 and all(((t == 0) | (t == 1)).all() for t in d)
    assert (d[1] <= d[0]).all()
    assert (out.state.policy[:, 0] == 1).all() and out.state.width == 17


def test_spot_running_statistics_equal_a_direct_recomputation(model):
    """Running mean / variance of all blocks so far, gathered on removal, vs recomputation by patch id."""
    from vitbudget.models import ViTConfig

    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2, num_classes=10)
    method = build("spot", make_model(cfg), rho=0.6, stages="2,4")
    method.capture = True
    out = forward(method)
    probs = out.record.aux["probs"]  # per block: (B, H, N, N) and the patch ids of its tokens
    assert len(probs) == 4  # blocks 0..3 need probabilities (up to the last stage)
    for stage, stats in zip((2, 4), out.record.aux["spot_stats"]):
        ids = stats["patch_ids"]  # (B, Np) kept patches at this stage
        maps = []
        for p, pid in probs[:stage]:
            pos = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.stack([(pid[b] == i).nonzero()[0, 0] - 1 for i in ids[b]])]) for b in range(4)])
            maps.append(torch.stack([p[b][:, pos[b]][:, :, pos[b]] for b in range(4)]))
        maps = torch.stack(maps)  # (L, B, H, K, K)
        mean, var = maps.mean(0), maps.var(0, unbiased=False)
        assert torch.allclose(stats["A"], attention_stats(maps[-1]), atol=1e-6)
        assert torch.allclose(stats["M"], attention_stats(mean), atol=1e-6)
        assert torch.allclose(stats["S"], attention_stats(var), atol=1e-6)


def test_attention_stats_masked_equals_submatrix():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 9, 9, generator=g)
    keep = torch.tensor([[1, 1, 0, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float)
    masked = attention_stats(a, keep)
    for b in range(2):
        idx = torch.cat([torch.zeros(1, dtype=torch.long), 1 + keep[b].nonzero().flatten()])
        sub = a[b][:, idx][:, :, idx][None]
        assert torch.allclose(masked[b][keep[b] > 0], attention_stats(sub)[0], atol=1e-6)
    # eq. 5-9 by hand for one token
    s = attention_stats(a)[0, 2, 1]
    blk = a[0, 1, 1:, 1:]
    assert torch.allclose(s, torch.stack([a[0, 1, 0, 3], a[0, 1, 3, 0], blk[2].mean(), blk[:, 2].mean(), blk[2].var(unbiased=False), blk[:, 2].var(unbiased=False)]))


@pytest.mark.slow
def test_predictor_flops_are_counted_and_match_the_counter():
    from vitbudget.models import ViTConfig

    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    method = build("dynamicvit", make_model(cfg), rho=0.7, stages="1,3")
    counted, out = counted_flops(method.model, X[:2], method)
    ours = macs_per_image(cfg, out.record)
    assert counted == pytest.approx(2 * float(ours.sum()), rel=1e-9)
    pred = sum(method.predictors[k].macs(n) for k, n in enumerate((16, 11)))  # int(16 * 0.7) = 11 kept at stage 1
    assert float(out.record.extra_macs[0]) == pred and pred > 0
    spot = build("spot", make_model(cfg), rho=0.7, stages="1,3")
    extra = float(forward(spot, X[:1]).record.extra_macs[0])
    assert extra > sum(spot.predictors[k].macs(n) for k, n in enumerate((16, 11)))  # + statistics


@pytest.mark.slow
def test_spot_probability_needs_and_ablation_shapes():
    from vitbudget.models import ViTConfig

    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2, num_classes=10)
    m = make_model(cfg)
    spot = build("spot", m, stages="3,6,9")
    assert [i for i in range(12) if spot.needs_probs(i)] == list(range(9))
    assert [i for i in range(12) if build("spot", m, stages="3,6,9", no_dynamics=True).needs_probs(i)] == [2, 5, 8]
    assert not any(build("dynamicvit", m, stages="3,6,9").needs_probs(i) for i in range(12))
    widths = lambda meth: meth.predictors[0].widths[0]
    assert widths(spot) == 32 + 3 * 6 * 2
    assert widths(build("spot", m, no_means=True)) == widths(build("spot", m, no_variances=True)) == 32 + 3 * 4 * 2
    assert build("spot", m, no_means=True).stats == (0, 1, 4, 5) and build("spot", m, no_variances=True).stats == (0, 1, 2, 3)
    assert widths(build("spot", m, no_dynamics=True)) == 32 + 1 * 6 * 2
    for meth in (spot, build("spot", m, d_remap=0, head_average=True)):  # hidden widths follow the input width E (SPOT's FLOPs)
        e = widths(meth)
        assert meth.predictors[0].widths == (e, e // 2, e // 4, 2)
    assert build("dynamicvit", m).predictors[0].widths == (32, 16, 8, 2)  # DynamicViT: C, C/2, C/4
    assert widths(build("spot", m, no_dynamics=True, head_average=True, d_remap=0)) == 6
    assert widths(build("spot", m, d_remap=0.5)) == 16 + 36 and widths(build("spot", m, d_remap=8)) == 8 + 36
    assert len(build("spot", m, stages="3,6,9", shared_predictor=True).predictors) == 1
    for opts in [dict(no_dynamics=True, head_average=True, d_remap=0), dict(shared_predictor=True, no_variances=True)]:
        out = forward(build("spot", make_model(), rho=0.6, **opts))
        assert [int(t[0]) for t in out.record.attn_tokens] == [17, 10, 6]


@pytest.mark.parametrize("name,opts,match", [
    ("spot", dict(rho=0.0), "rho"), ("dynamicvit", dict(rho=1.01), "rho"), ("spot_heuristic", dict(rho=-0.5), "rho"),
    ("spot", dict(stages="2,1"), "increasing"), ("dynamicvit", dict(stages="1,3"), "outside"), ("spot", dict(stages="0,1"), "outside"),
    ("spot_heuristic", dict(stages="0"), "outside"), ("spot", dict(d_remap=3), "even"), ("spot", dict(d_remap=-1.0), ">= 0"),
    ("spot", dict(d_remap=2.5), "integer"), ("dynamicvit", dict(rate_weight=-1.0), ">= 0"),
])
def test_bad_options_are_config_errors(model, name, opts, match):
    with pytest.raises(ConfigError, match=match):
        build_method(name, model, **{**STAGES, **opts})


def test_checkpoints_round_trip_and_refuse_missing_predictors(model, tmp_path):
    plain = save_model(model, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="spot"):
        load_method(plain, "spot", stages="1,2")
    spot = build("spot", model, rho=0.6)
    path = save_method(spot, tmp_path / "spot.safetensors")
    again = load_method(path)
    assert again.name == "spot" and again.options == spot.options
    assert torch.equal(forward(again).logits, forward(spot).logits)
    dvit = save_method(build("dynamicvit", model), tmp_path / "dvit.safetensors")
    with pytest.raises(CheckpointError):
        load_method(dvit, "spot", stages="1,2")
    assert load_method(path, "spot_heuristic", stages="1,2").name == "spot_heuristic"  # training-free applies anywhere


@pytest.mark.parametrize("name", ["spot", "dynamicvit"])
def test_training_step_reaches_predictors_and_losses(model, name):
    import copy

    method = build(name, copy.deepcopy(model), rho=0.6, token_distill=0.5)
    method.train()
    with torch.no_grad():
        teacher = run_teacher(model, X)
    torch.manual_seed(0)
    out = method(X)
    losses = method.extra_losses(out, torch.zeros(4, dtype=torch.long), teacher)
    assert set(losses) == {"rate", "token_distill"}
    # the token loss by hand, on final-normed kept tokens: SPOT 1 - cosine (its eq. 14), DynamicViT MSE
    kept = out.state.policy[:, 1:] > 0.5
    s, t = model.norm(out.state.x[:, 1:][kept]), model.norm(teacher.state.x[:, 1:][kept])
    distance = (1 - F.cosine_similarity(s, t, dim=-1)).mean() if name == "spot" else F.mse_loss(s, t)
    assert torch.allclose(losses["token_distill"], 0.5 * distance, atol=1e-6)
    loss = F.cross_entropy(out.logits, torch.arange(4)) + sum(losses.values())
    loss.backward()
    for pred in method.predictors:
        grads = [p.grad for p in pred.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.slow
def test_trainer_runs_spot_with_a_teacher(tmp_path, image_folder):
    from vitbudget import load_model
    from vitbudget.train import Trainer, get_recipe

    first = Trainer(get_recipe("smoke", epochs=1, batch_size=8, train_limit=None, eval_limit=8, final_eval_limit=8), image_folder,
                    tmp_path / "a", workers=0, progress=False).fit()
    recipe = get_recipe("smoke", epochs=1, batch_size=8, train_limit=16, eval_limit=8, final_eval_limit=8, method="spot",
                        method_options={"stages": "1", "rho": 0.5}, distill_weight=0.5, lr_scales=[("predictors", 10.0)])
    trainer = Trainer(recipe, image_folder, tmp_path / "b", init=load_model(first.model_path), teacher=load_model(first.model_path),
                      workers=0, progress=False)
    before = [p.detach().clone() for p in trainer.method.predictors.parameters()]
    result = trainer.fit()
    after = list(trainer.method.predictors.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    assert load_method(result.model_path).name == "spot"
    assert {g["lr_scale"] for g in trainer.optimizer.param_groups} == {1.0, 10.0}
