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
      -R 0.0.0.0:19501:127.0.0.1:"$chpc_client" \
      -R 0.0.0.0:19502:127.0.0.1:"$chpc_metrics" \
      -R 0.0.0.0:19503:127.0.0.1:6006 \
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
echo 'cloudhpc: bridge tunnel started (dashboard -> 0.0.0.0:19500, client -> 0.0.0.0:19501, metrics -> 0.0.0.0:19502, tensorboard -> 0.0.0.0:19503)'
