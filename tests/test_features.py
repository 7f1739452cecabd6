"""Feature extractors (no head): every command scores methods by cosine similarity to the
unpruned model's pooled features, on labelled or unlabelled image folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, make_model
from vitbudget import save_model
from vitbudget.cli import main
from vitbudget.data import EvalTransform, ImageFolder
from vitbudget.eval.metrics import cosine_similarity
from vitbudget.methods import build_method

BACKBONE = TINY.replace(num_classes=0, depth=4, reg_tokens=2)


@pytest.fixture
def backbone(tmp_path):
    return save_model(make_model(BACKBONE), tmp_path / "backbone.safetensors")


@pytest.fixture
def flat_folder(tmp_path):
    """Images straight in a folder: no class folders, no labels."""
    rng = np.random.default_rng(0)
    (tmp_path / "flat").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(tmp_path / f"flat/img{i}.png")
    return tmp_path / "flat"


def test_cosine_similarity_is_per_image():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert cosine_similarity(a, b).tolist() == pytest.approx([0.0, 1.0])


@pytest.mark.slow
def test_eval_reports_cosine_to_the_baseline(tmp_path, capsys, backbone, image_folder):
    out = tmp_path / "out"
    code = main(["eval", "--model", str(backbone), "--data", str(image_folder), "--method", "tome", "--r", "4", "--method", "abs",
                 "--no-speed", "--quiet", "--workers", "0", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "results.json").read_text())["methods"]
    assert report["baseline"]["cosine_to_baseline"] == pytest.approx(1.0)
    assert "top1" not in report["tome"] and "mcnemar_vs_baseline" not in report["tome"]
    # independently: the mean cosine of ToMe's features to the plain model's, over the same 40 images
    model = make_model(BACKBONE)
    data = ImageFolder(image_folder, "test", EvalTransform(32, model.info.preprocess))
    images = torch.stack([data[i][0] for i in range(len(data))])
    with torch.no_grad():
        expected = cosine_similarity(build_method("tome", model, r=4).eval()(images).logits, model(images)).mean()
    assert report["tome"]["cosine_to_baseline"] == pytest.approx(float(expected), abs=1e-6)
    assert report["tome"]["cosine_to_baseline"] < 1.0
    arrays = np.load(out / "predictions.npz")
    assert arrays["tome/cosine"].mean() == pytest.approx(float(expected), abs=1e-6) and "tome/pred" not in arrays
    table = (out / "results.md").read_text()
    assert "cos. sim. to baseline" in table and "top-1" not in table


def test_eval_on_an_unlabelled_flat_folder(tmp_path, capsys, backbone, flat_folder):
    code = main(["eval", "--model", str(backbone), "--data", str(flat_folder), "--split", ".", "--no-speed", "--quiet",
                 "--workers", "0", "--out", str(tmp_path / "o")])
    assert code == 0
    assert json.loads((tmp_path / "o/results.json").read_text())["data"]["images"] == 6
    classifier = save_model(make_model(TINY), tmp_path / "clf.safetensors")  # a classifier needs labels: class folders
    code = main(["eval", "--model", str(classifier), "--data", str(flat_folder), "--split", ".", "--no-speed", "--quiet",
                 "--workers", "0", "--out", str(tmp_path / "o2")])
    assert code == 1 and "no class folders" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_and_viz_on_a_backbone(tmp_path, capsys, backbone, image_folder):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"entries": [{"label": "Baseline", "method": "baseline"}, {"label": "ToMe r 4", "method": "tome", "options": {"r": 4}},
                                             {"label": "EViT", "method": "evit", "options": {"rho": 0.5, "stages": "1"}}]}))
    out = tmp_path / "bench"
    code = main(["bench", "--suite", str(suite), "--model", str(backbone), "--data", str(image_folder), "--no-speed", "--quiet",
                 "--seeds", "1", "--workers", "0", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "bench.json").read_text())["splits"]["test"]["rows"]
    assert rows["Baseline"]["cosine_mean"] == pytest.approx(1.0) and rows["EViT"]["cosine_mean"] < 1.0
    assert "top1_mean" not in rows["EViT"] and (out / "test_pareto.png").is_file()
    assert "cos. sim. to reference" in (out / "test.md").read_text()
    code = main(["viz", "--method", "evit", "--rho", "0.5", "--stages", "1", "--model", str(backbone), "--data", str(image_folder),
                 "--num-images", "4", "--out", str(tmp_path / "viz")])
    assert code == 0 and (tmp_path / "viz/evit_tokens.png").is_file()
