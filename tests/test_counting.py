"""CLEVR-Count-like scenes: deterministic, correctly labelled, every object visible, written atomically."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vitbudget import ConfigError
from vitbudget.cli import main
from vitbudget.data import ImageFolder
from vitbudget.data.counting import (
    CLASSES,
    COUNTS,
    MANIFEST,
    MIN_VISIBLE_PX,
    SCALE,
    VISIBLE_FRACTION,
    make_counting,
    make_scene,
    render_scene,
)
from vitbudget.errors import OutputError


def test_scenes_are_deterministic_and_seed_dependent():
    a, b = make_scene(0, "train", 7), make_scene(0, "train", 7)
    assert np.array_equal(a.pixels, b.pixels) and a.objects == b.objects
    assert not np.array_equal(a.pixels, make_scene(1, "train", 7).pixels)
    assert not np.array_equal(a.pixels, make_scene(0, "test", 7).pixels)
    assert a.pixels.shape == (32, 32, 3) and a.pixels.dtype == np.uint8


@pytest.mark.parametrize("index", range(0, 48, 3))
def test_count_label_and_visibility_rule(index):
    scene = make_scene(3, "train", index)
    assert scene.count == COUNTS[index % 8]
    # the object-id map holds exactly `count` objects, each at least 40 % (and MIN_VISIBLE_PX) visible
    assert set(np.unique(scene.ids)) - {0} == set(range(1, scene.count + 1))
    seen = np.bincount(scene.ids.ravel(), minlength=scene.count + 1)[1:]
    assert np.all(seen >= VISIBLE_FRACTION * scene.areas - 1e-9)
    assert np.all(seen >= MIN_VISIBLE_PX * SCALE * SCALE)
    # same-coloured objects never touch, so no two objects merge into one blob
    for i, o in enumerate(scene.objects):
        for p in scene.objects[i + 1 :]:
            if o.colour == p.colour:
                assert np.hypot(o.x - p.x, o.y - p.y) >= o.r + p.r
    # objects lie inside the image and differ from the background: the rendered image shows them
    bg = np.median(scene.pixels.reshape(-1, 3), axis=0)
    assert (np.abs(scene.pixels.astype(int) - bg).max(axis=2) > 40).sum() >= scene.count * MIN_VISIBLE_PX / 2


def test_ten_objects_fit_and_bad_counts_are_refused():
    rng = np.random.default_rng(5)
    for _ in range(5):
        assert render_scene(rng, 10).count == 10
    with pytest.raises(ConfigError, match="count must be in 3..10"):
        render_scene(rng, 11)
    assert make_scene(0, "test", 2, size=48).pixels.shape == (48, 48, 3)


def test_written_tree_is_a_balanced_imagefolder_in_count_order(tmp_path):
    out = make_counting(tmp_path / "c", train=24, test=17, seed=2)
    train, test = ImageFolder(out, "train"), ImageFolder(out, "test")
    assert train.classes == test.classes == list(CLASSES) == ["03", "04", "05", "06", "07", "08", "09", "10"]
    assert [int(c) for c in train.classes] == sorted(int(c) for c in train.classes)  # class index = count - 3
    assert np.bincount(train.targets).tolist() == [3] * 8
    assert sorted(np.bincount(test.targets).tolist()) == [2] * 7 + [3]  # balanced to within one
    # the stored pixels are the scene of (seed, split, index)
    path, label = test.samples[0]
    index = int(path.rsplit("/", 1)[1][:-4])
    assert np.array_equal(np.asarray(test[0][0]), make_scene(2, "test", index).pixels) and COUNTS[label] == make_scene(2, "test", index).count
    assert json.loads((out / MANIFEST).read_text())["spec"]["train"] == 24


def test_output_is_atomic_and_reused(tmp_path, monkeypatch):
    from vitbudget.data import counting

    out = tmp_path / "c"
    calls = []
    real = counting.make_scene

    def failing(seed, split, index, size=32):
        calls.append(index)
        if split == "test" and index == 3:
            raise RuntimeError("killed")
        return real(seed, split, index, size)

    monkeypatch.setattr(counting, "make_scene", failing)
    with pytest.raises(RuntimeError, match="killed"):
        make_counting(out, train=8, test=8)
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no partial tree, no temp dir left
    monkeypatch.setattr(counting, "make_scene", real)
    make_counting(out, train=8, test=8)
    marker = out / "train/03/00000.png"
    mtime = marker.stat().st_mtime_ns
    monkeypatch.setattr(counting, "make_scene", failing)
    calls.clear()
    assert make_counting(out, train=8, test=8) == out and calls == [] and marker.stat().st_mtime_ns == mtime  # reused
    monkeypatch.setattr(counting, "make_scene", real)
    marker.unlink()  # damaged: rebuilt
    make_counting(out, train=8, test=8)
    assert marker.is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("not ours")
    with pytest.raises(OutputError, match="not written by vitbudget"):
        make_counting(tmp_path / "mine", train=8, test=8)


def test_make_counting_cli(tmp_path, capsys):
    assert main(["make-counting", "--out", str(tmp_path / "c"), "--train", "16", "--test", "8", "--quiet"]) == 0
    assert len(ImageFolder(tmp_path / "c", "train")) == 16 and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:  # a bad flag value is argparse's exit 2, one line
        main(["make-counting", "--out", str(tmp_path / "d"), "--train", "0", "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--train: expected a positive integer, got '0'" in err
    assert not (tmp_path / "d").exists()
