"""The tuner (eval.tune, `vitbudget tune`), run-config files (`--config`) and the Pareto plot."""
from __future__ import annotations

import errno
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, make_model, requires_transformers, write_image_folder

import vitbudget.data.folder as folder
import vitbudget.eval.tune as tune_module
from vitbudget import CheckpointError, ConfigError
from vitbudget.cli import main
from vitbudget.data import subset_indices
from vitbudget.devices import out_of_memory
from vitbudget.eval.latency_model import LatencyModel
from vitbudget.eval.tune import checkpoint_names, default_candidates, holdout_indices, recommend, tome_rs
from vitbudget.models import ViTConfig, save_model
from vitbudget.report.pareto import pareto_figure, pareto_front
from vitbudget.runconfig import RunConfig, read_run_config, write_run_config


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
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse refused a flag's value
        code = exc.code
    return code, capsys.readouterr()


def inject_timings(monkeypatch, seconds):
    """The tuner's timer replaced: `seconds(label, round)` is what a candidate takes in that round (tests never time)."""
    rounds = itertools.count()

    def timer(fns, inputs, warmup=3, repeats=20):
        times = {name: [] for name in fns}
        for r in itertools.islice(rounds, repeats):
            for name in fns:
                times[name].append(seconds(name, r))
        return times

    monkeypatch.setattr(tune_module, "time_interleaved", timer)


def save_classifier(path, seed=0, favourite=None):
    """A tiny checkpoint naming the toy data's classes; `favourite`: it predicts that class for every image."""
    m = make_model(seed=seed)
    m.info.classes = [f"class{c:02d}" for c in range(10)]
    if favourite is not None:
        with torch.no_grad():
            m.head.weight.zero_()
            m.head.bias.zero_()
            m.head.bias[favourite] = 1.0
    return save_model(m, path)


LINEAR = LatencyModel(tuple(1e-3 * n for n in range(1, 18)), 0.0, 1)  # a block costs its token count: speed-up = 1 / rel. tokens


@pytest.fixture(autouse=True)
def linear_latency_model(monkeypatch):
    """The tuner's latency model replaced by a fixed curve: which candidates get timed never depends on this machine."""
    monkeypatch.setattr(tune_module, "load_or_measure", lambda model, batch, device, progress=True: (LINEAR, True))


def one_error_line(code, captured, message, exit_code=1):
    lines = captured.err.strip().splitlines()
    assert code == exit_code and len(lines) == 1 and lines[0].startswith("vitbudget: error: ") and message in lines[0], captured.err


# -- the held-out images -------------------------------------------------------------------------------
@pytest.mark.slow
def test_tuner_never_reads_the_test_split(tmp_path, capsys, checkpoint, train_only, monkeypatch):
    opened, read = [], []
    real_init, real_read = folder.ImageFolder.__init__, folder.read_image

    def spy_init(self, root, split=None, transform=None, **kwargs):
        opened.append(split)
        real_init(self, root, split, transform, **kwargs)

    def spy_read(path):
        read.append(str(path))
        return real_read(path)

    monkeypatch.setattr(folder.ImageFolder, "__init__", spy_init)
    monkeypatch.setattr(folder, "read_image", spy_read)
    inject_timings(monkeypatch, lambda label, r: 1.0 if label == "Baseline" else 0.5)  # the timing batches are still read
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


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_holdout_is_disjoint_from_what_train_trains_on_at_any_seed(tmp_path, image_folder, seed):
    """The images `train --seed S --train-limit L` trains on are the seed-0 subset whatever S (seed 0's are pinned in
    test_data), so tune's hold-out (the other N - L) never contains one of them."""
    from vitbudget.train import Trainer, get_recipe

    n, limit = 40, 30  # image_folder: 10 classes x 4 training images
    trainer = Trainer(get_recipe("smoke", seed=seed, train_limit=limit), image_folder, tmp_path / "run", workers=0, progress=False)
    assert len(trainer.train_set) == n and sorted(trainer.train_indices) == subset_indices(n, limit)
    assert not set(trainer.train_indices) & set(holdout_indices(n, n - limit))


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
    assert [c.options["thr0"] for c in new if c.method == "thresh"] == [0.998, 0.995, 0.99, 0.95, 0.9, 0.8]
    assert {c.method for c in default_candidates(TINY)} >= {"pitome+abs", "tofu+abs", "thresh+abs"}


