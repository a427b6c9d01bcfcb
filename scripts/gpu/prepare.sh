#!/usr/bin/env bash
# On the development machine, before running scripts/gpu/check.sh on a lent GPU machine (the `device` tool), which has
# torch, transformers and CUDA but none of this project's other dependencies and no network:
#   .whl/   wheels of the missing packages (carry it)
#   .smol/  SmolLM2-135M-Instruct's config and tokenizer from the converted default base (the 98 MB model package is
#           over the 64 MiB carry limit), from which check.sh builds random weights of the same shapes (carry it)
# Both folders are listed in .git/info/exclude. Usage: bash scripts/gpu/prepare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.smol/\n' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
versions=$($PY -m pip list --format=freeze 2>/dev/null)
pin() { echo "$versions" | grep -i "^$1==" | head -1; }
pkgs=""
for p in fastapi starlette pydantic pydantic_core annotated-types annotated-doc typing-inspection typing_extensions uvicorn \
         gguf opentelemetry-api openai jiter sniffio httpx2 httpcore2 truststore anyio idna; do
  spec=$(pin "$p"); pkgs="$pkgs ${spec:-$p}"
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pkgs
model_dir=$($PY -c "import remix; from remix.models.loading import convert_gguf, embedded_gguf; print(convert_gguf(embedded_gguf()))")
mkdir -p .smol
for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
  cp "$model_dir/$f" .smol/ 2>/dev/null || true
done
du -sh .whl .smol
