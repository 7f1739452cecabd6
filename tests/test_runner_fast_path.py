"""The runner's fast path (a plain block runs as `block(x)`) computes and records exactly what the general path does."""
from __future__ import annotations

import pytest
import torch

from vitbudget.methods import build_method
from vitbudget.runtime import Hooks, runner

from conftest import TINY, make_model


def run_both(model, images, hooks=None, monkeypatch=None, seed=0):
    """(fast, general) outputs of the same run; the general one with the fast path switched off."""
    torch.manual_seed(seed)
    fast = runner.run(model, images, hooks)
    with monkeypatch.context() as m:
        m.setattr(runner, "_plain", lambda *a: False)
        torch.manual_seed(seed)
        general = runner.run(model, images, hooks)
    return fast, general


def same_record(a, b):
    for field in ("attn_tokens", "mlp_tokens"):
        assert len(getattr(a, field)) == len(getattr(b, field))
        for x, y in zip(getattr(a, field), getattr(b, field)):
            assert torch.equal(x, y)
    assert (a.attn_width, a.core_width, a.mlp_width) == (b.attn_width, b.core_width, b.mlp_width)


def test_fast_path_is_taken_for_the_baseline_and_equals_the_general_path(monkeypatch):
    model = make_model()
    images = torch.randn(3, 3, 32, 32)
    calls = []
    real_plain = runner._plain
    monkeypatch.setattr(runner, "_plain", lambda *a: calls.append(real_plain(*a)) or calls[-1])
    with torch.inference_mode():
        fast = build_method("baseline", model)(images)
    assert calls == [True] * TINY.depth  # every block of the baseline runs as block(x)
    monkeypatch.undo()
    with torch.inference_mode():
        fast, general = run_both(model, images, build_method("baseline", model), monkeypatch)
        assert torch.equal(fast.logits, general.logits) and torch.equal(fast.logits, model(images))
    same_record(fast.record, general.record)


def test_fast_path_equals_the_general_path_in_training_with_stochastic_depth(monkeypatch):
    model = make_model(TINY.replace(drop_path_rate=0.3, init_values=0.5)).train()
    images = torch.randn(4, 3, 32, 32)
    fast, general = run_both(model, images, None, monkeypatch, seed=3)
    assert torch.equal(fast.logits, general.logits)
    fast.logits.sum().backward()  # gradients flow through the fast path


class _ActsAfterAttention(Hooks):
    def after_attention(self, index, state, info, record):
        return state.replace(x=state.x * 1.0)


def test_hooks_that_act_in_blocks_and_padded_states_take_the_general_path():
    model = make_model()
    state = runner.TokenState.initial(torch.randn(2, 17, TINY.embed_dim), 1)
    block = model.blocks[0]
    assert runner._plain(block, state, Hooks())
    assert not runner._plain(block, state, _ActsAfterAttention())
    for method, options in [("tome", {}), ("evit", {"stages": (1,)}), ("abs", {}), ("spot_heuristic", {"stages": (1,)}), ("mctf", {})]:
        assert not runner._plain(block, state, build_method(method, model, **options))
    assert not runner._plain(block, state.replace(key_mask=torch.ones(2, 17, dtype=torch.bool)), Hooks())
    assert not runner._plain(block, state.replace(size=torch.ones(2, 17)), Hooks())
    assert not runner._plain(torch.nn.Identity(), state, Hooks())  # a block whose forward is not the runner's sequence