# -- the recommendation ----------------------------------------------------------------------------------
def test_recommend_is_the_most_accurate_candidate_that_meets_the_target():
    rows = {
        "Baseline": {"top1_mean": 60.0, "speedup": 1.0, "rel_flops": 1.0},
        "a": {"top1_mean": 59.5, "speedup": 1.45, "rel_flops": 0.6},
        "b": {"top1_mean": 59.0, "speedup": 1.6, "rel_flops": 0.55},
        "c": {"top1_mean": 58.0, "speedup": 1.9, "rel_flops": 0.4},
        "d": {"top1_mean": 59.0, "speedup": 1.7, "rel_flops": 0.5},
        "slow": {"top1_mean": 65.0, "speedup": 0.95, "rel_flops": 0.5, "slower_than_baseline": True},  # the most accurate, never chosen
    }
    for target, flops, expected in [(1.5, None, "d"), (1.0, None, "Baseline"), (1.8, None, "c"), (None, 0.58, "d"), (1.75, 0.45, "c"), (2.5, None, None),
                                     (0.9, None, "Baseline")]:
        for r in rows.values():
            r["meets"] = tune_module.meets(r, target, flops)
        assert recommend(rows, target, flops) == expected, (target, flops)


@pytest.mark.slow
def test_recommendation_meets_its_target_in_the_tuners_own_measurements(tmp_path, capsys, checkpoint, image_folder, monkeypatch):
    inject_timings(monkeypatch, lambda label, r: 1.0 if label == "Baseline" else 0.5 + 0.01 * (len(label) + r % 3))
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-speedup", "1.5", "--target-flops", "0.8", "--time-all")
    assert code == 0, captured.err
    result = json.loads((tmp_path / "tune" / "tune.json").read_text())
    rows, chosen = result["rows"], result["recommended"]
    assert rows[chosen]["speedup"] >= 1.5 and rows[chosen]["rel_flops"] <= 0.8 and rows[chosen]["meets"]
    meeting = [r for r in rows.values() if r["speedup"] is not None and r["speedup"] >= 1.5 and r["rel_flops"] <= 0.8]
    assert rows[chosen]["top1_mean"] == max(r["top1_mean"] for r in meeting)
    assert rows["Baseline"]["speedup"] == 1.0 and rows["Baseline"]["rel_flops"] == 1.0
    assert all(r["fraction_of_ideal"] == pytest.approx(r["speedup"] * r["rel_flops"]) for r in rows.values() if r["timed"])
    assert len(rows) == 11  # baseline + ToMe's 5 settings + their 5 stacks
    config = read_run_config(tmp_path / "tune" / "config.json")
    assert (config.method, config.options) == (rows[chosen]["method"], rows[chosen]["options"])
    assert config.batch_size == 1 and config.notes["label"] == chosen
    assert "(recommended)" in (tmp_path / "tune" / "tune.md").read_text()
    assert (tmp_path / "tune" / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "tune" / ".tune_state.json").exists()


