"""The one-line surface `vb.apply(model, method, **options)` equals the long form on timm and HF models."""
from __future__ import annotations

import pytest
import torch

import vitbudget as vb
from conftest import TINY, missing_anchor, requires_transformers
from vitbudget.models import VisionTransformer, ViTConfig
from vitbudget.models.timm_compat import import_timm, timm_available, timm_vit

CFG = ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=7)


def timm_model():
    if not timm_available():
        missing_anchor("timm is not installed (optional extra: pip install --no-deps timm==1.0.31 pyyaml huggingface_hub)")
    import_timm()
    torch.manual_seed(0)
    return timm_vit(CFG).eval()


@pytest.mark.parametrize("method, options", [("tome", {"r": 2}), ("evit", {"rho": 0.7, "stages": (1,)}), ("abs", {"alpha": 0.5}), ("baseline", {})])
@pytest.mark.slow
def test_timm_model_equals_the_long_form(method, options):
    model = timm_model()
    x = torch.randn(3, 3, 32, 32)
    applied = vb.apply(model, method, **options)
    long_form = vb.build_method(method, vb.from_timm(model), **options)
    with torch.no_grad():
        got, want = applied(x), long_form(x).logits
    assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    assert not applied.training and applied.record is not None and len(applied.record.attn_tokens) == CFG.depth
    if method == "baseline":
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=0, atol=1e-5)


def test_build_method_returns_eval_mode():
    """A method built from Python takes its inference path (here: EViT removes tokens instead of masking)."""
    method = vb.build_method("evit", VisionTransformer(TINY), rho=0.5, stages=(1,))
    assert not method.training and not any(m.training for m in method.modules())
    out = method(torch.randn(2, 3, 32, 32))
    assert out.state.x.shape[1] < 1 + (32 // 8) ** 2


def test_record_and_token_map_reachable():
    applied = vb.apply(VisionTransformer(TINY).eval(), "evit", rho=0.5, stages=(1,))
    with torch.no_grad():
        applied(torch.randn(2, 3, 32, 32))
    assert applied.token_map() is not None
    assert [int(t[0]) for t in applied.record.attn_tokens] == [17, 17, 9]


@requires_transformers
@pytest.mark.slow
def test_hugging_face_models_return_their_own_output_objects():
    from test_hf import CASES, build_hf

    for case, field in [("vit-classifier", "logits"), ("dinov2-features", "pooler_output")]:
        architecture, config, _ = CASES[case]
        hf = build_hf(architecture, config())
        x = torch.randn(2, 3, hf.config.image_size, hf.config.image_size)
        applied = vb.apply(hf, "tome", r=1)
        long_form = vb.build_method("tome", vb.from_hf(hf), r=1)
        with torch.no_grad():
            out = applied(pixel_values=x)
            want = long_form(x).logits
        assert type(out).__name__ == ("ImageClassifierOutput" if field == "logits" else "BaseModelOutputWithPooling")
        assert torch.equal(getattr(out, field), want)
        with torch.no_grad():
            base = vb.apply(hf, "baseline")(pixel_values=x)
            original = hf(pixel_values=x)
        torch.testing.assert_close(getattr(base, field), getattr(original, field), rtol=0, atol=1e-4)
