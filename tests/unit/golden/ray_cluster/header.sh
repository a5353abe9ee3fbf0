# ---- cloudhpc: ray-cluster with 3 Ray node(s); rendered by cloudhpc, do not edit
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
