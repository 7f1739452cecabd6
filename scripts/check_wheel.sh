#!/usr/bin/env bash
# The package as a user installs it: a wheel built from the repository, into a clean venv (CPU
# torch from the pinned build), then `vitbudget --version` and `vitbudget eval --help` from there.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$work/dist" .
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.13.0 "$work"/dist/vitbudget-*.whl
if "$work/venv/bin/python" -m pip list 2>/dev/null | grep -qi nvidia; then
  echo "error: installing the wheel pulled CUDA packages" >&2
  exit 1
fi
cd "$work"  # away from the repository: nothing imported from the source tree
"$work/venv/bin/vitbudget" --version
"$work/venv/bin/vitbudget" eval --help >/dev/null
echo "wheel check: $(ls "$work"/dist) installs in a clean venv; vitbudget --version and eval --help work"
