"""The ViT: timm parameter names, loading from every supported source, position-grid resampling."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REFERENCE_MODEL, TINY, make_model, requires_reference, requires_timm
from vitbudget import CheckpointError, ConfigError, InputError, OutputError, load_model, save_model
from vitbudget.models import NAMED_CONFIGS, VisionTransformer, ViTConfig
from vitbudget.models.pos_embed import resample_abs_pos_embed

TIMM_KEYS_BLOCK0 = {
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
}


def test_state_dict_uses_timm_names(tiny_model):
    keys = set(tiny_model.state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "head.weight"} <= keys
    assert TIMM_KEYS_BLOCK0 <= keys


def test_layerscale_qknorm_registers_have_timm_names():
    model = VisionTransformer(TINY.replace(init_values=1e-5, qk_norm=True, reg_tokens=2, global_pool="avg"))
    keys = set(model.state_dict())
    assert {"blocks.0.ls1.gamma", "blocks.0.ls2.gamma", "blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.bias", "reg_token", "fc_norm.weight"} <= keys
    assert "norm.weight" not in keys  # timm: fc_norm replaces norm for avg pooling
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


@requires_reference
@pytest.mark.slow
def test_reference_checkpoint_loads_strict():
    model = load_model(REFERENCE_MODEL)
    assert model.cfg.embed_dim == 192 and model.cfg.num_patches == 64
    assert model.info.preprocess.mean[0] == pytest.approx(0.4914, abs=1e-4)


def test_save_load_roundtrip(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "m.safetensors", note="hello")
    loaded = load_model(path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), tiny_model(x))
    assert json.loads((tmp_path / "m.json").read_text())["note"] == "hello"


@pytest.mark.slow
def test_named_timm_state_dict_file(tmp_path):
    cfg = NAMED_CONFIGS["deit_tiny_patch16_224"].replace(img_size=32, num_classes=10)
    model = make_model(cfg)
    torch.save({"model": model.state_dict()}, tmp_path / "deit.pth")  # DeiT's release wraps it in 'model'
    loaded = load_model(tmp_path / "deit.pth", arch="deit_tiny_patch16_224", img_size=32, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))


def test_bad_checkpoints(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "missing.safetensors", arch="deit_tiny_patch16_224")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "bad.safetensors", arch="deit_tiny_patch16_224")
    path = save_model(tiny_model, tmp_path / "ok.safetensors")
    meta = json.loads((tmp_path / "ok.json").read_text())
    meta["config"]["embed_dim"] = 64
    (tmp_path / "ok.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the architecture: the weights hold 3 blocks of width 32, the config 3 blocks of width 64; shape mismatch"):
        load_model(path)
    (tmp_path / "ok.json").write_text("{ broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(path)
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_model(path, arch="resnet50")


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.randn(2, 1, 32, 32), "expected 3 channels"),
        (torch.randn(2, 3, 48, 48), "expected 32x32 images"),
        (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
        (torch.randn(3, 32, 32), "image tensor"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "floating-point"),
    ],
)
def test_bad_inputs(tiny_model, images, message):
    with pytest.raises(InputError, match=message):
        tiny_model(images)


def test_set_input_size_resamples_position_grid(tiny_model):
    x = torch.randn(1, 3, 32, 32)
    tiny_model.set_input_size(48)
    assert tiny_model.pos_embed.shape == (1, 1 + 36, 32)
    assert tiny_model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    tiny_model.set_input_size(32)  # resampling to the same grid is the identity
    with pytest.raises(InputError, match="multiple of patch size"):
        tiny_model.set_input_size(50)
    assert tiny_model(x).shape == (1, 10)


def test_config_validation():
    with pytest.raises(ConfigError, match="unsupported ViT config keys"):
        ViTConfig.from_dict({"embed_dim": 192, "frobnicate": 1})
    with pytest.raises(ConfigError, match="divisible"):
        ViTConfig(embed_dim=100, num_heads=3)


def _edit_sidecar(path, edit):
    meta = json.loads(path.with_suffix(".json").read_text())
    edit(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["config"].update(num_heads=0), "num_heads must be an integer >= 1, got 0"),
    (lambda m: m["config"].update(patch_size=0), "patch_size must be an integer >= 1, got 0"),
    (lambda m: m["config"].update(img_size=-32), "img_size must be an integer >= 1, got -32"),
    (lambda m: m["config"].update(depth="3"), "depth must be an integer >= 1, got '3'"),
    (lambda m: m["config"].update(mlp_ratio=float("nan")), "mlp_ratio must be a positive number"),
    (lambda m: m["config"].update(qkv_bias="yes"), "qkv_bias must be true or false"),
    (lambda m: m.update(config=[32, 8]), "a ViT config must be a mapping"),
    (lambda m: m.update(preprocess={"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}), "mean must be 3 finite numbers"),
    (lambda m: m.update(preprocess={"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}), "std must be positive"),
    (lambda m: m.update(preprocess={"crop_pct": 0}), r"crop_pct must be in \(0, 1\], got 0"),
    (lambda m: m.update(preprocess={"interpolation": "lanczos"}), "interpolation must be one of bilinear, bicubic, nearest"),
    (lambda m: m.update(preprocess="imagenet"), "preprocess must be a mapping"),
    (lambda m: m.update(classes=["a", "b"]), "'classes' lists 2 names for 10 outputs"),
    (lambda m: m.update(classes=["a"] * 10), "names a class twice"),
    (lambda m: m.update(classes="airplane,automobile"), "'classes' must be a list of class names"),
])
def test_bad_sidecar_values_are_one_checkpoint_error(tmp_path, tiny_model, edit, message):
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    _edit_sidecar(path, edit)
    with pytest.raises(CheckpointError, match="checkpoint sidecar .*m.json'?: .*" + message):
        load_model(path)


def test_sidecar_that_is_a_directory(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    path.with_suffix(".json").unlink()
    path.with_suffix(".json").mkdir()
    with pytest.raises(CheckpointError, match="cannot read checkpoint sidecar .*m.json'"):
        load_model(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_time(tmp_path, tiny_model, value):
    with torch.no_grad():
        tiny_model.blocks[1].mlp.fc1.weight[3, 4] = value
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"non-finite values \(NaN or Inf\) in 1 tensor\(s\), e.g. blocks.1.mlp.fc1.weight"):
        load_model(path)
    torch.save(tiny_model.state_dict(), tmp_path / "m.pth")  # a plain timm state dict too
    with pytest.raises(CheckpointError, match="non-finite"):
        load_model(tmp_path / "m.pth", arch="vit_tiny_p4_cifar10", patch_size=8, embed_dim=32, depth=3, num_heads=2)


def test_model_and_sidecar_are_published_together_sidecar_first(tmp_path, tiny_model, monkeypatch):
    import os

    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moved.append(Path(b)), real_replace(a, b)))
    save_model(tiny_model, tmp_path / "m.safetensors")
    assert [p.name for p in moved if p.parent == tmp_path] == ["m.json", "m.safetensors"] and sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    import vitbudget.models.loading as loading

    monkeypatch.setattr(loading, "save_file", safetensors.torch.save_file)
    with pytest.raises(OutputError, match="No space left"):
        save_model(tiny_model, tmp_path / "new" / "n.safetensors")
    assert not (tmp_path / "new").exists()


def test_pos_embed_resampling_keeps_constants_and_prefix():
    pe = torch.cat([torch.randn(1, 1, 8), torch.full((1, 16, 8), 0.25)], dim=1)  # CLS + a constant 4x4 grid
    out = resample_abs_pos_embed(pe, (6, 6), num_prefix_tokens=1)
    assert out.shape == (1, 37, 8) and torch.equal(out[:, :1], pe[:, :1])
    assert torch.allclose(out[:, 1:], torch.full((1, 36, 8), 0.25), atol=1e-6)  # bicubic weights sum to one


@requires_timm
@pytest.mark.parametrize("new_grid, prefix", [((6, 6), 1), ((3, 3), 1), ((5, 5), 3)])
def test_pos_embed_resampling_equals_timms(new_grid, prefix):
    from test_timm_equivalence import _import_timm

    _import_timm()
    from timm.layers import resample_abs_pos_embed as timm_resample

    pe = torch.randn(1, prefix + 16, 24)
    ours = resample_abs_pos_embed(pe, new_grid, num_prefix_tokens=prefix)
    theirs = timm_resample(pe, new_size=list(new_grid), old_size=[4, 4], num_prefix_tokens=prefix)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_sidecars_from_before_new_config_fields_load_unchanged(tmp_path):
    """act_layer, dist_token and patch_bias came later: a sidecar without them is the model it always was
    (a pre-norm one kept its patch-embedding bias, which timm's rule would now drop)."""
    model = make_model(TINY.replace(pre_norm=True, patch_bias=True))
    path = save_model(model, tmp_path / "old.safetensors")
    meta = json.loads((tmp_path / "old.json").read_text())
    for key in ("act_layer", "dist_token", "patch_bias"):
        del meta["config"][key]
    (tmp_path / "old.json").write_text(json.dumps(meta))
    loaded = load_model(path)
    assert loaded.cfg.act_layer == "gelu" and not loaded.cfg.dist_token and loaded.cfg.use_patch_bias
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert "patch_embed.proj.bias" not in VisionTransformer(TINY.replace(pre_norm=True)).state_dict()  # timm's CLIP layout


@pytest.mark.parametrize("value, finite", [(0.5, True), (float("nan"), False), (float("inf"), False), (float("-inf"), False),
                                           (3e38, True)])  # 3e38 twice overflows the sum, yet every value is finite
def test_all_finite_is_exact_whatever_the_sum(value, finite):
    from vitbudget.models.vit import all_finite

    x = torch.zeros(1, 3, 8, 8)
    x[0, 0, 0, :2] = value
    assert all_finite(x) is finite
    both = torch.zeros(4)
    both[:2] = torch.tensor([float("inf"), float("-inf")])  # the sum is NaN, not inf
    assert not all_finite(both)
    half = torch.full((100_000,), 60000.0, dtype=torch.float16)  # the float16 sum overflows; the values are finite
    assert all_finite(half)
