#!/bin/bash
# cloudhpc job 12345678-1234-5678-1234-567812345678 (ray-job); rendered by cloudhpc, do not edit
cd '/home/u/we ird $(touch x) '"'"'q'"'"'/.cloudhpc/jobs/12345678-1234-5678-1234-567812345678' || exit 97
export CLOUDHPC_JOB_ID=12345678-1234-5678-1234-567812345678
export CLOUDHPC_JOB_NAME=ray-job
export CLOUDHPC_JOB_DIR='/home/u/we ird $(touch x) '"'"'q'"'"'/.cloudhpc/jobs/12345678-1234-5678-1234-567812345678'
# the job's env values: from a 0600 file, never in this script (deleted when the job ends)
. '/home/u/we ird $(touch x) '"'"'q'"'"'/.cloudhpc/jobs/12345678-1234-5678-1234-567812345678/.cloudhpc/env' || exit 97
# cached Python environment
source /envs/abc/venv/bin/activate
# ---- cloudhpc: ray-job with 1 Ray node(s); rendered by cloudhpc, do not edit
set -u
chpc_control='/home/u/we ird $(touch x) '"'"'q'"'"'/.cloudhpc/jobs/12345678-1234-5678-1234-567812345678/.cloudhpc'
chpc_state="$chpc_control/ray"
mkdir -p "$chpc_state" || exit 97
command -v ray >/dev/null 2>&1 || {
  echo "cloudhpc: 'ray' is not in this job's environment: add \"ray[default]\" to environment.packages" >&2
  exit 98
}
chpc_helpers() { python3 "$chpc_control/ray_helpers.py" "$@"; }
# stop one `ray start --block` and everything it started: TERM its process group, then KILL
# whatever is left in its session (Ray's workers have their own process groups). Never `ray stop`:
# it stops every Ray process of this user on the node, other jobs' clusters included.
chpc_stop_session() {  # PID [TENTHS of a second of grace]
  local sid=$1 grace=${2:-10} i
  kill -TERM -- "-$sid" 2>/dev/null || return 0
  for ((i = 0; i < grace; i++)); do
    kill -0 -- "-$sid" 2>/dev/null || break
    sleep 0.1
  done
  ps -o pid= --sid "$sid" 2>/dev/null | xargs -r kill -KILL 2>/dev/null
  return 0
}
chpc_head_pid= chpc_workers_pid= chpc_tunnel_pid= chpc_main_pid= chpc_cleaned=
chpc_tmp=$(mktemp -d /tmp/chpc.XXXXXX) || { echo "cloudhpc: cannot create a directory in /tmp" >&2; exit 97; }
chpc_cleanup() {  # [TENTHS of a second Ray gets to stop]
  [ -n "$chpc_cleaned" ] && return 0
  chpc_cleaned=1
  [ -n "$chpc_tunnel_pid" ] && kill "$chpc_tunnel_pid" 2>/dev/null
  [ -s "$chpc_state/tunnel.pid" ] && kill "$(cat "$chpc_state/tunnel.pid")" 2>/dev/null
  [ -n "$chpc_main_pid" ] && kill "$chpc_main_pid" 2>/dev/null
  [ -n "$chpc_workers_pid" ] && kill "$chpc_workers_pid" 2>/dev/null
  [ -n "$chpc_head_pid" ] && chpc_stop_session "$chpc_head_pid" "${1:-10}"
  rm -rf "$chpc_tmp"
  rm -f '/home/u/we ird $(touch x) '"'"'q'"'"'/.cloudhpc/jobs/12345678-1234-5678-1234-567812345678/.cloudhpc/bridge_key'
  return 0
}
trap 'chpc_cleanup; exit 143' TERM
trap 'chpc_cleanup; exit 130' INT
trap chpc_cleanup EXIT
read -r chpc_gcs chpc_dashboard chpc_client chpc_agent chpc_metrics chpc_rtenv <<<"$(chpc_helpers ports 6)"
[ -n "$chpc_rtenv" ] || { echo "cloudhpc: could not pick free ports on $(hostname -s)" >&2; exit 97; }
chpc_ip=127.0.0.1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_TMPDIR="$chpc_tmp" RAY_USAGE_STATS_ENABLED=0
cat > "$chpc_state/ports.env" <<CHPC_PORTS
RAY_NODE_IP=$chpc_ip
RAY_GCS_PORT=$chpc_gcs
RAY_DASHBOARD_PORT=$chpc_dashboard
RAY_CLIENT_PORT=$chpc_client
RAY_METRICS_PORT=$chpc_metrics
RAY_TMPDIR=$chpc_tmp
CHPC_PORTS
echo "cloudhpc: starting the Ray head on $(hostname -s): GCS $chpc_ip:$chpc_gcs, dashboard 127.0.0.1:$chpc_dashboard, temp dir $chpc_tmp"
setsid ray start --head --block --disable-usage-stats --log-style=record --log-color=false \
  --node-ip-address="$chpc_ip" --port="$chpc_gcs" --include-dashboard=true \
  --dashboard-host=127.0.0.1 --dashboard-port="$chpc_dashboard" --ray-client-server-port="$chpc_client" \
  --dashboard-agent-listen-port="$chpc_agent" --metrics-export-port="$chpc_metrics" \
  --runtime-env-agent-port="$chpc_rtenv" --temp-dir="$chpc_tmp" --num-cpus="${SLURM_CPUS_ON_NODE:-1}" </dev/null &
