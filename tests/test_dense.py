"""Dense evaluation: metrics (golden values), `vitbudget eval --task saliency` on a tiny Dinov2-shaped model, bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch

from dense_fixtures import TINY_DINO, one_error_line, random_decoder, write_photos, write_saliency_dir
from vitbudget.cli import main
from vitbudget.eval import dense_metrics as dm
from vitbudget.models.heads import load_dense_model, load_head
from vitbudget.runtime.cost import dense_macs


def test_metrics_golden():
    a = torch.tensor([[0.2, 0.6], [0.9, 0.1]])
    b = torch.tensor([[0.4, 0.7], [0.3, 0.1]])
    assert dm.mean_abs_error(a, b) == pytest.approx((0.2 + 0.1 + 0.6 + 0.0) / 4)
    assert dm.iou_at(a, b) == pytest.approx(1 / 2)  # above 0.5: a {0.6, 0.9}, b {0.7}: 1 shared of 2
    assert dm.iou_at(torch.zeros(3), torch.zeros(3)) == 1.0  # nothing salient in either: agreement
    # Pearson by hand: a - mean = (-0.25, 0.15, 0.45, -0.35), b - mean = (0.025, 0.325, -0.075, -0.275)
    num = -0.25 * 0.025 + 0.15 * 0.325 - 0.45 * 0.075 + 0.35 * 0.275
    den = math.sqrt(0.25**2 + 0.15**2 + 0.45**2 + 0.35**2) * math.sqrt(0.025**2 + 0.325**2 + 0.075**2 + 0.275**2)
    assert dm.pearson(a, b) == pytest.approx(num / den)
    assert math.isnan(dm.pearson(torch.ones(4), b.flatten()))


def test_mean_iou_golden():
    target = torch.tensor([0, 0, 1, 1, 2, 255])
    pred = torch.tensor([0, 1, 1, 1, 0, 2])
    conf = dm.confusion(pred, target, num_classes=4)
    assert conf.sum() == 5  # the 255 pixel is ignored
    miou, per_class = dm.mean_iou(conf)
    # class 0: inter 1, union 3; class 1: inter 2, union 3; class 2: inter 0, union 1; class 3 absent (NaN, left out)
    assert per_class[:3] == pytest.approx([1 / 3, 2 / 3, 0.0]) and math.isnan(per_class[3])
    assert miou == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)


@pytest.fixture(scope="module")
def saliency_dir(tmp_path_factory):
    return write_saliency_dir(tmp_path_factory.mktemp("models") / "tiny_saliency")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos") / "photos")


def test_load_dense_model_reads_the_head_beside_the_backbone(saliency_dir):
    model, head = load_dense_model(saliency_dir)
    assert model.cfg.grid_size == 16 and model.cfg.embed_dim == 32
    reference = random_decoder(0)
    for (name, got), want in zip(head.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, msg=name)


@pytest.mark.slow
def test_eval_saliency_command(tmp_path, saliency_dir, photos, capsys):
    out = tmp_path / "out"
    code = main(["eval", "--task", "saliency", "--model", str(saliency_dir), "--data", str(photos), "--method", "tome", "--r", "0",
                 "--workers", "0", "--quiet", "--batch-size", "2", "--latency-repeats", "2", "--throughput-repeats", "1", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    base, tome = report["methods"]["baseline"], report["methods"]["tome"]
    head_macs = random_decoder().macs(16, 16)
    assert base["gflops"] == pytest.approx((dense_macs(TINY_DINO) + head_macs) / 1e9)
    assert base["gflops_head"] == pytest.approx(head_macs / 1e9)
    assert (base["mae"], base["iou@0.5"], base["pearson"]) == (0.0, 1.0, pytest.approx(1.0))
    assert tome["mae"] == 0.0 and tome["rel_flops"] == pytest.approx(1.0)  # r=0 merges nothing
    assert tome["fraction_of_ideal"] is not None and base["fraction_of_ideal"] is None
    assert report["data"]["images"] == 3 and (out / "maps.png").stat().st_size > 0 and (out / "results.md").is_file()


def test_task_without_a_head_is_one_error_line(tmp_path, photos, capsys):
    from conftest import make_model
    from vitbudget.models import save_model

    classifier = save_model(make_model(), tmp_path / "toy.safetensors")
    code = main(["eval", "--task", "saliency", "--model", str(classifier), "--data", str(photos), "--no-speed", "--out", str(tmp_path / "out")])
    line = one_error_line(capsys)
    assert code == 1 and "has no saliency head (expected saliency_decoder.safetensors in its directory)" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not-an-image", "no-photos", "split"])
def test_bad_photo_folders_are_one_error_line(tmp_path, saliency_dir, photos, capsys, case):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photos, data)
    extra = []
    if case == "not-an-image":
        (data / "broken.jpg").write_bytes(b"this is not a JPEG")
    elif case == "no-photos":
        shutil.rmtree(data)
        data.mkdir()
        (data / "notes.txt").write_text("no images here")
    else:
        extra = ["--split", "val"]
    code = main(["eval", "--task", "saliency", "--model", str(saliency_dir), "--data", str(data), "--no-speed", "--quiet",
                 "--workers", "0", "--out", str(tmp_path / "out"), *extra])
    line = one_error_line(capsys)
    expected = {"not-an-image": "cannot read image", "no-photos": "no photos under", "split": "--split do(es) not apply to --task saliency"}
    assert code == 1 and expected[case] in line, line
    assert not (tmp_path / "out").exists()


def test_load_head_refuses_unknown_and_missing(tmp_path, saliency_dir):
    from vitbudget.errors import ConfigError

    with pytest.raises(ConfigError, match="no stored head format for task 'depth'"):
        load_head(saliency_dir, "depth")
    with pytest.raises(ConfigError, match="has no saliency head"):
        load_head(tmp_path, "saliency")


def test_pipeline_is_the_head_on_the_final_normed_patch_tokens(saliency_dir):
    """method -> patch_grid(norm=True) -> head equals the head on model.forward_features' patch tokens (plain forward)."""
    from vitbudget.eval.dense import DensePipeline
    from vitbudget.methods import build_method

    model, head = load_dense_model(saliency_dir)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, _ = DensePipeline(build_method("baseline", model), head)(x)
        tokens = model.forward_features(x)[:, model.num_prefix_tokens:].reshape(2, 16, 16, -1)
        want = head(tokens, (224, 224))
    torch.testing.assert_close(got, want)
