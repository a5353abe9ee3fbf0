chpc_helpers wait-ready --dashboard "$chpc_dashboard" --nodes 3 --pid "$chpc_head_pid" --timeout 300 || {
  echo "cloudhpc: the Ray cluster did not come up (see above)" >&2
  exit 96
}
touch "$chpc_state/ready"
echo "cloudhpc: Ray cluster ready: 3 node(s)"
