#!/usr/bin/env bash
# Sets up .venv (see scripts/setup.sh) and runs the demo: tiny model -> W8A8 checkpoint, explained.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
python scripts/demo.py "$@"
