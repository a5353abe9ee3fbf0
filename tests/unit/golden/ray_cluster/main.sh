# a ray-cluster serves until its time limit or a cancel (SIGTERM runs chpc_cleanup)
wait "$chpc_head_pid"; chpc_rc=$?
echo "cloudhpc: the Ray head exited (status $chpc_rc) before the job ended" >&2
if [ "$chpc_rc" -eq 0 ]; then chpc_rc=1; fi
exit "$chpc_rc"
