#!/usr/bin/env bash
# Stand the cloud platform up on a fresh Ubuntu VM (CPouta in docs/platform.md): tools, a kind
# cluster (deploy/kind/cluster.yaml) with a local registry beside it, our images (built, pushed to
# the registry and loaded), generated credentials and porter's TLS certificate, one environment of
# deploy/kustomize, the port-forwards as a systemd user unit; then wait until everything is ready
# and print how to reach it.
#
#   scripts/platform-up.sh [ENV] [options]
#
# ENV: kubeflow | kubeflow-monitoring (default) | standalone-kfp | standalone-kfp-monitoring | dev
#      (`dev`: MLflow, Prometheus, Grafana and porter without Kubeflow, THROWAWAY credentials)
# Options:
#   --cluster-name NAME        kind cluster (default cloudhpc-platform)
#   --submitter-address IP     VM address the submitter's reverse tunnel binds to (default: the VM's
#                              first address from `hostname -I`)
#   --hpc-cluster NAME         cluster the agent token is for (default mahti)
#   --public-address ADDR      the name or IP the submitter uses for porter (https://ADDR:5443), put
#                              in porter's certificate (default: the VM's first address)
#   --tls-cert FILE --tls-key FILE
#                              porter's certificate and key (PEM) instead of one signed by a CA this
#                              script makes (~/.config/cloudhpc/platform-ca.pem)
#   --no-forward-unit          do not install the systemd user unit of `cloudhpc platform forward`
#   --no-tools                 do not install docker/kubectl/kind/kustomize (they must be on PATH)
#   --no-images                do not build and load our images (already in the cluster)
#   --timeout MINUTES          how long to wait for the platform to become ready (default 45)
#
# Idempotent: re-running keeps the cluster, the generated credentials and the tokens, re-applies
# the manifests and waits again. Credentials are random, created once, and kept only in Kubernetes
# Secrets (and the agent token in ~/.config/cloudhpc/, mode 0600). The CA key of porter's
# certificate stays in ~/.config/cloudhpc/ (0600): re-runs renew nothing unless porter-tls is deleted.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KUSTOMIZE_DIR=$ROOT/deploy/kustomize

# Pinned tool versions (kustomize: the version the pinned Kubeflow release asks for).
KUBECTL_VERSION=v1.34.1
KIND_VERSION=v0.30.0
KUSTOMIZE_VERSION=v5.7.1
KIND_NODE_IMAGE=kindest/node:v1.34.0@sha256:7416a61b42b1662ca6ca89f02028ac133a309a2a30ba309614e8ec94d976dc5a
BIN=$HOME/.local/bin
# Every image and its tag, in one place (PORTER_IMAGE, MLFLOW_IMAGE, ...).
# shellcheck source=SCRIPTDIR/../deploy/images.env
. "$ROOT/deploy/images.env"

ENV_NAME=kubeflow-monitoring
CLUSTER="cloudhpc-platform"
SUBMITTER_ADDRESS=""
HPC_CLUSTER=mahti
INSTALL_TOOLS=1
BUILD_IMAGES=1
TIMEOUT_MIN=45
PUBLIC_ADDRESS=""
TLS_CERT=""
TLS_KEY=""
FORWARD_UNIT=1
CONFIG_DIR=$HOME/.config/cloudhpc
# The local registry beside kind (kind's own recipe): the container kind-registry, on the VM's
# loopback port 5001, and on kind's Docker network as kind-registry:5000.
REGISTRY_NAME=kind-registry
REGISTRY_PORT=5001
# porter's TLS endpoint on the VM (deploy/kind/cluster.yaml maps it to NodePort 30443).
PORTER_TLS_PORT=5443

log() { printf '[platform-up] %s\n' "$*" >&2; }
die() { printf '[platform-up] ERROR: %s\n' "$*" >&2; exit 1; }

