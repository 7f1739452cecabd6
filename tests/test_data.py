"""Datasets: folders and archives, integrity-checked cache, deterministic subsets, readable errors."""
from __future__ import annotations

import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch

from conftest import write_image_folder
from vitbudget import ConfigError, DataError
from vitbudget.data import EvalTransform, ImageFolder, PadCropFlip, epoch_order, iterate, make_loader, read_image, subset_indices, unpack
from vitbudget.data.archive import MANIFEST
from vitbudget.data.folder import class_labels
from vitbudget.data.loader import MAX_WORKERS
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


def png_bytes(pixels: np.ndarray, color_type: int, bit_depth: int = 16, size: tuple[int, int] | None = None) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit colour): color_type 0 = grey, 2 = RGB; `size` may lie about the data."""
    h, w = pixels.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + pixels[y].astype(dtype).tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    width, height = size or (w, h)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 257, 0x8000, 0xFFFF]], np.uint16)  # 0, 1, 127.5, 255 in 8 bits
    (tmp_path / "grey16.png").write_bytes(png_bytes(grey, color_type=0))
    assert np.asarray(read_image(tmp_path / "grey16.png"))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(read_image(tmp_path / "grey16.png")).shape == (1, 4, 3)
    rgb = np.stack([grey, grey // 2, grey // 4], axis=-1)
    (tmp_path / "rgb16.png").write_bytes(png_bytes(rgb, color_type=2))
    expected = np.round(rgb.astype(float) / 257)
    assert np.abs(np.asarray(read_image(tmp_path / "rgb16.png")).astype(float) - expected).max() <= 1  # PIL keeps the high byte
    from PIL import Image

    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataError, match="floating-point pixels have no standard range"):
        read_image(tmp_path / "float.tif")


@pytest.mark.parametrize("side", [10_000, 100_000])  # above PIL's warning limit, and above its error limit
def test_decompression_bomb_is_a_data_error(tmp_path, side):
    (tmp_path / "bomb.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8), color_type=0, bit_depth=8, size=(side, side)))
    with pytest.raises(DataError, match=r"larger than the \d+ pixels PIL decodes safely"):
        read_image(tmp_path / "bomb.png")


@pytest.mark.parametrize("manifest", ["{ not json", "[1, 2]", ""])
@pytest.mark.slow
def test_corrupt_cache_manifest_is_repaired_by_unpacking_again(tmp_path, image_folder, manifest):
    archive = tmp_path / "toy.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(image_folder / "test", arcname="toy/test")
    root = unpack(archive, tmp_path / "cache")
    (root / "toy/test/class00/0.png").unlink()
    (root / MANIFEST).write_text(manifest)
    assert unpack(archive, tmp_path / "cache") == root
    assert (root / "toy/test/class00/0.png").is_file() and json.loads((root / MANIFEST).read_text())["files"] == 40
    (root / MANIFEST).unlink()  # an unpack killed before its manifest was written: also redone
    assert unpack(archive, tmp_path / "cache") == root and (root / MANIFEST).is_file()


def test_labels_follow_the_models_class_names(image_folder):
    names = [f"class{c:02d}" for c in range(10)]
    assert class_labels(names, names) == ({n: i for i, n in enumerate(names)}, None)
    shuffled = names[::-1]  # a model whose output 0 is class09: labels follow its names, not folder order
    ds = ImageFolder(image_folder, "test", label_names=shuffled)
    assert ds.labels_by_name and ds.targets[:4] == [9] * 4 and ds.targets[-1] == 0
    subset = ["class03", "class07"]  # a split with some of the model's classes is labelled by name
    assert class_labels(subset, names)[0] == {"class03": 3, "class07": 7}
    with pytest.raises(DataError, match=r"\[cat\] unknown to the model; folders \[cat, class01\], model classes \[class00, class01"):
        class_labels(["cat", "class01"], names)
    mapping, note = class_labels(["cat", "class01"], names, allow_mismatch=True)
    assert mapping == {"cat": 0, "class01": 1} and "labels follow the sorted folder names" in note
    mapping, note = class_labels(["b", "a"], None)  # no names: sorted folder order, said once
    assert mapping == {"b": 0, "a": 1} and note.startswith("the model has no class names; labels follow the sorted class-folder names (b=0, a=1)")


def test_loader_refuses_bad_batch_size_and_workers(image_folder):
    ds = ImageFolder(image_folder, "test")
    for kwargs, message in [({"batch_size": 0}, "batch size must be a positive integer"), ({"workers": -1}, "workers must be"),
                            ({"workers": MAX_WORKERS + 1}, f"from 0 to {MAX_WORKERS}")]:
        with pytest.raises(ConfigError, match=message):
            make_loader(ds, range(4), **{"batch_size": 2, **kwargs})


def test_golden_subset_and_order_prefixes():
    """Pinned: changing how subsets or epoch orders are drawn silently changes every published number."""
    assert subset_indices(10000, 500)[:10] == [36, 38, 42, 47, 53, 108, 141, 147, 206, 236]  # eval --limit 500 on CIFAR-10 test
    assert subset_indices(10000, 500)[-3:] == [9952, 9971, 9990]
    train = subset_indices(50000, 10000)  # the fine-tuning recipes' 10 000-image subset
    assert train[:8] == [2, 9, 12, 21, 24, 26, 28, 49]
    assert epoch_order(train, 0, 0)[:8] == [15199, 23407, 41772, 23579, 29247, 32315, 25464, 20455]
    assert epoch_order(train, 0, 1)[:8] == [2916, 32716, 43444, 40271, 31671, 30788, 23782, 8236]


def test_shortest_side_resize_truncates_the_long_side_as_torchvision(monkeypatch):
    """torchvision's `_compute_resized_output_size` (and Hugging Face's shortest-edge resize): the
    short side becomes side = floor(size / crop_pct) and the long side int(side * long / short),
    truncated, never rounded. Checked against exact integer arithmetic over many aspect ratios."""
    from PIL import Image

    sizes = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, new, *a, **k: sizes.append(tuple(new)) or real_resize(self, new, *a, **k))
    transform = EvalTransform(16, Preprocess(crop_pct=0.875))  # side = floor(16 / 0.875) = 18
    shapes = [(w, h) for w in range(5, 60, 3) for h in range(5, 60, 4) if (w, h) != (16, 16)]
    expected = []
    for w, h in shapes:
        transform.resize_crop(Image.new("RGB", (w, h)))
        short, long = min(w, h), max(w, h)
        new_long = 18 * long // short  # exact floor of the true quotient
        expected.append((18, new_long) if w <= h else (new_long, 18))
    assert sizes == expected
    rounded = sum(round(18 * max(s) / min(s)) != 18 * max(s) // min(s) for s in shapes)
    assert rounded > len(shapes) // 4  # the check covers ratios where rounding would differ


def test_channel_statistics_sample_every_class_not_the_first_images(tmp_path):
    """Samples are listed class by class; the mean/std sample must be spread over them. Three classes
    of pure red, green and blue: each channel's mean is the sampled share of one class."""
    from PIL import Image

    from vitbudget.data.stats import channel_mean_std

    for c, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        (tmp_path / "train" / f"c{c}").mkdir(parents=True)
        for i in range(30):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "train" / f"c{c}" / f"{i:02d}.png")
    data = ImageFolder(tmp_path, "train")
    mean, std = channel_mean_std(data, 8, limit=30)  # a third of the images
    assert min(mean) > 0.2 and mean == pytest.approx((1 / 3, 1 / 3, 1 / 3), abs=0.1)  # the first 30: (1, 0, 0)
    assert std == pytest.approx(tuple(np.sqrt(m * (1 - m)) for m in mean), abs=1e-3)  # 0/1 pixels
    assert channel_mean_std(data, 8, limit=None)[0] == pytest.approx((1 / 3, 1 / 3, 1 / 3), abs=1e-4)
