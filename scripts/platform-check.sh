#!/usr/bin/env bash
# Smoke test of a running platform (made by scripts/platform-up.sh), on the VM:
#   1. every pod is ready (or completed);
#   2. MLflow answers, and creates and deletes an experiment;
#   3. porter answers /healthz and /readyz, refuses a request without a token and accepts the admin token;
#      over TLS on the VM's port 5443 too (what the submitter uses), where /metrics is not served;
#      the network policies are in place;
#   4. Prometheus scrapes porter (target up);
#   5. Grafana has the cloudhpc dashboards provisioned;
#   6. a test job through a configured HPC cluster completes (needs its submitter running).
#
#   scripts/platform-check.sh [--cluster NAME] [--no-job] [--job-timeout SECONDS]
#
# Prints one line per check and exits 1 if any failed. Reaches the services with short-lived
# `kubectl port-forward`s on free local ports, stopped again at exit.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HPC_CLUSTER=mahti
RUN_JOB=1
JOB_TIMEOUT=1800
CLI=$ROOT/.venv/bin/cloudhpc

while [ $# -gt 0 ]; do
  case "$1" in
    --cluster) HPC_CLUSTER=${2:?--cluster needs a name}; shift ;;
    --no-job) RUN_JOB=0 ;;
    --job-timeout) JOB_TIMEOUT=${2:?--job-timeout needs seconds}; shift ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