usage() { sed -n '2,31p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    kubeflow|kubeflow-monitoring|standalone-kfp|standalone-kfp-monitoring|dev) ENV_NAME=$1 ;;
    --cluster-name) CLUSTER=${2:?--cluster-name needs a value}; shift ;;
    --submitter-address) SUBMITTER_ADDRESS=${2:?--submitter-address needs a value}; shift ;;
    --hpc-cluster) HPC_CLUSTER=${2:?--hpc-cluster needs a value}; shift ;;
    --no-tools) INSTALL_TOOLS=0 ;;
    --no-images) BUILD_IMAGES=0 ;;
    --timeout) TIMEOUT_MIN=${2:?--timeout needs minutes}; shift ;;
    --public-address) PUBLIC_ADDRESS=${2:?--public-address needs a value}; shift ;;
    --tls-cert) TLS_CERT=${2:?--tls-cert needs a file}; shift ;;
    --tls-key) TLS_KEY=${2:?--tls-key needs a file}; shift ;;
    --no-forward-unit) FORWARD_UNIT=0 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

[ -z "$TLS_CERT" ] || [ -n "$TLS_KEY" ] || die "--tls-cert needs --tls-key"
[ -z "$TLS_KEY" ] || [ -n "$TLS_CERT" ] || die "--tls-key needs --tls-cert"
case "$ENV_NAME" in
  *-monitoring|dev) MONITORING=1 ;;
  *) MONITORING=0 ;;
esac
case "$ENV_NAME" in
  kubeflow*) PIPELINE_NS=kubeflow-user-example-com ;;   # the default profile's namespace
  standalone-kfp*) PIPELINE_NS=kubeflow ;;
  *) PIPELINE_NS="" ;;
esac
export PATH=$BIN:$PATH

# ---------------------------------------------------------------- checks
check_machine() {
  local cpus mem_gb disk_gb want_cpu=8 want_mem=16
  case "$ENV_NAME" in
    kubeflow*) want_cpu=8; want_mem=16 ;;
    standalone-kfp*) want_cpu=4; want_mem=8 ;;
    dev) want_cpu=2; want_mem=4 ;;
  esac
  cpus=$(nproc)
  mem_gb=$(awk '/MemTotal/ {printf "%d", $2 / 1048576}' /proc/meminfo)
  disk_gb=$(df -Pk "$HOME" | awk 'NR == 2 {printf "%d", $4 / 1048576}')
  log "machine: $cpus CPUs, ${mem_gb} GiB memory, ${disk_gb} GiB free disk (environment $ENV_NAME)"
  [ "$cpus" -ge "$want_cpu" ] || log "WARNING: $ENV_NAME wants at least $want_cpu CPUs; pods may stay Pending"
  [ "$mem_gb" -ge "$want_mem" ] || log "WARNING: $ENV_NAME wants at least $want_mem GiB memory"
  [ "$disk_gb" -ge 30 ] || log "WARNING: less than 30 GiB free disk; images and volumes may not fit"
}

# ---------------------------------------------------------------- tools
arch() {
  case "$(uname -m)" in
    x86_64) echo amd64 ;;
    aarch64|arm64) echo arm64 ;;
    *) die "unsupported architecture $(uname -m)" ;;
  esac
}

# download URL DEST EXPECTED_SHA256
fetch_verified() {
  local url=$1 dest=$2 sum=$3 tmp
  tmp=$(mktemp)
  curl -fsSL --retry 3 -o "$tmp" "$url" || die "download failed: $url"
  echo "$sum  $tmp" | sha256sum -c --quiet - || { rm -f "$tmp"; die "checksum mismatch for $url"; }
  mv "$tmp" "$dest"
}

