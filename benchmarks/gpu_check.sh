#!/usr/bin/env bash
# One prepared run for the `device` machine (torch + transformers + accelerate there; no pip, no network):
# the tiny-model tests on CUDA, then the 8B-shaped random bf16 benchmark. Fits ~10 minutes on an H200.
#   run: bash benchmarks/gpu_check.sh   (results under $OUT when set, else ./gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" REFDIR_TEST_DEVICE=cuda
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
timeout 300 python -m pytest -q -m "not slow" -x -p no:cacheprovider tests/test_adapter.py tests/test_interventions.py \
  tests/test_forward.py tests/test_selection.py tests/test_models.py tests/test_export.py > "$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
timeout 280 python benchmarks/gpu_check.py --out "$OUT/gpu_check.json" > "$OUT/bench.log" 2>&1
tail -1 "$OUT/bench.log"
