#!/usr/bin/env bash
# Render a run's report.html (or any self-contained page, e.g. an audit.html) in headless Chromium and save
# a full-page PNG screenshot.
#   bash scripts/screenshot_report.sh RUN_FOLDER|PAGE.html [OUT.png] [HEIGHT]
# Needs Debian's chromium (apt-get install chromium); nothing is fetched from the network.
set -euo pipefail
src="$1"
if [[ -d "$src" ]]; then page="$src/report.html"; else page="$src"; fi
out="${2:-${page%.html}.png}"
height="${3:-3000}"
profile="$(mktemp -d)"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$profile" --hide-scrollbars \
  --window-size=1200,"$height" --screenshot="$out" "file://$(realpath "$page")" 2>/dev/null
rm -rf "$profile"
echo "$out"
