"""A-ViT: exact baseline when off, removing path = dense masked path, halted tokens inert, losses by hand."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import make_model

from vitbudget import CheckpointError, ConfigError
from vitbudget.runtime.cost import (
    dense_macs,
    executed_macs_per_image,
    macs_per_image,
)
from vitbudget.methods import AViT, Method, build_method, load_method, save_method
from vitbudget.methods.avit import halting_depth
from vitbudget.models import ViTConfig
from vitbudget.train import Trainer, get_recipe

CFG = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)  # 16 patches + CLS
GAMMA, BETA = 10.0, 30.0


def designed(h: torch.Tensor, image_weight: float = 0.0, cfg: ViTConfig = CFG, seed: int = 0):
    """A model whose channel 0 never changes after the embedding: token t scores h[t] in every block.

    The channel-0 rows of every attn.proj and mlp.fc2 are zero, so the residual stream's channel 0
    is the position embedding (plus `image_weight` times a patch's pixel sum, if given).
    """
    model = make_model(cfg, seed)
    with torch.no_grad():
        for block in model.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight[0] = 0.0
                layer.bias[0] = 0.0
        model.patch_embed.proj.weight[0] = image_weight
        model.patch_embed.proj.bias[0] = 0.0
        model.cls_token[..., 0] = 0.0
        model.pos_embed[0, :, 0] = (torch.logit(h.double()) + BETA) / GAMMA
    return model


def scores(model) -> torch.Tensor:
    """The halting score each token gets (same op as the method), for a position-only design."""
    return torch.sigmoid(model.pos_embed[0, :, 0].detach() * GAMMA - BETA)


def act_by_hand(h: list[float], depth: int, eps: float = 0.01) -> tuple[int, float, list[float]]:
    """(halting block, ponder, CLS weights per block) of a token with constant score h, in float64."""
    c, R, weights = 0.0, 1.0, []
    for block in range(1, depth + 1):
        hb = 1.0 if block == depth else h
        c += hb
        if c >= 1 - eps:
            weights.append(R)
            return block, block + R, weights
        weights.append(hb)
        R -= hb
    raise AssertionError("unreachable")


def token_scores(cls: float, fast: list[int], mid: list[int], slow: float = 0.1, n: int = 17) -> torch.Tensor:
    h = torch.full((n,), slow)
    h[0] = cls
    h[fast] = 0.995  # halts after block 1
    h[mid] = 0.6  # halts after block 2
    return h


def avit(model, **options):
    """The method in eval mode (a fresh nn.Module is in training mode, which runs the dense path)."""
    return build_method("avit", model, **options).eval()


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_halting_off_reproduces_the_baseline_exactly():
    model = make_model(CFG)
    x = images(3)
    with torch.no_grad():
        base = build_method("baseline", model)(x).logits
        off = avit(model, halting=False)(x).logits
    assert torch.equal(off, base) and torch.equal(base, model(x))


def random_halting(seed: int = 1):
    """A random model whose channel 0 depends strongly on the image (CLS included, through attention),
    with a gate that gives a mix of halting depths per token and per image."""
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=6, num_heads=2, num_classes=10)
    model = make_model(cfg, seed)
    with torch.no_grad():
        model.patch_embed.proj.weight[0] *= 20
        for block in model.blocks:
            block.attn.proj.weight[0] *= 40
            block.attn.proj.bias[0] += 0.4
    return model, {"gamma": 3.0, "beta": 2.0}


@pytest.mark.slow
def test_removing_equals_dense_and_batched_equals_one_by_one():
    model, opts = random_halting()
    removing, dense = avit(model, **opts), avit(model, dense=True, **opts)
    x = images(8, seed=3)
    with torch.no_grad():
        out, ref = removing(x), dense(x)
        depth = halting_depth(out.record)
        assert len(set(depth[:, 0].tolist())) > 1, "CLS should finish at different blocks in this batch"
        assert len({tuple(d.tolist()) for d in depth}) == 8
        assert torch.allclose(out.logits, ref.logits, atol=1e-5)
        assert torch.equal(depth, halting_depth(ref.record))
        assert torch.equal(torch.stack(out.record.attn_tokens), torch.stack(ref.record.attn_tokens))
        assert torch.equal(macs_per_image(model.cfg, out.record), macs_per_image(model.cfg, ref.record))
        assert ref.record.attn_width == [17] * 6  # dense ran every token
        for i in range(8):
            alone = removing(x[i : i + 1])
            assert torch.allclose(alone.logits[0], out.logits[i], atol=1e-5)
            assert torch.equal(halting_depth(alone.record)[0], depth[i])
            assert [int(t[0]) for t in alone.record.attn_tokens] == [int(t[i]) for t in out.record.attn_tokens]
    # executed FLOPs: padding and finished images accounted for, never below the real ones
    assert executed_macs_per_image(model.cfg, out.record) >= float(macs_per_image(model.cfg, out.record).mean()) - 1e-3


@pytest.mark.slow
def test_dense_training_path_masks_like_the_removing_path():
    """Train-mode semantics (dense, masked) under no_grad with dropout off equal the removing path."""
    model, opts = random_halting(seed=2)
    method = avit(model, **opts)
    x = images(5, seed=4)
    with torch.no_grad():
        removing = method.eval()(x).logits
        dense = method.train()(x).logits  # the model has no dropout / drop path
    assert torch.allclose(removing, dense, atol=1e-5)


@pytest.mark.parametrize("dense", [True, False])
def test_a_halted_token_contributes_nothing(dense):
    """Perturb token 5's features in every block after it halted (block 1): the logits do not move."""
    h = token_scores(cls=0.1, fast=[5], mid=[])
    model = designed(h)
    method = avit(model, dense=dense)
    x = images(2)

    def perturb(position):
        def hook(module, args):
            x = args[0].clone()
            if x.shape[1] == 17:  # dense: the token is still in the tensor, frozen
                x[:, position] += 100.0 * torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0))
            return (x,)
        return hook

    with torch.no_grad():
        ref = method(x)
        handles = [m.register_forward_pre_hook(perturb(5)) for b in model.blocks[1:] for m in (b.norm1, b.norm2)]
        try:
            assert torch.equal(method(x).logits, ref.logits)
        finally:
            for handle in handles:
                handle.remove()
        if dense:  # the control: the same perturbation of a running token changes the output
            handles = [m.register_forward_pre_hook(perturb(6)) for b in model.blocks[1:] for m in (b.norm1, b.norm2)]
            try:
                assert not torch.allclose(method(x).logits, ref.logits)
            finally:
                for handle in handles:
                    handle.remove()
    assert halting_depth(ref.record)[:, 5].tolist() == [1.0, 1.0]
    assert [int(t[0]) for t in ref.record.attn_tokens] == [17, 16, 16, 16]


