"""Logits equal timm's own VisionTransformer forward for the same weights.

timm needs torchvision, and the registry's torchvision is a CUDA build that does not import on
CPU torch. timm's ViT itself never calls torchvision, so where the real torchvision is missing
`models.timm_compat.import_timm` installs an empty stand-in module before importing timm.
If timm itself is not installed (it is an optional extra), the test skips and says so; under
VITBUDGET_REQUIRE_ANCHORS=1 (CI) it fails instead.
"""
from __future__ import annotations

import pytest
import torch

from conftest import REFERENCE_MODEL, make_model, missing_anchor, requires_reference
from vitbudget import ConfigError, from_timm, load_model, run
from vitbudget.models import NAMED_CONFIGS, VisionTransformer, ViTConfig
from vitbudget.models.timm_compat import import_timm, timm_available, timm_vit


def _import_timm():
    if not timm_available():  # skips, or fails under VITBUDGET_REQUIRE_ANCHORS=1 (CI)
        missing_anchor("timm is not installed (optional extra: pip install --no-deps timm==1.0.31 pyyaml huggingface_hub)")
    return import_timm()


def _timm_vit(timm, cfg: ViTConfig):
    """timm's own class for `cfg`."""
    return timm_vit(cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7),
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, init_values=0.1, qk_norm=True),
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, global_pool="avg", reg_tokens=2),
        # the families of issue 13: DeiT III, DINOv2 (patch 14, LayerScale, registers), CLIP (pre-norm, QuickGELU), distilled DeiT
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, init_values=1e-6, no_embed_class=True),
        ViTConfig(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=3, num_classes=0, init_values=1e-5),
        ViTConfig(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=3, num_classes=0, init_values=1e-5, reg_tokens=4,
                  no_embed_class=True),
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, pre_norm=True, norm_eps=1e-5,
                  act_layer="quick_gelu"),
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, pre_norm=True, norm_eps=1e-5),
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, dist_token=True),
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0, dist_token=True),
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, class_token=False, global_pool="avg"),
    ],
    ids=["plain", "layerscale-qknorm", "avgpool-registers", "deit3", "dinov2", "dinov2-registers", "clip-quickgelu", "clip-gelu",
         "distilled", "distilled-features", "avgpool-no-class-token"],
)
def test_logits_equal_timm(cfg):
    timm = _import_timm()
    theirs = _timm_vit(timm, cfg)
    with torch.no_grad():  # perturb every parameter so LayerScale, norms and biases all matter
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = make_model(cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(4, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        expected = theirs(x)
        assert torch.allclose(ours(x), expected, atol=1e-5, rtol=1e-5)
        assert torch.allclose(run(ours, x).logits, expected, atol=1e-5, rtol=1e-5)
        converted = from_timm(theirs)
        assert converted.cfg.replace(init_values=cfg.init_values) == cfg  # init value is read off trained gamma
        assert torch.allclose(converted(x), expected, atol=1e-5, rtol=1e-5)


@requires_reference
@pytest.mark.slow
def test_reference_checkpoint_matches_timm():
    timm = _import_timm()
    ours = load_model(REFERENCE_MODEL)
    theirs = _timm_vit(timm, ours.cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMED_CONFIGS if n != "vit_tiny_p4_cifar10"])
def test_named_configs_are_timms_architectures(name):
    """Each named state-dict shape is what `timm.create_model(name)` builds (at a small width, to stay fast):
    the same config read back, and the same state-dict names and shapes."""
    timm = _import_timm()
    small = dict(depth=1, embed_dim=48, num_heads=3)
    theirs = timm.create_model(name, pretrained=False, **small)
    expected = NAMED_CONFIGS[name].replace(**small)
    got = from_timm(theirs)
    assert got.cfg.replace(init_values=expected.init_values) == expected
    if expected.init_values is not None:
        assert got.cfg.init_values == pytest.approx(expected.init_values)
    ours = {k: v.shape for k, v in VisionTransformer(expected).state_dict().items()}
    assert ours == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(global_pool="map"), "attention pooling"),
        (dict(proj_bias=False), "proj_bias=False"),
        (dict(final_norm=False), "final_norm=False"),
        (dict(scale_mlp_norm=True), "scale_attn_norm / scale_mlp_norm"),
        (dict(act_layer="relu"), "activation ReLU is not supported"),
        (dict(img_size=(32, 48)), "only square inputs"),
    ],
)
def test_what_timm_has_and_we_do_not_is_a_clear_error(kwargs, message):
    timm = _import_timm()
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    theirs = TimmViT(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=7), **kwargs})
    with pytest.raises(ConfigError, match=message):
        from_timm(theirs)
