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