install_tools() {
  local a sum tmpd
  a=$(arch)
  mkdir -p "$BIN"
  if ! command -v curl >/dev/null || ! command -v docker >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then
    log "apt: installing curl, docker.io, python3-venv"
    sudo apt-get update -q
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl ca-certificates docker.io python3-venv openssl
  fi
  if ! docker info >/dev/null 2>&1; then
    sudo usermod -aG docker "$USER"
    die "added $USER to the docker group: log out and back in (or run 'newgrp docker'), then run this again"
  fi
  if [ "$(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p' | head -1)" != "$KUBECTL_VERSION" ]; then
    log "kubectl $KUBECTL_VERSION -> $BIN"
    sum=$(curl -fsSL "https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/$a/kubectl.sha256")
    fetch_verified "https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/$a/kubectl" "$BIN/kubectl" "$sum"
    chmod +x "$BIN/kubectl"
  fi
  if [ "$(kind version 2>/dev/null | awk '{print $2}')" != "$KIND_VERSION" ]; then
    log "kind $KIND_VERSION -> $BIN"
    sum=$(curl -fsSL "https://kind.sigs.k8s.io/dl/$KIND_VERSION/kind-linux-$a.sha256sum" | awk '{print $1}')
    fetch_verified "https://kind.sigs.k8s.io/dl/$KIND_VERSION/kind-linux-$a" "$BIN/kind" "$sum"
    chmod +x "$BIN/kind"
  fi
  if ! kustomize version 2>/dev/null | grep -q "${KUSTOMIZE_VERSION}"; then
    log "kustomize $KUSTOMIZE_VERSION -> $BIN"
    local base="https://github.com/kubernetes-sigs/kustomize/releases/download/kustomize%2F$KUSTOMIZE_VERSION"
    local file="kustomize_${KUSTOMIZE_VERSION}_linux_$a.tar.gz"
    tmpd=$(mktemp -d)
    sum=$(curl -fsSL "$base/checksums.txt" | awk -v f="$file" '$2 == f {print $1}')
    [ -n "$sum" ] || die "no checksum for $file"
    fetch_verified "$base/$file" "$tmpd/$file" "$sum"
    tar -xzf "$tmpd/$file" -C "$tmpd" kustomize
    install -m 0755 "$tmpd/kustomize" "$BIN/kustomize"
    rm -rf "$tmpd"
  fi
}

require_tools() {
  local t
  for t in docker kubectl kind kustomize python3 openssl; do
    command -v "$t" >/dev/null || die "$t is not on PATH (drop --no-tools to install it)"
  done
}

install_cli() {
  # `cloudhpc platform forward` and `cloudhpc tokens` on the VM.
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "python3 is $(python3 -V 2>&1); cloudhpc needs 3.11 or newer (use an Ubuntu 24.04 image)"
  if [ ! -x "$ROOT/.venv/bin/cloudhpc" ]; then
    log "cloudhpc CLI -> $ROOT/.venv"
    python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/pip" install -q "$ROOT"
  fi
}

# ---------------------------------------------------------------- cluster
create_cluster() {
  if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    log "kind cluster $CLUSTER: exists"
    # A cluster made before deploy/kind/cluster.yaml lacks the mapping (kind cannot add one later).
    if ! docker port "$CLUSTER-control-plane" 30443/tcp >/dev/null 2>&1; then
      log "WARNING: kind cluster $CLUSTER does not publish porter's port $PORTER_TLS_PORT (made before"
      log "  deploy/kind/cluster.yaml): delete it with 'kind delete cluster --name $CLUSTER' and run this again"
    fi
  else
    log "kind cluster $CLUSTER: creating ($KIND_NODE_IMAGE, deploy/kind/cluster.yaml)"
    # Many pods watch many files: raise the inotify limits (kind's known issue with Kubeflow).
    sudo sysctl -q fs.inotify.max_user_instances=2280 fs.inotify.max_user_watches=1255360
    kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --wait 5m \
      --config "$ROOT/deploy/kind/cluster.yaml"
  fi
  kubectl config use-context "kind-$CLUSTER" >/dev/null
}

