# syntax=docker/dockerfile:1
# porter and the submitter: one image build, two targets (tags: deploy/images.env).
#   docker build -f deploy/docker/cloudhpc.Dockerfile --target porter    -t cloudhpc/porter:0.1.0 .
#   docker build -f deploy/docker/cloudhpc.Dockerfile --target submitter -t cloudhpc/submitter:0.1.0 .
# The build context is the repository root; cloudhpc.Dockerfile.dockerignore keeps it to the package
# sources and the dependency lock, so no local state (.cloudhpc/, .testbed/ keys, tokens) can reach
# the image.
#
# The base image is pinned by tag. To pin it by digest as well (the tag can be re-pushed), look the
# digest up where a registry is reachable:
#   docker buildx imagetools inspect python:3.11.14-slim-bookworm   (the "Digest:" line)
# and write it after the tag in both FROM lines: python:3.11.14-slim-bookworm@sha256:<digest>.
# tests/unit/test_deploy.py accepts either form.

FROM python:3.11.14-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/cloudhpc
WORKDIR /src
# Every dependency at the version and hashes of cloudhpc-requirements.txt (regenerate it with
# deploy/docker/lock-requirements.sh): the server extra (porter and the submitter), the PostgreSQL
# driver for a shared job store, the Kubernetes client for bridge Services, and the build backend.
COPY deploy/docker/cloudhpc-requirements.txt ./
RUN /opt/cloudhpc/bin/pip install --require-hashes --no-deps -r cloudhpc-requirements.txt
COPY pyproject.toml README.md ./
COPY src ./src
# The project itself from its sources, with the pinned build backend and nothing fetched.
RUN /opt/cloudhpc/bin/pip install --no-deps --no-build-isolation --no-index . \
 && /opt/cloudhpc/bin/pip check

FROM python:3.11.14-slim-bookworm AS runtime
# The OpenSSH client: `ssh` and `ssh-keygen` for `cloudhpc doctor bridge-host` (run in porter's pod,
# kubectl -n monitoring exec deploy/porter -- cloudhpc doctor bridge-host) and the submitter's bridge
# tunnels. From Debian's archive, its version the one bookworm's security updates carry.
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 cloudhpc \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/cloudhpc --shell /usr/sbin/nologin cloudhpc \
 && mkdir -p /var/lib/cloudhpc \
 && chown 10001:10001 /var/lib/cloudhpc \
 && chmod 1777 /var/lib/cloudhpc
COPY --from=builder /opt/cloudhpc /opt/cloudhpc
# HOME is fixed so that ~/.ssh/known_hosts resolves the same for any uid the container runs as
# (compose runs the submitter as the owner of the mounted key files).
ENV PATH=/opt/cloudhpc/bin:$PATH \
    HOME=/var/lib/cloudhpc \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/lib/cloudhpc
USER 10001:10001
ENTRYPOINT ["cloudhpc"]

# The agent next to the HPC key (deploy/compose/submitter.yaml); health and metrics on 5556.
FROM runtime AS submitter
EXPOSE 5556
CMD ["serve", "submitter"]

# The control plane (deploy/kustomize/porter); the last stage, so a plain `docker build` makes porter.
FROM runtime AS porter
EXPOSE 5555
CMD ["serve", "porter"]
