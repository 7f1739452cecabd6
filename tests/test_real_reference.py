"""The committed real reference classifier (models/vits14_cifar10): intact, loadable, and scoring what we measured."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import CIFAR_ARCHIVE, requires_cifar
from vitbudget.cli import main
from vitbudget.data.archive import file_sha256
from vitbudget.models import load_model

MODELS = Path(__file__).resolve().parents[1] / "models"
WEIGHTS = MODELS / "vits14_cifar10.safetensors"


def test_weights_are_the_published_ones():
    """The sha256 quoted in models/README.md is the committed file's (one place for it: the README)."""
    quoted = re.search(r"sha256 `vits14_cifar10.safetensors`: `?([0-9a-f]{64})", (MODELS / "README.md").read_text())
    assert quoted and file_sha256(WEIGHTS) == quoted.group(1)
    assert WEIGHTS.stat().st_size <= 50 * 1024 * 1024


def test_loads_as_a_112_px_vit_s14_classifier_in_float32():
    model = load_model(WEIGHTS)
    cfg = model.cfg
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_classes) == (112, 14, 384, 12, 10)
    assert model.info.classes[:2] == ["airplane", "automobile"]
    assert all(p.dtype.is_floating_point and p.dtype == next(model.parameters()).dtype for p in model.parameters())
    assert json.loads(WEIGHTS.with_suffix(".json").read_text())["weights_dtype"] == "float16"


@pytest.mark.slow
@requires_cifar
def test_top1_on_the_fixed_subset(tmp_path, capsys):
    """A golden value from the full-test run (the same 200 images `--limit 200` always takes)."""
    code = main(["eval", "--model", str(WEIGHTS), "--data", str(CIFAR_ARCHIVE), "--limit", "200", "--no-speed", "--quiet",
                 "--workers", "0", "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    base = json.loads((tmp_path / "o/results.json").read_text())["methods"]["baseline"]
    assert base["top1"] == pytest.approx(90.5, abs=1e-9)  # 181 of the 200; 91.26 % on all 10 000 (2026-12-02)
    assert base["gflops"] == pytest.approx(1.433580288, abs=1e-9)

