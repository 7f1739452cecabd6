"""`vitbudget train --task segmentation`: a linear probe on a frozen ViT's patch grid, on synthetic shapes (ADE20K layout)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import make_model
from dense_fixtures import one_error_line
from vitbudget.cli import main
from vitbudget.data.segmentation import SegmentationFolder
from vitbudget.models import ViTConfig, load_model, save_model
from vitbudget.models.heads import LinearSegHead

BACKBONE = ViTConfig(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
COLOURS = {0: (90, 90, 90), 1: (220, 40, 40), 2: (40, 200, 60)}  # background, rectangle, disc


def write_shapes(root, splits=(("training", 24), ("validation", 8)), size=(40, 48), seed=0):
    """images/<split>/i.png and annotations/<split>/i.png: a red rectangle (1) and a green disc (2) on grey (0),
    noise on every pixel; the first image of each split has a 2-pixel ignore (255) border in its mask."""
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in splits:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((h, w), np.uint8)
            top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
            mask[top:top + h // 3, left:left + w // 3] = 1
            cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), h // 6
            yy, xx = np.mgrid[:h, :w]
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 2
            pixels = np.array([COLOURS[int(c)] for c in mask.ravel()], np.float64).reshape(h, w, 3)
            pixels = np.clip(pixels + rng.normal(0, 15, pixels.shape), 0, 255).astype(np.uint8)
            if i == 0:
                mask[:2], mask[-2:] = 255, 255
            Image.fromarray(pixels).save(root / "images" / split / f"{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / "annotations" / split / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("seg") / "shapes")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return save_model(make_model(BACKBONE), tmp_path_factory.mktemp("backbone") / "tiny.safetensors")


def independent_miou(head, model, dataset) -> float:
    """Per-class IoU by counting pixels directly (no confusion matrix), mean over classes present."""
    with torch.no_grad():
        from vitbudget.runtime.runner import run

        preds, targets = [], []
        for i in range(len(dataset)):
            image, mask = dataset[i]
            preds.append(head(run(model, image[None]).patch_grid(), tuple(mask.shape)).argmax(1)[0])
            targets.append(mask)
    p, t = torch.stack(preds), torch.stack(targets)
    valid = t != 255
    ious = []
    for c in range(head.num_classes):
        inter = ((p == c) & (t == c) & valid).sum().item()
        union = (((p == c) | (t == c)) & valid).sum().item()
        if union:
            ious.append(inter / union)
    return sum(ious) / len(ious)


@pytest.mark.slow
def test_train_segmentation_probe(tmp_path, shapes, backbone, capsys):
    out = tmp_path / "out"
    code = main(["train", "--task", "segmentation", "--data", str(shapes), "--init", str(backbone), "--method", "tome", "--r", "0",
                 "--epochs", "40", "--lr", "0.01", "--batch-size", "8", "--workers", "0", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    base = report["methods"]["baseline"]
    assert report["data"] == {"path": str(shapes), "training": 24, "validation": 8, "num_classes": 3}
    assert report["head"]["loss_per_epoch"][-1] < 0.5 * report["head"]["loss_per_epoch"][0]
    assert base["miou"] > 0.6  # chance (one class everywhere) is about 0.24
    assert report["methods"]["tome"]["miou"] == base["miou"]  # r=0 merges nothing
    head = LinearSegHead(32, 3)
    head.load_state_dict(load_file(str(out / "seg_head.safetensors")))
    model = load_model(backbone)
    val = SegmentationFolder(shapes, "validation", 32, model.info.preprocess, 3)
    assert base["miou"] == pytest.approx(independent_miou(head.eval(), model, val), abs=1e-9)


@pytest.mark.parametrize("case, message", [
    ("size", "is 20x40 but its image is 48x40 (width x height): they must match"),
    ("missing", "has no mask"),
    ("label", "holds label 7, out of range for 3 classes (0..2, 255 = ignore)"),
    ("rgb", "not a single-channel index image"),
    ("not-an-image", "cannot read image"),
    ("layout", "has no annotations/validation/"),
])
def test_bad_masks_are_one_error_line(tmp_path, shapes, backbone, capsys, case, message):
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    mask = data / "annotations/validation/003.png"
    if case == "size":
        Image.fromarray(np.zeros((40, 20), np.uint8), mode="L").save(mask)
    elif case == "missing":
        mask.unlink()
    elif case == "label":
        ids = np.asarray(Image.open(mask)).copy()
        ids[5, 5] = 7
        Image.fromarray(ids, mode="L").save(mask)
    elif case == "rgb":
        Image.open(mask).convert("RGB").save(mask)
    elif case == "not-an-image":
        (data / "images/validation/003.png").write_bytes(b"not a PNG")
    else:
        shutil.rmtree(data / "annotations/validation")
    code = main(["train", "--task", "segmentation", "--data", str(data), "--init", str(backbone), "--epochs", "1",
                 "--workers", "0", "--out", str(tmp_path / "out")])
    line = one_error_line(capsys)
    assert code == 1 and message in line, line
    assert not (tmp_path / "out").exists()


def test_classification_still_needs_a_recipe(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "out")]) == 1
    assert "the following argument is required: --recipe (or --task segmentation)" in one_error_line(capsys)
