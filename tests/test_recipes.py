"""Recipes for any image folder: sizes, classes and normalisation from the data, never another data set's;
the CIFAR-10 recipes are presets of the generic ones with exactly their former settings."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, make_model, write_image_folder
from vitbudget import ConfigError, DataError, load_model, save_model
from vitbudget.cli import main
from vitbudget.data import ImageFolder
from vitbudget.data.stats import channel_mean_std, conversion_notes, default_patch_size, infer_img_size
from vitbudget.models import Preprocess
from vitbudget.train import RECIPES, Recipe, Trainer, finetune, recipe_for_data, scratch

BEFORE = json.loads((Path(__file__).parent / "data/recipes_before_generic.json").read_text())


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_presets_keep_their_former_settings(name):
    """Every preset, now built from `scratch` / `finetune`, resolves to the recipe it was before (same results)."""
    now = json.loads(json.dumps(RECIPES[name].to_dict()))
    assert {k: now[k] for k in BEFORE[name]} == BEFORE[name]
    assert set(now) - set(BEFORE[name]) == {"new_head", "dtype"} and now["new_head"] is False and now["dtype"] == "fp32"


def write_odd_folder(root: Path, per_class: int = 6, splits=("train", "val")) -> Path:
    """3 classes; every image 40x30 px; one in three grayscale (L), one in three RGBA."""
    rng = np.random.default_rng(1)
    for split in splits:
        for c in range(3):
            d = root / split / f"kind{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(np.clip(rng.normal(60 + 60 * c, 20, (30, 40, 3)), 0, 255).astype(np.uint8))
                img = img.convert("L") if i % 3 == 1 else img.convert("RGBA") if i % 3 == 2 else img
                img.save(d / f"{i}.png")
    return root


@pytest.fixture
def odd_folder(tmp_path):
    return write_odd_folder(tmp_path / "odd")


def test_scratch_takes_sizes_and_classes_from_the_data(odd_folder):
    recipe, notes = recipe_for_data("scratch", odd_folder)
    assert recipe.name == "scratch_odd" and recipe.mean is None  # normalisation: computed later, from this data
    assert recipe.arch == {"img_size": 28, "patch_size": 4, "embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0, "num_classes": 3}
    assert notes == ["scratch_odd: from the data: patch size 4, image size 28 (the most common short side, to a multiple of the patch size), 3 classes"]
    given, notes = recipe_for_data("scratch", odd_folder, arch="vit_small", img_size=32, patch_size=8, num_classes=5)
    assert given.arch["img_size"] == 32 and given.arch["patch_size"] == 8 and given.arch["num_classes"] == 5 and given.arch["embed_dim"] == 384
    assert notes == []
    assert [default_patch_size(s) for s in (28, 32, 64, 96, 224)] == [4, 4, 8, 8, 16]
    with pytest.raises(ConfigError, match="pass --init"):
        recipe_for_data("finetune", odd_folder)
    with pytest.raises(ConfigError, match="unknown --arch"):
        recipe_for_data("scratch", odd_folder, arch="resnet")


def test_mean_std_are_the_training_splits_own(odd_folder):
    train = ImageFolder(odd_folder, "train")
    mean, std = channel_mean_std(train, 28)
    # independently: decode with PIL as RGB, resize the short side to 28 (bilinear), crop the centre 28x28
    pixels = []
    for path, _ in train.samples:
        img = Image.open(path).convert("RGB").resize((37, 28), Image.BILINEAR)
        pixels.append(np.asarray(img.crop((4, 0, 32, 28)), dtype=np.float64) / 255)
    pixels = np.stack(pixels).reshape(-1, 3)
    assert mean == pytest.approx(tuple(pixels.mean(0)), abs=1e-4) and std == pytest.approx(tuple(pixels.std(0)), abs=1e-4)


def test_conversions_are_noted_once_per_split(odd_folder):
    notes = conversion_notes(ImageFolder(odd_folder, "train"), 28, Preprocess())
    assert notes == [
        "note: images: 6 grayscale (L), 6 RGBA of 18 sampled are not RGB: converted to 3-channel RGB (grey replicated, alpha dropped)",
        "note: images are 40x30 px (in a sample of 18), not 28x28: short side resized to 28, centre 28x28 cropped",
    ]
    assert conversion_notes(ImageFolder(odd_folder, "train"), 28, Preprocess(resize="squash"))[1].endswith("resized to 28x28 (aspect ratio not kept)")


@pytest.mark.slow
def test_scratch_training_normalises_with_the_data_and_stores_it(tmp_path, odd_folder):
    recipe, _ = recipe_for_data("scratch", odd_folder, arch="vit_tiny", img_size=16, patch_size=8)
    recipe = recipe.replace(arch={**recipe.arch, "embed_dim": 16, "depth": 1, "num_heads": 2}, epochs=1, batch_size=6, eval_limit=None)
    trainer = Trainer(recipe, odd_folder, tmp_path / "run", workers=0, progress=False)
    expected = channel_mean_std(ImageFolder(odd_folder, "train"), 16)
    assert (trainer.recipe.mean, trainer.recipe.std) == expected and trainer.eval_split == "val"  # no test/: val/
    assert sum(n.startswith("note: training images") for n in trainer.notes) == 2  # colour modes, sizes: once each
    model = load_model(trainer.fit().model_path)
    assert model.info.name == "scratch_odd" and model.info.classes == ["kind0", "kind1", "kind2"]
    assert model.info.preprocess.mean == expected[0]
    meta = json.loads((tmp_path / "run/model.json").read_text())
    assert meta["normalization"]["source"] == "computed from 18 of 18 training images"
    assert any("grayscale" in n for n in meta["data_notes"])


def test_finetune_trains_a_new_head_for_the_datas_classes(tmp_path, odd_folder):
    init = make_model(TINY.replace(img_size=16))  # 10 classes, the data has 3
    init.info.preprocess = Preprocess(mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    path = save_model(init, tmp_path / "init.safetensors")
    recipe, _ = recipe_for_data("finetune", odd_folder, init=load_model(path))
    assert recipe.name == "finetune_odd" and recipe.new_head and recipe.lr == 1e-4
    trainer = Trainer(recipe.replace(batch_size=6, eval_limit=None), odd_folder, tmp_path / "ft", init=load_model(path), workers=0, progress=False)
    assert trainer.model.cfg.num_classes == 3 and trainer.recipe.arch["num_classes"] == 3
    assert trainer.model.info.preprocess.mean == (0.1, 0.2, 0.3)  # the checkpoint's normalisation, not the data's
    assert any(n.startswith("note: new head: the checkpoint has 10 outputs, the data 3 classes") for n in trainer.notes)
    backbone = torch.cat([p.flatten() for n, p in trainer.model.named_parameters() if not n.startswith("head")])
    assert torch.equal(backbone, torch.cat([p.flatten() for n, p in init.named_parameters() if not n.startswith("head")]))
    with pytest.raises(ConfigError, match="the data has 3 classes but the model has 10 outputs"):
        Trainer(recipe.replace(new_head=False), odd_folder, tmp_path / "x", init=load_model(path), workers=0, progress=False)


def test_missing_held_out_split_is_a_clear_error(tmp_path):
    write_odd_folder(tmp_path / "only_train", splits=("train",))
    recipe = scratch("s", arch="vit_mini", img_size=16, patch_size=8, num_classes=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(DataError, match="no held-out split .*test/, val/, validation/"):
        Trainer(recipe, tmp_path / "only_train", tmp_path / "r", workers=0, progress=False)


def test_recipe_normalisation_is_both_or_neither():
    with pytest.raises(ConfigError, match="both mean and std"):
        Recipe(name="x", arch={}, mean=(0.5,) * 3)
    assert finetune().mean is None and finetune().new_head


@pytest.mark.slow
def test_cli_scratch_then_finetune_any_folder(tmp_path, capsys):
    data = write_image_folder(tmp_path / "colours", classes=3, per_class=8, size=20)
    code = main(["train", "--recipe", "scratch", "--arch", "vit_mini", "--data", str(data), "--img-size", "16", "--patch-size", "8", "--epochs", "1",
                 "--batch-size", "8", "--out", str(tmp_path / "s"), "--quiet", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 0 and "scratch_colours: from the data: 3 classes" in err and err.count("normalisation:") == 1
    assert "note: training images are 20x20 px" in err
    assert load_model(tmp_path / "s/model.safetensors").info.name == "scratch_colours"
    code = main(["train", "--recipe", "finetune", "--init", str(tmp_path / "s/model.safetensors"), "--data", str(data), "--img-size", "24",
                 "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "f"), "--quiet", "--workers", "0"])
    assert code == 0 and "resampled from 16 px" in capsys.readouterr().err
    assert load_model(tmp_path / "f/model.safetensors").cfg.img_size == 24
    code = main(["train", "--recipe", "smoke", "--arch", "vit_small", "--data", str(data), "--out", str(tmp_path / "x")])
    assert code == 1 and "--arch apply to the generic recipes" in capsys.readouterr().err


def test_infer_img_size_rounds_to_the_patch(odd_folder):
    train = ImageFolder(odd_folder, "train")
    assert infer_img_size(train) == 30 and infer_img_size(train, 8) == 24


def test_squash_resize_ignores_the_aspect_ratio():
    """Hugging Face ViT's processor resizes both sides to the input size; 'shortest' (timm) keeps the aspect and crops."""
    from vitbudget.data import EvalTransform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8))
    squash = EvalTransform(16, Preprocess(resize="squash")).resize_crop(image)
    assert np.array_equal(squash, np.asarray(image.resize((16, 16), Image.BILINEAR)))
    shortest = EvalTransform(16, Preprocess()).resize_crop(image)
    assert np.array_equal(shortest, np.asarray(image.resize((32, 16), Image.BILINEAR).crop((8, 0, 24, 16))))
