"""Every method on CUDA against the CPU; bf16 / fp16 autocast; packed variable-length attention
against padded attention for A-ViT. Skips, saying why, where no GPU is visible (this is not an
anchor: CI machines have no GPU)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from vitbudget.devices import autocast
from vitbudget.methods import build_method
from vitbudget.methods.avit import AViTOptions, HaltingReplay, draw_halting_depths
from vitbudget.models import ViTConfig
from vitbudget.runtime.attention import use_varlen

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason=f"no CUDA GPU visible (torch {torch.__version__})")

CFG = ViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=6, num_heads=4, num_classes=10)  # 64 patches
METHODS = [("baseline", {}), ("evit", {"rho": 0.7, "stages": "1,3"}), ("evit", {"rho": 0.7, "stages": "2", "fuse": True}),
           ("tome", {"r": 6}), ("spot_heuristic", {"rho": 0.7, "stages": "1,3"}), ("dynamicvit", {"rho": 0.7, "stages": "1,3"}),
           ("spot", {"rho": 0.7, "stages": "1,3"}), ("abs", {"alpha": 0.2}), ("avit", {"gamma": 5.0, "beta": -2.0}),
           ("avit", {"dense": True}), ("multicrop", {}), ("resolution", {"scale": 1.5}), ("depth", {})]


@pytest.mark.parametrize("name,options", METHODS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(METHODS)])
def test_cuda_equals_cpu(name, options):
    method = build_method(name, make_model(CFG), **options).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        cpu = method(images)
        gpu = method.to("cuda")(images.cuda())
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-3, atol=1e-3)
    assert [t.cpu().tolist() for t in gpu.record.attn_tokens] == [t.tolist() for t in cpu.record.attn_tokens]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,options", METHODS[:8], ids=[f"{n}-{i}" for i, (n, _) in enumerate(METHODS[:8])])
def test_autocast_close_to_fp32(name, options, dtype):
    """Reduced precision: finite logits, close to float32 (a half-precision tolerance), masked softmax included."""
    method = build_method(name, make_model(CFG), **options).cuda().eval()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.inference_mode():
        ref = method(images).logits
        with autocast("cuda", dtype):
            low = method(images).logits
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)


def test_training_policy_softmax_under_fp16_stays_finite():
    """DynamicViT's masked softmax (eps 1e-6 / N) in training under fp16 autocast: probabilities in float32, loss finite."""
    method = build_method("dynamicvit", make_model(CFG), rho=0.5, stages="1,3").cuda().train()
    images = torch.randn(4, 3, 32, 32, device="cuda")
    with autocast("cuda", torch.float16):
        out = method(images)
        loss = out.logits.float().logsumexp(1).mean() + sum(method.extra_losses(out, torch.zeros(4, dtype=torch.long, device="cuda"), None).values())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_attention_equals_padded(dtype):
    """A-ViT's packed batches: the variable-length flash kernel against padded SDPA, same halting profile."""
    model = make_model(CFG).cuda()
    n = CFG.num_patches + 1
    depths = draw_halting_depths(8, n, CFG.depth, mean=3.0, std=2.0, seed=0)
    method = HaltingReplay(model, AViTOptions(), depths).eval()
    images = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.inference_mode(), autocast("cuda", dtype):
        with use_varlen(False):
            padded = method(images)
        with use_varlen(True):
            packed = method(images)
    torch.testing.assert_close(packed.logits.float(), padded.logits.float(), rtol=2e-2, atol=2e-2)
    assert [t.tolist() for t in packed.record.attn_tokens] == [t.tolist() for t in padded.record.attn_tokens]
