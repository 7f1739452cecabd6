"""The tuner (eval.tune, `vitbudget tune`), run-config files (`--config`) and the Pareto plot."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY, make_model, write_image_folder

import vitbudget.data.folder as folder
import vitbudget.eval.tune as tune_module
from vitbudget import CheckpointError, ConfigError
from vitbudget.cli import main
from vitbudget.data import subset_indices
from vitbudget.eval.tune import default_candidates, holdout_indices, recommend, tome_rs
from vitbudget.models import ViTConfig, save_model
from vitbudget.report.pareto import pareto_figure, pareto_front
from vitbudget.runconfig import RunConfig, read_run_config, write_run_config


@pytest.fixture
def checkpoint(tmp_path):
    m = make_model()
    m.info.classes = [f"class{c:02d}" for c in range(10)]
    return save_model(m, tmp_path / "tiny.safetensors")


@pytest.fixture
def train_only(tmp_path):
    """A train split, and a test split whose every file is unreadable: reading it would fail the run."""
    root = write_image_folder(tmp_path / "data", splits=("train",), per_class=3)
    for c in range(10):
        bad = root / "test" / f"class{c:02d}"
        bad.mkdir(parents=True)
        (bad / "0.png").write_bytes(b"not an image")
    return root


def tune_cli(capsys, tmp_path, model, data, *extra):
    argv = ["tune", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "tune"), "--holdout", "12", "--repeats", "2",
            "--warmup", "0", "--methods", "tome", "--workers", "0", "--quiet", "--eval-batch-size", "8", *extra]
    code = main(argv)
    return code, capsys.readouterr()


# -- the held-out images -------------------------------------------------------------------------------
def test_tuner_never_reads_the_test_split(tmp_path, capsys, checkpoint, train_only, monkeypatch):
    opened, read = [], []
    real_init, real_read = folder.ImageFolder.__init__, folder.read_image

    def spy_init(self, root, split=None, transform=None):
        opened.append(split)
        real_init(self, root, split, transform)

    def spy_read(path):
        read.append(str(path))
        return real_read(path)

    monkeypatch.setattr(folder.ImageFolder, "__init__", spy_init)
    monkeypatch.setattr(folder, "read_image", spy_read)
    code, captured = tune_cli(capsys, tmp_path, checkpoint, train_only, "--target-flops", "0.9", "--no-stacks")
    assert code == 0, captured.err
    assert opened == ["train"] and read and all("/train/" in p for p in read)
    code, captured = tune_cli(capsys, tmp_path, checkpoint, train_only, "--target-flops", "0.9", "--split", "test")
    assert code == 1 and "never reads the test split" in captured.err


def test_holdout_is_fixed_and_disjoint_from_training_subsets():
    n = 1000
    held = holdout_indices(n, 100)
    assert held == holdout_indices(n, 100) and len(set(held)) == 100 and held == sorted(held)
    assert not set(held) & set(subset_indices(n, n - 100))  # recipes' --train-limit subsets: the first L of the same permutation
    assert holdout_indices(10, 50) == list(range(10))
    with pytest.raises(ConfigError):
        holdout_indices(10, 0)


def test_candidate_grid():
    assert tome_rs(64, 12) == [1, 2, 3, 4, 5]  # the reference model: 64 patches, 12 blocks
    assert tome_rs(196, 12) == [3, 7, 10, 13, 16]  # ViT/DeiT at 224 px: ToMe's published r = 13, 16 are in the grid
    cands = default_candidates(TINY, families=["evit", "tome"], stack_alpha=0.3, checkpoints=[("/x/spot/model.safetensors", "spot")])
    labels = [c.label for c in cands]
    assert labels[0] == "Baseline" and len(labels) == len(set(labels))
    assert sum(c.method == "evit" for c in cands) == 5 and sum(c.method == "evit+abs" for c in cands) == 5
    assert [c.options["r"] for c in cands if c.method == "tome"] == tome_rs(16, 3)
    assert {c.options["alpha"] for c in cands if c.method.endswith("+abs")} == {0.3}
    assert [(c.method, c.model) for c in cands if c.model] == [("spot", "/x/spot/model.safetensors"), ("spot+abs", "/x/spot/model.safetensors")]
    assert not any(c.method.endswith("+abs") for c in default_candidates(TINY, stacks=False))
    with pytest.raises(ConfigError, match="cannot be swept"):
        default_candidates(TINY, families=["spot"])
    new = default_candidates(TINY, families=["pitome", "tofu", "thresh"], stacks=False)
    assert [c.options["ratio"] for c in new if c.method == "pitome"] == [0.975, 0.95, 0.925, 0.9, 0.875]
    assert [c.options["r"] for c in new if c.method == "tofu"] == tome_rs(16, 3)
    assert [c.options["thr0"] for c in new if c.method == "thresh"] == [0.95, 0.9, 0.85, 0.8, 0.75]
    assert {c.method for c in default_candidates(TINY)} >= {"pitome+abs", "tofu+abs", "thresh+abs"}


# -- the recommendation ----------------------------------------------------------------------------------
def test_recommend_is_the_most_accurate_candidate_that_meets_the_target():
    rows = {
        "Baseline": {"top1_mean": 60.0, "speedup": 1.0, "rel_flops": 1.0},
        "a": {"top1_mean": 59.5, "speedup": 1.45, "rel_flops": 0.6},
        "b": {"top1_mean": 59.0, "speedup": 1.6, "rel_flops": 0.55},
        "c": {"top1_mean": 58.0, "speedup": 1.9, "rel_flops": 0.4},
        "d": {"top1_mean": 59.0, "speedup": 1.7, "rel_flops": 0.5},
    }
    for target, flops, expected in [(1.5, None, "d"), (1.0, None, "Baseline"), (1.8, None, "c"), (None, 0.58, "d"), (1.75, 0.45, "c"), (2.5, None, None)]:
        for r in rows.values():
            r["meets"] = tune_module.meets(r, target, flops)
        assert recommend(rows, target, flops) == expected, (target, flops)


def test_recommendation_meets_its_target_in_the_tuners_own_measurements(tmp_path, capsys, checkpoint, image_folder):
    # a speed target any candidate meets even on a loaded machine (the logic of speed targets: test_recommend_...)
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-speedup", "0.05", "--target-flops", "0.8")
    assert code == 0, captured.err
    result = json.loads((tmp_path / "tune" / "tune.json").read_text())
    rows, chosen = result["rows"], result["recommended"]
    speed = result["target_speedup"] or 0.0
    flops = result["target_flops"] or float("inf")
    assert rows[chosen]["speedup"] >= speed and rows[chosen]["rel_flops"] <= flops and rows[chosen]["meets"]
    meeting = [r for r in rows.values() if r["speedup"] >= speed and r["rel_flops"] <= flops]
    assert rows[chosen]["top1_mean"] == max(r["top1_mean"] for r in meeting)
    assert rows["Baseline"]["speedup"] == 1.0 and rows["Baseline"]["rel_flops"] == 1.0
    assert all(r["fraction_of_ideal"] == pytest.approx(r["speedup"] * r["rel_flops"]) for r in rows.values())
    assert len(rows) == 11  # baseline + ToMe's 5 settings + their 5 stacks
    config = read_run_config(tmp_path / "tune" / "config.json")
    assert (config.method, config.options) == (rows[chosen]["method"], rows[chosen]["options"])
    assert config.batch_size == 1 and config.notes["label"] == chosen
    assert "(recommended)" in (tmp_path / "tune" / "tune.md").read_text()
    assert (tmp_path / "tune" / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "tune" / ".tune_state.json").exists()


def test_no_candidate_meets_the_target(tmp_path, capsys, checkpoint, image_folder):
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "config.json").write_text("{}")  # from an earlier run: must not survive
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "0.01", "--methods", "")
    lines = captured.err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("vitbudget: error: no candidate meets the target"), captured.err
    assert (tmp_path / "tune" / "tune.md").is_file() and not (tmp_path / "tune" / "config.json").exists()


def test_a_killed_tuner_resumes_its_accuracy(tmp_path, capsys, checkpoint, image_folder, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_module, "measure_speedups", killed)
    code, _ = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "0.8", "--no-stacks")
    assert code == 130
    state = json.loads((tmp_path / "tune" / ".tune_state.json").read_text())
    assert len(state["done"]) == 6
    monkeypatch.undo()

    def no_more(*args, **kwargs):
        raise AssertionError("accuracy should come from the saved state")

    monkeypatch.setattr(tune_module, "predict", no_more)
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "0.8", "--no-stacks")
    assert code == 0, captured.err
    monkeypatch.undo()
    rows = json.loads((tmp_path / "tune" / "tune.json").read_text())["rows"]
    code, _ = tune_cli(capsys, tmp_path / "again", checkpoint, image_folder, "--target-flops", "0.8", "--no-stacks")
    again = json.loads((tmp_path / "again" / "tune" / "tune.json").read_text())["rows"]
    assert {k: r["top1_mean"] for k, r in rows.items()} == {k: r["top1_mean"] for k, r in again.items()}


def test_tune_bad_input(tmp_path, capsys, checkpoint, image_folder):
    for extra, message in [([], "give a target"), (["--target-speedup", "-1"], "positive"), (["--target-flops", "0.5", "--checkpoint", "nope.safetensors"], "not found"),
                           (["--target-flops", "0.5", "--methods", "spot"], "cannot be swept"),
                           (["--target-speedup", "1.2", "--no-speed"], "needs the speed measurement"),
                           (["--target-flops", "0.5", "--stack-alpha", "2"], "--alpha must be in")]:
        code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, *extra)
        lines = captured.err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and message in lines[0], (extra, captured.err)


# -- run-config files ----------------------------------------------------------------------------------------
def test_config_round_trips_and_resolves_relative_paths(tmp_path, checkpoint):
    config = RunConfig("tome+abs", {"r": 2, "alpha": 0.25}, model=str(checkpoint), batch_size=4, device="cpu", notes={"speedup": 1.4})
    path = write_run_config(tmp_path / "c.json", config)
    assert read_run_config(path) == config
    raw = json.loads(path.read_text())
    raw["model"] = checkpoint.name  # relative to the file's folder
    (tmp_path / "rel.json").write_text(json.dumps(raw))
    assert read_run_config(tmp_path / "rel.json").model == str(tmp_path / checkpoint.name)


@pytest.mark.parametrize("change, error, message", [
    ({"colour": 1}, ConfigError, "unknown key"),
    ({"format": "other"}, ConfigError, "not a vitbudget run config"),
    ({"version": 2}, ConfigError, "version"),
    ({"method": "nope"}, ConfigError, "unknown method 'nope'"),
    ({"options": {"rho": 0.5}}, ConfigError, "do not apply"),
    ({"options": {"alpha": 7}}, ConfigError, "--alpha must be in"),
    ({"model": "missing.safetensors"}, CheckpointError, "not found"),
    ({"batch_size": 0}, ConfigError, "batch_size"),
])
def test_bad_config_files(tmp_path, checkpoint, change, error, message):
    raw = {**RunConfig("tome+abs", {"r": 2}, model=str(checkpoint)).to_dict(), **change}
    (tmp_path / "c.json").write_text(json.dumps(raw))
    with pytest.raises(error, match=message):
        read_run_config(tmp_path / "c.json")


def test_eval_and_bench_take_a_config(tmp_path, capsys, checkpoint, image_folder):
    config = write_run_config(tmp_path / "c.json", RunConfig("tome+abs", {"r": 2, "alpha": 0.25}, model=str(checkpoint)))
    common = ["--data", str(image_folder), "--quiet", "--workers", "0", "--no-speed", "--limit", "16"]

    def results(out, *argv):
        assert main(["eval", "--out", str(tmp_path / out), *common, *argv]) == 0, capsys.readouterr().err
        return json.loads((tmp_path / out / "results.json").read_text())["methods"]

    from_file = results("a", "--config", str(config))
    explicit = results("b", "--model", str(checkpoint), "--method", "tome+abs", "--r", "2", "--alpha", "0.25")
    assert from_file == explicit
    overridden = results("c", "--config", str(config), "--r", "1")  # a flag given wins over the file
    assert overridden["tome+abs"]["r"] == 1 and overridden["tome+abs"]["alpha"] == 0.25
    replaced = results("d", "--config", str(config), "--method", "evit", "--stages", "1")  # an explicit method replaces the file's
    assert set(replaced) == {"baseline", "evit"}
    assert main(["bench", "--config", str(config), "--seeds", "2", "--out", str(tmp_path / "bench"), *common]) == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["splits"]["test"]["rows"]
    label = "ToMe + ABS r 2, α 0.25 (config)"
    assert list(rows) == ["Baseline", label] and [r["seed"] for r in rows[label]["per_seed"]] == [0, 1]
    assert rows[label]["top1_mean"] == pytest.approx(np.mean([r["top1"] for r in rows[label]["per_seed"]]))


# -- the Pareto plot --------------------------------------------------------------------------------------
def test_pareto_front():
    pts = [(1.0, 60.0), (0.6, 60.1), (0.5, 59.0), (0.7, 59.5), (0.4, 58.0), (0.45, 57.0)]
    assert pareto_front(pts, lower_x_is_better=True) == [4, 2, 1]
    assert pareto_front([(1.0, 60.0), (1.5, 59.0), (1.4, 58.0), (2.0, 55.0)], lower_x_is_better=False) == [0, 1, 3]


def crowded_rows():
    rows = {"Baseline": {"method": "baseline", "options": {}, "rel_flops": 1.0, "top1_mean": 60.0, "speedup": 1.0}}
    g = np.random.default_rng(0)
    for method, key, values in [("evit", "rho", [0.5, 0.6, 0.7, 0.8, 0.9]), ("spot_heuristic", "rho", [0.5, 0.6, 0.7, 0.8, 0.9]),
                                ("tome", "r", [1, 2, 3, 4, 5]), ("tome+abs", "r", [1, 2, 3, 4, 5])]:
        for v in values:
            f = 0.4 + 0.12 * values.index(v) + 0.01 * g.standard_normal()
            rows[f"{method} {v}"] = {"method": method, "options": {key: v}, "rel_flops": f, "top1_mean": 55 + 5 * f + 0.3 * g.standard_normal(),
                                     "speedup": 1 / f * 0.9}
    rows["SPOT"] = {"method": "spot", "options": {}, "model": "runs/ft/spot/model.safetensors", "rel_flops": 0.66, "top1_mean": 58.0, "speedup": 1.3}
    return rows


def test_pareto_plot_families_front_baseline_and_labels_that_do_not_overlap():
    import matplotlib.pyplot as plt

    rows = crowded_rows()
    fig, axes, texts = pareto_figure(rows, speed_key="speedup", target_speedup=1.5, highlight="tome 3")
    assert len(axes) == 2 and axes[1].get_xlabel().startswith("measured speed-up")
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0].startswith("baseline") and "Pareto front" in legend
    assert {"EViT", "SPOT heuristic", "ToMe", "ToMe + ABS", "SPOT (spot)"} <= set(legend)
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        family_lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 5]
        assert len(family_lines) == 4  # one line per family with several points, each ordered by x
        assert all(np.all(np.diff(line.get_xdata()) >= 0) for line in family_lines)
        looks = {(str(line.get_color()), line.get_linestyle()) for line in family_lines}
        assert len(looks) == 4  # every family looks different; a stack takes its reducer's colour, dashed
        tome, stack = (next(line for line in family_lines if line.get_gid() == name) for name in ("ToMe", "ToMe + ABS"))
        assert str(tome.get_color()) == str(stack.get_color()) and (tome.get_linestyle(), stack.get_linestyle()) == ("-", "--")
        boxes = [t.get_window_extent(renderer) for t in texts[ax]]
        assert len(boxes) == 20  # every setting labelled; the single-point family is named by the legend
        for i in range(len(boxes)):
            for j in range(i):
                assert not boxes[i].overlaps(boxes[j]), (texts[ax][i].get_text(), texts[ax][j].get_text())
        assert any(abs(line.get_ydata()[0] - 60.0) < 1e-9 and line.get_linestyle() == ":" for line in ax.get_lines())  # baseline
    plt.close(fig)
    fig, axes, _ = pareto_figure({k: {kk: vv for kk, vv in r.items() if kk != "speedup"} for k, r in rows.items()})
    assert len(axes) == 1  # no speed measured: the FLOPs panel only
    plt.close(fig)


def test_bench_pareto_without_speed_is_written(tmp_path, capsys, checkpoint, image_folder):
    code = main(["bench", "--suite", "abs-short", "--model", str(checkpoint), "--data", str(image_folder), "--out", str(tmp_path / "b"),
                 "--quiet", "--workers", "0", "--no-speed", "--limit", "8", "--seeds", "1"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "b" / "test_pareto.png").read_bytes().startswith(b"\x89PNG")


def test_tune_skips_families_that_do_not_apply(tmp_path, capsys, image_folder):
    m = make_model(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=10, class_token=False, global_pool="avg"))
    m.info.classes = [f"class{c:02d}" for c in range(10)]
    path = save_model(m, tmp_path / "avg.safetensors")
    code, captured = tune_cli(capsys, tmp_path, path, image_folder, "--target-flops", "0.9", "--methods", "evit,tome", "--no-stacks", "--no-speed")
    assert code == 0, captured.err
    result = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert all(r["speedup"] is None for r in result["rows"].values())  # --no-speed: a FLOPs-only answer
    assert read_run_config(tmp_path / "tune" / "config.json").batch_size is None
    assert any(k.startswith("EViT") for k in result["skipped"]) and not any(k.startswith("EViT") for k in result["rows"])
    assert "Not applicable to this model" in (tmp_path / "tune" / "tune.md").read_text()


def test_speedup_is_baseline_time_over_candidate_time():
    """Round-robin timing of callables with known costs: a candidate 6x quicker than the baseline reads well above 1
    (sleep wake-up latency on a loaded machine pulls the ratio down, never below ~2)."""
    import time

    def sleeper(seconds):
        def fn(x):
            time.sleep(seconds)
        return fn

    dataset = [(torch.zeros(3, 4, 4), 0)] * 4
    speed = tune_module.measure_speedups({"Baseline": sleeper(0.03), "fast": sleeper(0.005)}, dataset, range(4), batch_size=1,
                                         device="cpu", repeats=5, warmup=0, progress=False)
    assert speed["Baseline"]["speedup"] == 1.0
    assert 2.0 < speed["fast"]["speedup"] < 6.5
    assert speed["fast"]["speedup_q25"] <= speed["fast"]["speedup"] <= speed["fast"]["speedup_q75"]
    assert speed["fast"]["latency_ms"] < speed["Baseline"]["latency_ms"]
