#!/usr/bin/env bash
# On a lent GPU machine (run through the `device` tool with carry [".whl", ".smol"], after scripts/gpu/prepare.sh here):
# installs the carried wheels, builds random weights of the default base's shapes, runs every CUDA test and the server
# benchmark on CUDA in bfloat16 and float32 (each within its budget of seconds). Everything lands in
# $OUT (tests.log, bench_*.log, server_cuda*.json/md: seven files, within the device tool's eight); the last lines
# printed are a summary.
# Usage (device tool command): bash scripts/gpu/check.sh [test-seconds-budget, default 240] [bench-seconds-budget per dtype, default 200]
set -uo pipefail
budget=${1:-240}; bench_budget=${2:-200}
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
  && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed"; exit 3; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 scripts/gpu/random_base.py .smol /tmp/smol > /dev/null 2>&1 &
# Every test that runs on CUDA carries the `cuda` mark (the `device` fixture's CUDA case and the CUDA-only tests); the CPU
# cases run in CI on the development machine. One pytest process: the compiled CPU kernels build once.
timeout "$budget" python3 -X faulthandler -m pytest -q -p no:cacheprovider tests -m cuda --continue-on-collection-errors --tb=short -rfEs --durations=8 \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? $(grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | head -20)"; tail -1 "$OUT/tests.log"
wait
for dtype in bfloat16 float32; do
  timeout "$bench_budget" python3 -m server.bench --base /tmp/smol --device cuda --dtype $dtype --json "$OUT/server_cuda_$dtype.json" \
    --markdown "$OUT/server_cuda_$dtype.md" > "$OUT/bench_$dtype.log" 2>&1
  echo "rc=$?" >> "$OUT/bench_$dtype.log"
  echo "== bench $dtype"; grep -E "goal|^rc=" "$OUT/bench_$dtype.log"
done
