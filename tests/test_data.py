"""Datasets: folders and archives, integrity-checked cache, deterministic subsets, readable errors."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from conftest import write_image_folder
from vitbudget import ConfigError, DataError
from vitbudget.data import EvalTransform, ImageFolder, PadCropFlip, epoch_order, iterate, make_loader, subset_indices, unpack
from vitbudget.models import Preprocess


def test_folder_labels_follow_sorted_class_names(image_folder):
    ds = ImageFolder(image_folder, "test")
    assert ds.classes == [f"class{c:02d}" for c in range(10)]
    assert len(ds) == 40 and ds.targets[:4] == [0, 0, 0, 0] and ds.targets[-1] == 9


def test_archive_unpacks_once_and_detects_damage(tmp_path, image_folder):
    archive = tmp_path / "toy.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(image_folder, arcname="toy")
    cache = tmp_path / "cache"
    root = unpack(archive, cache)
    assert (root / "toy/test/class00/0.png").is_file()
    marker = root / "toy/test/class00/0.png"
    mtime = marker.stat().st_mtime_ns
    assert unpack(archive, cache) == root and marker.stat().st_mtime_ns == mtime  # reused, not re-extracted
    marker.unlink()  # damage the cache: it is detected and rebuilt
    assert unpack(archive, cache) == root and marker.is_file()
    ds = ImageFolder(archive, "test")  # split found inside the wrapping folder
    assert len(ds) == 40


def test_transforms_normalise_and_augment_reproducibly(image_folder):
    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ds = ImageFolder(image_folder, "train", PadCropFlip(32, pre))
    a, b = ds[3][0], ds[3][0]
    assert a.shape == (3, 32, 32) and torch.equal(a, b)  # same (seed, epoch, index) -> same pixels
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], a)
    eval_ds = ImageFolder(image_folder, "train", EvalTransform(16, pre))  # resized to the model's size
    x = eval_ds[0][0]
    assert x.shape == (3, 16, 16) and x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6


def test_subsets_and_orders_are_deterministic():
    assert subset_indices(100, 10) == subset_indices(100, 10)
    assert len(set(subset_indices(100, 10))) == 10 and subset_indices(5, None) == [0, 1, 2, 3, 4]
    idx = list(range(50))
    assert epoch_order(idx, 0, 3) == epoch_order(idx, 0, 3) != epoch_order(idx, 0, 4)
    assert sorted(epoch_order(idx, 0, 3)) == idx


def test_empty_and_missing_data(tmp_path):
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "nope", "test")
    (tmp_path / "empty/test/cat").mkdir(parents=True)
    (tmp_path / "empty/test/cat/readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty", "test")
    with pytest.raises(DataError, match="no 'val' split"):
        ImageFolder(tmp_path / "empty", "val")


def test_corrupt_image_is_named_even_from_a_worker(tmp_path):
    root = write_image_folder(tmp_path / "d", splits=("test",), classes=2, per_class=2)
    bad = root / "test/class01/1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageFolder(root, "test", EvalTransform(32, Preprocess()))
    with pytest.raises(DataError, match="cannot read image .*1.png"):
        ds[3]
    with pytest.raises(DataError, match=r"^cannot read image .*1\.png"):
        list(iterate(make_loader(ds, range(4), batch_size=2, workers=1)))


def test_grayscale_images_become_rgb(tmp_path):
    from PIL import Image

    d = tmp_path / "g/test/a"
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(d / "x.png")
    assert ImageFolder(tmp_path / "g", "test", EvalTransform(8, Preprocess()))[0][0].shape == (3, 8, 8)


def test_flip_only_augmentation_keeps_every_pixel(image_folder):
    """Counting recipes flip but never crop: each sample is the image or its mirror, never shifted."""
    from vitbudget.train import get_recipe

    pre = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    plain = ImageFolder(image_folder, "train", EvalTransform(32, pre))
    flipped = ImageFolder(image_folder, "train", PadCropFlip(32, pre, padding=0))
    seen = set()
    for i in range(len(plain)):
        x, y = plain[i][0], flipped[i][0]
        mirrored = torch.equal(y, x.flip(-1))
        assert mirrored or torch.equal(y, x)
        seen.add(mirrored)
    assert seen == {True, False}
    assert get_recipe("count_vit_p4").augment == "flip"
    with pytest.raises(ConfigError, match="unknown augmentation"):
        get_recipe("smoke", augment="rotate")