@pytest.mark.slow
def test_a_candidate_slower_than_the_baseline_is_never_recommended(tmp_path, capsys, checkpoint, image_folder, monkeypatch):
    code, captured = tune_cli(capsys, tmp_path / "flops", checkpoint, image_folder, "--target-flops", "0.9", "--no-stacks", "--no-speed")
    assert code == 0, captured.err
    favourite = json.loads((tmp_path / "flops" / "tune" / "tune.json").read_text())["recommended"]
    assert favourite != "Baseline"
    inject_timings(monkeypatch, lambda label, r: {"Baseline": 1.0, favourite: 1.25}.get(label, 0.5))  # the favourite: 0.8x
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "0.9", "--no-stacks")  # a FLOPs target only
    assert code == 0, captured.err
    result = json.loads((tmp_path / "tune" / "tune.json").read_text())
    rows = result["rows"]
    assert rows[favourite]["speedup"] == 0.8 and rows[favourite]["slower_than_baseline"] is True and rows[favourite]["meets"]
    assert [k for k, r in rows.items() if r["slower_than_baseline"]] == [favourite]
    others = {k: r for k, r in rows.items() if k != favourite and r["rel_flops"] <= 0.9}
    assert result["recommended"] == max(others, key=lambda k: (others[k]["top1_mean"], -others[k]["rel_flops"]))
    line = next(x for x in (tmp_path / "tune" / "tune.md").read_text().splitlines() if x.startswith(f"| {favourite} |"))
    assert "yes; slower than the unmodified model: not recommended" in line


def test_no_candidate_meets_the_target_publishes_nothing(tmp_path, capsys, checkpoint, image_folder):
    out = tmp_path / "tune"
    out.mkdir()
    earlier = {name: f"earlier run's {name}" for name in ("tune.json", "tune.md", "pareto.png", "config.json")}
    for name, text in earlier.items():
        (out / name).write_text(text)
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "0.01", "--methods", "")
    one_error_line(code, captured, "no candidate meets the target")
    assert "nothing written" in captured.err and "| Baseline |" in captured.out  # the table is printed
    assert {name: (out / name).read_text() for name in earlier} == earlier
    assert sorted(p.name for p in out.iterdir()) == sorted([*earlier, ".tune_state.json"])  # accuracy kept for a rerun


def test_a_full_disk_publishes_nothing(tmp_path, capsys, checkpoint, image_folder, monkeypatch):
    import vitbudget.runconfig

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "tune"
    out.mkdir()
    (out / "tune.md").write_text("earlier")
    monkeypatch.setattr(vitbudget.runconfig, "write_run_config", no_space)  # the last of the four files fails
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "1.0", "--methods", "", "--no-speed")
    one_error_line(code, captured, "No space left on device; nothing was published")
    assert sorted(p.name for p in out.iterdir()) == [".tune_state.json", "tune.md"] and (out / "tune.md").read_text() == "earlier"


@pytest.mark.slow
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
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "0.8", "--no-stacks", "--no-speed")
    assert code == 0, captured.err
    monkeypatch.undo()
    rows = json.loads((tmp_path / "tune" / "tune.json").read_text())["rows"]
    code, _ = tune_cli(capsys, tmp_path / "again", checkpoint, image_folder, "--target-flops", "0.8", "--no-stacks", "--no-speed")
    again = json.loads((tmp_path / "again" / "tune" / "tune.json").read_text())["rows"]
    assert {k: r["top1_mean"] for k, r in rows.items()} == {k: r["top1_mean"] for k, r in again.items()}


def test_tune_bad_input(tmp_path, capsys, checkpoint, image_folder):
    for extra, message in [([], "give a target"), (["--target-speedup", "-1"], "positive"), (["--target-flops", "0.5", "--checkpoint", "nope.safetensors"], "not found"),
                           (["--target-flops", "0.5", "--methods", "spot"], "cannot be swept"),
                           (["--target-speedup", "1.2", "--no-speed"], "needs the speed measurement"),
                           (["--target-flops", "0.5", "--stack-alpha", "2"], "--alpha must be in"),
                           (["--target-flops", "0.5", "--batch-size", "100000000"], "--batch-size 100000000 exceeds the 12 held-out images")]:
        code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, *extra)
        one_error_line(code, captured, message)
    for extra, message in [(["--device", "banana"], "unknown device 'banana'"), (["--eval-batch-size", "0"], "--eval-batch-size: expected a positive integer"),
                           (["--workers", "-1"], "--workers"), (["--holdout", "0"], "--holdout"), (["--repeats", "0"], "--repeats")]:
        code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "0.5", *extra)
        one_error_line(code, captured, message, exit_code=2)
    assert not (tmp_path / "tune").exists()


