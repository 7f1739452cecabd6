"""Mixed precision (bf16 autocast) in evaluation and training, on the CPU; fp16 is refused there.

The CUDA module (tests/test_cuda.py) checks fp16 / bf16 against float32 on a GPU; these tests
pin that the dtype really reaches the matrix products on any machine.
"""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from vitbudget import ConfigError, load_model
from vitbudget.eval.evaluate import predict
from vitbudget.methods import build_method
from vitbudget.train import Trainer, get_recipe

SMOKE = dict(train_limit=None, eval_limit=None, final_eval_limit=None, epochs=1, batch_size=8, save_every_steps=100)


def linear_output_dtypes(model) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    return seen


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 12, size: int = 32):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 10

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("name, options", [("baseline", {}), ("evit", {"rho": 0.7, "stages": "1"}), ("tome", {"r": 2})])
@pytest.mark.slow
def test_bf16_evaluation_runs_the_products_in_bf16_and_stays_close(name, options):
    model = make_model()
    data, indices = Images(), list(range(12))
    full = predict(build_method(name, model, **options), data, indices, batch_size=4, workers=0, progress=False)
    seen = linear_output_dtypes(model)
    half = predict(build_method(name, model, **options), data, indices, batch_size=4, workers=0, progress=False, dtype="bf16")
    assert seen and set(seen) == {torch.bfloat16}
    assert half.logits.dtype == torch.float32
    assert not torch.equal(half.logits, full.logits)
    assert torch.allclose(half.logits, full.logits, atol=0.1, rtol=0.05)


def test_fp16_is_refused_on_the_cpu(tmp_path, image_folder):
    with pytest.raises(ConfigError, match="fp16 autocast is for GPUs"):
        predict(build_method("baseline", make_model()), Images(), [0, 1], workers=0, progress=False, dtype="fp16")
    with pytest.raises(ConfigError, match="fp16 autocast is for GPUs"):
        Trainer(get_recipe("smoke", **SMOKE, dtype="fp16"), image_folder, tmp_path / "run", workers=0, progress=False)
    with pytest.raises(ConfigError, match="unknown dtype"):
        get_recipe("smoke", dtype="fp8")


@pytest.mark.slow
def test_bf16_training_runs_in_bf16_and_learns_other_weights(tmp_path, image_folder):
    full = Trainer(get_recipe("smoke", **SMOKE), image_folder, tmp_path / "fp32", workers=0, progress=False).fit()
    trainer = Trainer(get_recipe("smoke", **SMOKE, dtype="bf16"), image_folder, tmp_path / "bf16", workers=0, progress=False)
    seen = linear_output_dtypes(trainer.model)
    half = trainer.fit()
    assert torch.bfloat16 in seen
    a, b = load_model(full.model_path).state_dict(), load_model(half.model_path).state_dict()
    assert all(v.dtype == torch.float32 for v in b.values())  # master weights stay float32
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in b.values())
    assert abs(half.log[-1]["train_loss"] - full.log[-1]["train_loss"]) < 0.2


def test_cli_dtype_flags(tmp_path, capsys):
    from vitbudget.cli import main

    assert main(["eval", "--dtype", "fp16", "--no-speed", "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vitbudget: error: fp16 autocast is for GPUs") and err.count("\n") == 1
    assert not (tmp_path / "e").exists()  # refused before any work
    with pytest.raises(SystemExit) as exc:
        main(["train", "--recipe", "smoke", "--dtype", "fp8", "--out", str(tmp_path / "t")])
    assert exc.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err


def test_tome_score_fp32_matches_float32_merges_under_bf16():
    """In bf16 the cosine similarities of near-equal tokens round to ties and ToMe merges other tokens than
    in float32 (as the reference under AMP); with score_fp32 the bf16 run picks float32's merges here.
    A one-block model isolates the matching: its input keys differ from float32's only by bf16 rounding."""
    from vitbudget import run
    from vitbudget.devices import autocast
    from vitbudget.models import ViTConfig

    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    model = make_model(cfg, seed=2)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fp32 = run(model, x, build_method("tome", model, r=8)).state.patch_ids
        with autocast("cpu", "bf16"):
            default = run(model, x, build_method("tome", model, r=8)).state.patch_ids
            scored = run(model, x, build_method("tome", model, r=8, score_fp32=True)).state.patch_ids
    assert not torch.equal(default, fp32)  # the reference's bf16 matching differs (2 of 8 images)
    assert torch.equal(scored, fp32)


@pytest.mark.parametrize("policy", [False, True], ids=["softmax", "policy-softmax"])
def test_attention_probabilities_stay_float32_under_bf16_autocast(policy):
    """The explicit-probabilities path (EViT, SPOT, ABS attnvar read info.probs; DynamicViT's masked
    softmax) normalises in float32: bf16 probabilities would sum to 1 only within ~1e-2."""
    from vitbudget.runtime.attention import multihead_attention

    model = make_model()
    torch.manual_seed(0)
    x = 3 * torch.randn(2, model.cfg.num_patches + 1, model.cfg.embed_dim)
    keep = (torch.rand(2, x.shape[1]) > 0.3).float() if policy else None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, info = multihead_attention(model.blocks[0].attn, x, need_probs=True, policy=keep)
    assert out.dtype == torch.bfloat16 and info.probs.dtype == torch.float32
    torch.testing.assert_close(info.probs.sum(-1), torch.ones(info.probs.shape[:-1]), rtol=0, atol=2e-6)