def test_ponder_and_kl_losses_by_hand():
    h = token_scores(cls=0.4, fast=[1, 2, 3], mid=[4, 5, 6, 7, 8])
    model = designed(h)
    method = build_method("avit", model, target_depth=3.0, prior_std=1.5, ponder_weight=0.5, distr_weight=2.0).train()
    x = images(2)
    out = method(x)
    hs = scores(model).double().tolist()
    assert hs[0] == pytest.approx(0.4, abs=1e-5)
    depths, ponders = zip(*[act_by_hand(v, 4)[:2] for v in hs])
    # the hand values: 0.995 -> 1 block, rho 2; 0.6 -> 2 blocks, rho 2.4; 0.1 -> 4 blocks, rho 4.7; CLS 0.4 -> 3, 3.2
    assert (depths[0], depths[1], depths[4], depths[9]) == (3, 1, 2, 4)
    assert ponders[0] == pytest.approx(3.2) and ponders[1] == pytest.approx(2.0)
    assert ponders[4] == pytest.approx(2.4) and ponders[9] == pytest.approx(4.7)
    aux = out.record.aux
    assert torch.allclose(aux["avit_ponder"].double(), torch.tensor(ponders).double().expand(2, -1), atol=1e-5)
    assert aux["avit_halt_depth"].tolist() == [list(depths)] * 2
    # executed blocks: CLS finishes after block 3, so nothing runs in block 4
    assert halting_depth(out.record)[0].tolist() == [min(d, 3) for d in depths]
    # q_l: raw scores of the tokens running into block l, averaged over all 17 tokens; prior over blocks 1..4
    q = [sum(v for v, d in zip(hs, depths) if d >= block) / 17 for block in range(1, 5)]
    q = [min(max(v / sum(q), 0.01), 0.99) for v in q]
    prior = [math.exp(-0.5 * ((b - 3.0) / 1.5) ** 2) for b in range(1, 5)]
    prior = [p / sum(prior) for p in prior]
    kl = sum(p * math.log(p / v) for p, v in zip(prior, q))
    losses = method.extra_losses(out, None, None)
    assert float(losses["ponder"].detach()) == pytest.approx(0.5 * sum(ponders) / 17, rel=1e-5)
    assert float(losses["distr"].detach()) == pytest.approx(2.0 * kl, rel=1e-5)
    # CLS weights 0.4, 0.4, remainder 0.2 at block 3: logits = head(norm(sum w_l * CLS_l))
    assert act_by_hand(hs[0], 4)[2] == pytest.approx([0.4, 0.4, 0.2], abs=1e-5)
    total = torch.nn.functional.cross_entropy(out.logits, torch.tensor([1, 2])) + sum(losses.values())
    total.backward()
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.pos_embed.grad[0, :, 0].abs().sum() > 0  # the halting channel is trained


