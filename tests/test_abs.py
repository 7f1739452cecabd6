"""ABS and the global test-time baselines: no-op settings, token selection, batching, FLOPs, CLI."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, make_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitbudget import ConfigError, Hooks, run, save_model
from vitbudget.cli import main
from vitbudget.runtime.cost import block_macs, dense_macs, macs_per_image
from vitbudget.methods import ABSOptions, build_method

SCORES = ["entropy", "attnvar", "gradsim", "random"]
N, D, C = TINY.num_patches, TINY.embed_dim, TINY.num_classes  # 16 patches + CLS


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


class Capture(Hooks):
    """Keeps every block's output tokens and attention probabilities."""

    def __init__(self):
        self.x, self.probs = {}, {}

    def needs_probs(self, index):
        return True

    def after_block(self, index, state, info, record):
        self.x[index], self.probs[index] = state.x, info.probs
        return state


def forward(method, x):
    with torch.no_grad():
        return method(x)


def overhead(method, out):
    return macs_per_image(method.model.cfg, out.record) - dense_macs(method.base_cfg)


# -- no-op settings --
@pytest.mark.parametrize("score", SCORES)
def test_alpha_zero_is_the_baseline_exactly(model, images, score):
    out = forward(build_method("abs", model, alpha=0.0, score=score), images)
    assert torch.equal(out.logits, forward(build_method("baseline", model), images).logits)
    assert out.record.extra_macs is None and "abs_selected" not in out.record.aux
    assert forward(build_method("abs", model, alpha=0.02, score=score), images).record.extra_macs is None  # round(0.32) = 0


def test_baselines_at_their_no_op_settings(model, images):
    base = forward(build_method("baseline", model), images).logits
    assert torch.equal(forward(build_method("resolution", model, scale=1.0), images).logits, base)
    crops = forward(build_method("multicrop", model, crop_fraction=1.0), images).logits  # five identical views
    assert torch.allclose(crops, base.log_softmax(-1), atol=1e-6)
    # uniform depth has no no-op setting: its extra block always runs


@pytest.mark.parametrize("score", SCORES)
def test_refining_all_tokens_is_uniform_depth(model, images, score):
    abs_all = forward(build_method("abs", model, alpha=1.0, score=score), images)
    depth = forward(build_method("depth", model), images)
    assert torch.allclose(abs_all.logits, depth.logits, atol=1e-5)
    assert abs_all.record.aux["abs_selected"].tolist() == [list(range(N))] * len(images)
    assert torch.allclose(overhead(build_method("depth", model), depth), torch.full((4,), float(block_macs(N + 1, TINY)), dtype=torch.float64))


# -- selection --
def test_selected_tokens_are_the_top_k_of_each_scorer(model, images):
    capture = Capture()
    with torch.no_grad():
        run(model, images, capture)
    k = 5  # round(0.3 * 16)
    ent = build_method("abs", model, alpha=0.3, score="entropy", hidden=24, seed=3)
    h = torch.relu(capture.x[TINY.depth - 2][:, 1:] @ ent.head_w1.T + ent.head_b1)
    p = (h @ ent.head_w2.T + ent.head_b2).softmax(-1)
    expected = {
        "gradsim": capture.x[TINY.depth - 1][:, 1:].norm(dim=-1),
        "attnvar": capture.probs[TINY.depth - 1][:, :, 0, 1:].var(dim=1, unbiased=False),
        "entropy": -(p * p.log()).sum(-1),
    }
    for score, values in expected.items():
        method = ent if score == "entropy" else build_method("abs", model, alpha=0.3, score=score)
        selected = forward(method, images).record.aux["abs_selected"]
        assert selected.shape == (4, k)
        assert selected.tolist() == values.topk(k, dim=1).indices.sort(dim=1).values.tolist(), score
    assert len({tuple(s) for s in selected.tolist()}) > 1  # the selection depends on the image


