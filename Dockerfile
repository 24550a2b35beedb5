# syntax=docker/dockerfile:1
# undiffuse: one image for the API, the Denoiser (GPU) and the workers.
#   docker build -t undiffuse:gpu .                          # torch 2.13.0 for CUDA 13.0 (default)
#   docker build -t undiffuse:cpu --build-arg VARIANT=cpu .  # torch 2.13.0, CPU build
#
# Both variants start from the same slim Debian 12. torch's CUDA wheels bring their own CUDA
# libraries (the nvidia-* wheels: runtime, cuBLAS, cuDNN, NCCL, ...) and load those, so an
# nvidia/cuda runtime base would only add a second, unused copy of them; the one thing a GPU
# container needs from the host, the NVIDIA driver (>= 580 for CUDA 13.0), is mounted in by the
# NVIDIA container toolkit. Python is Debian 12's 3.11, the Python requirements.lock is made with.
ARG VARIANT=gpu
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# wget: the HEALTHCHECK, and KubeRay's probes exec `wget ... | grep success` in Ray containers
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3.11=3.11.2-6+deb12u* python3.11-venv=3.11.2-6+deb12u* wget=1.21.3-1+deb12u* ca-certificates=2025* \
 && rm -rf /var/lib/apt/lists/*

# --- builder: a virtual environment from the lock file ---------------------------------------------
FROM base AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
# the PyTorch index of the variant unless set (a mirror, or a local wheelhouse: docs/deploy.md)
ARG TORCH_INDEX_URL=""
WORKDIR /src
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# 1. torch alone, and only torch, from the PyTorch index: the largest layer, first, so that no
#    edit to the lock, the code or the docs downloads it again
RUN case "${VARIANT}" in \
      gpu) index=https://download.pytorch.org/whl/cu130 ;; \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      *) echo "VARIANT must be gpu or cpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL:-$index}" "torch==${TORCH_VERSION}"
# 2. everything else from PyPI, pinned by the lock: the package's dependencies with its service and
#    diffusers extras, read from pyproject.toml; torch's own dependencies (for the CUDA build, the
#    nvidia-* libraries it names exactly) resolve here too
COPY requirements.lock pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['service'] + p['optional-dependencies']['diffusers']))" \
      > requirements.txt \
 && pip install --no-cache-dir -c requirements.lock "torch==${TORCH_VERSION}" -r requirements.txt \
 && pip check
# 3. the package itself (README.md is its long description)
COPY README.md ./
COPY undiffuse ./undiffuse
COPY service ./service
COPY worker ./worker
RUN pip install --no-cache-dir --no-deps . \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# --- runtime: no compilers, no caches, no tests -----------------------------------------------------
FROM base AS runtime
# what the nvidia/cuda images declare: when a GPU is requested (the device plugin, `--gpus`), the
# NVIDIA container toolkit mounts the driver's compute libraries, and refuses to start the
# container, naming the condition, on a driver too old for CUDA 13.0. Without a GPU they do nothing.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"
RUN groupadd --system --gid 10001 undiffuse \
 && useradd --system --uid 10001 --gid undiffuse --create-home --home-dir /home/undiffuse undiffuse
COPY --from=builder /opt/venv /opt/venv
COPY --chown=undiffuse:undiffuse models /app/models
# production unless told otherwise: a container started without configuration refuses to run
# without hashed API keys and real secrets (fail closed); a development stack says
# UNDIFFUSE_ENVIRONMENT=development itself
ENV PATH=/opt/venv/bin:$PATH \
    UNDIFFUSE_MODEL_DIR=/app/models \
    UNDIFFUSE_ENVIRONMENT=production
WORKDIR /app
USER 10001
EXPOSE 8000 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8000/healthz"]
CMD ["python", "-m", "service.run"]
