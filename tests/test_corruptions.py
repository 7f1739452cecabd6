"""Common corruptions: all 15 types at 32 px, reproducible, ImageFolder output, atomic and reused.

Tests of the folder logic use a stand-in corruption; the ones marked `needs_package` run the real
imagecorruptions-imaug (the optional `robustness` extra) and skip without it (fail in CI: see conftest).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import requires_corruptions, write_image_folder

from vitbudget import ConfigError, DataError, OutputError
from vitbudget.cli import main
from vitbudget.data import ImageFolder, corruptions, read_image
from vitbudget.data.corruptions import (
    CORRUPTIONS,
    MANIFEST,
    corrupt_folder,
    corrupt_image,
    parse_corruptions,
)


needs_package = requires_corruptions  # skips without the extra, fails under VITBUDGET_REQUIRE_ANCHORS=1 (CI)


@pytest.fixture
def fake_backend(monkeypatch):
    """A corruption that uses the global RNG like the package does, and counts its calls."""
    calls = []

    def corrupt(image, corruption_name=None, severity=1, seed=None):
        calls.append(corruption_name)
        noise = np.random.randint(0, 40 * severity, size=image.shape)
        return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)

    monkeypatch.setattr(corruptions, "_backend", lambda: corrupt)
    return calls


@pytest.fixture
def src(tmp_path):
    return write_image_folder(tmp_path / "src", splits=("test",), classes=3, per_class=3) / "test"


@pytest.mark.slow
@needs_package
def test_all_15_corruptions_run_on_32px_and_are_reproducible():
    from imagecorruptions import get_corruption_names

    assert list(CORRUPTIONS) == get_corruption_names("common")
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    state = np.random.get_state()
    for name in CORRUPTIONS:
        a = corrupt_image(img, name, 3, seed=0, index=5)
        assert a.shape == img.shape and a.dtype == np.uint8, name
        assert not np.array_equal(a, img), f"{name} left the image unchanged"
        assert np.array_equal(a, corrupt_image(img, name, 3, seed=0, index=5)), f"{name} is not reproducible"
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's global RNG is untouched
    # randomised corruptions differ between images and seeds
    for name in ("gaussian_noise", "glass_blur", "impulse_noise", "frost", "fog", "motion_blur", "snow"):
        a = corrupt_image(img, name, 3, seed=0, index=5)
        assert not np.array_equal(a, corrupt_image(img, name, 3, seed=0, index=6)), name
        assert not np.array_equal(a, corrupt_image(img, name, 3, seed=1, index=5)), name


@needs_package
def test_real_corrupt_folder_writes_identical_bytes(src, tmp_path):
    a = corrupt_folder(src, tmp_path / "a", "glass_blur", severity=3, seed=4)
    b = corrupt_folder(src, tmp_path / "b", "glass_blur", severity=3, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 9 and files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_severity_and_name_validation(src, tmp_path, fake_backend):
    img = np.zeros((32, 32, 3), np.uint8)
    for bad in (0, 6, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="severity must be an integer from 1 to 5"):
            corrupt_image(img, "fog", bad)
    with pytest.raises(ConfigError, match="unknown corruption 'rain'"):
        corrupt_folder(src, tmp_path / "x", "rain")
    with pytest.raises(DataError, match="at least 32x32"):
        corrupt_image(np.zeros((16, 40, 3), np.uint8), "fog", 3)
    assert parse_corruptions(None) == list(CORRUPTIONS) and parse_corruptions("fog, snow,fog") == ["fog", "snow"]
    with pytest.raises(ConfigError, match="unknown corruption"):
        parse_corruptions("fog,hail")
    assert not (tmp_path / "x").exists()


def test_output_mirrors_the_class_layout_and_is_deterministic(src, tmp_path, fake_backend):
    out = corrupt_folder(src, tmp_path / "fog", "fog", severity=2, seed=1)
    clean, corrupted = ImageFolder(src), ImageFolder(out)
    assert corrupted.classes == clean.classes and corrupted.targets == clean.targets
    assert all(p.endswith(".png") for p, _ in corrupted.samples)
    again = corrupt_folder(src, tmp_path / "fog2", "fog", severity=2, seed=1)
    other = corrupt_folder(src, tmp_path / "fog3", "fog", severity=2, seed=2)
    pix = [np.asarray(ImageFolder(d)[4][0]) for d in (out, again, other)]
    assert np.array_equal(pix[0], pix[1]) and not np.array_equal(pix[0], pix[2])
    spec = json.loads((out / MANIFEST).read_text())["spec"]
    assert spec["corruption"] == "fog" and spec["severity"] == 2 and spec["seed"] == 1


def test_limit_keeps_evals_subset_and_per_image_corruption(src, tmp_path, fake_backend):
    from vitbudget.data import subset_indices

    full = ImageFolder(corrupt_folder(src, tmp_path / "full", "snow"))
    part = ImageFolder(corrupt_folder(src, tmp_path / "part", "snow", limit=4))
    assert len(part) == 4
    names = {p.split("/full/")[1]: p for p, _ in full.samples}
    kept = [full.samples[i][0] for i in subset_indices(len(full), 4)]
    assert sorted(p.split("/part/")[1] for p, _ in part.samples) == sorted(p.split("/full/")[1] for p in kept)
    for p, _ in part.samples:  # an image's corruption does not depend on which others were selected
        assert np.array_equal(np.asarray(read_image(p)), np.asarray(read_image(names[p.split("/part/")[1]])))


def test_atomic_reuse_and_rebuild(src, tmp_path, fake_backend, monkeypatch):
    out = tmp_path / "c"
    corrupt_folder(src, out, "contrast")
    n = len(fake_backend)
    assert corrupt_folder(src, out, "contrast") == out and len(fake_backend) == n  # complete: reused
    corrupt_folder(src, out, "contrast", severity=4)  # different arguments: rebuilt
    assert len(fake_backend) == 2 * n and json.loads((out / MANIFEST).read_text())["spec"]["severity"] == 4
    next(out.rglob("*.png")).unlink()  # damaged: rebuilt
    corrupt_folder(src, out, "contrast", severity=4)
    assert len(list(out.rglob("*.png"))) == 9

    def broken(image, corruption_name=None, severity=1, seed=None):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(corruptions, "_backend", lambda: broken)
    with pytest.raises(RuntimeError):
        corrupt_folder(src, tmp_path / "new", "contrast")
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs/x.txt").write_text("keep me")
    monkeypatch.undo()
    monkeypatch.setattr(corruptions, "_backend", lambda: (lambda image, **kw: image))
    with pytest.raises(OutputError, match="not written by vitbudget"):
        corrupt_folder(src, tmp_path / "theirs", "contrast")
    assert (tmp_path / "theirs/x.txt").is_file()


def test_missing_package_is_a_clear_error(src, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "imagecorruptions":
            raise ImportError("No module named 'imagecorruptions'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(DataError, match=r"pip install 'vitbudget\[robustness\]'"):
        corrupt_folder(src, tmp_path / "x", "fog")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_corrupt_cli_then_eval_a_corruption(tmp_path, capsys, fake_backend):
    from conftest import make_model

    from vitbudget import save_model

    data = write_image_folder(tmp_path / "d", splits=("test",), classes=10, per_class=2)
    out = tmp_path / "c"
    code = main(["corrupt", "--data", str(data), "--out", str(out), "--corruptions", "fog,pixelate", "--quiet"])
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["fog", "pixelate"]
    assert "--split fog" in capsys.readouterr().out
    model = make_model()
    model.info.classes = [f"class{c:02d}" for c in range(10)]
    ckpt = save_model(model, tmp_path / "m.safetensors")
    for data_arg, split in ((str(out), "fog"), (str(out / "pixelate"), ".")):  # corruption as split, or the folder itself
        code = main(["eval", "--model", str(ckpt), "--data", data_arg, "--split", split, "--out", str(tmp_path / "e"),
                     "--no-speed", "--quiet", "--workers", "0"])
        assert code == 0 and json.loads((tmp_path / "e/results.json").read_text())["data"]["images"] == 20
    capsys.readouterr()
    assert main(["corrupt", "--data", str(data), "--out", str(out), "--severity", "7", "--quiet"]) == 1
    assert "severity must be an integer from 1 to 5" in capsys.readouterr().err


def test_split_dot_or_empty_means_the_folder_itself(src):
    from vitbudget.data.folder import find_split

    assert find_split(src, ".") == src and find_split(src, "") == src and find_split(src, None) == src
    assert len(ImageFolder(src, ".")) == len(ImageFolder(src)) == 9