# The local registry beside kind, as kind documents it: a registry container restarted with Docker
# (so after a reboot too), joined to kind's network; the node's containerd uses it for
# localhost:$REGISTRY_PORT/... and, first, as a mirror of docker.io, so the manifests' plain names
# (PORTER_IMAGE and the others) resolve to the images pushed here; other images fall through to Docker Hub.
start_registry() {
  local node dir
  if [ "$(docker inspect -f '{{.State.Running}}' "$REGISTRY_NAME" 2>/dev/null)" != true ]; then
    docker rm -f "$REGISTRY_NAME" >/dev/null 2>&1 || true
    log "registry: starting $REGISTRY_IMAGE as $REGISTRY_NAME on 127.0.0.1:$REGISTRY_PORT"
    docker run -d --restart=always -p "127.0.0.1:$REGISTRY_PORT:5000" --network bridge \
      --name "$REGISTRY_NAME" "$REGISTRY_IMAGE" >/dev/null
  fi
  if [ "$(docker inspect -f '{{json .NetworkSettings.Networks.kind}}' "$REGISTRY_NAME")" = null ]; then
    docker network connect kind "$REGISTRY_NAME"
  fi
  for node in $(kind get nodes --name "$CLUSTER"); do
    for dir in "localhost:$REGISTRY_PORT" docker.io; do
      docker exec "$node" mkdir -p "/etc/containerd/certs.d/$dir"
    done
    printf '[host."http://%s:5000"]\n' "$REGISTRY_NAME" |
      docker exec -i "$node" cp /dev/stdin "/etc/containerd/certs.d/localhost:$REGISTRY_PORT/hosts.toml"
    printf 'server = "https://registry-1.docker.io"\n\n[host."http://%s:5000"]\n  capabilities = ["pull", "resolve"]\n' \
      "$REGISTRY_NAME" | docker exec -i "$node" cp /dev/stdin /etc/containerd/certs.d/docker.io/hosts.toml
  done
  # KEP-1755: tells tools where the cluster's local registry is.
  kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: ConfigMap
metadata:
  name: local-registry-hosting
  namespace: kube-public
data:
  localRegistryHosting.v1: |
    host: "localhost:$REGISTRY_PORT"
    help: "https://kind.sigs.k8s.io/docs/user/local-registry/"
EOF
}

# Every image of ours, built from deploy/docker, pushed to the local registry (where the nodes find
# them again after a cluster is re-created) and loaded into the node (there at once).
build_images() {
  local image
  log "images: building $PORTER_IMAGE, $MLFLOW_IMAGE, $PIPELINES_IMAGE (deploy/images.env)"
  docker build -q -f "$ROOT/deploy/docker/cloudhpc.Dockerfile" --target porter -t "$PORTER_IMAGE" "$ROOT" >/dev/null
  docker build -q -f "$ROOT/deploy/docker/mlflow.Dockerfile" -t "$MLFLOW_IMAGE" "$ROOT/deploy/docker" >/dev/null
  # torch's CPU build (deploy/docker/pipelines.Dockerfile's header says why)
  docker build -q -f "$ROOT/deploy/docker/pipelines.Dockerfile" \
    --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t "$PIPELINES_IMAGE" "$ROOT" >/dev/null
  for image in "$PORTER_IMAGE" "$MLFLOW_IMAGE" "$PIPELINES_IMAGE"; do
    docker tag "$image" "localhost:$REGISTRY_PORT/$image"
    docker push -q "localhost:$REGISTRY_PORT/$image" >/dev/null
  done
  log "images: pushed to localhost:$REGISTRY_PORT; loading into kind"
  kind load docker-image --name "$CLUSTER" "$PORTER_IMAGE" "$MLFLOW_IMAGE" "$PIPELINES_IMAGE"
}

# ---------------------------------------------------------------- credentials
rand_hex() { openssl rand -hex "$1"; }
rand_key_id() { openssl rand -hex 10 | tr 'a-f' 'A-F'; }

ensure_namespace() {
  kubectl create namespace "$1" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
}

