"""`vitbudget bench`: named suites and JSON suite files whose entries carry their own checkpoints."""
from __future__ import annotations

import json

import pytest

from conftest import make_model
from vitbudget.cli import main
from vitbudget.eval.suite import SUITES, load_suite
from vitbudget.methods import build_method, save_method
from vitbudget.models import save_model


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


def test_named_suites_load_and_are_valid():
    for name in SUITES:
        assert load_suite(name) == SUITES[name]
