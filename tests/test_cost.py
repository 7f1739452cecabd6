"""Analytic FLOPs from executed tokens, cross-checked against torch's FlopCounterMode."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import make_model
from test_runtime import DropPerImage
from vitbudget import Hooks, run
from vitbudget.runtime.cost import dense_macs, executed_macs_per_image, macs_per_image
from vitbudget.models import NAMED_CONFIGS, ViTConfig


def counted_flops(model, x, hooks=None):
    """FlopCounterMode under the MATH SDPA backend (the fused CPU kernel is not counted)."""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = run(model, x, hooks)
    return counter.get_total_flops(), out


@pytest.mark.parametrize(
    "cfg",
    [
        ViTConfig(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10),
        ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=7, mlp_ratio=2.0, reg_tokens=1),
        # heads of the model families: two (distilled DeiT), one on [CLS, mean] (HF DINOv2's classifier), none (a backbone)
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, dist_token=True),
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7, global_pool="token_avg"),
        ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0),
    ],
)
def test_dense_flops_match_counter(cfg):
    model = make_model(cfg)
    x = torch.randn(3, 3, 32, 32)
    counted, out = counted_flops(model, x)
    ours = macs_per_image(cfg, out.record)
    assert torch.allclose(ours, torch.full((3,), dense_macs(cfg), dtype=torch.float64))
    assert counted == pytest.approx(2 * float(ours.sum()), rel=1e-9)  # the counter counts a MAC as 2 FLOPs


def test_removed_tokens_lower_flops_as_counted():
    cfg = ViTConfig(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3, num_classes=10)
    model = make_model(cfg)
    x = torch.randn(2, 3, 32, 32)
    keep = torch.zeros(2, 65, dtype=torch.bool)
    keep[:, :30] = True  # same count per image: no padding, so counted == analytic
    counted, out = counted_flops(model, x, DropPerImage(1, keep, "remove"))
    ours = macs_per_image(cfg, out.record)
    assert counted == pytest.approx(2 * float(ours.sum()), rel=1e-9)
    assert float(ours[0]) < dense_macs(cfg)
    assert executed_macs_per_image(cfg, out.record) == pytest.approx(float(ours[0]))


@pytest.mark.parametrize("packed", [True, False])
def test_padding_is_reported_separately_and_executed_flops_are_what_ran(monkeypatch, packed):
    """Real FLOPs count each image's own tokens; executed FLOPs what the hardware ran, as FlopCounterMode sees it:
    packed, the projections and MLP run on real tokens and only the attention product on the padded width."""
    import vitbudget.runtime.runner as runner

    if not packed:
        monkeypatch.setattr(runner, "PACK_MIN_PADDING", 1.1)
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    model = make_model(cfg)
    keep = torch.ones(2, 17, dtype=torch.bool)
    keep[1, 5:] = False
    counted, out = counted_flops(model, torch.randn(2, 3, 32, 32), DropPerImage(1, keep, "remove"))
    per_image = macs_per_image(cfg, out.record)
    executed = executed_macs_per_image(cfg, out.record)
    assert per_image[1] < per_image[0]
    assert counted == pytest.approx(2 * 2 * executed, rel=1e-9)  # the counter counts a MAC as 2 FLOPs, over 2 images
    if packed:
        assert float(per_image.mean()) < executed < float(per_image[0])
    else:
        assert executed == pytest.approx(float(per_image[0]))  # both ran 17 wide


def test_method_overhead_is_added():
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)

    class Scorer(Hooks):
        def begin(self, model, state, record):
            record.add_macs(1234.0)
            return state

    out = run(make_model(cfg), torch.randn(2, 3, 32, 32), Scorer())
    assert macs_per_image(cfg, out.record).tolist() == [dense_macs(cfg) + 1234.0] * 2


def test_deit_tiny_is_the_familiar_1_26_gflops():
    assert dense_macs(NAMED_CONFIGS["deit_tiny_patch16_224"]) / 1e9 == pytest.approx(1.26, abs=0.01)


@pytest.mark.slow
def test_reference_config_is_0_3651_gflops_under_the_counter():
    """The shared reference's shape (random weights suffice): 0.3651 GFLOPs per image, analytic and counted."""
    cfg = NAMED_CONFIGS["vit_tiny_p4_cifar10"]
    counted, out = counted_flops(make_model(cfg), torch.randn(2, 3, 32, 32))
    assert counted / 2 / 2 / 1e9 == pytest.approx(0.365107584, abs=1e-12)  # a MAC is 2 FLOPs; 2 images
    assert dense_macs(cfg) == 365_107_584 and macs_per_image(cfg, out.record).tolist() == [365_107_584.0] * 2