# ensure_secret NAMESPACE NAME KEY[=VALUE]...: creates the Secret once; a KEY without a value gets a
# random one (an *_ACCESS_KEY_ID an S3-style key id). An existing Secret is never rotated here, so a
# re-run cannot lock a running PostgreSQL out of its own data.
ensure_secret() {
  local ns=$1 name=$2 arg key value args=()
  shift 2
  if kubectl -n "$ns" get secret "$name" >/dev/null 2>&1; then
    log "secret $ns/$name: exists"
    return 0
  fi
  for arg in "$@"; do
    key=${arg%%=*}
    if [ "$arg" != "$key" ]; then
      value=${arg#*=}
    elif [[ $key == *ACCESS_KEY_ID ]]; then
      value=$(rand_key_id)
    else
      value=$(rand_hex 24)
    fi
    args+=("--from-literal=$key=$value")
  done
  kubectl -n "$ns" create secret generic "$name" "${args[@]}" >/dev/null
  log "secret $ns/$name: created"
}

secret_value() { # NAMESPACE NAME KEY
  kubectl -n "$1" get secret "$2" -o "jsonpath={.data.$3}" | base64 -d
}

# The S3 server's identities, rebuilt from the key Secrets: "mlflow" may do everything, "cloudhpc"
# (porter) only its own bucket; the profiles' own ("profile-<namespace>", each limited to its
# prefixes: `cloudhpc platform profile add`) are kept from the current document.
put_s3_config() {
  local file current cloudhpc=""
  file=$(mktemp)
  if [ "$MONITORING" = 1 ]; then
    cloudhpc=$(printf ',\n    {"name": "cloudhpc", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],\n     "actions": ["Read:cloudhpc", "List:cloudhpc", "Tagging:cloudhpc", "Write:cloudhpc"]}' \
      "$(secret_value monitoring porter-secrets AWS_ACCESS_KEY_ID)" \
      "$(secret_value monitoring porter-secrets AWS_SECRET_ACCESS_KEY)")
  fi
  (umask 077; printf '{"identities": [\n    {"name": "mlflow", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],\n     "actions": ["Admin", "Read", "List", "Tagging", "Write"]}%s\n]}\n' \
    "$(secret_value mlflow mlflow-s3-credentials AWS_ACCESS_KEY_ID)" \
    "$(secret_value mlflow mlflow-s3-credentials AWS_SECRET_ACCESS_KEY)" "$cloudhpc" > "$file")
  current=$(kubectl -n mlflow get secret mlflow-s3-config -o 'jsonpath={.data.s3\.json}' 2>/dev/null | base64 -d || true)
  printf '%s' "$current" | "$ROOT/.venv/bin/python" -c 'import sys
from cloudhpc.cli.platform_profiles import merged_s3_config
with open(sys.argv[1]) as f: merged = merged_s3_config(f.read(), sys.stdin.read())
with open(sys.argv[1], "w") as f: f.write(merged)' "$file"
  if [ "$current" != "$(cat "$file")" ]; then
    kubectl -n mlflow create secret generic mlflow-s3-config --from-file=s3.json="$file" \
      --dry-run=client -o yaml | kubectl apply -f - >/dev/null
    log "secret mlflow/mlflow-s3-config: written"
    if kubectl -n mlflow get deployment mlflow-s3 >/dev/null 2>&1; then
      kubectl -n mlflow rollout restart deployment/mlflow-s3 >/dev/null
    fi
  fi
  rm -f "$file"
}

# porter's TLS certificate (Secret monitoring/porter-tls): the operator's (--tls-cert/--tls-key), or
# one for --public-address signed by a CA made here once. The laptop's submitter trusts that CA
# (docs/submitter.md: SSL_CERT_FILE). cert-manager can own the Secret instead (docs/platform.md).
make_tls() {
  local ca_key=$CONFIG_DIR/platform-ca.key ca=$CONFIG_DIR/platform-ca.pem tmpd san
  if [ "$MONITORING" != 1 ] || [ "$ENV_NAME" = dev ]; then return 0; fi
  if kubectl -n monitoring get secret porter-tls >/dev/null 2>&1; then
    log "secret monitoring/porter-tls: exists"
    return 0
  fi
  tmpd=$(mktemp -d)
  if [ -n "$TLS_CERT" ]; then
    cp "$TLS_CERT" "$tmpd/tls.crt"
    (umask 077; cp "$TLS_KEY" "$tmpd/tls.key")
  else
    [ -n "$PUBLIC_ADDRESS" ] || PUBLIC_ADDRESS=$(hostname -I | awk '{print $1}')
    case "$PUBLIC_ADDRESS" in
      *[!0-9.]*) san="DNS:$PUBLIC_ADDRESS" ;;
      *) san="IP:$PUBLIC_ADDRESS" ;;
    esac
    mkdir -p "$CONFIG_DIR"
    if [ ! -s "$ca_key" ]; then
      (umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$ca_key" 2>/dev/null)
      openssl req -x509 -new -key "$ca_key" -days 3650 -subj "/O=cloudhpc/CN=cloudhpc platform CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$ca" 2>/dev/null
      log "tls: CA $ca (copy it to the submitter's machine)"
    fi
    (umask 077; openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmpd/tls.key" 2>/dev/null)
    openssl req -new -key "$tmpd/tls.key" -subj "/O=cloudhpc/CN=$PUBLIC_ADDRESS" -out "$tmpd/tls.csr" 2>/dev/null
    printf 'subjectAltName=%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$san" > "$tmpd/ext"
    openssl x509 -req -in "$tmpd/tls.csr" -CA "$ca" -CAkey "$ca_key" -CAcreateserial -days 825 \
      -extfile "$tmpd/ext" -out "$tmpd/tls.crt" 2>/dev/null
    log "tls: porter's certificate for $san, signed by $ca"
  fi
  ensure_namespace monitoring
  kubectl -n monitoring create secret tls porter-tls --cert="$tmpd/tls.crt" --key="$tmpd/tls.key" >/dev/null
  rm -rf "$tmpd"
  log "secret monitoring/porter-tls: created"
}

# The port-forwards of the web interfaces as a systemd user unit (deploy/systemd), started at boot:
# lingering lets the user's units run without a login session.
install_forward_unit() {
  local unit_dir=$HOME/.config/systemd/user name=cloudhpc-platform-forward.service
  if ! command -v systemctl >/dev/null; then
    log "no systemd: run '$ROOT/.venv/bin/cloudhpc platform forward' yourself"
    return 0
  fi
  mkdir -p "$unit_dir"
  sed -e "s|@ROOT@|$ROOT|g" -e "s|@CONTEXT@|kind-$CLUSTER|g" "$ROOT/deploy/systemd/$name" > "$unit_dir/$name"
  sudo loginctl enable-linger "$USER"
  systemctl --user daemon-reload
  systemctl --user enable "$name" >/dev/null 2>&1
  systemctl --user restart "$name"
  log "port-forwards: systemd user unit $name (systemctl --user status ${name%.service})"
}

make_credentials() {
  if [ "$ENV_NAME" = dev ]; then
    log "credentials: THROWAWAY ones from deploy/kustomize/components/dev-credentials (dev only)"
    return 0
  fi
  ensure_namespace mlflow
  ensure_secret mlflow mlflow-db DB_PASSWORD
  ensure_secret mlflow mlflow-s3-credentials AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
  if [ "$MONITORING" = 1 ]; then
    ensure_namespace monitoring
    ensure_secret monitoring grafana-admin GF_SECURITY_ADMIN_USER=admin GF_SECURITY_ADMIN_PASSWORD
    ensure_secret monitoring porter-secrets AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
    ensure_secret monitoring metrics-scrape-token token   # porter's /metrics, sent by Prometheus
  fi
  put_s3_config
}

# ---------------------------------------------------------------- apply and wait
apply_environment() {
  local manifest tries=0
  manifest=$(mktemp --suffix=.yaml)
  log "building deploy/kustomize/$ENV_NAME (remote upstream parts are fetched now)"
  kustomize build "$KUSTOMIZE_DIR/$ENV_NAME" > "$manifest"
  # A Job's pod template is immutable and the bucket Job is idempotent: replace it on every run.
  kubectl -n mlflow delete job mlflow-s3-buckets --ignore-not-found >/dev/null
  # CRDs and webhooks become ready a little after they are created: apply until it all sticks.
  until kubectl apply --server-side --force-conflicts -f "$manifest" > "$manifest.log" 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -lt 30 ] || { tail -20 "$manifest.log" >&2; die "apply failed 30 times (see above)"; }
    log "apply: not everything accepted yet (try $tries), retrying in 20 s"
    sleep 20
  done
  log "apply: done"
  rm -f "$manifest" "$manifest.log"
}

