#!/usr/bin/env bash
# Creates .venv with the CPU build of torch (installed first, so nothing pulls a CUDA build) and dist-quant.
# Idempotent: a second run only checks that everything is there. Use PYTHON=python3.11 to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  echo "installing torch (CPU build) ..."
  python -m pip install -q "torch==2.13.0"
fi
echo "installing dist-quant and its dependencies ..."
python -m pip install -q -c constraints.txt -e ".[test]"
