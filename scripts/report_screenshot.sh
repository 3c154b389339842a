#!/usr/bin/env bash
# The README's screenshot of report.html: runs the demo (tiny model, 2 Ray workers, eval), then renders the demo
# checkpoint's report in headless Chromium (Debian package `chromium`) to docs/report.png.
#   bash scripts/report_screenshot.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/dist_quant_report_demo}
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
. .venv/bin/activate
python scripts/demo.py --out "$out"
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome)
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --disable-background-networking \
    --user-data-dir="$out/chromium-profile" --window-size=1100,1500 --screenshot="$PWD/docs/report.png" \
    "file://$(realpath "$out/tiny-qwen3-vl-moe-w8a8/report.html")" 2>/dev/null
echo "wrote docs/report.png"