publish_submitter_endpoint() {
  [ "$MONITORING" = 1 ] || return 0
  [ -n "$SUBMITTER_ADDRESS" ] || SUBMITTER_ADDRESS=$(hostname -I | awk '{print $1}')
  log "submitter metrics: Prometheus scrapes $SUBMITTER_ADDRESS:5556 (the submitter's reverse tunnel)"
  SUBMITTER_ADDRESS=$SUBMITTER_ADDRESS envsubst_address < "$KUSTOMIZE_DIR/monitoring/submitter-endpointslice.yaml.in" |
    kubectl apply -f - >/dev/null
}

envsubst_address() { sed "s/\${SUBMITTER_ADDRESS}/$SUBMITTER_ADDRESS/g"; }

# Ready when every pod is Ready or has completed (Jobs).
pods_ready() {
  kubectl get pods --all-namespaces --no-headers 2>/dev/null | awk '
    { split($3, r, "/"); total++
      if (!(r[1] == r[2] || $4 == "Completed" || $4 == "Succeeded")) { bad++; print "  waiting: " $1 "/" $2 " " $3 " " $4 } }
    END { exit (total == 0 || bad > 0) }'
}

wait_ready() {
  local deadline=$((SECONDS + TIMEOUT_MIN * 60)) out
  log "waiting up to $TIMEOUT_MIN min for every pod to be ready"
  until out=$(pods_ready); do
    [ "$SECONDS" -lt "$deadline" ] || { echo "$out" >&2; die "not ready after $TIMEOUT_MIN min"; }
    sleep 15
  done
  log "all pods ready"
}

