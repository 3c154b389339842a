#!/usr/bin/env bash
# Sets up .venv (see scripts/setup.sh) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python -m ruff check dist_quant tests scripts  # lint first (pyproject.toml [tool.ruff]): a finding stops the run
python -m pytest -q "$@"
