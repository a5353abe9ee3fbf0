# syntax=docker/dockerfile:1
# The image of the Kubeflow components (cloudhpc.pipelines.components: PIPELINES_IMAGE). Tag: deploy/images.env.
#   docker build -f deploy/docker/pipelines.Dockerfile -t cloudhpc/pipelines:0.1.0 .
# cloudhpc with its `server` and `pipelines` extras: the KFP SDK, kfp-kubernetes, MLflow, Ray with Train,
# scikit-learn and PyTorch's CPU build (torch==2.13.0+cpu, from PyTorch's CPU wheel index, given
# as TORCH_INDEX; the default build on PyPI is a CUDA build of several GB that a CPU pod never uses).
# The build context is the repository root; cloudhpc.Dockerfile.dockerignore keeps it to the sources.
# Base image pinned by tag; pin its digest too as cloudhpc.Dockerfile says. The pip install below is
# not hash-locked: torch's CPU build comes from PyTorch's wheel index, which a lock made from PyPI
# (as cloudhpc-requirements.txt is) cannot cover; lock it with `pip-compile --generate-hashes
# --extra-index-url "$TORCH_INDEX"` where that index is reachable.

FROM python:3.11.14-slim-bookworm AS builder
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN test -n "$TORCH_INDEX" || { echo "pass --build-arg TORCH_INDEX=<PyTorch's CPU wheel index URL>" >&2; exit 1; }
RUN python -m venv /opt/cloudhpc
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN /opt/cloudhpc/bin/pip install --extra-index-url "$TORCH_INDEX" ".[server,pipelines,postgres]"

FROM python:3.11.14-slim-bookworm
RUN groupadd --system --gid 10001 cloudhpc \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cloudhpc --shell /usr/sbin/nologin cloudhpc \
 && mkdir -p /var/lib/cloudhpc && chown 10001:10001 /var/lib/cloudhpc
COPY --from=builder /opt/cloudhpc /opt/cloudhpc
# KFP runs `python3 -m kfp.dsl.executor_main ...` with the component's code: it must be this venv's.
ENV PATH=/opt/cloudhpc/bin:$PATH \
    HOME=/var/lib/cloudhpc \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/cloudhpc
USER 10001:10001
