"""`vitbudget viz` on what users draw: a checkpoint checkpoint on a folder of unlabelled photos, at another input size."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vitbudget.cli import main


@pytest.fixture
def photos(tmp_path):
    """A flat folder of photos of several sizes, no class folders (like imagenet-sample-250)."""
    root = tmp_path / "photos" / "sample"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 60), (64, 48), (33, 33)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"photo{i}.jpg")
    return root.parent


def captured_maps(monkeypatch):
    """What viz hands to the drawing: the images and the titles."""
    seen = {}
    import vitbudget.report as report

    def fake(images, token_map, patch_size, path, *, titles=None, suptitle=None, **kw):
        seen.update(images=images, token_map=token_map, titles=titles, suptitle=suptitle)
        path.write_bytes(b"\x89PNG")
    monkeypatch.setattr(report, "save_token_maps", fake)
    return seen


def test_checkpoint_on_unlabelled_photos_at_another_size(tmp_path, capsys, monkeypatch, checkpoint, photos):
    seen = captured_maps(monkeypatch)
    argv = ["viz", "--method", "tome", "--r", "2", "--model", str(checkpoint), "--data", str(photos), "--split", "sample",
            "--img-size", "64", "--num-images", "3", "--out", str(tmp_path / "v")]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "v" / "tome_tokens.png").exists()
    assert seen["images"].shape == (3, 64, 64, 3)  # drawn at the asked size, not the trained 32 px
    assert seen["token_map"].values.shape[1] == (64 // 8) ** 2  # one value per patch of the larger grid
    assert all(t.startswith(" → class") for t in seen["titles"])  # no true label to show, the prediction by name
    assert seen["suptitle"].endswith("— predicted")


def test_labelled_folder_still_shows_true_and_predicted(tmp_path, capsys, monkeypatch, checkpoint, image_folder):
    seen = captured_maps(monkeypatch)
    argv = ["viz", "--method", "evit", "--rho", "0.5", "--stages", "1", "--model", str(checkpoint), "--data", str(image_folder),
            "--num-images", "2", "--out", str(tmp_path / "v")]
    assert main(argv) == 0, capsys.readouterr().err
    assert all(t.startswith("class") and " → class" in t for t in seen["titles"])
    assert seen["token_map"].values.shape[1] == (32 // 8) ** 2


def test_unresampleable_size_is_one_line_and_writes_nothing(tmp_path, capsys, checkpoint, photos):
    argv = ["viz", "--method", "tome", "--model", str(checkpoint), "--data", str(photos), "--split", "sample",
            "--img-size", "60", "--out", str(tmp_path / "v")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "vitbudget: error: input size 60 is not a positive multiple of patch size 8" in err
    assert not (tmp_path / "v").exists()
