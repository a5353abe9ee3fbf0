# shellcheck shell=bash
# scripts/testbed-lib.sh -- what scripts/testbed.sh and scripts/topology.sh share (docs/testbed.md).
# Sourced by both, never run. The sourcing script sets before it sources this file:
#   TB_NAME   testbed | topology: the log prefix, the script named in written files, the policy-rc.d backup
# and before it calls the functions that use them:
#   LOGD (its log dir), PG_SOCK and PG_PORT (its PostgreSQL), and a function `slurm CMD...` that runs a
#   SLURM command against its cluster.
# It sets ROOT (the checkout), TB (the single-host testbed's state), KEYS and VENV (the testbed's
# client/bridge keys and tools venv, which the topology reuses).
# A daemon runs in the root namespace or in one of the topology's hosts: the functions that start one
# take the command that runs it, prefix included (`nohup` here, `nsenter --net=... --uts=... --` there).
# shellcheck disable=SC2154  # TB_NAME, LOGD, PG_SOCK, PG_PORT: set by the sourcing script

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
TB=$ROOT/.testbed
# shellcheck disable=SC2034  # used by the sourcing scripts
KEYS=$TB/keys
VENV=$TB/venv
PGBIN=/usr/lib/postgresql/15/bin

T0=$(date +%s.%N)
log() { printf '[%s %s] %s\n' "$(date +%H:%M:%S.%3N)" "$TB_NAME" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }
randhex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
q() { printf '%q' "$1"; }
home_of() { getent passwd "$1" | cut -d: -f6; }
write_if_changed() { # write_if_changed FILE (content on stdin); returns 0 if changed
  local f=$1 tmp="$1.new.$$"
  cat > "$tmp"
  if [ -f "$f" ] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; return 1; fi
  mv "$tmp" "$f"; return 0
}
wait_for() { # wait_for SECONDS WHAT CMD...
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out after ${t}s waiting for $what"
}
wait_ready() { # wait_ready SECONDS WHAT PIDFILE COMM LOGFILE CMD...: like wait_for, failing at once if the process exits
  local t=$1 what=$2 pf=$3 comm=$4 lf=$5; shift 5
  for _ in $(seq 1 $((t * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    alive "$pf" "$comm" || { tail -20 "$lf" >&2; die "$what: the process exited (see $lf)"; }
    sleep 0.1
  done
  tail -20 "$lf" >&2
  die "timed out after ${t}s waiting for $what (see $lf)"
}
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }   # port_open ADDR PORT, from the root namespace
http_ok() { [ "$(curl -s -o /dev/null -w '%{http_code}' "$1")" = 200 ]; }   # http_ok URL: it answers 200

# ---------------------------------------------------------------- pid helpers (never by name)
# running PID: exists and is not a zombie
running() {
  local st
  st=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
pid_of() { [ -s "$1" ] && head -1 "$1" | tr -dc '0-9'; }
# alive PIDFILE COMM: the pid in PIDFILE runs and its /proc/PID/comm is COMM
alive() {
  local p
  p=$(pid_of "$1") || return 1
  [ -n "$p" ] && running "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]
}
# alive_ns PIDFILE COMM NETNS: alive, and in the network namespace whose file is NETNS
alive_ns() {
  alive "$1" "$2" || return 1
  local a b
  a=$(stat -L -c %i "/proc/$(pid_of "$1")/ns/net" 2>/dev/null) || return 1
  b=$(stat -L -c %i "$3" 2>/dev/null) || return 1
  [ "$a" = "$b" ]
}
stop_pid() { # stop_pid PID NAME [group]: SIGTERM (to its process group with `group`), SIGKILL after 15 s
  local p=$1 name=$2 target=$1
  [ "${3:-}" = group ] && target=-$1
  log "stopping $name (pid $p)"
  kill -TERM -- "$target" 2>/dev/null || true
  for _ in $(seq 1 150); do running "$p" || return 0; sleep 0.1; done
  log "$name (pid $p) did not stop in 15 s: SIGKILL"
  kill -KILL -- "$target" 2>/dev/null || true
  for _ in $(seq 1 50); do running "$p" || return 0; sleep 0.1; done
}
stop_pidfile() { # stop_pidfile PIDFILE COMM [group]
  if alive "$1" "$2"; then stop_pid "$(pid_of "$1")" "$2" "${3:-}"; fi
  rm -f "$1"
}
# start_bg PIDFILE LOGFILE CMD...: CMD in a session of its own, in the background, with the lock file
# descriptors closed (a running daemon never holds a lock); its pid (CMD's own: exec, no fork) to PIDFILE
start_bg() {
  local pf=$1 lf=$2; shift 2
  setsid "$@" > "$lf" 2>&1 < /dev/null 8>&- 9>&- &
  echo $! > "$pf"
}

# ---------------------------------------------------------------- packages
# No systemd here: postinst scripts would start munge, sshd on :22, slurm, mariadb, postgresql through
# /etc/init.d. A policy-rc.d that answers 101 forbids that; ours is removed afterwards (and an existing
# one is put back).
POLICY=/usr/sbin/policy-rc.d
POLICY_BAK=/usr/sbin/policy-rc.d.cloudhpc-$TB_NAME-saved
POLICY_MADE=0
restore_policy() {
  [ "$POLICY_MADE" = 1 ] || return 0
  if [ -e "$POLICY_BAK" ]; then mv -f "$POLICY_BAK" "$POLICY"; else rm -f "$POLICY"; fi
  POLICY_MADE=0
}
trap restore_policy EXIT
forbid_service_starts() { # until restore_policy
  [ -e "$POLICY_BAK" ] && mv -f "$POLICY_BAK" "$POLICY"     # left over by a killed run
  [ -e "$POLICY" ] && cp -p "$POLICY" "$POLICY_BAK"
  POLICY_MADE=1
  printf '#!/bin/sh\n# temporary, written by cloudhpc scripts/%s.sh\nexit 101\n' "$TB_NAME" > "$POLICY"
  chmod 755 "$POLICY"
}
missing_pkgs() { # missing_pkgs "PKG...": one line per package that is not installed
  local p
  for p in $1; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s\n' "$p"
  done
}

# ---------------------------------------------------------------- SLURM
# slurm_conf HEADER CLUSTER CTLDHOST STATEDIR SPOOLDIR CTLDPID SLURMDPID CTLDLOG SLURMDLOG ACCTHOST LINE...:
# a slurm.conf; the LINEs (nodes, partitions) at its end
slurm_conf() {
  cat <<EOF
$1
ClusterName=$2
SlurmctldHost=$3
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again cred_expire+1 s later (default 120): 30 keeps the requeue tests short
AuthInfo=cred_expire=30
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$4
SlurmdSpoolDir=$5
SlurmctldPidFile=$6
SlurmdPidFile=$7
SlurmctldLogFile=$8
SlurmdLogFile=$9
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=${10}
AccountingStoragePort=6819
AccountingStoreFlags=job_comment
SlurmdParameters=config_overrides
EOF
  shift 10
  printf '%s\n' "$@"
}
# first_job_id STATEDIR: the FirstJobId of the controller whose state is STATEDIR, chosen once when
# the directory is fresh and kept in it (a warm `up` writes the same slurm.conf; a wiped state takes a
# new one). The seconds of the clock, below SLURM's MaxJobId (67043328) less a margin: a fresh
# controller would hand out 1, 2, 3... again, ids an earlier run's records in the shared accounting
# database (same cluster name) already have; a later fresh state starts above the earlier one unless
# the earlier handed out more ids than the seconds between them, or ~2 years wrapped the count.
first_job_id() {
  local f=$1/cloudhpc-first-job-id
  if ! grep -qx '[0-9][0-9]*' "$f" 2>/dev/null; then
    echo $(( $(date +%s) % 66000000 + 1000 )) > "$f"
  fi
  cat "$f"
}
# slurmdbd_conf HEADER DBDHOST DBDADDR LOGFILE PIDFILE DBUSER DBPASS DB: a slurmdbd.conf on MariaDB
slurmdbd_conf() {
  cat <<EOF
$1
AuthType=auth/munge
DbdHost=$2
DbdAddr=$3
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$4
PidFile=$5
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$6
StoragePass=$7
StorageLoc=$8
EOF
}
# mariadb_grant USER PASSWORD DB: USER@localhost with PASSWORD, all rights on DB
mariadb_grant() {
  mysql -e "CREATE USER IF NOT EXISTS '$1'@'localhost' IDENTIFIED BY '$2';
            ALTER USER '$1'@'localhost' IDENTIFIED BY '$2';
            GRANT ALL ON $3.* TO '$1'@'localhost'; FLUSH PRIVILEGES;"
}
register_accounting() { # register_accounting CLUSTER USER: account default with USER and root
  local cluster=$1 user=$2 assoc u
  assoc=$(slurm sacctmgr -n -P show assoc where cluster="$cluster" format=account,user)
  # fast path: one query when everything is registered already
  if grep -qx "default|$user" <<<"$assoc" && grep -qx "default|root" <<<"$assoc"; then return 0; fi
  slurm sacctmgr -n -P show cluster format=cluster | grep -qx "$cluster" ||
    { slurm sacctmgr -i add cluster "$cluster" >/dev/null; log "sacctmgr: added cluster $cluster"; }
  slurm sacctmgr -n -P show account format=account | grep -qx default ||
    { slurm sacctmgr -i add account default Description=default Organization=cloudhpc >/dev/null; log "sacctmgr: added account default"; }
  for u in "$user" root; do
    grep -qx "default|$u" <<<"$assoc" ||
      { slurm sacctmgr -i add user "$u" Account=default Cluster="$cluster" >/dev/null; log "sacctmgr: added $u to account default"; }
  done
}

# ---------------------------------------------------------------- ssh
# The bridge key's authorized_keys line, the one `cloudhpc bridge authorized-key` prints: forwarding
# only, -R to BIND_ADDR:LOW..HIGH, -L to each HOST:PORT given, no command, no pty.
bridge_authorized_line() { # bridge_authorized_line BIND_ADDR LOW HIGH PUBKEYFILE HOST:PORT...
  local addr=$1 low=$2 high=$3 pub=$4 opts="restrict,port-forwarding,command=\"/bin/false\"" p
  shift 4
  for p in $(seq "$low" "$high"); do opts+=",permitlisten=\"$addr:$p\""; done
  for p in "$@"; do opts+=",permitopen=\"$p\""; done
  printf '%s %s cloudhpc-bridge\n' "$opts" "$(cut -d' ' -f1,2 "$pub")"
}
# The bridge CA (porter.bridge.ca_key_file): signs each job's own bridge key (bridges/certificates.py);
# kept with the other keys, shared by the testbed and the topology like the bridge key.
ensure_bridge_ca() {
  [ -s "$KEYS/bridge_ca" ] || ssh-keygen -q -t ed25519 -N '' -C cloudhpc-bridge-ca -f "$KEYS/bridge_ca"
  chmod 600 "$KEYS/bridge_ca"
}
# The command sshd runs for `cloudhpc bridge principals`: sshd runs an AuthorizedPrincipalsCommand
# only from a path whose every directory is root's and writable by nobody else, which a checkout
# under /tmp (mode 1777) is not; so a root-owned wrapper per checkout, outside it, execs the
# checkout's cloudhpc. Prints the wrapper's path.
principals_wrapper() {
  local d=/var/lib/cloudhpc-testbed/bin w
  w="$d/cloudhpc-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
  install -d -m 755 /var/lib/cloudhpc-testbed "$d"
  printf '#!/bin/sh\n# the cloudhpc of %s (scripts/testbed-lib.sh principals_wrapper)\nexec %q "$@"\n' \
    "$ROOT" "$ROOT/.venv/bin/cloudhpc" | write_if_changed "$w" || true
  chmod 755 "$w"
  printf '%s\n' "$w"
}
# The sshd_config block `cloudhpc bridge sshd-config` prints (a test compares them, comments aside):
# certificates signed by the bridge CA log in as USER, each listening only on the ports its key id
# names (`cloudhpc bridge principals`), opening only the HOST:PORTs given. A Match block: print it last.
# CMDUSER runs the principals command: nobody when it can run CLOUDHPC, else root (here the
# project's interpreter may live under /root; a real bridge VM uses an unprivileged account).
bridge_sshd_block() { # bridge_sshd_block USER CA_PUB CLOUDHPC BIND_ADDR LOW HIGH HOST:PORT...
  local user=$1 pub=$2 cmd=$3 addr=$4 low=$5 high=$6 p cu=nobody
  shift 6
  local args="$cmd bridge principals --bind-address $addr --port-range $low-$high"
  for p in "$@"; do args+=" --permit-open $p"; done
  runuser -u nobody -- "$cmd" bridge principals --help >/dev/null 2>&1 || cu=root
  printf '%s\n' \
    "# cloudhpc bridges: per-job certificates signed by porter.bridge.ca_key_file, each allowed to" \
    "# listen on its own job's ports only (\`cloudhpc bridge sshd-config\`; docs/bridge-vm.md)" \
    "Match User $user" "    TrustedUserCAKeys $pub" "    AuthorizedPrincipalsCommand $args %i" \
    "    AuthorizedPrincipalsCommandUser $cu"
}
# sshd_conf HEADER PORT ADDR PIDFILE HOSTKEYS AFTER_PIDFILE AFTER_FORWARDING LAST: an sshd_config, key-only;
# HOSTKEYS (files, one per line) and the three blocks of lines may be empty (they then add no line)
sshd_conf() {
  local k
  printf '%s\nPort %s\nListenAddress %s\n' "$1" "$2" "$3"
  while IFS= read -r k; do [ -z "$k" ] || printf 'HostKey %s\n' "$k"; done <<<"$5"
  printf 'PidFile %s\n' "$4"
  [ -z "$6" ] || printf '%s\n' "$6"
  printf '%s\n' "PermitRootLogin no" "PubkeyAuthentication yes" "PasswordAuthentication no" \
    "KbdInteractiveAuthentication no" "UsePAM yes" "AllowTcpForwarding yes"
  [ -z "$7" ] || printf '%s\n' "$7"
  printf '%s\n' "X11Forwarding no" "PrintMotd no" "MaxSessions 10" "MaxStartups 100:30:200" \
    "AcceptEnv LANG LC_*" "Subsystem sftp internal-sftp" "LogLevel VERBOSE"
  [ -z "$8" ] || printf '%s\n' "$8"
}

# ---------------------------------------------------------------- PostgreSQL
pg() { (cd / && runuser -u postgres -- "$@"); }
pg_initdb() { # pg_initdb DATADIR: a new cluster there unless it has one
  [ -s "$1/PG_VERSION" ] && return 0
  rm -rf "$1"; mkdir -p "$1"; chown postgres:postgres "$1"; chmod 700 "$1"
  pg "$PGBIN/initdb" -D "$1" -U postgres -E UTF8 --auth-local=peer --auth-host=scram-sha-256 \
    > "$LOGD/pg-initdb.log" 2>&1 || { tail -20 "$LOGD/pg-initdb.log" >&2; die "initdb failed"; }
  log "pg: initdb $1"
}
psql_admin() { pg psql -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
ensure_role_db() { # ensure_role_db ROLE DB PASSWORD: a login role with PASSWORD owning database DB
  if [ "$(psql_admin -c "select 1 from pg_roles where rolname='$1'")" = 1 ]; then
    psql_admin -c "alter role $1 with login password '$3'"
  else psql_admin -c "create role $1 with login password '$3'"; fi
  [ "$(psql_admin -c "select 1 from pg_database where datname='$2'")" = 1 ] || psql_admin -c "create database $2 owner $1"
}
stop_pg() { # stop_pg DATADIR...: the postmaster of each, by fast shutdown (SIGINT), then as stop_pid
  local d p
  for d in "$@"; do
    if alive "$d/postmaster.pid" postgres; then
      p=$(pid_of "$d/postmaster.pid")
      log "stopping postgres (pid $p, $d)"
      kill -INT "$p" 2>/dev/null || true      # SIGINT = fast shutdown
      for _ in $(seq 1 150); do running "$p" || break; sleep 0.1; done
      if running "$p"; then stop_pid "$p" postgres; fi
    fi
  done
}

# ---------------------------------------------------------------- S3 (SeaweedFS)
s3_keys() { # s3_keys DIR PREFIX: DIR/s3-credentials (made once; the access key starts with PREFIX) and
  # DIR/s3-identities.json for weed; sets S3_ACCESS_KEY and S3_SECRET_KEY
  if [ ! -s "$1/s3-credentials" ]; then
    (umask 077; printf 'S3_ACCESS_KEY=%s%s\nS3_SECRET_KEY=%s\n' "$2" "$(randhex 9 | tr 'a-f' 'A-F')" "$(randhex 20)" > "$1/s3-credentials")
  fi
  S3_ACCESS_KEY=$(sed -n 's/^S3_ACCESS_KEY=//p' "$1/s3-credentials")
  S3_SECRET_KEY=$(sed -n 's/^S3_SECRET_KEY=//p' "$1/s3-credentials")
  (umask 077; write_if_changed "$1/s3-identities.json" <<EOF || true
{"identities": [{"name": "cloudhpc", "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
  )
}
s3_buckets() { # s3_buckets URL BUCKET...: creates the buckets if missing; polls until head_bucket succeeds
  "$VENV/bin/python" - "$1" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" "${@:2}" <<'PY'
import sys, time
import boto3
from botocore.config import Config
url, ak, sk, *buckets = sys.argv[1:]
s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=ak, aws_secret_access_key=sk,
                  region_name="us-east-1", config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5))
deadline, last = time.time() + 60, None
for bucket in buckets:
    while True:
        try:
            s3.head_bucket(Bucket=bucket)
            break
        except Exception as e:
            last = e
        try:
            s3.create_bucket(Bucket=bucket)
        except Exception as e:
            last = e
        if time.time() > deadline:
            sys.exit(f"bucket {bucket} not available after 60 s: {last!r}")
        time.sleep(0.25)
PY
}
# weed_mini_args DATADIR ADDR MASTER MASTER_GRPC VOLUME VOLUME_GRPC FILER FILER_GRPC S3 S3_GRPC ADMIN ADMIN_GRPC
#   METRICS IDENTITIES: `weed mini`'s arguments, one a line: bound to ADDR only (it would advertise the
#   eth0 address), every port set (a gRPC port would default to its HTTP port + 10000), no telemetry
weed_mini_args() {
  printf '%s\n' mini "-dir=$1" "-ip=$2" "-ip.bind=$2" "-master.port=$3" "-master.port.grpc=$4" \
    "-volume.port=$5" "-volume.port.grpc=$6" "-filer.port=$7" "-filer.port.grpc=$8" \
    "-s3.port=$9" "-s3.port.grpc=${10}" -s3.port.iceberg=0 -s3.port.lance=0 \
    -webdav=false -admin.ui=false "-admin.port=${11}" "-admin.port.grpc=${12}" \
    "-metricsPort=${13}" "-metricsIp=$2" -master.telemetry=false "-s3.config=${14}"
}

# ---------------------------------------------------------------- Prometheus
# write_prometheus_conf DIR NAME=HOST:PORT=DEPLOYMENT...: DIR/prometheus.yml scraping every second (so tests see
# a value a moment after porter serves it) the file_sd targets DIR/targets/porter-*.json and
# submitter-*.json; each further argument writes DIR/targets/NAME.json (one target, label deployment).
# porter's /metrics needs a bearer token: DIR/scrape-token (made once, 0600), sent by Prometheus from
# that file and named by every porter the testbed or a test starts (porter.metrics.token_file).
# Returns 0 if prometheus.yml changed (a changed targets file is re-read without a restart).
write_prometheus_conf() {
  local d=$1 t name target dep; shift
  mkdir -p "$d/targets" "$d/data"
  if [ ! -s "$d/scrape-token" ]; then
    (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$d/scrape-token.new.$$") &&
      mv "$d/scrape-token.new.$$" "$d/scrape-token"
  fi
  for t in "$@"; do
    name=${t%%=*}; target=${t#*=}; dep=${target#*=}; target=${target%%=*}
    printf '[{"targets": ["%s"], "labels": {"deployment": "%s"}}]\n' "$target" "$dep" |
      write_if_changed "$d/targets/$name.json" || true
  done
  write_if_changed "$d/prometheus.yml" <<EOF
# generated by scripts/$TB_NAME.sh (the scrape jobs of deploy/prometheus/cloudhpc-scrape.yaml, faster)
global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: cloudhpc-porter
    authorization: {credentials_file: "$d/scrape-token"}
    file_sd_configs: [{files: ["$d/targets/porter-*.json"], refresh_interval: 1s}]
  - job_name: cloudhpc-submitter
    file_sd_configs: [{files: ["$d/targets/submitter-*.json"], refresh_interval: 1s}]
EOF
}
check_prometheus_conf() { # check_prometheus_conf DIR: promtool accepts DIR/prometheus.yml
  promtool check config "$1/prometheus.yml" > "$LOGD/promtool.log" 2>&1 ||
    { cat "$LOGD/promtool.log" >&2; die "promtool rejected $1/prometheus.yml"; }
}
prometheus_args() { # prometheus_args DIR ADDR:PORT: /usr/bin/prometheus and its arguments, one a line (3 days of data)
  printf '%s\n' /usr/bin/prometheus "--config.file=$1/prometheus.yml" "--storage.tsdb.path=$1/data" \
    --storage.tsdb.retention.time=3d "--web.listen-address=$2"
}

# ---------------------------------------------------------------- MLflow
# The platform's tracking server as the pipelines use it: runs and the model registry in PostgreSQL
# (its own database), artifacts proxied by the server to S3 (--serve-artifacts), so clients, jobs on
# the cluster included, need only its URL. Job execution is off (it starts a pool of worker processes
# a testbed has no use for). Stopped by its process group: uvicorn is a child.
# mlflow_args ADDR PORT BUCKET [ARG...]: the server's command line, one a line (the database URL, which
# holds a password, goes in its environment: see start_mlflow_bg)
mlflow_args() {
  printf '%s\n' "$VENV/bin/mlflow" server --host "$1" --port "$2" --workers 1 \
    --serve-artifacts --artifacts-destination "s3://$3" "${@:4}"
}
# start_mlflow_bg PIDFILE LOGFILE S3_URL DB_DSN PREFIX... -- ARGS...: the server (ARGS from mlflow_args)
# with the S3 credentials and the database URL in its environment (MLflow reads
# MLFLOW_BACKEND_STORE_URI; on its command line the password would be in every `ps`), in the
# background as start_bg
start_mlflow_bg() {
  local pf=$1 lf=$2 s3=$3 dsn=$4 pre=()
  shift 4
  while [ "$1" != -- ]; do pre+=("$1"); shift; done
  shift
  MLFLOW_S3_ENDPOINT_URL=$s3 AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY \
  AWS_DEFAULT_REGION=us-east-1 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_BACKEND_STORE_URI=$dsn \
    start_bg "$pf" "$lf" "${pre[@]}" "$@"
}

# ---------------------------------------------------------------- the command line
main() { # main ACTION: the sourcing script's do_up, do_down, do_status or do_purge
  case "${1:-}" in
    up) do_up ;;
    down) do_down ;;
    status) do_status ;;
    purge) do_purge ;;
    *) echo "usage: $0 up|down|status|purge" >&2; exit 2 ;;
  esac
}
