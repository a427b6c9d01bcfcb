#!/usr/bin/env bash
# The README's test command runs this: set up (scripts/setup.sh: creates .venv on a fresh machine, else checks it
# in a few seconds), then the whole suite, slow integration tests included. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q "$@"
