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