@pytest.mark.parametrize("where, error, flag", [
    ("predict", RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
                             "allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)"), "--eval-batch-size (now 8)"),
    ("predict", MemoryError(), "--eval-batch-size (now 8)"),
    ("measure_speedups", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139 GiB"),
     "--batch-size (now 1)"),
])
def test_out_of_memory_is_one_line(tmp_path, capsys, checkpoint, image_folder, monkeypatch, where, error, flag):
    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(tune_module, where, oom)
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "0.9", "--methods", "")
    one_error_line(code, captured, f"out of memory on cpu{'' if isinstance(error, MemoryError) else ' (tried to allocate '}")
    assert captured.err.strip().endswith(f"lower {flag}")
    written = sorted(p.name for p in (tmp_path / "tune").iterdir()) if (tmp_path / "tune").exists() else []
    assert written == ([".tune_state.json"] if where == "measure_speedups" else [])  # accuracy, measured before the timing, is kept


def test_other_runtime_errors_stay_errors():
    with pytest.raises(RuntimeError, match="shape"):
        with out_of_memory("cpu", "lower something"):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


@pytest.mark.slow
def test_checkpoints_in_folders_of_the_same_name_are_each_measured(tmp_path, capsys, checkpoint, image_folder):
    paths = [save_classifier(tmp_path / run / "spot" / "model.safetensors", seed=seed) for run, seed in (("a", 1), ("b", 2))]
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "1.0", "--methods", "", "--no-speed",
                              "--checkpoint", str(paths[0]), "--checkpoint", str(paths[1]), "--checkpoint", str(paths[1]))
    assert code == 0, captured.err
    rows = json.loads((tmp_path / "tune" / "tune.json").read_text())["rows"]
    assert sorted(r["model"] for r in rows.values() if r["model"]) == sorted(str(p.resolve()) for p in paths)  # each once
    assert checkpoint_names([str(p) for p in paths]) == ["a/spot/model", "b/spot/model"]
    assert checkpoint_names(["/x/spot/a.safetensors", "/x/spot/b.safetensors", "/y/evit/model.safetensors"]) == ["a", "b", "evit"]
    assert checkpoint_names(["/x/spot/m.safetensors", "/x/spot/m.safetensors"]) == ["spot", "spot"]  # one file (as two methods)


