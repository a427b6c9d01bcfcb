#!/usr/bin/env bash
# Container entrypoint: server options from REMIX_* environment variables; extra arguments are passed through.
set -euo pipefail
args=(--host "${REMIX_HOST:-0.0.0.0}" --port "${REMIX_PORT:-8000}" --base "${REMIX_BASE:-smollm2-135m-instruct}"
      --max-num-seqs "${REMIX_MAX_NUM_SEQS:-32}" --max-model-len "${REMIX_MAX_MODEL_LEN:-0}" --dtype "${REMIX_DTYPE:-auto}"
      --device "${REMIX_DEVICE:-auto}" --cuda-graphs "${REMIX_CUDA_GRAPHS:-on}"
      --adapter-loading "${REMIX_ADAPTER_LOADING:-auto}")
if [ -n "${REMIX_ADAPTER_DIR:-}" ] && [ -d "${REMIX_ADAPTER_DIR}" ]; then
  args+=(--adapter-dir "${REMIX_ADAPTER_DIR}")
fi
if [ -n "${REMIX_SSL_CERTFILE:-}" ] || [ -n "${REMIX_SSL_KEYFILE:-}" ]; then  # HTTPS (the server says if one is missing)
  args+=(--ssl-certfile "${REMIX_SSL_CERTFILE:-}" --ssl-keyfile "${REMIX_SSL_KEYFILE:-}")
fi
exec python -m server "${args[@]}" "$@"
