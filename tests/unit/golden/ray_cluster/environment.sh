read -r chpc_gcs chpc_dashboard chpc_client chpc_agent chpc_metrics chpc_rtenv <<<"$(chpc_helpers ports 6)"
[ -n "$chpc_rtenv" ] || { echo "cloudhpc: could not pick free ports on $(hostname -s)" >&2; exit 97; }
chpc_ip=$(chpc_helpers node-ip)
export RAY_TMPDIR="$chpc_tmp" RAY_USAGE_STATS_ENABLED=0
cat > "$chpc_state/ports.env" <<CHPC_PORTS
RAY_NODE_IP=$chpc_ip
RAY_GCS_PORT=$chpc_gcs
RAY_DASHBOARD_PORT=$chpc_dashboard
RAY_CLIENT_PORT=$chpc_client
RAY_METRICS_PORT=$chpc_metrics
RAY_TMPDIR=$chpc_tmp
CHPC_PORTS
