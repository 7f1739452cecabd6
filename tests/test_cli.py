"""The command line: the main job end to end, and one clear message for each kind of bad input."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import CIFAR_ARCHIVE, REFERENCE_MODEL, make_model, requires_cifar, requires_reference
from vitbudget import save_model
from vitbudget.cli import main


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = make_model()
    model.info.classes = [f"class{c:02d}" for c in range(10)]
    return save_model(model, tmp_path / "tiny.safetensors")


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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
        (["--limit", "0"], "--limit must be positive"),
        (["--out", "{file}/sub"], "not writable"),
        (["--model", "{mismatch}"], "does not match the architecture"),
        (["--latency-repeats", "0"], "--latency-repeats and --throughput-repeats must be positive"),
    ],
    ids=["missing-model", "corrupt-model", "missing-data", "empty-data", "bad-limit", "unwritable-out", "mismatched-arch", "bad-repeats"],
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
    defaults = {"--model": str(tiny_checkpoint), "--data": str(image_folder), "--out": str(tmp_path / "out")}
    given = dict(zip(args[::2], [a.format(**fill) for a in args[1::2]]))
    argv = ["eval", "--quiet", "--no-speed", "--workers", "0"] + [x for k, v in {**defaults, **given}.items() for x in (k, v)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vitbudget: error:"), err
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out" / "results.json").exists()  # no partial output


def test_unknown_method_and_option_are_rejected(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--method", "nonsense"])
    assert exc.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--frobnicate"])
    assert exc.value.code == 2 and "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_train_cli_smoke_and_resume(tmp_path, capsys, image_folder):
    out = tmp_path / "run"
    argv = ["train", "--recipe", "smoke", "--data", str(image_folder), "--out", str(out), "--quiet", "--workers", "0", "--train-limit", "40", "--batch-size", "8", "--epochs", "1"]
    code, stdout, _ = run_cli(capsys, *argv)
    assert code == 0 and (out / "model.safetensors").is_file() and '"top1"' in stdout
    code, _, err = run_cli(capsys, *argv)  # the finished run resumes at its end and only re-evaluates
    assert code == 0 and "resuming from" in err
    code, _, err = run_cli(capsys, *argv[:-1], "2", "--lr", "0.5")
    assert code == 1 and "different recipe" in err


def test_help_is_available_as_a_module():
    out = subprocess.run([sys.executable, "-m", "vitbudget", "eval", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--limit" in out and "examples:" in out


@requires_reference
@requires_cifar
def test_reference_model_on_cifar10_subset(tmp_path, capsys):
    """The embedded default end to end on 500 real test images (catches preprocessing or label-order bugs)."""
    code, _, _ = run_cli(capsys, "eval", "--model", str(REFERENCE_MODEL), "--data", str(CIFAR_ARCHIVE), "--limit", "500",
                         "--no-speed", "--quiet", "--out", str(tmp_path / "o"))
    assert code == 0
    top1 = json.loads((tmp_path / "o/results.json").read_text())["methods"]["baseline"]["top1"]
    assert 52 < top1 < 68  # 60.03 % on the full set; a 500-image subset varies by about ±2.2 points


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