FAILED=0
FORWARD_PIDS=()
TMP=$(mktemp -d)
# shellcheck disable=SC2329  # run by the EXIT trap
cleanup() {
  local pid
  for pid in "${FORWARD_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT

ok() { printf 'ok      %s\n' "$*"; }
fail() { printf 'FAILED  %s\n' "$*"; FAILED=1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# forward NAMESPACE SERVICE REMOTE_PORT -> prints the local port once it accepts connections
forward() {
  local ns=$1 svc=$2 remote=$3 port pid _
  kubectl -n "$ns" get service "$svc" >/dev/null 2>&1 || return 1
  port=$(free_port)
  kubectl -n "$ns" port-forward "service/$svc" "$port:$remote" --address 127.0.0.1 >"$TMP/pf-$svc.log" 2>&1 &
  pid=$!
  FORWARD_PIDS+=("$pid")
  for _ in $(seq 1 50); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "$port"; return 0; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  return 1
}

secret() { kubectl -n "$1" get secret "$2" -o "jsonpath={.data.$3}" 2>/dev/null | base64 -d; }

# ---------------------------------------------------------------- 1. pods
check_pods() {
  local notready
  notready=$(kubectl get pods --all-namespaces --no-headers 2>/dev/null | awk '
    { split($3, r, "/"); if (!(r[1] == r[2] || $4 == "Completed" || $4 == "Succeeded")) print $1 "/" $2 " " $3 " " $4 }')
  if ! kubectl get pods --all-namespaces --no-headers >/dev/null 2>&1; then
    fail "pods: cannot list pods (is kubectl pointed at the platform's cluster?)"
  elif [ -z "$notready" ]; then
    ok "pods: all ready ($(kubectl get pods -A --no-headers | wc -l) pods)"
  else
    fail "pods: not ready: $(echo "$notready" | tr '\n' ';')"
  fi
}

# ---------------------------------------------------------------- 2. MLflow
check_mlflow() {
  local port name id
  port=$(forward mlflow mlflow 5000) || { fail "mlflow: no port-forward to service mlflow/mlflow"; return; }
  if ! curl -fsS "http://localhost:$port/health" >/dev/null; then
    fail "mlflow: /health does not answer"; return
  fi
  name="platform-check-$(date +%s)-$$"
  id=$(curl -fsS -X POST -H 'Content-Type: application/json' -d "{\"name\": \"$name\"}" \
    "http://localhost:$port/api/2.0/mlflow/experiments/create" | python3 -c 'import json, sys; print(json.load(sys.stdin)["experiment_id"])') ||
    { fail "mlflow: could not create an experiment"; return; }
  curl -fsS -X POST -H 'Content-Type: application/json' -d "{\"experiment_id\": \"$id\"}" \
    "http://localhost:$port/api/2.0/mlflow/experiments/delete" >/dev/null ||
    { fail "mlflow: could not delete experiment $id"; return; }
  ok "mlflow: answers; created and deleted experiment $id"
}

# ---------------------------------------------------------------- 3. porter
PORTER_PORT=""
check_porter() {
  local token code
  PORTER_PORT=$(forward monitoring porter-service 5555) || { fail "porter: no port-forward to monitoring/porter-service"; return; }
  curl -fsS "http://127.0.0.1:$PORTER_PORT/healthz" >/dev/null || { fail "porter: /healthz does not answer"; return; }
  curl -fsS "http://127.0.0.1:$PORTER_PORT/readyz" >/dev/null || { fail "porter: /readyz says not ready"; return; }
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORTER_PORT/api/v1/clusters")
  [ "$code" = 401 ] || { fail "porter: a request without a token got HTTP $code, not 401"; return; }
  token=$(secret monitoring porter-tokens admin-token)
  [ -n "$token" ] || { fail "porter: no admin token in secret monitoring/porter-tokens (run scripts/platform-up.sh)"; return; }
  # the header from a file (curl -H @FILE): a token on curl's command line is readable in /proc
  (umask 077; printf 'Authorization: Bearer %s\n' "$token" > "$TMP/auth")
  curl -fsS -H "@$TMP/auth" "http://127.0.0.1:$PORTER_PORT/api/v1/clusters" > "$TMP/clusters.json" ||
    { fail "porter: the admin token was refused"; return; }
  ok "porter: healthy and ready; 401 without a token; clusters: $(python3 -c 'import json, sys; print(", ".join(c["name"] + (" (agent online)" if c["agent_online"] else "") for c in json.load(open(sys.argv[1]))["clusters"]) or "none yet")' "$TMP/clusters.json")"
}

# ---------------------------------------------------------------- 3b. porter over TLS, as the submitter sees it
# The VM's port 5443 (kind's mapping -> NodePort porter-external -> the pod's tls container). The
# certificate is checked against platform-up.sh's CA (which it issues for localhost too); with a
# certificate of your own, check it from your machine against the name it was issued for.
check_porter_tls() {
  local ca=$HOME/.config/cloudhpc/platform-ca.pem url=https://127.0.0.1:5443 verify code
  if [ -s "$ca" ]; then verify=(--cacert "$ca"); else verify=(--insecure); fi
  curl -fsS "${verify[@]}" "$url/healthz" >/dev/null ||
    { fail "porter over TLS: $url/healthz does not answer (kind port mapping, Service porter-external, secret porter-tls)"; return; }
  code=$(curl -s "${verify[@]}" -o /dev/null -w '%{http_code}' "$url/metrics")
  [ "$code" = 404 ] || { fail "porter over TLS: /metrics answered HTTP $code outside the cluster, not 404"; return; }
  curl -fsS "${verify[@]}" -H "@$TMP/auth" "$url/api/v1/clusters" >/dev/null ||
    { fail "porter over TLS: the admin token was refused"; return; }
  if [ -s "$ca" ]; then
    ok "porter over TLS: $url answers with a certificate of $ca; /metrics stays inside"
  else
    ok "porter over TLS: $url answers (certificate NOT checked here: yours; check it from your machine)"
  fi
}

# ---------------------------------------------------------------- 3c. network policies
check_network_policies() {
  local ns missing=""
  for ns in mlflow monitoring; do
    kubectl -n "$ns" get networkpolicy default-deny-ingress >/dev/null 2>&1 || missing="$missing $ns"
  done
  if [ -n "$missing" ]; then
    fail "network policies: no default-deny-ingress in:$missing"
  else
    ok "network policies: default-deny ingress in mlflow and monitoring, $(kubectl get networkpolicy -A --no-headers 2>/dev/null | awk '$1 == "mlflow" || $1 == "monitoring"' | wc -l) policies"
  fi
}

# ---------------------------------------------------------------- 4. Prometheus
check_prometheus() {
  local port
  port=$(forward monitoring prometheus-service 8080) || { fail "prometheus: no port-forward to monitoring/prometheus-service"; return; }
  curl -fsS "http://127.0.0.1:$port/api/v1/targets?state=active" > "$TMP/targets.json" || { fail "prometheus: /api/v1/targets does not answer"; return; }
  if python3 - "$TMP/targets.json" <<'PY'
import json, sys
targets = json.load(open(sys.argv[1]))["data"]["activeTargets"]
porter = [t for t in targets if t["labels"].get("job") == "cloudhpc-porter"]
sys.exit(0 if porter and all(t["health"] == "up" for t in porter) else 1)
PY
  then
    ok "prometheus: scrapes porter (job cloudhpc-porter up)"
  else
    fail "prometheus: job cloudhpc-porter is missing or down (see http://localhost:8090/targets)"
  fi
}

# ---------------------------------------------------------------- 5. Grafana
check_grafana() {
  local port user password
  port=$(forward monitoring grafana 3000) || { fail "grafana: no port-forward to monitoring/grafana"; return; }
  user=$(secret monitoring grafana-admin GF_SECURITY_ADMIN_USER)
  password=$(secret monitoring grafana-admin GF_SECURITY_ADMIN_PASSWORD)
  curl -fsS -u "$user:$password" "http://127.0.0.1:$port/api/search?type=dash-db" > "$TMP/dashboards.json" ||
    { fail "grafana: /api/search refused the admin login"; return; }
  if python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); sys.exit(0 if any(x.get("folderTitle") == "cloudhpc" for x in d) else 1)' "$TMP/dashboards.json"; then
    ok "grafana: cloudhpc dashboards provisioned"
  else
    fail "grafana: no dashboard in folder cloudhpc"
  fi
}

# ---------------------------------------------------------------- 6. a job on HPC
check_job() {
  local token script
  [ -n "$PORTER_PORT" ] || { fail "job: porter is not reachable"; return; }
  [ -x "$CLI" ] || { fail "job: $CLI missing (run scripts/platform-up.sh)"; return; }
  token=$(secret monitoring porter-tokens admin-token)
  script=$TMP/job.sh
  # shellcheck disable=SC2016  # expanded by the job, on the cluster
  printf '#!/bin/bash\necho "platform-check on $(hostname) at $(date -Is)"\n' > "$script"
  if CLOUDHPC_URL="http://127.0.0.1:$PORTER_PORT" CLOUDHPC_TOKEN="$token" \
    "$CLI" jobs submit --name platform-check --cluster "$HPC_CLUSTER" --script "$script" \
    --wait --timeout "$JOB_TIMEOUT" > "$TMP/job.out" 2> "$TMP/job.err"; then
    ok "job: a batch job on $HPC_CLUSTER completed ($(tail -1 "$TMP/job.err"))"
  else
    fail "job: on $HPC_CLUSTER: $(tail -2 "$TMP/job.err" | tr '\n' ' ') (is its submitter running? cloudhpc clusters list)"
  fi
}

check_pods
check_mlflow
if kubectl get namespace monitoring >/dev/null 2>&1; then
  check_porter
  check_porter_tls
  check_network_policies
  check_prometheus
  check_grafana
  if [ "$RUN_JOB" = 1 ]; then check_job; fi
else
  echo "skipped porter, Prometheus, Grafana and the HPC job: this environment has no monitoring namespace"
fi

if [ "$FAILED" = 0 ]; then echo "platform-check: all checks passed"; else echo "platform-check: FAILED"; fi
exit "$FAILED"
