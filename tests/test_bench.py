"""`vitbudget bench`: named suites and JSON suite files whose entries carry their own checkpoints."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from conftest import make_model
from vitbudget import CheckpointError, load_model
from vitbudget.cli import main
from vitbudget.eval.evaluate import Predictions
from vitbudget.eval.suite import SUITES, SuiteEntry, load_suite, run_suite
from vitbudget.methods import build_method, save_method
from vitbudget.models import ViTConfig, save_model
from vitbudget.runtime.cost import dense_macs


@pytest.fixture
def checkpoints(tmp_path):
    base = make_model()
    base.info.classes = [f"class{c:02d}" for c in range(10)]
    plain = save_model(base, tmp_path / "base.safetensors")
    other = make_model(seed=5)
    other.info.classes = base.info.classes
    spot = save_method(build_method("dynamicvit", other, rho=0.5, stages="1"), tmp_path / "dyn.safetensors")
    return plain, spot


def bench(capsys, tmp_path, model, data, *extra):
    argv = ["bench", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"), "--quiet", "--workers", "0", *extra]
    code = main(argv)
    return code, capsys.readouterr()


@pytest.mark.slow
def test_named_suite_runs_seeds_and_tests(tmp_path, capsys, checkpoints, image_folder):
    code, captured = bench(capsys, tmp_path, checkpoints[0], image_folder, "--suite", "abs", "--seeds", "2", "--no-speed", "--limit", "12")
    assert code == 0, captured.err
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["splits"]["test"]["rows"]
    assert list(rows) == [e.label for e in SUITES["abs"]]
    abs_row = rows["ABS (α = 0.2)"]
    assert [r["seed"] for r in abs_row["per_seed"]] == [0, 1] and abs_row["rel_flops"] > 1
    assert len(rows["Multi-Crop"]["per_seed"]) == 1  # deterministic methods run once
    assert rows["Multi-Crop"]["rel_flops"] == pytest.approx(5.0)
    assert 0 <= abs_row["mcnemar_seed0"]["p_value"] <= 1
    assert "| ABS (α = 0.3) | 2 |" in (tmp_path / "out" / "test.md").read_text()
    png = (tmp_path / "out" / "test_pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.slow
def test_suite_file_entries_use_their_own_checkpoints(tmp_path, capsys, checkpoints, image_folder):
    plain, dyn = checkpoints
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"entries": [
        {"label": "Baseline", "method": "baseline"},
        {"label": "DynamicViT", "method": "dynamicvit", "model": str(dyn)},
        {"label": "EViT", "method": "evit", "options": {"rho": 0.5, "stages": "1"}},
        {"label": "Other baseline", "method": "baseline", "model": str(dyn)},
    ]}))
    code, captured = bench(capsys, tmp_path, plain, image_folder, "--suite", str(suite), "--seeds", "1", "--limit", "8",
                           "--latency-repeats", "3", "--throughput-repeats", "2")
    assert code == 0, captured.err
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["splits"]["test"]["rows"]
    assert rows["DynamicViT"]["rel_flops"] < 1 and rows["EViT"]["rel_flops"] < 1
    # the second checkpoint really was loaded: another backbone gives other predictions than --model's
    assert rows["Other baseline"]["per_seed"][0]["nll"] != rows["Baseline"]["per_seed"][0]["nll"]
    assert rows["DynamicViT"]["throughput_ratio"] > 0 and rows["Baseline"]["latency_b1_ms"] > 0
    assert rows["EViT"]["speed_repeats"] == {"latency": 3, "throughput": 2}
    # blocks executed per input token: every token runs all 3 blocks in the baseline, fewer when pruned
    assert rows["Baseline"]["token_depth"] == pytest.approx(3.0)
    assert 1.0 < rows["DynamicViT"]["token_depth"] < 3.0
    assert rows["DynamicViT"]["gflops_p05"] <= rows["DynamicViT"]["gflops"] <= rows["DynamicViT"]["gflops_p95"]


@pytest.mark.parametrize("content, message", [
    ("not json", "is not a suite"),
    ('{"entries": []}', "is not a suite"),
    ('{"entries": [{"label": "a"}]}', 'needs at least "label" and "method"'),
    ('{"entries": [{"label": "a", "method": "bogus"}]}', "unknown method 'bogus'"),
    ('{"entries": [{"label": "a", "method": "abs", "options": {"rho": 0.5}}]}', "do not apply to method 'abs'"),
    ('{"entries": [{"label": "a", "method": "abs", "colour": 1}]}', "unknown key"),
    ('{"entries": [{"label": "a", "method": "baseline", "model": "missing.safetensors"}]}', "not found"),
    ('{"entries": [{"label": "a", "method": "baseline"}, {"label": "a", "method": "depth"}]}', "labels must be unique"),
])
def test_bad_suite_files_fail_before_any_work(tmp_path, capsys, checkpoints, image_folder, content, message):
    suite = tmp_path / "suite.json"
    suite.write_text(content)
    code, captured = bench(capsys, tmp_path, checkpoints[0], image_folder, "--suite", str(suite))
    lines = captured.err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("vitbudget: error:") and message in lines[0], captured.err
    assert not (tmp_path / "out" / "bench.json").exists()


def test_unknown_suite_name_is_a_clear_error(tmp_path, capsys, checkpoints, image_folder):
    code, captured = bench(capsys, tmp_path, checkpoints[0], image_folder, "--suite", "nope")
    assert code == 1 and "neither a named suite" in captured.err


SUITE_FILES = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.json"))


@pytest.mark.parametrize("suite", [*SUITES, *(str(p) for p in SUITE_FILES)], ids=lambda s: Path(s).name)
def test_every_named_and_committed_suite_is_valid(suite):
    """Each entry's method builds, with its options, on a 12-block ViT (so stages 3,6,9 exist); labels are unique."""
    assert len(SUITE_FILES) >= 5
    entries = load_suite(suite, check_files=False)  # committed suites name checkpoints trained later (BENCHMARKS.md)
    assert len({e.label for e in entries}) == len(entries)
    model = make_model(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2, num_classes=10))
    for entry in entries:
        method = build_method(entry.method, model, **{**entry.options, **({"seed": 0} if entry.seeded else {})})
        assert method.name == entry.method
        if entry.model is not None:
            assert entry.model.startswith("runs/") and entry.model.endswith("/model.safetensors"), entry.model


