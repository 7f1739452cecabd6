"""Shared fixtures: a tiny ViT and a tiny on-disk ImageFolder, so most tests need no shared data."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitbudget.models import ViTConfig, VisionTransformer

SHARED = Path(os.environ.get("VITBUDGET_SHARED", Path(__file__).resolve().parents[1] / "../shared")).resolve()
REFERENCE_MODEL = SHARED / "models/vit_tiny_p4_cifar10.safetensors"
CIFAR_ARCHIVE = SHARED / "data/cifar10-jpeg.tar.gz"

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)

requires_reference = pytest.mark.skipif(not REFERENCE_MODEL.is_file(), reason=f"reference model not found at {REFERENCE_MODEL}")
requires_cifar = pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason=f"CIFAR-10 archive not found at {CIFAR_ARCHIVE}")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Archives unpack into a per-session cache, never the user's; the CIFAR cache is shared across tests."""
    monkeypatch.setenv("VITBUDGET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def make_model(cfg: ViTConfig = TINY, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so bugs in them show up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def tiny_model() -> VisionTransformer:
    return make_model()


def write_image_folder(root: Path, splits=("train", "test"), classes=10, per_class=4, size=32, seed=0) -> Path:
    """root/<split>/<class>/<i>.png with class-dependent colours (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c in range(classes):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.array([(c * 25) % 256, (c * 70) % 256, (255 - c * 25) % 256], dtype=np.float32)
                pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("data") / "toy")
