#!/usr/bin/env bash
# On a lent GPU machine (run through the `device` tool with carry [".whl", ".smol"], after scripts/gpu/prepare.sh here):
# installs the carried wheels, builds random weights of the default base's shapes, runs the test files one by one (a
# crash in one does not hide the others) and the server benchmark on CUDA in float32 and bfloat16. Everything lands in
# $OUT (tests.log, bench_*.txt, server_cuda*.json/md); the last lines printed are a summary.
# Usage (device tool command): bash scripts/gpu/check.sh [test-seconds-budget, default 240]
set -uo pipefail
budget=${1:-240}
OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
  && export PYTHONPATH=/tmp/site:$PWD || { echo "wheel install failed"; exit 3; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 - <<'PY' > /dev/null 2>&1 &
import shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, out = Path(".smol"), Path("/tmp/smol")
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32).save_pretrained(out)
for f in src.iterdir():
    if f.suffix in (".json", ".jinja") and f.name != "config.json":
        shutil.copy(f, out / f.name)
PY
T0=$(date +%s)
for f in test_graphs test_kernels test_stack test_layer test_engine test_fastpath test_inject test_training test_server test_cli; do
  echo "=== $f" >> "$OUT/tests.log"
  timeout 150 python3 -X faulthandler -m pytest -q -p no:cacheprovider "tests/$f.py" -m "not slow" --tb=short -rfE >> "$OUT/tests.log" 2>&1
  echo "$f rc=$? $(tail -1 "$OUT/tests.log" | cut -c1-120)"
  [ $(( $(date +%s) - T0 )) -gt "$budget" ] && echo "test budget spent" && break
done
wait
for dtype in float32 bfloat16; do
  timeout 200 python3 -m server.bench --base /tmp/smol --device cuda --dtype $dtype --json "$OUT/server_cuda_$dtype.json" \
    --markdown "$OUT/server_cuda_$dtype.md" 2>&1 | grep -E "^c=|goal" > "$OUT/bench_$dtype.txt"
  echo "== bench $dtype"; grep goal "$OUT/bench_$dtype.txt"
done
