# syntax=docker/dockerfile:1
# undiffuse: one image for the API, the Denoiser (GPU) and the workers.
#   docker build -t undiffuse:gpu .                          # CUDA runtime + torch cu130 (default)
#   docker build -t undiffuse:cpu --build-arg VARIANT=cpu .  # no CUDA, torch CPU build
ARG VARIANT=gpu
ARG BASE_STAGE=base-${VARIANT}

# --- bases: the runtime stage starts from one of these, chosen by VARIANT --------------------------
# torch 2.13.0's CUDA wheels are built for CUDA 13.0; the NVIDIA runtime base matches it.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS base-gpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

FROM ubuntu:24.04 AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${BASE_STAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12=3.12.* python3.12-venv=3.12.* curl=8.5.* ca-certificates=20240203* \
 && rm -rf /var/lib/apt/lists/*

# --- builder: a virtual environment from the lock file --------------------------------------------
FROM base AS builder
WORKDIR /src
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.lock pyproject.toml README.md ./
# the lock pins every runtime dependency; torch comes from the index that matches the variant
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" torch==2.13.0 \
 && pip install --no-cache-dir -c requirements.lock \
      "ray[serve]" fastapi pydantic pydantic-settings redis boto3 prometheus-client \
      numpy safetensors pillow tqdm
COPY undiffuse ./undiffuse
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime: no compilers, no caches, no tests ----------------------------------------------------
FROM base AS runtime
RUN groupadd --system --gid 10001 undiffuse \
 && useradd --system --uid 10001 --gid undiffuse --create-home --home-dir /home/undiffuse undiffuse
COPY --from=builder /opt/venv /opt/venv
COPY --chown=undiffuse:undiffuse models /app/models
ENV PATH=/opt/venv/bin:$PATH \
    UNDIFFUSE_MODEL_DIR=/app/models
WORKDIR /app
USER 10001
EXPOSE 8000 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/healthz"]
CMD ["python", "-m", "service.run"]
