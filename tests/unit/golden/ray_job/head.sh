echo "cloudhpc: starting the Ray head on $(hostname -s): GCS $chpc_ip:$chpc_gcs, dashboard 127.0.0.1:$chpc_dashboard, temp dir $chpc_tmp"
setsid ray start --head --block --disable-usage-stats --log-style=record --log-color=false \
  --node-ip-address="$chpc_ip" --port="$chpc_gcs" --include-dashboard=true \
  --dashboard-host=127.0.0.1 --dashboard-port="$chpc_dashboard" --ray-client-server-port="$chpc_client" \
  --dashboard-agent-listen-port="$chpc_agent" --metrics-export-port="$chpc_metrics" \
  --runtime-env-agent-port="$chpc_rtenv" --temp-dir="$chpc_tmp" --num-cpus="${SLURM_CPUS_ON_NODE:-1}" </dev/null &
chpc_head_pid=$!