# ---------------------------------------------------------------- tokens
porter_cli() { kubectl -n monitoring exec deploy/porter -c porter -- cloudhpc "$@"; }

make_tokens() {
  [ "$MONITORING" = 1 ] || return 0
  local token dir=$HOME/.config/cloudhpc
  if ! kubectl -n monitoring get secret porter-tokens >/dev/null 2>&1; then
    token=$(porter_cli tokens create --user admin --role admin)
    kubectl -n monitoring create secret generic porter-tokens --from-literal=admin-token="$token" >/dev/null
    log "token: admin token in secret monitoring/porter-tokens"
  fi
  if [ -n "$PIPELINE_NS" ] && ! kubectl -n "$PIPELINE_NS" get secret cloudhpc-porter >/dev/null 2>&1; then
    local waited=0
    # The profile controller creates the user's namespace; give it a few minutes.
    until kubectl get namespace "$PIPELINE_NS" >/dev/null 2>&1; do
      waited=$((waited + 5))
      [ "$waited" -le 300 ] || die "namespace $PIPELINE_NS did not appear in 5 min"
      sleep 5
    done
    token=$(porter_cli tokens create --user "$PIPELINE_NS" --role user)
    kubectl -n "$PIPELINE_NS" create secret generic cloudhpc-porter \
      --from-literal=CLOUDHPC_URL=http://porter-service.monitoring.svc.cluster.local:5555 \
      --from-literal=CLOUDHPC_TOKEN="$token" >/dev/null
    log "token: pipeline token in secret $PIPELINE_NS/cloudhpc-porter (CLOUDHPC_URL, CLOUDHPC_TOKEN)"
  fi
  # The pipelines' S3 keys (Secret cloudhpc-s3) and, in a Kubeflow profile, the PodDefault: what
  # `cloudhpc platform profile add` makes for every further user (it keeps the token made above).
  case "$ENV_NAME" in
    kubeflow*) "$ROOT/.venv/bin/cloudhpc" platform profile add user@example.com --namespace "$PIPELINE_NS" \
                 --apply --context "kind-$CLUSTER" >&2 ;;
    standalone-kfp*) "$ROOT/.venv/bin/cloudhpc" platform profile add pipelines --namespace "$PIPELINE_NS" \
                 --apply --secrets-only --context "kind-$CLUSTER" >&2 ;;
  esac
  if [ ! -s "$dir/agent-token-$HPC_CLUSTER" ]; then
    mkdir -p "$dir"
    # The agent token's user owns the cluster (docs/security.md): the pipelines' user, so that
    # pipeline steps may submit to it; other users need porter.access.
    token=$(porter_cli tokens create --user "${PIPELINE_NS:-agent-$HPC_CLUSTER}" --role agent --cluster "$HPC_CLUSTER")
    (umask 077; printf '%s\n' "$token" > "$dir/agent-token-$HPC_CLUSTER")
    log "token: agent token for cluster $HPC_CLUSTER in $dir/agent-token-$HPC_CLUSTER (copy it to the submitter's machine)"
  fi
}

