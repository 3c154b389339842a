#!/usr/bin/env bash
# Creates .venv with the CPU build of torch (installed first, so nothing pulls a CUDA build) and dist-quant.
# Idempotent: a second run only checks that everything is there. Use PYTHON=python3.11 to choose the interpreter.
# VENV=.venv5 TRANSFORMERS='transformers>=5,<6' makes the second line's venv (scripts/test5.sh): the baseline's
# pins, but for transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  echo "installing torch (CPU build) ..."
  python -m pip install -q "torch==2.13.0"
fi
if [ -z "${TRANSFORMERS:-}" ]; then
  echo "installing dist-quant and its dependencies ..."
  python -m pip install -q -c constraints.txt -e ".[test]"
else
  echo "installing dist-quant and $TRANSFORMERS ..."
  grep -v '^transformers' constraints.txt > "$VENV/constraints.txt"
  python -m pip install -q -c "$VENV/constraints.txt" --upgrade -e ".[test]" "$TRANSFORMERS"
fi
