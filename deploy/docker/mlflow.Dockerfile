# syntax=docker/dockerfile:1
# The MLflow tracking server of the platform (deploy/kustomize/mlflow). Tag: deploy/images.env.
#   docker build -f deploy/docker/mlflow.Dockerfile -t cloudhpc/mlflow:0.1.0 deploy/docker
# Contract: port 5000; configured by MLflow's own environment variables only, never by arguments,
# so nothing secret can reach the process's command line (readable by every user of the node in
# /proc/PID/cmdline): MLFLOW_BACKEND_STORE_URI (for PostgreSQL without its password, which libpq
# reads from PGPASSWORD, given from a Secret), MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/ with
# MLFLOW_S3_ENDPOINT_URL and the AWS_* variables; artifacts are proxied, so clients need only the
# tracking URL).
# Base image pinned by tag; pin its digest too as cloudhpc.Dockerfile says. The pip install below is
# pinned by version, not yet by hash: a lock generated on PyPI (as cloudhpc-requirements.txt is) could
# not be made for mlflow 3.18.0 here, because the package index this project reaches has no
# mlflow-tracing 3.18.0, which it requires.

FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG MLFLOW_VERSION=3.18.0
RUN python -m venv /opt/mlflow \
 && /opt/mlflow/bin/pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==2.9.13" "boto3==1.44.5"

FROM python:3.11.14-slim-bookworm
RUN groupadd --system --gid 10001 mlflow \
 && useradd --system --uid 10001 --gid 10001 --home-dir /mlflow --create-home --shell /usr/sbin/nologin mlflow
COPY --from=builder /opt/mlflow /opt/mlflow
ENV PATH=/opt/mlflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MLFLOW_HOST=0.0.0.0 \
    MLFLOW_PORT=5000 \
    MLFLOW_SERVE_ARTIFACTS=true \
    MLFLOW_BACKEND_STORE_URI=sqlite:////mlflow/mlflow.db \
    MLFLOW_ARTIFACTS_DESTINATION=/mlflow/artifacts
WORKDIR /mlflow
USER 10001:10001
EXPOSE 5000
CMD ["mlflow", "server"]
