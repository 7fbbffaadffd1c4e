# syntax=docker/dockerfile:1
#
# PHA Serve adaptation worker on a CUDA runtime base: runs `pha worker` (jobs from the Redis stream) on the GPU
# when one is visible, and on the CPU otherwise (PHA_DEVICE=auto).
#
#   docker build -f docker/worker.Dockerfile -t pha-serve-worker:0.1.0-cuda .
#
# The torch wheel brings its own CUDA libraries, so TORCH_INDEX_URL picks the CUDA variant that the pinned torch
# release is published for (https://download.pytorch.org/whl/cuXYZ); the base image only needs a CUDA 12 runtime
# that the host driver supports. Checkpoints: the same MODEL_DIR / PHA_CHECKPOINT build arguments as
# docker/api.Dockerfile (see docs/deployment.md, "Checkpoints").

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu's own Python (3.12 on 24.04), with its headers and a C compiler for the routing index's native scan
# (service/_cellscan.c; the runtime stage gets the built module with the venv). Package versions move with
# security updates, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.md ./
COPY pha_core pha_core
COPY pha_cli pha_cli
COPY service service
# -I: import the installed package, not the sources in the working directory.
RUN pip install --no-cache-dir -c docker/constraints.txt ".[serve]" \
    && pha --help > /dev/null \
    && python -I -c "import service.main"

FROM ${CUDA_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
ARG MODEL_DIR=docker/no-model
ARG PHA_CHECKPOINT=""
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pha \
    && useradd --system --uid 10001 --gid pha --home-dir /home/pha --create-home --shell /usr/sbin/nologin pha \
    && mkdir -p /var/lib/pha/registry /models \
    && chown pha:pha /var/lib/pha/registry
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_CACHE=/models/hf-cache \
    PHA_DEVICE=auto \
    PHA_CHECKPOINT=${PHA_CHECKPOINT} \
    PHA_REGISTRY_DIR=/var/lib/pha/registry
COPY --from=build /opt/venv /opt/venv
COPY ${MODEL_DIR} /models/
USER 10001:10001
WORKDIR /home/pha
VOLUME ["/var/lib/pha/registry"]
CMD ["pha", "worker"]