def test_refinement_changes_only_the_selected_tokens_and_cls(model, images):
    method = build_method("abs", model, alpha=0.25, score="gradsim")
    outputs = {}
    method.model.norm.register_forward_hook(lambda m, i, o: outputs.__setitem__("pre_norm", i[0]))
    out = forward(method, images)
    changed = (outputs["pre_norm"] != out.state.x).any(dim=-1)  # (B, 1 + N)
    selected = torch.zeros(4, N, dtype=torch.bool).scatter(1, out.record.aux["abs_selected"], True)
    assert changed[:, 0].all() and torch.equal(changed[:, 1:], selected)


def test_random_scorer_draws_per_image_seeded_and_batch_independent(model, images):
    pick = lambda seed, x=images: forward(build_method("abs", model, score="random", seed=seed), x).record.aux["abs_selected"]
    a = pick(0)
    assert torch.equal(a, pick(0)) and not torch.equal(a, pick(1))
    assert len({tuple(row.tolist()) for row in a}) == 4  # each image its own draw (the paper's per-image Random)
    assert torch.equal(pick(0, images.flip(0)), a.flip(0))  # an image's draw does not depend on its batch position
    assert torch.equal(pick(0, torch.cat([images[2:3], images[2:3]])), a[2:3].expand(2, -1))  # nor on its batch-mates


def test_entropy_head_is_seeded_and_never_trained(model, images):
    a, b = (build_method("abs", model, score="entropy", seed=s) for s in (0, 1))
    assert {n for n, _ in a.named_buffers()} == {"head_w1", "head_b1", "head_w2", "head_b2"}
    assert a.head_w1.shape == (D, D) and not torch.equal(a.head_w1, b.head_w1)
    assert torch.equal(a.head_w1, build_method("abs", model, score="entropy", seed=0).head_w1)
    trainable = {n for n, p in a.named_parameters() if p.requires_grad and not n.startswith("model.")}
    assert trainable and all(n.startswith("block.") for n in trainable)  # only the extra block can be tuned


def test_token_map_outlines_the_refined_patches(model, images):
    method = build_method("abs", model, alpha=0.25, score="gradsim")
    out = forward(method, images)
    picture = method.token_map(out)
    assert picture.values.shape == picture.outline.shape == (4, N) and picture.outline.sum(1).tolist() == [4] * 4
    assert torch.equal(picture.outline.nonzero()[:, 1].reshape(4, 4), out.record.aux["abs_selected"])
    assert method.token_map(forward(build_method("abs", model, alpha=0.0), images)) is None


def test_method_checkpoint_keeps_a_tuned_block_not_the_seeded_head(tmp_path, model, images):
    from vitbudget.methods import load_method, save_method

    method = build_method("abs", model, alpha=0.25, score="entropy", seed=5)
    with torch.no_grad():
        method.block.mlp.fc2.bias.add_(0.5)  # as if tuned
    path = save_method(method, tmp_path / "abs.safetensors")
    restored = load_method(path)
    assert restored.options == method.options and torch.equal(forward(restored, images).logits, forward(method, images).logits)
    assert all(k.startswith(("model.", "block.")) for k in restored.state_dict())


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.slow
def test_batched_equals_one_by_one(model, images, score):
    method = build_method("abs", model, alpha=0.3, score=score)
    batched = forward(method, images)
    for i in range(len(images)):
        alone = forward(method, images[i : i + 1])
        assert torch.allclose(batched.logits[i], alone.logits[0], atol=1e-5)
        assert torch.equal(batched.record.aux["abs_selected"][i], alone.record.aux["abs_selected"][0])