print_access() {
  cat <<EOF

The platform ($ENV_NAME) is up on kind cluster $CLUSTER.

The port-forwards of the web interfaces run on this VM as the systemd user unit
cloudhpc-platform-forward (started at boot). From your own machine, tunnel the ones you need, e.g.
    ssh -L 8080:localhost:8080 -L 5000:localhost:5000 -L 5050:localhost:5050 cpouta

  Kubeflow / KFP UI   http://localhost:8080   $( [ -n "$PIPELINE_NS" ] && [ "$PIPELINE_NS" != kubeflow ] && echo "(user@example.com / 12341234: change it, docs/platform.md)")
  MLflow              http://localhost:5000
  MLflow S3           http://localhost:9001   (keys: kubectl -n mlflow get secret mlflow-s3-credentials -o yaml)
EOF
  if [ "$MONITORING" = 1 ]; then
    cat <<EOF
  Prometheus          http://localhost:8090
  Grafana             http://localhost:5050   (admin; password: kubectl -n monitoring get secret grafana-admin -o jsonpath='{.data.GF_SECURITY_ADMIN_PASSWORD}' | base64 -d)
  porter              https://${PUBLIC_ADDRESS:-<VM address>}:$PORTER_TLS_PORT   (no tunnel: open $PORTER_TLS_PORT to the submitter's address in the security group;
                      CA: $CONFIG_DIR/platform-ca.pem unless --tls-cert; admin token: kubectl -n monitoring get secret porter-tokens -o jsonpath='{.data.admin-token}' | base64 -d)

Next: copy $HOME/.config/cloudhpc/agent-token-$HPC_CLUSTER (and platform-ca.pem) to the machine
holding your HPC key and start the submitter there (docs/platform.md, "The submitter"); give each
further user a profile with 'cloudhpc platform profile add USER --apply'; then run
scripts/platform-check.sh.
EOF
  fi
}

main() {
  check_machine
  if [ "$INSTALL_TOOLS" = 1 ]; then install_tools; fi
  require_tools
  install_cli
  create_cluster
  start_registry
  if [ "$BUILD_IMAGES" = 1 ]; then build_images; fi
  make_credentials
  make_tls
  apply_environment
  publish_submitter_endpoint
  wait_ready
  make_tokens
  if [ "$FORWARD_UNIT" = 1 ]; then install_forward_unit; fi
  print_access
}

main
