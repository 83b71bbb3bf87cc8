#!/usr/bin/env bash
# Fresh machine -> passing tests: a venv with the CPU torch build, refdir, test deps and the small
# offline model (for the end-to-end test), then the linters (ruff, mypy) and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e ".[test,models-small]"
.venv/bin/ruff check src tests benchmarks scripts
.venv/bin/ruff format --check src tests benchmarks scripts
.venv/bin/mypy  # src/refdir, settings in pyproject.toml
exec .venv/bin/python -m pytest -q "$@"