def test_model_without_class_token_refines_patches_only(images):
    cfg = TINY.replace(global_pool="avg", class_token=False)
    plain = make_model(cfg)
    method = build_method("abs", plain, alpha=0.25, score="gradsim")
    out = forward(method, images)
    assert torch.allclose(overhead(method, out), torch.full((4,), N * D + float(block_macs(4, cfg)), dtype=torch.float64))
    assert not torch.allclose(out.logits, plain(images))
    assert torch.allclose(forward(build_method("abs", plain, alpha=1.0, score="entropy"), images).logits,
                          forward(build_method("depth", plain), images).logits, atol=1e-5)
    with pytest.raises(ConfigError, match="attnvar needs a class token"):
        build_method("abs", plain, score="attnvar")


def test_register_tokens_are_refined_with_cls(images):
    cfg = TINY.replace(reg_tokens=2)
    method = build_method("abs", make_model(cfg), alpha=0.25, score="attnvar")
    out = forward(method, images)
    assert out.record.aux["abs_selected"].max() < N
    assert torch.allclose(overhead(method, out), torch.full((4,), float(block_macs(4 + 3, cfg)), dtype=torch.float64))


# -- FLOPs --
@pytest.mark.parametrize("score, hidden", [("entropy", 0), ("entropy", 8), ("attnvar", 0), ("gradsim", 0), ("random", 0)])
def test_abs_overhead_is_scorer_plus_extra_block(model, images, score, hidden):
    method = build_method("abs", model, alpha=0.2, score=score, hidden=hidden)  # k = round(3.2) = 3
    scorer = {"entropy": N * (D * (hidden or D) + (hidden or D) * C), "gradsim": N * D}.get(score, 0)
    expected = scorer + float(block_macs(3 + 1, TINY))
    assert torch.allclose(overhead(method, forward(method, images)), torch.full((4,), float(expected), dtype=torch.float64))


def test_resolution_and_multicrop_flops(model, images):
    res = build_method("resolution", model, scale=1.5)
    assert res.model.cfg.grid_size == 6 and res.model.cfg.img_size == 48 and res.base_cfg == TINY
    assert model.cfg.img_size == 32  # the method resized a copy
    out = forward(res, images)
    assert out.record.attn_tokens[0].tolist() == [37] * 4
    assert macs_per_image(res.model.cfg, out.record).tolist() == [dense_macs(TINY.replace(img_size=48))] * 4
    crops = build_method("multicrop", model)
    out = forward(crops, images)
    assert out.logits.shape == (4, C) and out.record.batch_size == 4
    assert torch.allclose(out.logits.exp().sum(-1), torch.ones(4))
    assert torch.allclose(macs_per_image(TINY, out.record), torch.full((4,), 5 * dense_macs(TINY), dtype=torch.float64))


