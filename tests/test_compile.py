"""torch.compile: every fixed-count method compiles into one graph (no break on the hot path), and
compiled logits equal eager ones; the NaN / inf input check stays, eagerly, outside the graph."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from vitbudget import InputError
from vitbudget.methods import build_method
from vitbudget.methods.compiled import CompiledMethod, compile_method, compile_support
from vitbudget.models import ViTConfig

pytestmark = pytest.mark.slow  # torch.compile: the whole module is outside the fast loop

CFG = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
FIXED = [("baseline", {}), ("evit", {"rho": 0.7, "stages": "1,2"}), ("evit", {"rho": 0.7, "stages": "1", "fuse": True}),
         ("tome", {"r": 3}), ("spot_heuristic", {"rho": 0.7, "stages": "1,2"}), ("dynamicvit", {"rho": 0.7, "stages": "1,2"}),
         ("spot", {"rho": 0.7, "stages": "1,2"}), ("abs", {"alpha": 0.3}), ("avit", {"dense": True})]


@pytest.mark.parametrize("name,options", FIXED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FIXED)])
def test_fullgraph_compile_equals_eager(name, options):
    """fullgraph=True raises at the first graph break; the 'eager' backend keeps this fast (dynamo capture only)."""
    method = build_method(name, make_model(CFG), **options).eval()
    torch._dynamo.reset()
    compiled = CompiledMethod(method, fullgraph=True, backend="eager")
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        eager, out = method(images), compiled(images)
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-5)
    assert [t.tolist() for t in out.record.attn_tokens] == [t.tolist() for t in eager.record.attn_tokens]


def test_no_graph_break_from_the_input_check():
    """explain() counts graph breaks: none for the whole method, although embed() calls check_input."""
    method = build_method("tome", make_model(CFG), r=3).eval()
    torch._dynamo.reset()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(method)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.slow
def test_inductor_logits_equal_eager():
    """The real compiler (inductor) on two methods: logits equal eager within float tolerance (~45 s on 2 busy cores)."""
    from torch._inductor import config

    model = make_model(CFG)
    for name, options in (("baseline", {}), ("tome", {"r": 3})):
        method = build_method(name, model, **options).eval()
        torch._dynamo.reset()
        images = torch.randn(2, 3, 32, 32)
        with torch.inference_mode(), config.patch(compile_threads=1):  # no worker pool to start on 2 cores
            torch.testing.assert_close(compile_method(method)(images).logits, method(images).logits, rtol=1e-4, atol=1e-4)


def test_bad_input_still_fails_clearly():
    method = build_method("evit", make_model(CFG), rho=0.7, stages="1").eval()
    compiled = CompiledMethod(method, backend="eager")
    bad = torch.randn(1, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN or infinite"):
        compiled(bad)
    with pytest.raises(InputError, match="expected 32x32"):
        compiled(torch.randn(1, 3, 16, 16))


def test_data_dependent_method_is_named():
    avit = build_method("avit", make_model(CFG)).eval()
    assert "depends on the pixels" in compile_support(avit)
    with pytest.raises(Exception, match="cannot compile without graph breaks"):
        CompiledMethod(avit, fullgraph=True)
    assert not CompiledMethod(avit, backend="eager").fullgraph  # compiled with breaks allowed
    assert compile_support(build_method("avit", make_model(CFG), dense=True)) is None
