#!/usr/bin/env bash
# The main job: set up, train the demo adapter if it is missing, then serve the default base + demo adapter on :8000.
# Extra arguments go to the server (e.g. --port 9000 --api-key secret).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ ! -f runs/demo/adapter/adapter_config.json ]; then
  echo "training the demo adapter into runs/demo (about 5-10 minutes on 2 cores)..."
  python -m training.fit --output runs/demo
fi
exec python -m server --adapter demo=runs/demo/adapter "$@"
