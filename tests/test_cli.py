"""The command line: the main job end to end, and one clear message for each kind of bad input."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CIFAR_ARCHIVE, REFERENCE_MODEL, make_model, requires_cifar, requires_reference
from test_data import png_bytes
from vitbudget import save_model
from vitbudget.cli import main
from vitbudget.models import NAMED_CONFIGS


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = make_model()
    model.info.classes = [f"class{c:02d}" for c in range(10)]
    return save_model(model, tmp_path / "tiny.safetensors")


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_eval_writes_results(tmp_path, capsys, tiny_checkpoint, image_folder):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "eval", "--model", str(tiny_checkpoint), "--data", str(image_folder), "--out", str(out), "--quiet", "--workers", "0")
    assert code == 0 and "| baseline |" in stdout
    report = json.loads((out / "results.json").read_text())
    base = report["methods"]["baseline"]
    assert report["data"]["images"] == 40 and base["rel_flops"] == 1.0
    assert {"top1", "ece", "nll", "gflops", "latency_b1_ms", "throughput_b40", "latency_ratio"} <= set(base)
    assert np.load(out / "predictions.npz")["baseline/pred"].shape == (40,)
    assert "| baseline |" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "{tmp}/missing.safetensors"], "sidecar .* not found"),
        (["--model", "{bad}"], "corrupt or unreadable"),
        (["--data", "{tmp}/nodata"], "dataset .* not found"),
        (["--data", "{empty}"], "no images"),
        (["--out", "{file}/sub"], "output directory .*file/sub' is not writable: .*file' is not a directory"),
        (["--out", "{file}"], "output directory .*file' is not writable: it exists and is not a directory"),
        (["--model", "{mismatch}"], "does not match the architecture"),
        (["--model", "{nan}"], r"holds non-finite values \(NaN or Inf\)"),
        (["--model", "{heads0}"], "sidecar .*: ViT config num_heads must be an integer >= 1, got 0"),
        (["--model", "{patch0}"], "sidecar .*: ViT config patch_size must be an integer >= 1, got 0"),
        (["--model", "{notmap}"], "sidecar .*: a ViT config must be a mapping"),
        (["--model", "{negsize}"], "sidecar .*: ViT config img_size must be an integer >= 1, got -32"),
        (["--model", "{mean2}"], r"sidecar .*: preprocess mean must be 3 finite numbers \(R, G, B\), got \[0.5, 0.5\]"),
        (["--model", "{crop0}"], r"sidecar .*: preprocess crop_pct must be in \(0, 1\], got 0"),
        (["--model", "{sidecardir}"], "cannot read checkpoint sidecar .*: Is a directory"),
        (["--data", "{strange}"], r"class folders of .* are not the model's classes: \[cat, dog\] unknown to the model; folders \[cat, class01, dog\], model classes \[class00, class01, .*--allow-class-mismatch"),
        (["--data", "{bomb}"], "larger than the .* pixels PIL decodes safely"),
        (["--method", "resolution", "--scale", "40"], r"--scale 40 turns the 4x4 patch grid into 160x160 \(25600 tokens per image\); the limit is 4096 \(64x64, --scale 16"),
        (["--out", "{jsondir}"], "results.json': it exists and is not a file"),
    ],
    ids=["missing-model", "corrupt-model", "missing-data", "empty-data", "unwritable-out", "out-is-a-file", "mismatched-arch", "nan-weights",
         "num-heads-0", "patch-size-0", "config-not-a-mapping", "negative-img-size", "mean-of-length-2", "crop-pct-0", "sidecar-is-a-dir",
         "unknown-class-folders", "decompression-bomb", "scale-40", "results-json-is-a-dir"],
)
def test_eval_bad_input_one_clear_message(tmp_path, capsys, tiny_checkpoint, image_folder, args, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    bad.with_suffix(".json").write_text(tiny_checkpoint.with_suffix(".json").read_text())
    mismatch = tmp_path / "mismatch.safetensors"
    mismatch.write_bytes(tiny_checkpoint.read_bytes())
    meta = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    meta["config"]["depth"] = 5
    mismatch.with_suffix(".json").write_text(json.dumps(meta))
    (tmp_path / "empty/test/a").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    fill = {"tmp": tmp_path, "bad": bad, "mismatch": mismatch, "empty": tmp_path / "empty", "file": tmp_path / "file"}
    fill.update({name: broken_sidecar(tiny_checkpoint, tmp_path / name, edit) for name, edit in SIDECAR_EDITS.items()})
    nan_model = make_model()
    with torch.no_grad():
        nan_model.head.bias[2] = float("nan")
    nan_model.info.classes = [f"class{c:02d}" for c in range(10)]
    fill["nan"] = save_model(nan_model, tmp_path / "nan.safetensors")
    fill["sidecardir"] = tmp_path / "sd" / "m.safetensors"
    fill["sidecardir"].parent.mkdir()
    fill["sidecardir"].write_bytes(tiny_checkpoint.read_bytes())
    fill["sidecardir"].with_suffix(".json").mkdir()
    fill["strange"] = tmp_path / "strange"
    for name in ("cat", "class01", "dog"):
        shutil.copytree(image_folder / "test/class01", fill["strange"] / "test" / name)
    fill["bomb"] = tmp_path / "bomb"
    shutil.copytree(image_folder, fill["bomb"])
    (fill["bomb"] / "test/class04/2.png").write_bytes(png_bytes(np.zeros((1, 1), np.uint8), color_type=0, bit_depth=8, size=(20000, 20000)))
    fill["jsondir"] = tmp_path / "jsondir"
    (fill["jsondir"] / "results.json").mkdir(parents=True)
    out = tmp_path / "out"
    defaults = {"--model": str(tiny_checkpoint), "--data": str(image_folder), "--out": str(out)}
    given = dict(zip(args[::2], [a.format(**fill) for a in args[1::2]]))
    argv = ["eval", "--quiet", "--no-speed", "--workers", "0"] + [x for k, v in {**defaults, **given}.items() for x in (k, v)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitbudget: error:"), err
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()  # nothing written, not even an empty output directory
    assert [p.name for p in fill["jsondir"].iterdir()] == ["results.json"]


SIDECAR_EDITS = {
    "heads0": lambda m: m["config"].update(num_heads=0),
    "patch0": lambda m: m["config"].update(patch_size=0),
    "notmap": lambda m: m.update(config="vit_tiny"),
    "negsize": lambda m: m["config"].update(img_size=-32),
    "mean2": lambda m: m.update(preprocess={"mean": [0.5, 0.5], "std": [0.25, 0.25, 0.25]}),
    "crop0": lambda m: m.update(preprocess={"crop_pct": 0}),
}


def broken_sidecar(checkpoint, path, edit):
    """A copy of `checkpoint` whose sidecar `edit` damaged."""
    path.with_suffix(".safetensors").write_bytes(checkpoint.read_bytes())
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    edit(meta)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path.with_suffix(".safetensors")


@pytest.mark.parametrize("command, args, message", [
    ("eval", ["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
    ("eval", ["--workers", "-1"], "argument --workers: expected a number of worker processes from 0 to 64, got '-1'"),
    ("eval", ["--workers", "1000"], "argument --workers: expected a number of worker processes from 0 to 64, got '1000'"),
    ("eval", ["--device", "cuda"], "argument --device: device 'cuda' needs CUDA, and this torch .*; use --device cpu"),
    ("eval", ["--device", "gpu"], "argument --device: unknown device 'gpu'; use cpu, cuda, cuda:N or mps"),
    ("eval", ["--device", "meta"], "argument --device: device 'meta' is not supported"),
    ("eval", ["--limit", "0"], "argument --limit: expected a positive integer, got '0'"),
    ("eval", ["--latency-repeats", "0"], "argument --latency-repeats: expected a positive integer"),
    ("eval", ["--alpha", "nan"], "argument --alpha: expected a finite number, got 'nan'"),
    ("eval", ["--method", "nonsense"], "argument --method: invalid choice: 'nonsense' \\(unknown method 'nonsense'; available: abs, avit, baseline"),
    ("eval", ["--frobnicate"], "unrecognized argument\\(s\\) --frobnicate \\(see `vitbudget eval --help`\\)"),
    ("eval", ["--alpah", "0.2"], "unrecognized argument\\(s\\) --alpah 0.2; did you mean --alpha\\?"),
    ("bench", ["--suite", "abs", "--split", ","], "argument --split: expected split names separated by commas, got ','"),
    ("bench", ["--suite", "abs", "--seeds", "0"], "argument --seeds: expected a positive integer"),
    ("train", ["--recipe", "smoke", "--out", "x", "--lr", "nan"], "argument --lr: expected a positive finite number, got 'nan'"),
    ("train", ["--recipe", "smoke", "--out", "x", "--save-every", "0"], "argument --save-every: expected a positive integer, got '0'"),
    ("train", ["--recipe", "smoke", "--out", "x", "--epochs", "inf"], "argument --epochs: expected a positive finite number"),
    ("train", ["--recipe", "nope", "--out", "x"], "argument --recipe: invalid choice: 'nope' \\(choose from .*'smoke'"),
    ("viz", ["--method", "abs", "--num-images", "0"], "argument --num-images: expected a positive integer"),
    ("corrupt", ["--out", "x", "--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    ("make-counting", ["--out", "x", "--size", "100000"], "argument --size: expected an image side from 16 to 1024 pixels"),
    ("nonsense", [], "argument {tune,eval,.*}: invalid choice: 'nonsense' \\(choose from 'tune', 'eval'"),
])
def test_bad_flags_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, command, args, message):
    """argparse's convention: a malformed command line exits 2, here with one line that names the valid choices, no usage dump."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch, whatever this machine has
    with pytest.raises(SystemExit) as exc:
        main([command, *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("vitbudget: error: "), err
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_help_stays_complete(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and out.startswith("usage: vitbudget eval") and "--allow-class-mismatch" in out and "examples:" in out


def test_full_disk_publishes_nothing(tmp_path, capsys, tiny_checkpoint, image_folder, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez_compressed", no_space)  # the last of the three files fails to write
    code, _, err = run_cli(capsys, "eval", "--model", str(tiny_checkpoint), "--data", str(image_folder), "--out", str(tmp_path / "o"),
                           "--quiet", "--no-speed", "--workers", "0")
    assert code == 1 and err.startswith("vitbudget: error: cannot write to") and "No space left on device; nothing was published" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_labels_follow_class_names_for_a_subset_and_sorted_folders_otherwise(tmp_path, capsys, tiny_checkpoint, image_folder):
    subset = tmp_path / "subset"
    for name in ("class03", "class07"):
        shutil.copytree(image_folder / "test" / name, subset / "test" / name)
    base = ["eval", "--data", str(subset), "--quiet", "--no-speed", "--workers", "0"]
    code, _, err = run_cli(capsys, *base, "--model", str(tiny_checkpoint), "--out", str(tmp_path / "a"))
    assert code == 0 and err == ""  # a subset of the model's classes, labelled by name: nothing to warn about
    assert np.load(tmp_path / "a/predictions.npz")["labels"].tolist() == [3] * 4 + [7] * 4
    assert json.loads((tmp_path / "a/results.json").read_text())["data"]["labels"] == "the model's class names"
    torch.save(make_model(NAMED_CONFIGS["vit_tiny_p4_cifar10"]).state_dict(), tmp_path / "plain.pth")  # a timm state dict: no class names
    code, _, err = run_cli(capsys, *base, "--model", str(tmp_path / "plain.pth"), "--arch", "vit_tiny_p4_cifar10", "--out", str(tmp_path / "b"))
    assert code == 0 and err.count("\n") == 1, err
    assert err == "vitbudget: note: the model has no class names; labels follow the sorted class-folder names (class03=0, class07=1)\n"
    assert np.load(tmp_path / "b/predictions.npz")["labels"].tolist() == [0] * 4 + [1] * 4
    strange = tmp_path / "strange"
    shutil.copytree(image_folder / "test/class01", strange / "test/cat")
    code, _, err = run_cli(capsys, *base[:2], str(strange), *base[3:], "--model", str(tiny_checkpoint), "--out", str(tmp_path / "c"),
                           "--allow-class-mismatch")
    assert code == 0 and err.startswith("vitbudget: note: class folders [cat] are not among the model's classes; as asked (--allow-class-mismatch)")
    assert json.loads((tmp_path / "c/results.json").read_text())["data"]["labels"] == "sorted class-folder names"



@pytest.mark.slow
def test_train_cli_smoke_and_resume(tmp_path, capsys, image_folder):
    out = tmp_path / "run"
    argv = ["train", "--recipe", "smoke", "--data", str(image_folder), "--out", str(out), "--quiet", "--workers", "0", "--train-limit", "40", "--batch-size", "8", "--epochs", "1"]
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and (out / "model.safetensors").is_file() and '"top1"' in stdout
    code, _, err = run_cli(capsys, *argv)  # the finished run resumes at its end and only re-evaluates
    assert code == 0 and "resuming from" in err
    code, _, err = run_cli(capsys, *argv[:-1], "2", "--lr", "0.5")
    assert code == 1 and "different recipe" in err


@pytest.mark.slow
def test_help_is_available_as_a_module():
    out = subprocess.run([sys.executable, "-m", "vitbudget", "eval", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--limit" in out and "examples:" in out


@pytest.mark.slow
@requires_reference
@requires_cifar
def test_reference_model_on_cifar10_subset(tmp_path, capsys):
    """The embedded default end to end on the fixed 500-image subset: a golden value, so any change to decoding,
    resizing, normalisation, label order, subset choice or the forward pass shows (60.03 % on the full set)."""
    code, _, err = run_cli(capsys, "eval", "--model", str(REFERENCE_MODEL), "--data", str(CIFAR_ARCHIVE), "--limit", "500",
                           "--no-speed", "--quiet", "--out", str(tmp_path / "o"))
    assert code == 0 and err == "vitbudget: note: a fixed subset of 500 of the 10000 test images (--limit; the same images every run)\n"
    report = json.loads((tmp_path / "o/results.json").read_text())
    base = report["methods"]["baseline"]
    assert base["top1"] == pytest.approx(61.8, abs=1e-9)  # 309 of the 500 images, measured 2026-11-23
    assert base["nll"] == pytest.approx(1.10441, abs=1e-4) and base["gflops"] == pytest.approx(0.365107584, abs=1e-12)
    assert report["data"]["labels"] == "the model's class names" and report["data"]["classes"][:2] == ["airplane", "automobile"]


def test_distilling_recipe_takes_its_teacher_from_init(tmp_path, capsys, image_folder):
    base = ["train", "--recipe", "smoke", "--data", str(image_folder), "--quiet", "--workers", "0", "--train-limit", "16",
            "--batch-size", "8", "--epochs", "1", "--distill-weight", "0.5"]
    code, _, err = run_cli(capsys, *base, "--out", str(tmp_path / "a"))
    assert code == 1 and "pass --init CKPT" in err and err.count("\n") == 1
    assert not (tmp_path / "a" / "model.safetensors").exists()
    code, _, err = run_cli(capsys, *base[:-2], "--out", str(tmp_path / "init"))
    assert code == 0, err
    code, _, err = run_cli(capsys, *base, "--init", str(tmp_path / "init" / "model.safetensors"), "--out", str(tmp_path / "b"))
    assert code == 0, err
    from vitbudget.models.loading import read_sidecar, sidecar_path

    assert read_sidecar(sidecar_path(tmp_path / "b" / "model.safetensors"))["recipe"]["distill_weight"] == 0.5


def test_resolution_scale_is_bounded_before_any_memory_is_spent(tiny_model):
    from vitbudget import ConfigError
    from vitbudget.methods import build_method

    with pytest.raises(ConfigError, match=r"--scale 40 turns the 4x4 patch grid into 160x160 \(25600 tokens per image\); the limit is 4096"):
        build_method("resolution", tiny_model, scale=40)
    assert build_method("resolution", tiny_model, scale=16).model.cfg.num_patches == 4096  # the limit itself is allowed