def counted(method, x):
    """torch's FlopCounterMode (a MAC counts 2) under the MATH SDPA backend, which it can see."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = method(x)
    return counter.get_total_flops(), float(macs_per_image(method.model.cfg, out.record).sum())


@pytest.mark.parametrize(
    "name, options, uncounted",
    [
        ("abs", {"score": "entropy", "alpha": 0.3}, 0),  # the entropy head's matmuls are counted
        ("abs", {"score": "attnvar", "alpha": 0.3}, 0),
        ("abs", {"score": "gradsim", "alpha": 0.3}, N * D),  # a norm is not a matmul to the counter
        ("depth", {}, 0),
        ("resolution", {"scale": 1.5}, 0),
        ("multicrop", {}, 0),
    ],
)
def test_flops_match_torch_counter(model, images, name, options, uncounted):
    flops, ours = counted(build_method(name, model, **options), images[:2])
    assert flops == pytest.approx(2 * (ours - 2 * uncounted), rel=1e-9)


# -- bad input --
@pytest.mark.parametrize(
    "options, message",
    [
        ({"alpha": -0.1}, r"--alpha must be in \[0, 1\]"),
        ({"alpha": 1.5}, r"--alpha must be in \[0, 1\]"),
        ({"alpha": float("nan")}, r"--alpha must be in \[0, 1\]"),
        ({"score": "bogus"}, "--score must be one of entropy, attnvar, gradsim, random"),
        ({"hidden": -1}, "--hidden must be >= 0"),
    ],
)
def test_bad_abs_options(model, options, message):
    with pytest.raises(ConfigError, match=message):
        ABSOptions(**options)
    with pytest.raises(ConfigError, match=message):
        build_method("abs", model, **options)


def test_bad_baseline_options(model):
    with pytest.raises(ConfigError, match=r"--alpha must be in \[0, 1\]"):
        build_method("abs", model, alpha=2.0)
    for fraction in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match=r"--crop-fraction must be in \(0, 1\]"):
            build_method("multicrop", model, crop_fraction=fraction)
    for scale in (0.0, -1.0):
        with pytest.raises(ConfigError, match="--scale must be a positive number"):
            build_method("resolution", model, scale=scale)
    with pytest.raises(ConfigError, match="do not apply to method 'depth'"):
        build_method("depth", model, alpha=0.2)


# -- command line --
@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = make_model()
    model.info.classes = [f"class{c:02d}" for c in range(10)]
    return save_model(model, tmp_path / "tiny.safetensors")


def eval_cli(capsys, tmp_path, checkpoint, data, *extra):
    argv = ["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet", "--no-speed", "--workers", "0", *extra]
    code = main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "abs", "--alpha", "-0.1"], r"--alpha must be in \[0, 1\]"),
        (["--method", "abs", "--alpha", "1.5"], r"--alpha must be in \[0, 1\]"),
        (["--method", "abs", "--score", "bogus"], "--score must be one of"),
        (["--method", "multicrop", "--crop-fraction", "0"], r"--crop-fraction must be in \(0, 1\]"),
        (["--method", "resolution", "--scale", "0"], "--scale must be a positive number"),
    ],
    ids=["alpha-negative", "alpha-above-one", "unknown-score", "crop-zero", "scale-zero"],
)
def test_cli_bad_options_one_clear_message(tmp_path, capsys, tiny_checkpoint, image_folder, extra, message):
    code, captured = eval_cli(capsys, tmp_path, tiny_checkpoint, image_folder, *extra)
    lines = captured.err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("vitbudget: error:"), captured.err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
def test_cli_evaluates_all_methods(tmp_path, capsys, tiny_checkpoint, image_folder):
    code, captured = eval_cli(capsys, tmp_path, tiny_checkpoint, image_folder, "--method", "abs", "--alpha", "0.25", "--score", "attnvar",
                              "--method", "depth", "--method", "multicrop", "--method", "resolution", "--scale", "1.5")
    assert code == 0, captured.err
    methods = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]
    assert list(methods) == ["baseline", "abs", "depth", "multicrop", "resolution"]
    assert methods["baseline"]["rel_flops"] == 1.0
    assert all(methods[m]["rel_flops"] > 1 for m in ("abs", "depth", "multicrop", "resolution"))
    assert methods["abs"]["alpha"] == 0.25 and methods["abs"]["score"] == "attnvar"
    assert methods["multicrop"]["rel_flops"] == pytest.approx(5.0)
    assert methods["resolution"]["rel_flops"] == pytest.approx(dense_macs(TINY.replace(img_size=48)) / dense_macs(TINY))
    assert "| abs |" in captured.out and "| resolution |" in captured.out


@pytest.mark.parametrize("alpha, k", [(0.15625, 3), (0.03125, 1), (0.40625, 7)])  # alpha * 16 = 2.5, 0.5, 6.5
def test_alpha_times_n_rounds_half_up(alpha, k):
    """k = floor(alpha * N + 0.5): 2.5 -> 3, 0.5 -> 1, 6.5 -> 7 (Python's round() would give 2, 0, 6)."""
    from vitbudget.methods import build_method

    model = make_model()
    method = build_method("abs", model, alpha=alpha, score="gradsim").eval()
    with torch.no_grad():
        out = method(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert method.k == k and out.record.aux["abs_selected"].shape == (2, k)