def test_flops_follow_halting_depths_per_image():
    h = token_scores(cls=0.1, fast=[1, 2, 3, 4], mid=[5, 6, 7, 8, 9, 10])
    model = designed(h, image_weight=0.02)  # patch scores also depend on the image
    method = avit(model)
    x = images(6, seed=5)
    with torch.no_grad():
        out = method(x)
    depth = halting_depth(out.record)
    per_block = torch.stack(out.record.attn_tokens)  # (depth, B)
    assert torch.equal(per_block.sum(0).double(), depth.sum(1).double())  # token-blocks = sum of depths
    for block in range(4):
        assert torch.equal(per_block[block], (depth > block).sum(1))
    macs = macs_per_image(CFG, out.record)
    assert (macs < dense_macs(CFG)).all()
    assert len(set(depth.sum(1).tolist())) > 1  # images halt differently, so they cost differently
    order = depth.sum(1).argsort()
    assert torch.equal(macs[order], macs[order].sort().values)  # more token-blocks, more FLOPs
    assert out.record.core_width[1] == int(per_block[1].max())  # attention product padded to the batch maximum
    assert out.record.attn_width[1] in (pytest.approx(float(per_block[1].float().mean())), int(per_block[1].max()))  # packed or not
    assert executed_macs_per_image(CFG, out.record) >= float(macs.mean()) - 1e-3


def test_cls_halting_ends_the_image():
    """CLS halts after block 2: the image's other tokens stop too, and blocks 3-4 run nothing."""
    h = token_scores(cls=0.6, fast=[3], mid=[])
    model = designed(h)
    removing, dense = avit(model), avit(model, dense=True)
    x = images(3)
    with torch.no_grad():
        out, ref = removing(x), dense(x)
    assert [t.tolist() for t in out.record.attn_tokens] == [[17] * 3, [16] * 3, [0] * 3, [0] * 3]
    assert out.record.attn_width == [17, 16, 0, 0]
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    assert halting_depth(out.record).max() == 2.0


def test_batch_shrinks_when_some_images_finish():
    """Images whose CLS halted leave the batch; executed FLOPs count only the images that ran."""
    model, opts = random_halting(seed=1)
    method = avit(model, **opts)
    x = images(8, seed=3)
    with torch.no_grad():
        out = method(x)
    cls_depth = halting_depth(out.record)[:, 0]
    first = int(cls_depth.min())
    assert first < 6 and (cls_depth > first).any()
    # block `first` ran a sub-batch: per image of the full batch, the linear layers ran f = active/8 of
    # the sub-batch's widths and the N x N products f * W^2 (a core side of sqrt(f) * W)
    counts = out.record.attn_tokens[first]
    f, w = float((counts > 0).sum()) / 8, int(counts.max())
    assert 0 < f < 1
    assert out.record.core_width[first] == pytest.approx(math.sqrt(f) * w)
    assert out.record.mlp_width[first] in (pytest.approx(f * w), pytest.approx(float(counts.sum()) / 8))  # padded or packed
    assert executed_macs_per_image(CFG, out.record) >= float(macs_per_image(CFG, out.record).mean()) - 1e-3


