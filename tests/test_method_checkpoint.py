"""Method checkpoints: backbone under timm names, the method's own tensors under `method.`."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from conftest import make_model
from vitbudget import CheckpointError, load_model
from vitbudget.methods import METHODS, Method, load_method, register, save_method


@dataclass(frozen=True)
class ScaleOptions:
    factor: float = 1.0


class LogitScale(Method):
    """A toy trained method: one learned scalar on the logits."""

    name = "toy_scale"

    def __init__(self, model, options):
        super().__init__(model, options)
        self.scale = nn.Parameter(torch.tensor(options.factor))

    def finish(self, model, state, record):
        return super().finish(model, state, record) * self.scale


@pytest.fixture
def toy_method():
    register("toy_scale", LogitScale, ScaleOptions, "test only")
    yield
    del METHODS["toy_scale"]


def test_roundtrip_restores_method_parameters(tmp_path, toy_method):
    method = LogitScale(make_model(), ScaleOptions(factor=2.0))
    with torch.no_grad():
        method.scale.fill_(3.0)
    path = save_method(method, tmp_path / "m.safetensors")
    restored = load_method(path)
    assert isinstance(restored, LogitScale) and float(restored.scale.detach()) == 3.0 and restored.options.factor == 2.0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(x).logits, method(x).logits)
    assert set(load_model(path).state_dict()) == set(make_model().state_dict())  # still a plain ViT too


def test_trained_method_needs_its_checkpoint(tmp_path, toy_method):
    path = save_method(Method(make_model()), tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="holds a 'baseline' checkpoint with no 'toy_scale' parameters"):
        load_method(path, "toy_scale")
    assert load_method(path, "baseline").name == "baseline"