chpc_head_pid=$!
read -r chpc_import_0 chpc_import_1 <<<"$(chpc_helpers ports 2)"
export CLOUDHPC_IMPORT_MLFLOW=127.0.0.1:"$chpc_import_0"
export CLOUDHPC_IMPORT_S3_STORE=127.0.0.1:"$chpc_import_1"
# the bridges: one supervised ssh to the bridge VM (-R per exported port, -L per import)
chpc_tunnel() {
  local delay=1 started status
  while :; do
    started=$SECONDS
    ssh -N -T \
      -F /dev/null \
      -i '/home/u/we ird $(touch x) '"'"'q'"'"'/.cloudhpc/jobs/12345678-1234-5678-1234-567812345678/.cloudhpc/bridge_key' \
      -o IdentitiesOnly=yes \
      -o IdentityAgent=none \
      -o BatchMode=yes \
      -o ExitOnForwardFailure=yes \
      -o ServerAliveInterval=5 \
      -o ServerAliveCountMax=3 \
      -o ConnectTimeout=10 \
      -o StrictHostKeyChecking=yes \
      -o 'UserKnownHostsFile=/home/u/we ird $(touch x) '"'"'q'"'"'/.cloudhpc/jobs/12345678-1234-5678-1234-567812345678/.cloudhpc/bridge_known_hosts' \
      -o GlobalKnownHostsFile=/dev/null \
      -o UpdateHostKeys=no \
      -o ControlMaster=no \
      -o ControlPath=none \
      -o LogLevel=ERROR \
      -p 2222 \
      -R 0.0.0.0:19500:127.0.0.1:"$chpc_dashboard" \
      -L 127.0.0.1:"$chpc_import_0":10.0.0.5:5000 \
      -L 127.0.0.1:"$chpc_import_1":s3:9000 \
      -- \
      cloudhpc@bridge.example.org </dev/null &
    echo $! > '/home/u/we ird $(touch x) '"'"'q'"'"'/.cloudhpc/jobs/12345678-1234-5678-1234-567812345678/.cloudhpc/ray/tunnel.pid'
    wait "$!"; status=$?
    if [ $((SECONDS - started)) -ge 10 ]; then delay=1; fi
    echo "cloudhpc: bridge tunnel to "cloudhpc@bridge.example.org:2222" ended (status $status); reconnecting in ${delay}s" >&2
    sleep "$delay"
    if [ "$delay" -lt 8 ]; then delay=$((delay * 2)); fi
  done
}
chpc_tunnel &
chpc_tunnel_pid=$!
echo 'cloudhpc: bridge tunnel started (dashboard -> 0.0.0.0:19500, mlflow <- 10.0.0.5:5000, s3.store <- s3:9000)'
chpc_helpers wait-ready --dashboard "$chpc_dashboard" --nodes 1 --pid "$chpc_head_pid" --timeout 300 || {
  echo "cloudhpc: the Ray cluster did not come up (see above)" >&2
  exit 96
}
touch "$chpc_state/ready"
echo "cloudhpc: Ray cluster ready: 1 node(s)"
chpc_helpers wait-ports "$chpc_import_0" "$chpc_import_1" --pid "$chpc_tunnel_pid" --timeout 60 || true
# a ray-job ends with its entrypoint, with the entrypoint's exit status
export RAY_ADDRESS="$chpc_ip:$chpc_gcs"
export CLOUDHPC_RAY_DASHBOARD_URL="http://127.0.0.1:$chpc_dashboard"
# Ray >= 2.5x turns on token auth for every cluster a user starts once ~/.ray/auth_token
# exists; a driver joining such a cluster must then ask for it too
if [ -z "${RAY_AUTH_MODE:-}" ] && [ -s "$HOME/.ray/auth_token" ]; then export RAY_AUTH_MODE=token; fi
echo "cloudhpc: running the entrypoint"
/bin/bash "$chpc_control/entrypoint" </dev/null &
chpc_main_pid=$!
wait "$chpc_main_pid"; chpc_rc=$?
chpc_main_pid=
# the entrypoint is done: nothing of Ray is worth waiting for
chpc_cleanup 3
echo "cloudhpc: the entrypoint exited with status $chpc_rc"
exit "$chpc_rc"
