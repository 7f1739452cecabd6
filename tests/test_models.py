"""The ViT: timm parameter names, loading from every supported source, position-grid resampling."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import REFERENCE_MODEL, TINY, make_model, requires_reference
from vitbudget import CheckpointError, ConfigError, InputError, load_model, save_model
from vitbudget.models import NAMED_CONFIGS, VisionTransformer, ViTConfig

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
    with pytest.raises(CheckpointError, match="does not match the architecture: shape mismatch"):
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