@pytest.mark.slow
def test_a_resumed_tuner_measures_a_rewritten_checkpoint_again(tmp_path, capsys, checkpoint, image_folder, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    trained = save_classifier(tmp_path / "ft" / "model.safetensors", seed=1)
    args = ("--target-flops", "1.0", "--methods", "", "--checkpoint", str(trained))
    monkeypatch.setattr(tune_module, "measure_speedups", killed)
    code, _ = tune_cli(capsys, tmp_path, checkpoint, image_folder, *args)
    assert code == 130
    before = trained.stat()
    save_classifier(trained, seed=2)  # rewritten in place: same size, and the same modification time
    os.utime(trained, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert trained.stat().st_size == before.st_size
    measured, real = [], tune_module.predict
    monkeypatch.setattr(tune_module, "predict", lambda *a, **k: measured.append(k["desc"]) or real(*a, **k))
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, *args, "--no-speed")
    assert code == 0, captured.err
    assert measured == ["Baseline (ft)"]  # the tuned model's accuracy resumed; the rewritten checkpoint's measured again


@pytest.mark.slow
def test_labels_follow_the_models_class_names_as_eval_does(tmp_path, capsys):
    """Two class folders of ten classes: tune must label them 3 and 7 (the model's names), as eval does, not 0 and 1."""
    model = save_classifier(tmp_path / "m.safetensors", favourite=3)  # predicts class03 for every image
    data = write_image_folder(tmp_path / "two", splits=("train",), classes=8, per_class=2)
    for folder in (data / "train").iterdir():
        if folder.name not in ("class03", "class07"):
            shutil.rmtree(folder)

    def tune_top1(*extra):
        code, captured = tune_cli(capsys, tmp_path, model, data, "--target-flops", "1.0", "--methods", "", "--no-speed", "--holdout", "100", *extra)
        assert code == 0, captured.err
        return json.loads((tmp_path / "tune" / "tune.json").read_text())["rows"]["Baseline"]["top1_mean"]

    def eval_top1(*extra):
        argv = ["eval", "--model", str(model), "--data", str(data), "--split", "train", "--no-speed", "--quiet", "--workers", "0", "--out", str(tmp_path / "eval")]
        assert main([*argv, *extra]) == 0, capsys.readouterr().err
        return json.loads((tmp_path / "eval" / "results.json").read_text())["methods"]["baseline"]["top1"]

    assert tune_top1() == eval_top1() == 50.0
    (data / "train" / "class07").rename(data / "train" / "zebra")  # not one of the model's classes
    code, captured = tune_cli(capsys, tmp_path, model, data, "--target-flops", "1.0", "--methods", "", "--no-speed")
    one_error_line(code, captured, "--allow-class-mismatch")
    assert tune_top1("--allow-class-mismatch") == eval_top1("--allow-class-mismatch")


def test_a_checkpoint_with_other_classes_is_refused(tmp_path, capsys, checkpoint, image_folder):
    m = make_model()
    m.info.classes = [f"class{c:02d}" for c in reversed(range(10))]
    other = save_model(m, tmp_path / "other" / "model.safetensors")
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-flops", "1.0", "--methods", "", "--checkpoint", str(other))
    one_error_line(code, captured, "predicts other classes than --model")


@pytest.mark.slow  # importing transformers alone takes seconds
@requires_transformers
def test_tune_a_hugging_face_directory_and_eval_its_config(tmp_path, capsys, image_folder):
    import transformers as T
    from test_hf import VIT_LIKE, build_hf

    names = {i: f"class{i:02d}" for i in range(10)}
    hf_dir = tmp_path / "hf-vit"
    build_hf("ViTForImageClassification", T.ViTConfig(num_labels=10, id2label=names, label2id={v: k for k, v in names.items()}, **VIT_LIKE)).save_pretrained(hf_dir)
    code, captured = tune_cli(capsys, tmp_path, hf_dir, image_folder, "--target-flops", "0.9", "--no-stacks", "--no-speed")
    assert code == 0, captured.err
    config = read_run_config(tmp_path / "tune" / "config.json")
    assert config.model == str(hf_dir.resolve()) and config.method == "tome"
    code = main(["eval", "--config", str(tmp_path / "tune" / "config.json"), "--data", str(image_folder), "--split", "train", "--no-speed",
                 "--quiet", "--workers", "0", "--out", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr().err
    assert set(json.loads((tmp_path / "eval" / "results.json").read_text())["methods"]) == {"baseline", "tome"}


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_speedup_is_the_median_of_per_round_ratios(monkeypatch):
    """Per-round ratios baseline / candidate are 0.5, 3 and 1: their median is 1.0, the ratio of the medians (3 / 2) 1.5."""
    base, cand = [1.0, 3.0, 3.0], [2.0, 1.0, 3.0]
    inject_timings(monkeypatch, lambda label, r: (base if label == "Baseline" else cand)[r])
    dataset = [(torch.zeros(3, 4, 4), 0)] * 4
    speed = tune_module.measure_speedups({"Baseline": None, "cand": None}, dataset, range(4), batch_size=1, device="cpu", repeats=3,
                                         warmup=0, progress=False)
    assert speed["Baseline"]["speedup"] == 1.0
    assert speed["cand"] == {"speedup": 1.0, "speedup_q25": 0.75, "speedup_q75": 2.0, "latency_ms": 2000.0, "images_per_s": 0.5}


# -- the latency model ---------------------------------------------------------------------------------
def test_latency_model_prediction_is_fixed_part_plus_each_executed_block():
    curve = LatencyModel((1.0, 2.0, 3.0), 10.0, 1)
    assert curve.predict([3, 2.5, 1]) == 10 + 3 + 3 + 1  # a padded width 2.5 runs as 3 tokens
    assert curve.predict([7]) == 13  # beyond the measured counts: the largest
    assert curve.predict([]) == 10


def test_executed_widths_follow_each_methods_tokens():
    from vitbudget.eval.latency_model import executed_widths
    from vitbudget.methods import build_method

    model, images = make_model(), torch.randn(2, 3, 32, 32)
    assert executed_widths(build_method("baseline", model), images) == [17.0] * 3
    assert executed_widths(build_method("tome", model, r=2), images) == [17.0, 15.0, 13.0]  # r merged after each block's attention


def test_latency_curve_is_measured_once_per_shape_and_batch(monkeypatch):
    import vitbudget.eval.latency_model as lm

    measured = []

    def fake_measure(model, batch, device, progress=True):
        measured.append(batch)
        return LatencyModel(tuple(float(n) for n in range(1, 18)), 0.5, batch)

    monkeypatch.setattr(lm, "measure", fake_measure)
    model = make_model()
    first, cached = lm.load_or_measure(model, 4, "cpu", progress=False)
    again, cached_again = lm.load_or_measure(model, 4, "cpu", progress=False)
    assert (cached, cached_again, measured) == (False, True, [4]) and again == first
    lm.load_or_measure(model, 8, "cpu", progress=False)  # another batch size: measured again
    lm.load_or_measure(make_model(ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=10)), 4, "cpu", progress=False)
    assert measured == [4, 8, 4]
    lm.cache_file(lm.cache_key(model, 4, "cpu")).write_text("{ torn")  # a damaged cache entry is measured again, not an error
    assert lm.load_or_measure(model, 4, "cpu", progress=False)[1] is False


def test_measured_latency_curve_has_every_token_count():
    from vitbudget.eval.latency_model import measure

    curve = measure(make_model(), 2, repeats=1, progress=False)
    assert len(curve.block) == 17 and all(t > 0 for t in curve.block) and curve.fixed >= 0 and curve.batch_size == 2


@pytest.mark.slow
def test_tuner_times_only_candidates_the_latency_model_says_can_meet_the_target(tmp_path, capsys, checkpoint, image_folder, monkeypatch):
    timed = []

    def seconds(label, r):
        timed.append(label)
        return 1.0 if label == "Baseline" else 0.6

    inject_timings(monkeypatch, seconds)
    code, captured = tune_cli(capsys, tmp_path, checkpoint, image_folder, "--target-speedup", "1.3", "--no-stacks")
    assert code == 0, captured.err
    result = json.loads((tmp_path / "tune" / "tune.json").read_text())
    rows = result["rows"]
    for label, row in rows.items():  # the linear curve predicts 1 / (mean block width / 17)
        assert row["timed"] == (label == "Baseline" or row["predicted_speedup"] >= tune_module.PROMISING * 1.3), label
        assert (row["speedup"] is None) == (not row["timed"]) and (label in timed) == row["timed"]
    assert 0 < sum(r["timed"] for r in rows.values()) - 1 < len(rows) - 1  # some timed, some ruled out
    assert result["prediction_error"] == pytest.approx(
        np.median([abs(r["predicted_speedup"] - 1 / 0.6) * 0.6 for k, r in rows.items() if r["timed"] and k != "Baseline"]))
    table = (tmp_path / "tune" / "tune.md").read_text()
    assert "not timed (cannot meet the target)" in table and "Latency model: predicted speed-ups" in table
    timed.clear()
    code, captured = tune_cli(capsys, tmp_path / "all", checkpoint, image_folder, "--target-speedup", "1.3", "--no-stacks", "--time-all")
    assert code == 0, captured.err
    assert all(r["timed"] for r in json.loads((tmp_path / "all" / "tune" / "tune.json").read_text())["rows"].values())
