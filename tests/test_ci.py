"""CI cannot pass with its anchors missing: scripts/run.sh fails on a failed install, and anchor tests fail, not skip."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import conftest

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/bin/sh
# stands in for .venv/bin/python: logs pip installs, fails the one named in $FAIL_ON, 'runs' pytest
if [ "$1 $2" = "-m pip" ] && [ "$3" = install ]; then
  echo "$*" >> "$LOG"
  case "$*" in *"$FAIL_ON"*) exit 1 ;; esac
  exit 0
fi
if [ "$1 $2" = "-m pytest" ]; then echo "pytest VITBUDGET_REQUIRE_ANCHORS=$VITBUDGET_REQUIRE_ANCHORS VITBUDGET_SHARED=$VITBUDGET_SHARED"; exit 0; fi
exit 0
"""


def run_script(tmp_path: Path, fail_on: str = "never-matches", shared: Path | None = None) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    if shared is None:
        shared = tmp_path / "shared"
        for name in ("models/vit_tiny_p4_cifar10.safetensors", "data/cifar10-jpeg.tar.gz"):
            (shared / name).parent.mkdir(parents=True, exist_ok=True)
            (shared / name).write_bytes(b"")
    env = {**os.environ, "VITBUDGET_VENV": str(venv), "VITBUDGET_SHARED": str(shared), "LOG": str(tmp_path / "pip.log"), "FAIL_ON": fail_on}
    env.pop("VITBUDGET_REQUIRE_ANCHORS", None)
    return subprocess.run(["bash", str(REPO / "scripts/run.sh"), "test", "-x"], env=env, capture_output=True, text=True, timeout=60)


def test_run_script_installs_every_test_requirement_and_requires_anchors(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    installs = (tmp_path / "pip.log").read_text()
    for requirement in ("torch==2.13.0", "-e .[test]", "--no-deps timm==1.0.31", "pyyaml huggingface_hub", "-e .[robustness]"):
        assert requirement in installs, installs
    assert result.stdout.strip() == f"pytest VITBUDGET_REQUIRE_ANCHORS=1 VITBUDGET_SHARED={tmp_path / 'shared'}"


@pytest.mark.parametrize("requirement", ["timm==1.0.31", ".[robustness]", "huggingface_hub"])
def test_run_script_fails_when_a_test_requirement_does_not_install(tmp_path, requirement):
    result = run_script(tmp_path, fail_on=requirement)
    assert result.returncode == 1 and "error: could not install test requirement:" in result.stderr and requirement in result.stderr
    assert "pytest" not in result.stdout


def test_run_script_fails_without_the_shared_assets(tmp_path):
    result = run_script(tmp_path, shared=tmp_path / "nowhere")
    assert result.returncode == 1 and "shared reference model and CIFAR-10 archive are not under" in result.stderr


def test_ci_runs_the_test_job():
    assert "bash scripts/run.sh test" in (REPO / ".ci/run").read_text()


def test_missing_anchor_skips_by_hand_and_fails_when_required(monkeypatch):
    outcomes = (pytest.skip.Exception, pytest.fail.Exception)  # caught both ways, so a wrong outcome fails this test
    monkeypatch.setattr(conftest, "REQUIRE_ANCHORS", False)
    with pytest.raises(outcomes, match="timm not available") as outcome:
        conftest.missing_anchor("timm not available")
    assert outcome.type is pytest.skip.Exception
    monkeypatch.setattr(conftest, "REQUIRE_ANCHORS", True)
    with pytest.raises(outcomes, match="required anchor missing: timm not available") as outcome:
        conftest.missing_anchor("timm not available")
    assert outcome.type is pytest.fail.Exception


def test_anchor_marks_are_checked_at_setup(monkeypatch):
    class Item:
        def __init__(self, available):
            self.marks = [conftest.anchor("x", lambda: available, "install x").mark]

        def iter_markers(self, name):
            return [m for m in self.marks if m.name == name]

    monkeypatch.setattr(conftest, "REQUIRE_ANCHORS", True)
    conftest.pytest_runtest_setup(Item(True))
    with pytest.raises((pytest.skip.Exception, pytest.fail.Exception), match="x not available: install x") as outcome:
        conftest.pytest_runtest_setup(Item(False))
    assert outcome.type is pytest.fail.Exception