def test_token_map_shows_halting_depth_per_patch():
    h = token_scores(cls=0.1, fast=[1, 16], mid=[2, 3])
    method = avit(designed(h))
    with torch.no_grad():
        out = method(images(2))
    tmap = method.token_map(out)
    assert tmap.values.shape == (2, 16)
    expected = [1.0, 2.0, 2.0] + [4.0] * 12 + [1.0]
    assert tmap.values.tolist() == [expected, expected]
    assert (tmap.vmin, tmap.vmax) == (1.0, 4.0) and "depth" in tmap.label


@pytest.mark.parametrize(
    "options",
    [{"gamma": 0.0}, {"gamma": -1.0}, {"gamma": float("nan")}, {"eps": 0.0}, {"eps": 1.0}, {"eps": -0.1},
     {"target_depth": 0.5}, {"target_depth": 4.5}, {"prior_std": 0.0}, {"ponder_weight": -1.0}],
)
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        build_method("avit", make_model(CFG), **options)


def test_target_depth_default_and_model_checks():
    assert build_method("avit", make_model(CFG)).target_depth == pytest.approx(8 / 3)
    assert build_method("avit", make_model(CFG), target_depth=4).target_depth == 4.0
    with pytest.raises(ConfigError, match="class token"):
        build_method("avit", make_model(CFG.replace(class_token=False, global_pool="avg")))


def test_checkpoints(tmp_path):
    plain = save_method(Method(make_model(CFG)), tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no 'avit' parameters"):
        load_method(plain, "avit")
    method = avit(designed(token_scores(cls=0.4, fast=[2], mid=[3])), target_depth=3.0, gamma=GAMMA)
    method.halt_counts += torch.arange(4.0)
    path = save_method(method, tmp_path / "avit.safetensors")
    restored = load_method(path)
    assert isinstance(restored, AViT) and restored.target_depth == 3.0 and restored.halt_counts.tolist() == [0, 1, 2, 3]
    x = images(2)
    with torch.no_grad():
        assert torch.equal(restored(x).logits, method.eval()(x).logits)
        backbone = load_method(path, "baseline")(x).logits  # the fine-tuned backbone without halting
        assert torch.equal(backbone, avit(method.model, halting=False)(x).logits)


def test_trainer_loss_has_the_avit_terms(tmp_path, image_folder):
    recipe = get_recipe("smoke", method="avit", method_options={"ponder_weight": 0.1})
    trainer = Trainer(recipe, image_folder, tmp_path / "run", progress=False, workers=0)
    method = trainer.method.train()
    batch = torch.stack([trainer.train_set[i][0] for i in range(4)]), torch.tensor([trainer.train_set.targets[i] for i in range(4)])
    loss, parts = trainer.loss(*batch)
    loss.backward()
    assert set(parts) == {"ce", "ponder", "distr"} and all(math.isfinite(v) for v in parts.values())
    assert parts["ponder"] == pytest.approx(0.1 * float(method(batch[0]).record.aux["avit_ponder"].detach().mean()), rel=1e-5)
    assert method.halt_counts.sum() == 2 * 4 * 17  # two training forwards; every token halts once per image


def test_packing_changes_what_runs_not_the_result():
    """Padded batches run packed by default; pack=False pads only: same logits, more executed FLOPs."""
    model, opts = random_halting()
    x = images(8, seed=3)
    with torch.no_grad():
        packed, padded = avit(model, **opts)(x), avit(model, pack=False, **opts)(x)
    assert torch.allclose(packed.logits, padded.logits, atol=1e-5)
    assert torch.equal(macs_per_image(model.cfg, packed.record), macs_per_image(model.cfg, padded.record))
    assert executed_macs_per_image(model.cfg, packed.record) < executed_macs_per_image(model.cfg, padded.record)
    # pack=False pads in EVERY block, full batch and sub-batches alike: each block ran its padded width W
    # on the images still in the batch (a fraction f of it), so f*W through the per-token layers
    trace, _ = padded.record.aux["avit_trace"]
    fractions = [1.0 if active is None else len(active) / len(x) for active, _, _ in trace]
    widths = [pos.shape[1] for _, pos, _ in trace]
    assert padded.record.attn_width == padded.record.mlp_width == [f * w for f, w in zip(fractions, widths)]
    assert packed.record.mlp_width != padded.record.mlp_width
    packed_trace = packed.record.aux["avit_trace"][0]
    runs = [(active is None, mask is not None) for active, _, mask in packed_trace]
    assert (True, True) in runs and (False, True) in runs  # padded blocks on the full batch and on a sub-batch
