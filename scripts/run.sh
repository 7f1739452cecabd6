#!/usr/bin/env bash
# Set up .venv (CPU torch, no CUDA packages) and run the main job or the tests.
#   bash scripts/run.sh eval [vitbudget eval options]   evaluate the reference model on CIFAR-10 test
#   bash scripts/run.sh test [pytest options]           run the test suite (what .ci/run calls)
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-eval}"; shift || true
venv="${VITBUDGET_VENV:-.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first and pinned: the CPU build; anything unpinned would pull CUDA wheels.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[test]"
if [ "$job" = test ]; then
  # timm is an optional extra, used only by the equivalence test; its torchvision dependency
  # is a CUDA build here, so it is installed without dependencies (see tests/test_timm_equivalence.py).
  "${pip[@]}" --no-deps timm==1.0.31 || echo "timm not installed: the timm equivalence test will skip"
  "${pip[@]}" pyyaml huggingface_hub || true
  # the corruption package (optional extra) so the robustness tests run for real; they skip without it
  "${pip[@]}" -e ".[robustness]" || echo "imagecorruptions-imaug not installed: its tests will skip"
  # the export extra (onnx, onnxscript, onnxruntime): tests/test_export.py needs it, so a failed install fails here
  "${pip[@]}" -e ".[export]"
fi
if "$venv/bin/python" -m pip list 2>/dev/null | grep -qi nvidia; then
  echo "error: CUDA packages were installed into $venv; remove it and report the dependency that pulled them" >&2
  exit 1
fi

case "$job" in
  eval) exec "$venv/bin/vitbudget" eval --out runs/reference "$@" ;;
  test) exec "$venv/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash scripts/run.sh {eval|test} [options]" >&2; exit 2 ;;
esac
