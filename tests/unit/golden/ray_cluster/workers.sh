export CLOUDHPC_RAY_HEAD="$chpc_ip:$chpc_gcs"
srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --exclude="$SLURMD_NODENAME" --kill-on-bad-exit=0 ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
  /bin/bash "$chpc_control/ray_worker.sh" </dev/null &
chpc_workers_pid=$!