@pytest.mark.slow
def test_suite_numbers_equal_an_independent_evaluation(tmp_path, capsys, checkpoints, image_folder):
    """Each row's per-seed top-1 and NLL equal those of the same method run by hand on the same
    images (one batch, metrics computed here): the suite passes each entry its options, its seed
    and its own checkpoint, and scores the images `--limit` names."""
    from vitbudget.data import EvalTransform, ImageFolder, subset_indices
    from vitbudget.methods import load_method

    plain, dyn = checkpoints
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"entries": [
        {"label": "Baseline", "method": "baseline"},
        {"label": "EViT", "method": "evit", "options": {"rho": 0.5, "stages": "1"}},
        {"label": "ABS", "method": "abs", "options": {"alpha": 0.5}, "seeded": True},
        {"label": "DynamicViT", "method": "dynamicvit", "model": str(dyn)},
    ]}))
    code, captured = bench(capsys, tmp_path, plain, image_folder, "--suite", str(suite), "--seeds", "2", "--limit", "12", "--no-speed")
    assert code == 0, captured.err
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["splits"]["test"]["rows"]
    base = make_model()
    data = ImageFolder(image_folder, "test", EvalTransform(32, base.info.preprocess), label_names=[f"class{c:02d}" for c in range(10)])
    pairs = [data[i] for i in subset_indices(len(data), 12)]
    images, labels = torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])
    by_hand = {
        ("Baseline", None): build_method("baseline", base), ("EViT", None): build_method("evit", base, rho=0.5, stages="1"),
        ("ABS", 0): build_method("abs", base, alpha=0.5, seed=0), ("ABS", 1): build_method("abs", base, alpha=0.5, seed=1),
        ("DynamicViT", None): load_method(dyn, "dynamicvit"),
    }
    seen = {}
    for (label, seed), method in by_hand.items():
        with torch.no_grad():
            logits = method.eval()(images).logits.double()
        [row] = [r for r in rows[label]["per_seed"] if r["seed"] == seed]
        seen[label, seed] = row["top1"]
        assert row["top1"] == pytest.approx(100 * float((logits.argmax(1) == labels).double().mean()), abs=1e-9), (label, seed)
        assert row["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5), (label, seed)
    assert len({rows[label]["per_seed"][0]["nll"] for label in ("Baseline", "EViT", "ABS", "DynamicViT")}) == 4  # four different models


def test_committed_suite_with_missing_checkpoints_fails_up_front():
    with pytest.raises(CheckpointError, match=r"entry \d+ .*checkpoint 'runs/.*model.safetensors' not found"):
        load_suite(str(SUITE_FILES[0]))


def _scripted_predictions(correct: dict[str, list[int]]):
    """A stand-in for eval.evaluate.predict: the images each (label, seed) gets right, as scripted."""
    def predict(method, dataset, indices, *args, desc="", **kwargs):
        right = torch.tensor(correct[desc], dtype=torch.bool)
        logits = torch.nn.functional.one_hot((~right).long(), 10).float() * 5  # class 0 when right, class 1 when wrong
        macs = torch.full((len(right),), dense_macs(method.base_cfg), dtype=torch.float64)
        return Predictions(logits, torch.zeros(len(right), dtype=torch.long), macs, float(macs[0]), torch.full((len(right),), 3.0, dtype=torch.float64))
    return predict


@pytest.mark.slow
def test_run_suite_statistics_and_speed_wiring(tmp_path, checkpoints, image_folder, monkeypatch):
    """p-values, gains and speed ratios from scripted predictions and a fake clock, checked against hand computations."""
    from test_metrics import FakeClock

    from vitbudget.data import EvalTransform, ImageFolder
    from vitbudget.eval import speed, suite

    correct = {
        "Baseline s0": [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        "ABS s0": [0, 1, 1, 1, 1, 1, 1, 1, 0, 0], "ABS s1": [1] * 6 + [0] * 4, "ABS s2": [1] * 8 + [0] * 2, "ABS s3": [1] * 6 + [0] * 4,
        "EViT s0": [1] * 4 + [0] * 6,
    }
    monkeypatch.setattr(suite, "predict", _scripted_predictions(correct))
    lat = {"Baseline": [0.010, 0.012, 0.011], "ABS": [0.015, 0.013, 0.020], "EViT": [0.008, 0.009, 0.007]}
    thr = {"Baseline": [0.1, 0.2, 0.1], "ABS": [0.2, 0.2, 0.3], "EViT": [0.05, 0.1, 0.1]}
    clock = FakeClock([t[r] for phase in (lat, thr) for r in range(3) for t in phase.values()])  # round-robin order
    monkeypatch.setattr(speed, "time", clock)
    entries = [SuiteEntry("Baseline", "baseline"), SuiteEntry("ABS", "abs", {"alpha": 0.2}, seeded=True), SuiteEntry("EViT", "evit", {"rho": 0.5, "stages": "1"})]
    dataset = ImageFolder(image_folder, "test", EvalTransform(32, load_model(checkpoints[0]).info.preprocess))
    rows = run_suite(entries, checkpoints[0], dataset, list(range(10)), seeds=[0, 1, 2, 3], workers=0, progress=False,
                     latency_repeats=3, throughput_repeats=3)["rows"]
    assert not clock.durations  # every scripted duration was used, in the order assumed above
    abs_, evit = rows["ABS"], rows["EViT"]
    assert [r["top1"] for r in abs_["per_seed"]] == [70, 60, 80, 60] and abs_["top1_mean"] == 67.5
    assert abs_["top1_std"] == pytest.approx(float(np.std([70, 60, 80, 60], ddof=1)))
    assert abs_["top1_gain"] == 17.5 and evit["top1_gain"] == -10.0
    d = np.array([20.0, 10.0, 30.0, 10.0])  # ABS per seed minus the (deterministic) baseline
    t = d.mean() / (d.std(ddof=1) / math.sqrt(4))
    assert abs_["p_ttest_seeds"] == pytest.approx(2 * scipy_stats.t.sf(t, df=3), rel=1e-10) and evit["p_ttest_seeds"] is None
    assert abs_["mcnemar_seed0"] == {"only_a": 3, "only_b": 1, "p_value": pytest.approx(2 * (1 + 4) / 16)}  # exact, n = 4
    assert evit["mcnemar_seed0"] == {"only_a": 0, "only_b": 1, "p_value": pytest.approx(1.0)}
    assert rows["Baseline"]["latency_b1_ms"] == pytest.approx(11.0) and abs_["latency_b1_ms"] == pytest.approx(15.0)
    assert abs_["latency_ratio"] == pytest.approx(1.5) and evit["latency_ratio"] == pytest.approx(0.75)  # medians of per-round ratios
    assert abs_["latency_overhead_pct"] == pytest.approx(50.0) and evit["latency_overhead_pct"] == pytest.approx(-25.0)
    assert abs_["gain_per_ms"] == pytest.approx(17.5 / 4.0) and evit["gain_per_ms"] is None  # EViT spends no extra time
    assert abs_["throughput_ratio"] == pytest.approx(0.5) and evit["throughput_ratio"] == pytest.approx(2.0)
    assert abs_["throughput_b10"] == pytest.approx(10 / 0.2) and rows["Baseline"]["throughput_b10"] == pytest.approx(10 / 0.1)


@pytest.mark.slow
def test_bench_splits_are_checked_and_published_together(tmp_path, capsys, checkpoints, image_folder):
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"entries": [{"label": "Baseline", "method": "baseline"}, {"label": "Depth", "method": "depth"}]}))
    for bad in (",", "test,,train", "test,test"):
        with pytest.raises(SystemExit) as exc:
            bench(capsys, tmp_path, checkpoints[0], image_folder, "--suite", str(suite), "--split", bad)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("vitbudget: error: argument --split:"), err
    broken = tmp_path / "data"
    shutil.copytree(image_folder, broken)
    (broken / "train/class03/1.png").write_bytes(b"not a png")  # the second split fails after the first was evaluated
    code, captured = bench(capsys, tmp_path, checkpoints[0], broken, "--suite", str(suite), "--split", "test,train", "--no-speed")
    assert code == 1 and "cannot read image" in captured.err and not (tmp_path / "out").exists()
    code, captured = bench(capsys, tmp_path, checkpoints[0], image_folder, "--suite", str(suite), "--split", "test,train", "--no-speed", "--limit", "4")
    assert code == 0, captured.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "summary.md", "test.md", "test_pareto.png", "train.md", "train_pareto.png"]


def test_suite_entries_must_share_the_models_classes(tmp_path, capsys, checkpoints, image_folder):
    other = make_model(seed=3)
    other.info.classes = [f"other{c}" for c in range(10)]
    ckpt = save_model(other, tmp_path / "other.safetensors")
    suite_file = tmp_path / "suite.json"
    suite_file.write_text(json.dumps({"entries": [{"label": "Baseline", "method": "baseline"}, {"label": "Other", "method": "baseline", "model": str(ckpt)}]}))
    code, captured = bench(capsys, tmp_path, checkpoints[0], image_folder, "--suite", str(suite_file), "--no-speed")
    assert code == 1 and "suite entry 'Other': checkpoint" in captured.err and "top-1 would not be comparable" in captured.err
