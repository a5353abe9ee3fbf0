#!/bin/bash
# cloudhpc job 12345678-1234-5678-1234-567812345678: one Ray worker node, started by srun from the job script; do not edit
set -u
chpc_control='/home/u/we ird $(touch x) '"'"'q'"'"'/.cloudhpc/jobs/12345678-1234-5678-1234-567812345678/.cloudhpc'
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
chpc_tmp=$(mktemp -d /tmp/chpc.XXXXXX) || { echo "cloudhpc: cannot create a directory in /tmp" >&2; exit 97; }
read -r chpc_agent chpc_metrics chpc_rtenv <<<"$(python3 "$chpc_control/ray_helpers.py" ports 3)"
chpc_ip="$(python3 "$chpc_control/ray_helpers.py" node-ip)"
export RAY_TMPDIR="$chpc_tmp" RAY_USAGE_STATS_ENABLED=0
echo "cloudhpc: Ray worker on $(hostname -s) ($chpc_ip) joining $CLOUDHPC_RAY_HEAD"
setsid ray start --address="$CLOUDHPC_RAY_HEAD" --block --disable-usage-stats --log-style=record --log-color=false \
  --node-ip-address="$chpc_ip" --dashboard-agent-listen-port="$chpc_agent" \
  --metrics-export-port="$chpc_metrics" --runtime-env-agent-port="$chpc_rtenv" \
  --temp-dir="$chpc_tmp" --num-cpus=8 --num-gpus=1 </dev/null &
chpc_pid=$!
chpc_done() { chpc_stop_session "$chpc_pid"; rm -rf "$chpc_tmp"; }
trap 'chpc_done; exit 143' TERM INT
wait "$chpc_pid"; chpc_rc=$?
chpc_done
exit "$chpc_rc"
