#!/usr/bin/env bash
# Render a run's report.html in headless Chromium and save a full-page PNG screenshot.
#   bash scripts/screenshot_report.sh RUN_FOLDER [OUT.png]
# Needs Debian's chromium (apt-get install chromium); nothing is fetched from the network.
set -euo pipefail
run="$1"; out="${2:-$1/report.png}"
profile="$(mktemp -d)"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1200,3000 --screenshot="$out" "file://$(realpath "$run")/report.html" 2>/dev/null
rm -rf "$profile"
echo "$out"
