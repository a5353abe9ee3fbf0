#!/usr/bin/env bash
# scripts/topology.sh -- the multi-host testbed: laptop, cloud VM, login node and two compute nodes
# as network namespaces on one Debian 12 machine (root, no systemd), joined through a router
# namespace on 198.18.0.0/15 (reserved for network tests), with no route out of it.
#
#   laptop  198.18.1.10   (the submitter's side; nothing runs there until a test starts it)
#   cloud   198.18.2.10   sshd :22 for the bridges, PostgreSQL :5432, S3 (SeaweedFS) :9000,
#                         MLflow :5000, Prometheus :9090; porter :5555 is started by the tests
#   login   198.18.3.10   sshd :22 for hpcuser, slurmctld :6817, slurmdbd :6819 (SLURM cluster "topo")
#   c1, c2  198.18.3.11, 198.18.3.12   slurmd :6818 (NodeName c1, c2)
#   router  198.18.{0,1,2,3}.1 gateways; nftables NAT/relay redirection; the delaying TCP relay
#   the root namespace (the operator's console, where pytest runs): 198.18.0.2
#
# Usage: scripts/topology.sh up|down|status|purge      (docs/testbed.md, "The multi-host topology")
#   up      build what is missing, start what is not running, self-check; idempotent
#   down    stop what this script started (by pid file), delete its namespaces and its link
#   status  one line per part; exit status 1 if any part is down
#   purge   down + wipe the topology's SLURM state, accounting database, S3, PostgreSQL, Prometheus data
#
# It needs the single-host testbed (scripts/testbed.sh up: packages, munge, MariaDB, hpcuser and its
# keys, the tools venv with weed and mlflow); scripts/testbed.sh up calls it at its end.
# State lives in <project root>/.testbed/topology/. After `up`, source .testbed/topology/env.sh.
# TOPOLOGY_DELAY_MS (default 10): delay in each direction on laptop -> login:22 and laptop -> porter.
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
TB=$ROOT/.testbed
TP=$TB/topology
RUN=$TP/run
LOGD=$TP/log
VENV=$TB/venv
KEYS=$TB/keys            # the single-host testbed's client and bridge keys, reused

P=chpc                   # prefix of every name this script makes outside its own namespaces
NETNS_DIR=/run/netns
UTS_DIR=/run/$P-uts      # persistent UTS namespaces: each host has its own host name
HOSTS="laptop cloud login c1 c2"
NAMESPACES="router $HOSTS"
ROOT_LINK=$P-op          # the root namespace's link to the router

NET=198.18.0.0/15
OP_ADDR=198.18.0.2       # the root namespace on its link to the router
OP_GW=198.18.0.1
LAPTOP_ADDR=198.18.1.10
LAPTOP_GW=198.18.1.1     # also the laptop's public (NAT) address: the relay connects onwards from it
CLOUD_ADDR=198.18.2.10
CLOUD_GW=198.18.2.1
LOGIN_ADDR=198.18.3.10
C1_ADDR=198.18.3.11
C2_ADDR=198.18.3.12
HPC_GW=198.18.3.1
HPC_NET=198.18.3.0/24
HPC_NAT=198.18.3.254     # the HPC site's outgoing (NAT) address, as the cloud sees it
LAPTOP_NET=198.18.1.0/24

addr_of() {
  case $1 in
    laptop) echo $LAPTOP_ADDR ;; cloud) echo $CLOUD_ADDR ;; login) echo $LOGIN_ADDR ;;
    c1) echo $C1_ADDR ;; c2) echo $C2_ADDR ;; *) return 1 ;;
  esac
}
gw_of() {
  case $1 in laptop) echo $LAPTOP_GW ;; cloud) echo $CLOUD_GW ;; *) echo $HPC_GW ;; esac
}

CLUSTER=topo
PARTITION=debug
TEST_USER=hpcuser
BRIDGE_USER=${P}bridge   # the bridge account on cloud (docs/bridge-vm.md: "an account whose authorized_keys holds the bridge key")
NODE_CPUS=4
NODE_MEM=6144
SSH_PORT=22
PORTER_PORT=5555
MLFLOW_PORT=5000
S3_PORT=9000
PG_PORT=5432
PROM_PORT=9090
BRIDGE_PORT_LOW=19500
BRIDGE_PORT_HIGH=19599
RELAY_SSH_PORT=40022     # in the router: laptop -> login:22 is redirected here
RELAY_PORTER_PORT=45555  # in the router: laptop -> cloud:5555 is redirected here
DELAY_MS=${TOPOLOGY_DELAY_MS:-10}
S3_BUCKET=cloudhpc
MLFLOW_BUCKET=mlflow
MLFLOW_DB=mlflow
PG_DB=cloudhpc
PG_USER=cloudhpc
PGBIN=/usr/lib/postgresql/15/bin
PG_FALLBACK_DATA=/var/lib/cloudhpc-testbed/topology-pg
DBD_DB=${P}_topo_acct_db
DBD_USER=${P}_topo

# others_can_reach DIR: every directory from / to DIR lets other users through (o+x)
others_can_reach() {
  local d=$1 m
  while [ "$d" != / ] && [ -n "$d" ]; do
    m=$(stat -L -c %A "$d" 2>/dev/null) || return 1
    case ${m:9:1} in x|t) ;; *) return 1 ;; esac
    d=$(dirname "$d")
  done
}
# slurm (slurmctld, slurmdbd) and hpcuser (sbatch, jobs) read the cluster's files: in .testbed/topology/
# when other users can reach the checkout, else under /var/lib (a checkout in a private home)
SLURM_BASE=$TP
others_can_reach "$ROOT" || SLURM_BASE=/var/lib/cloudhpc-testbed/topology
SLURM_DIR=$SLURM_BASE/slurm
SLURM_CONF=$SLURM_DIR/slurm.conf
DBD_CONF=$SLURM_DIR/slurmdbd.conf
SLURM_RUN=$SLURM_BASE/run/slurm
SLURM_LOG=$SLURM_BASE/log/slurm
CTLD_PID=$SLURM_RUN/slurmctld.pid
DBD_PID=$SLURM_RUN/slurmdbd.pid
slurmd_pid() { echo "$SLURM_RUN/slurmd-$1.pid"; }
LOGIN_SSHD_DIR=$TP/login-sshd
CLOUD_SSHD_DIR=$TP/cloud-sshd
LOGIN_SSHD_PID=$RUN/sshd-login.pid
CLOUD_SSHD_PID=$RUN/sshd-cloud.pid
KNOWN_HOSTS=$TP/known_hosts
WEED_PID=$RUN/weed.pid
PROM_DIR=$TP/prometheus
PROM_PID=$RUN/prometheus.pid
MLFLOW_PID=$RUN/mlflow.pid
RELAY_PID=$RUN/relay.pid
RELAY=$ROOT/scripts/delay_relay.py
PG_SOCK=$RUN/pg

PKGS="nftables iproute2 util-linux openssh-server openssh-client"
export DEBIAN_FRONTEND=noninteractive

T0=$(date +%s.%N)
log() { printf '[%s topology] %s\n' "$(date +%H:%M:%S.%3N)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root"; }
randhex() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
write_if_changed() { # write_if_changed FILE (content on stdin); returns 0 if changed
  local f=$1 tmp="$1.new.$$"
  cat > "$tmp"
  if [ -f "$f" ] && cmp -s "$tmp" "$f"; then rm -f "$tmp"; return 1; fi
  mv "$tmp" "$f"; return 0
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
wait_for() { # wait_for SECONDS WHAT CMD...
  local t=$1 what=$2; shift 2
  for _ in $(seq 1 $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out after ${t}s waiting for $what"
}

# ---------------------------------------------------------------- running things in a host
ns_path() { echo "$NETNS_DIR/$P-$1"; }
# in_host HOST CMD...: run CMD with HOST's network and host name (nsenter, not `ip netns exec`: that
# remounts /sys in a new mount namespace, which breaks slurmd's cgroup plugin)
in_host() {
  local h=$1; shift
  if [ "$h" = router ]; then nsenter --net="$(ns_path router)" -- "$@"
  else nsenter --net="$(ns_path "$h")" --uts="$UTS_DIR/$h" -- "$@"; fi
}
slurm() { SLURM_CONF=$SLURM_CONF "$@"; }
port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }   # from the root namespace

# ---------------------------------------------------------------- pid helpers (never by name)
running() {
  local st
  st=$(sed -n 's/^[0-9]* (.*) \([A-Za-z]\) .*/\1/p' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$st" != X ]
}
pid_of() { [ -s "$1" ] && head -1 "$1" | tr -dc '0-9'; }
# alive PIDFILE COMM: the pid in PIDFILE runs and /proc/PID/comm is COMM
alive() {
  local p
  p=$(pid_of "$1") || return 1
  [ -n "$p" ] && running "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]
}
# alive_in PIDFILE COMM HOST: alive, and in HOST's network namespace
alive_in() {
  alive "$1" "$2" || return 1
  local a b
  a=$(stat -L -c %i "/proc/$(pid_of "$1")/ns/net" 2>/dev/null) || return 1
  b=$(stat -L -c %i "$(ns_path "$3")" 2>/dev/null) || return 1
  [ "$a" = "$b" ]
}
stop_pid() { # stop_pid PID NAME [GROUP]
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

# ---------------------------------------------------------------- packages
POLICY=/usr/sbin/policy-rc.d
POLICY_BAK=/usr/sbin/policy-rc.d.cloudhpc-topology-saved
POLICY_MADE=0
restore_policy() {
  [ "$POLICY_MADE" = 1 ] || return 0
  if [ -e "$POLICY_BAK" ]; then mv -f "$POLICY_BAK" "$POLICY"; else rm -f "$POLICY"; fi
  POLICY_MADE=0
}
trap restore_policy EXIT
install_pkgs() {
  local missing=() p
  for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  # scripts/testbed.sh installs these with its own packages, before any daemon starts; this is the
  # fallback for a machine set up by an older testbed.sh (an install while daemons run is avoided)
  log "packages: installing ${missing[*]}"
  [ -e "$POLICY_BAK" ] && mv -f "$POLICY_BAK" "$POLICY"
  [ -e "$POLICY" ] && cp -p "$POLICY" "$POLICY_BAK"
  POLICY_MADE=1
  printf '#!/bin/sh\n# temporary, written by cloudhpc scripts/topology.sh\nexit 101\n' > "$POLICY"
  chmod 755 "$POLICY"
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" > "$LOGD/apt.log" 2>&1 ||
    { apt-get -o DPkg::Lock::Timeout=300 update -qq &&
      apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" > "$LOGD/apt.log" 2>&1; } ||
    { tail -20 "$LOGD/apt.log" >&2; die "apt-get install failed (see $LOGD/apt.log)"; }
  restore_policy
}

# what the single-host testbed provides
check_base() {
  local m=""
  alive /run/munge/munged.pid munged || m+=" munged"
  alive /run/mysqld/mysqld.pid mariadbd || m+=" mariadb"
  id "$TEST_USER" >/dev/null 2>&1 || m+=" user:$TEST_USER"
  [ -s "$KEYS/id_ed25519" ] && [ -s "$KEYS/bridge_ed25519" ] || m+=" keys"
  [ -x "$VENV/bin/weed" ] && [ -x "$VENV/bin/mlflow" ] || m+=" venv"
  command -v slurmctld >/dev/null && [ -x /usr/local/bin/seff ] || m+=" slurm"
  [ -z "$m" ] || die "the single-host testbed is missing:$m (run scripts/testbed.sh up, which brings the topology up too)"
}

# ---------------------------------------------------------------- namespaces, links, routes
ensure_uts() { # ensure_uts HOST: a persistent UTS namespace whose host name is HOST
  local f=$UTS_DIR/$1
  if [ -e "$f" ] && [ "$(nsenter --uts="$f" hostname 2>/dev/null)" = "$1" ]; then return 0; fi
  mkdir -p "$UTS_DIR"
  umount "$f" 2>/dev/null || true
  touch "$f"
  unshare --uts="$f" hostname "$1"
}
ensure_ns() { # ensure_ns NAME
  local n=$P-$1
  # a name left from before a restart of the machine (/run kept, the namespace gone) is made anew
  if [ -e "$NETNS_DIR/$n" ] && ! nsenter --net="$NETNS_DIR/$n" true 2>/dev/null; then ip netns del "$n" 2>/dev/null || rm -f "$NETNS_DIR/$n"; fi
  [ -e "$NETNS_DIR/$n" ] || { ip netns add "$n"; log "netns $n: created"; }
  nsenter --net="$NETNS_DIR/$n" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 >/dev/null 2>&1 || true
  ip -n "$n" link set lo up
}
# link_host HOST: veth HOST (router side, address = the gateway) <-> eth0 (host side, ADDR/32);
# every host reaches everything through the router, so every packet meets the router's rules
link_host() {
  local h=$1 a g ns=$P-$1 r=$P-router
  a=$(addr_of "$h"); g=$(gw_of "$h")
  if ! ip -n "$r" link show "$h" >/dev/null 2>&1 || ! ip -n "$ns" link show eth0 >/dev/null 2>&1; then
    ip -n "$r" link del "$h" 2>/dev/null || true
    ip -n "$ns" link del eth0 2>/dev/null || true
    ip -n "$r" link add "$h" type veth peer name eth0 netns "$ns"
    log "link: router/$h <-> $h/eth0"
  fi
  ip -n "$r" addr replace "$g/32" dev "$h"
  ip -n "$r" link set "$h" up
  ip -n "$r" route replace "$a/32" dev "$h" src "$g"
  ip -n "$ns" addr replace "$a/32" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route replace "$g/32" dev eth0 src "$a"
  ip -n "$ns" route replace "$NET" via "$g" dev eth0 src "$a"
}
link_root() { # the operator's console: the root namespace reaches every host, nothing reaches it
  local r=$P-router
  if ! ip link show "$ROOT_LINK" >/dev/null 2>&1 || ! ip -n "$r" link show op >/dev/null 2>&1; then
    ip link del "$ROOT_LINK" 2>/dev/null || true
    ip -n "$r" link del op 2>/dev/null || true
    ip link add "$ROOT_LINK" type veth peer name op netns "$r"
    log "link: $ROOT_LINK (root namespace) <-> router/op"
  fi
  ip -n "$r" addr replace "$OP_GW/32" dev op
  ip -n "$r" link set op up
  ip -n "$r" route replace "$OP_ADDR/32" dev op src "$OP_GW"
  ip addr replace "$OP_ADDR/32" dev "$ROOT_LINK"
  ip link set "$ROOT_LINK" up
  ip route replace "$OP_GW/32" dev "$ROOT_LINK" src "$OP_ADDR"
  ip route replace "$NET" via "$OP_GW" dev "$ROOT_LINK" src "$OP_ADDR"
}
# One topology per machine: the namespace names are fixed. The checkout that built them owns them.
OWNER=/run/$P-topology.owner
foreign_owner() { [ -s "$OWNER" ] && [ "$(cat "$OWNER")" != "$ROOT" ]; }
claim_net() {
  if foreign_owner && [ -e "$(ns_path router)" ]; then
    die "the topology of $(cat "$OWNER") is up on this machine (namespaces $P-*): run its scripts/topology.sh down first"
  fi
  echo "$ROOT" > "$OWNER"
}
build_net() {
  local h
  for h in $NAMESPACES; do ensure_ns "$h"; done
  for h in $HOSTS; do ensure_uts "$h"; done
  nsenter --net="$(ns_path router)" sysctl -qw net.ipv4.ip_forward=1 >/dev/null
  for h in $HOSTS; do link_host "$h"; done
  link_root
}

# ---------------------------------------------------------------- host names
# Each host resolves its own name (and the others'), as at a real site: software that finds its
# address from its host name (Ray does, when it cannot route to 8.8.8.8) gets the host's address,
# not 127.0.0.1. /etc/hosts is shared by all namespaces: one marked block, removed by `down`.
HOSTS_FILE=/etc/hosts
HOSTS_BEGIN="# >>> cloudhpc scripts/topology.sh (removed by its down)"
HOSTS_END="# <<< cloudhpc scripts/topology.sh"
# /etc/hosts without the block (exact line comparison, no patterns); fails rather than print nothing
hosts_without_block() {
  awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' "$HOSTS_FILE"
}
write_hosts() {
  local h want kept total inside
  kept=$(hosts_without_block) || die "could not read /etc/hosts"
  # never lose the machine's own lines: kept + the block's lines must be the whole file
  total=$(grep -c '' "$HOSTS_FILE" || true)
  inside=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {n = 1} n {c++} $0 == e {n = 0} END {print c + 0}' "$HOSTS_FILE")
  [ "$(( $(printf '%s' "$kept" | grep -c '' || true) + inside ))" = "$total" ] ||
    die "refusing to rewrite /etc/hosts: its lines outside the topology's block do not add up"
  want=$(printf '%s\n%s\n' "$kept" "$HOSTS_BEGIN"
         for h in $HOSTS; do printf '%s %s.topology %s\n' "$(addr_of "$h")" "$h" "$h"; done
         echo "$HOSTS_END")
  [ "$want" = "$(cat "$HOSTS_FILE")" ] && return 0
  printf '%s\n' "$want" > "$HOSTS_FILE.chpc-new"
  cat "$HOSTS_FILE.chpc-new" > "$HOSTS_FILE"; rm -f "$HOSTS_FILE.chpc-new"   # same inode: /etc/hosts may be a mount
  log "/etc/hosts: names of $HOSTS"
}
remove_hosts() {
  grep -qxF "$HOSTS_BEGIN" "$HOSTS_FILE" 2>/dev/null || return 0
  hosts_without_block > "$HOSTS_FILE.chpc-new" || die "could not read /etc/hosts"
  cat "$HOSTS_FILE.chpc-new" > "$HOSTS_FILE"; rm -f "$HOSTS_FILE.chpc-new"
  log "/etc/hosts: removed the topology's names"
}

# ---------------------------------------------------------------- firewalls (nftables)
# One table `inet chpc` per namespace, replaced atomically on every `up`. Hosts filter what comes in
# (their security groups); the router NATs, redirects the laptop's delayed paths to the relay, keeps
# everything inside 198.18.0.0/15 and lets nothing open a connection into the root namespace.
# Refused connections get a TCP reset (or an ICMP admin-prohibited), so a forbidden path fails at once.
host_rules() {
  case $1 in
    laptop) ;;   # nothing comes in (a laptop behind its home router)
    cloud)
      echo "    ip saddr $HPC_NAT tcp dport $SSH_PORT accept comment \"the bridges: ssh from the HPC site's NAT address\""
      echo "    ip saddr $LAPTOP_NET tcp dport $PORTER_PORT accept comment \"porter from the laptop\"" ;;
    login)
      echo "    ip saddr $LAPTOP_NET tcp dport $SSH_PORT accept comment \"ssh from the laptop\""
      echo "    ip saddr { $C1_ADDR, $C2_ADDR } accept comment \"the compute nodes (slurmd -> slurmctld, srun, ssh)\"" ;;
    c1|c2)
      echo "    ip saddr { $LOGIN_ADDR, $C1_ADDR, $C2_ADDR } accept comment \"login and the other compute node\"" ;;
  esac
}
nft_host() { # nft_host HOST: the ruleset
  cat <<EOF
# generated by scripts/topology.sh: host $1 ($(addr_of "$1"))
table inet chpc
delete table inet chpc
table inet chpc {
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    iif lo accept
    ip saddr $OP_ADDR accept comment "the operator's console (root namespace)"
$(host_rules "$1")
    meta l4proto tcp reject with tcp reset
    reject with icmpx type admin-prohibited
  }
}
EOF
}
nft_router() {
  cat <<EOF
# generated by scripts/topology.sh: the router
table inet chpc
delete table inet chpc
table inet chpc {
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname "laptop" ip daddr $LOGIN_ADDR tcp dport $SSH_PORT redirect to :$RELAY_SSH_PORT comment "laptop -> login sshd through the delaying relay"
    iifname "laptop" ip daddr $CLOUD_ADDR tcp dport $PORTER_PORT redirect to :$RELAY_PORTER_PORT comment "laptop -> porter through the delaying relay"
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr $HPC_NET ip daddr != $HPC_NET oifname != "op" snat ip to $HPC_NAT comment "the HPC site's NAT"
  }
  chain input {
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    iif lo accept
    iifname "op" accept comment "the operator's console"
    iifname "laptop" tcp dport { $RELAY_SSH_PORT, $RELAY_PORTER_PORT } ct status dnat accept comment "the relay, reached only through the redirection"
    meta l4proto tcp reject with tcp reset
    reject with icmpx type admin-prohibited
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    oifname "op" reject with icmpx type admin-prohibited comment "nothing opens a connection into the root namespace"
    ip saddr $NET ip daddr $NET accept comment "the hosts' own firewalls decide"
    reject with icmpx type admin-prohibited
  }
  chain output {
    type filter hook output priority filter; policy accept;
    oifname "op" ct state new reject with icmpx type admin-prohibited
  }
}
EOF
}
apply_firewalls() {
  mkdir -p "$TP/nft"
  local h
  nft_router > "$TP/nft/router.nft"
  in_host router nft -f "$TP/nft/router.nft" || die "nft rejected $TP/nft/router.nft"
  for h in $HOSTS; do
    nft_host "$h" > "$TP/nft/$h.nft"
    in_host "$h" nft -f "$TP/nft/$h.nft" || die "nft rejected $TP/nft/$h.nft"
  done
  log "firewalls: applied (router + $HOSTS)"
}

# ---------------------------------------------------------------- the delaying relay (router)
relay_args() {
  printf '%s\n' /usr/bin/python3 "$RELAY" --delay-ms "$DELAY_MS" --source "$LAPTOP_GW" \
    --route "$LAPTOP_GW:$RELAY_SSH_PORT=$LOGIN_ADDR:$SSH_PORT" \
    --route "$LAPTOP_GW:$RELAY_PORTER_PORT=$CLOUD_ADDR:$PORTER_PORT"
}
relay_alive() { alive_in "$RELAY_PID" python3 router && grep -qF "$RELAY" "/proc/$(pid_of "$RELAY_PID")/cmdline"; }
start_relay() {
  [[ $DELAY_MS =~ ^[0-9]+([.][0-9]+)?$ ]] || die "TOPOLOGY_DELAY_MS must be a number of milliseconds, not '$DELAY_MS'"
  local changed=0 args=()
  # restarted when its arguments or its code change
  { relay_args; sha256sum "$RELAY"; } | write_if_changed "$RUN/relay.state" && changed=1
  if relay_alive && [ $changed = 0 ]; then log "relay: running, ${DELAY_MS} ms each way (pid $(pid_of "$RELAY_PID"))"; return 0; fi
  relay_alive && stop_pid "$(pid_of "$RELAY_PID")" relay
  rm -f "$RELAY_PID"
  mapfile -t args < <(relay_args)
  setsid nsenter --net="$(ns_path router)" -- "${args[@]}" > "$LOGD/relay.log" 2>&1 < /dev/null 8>&- 9>&- &
  echo $! > "$RELAY_PID"
  wait_for 10 "relay on $LAPTOP_GW:$RELAY_SSH_PORT" port_open "$LAPTOP_GW" "$RELAY_SSH_PORT"
  log "relay: started, ${DELAY_MS} ms each way (pid $(pid_of "$RELAY_PID"))"
}

# ---------------------------------------------------------------- SLURM (cluster "topo")
SLURM_CONF_CHANGED=0
DBD_CONF_CHANGED=0
write_slurm_conf() {
  [ "$SLURM_BASE" = "$TP" ] || { install -d -m 755 "$SLURM_BASE" "$SLURM_BASE/run" "$SLURM_BASE/log"
    log "slurm: other users cannot reach $ROOT: the cluster's files are in $SLURM_BASE"; }
  install -d -m 755 "$SLURM_DIR"
  install -d -o slurm -g slurm -m 755 "$SLURM_DIR/state" "$SLURM_RUN" "$SLURM_LOG"
  install -d -m 755 "$SLURM_DIR/spool"
  if write_if_changed "$SLURM_CONF" <<EOF
# generated by cloudhpc scripts/topology.sh -- login node + two compute nodes, each its own network host
ClusterName=$CLUSTER
SlurmctldHost=login($LOGIN_ADDR)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURM_RUN/slurmd-%n.pid
SlurmctldLogFile=$SLURM_LOG/slurmctld.log
SlurmdLogFile=$SLURM_LOG/slurmd-%n.log
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
AccountingStorageHost=$LOGIN_ADDR
AccountingStoragePort=6819
AccountingStoreFlags=job_comment
SlurmdParameters=config_overrides
NodeName=c1 NodeAddr=$C1_ADDR CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN
NodeName=c2 NodeAddr=$C2_ADDR CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=c1,c2 Default=YES MaxTime=INFINITE State=UP
EOF
  then SLURM_CONF_CHANGED=1; log "slurm: wrote $SLURM_CONF"; fi
  chmod 644 "$SLURM_CONF"
  [ -s "$TP/slurmdbd-password" ] || (umask 077; randhex 12 > "$TP/slurmdbd-password")
  local pass; pass=$(cat "$TP/slurmdbd-password")
  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
  if write_if_changed "$DBD_CONF" <<EOF
# generated by cloudhpc scripts/topology.sh -- on login; MariaDB is the single-host testbed's (unix socket)
AuthType=auth/munge
DbdHost=login
DbdAddr=$LOGIN_ADDR
DbdPort=6819
SlurmUser=slurm
DebugLevel=info
LogFile=$SLURM_LOG/slurmdbd.log
PidFile=$DBD_PID
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DBD_USER
StoragePass=$pass
StorageLoc=$DBD_DB
EOF
  then DBD_CONF_CHANGED=1; log "slurm: wrote $DBD_CONF"; fi
  chown slurm:slurm "$DBD_CONF"; chmod 600 "$DBD_CONF"
}
start_slurmdbd() {
  local pass; pass=$(cat "$TP/slurmdbd-password")
  mysql -e "CREATE USER IF NOT EXISTS '$DBD_USER'@'localhost' IDENTIFIED BY '$pass';
            ALTER USER '$DBD_USER'@'localhost' IDENTIFIED BY '$pass';
            GRANT ALL ON $DBD_DB.* TO '$DBD_USER'@'localhost'; FLUSH PRIVILEGES;"
  [ "$DBD_CONF_CHANGED" = 1 ] && stop_pidfile "$DBD_PID" slurmdbd
  if alive_in "$DBD_PID" slurmdbd login; then log "slurmdbd: running on login (pid $(pid_of "$DBD_PID"))"; return 0; fi
  stop_pidfile "$DBD_PID" slurmdbd
  in_host login env SLURM_CONF="$SLURM_CONF" slurmdbd 8>&- 9>&-
  wait_for 60 "slurmdbd on $LOGIN_ADDR:6819" port_open "$LOGIN_ADDR" 6819
  log "slurmdbd: started on login (pid $(pid_of "$DBD_PID"))"
}
register_accounting() {
  local assoc u
  assoc=$(slurm sacctmgr -n -P show assoc where cluster="$CLUSTER" format=account,user)
  if grep -qx "default|$TEST_USER" <<<"$assoc" && grep -qx "default|root" <<<"$assoc"; then return 0; fi
  slurm sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER" ||
    { slurm sacctmgr -i add cluster "$CLUSTER" >/dev/null; log "sacctmgr: added cluster $CLUSTER"; }
  slurm sacctmgr -n -P show account format=account | grep -qx default ||
    { slurm sacctmgr -i add account default Description=default Organization=cloudhpc >/dev/null; log "sacctmgr: added account default"; }
  for u in "$TEST_USER" root; do
    grep -qx "default|$u" <<<"$assoc" ||
      { slurm sacctmgr -i add user "$u" Account=default Cluster="$CLUSTER" >/dev/null; log "sacctmgr: added $u to account default"; }
  done
}
nodes_up() { [ "$(slurm sinfo -h -N -n c1,c2 -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated|completing)')" = 2 ]; }
start_slurm() {
  local n
  if [ "$SLURM_CONF_CHANGED" = 1 ]; then
    for n in c1 c2; do stop_pidfile "$(slurmd_pid $n)" slurmd; done
    stop_pidfile "$CTLD_PID" slurmctld
  fi
  if alive_in "$CTLD_PID" slurmctld login; then log "slurmctld: running on login (pid $(pid_of "$CTLD_PID"))"; else
    stop_pidfile "$CTLD_PID" slurmctld
    in_host login env SLURM_CONF="$SLURM_CONF" slurmctld -f "$SLURM_CONF" 8>&- 9>&-
    wait_for 60 "slurmctld on login" slurm scontrol ping
    log "slurmctld: started on login (pid $(pid_of "$CTLD_PID"))"
  fi
  for n in c1 c2; do
    if alive_in "$(slurmd_pid $n)" slurmd "$n"; then log "slurmd: running on $n (pid $(pid_of "$(slurmd_pid $n)"))"; continue; fi
    stop_pidfile "$(slurmd_pid $n)" slurmd
    mkdir -p "$SLURM_DIR/spool/$n"
    in_host "$n" env SLURM_CONF="$SLURM_CONF" slurmd -f "$SLURM_CONF" -N "$n" 8>&- 9>&-
    wait_for 20 "slurmd pid file of $n" alive "$(slurmd_pid $n)" slurmd
    log "slurmd: started on $n (pid $(pid_of "$(slurmd_pid $n)"))"
  done
  local st
  for n in c1 c2; do
    st=$(slurm sinfo -h -n "$n" -o %T 2>/dev/null || true)
    case "$st" in *down*|*drain*|*fail*) slurm scontrol update NodeName="$n" State=RESUME || true ;; esac
  done
  wait_for 60 "nodes c1 and c2 to be up" nodes_up
  log "slurm: cluster $CLUSTER, nodes c1 ($C1_ADDR) and c2 ($C2_ADDR) up, partition $PARTITION"
}
stop_slurm() {
  # jobs of this cluster only: their steps would keep the compute nodes' namespaces alive
  if alive "$CTLD_PID" slurmctld; then
    local ids
    ids=$(slurm squeue -h -o %i 2>/dev/null | tr '\n' ' ') || true
    if [ -n "${ids// /}" ]; then
      log "slurm: cancelling jobs $ids"
      # shellcheck disable=SC2086
      slurm scancel $ids 2>/dev/null || true
      for _ in $(seq 1 100); do [ -z "$(slurm squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  local n
  for n in c1 c2; do stop_pidfile "$(slurmd_pid $n)" slurmd; done
  stop_pidfile "$CTLD_PID" slurmctld
  stop_pidfile "$DBD_PID" slurmdbd
}

# ---------------------------------------------------------------- sshd on login and on cloud
home_of() { getent passwd "$1" | cut -d: -f6; }
ensure_bridge_user() {
  id "$BRIDGE_USER" >/dev/null 2>&1 || { useradd -m -s /bin/bash "$BRIDGE_USER"; log "created user $BRIDGE_USER (the bridge account on cloud)"; }
}
# the line `cloudhpc bridge authorized-key --permit-open CLOUD:5000 --permit-open CLOUD:9000` prints
# for porter.bridge = {bind_address: CLOUD, port_range: [19500, 19599]} (a test compares them)
bridge_authorized_line() {
  local opts="restrict,port-forwarding,command=\"/bin/false\"" p
  for p in $(seq "$BRIDGE_PORT_LOW" "$BRIDGE_PORT_HIGH"); do opts+=",permitlisten=\"$CLOUD_ADDR:$p\""; done
  opts+=",permitopen=\"$CLOUD_ADDR:$MLFLOW_PORT\",permitopen=\"$CLOUD_ADDR:$S3_PORT\""
  printf '%s %s cloudhpc-bridge\n' "$opts" "$(cut -d' ' -f1,2 "$KEYS/bridge_ed25519.pub")"
}
authorize_bridge() {
  local h; h=$(home_of "$BRIDGE_USER")
  install -d -m 700 -o "$BRIDGE_USER" -g "$(id -gn "$BRIDGE_USER")" "$h/.ssh"
  (umask 077; bridge_authorized_line | write_if_changed "$h/.ssh/authorized_keys") &&
    log "ssh: authorized the bridge key for $BRIDGE_USER on cloud (forwarding only, $CLOUD_ADDR:$BRIDGE_PORT_LOW-$BRIDGE_PORT_HIGH)" || true
  chown "$BRIDGE_USER:$(id -gn "$BRIDGE_USER")" "$h/.ssh/authorized_keys"; chmod 600 "$h/.ssh/authorized_keys"
}
sshd_conf() { # sshd_conf HOST ADDR DIR PIDFILE ALLOWUSER EXTRA
  cat <<EOF
# generated by cloudhpc scripts/topology.sh -- the sshd of $1
Port $SSH_PORT
ListenAddress $2
HostKey $3/ssh_host_ed25519_key
PidFile $4
AllowUsers $5
PermitRootLogin no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
MaxSessions 10
MaxStartups 100:30:200
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
LogLevel VERBOSE
$6
EOF
}
start_sshd() { # start_sshd HOST ADDR DIR PIDFILE ALLOWUSER EXTRA
  local h=$1 a=$2 d=$3 pf=$4 changed=0
  install -d -m 700 "$d"
  [ -s "$d/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C "$h-host" -f "$d/ssh_host_ed25519_key"
  sshd_conf "$@" | write_if_changed "$d/sshd_config" && changed=1
  /usr/sbin/sshd -t -f "$d/sshd_config" || die "sshd -t rejected $d/sshd_config"
  if alive_in "$pf" sshd "$h" && [ $changed = 0 ]; then log "sshd: running on $h $a:$SSH_PORT (pid $(pid_of "$pf"))"; return 0; fi
  stop_pidfile "$pf" sshd
  in_host "$h" /usr/sbin/sshd -f "$d/sshd_config" -E "$LOGD/sshd-$h.log" 8>&- 9>&-
  wait_for 10 "sshd on $a:$SSH_PORT" port_open "$a" "$SSH_PORT"
  wait_for 10 "sshd pid file on $h" alive "$pf" sshd
  log "sshd: started on $h $a:$SSH_PORT (pid $(pid_of "$pf"))"
}
start_sshds() {
  ensure_bridge_user
  authorize_bridge
  # commands run over ssh on login use this cluster's slurm.conf (sbatch, sacct, seff, and jobs inherit it)
  start_sshd login "$LOGIN_ADDR" "$LOGIN_SSHD_DIR" "$LOGIN_SSHD_PID" "$TEST_USER" "SetEnv SLURM_CONF=$SLURM_CONF"
  start_sshd cloud "$CLOUD_ADDR" "$CLOUD_SSHD_DIR" "$CLOUD_SSHD_PID" "$BRIDGE_USER" \
    "$(printf 'GatewayPorts clientspecified\nClientAliveInterval 15\nClientAliveCountMax 2')"
  # pinned host keys, from the keys themselves (not from the network)
  { printf '%s %s\n' "$LOGIN_ADDR" "$(cut -d' ' -f1,2 "$LOGIN_SSHD_DIR/ssh_host_ed25519_key.pub")"
    printf '%s %s\n' "$CLOUD_ADDR" "$(cut -d' ' -f1,2 "$CLOUD_SSHD_DIR/ssh_host_ed25519_key.pub")"
  } | write_if_changed "$KNOWN_HOSTS" && log "ssh: wrote $KNOWN_HOSTS" || true
  chmod 644 "$KNOWN_HOSTS"
}

# ---------------------------------------------------------------- PostgreSQL on cloud
pg() { (cd / && runuser -u postgres -- "$@"); }
pg_datadir() { if runuser -u postgres -- test -x "$TP" 2>/dev/null; then echo "$TP/pg"; else echo "$PG_FALLBACK_DATA"; fi; }
psql_admin() { pg psql -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
ensure_role_db() { # ensure_role_db ROLE DB PASSWORD
  if [ "$(psql_admin -c "select 1 from pg_roles where rolname='$1'")" = 1 ]; then
    psql_admin -c "alter role $1 with login password '$3'"
  else psql_admin -c "create role $1 with login password '$3'"; fi
  [ "$(psql_admin -c "select 1 from pg_database where datname='$2'")" = 1 ] || psql_admin -c "create database $2 owner $1"
}
start_pg() {
  PGDATA_DIR=$(pg_datadir)
  PG_LOG=$LOGD/pg.log
  if [ "$PGDATA_DIR" = "$PG_FALLBACK_DATA" ]; then   # postgres cannot reach .testbed/: socket and log beside the data
    log "pg: $TP is not traversable by user postgres: data dir is $PGDATA_DIR"
    PG_SOCK=$PG_FALLBACK_DATA-run; PG_LOG=$PG_FALLBACK_DATA-run/pg.log
  fi
  install -d -o postgres -g postgres -m 755 "$PG_SOCK"
  if [ ! -s "$PGDATA_DIR/PG_VERSION" ]; then
    rm -rf "$PGDATA_DIR"; mkdir -p "$PGDATA_DIR"; chown postgres:postgres "$PGDATA_DIR"; chmod 700 "$PGDATA_DIR"
    pg "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres -E UTF8 --auth-local=peer --auth-host=scram-sha-256 \
      > "$LOGD/pg-initdb.log" 2>&1 || { tail -20 "$LOGD/pg-initdb.log" >&2; die "initdb failed"; }
    log "pg: initdb $PGDATA_DIR"
  fi
  # TCP from the topology's addresses (cloud itself, and the operator's console) with a password
  local hba_changed=0
  write_if_changed "$PGDATA_DIR/pg_hba.conf" <<EOF && hba_changed=1
# generated by scripts/topology.sh
local all all peer
host all all 127.0.0.1/32 scram-sha-256
host all all $NET scram-sha-256
EOF
  chown postgres:postgres "$PGDATA_DIR/pg_hba.conf"; chmod 600 "$PGDATA_DIR/pg_hba.conf"
  if alive_in "$PGDATA_DIR/postmaster.pid" postgres cloud; then
    [ $hba_changed = 1 ] && pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" reload > /dev/null
    log "pg: running on cloud $CLOUD_ADDR:$PG_PORT (pid $(pid_of "$PGDATA_DIR/postmaster.pid"))"
  else
    alive "$PGDATA_DIR/postmaster.pid" postgres && stop_pid "$(pid_of "$PGDATA_DIR/postmaster.pid")" postgres
    rm -f "$PGDATA_DIR/postmaster.pid"
    touch "$PG_LOG"; chown postgres "$PG_LOG"
    (cd / && in_host cloud runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$PG_LOG" -w -t 60 \
      -o "-p $PG_PORT -c listen_addresses=$CLOUD_ADDR -c unix_socket_directories=$PG_SOCK" start > /dev/null 8>&- 9>&-) ||
      { tail -20 "$PG_LOG" >&2; die "pg_ctl start failed (see $PG_LOG)"; }
    log "pg: started on cloud $CLOUD_ADDR:$PG_PORT (pid $(pid_of "$PGDATA_DIR/postmaster.pid"))"
  fi
  [ -s "$TP/pg-password" ] || (umask 077; randhex 16 > "$TP/pg-password")
  [ -s "$TP/mlflow-db-password" ] || (umask 077; randhex 16 > "$TP/mlflow-db-password")
  ensure_role_db "$PG_USER" "$PG_DB" "$(cat "$TP/pg-password")"
  ensure_role_db "$MLFLOW_DB" "$MLFLOW_DB" "$(cat "$TP/mlflow-db-password")"
  PG_DSN="postgresql://$PG_USER:$(cat "$TP/pg-password")@$CLOUD_ADDR:$PG_PORT/$PG_DB"
}
stop_pg() {
  local d p
  for d in "$TP/pg" "$PG_FALLBACK_DATA"; do
    if alive "$d/postmaster.pid" postgres; then
      p=$(pid_of "$d/postmaster.pid")
      log "stopping postgres (pid $p, $d)"
      kill -INT "$p" 2>/dev/null || true      # SIGINT = fast shutdown
      for _ in $(seq 1 150); do running "$p" || break; sleep 0.1; done
      if running "$p"; then stop_pid "$p" postgres; fi
    fi
  done
}

# ---------------------------------------------------------------- S3 (SeaweedFS) on cloud
s3_keys() {
  if [ ! -s "$TP/s3-credentials" ]; then
    (umask 077; printf 'S3_ACCESS_KEY=TP%s\nS3_SECRET_KEY=%s\n' "$(randhex 9 | tr 'a-f' 'A-F')" "$(randhex 20)" > "$TP/s3-credentials")
  fi
  S3_ACCESS_KEY=$(sed -n 's/^S3_ACCESS_KEY=//p' "$TP/s3-credentials")
  S3_SECRET_KEY=$(sed -n 's/^S3_SECRET_KEY=//p' "$TP/s3-credentials")
  (umask 077; write_if_changed "$TP/s3-identities.json" <<EOF || true
{"identities": [{"name": "cloudhpc", "credentials": [{"accessKey": "$S3_ACCESS_KEY", "secretKey": "$S3_SECRET_KEY"}],
  "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}
EOF
  )
}
s3_buckets() { # creates the buckets if missing; polls until head_bucket succeeds
  "$VENV/bin/python" - "http://$CLOUD_ADDR:$S3_PORT" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" "$@" <<'PY'
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
start_s3() {
  s3_keys
  if alive_in "$WEED_PID" weed cloud && port_open "$CLOUD_ADDR" "$S3_PORT"; then
    log "s3: running on cloud $CLOUD_ADDR:$S3_PORT (pid $(pid_of "$WEED_PID"))"
  else
    stop_pidfile "$WEED_PID" weed
    mkdir -p "$TP/s3"
    # every port set, bound to cloud's address only; no telemetry (there is no way out anyway)
    setsid nsenter --net="$(ns_path cloud)" --uts="$UTS_DIR/cloud" --wd="$TP/s3" -- "$VENV/bin/weed" mini -dir="$TP/s3" \
      -ip="$CLOUD_ADDR" -ip.bind="$CLOUD_ADDR" \
      -master.port=9333 -master.port.grpc=19333 -volume.port=8080 -volume.port.grpc=18080 \
      -filer.port=8888 -filer.port.grpc=18888 -s3.port=$S3_PORT -s3.port.grpc=19000 -s3.port.iceberg=0 -s3.port.lance=0 \
      -webdav=false -admin.ui=false -admin.port=23646 -admin.port.grpc=33646 \
      -metricsPort=9327 -metricsIp="$CLOUD_ADDR" -master.telemetry=false \
      -s3.config="$TP/s3-identities.json" > "$LOGD/weed.log" 2>&1 < /dev/null 8>&- 9>&- &
    echo $! > "$WEED_PID"
    sleep 0.2
    alive "$WEED_PID" weed || { tail -20 "$LOGD/weed.log" >&2; die "weed mini exited at once (see $LOGD/weed.log)"; }
    wait_ready 60 "S3 on $CLOUD_ADDR:$S3_PORT" "$WEED_PID" weed "$LOGD/weed.log" port_open "$CLOUD_ADDR" "$S3_PORT"
    log "s3: started on cloud $CLOUD_ADDR:$S3_PORT (pid $(pid_of "$WEED_PID"))"
  fi
}

# ---------------------------------------------------------------- Prometheus on cloud
write_prometheus_conf() { # returns 0 if the configuration changed
  mkdir -p "$PROM_DIR/targets" "$PROM_DIR/data"
  printf '[{"targets": ["%s:%s"], "labels": {"deployment": "topology"}}]\n' "$CLOUD_ADDR" "$PORTER_PORT" |
    write_if_changed "$PROM_DIR/targets/porter-topology.json" || true
  write_if_changed "$PROM_DIR/prometheus.yml" <<EOF
# generated by scripts/topology.sh (the scrape jobs of deploy/prometheus/cloudhpc-scrape.yaml, faster)
global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: cloudhpc-porter
    file_sd_configs: [{files: ["$PROM_DIR/targets/porter-*.json"], refresh_interval: 1s}]
  - job_name: cloudhpc-submitter
    file_sd_configs: [{files: ["$PROM_DIR/targets/submitter-*.json"], refresh_interval: 1s}]
EOF
}
prometheus_ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$CLOUD_ADDR:$PROM_PORT/-/ready")" = 200 ]; }
start_prometheus() {
  local changed=0
  write_prometheus_conf && changed=1
  promtool check config "$PROM_DIR/prometheus.yml" > "$LOGD/promtool.log" 2>&1 ||
    { cat "$LOGD/promtool.log" >&2; die "promtool rejected $PROM_DIR/prometheus.yml"; }
  if alive_in "$PROM_PID" prometheus cloud && [ $changed = 0 ]; then
    log "prometheus: running on cloud $CLOUD_ADDR:$PROM_PORT (pid $(pid_of "$PROM_PID"))"; return 0
  fi
  stop_pidfile "$PROM_PID" prometheus
  setsid nsenter --net="$(ns_path cloud)" --uts="$UTS_DIR/cloud" -- /usr/bin/prometheus \
    --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" --storage.tsdb.retention.time=3d \
    --web.listen-address="$CLOUD_ADDR:$PROM_PORT" > "$LOGD/prometheus.log" 2>&1 < /dev/null 8>&- 9>&- &
  echo $! > "$PROM_PID"
  PROM_STARTED=1
}

# ---------------------------------------------------------------- MLflow on cloud
mlflow_ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$CLOUD_ADDR:$MLFLOW_PORT/health")" = 200 ]; }
start_mlflow() {
  local pw; pw=$(cat "$TP/mlflow-db-password")
  local hosts="$CLOUD_ADDR,$CLOUD_ADDR:$MLFLOW_PORT,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
  local args=("$VENV/bin/mlflow" server --host "$CLOUD_ADDR" --port "$MLFLOW_PORT" --workers 1
    --backend-store-uri "postgresql+psycopg://$MLFLOW_DB:$pw@$CLOUD_ADDR:$PG_PORT/$MLFLOW_DB"
    --serve-artifacts --artifacts-destination "s3://$MLFLOW_BUCKET" --allowed-hosts "$hosts")
  local changed=0
  printf '%s\n' "${args[@]}" | write_if_changed "$RUN/mlflow.args" && changed=1
  if alive_in "$MLFLOW_PID" mlflow cloud && [ $changed = 0 ]; then
    log "mlflow: running on cloud $CLOUD_ADDR:$MLFLOW_PORT (pid $(pid_of "$MLFLOW_PID"))"; return 0
  fi
  stop_pidfile "$MLFLOW_PID" mlflow group
  MLFLOW_S3_ENDPOINT_URL=http://$CLOUD_ADDR:$S3_PORT AWS_ACCESS_KEY_ID=$S3_ACCESS_KEY AWS_SECRET_ACCESS_KEY=$S3_SECRET_KEY \
  AWS_DEFAULT_REGION=us-east-1 MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    setsid nsenter --net="$(ns_path cloud)" --uts="$UTS_DIR/cloud" -- "${args[@]}" \
    > "$LOGD/mlflow.log" 2>&1 < /dev/null 8>&- 9>&- &
  echo $! > "$MLFLOW_PID"
  MLFLOW_STARTED=1
}

# ---------------------------------------------------------------- client files
q() { printf '%q' "$1"; }
write_env() {
  write_if_changed "$TP/env.sh" <<EOF || true
# generated by scripts/topology.sh up -- source it: . $(q "$TP/env.sh")
# hosts: run a command on one with  nsenter --net=\$TOPOLOGY_NETNS_DIR/chpc-HOST --uts=\$TOPOLOGY_UTS_DIR/HOST -- CMD
export TOPOLOGY_NETNS_DIR=$NETNS_DIR
export TOPOLOGY_UTS_DIR=$UTS_DIR
export TOPOLOGY_NETNS_PREFIX=$P-
export TOPOLOGY_HOSTS="$HOSTS"
export TOPOLOGY_NET=$NET
export TOPOLOGY_OPERATOR_ADDR=$OP_ADDR
export TOPOLOGY_LAPTOP_ADDR=$LAPTOP_ADDR
export TOPOLOGY_CLOUD_ADDR=$CLOUD_ADDR
export TOPOLOGY_LOGIN_ADDR=$LOGIN_ADDR
export TOPOLOGY_C1_ADDR=$C1_ADDR
export TOPOLOGY_C2_ADDR=$C2_ADDR
export TOPOLOGY_ROUTER_ADDRS="$OP_GW $LAPTOP_GW $CLOUD_GW $HPC_GW"
export TOPOLOGY_HPC_NAT_ADDR=$HPC_NAT
export TOPOLOGY_LAPTOP_NAT_ADDR=$LAPTOP_GW
export TOPOLOGY_DELAY_MS=$DELAY_MS
export TOPOLOGY_RELAY_PIDFILE=$(q "$RELAY_PID")
export TOPOLOGY_SSH_HOST=$LOGIN_ADDR
export TOPOLOGY_SSH_PORT=$SSH_PORT
export TOPOLOGY_SSH_USER=$TEST_USER
export TOPOLOGY_SSH_KEY=$(q "$KEYS/id_ed25519")
export TOPOLOGY_KNOWN_HOSTS=$(q "$KNOWN_HOSTS")
export TOPOLOGY_LOGIN_SSHD_PIDFILE=$(q "$LOGIN_SSHD_PID")
export TOPOLOGY_SLURM_CONF=$(q "$SLURM_CONF")
export TOPOLOGY_SLURM_CLUSTER=$CLUSTER
export TOPOLOGY_SLURM_PARTITION=$PARTITION
export TOPOLOGY_SLURM_NODES="c1 c2"
export TOPOLOGY_BRIDGE_HOST=$CLOUD_ADDR
export TOPOLOGY_BRIDGE_PORT=$SSH_PORT
export TOPOLOGY_BRIDGE_USER=$BRIDGE_USER
export TOPOLOGY_BRIDGE_KEY=$(q "$KEYS/bridge_ed25519")
export TOPOLOGY_BRIDGE_BIND_ADDRESS=$CLOUD_ADDR
export TOPOLOGY_BRIDGE_PORT_RANGE="$BRIDGE_PORT_LOW $BRIDGE_PORT_HIGH"
export TOPOLOGY_CLOUD_SSHD_PIDFILE=$(q "$CLOUD_SSHD_PID")
export TOPOLOGY_PORTER_PORT=$PORTER_PORT
export TOPOLOGY_PORTER_URL=http://$CLOUD_ADDR:$PORTER_PORT
export TOPOLOGY_S3_ENDPOINT=http://$CLOUD_ADDR:$S3_PORT
export TOPOLOGY_S3_ACCESS_KEY=$(q "$S3_ACCESS_KEY")
export TOPOLOGY_S3_SECRET_KEY=$(q "$S3_SECRET_KEY")
export TOPOLOGY_S3_BUCKET=$S3_BUCKET
export TOPOLOGY_PG_DSN=$(q "$PG_DSN")
export TOPOLOGY_MLFLOW_URL=http://$CLOUD_ADDR:$MLFLOW_PORT
export TOPOLOGY_MLFLOW_BUCKET=$MLFLOW_BUCKET
export TOPOLOGY_PROMETHEUS_URL=http://$CLOUD_ADDR:$PROM_PORT
export TOPOLOGY_PROMETHEUS_TARGETS=$(q "$PROM_DIR/targets")
EOF
}

# ---------------------------------------------------------------- self-check
self_check() {
  local t out; t=$(date +%s.%N)
  # from the laptop, through the relay, with the pinned host key: a 2-node step on c1 and c2
  # shellcheck disable=SC2016 # expanded by the tasks on c1 and c2
  out=$(in_host laptop ssh -i "$KEYS/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$KNOWN_HOSTS" -o ConnectTimeout=10 -p "$SSH_PORT" "$TEST_USER@$LOGIN_ADDR" \
    'srun -N2 --ntasks-per-node=1 -t 1 --comment=cloudhpc:selfcheck bash -c "echo \$(hostname) \$(hostname -I)"' 2>&1) ||
    die "self-check: ssh laptop -> login + srun -N2 failed: $out"
  out=$(sort <<<"$out" | tr -s ' \n' ' ')
  [ "$out" = "c1 $C1_ADDR c2 $C2_ADDR " ] || die "self-check: srun -N2 printed '$out', expected 'c1 $C1_ADDR c2 $C2_ADDR'"
  log "self-check: laptop -> login (relay) -> srun -N2 ran on c1 and c2 ($(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s)"
}

# ---------------------------------------------------------------- actions
LOCKED=0
lock() {
  [ "$LOCKED" = 1 ] && return 0
  mkdir -p "$TP"; exec 8>"$TP/topology.lock"
  flock -w 900 8 || die "another scripts/topology.sh still holds $TP/topology.lock after 900 s"
  LOCKED=1
}
PROM_STARTED=0
MLFLOW_STARTED=0
do_up() {
  need_root; lock
  mkdir -p "$RUN" "$LOGD"; chmod 755 "$TB" "$TP"
  claim_net
  install_pkgs
  check_base
  build_net
  write_hosts
  apply_firewalls
  write_slurm_conf
  start_slurmdbd
  register_accounting
  start_slurm
  start_sshds
  start_relay
  start_pg
  start_s3
  s3_buckets "$S3_BUCKET" "$MLFLOW_BUCKET" || die "S3 buckets could not be created (see $LOGD/weed.log)"
  start_prometheus
  start_mlflow
  write_env
  self_check
  if [ $PROM_STARTED = 1 ]; then
    wait_ready 60 "prometheus on $CLOUD_ADDR:$PROM_PORT" "$PROM_PID" prometheus "$LOGD/prometheus.log" prometheus_ready
    log "prometheus: started on cloud $CLOUD_ADDR:$PROM_PORT (pid $(pid_of "$PROM_PID"))"
  fi
  if [ $MLFLOW_STARTED = 1 ]; then
    wait_ready 120 "mlflow on $CLOUD_ADDR:$MLFLOW_PORT" "$MLFLOW_PID" mlflow "$LOGD/mlflow.log" mlflow_ready
    log "mlflow: started on cloud $CLOUD_ADDR:$MLFLOW_PORT (pid $(pid_of "$MLFLOW_PID"))"
  fi
  log "UP in $(elapsed) s: laptop $LAPTOP_ADDR, cloud $CLOUD_ADDR, login $LOGIN_ADDR, c1 $C1_ADDR, c2 $C2_ADDR; relay ${DELAY_MS} ms each way; source $TP/env.sh"
}
do_down() {
  need_root; lock
  stop_pidfile "$RELAY_PID" python3
  stop_pidfile "$MLFLOW_PID" mlflow group
  stop_pidfile "$PROM_PID" prometheus
  stop_pidfile "$WEED_PID" weed
  stop_pg
  stop_pidfile "$CLOUD_SSHD_PID" sshd
  stop_pidfile "$LOGIN_SSHD_PID" sshd
  stop_slurm
  local h
  if foreign_owner; then
    log "the namespaces $P-* belong to $(cat "$OWNER"): left alone"
    log "DOWN in $(elapsed) s"; return 0
  fi
  for h in $NAMESPACES; do
    if [ -e "$(ns_path "$h")" ]; then ip netns del "$P-$h"; log "netns $P-$h: deleted"; fi
  done
  rm -f "$OWNER"
  remove_hosts
  ip link del "$ROOT_LINK" 2>/dev/null && log "link $ROOT_LINK: deleted" || true
  for h in $HOSTS; do
    if [ -e "$UTS_DIR/$h" ]; then umount "$UTS_DIR/$h" 2>/dev/null || true; rm -f "$UTS_DIR/$h"; fi
  done
  rmdir "$UTS_DIR" 2>/dev/null || true
  log "DOWN in $(elapsed) s"
}
do_purge() {
  need_root; lock
  do_down
  if alive /run/mysqld/mysqld.pid mariadbd; then
    mysql -e "DROP DATABASE IF EXISTS $DBD_DB"
    log "purge: dropped accounting database $DBD_DB"
  else
    log "purge: MariaDB is not running: accounting database $DBD_DB left in place"
  fi
  rm -rf "$SLURM_DIR/state" "$SLURM_DIR/spool" "$TP/pg" "$PG_FALLBACK_DATA" "$PG_FALLBACK_DATA-run" "$TP/s3" "$PROM_DIR/data"
  log "purge: wiped SLURM state, PostgreSQL, S3 and Prometheus data of the topology"
}
do_status() {
  local bad=0 h pgd
  check() { # check NAME WHERE OK-CMD... ; prints one line
    local n=$1 w=$2; shift 2
    if "$@" >/dev/null 2>&1; then printf '%-18s %-5s %s\n' "$n" up "$w"
    else printf '%-18s %-5s %s\n' "$n" down "$w"; bad=1; fi
  }
  check "netns $P-router" "$OP_GW $LAPTOP_GW $CLOUD_GW $HPC_GW" test -e "$(ns_path router)"
  for h in $HOSTS; do check "netns $P-$h" "$(addr_of "$h")" test -e "$(ns_path "$h")"; done
  check "link $ROOT_LINK" "$OP_ADDR -> $NET" ip link show "$ROOT_LINK"
  check relay "$LAPTOP_GW:$RELAY_SSH_PORT,$RELAY_PORTER_PORT ${DELAY_MS}ms" relay_alive
  check slurmdbd "login $LOGIN_ADDR:6819" alive_in "$DBD_PID" slurmdbd login
  check slurmctld "login $LOGIN_ADDR:6817 cluster $CLUSTER" sh -c "SLURM_CONF=$SLURM_CONF scontrol ping | grep -q UP"
  for h in c1 c2; do check "slurmd $h" "$h $(addr_of $h):6818" alive_in "$(slurmd_pid $h)" slurmd "$h"; done
  check "sshd login" "$LOGIN_ADDR:$SSH_PORT" alive_in "$LOGIN_SSHD_PID" sshd login
  check "sshd cloud" "$CLOUD_ADDR:$SSH_PORT" alive_in "$CLOUD_SSHD_PID" sshd cloud
  pgd=$TP/pg; alive "$PG_FALLBACK_DATA/postmaster.pid" postgres && pgd=$PG_FALLBACK_DATA
  check postgres "$CLOUD_ADDR:$PG_PORT $pgd" "$PGBIN/pg_isready" -q -h "$CLOUD_ADDR" -p "$PG_PORT"
  check s3 "http://$CLOUD_ADDR:$S3_PORT" port_open "$CLOUD_ADDR" "$S3_PORT"
  check prometheus "http://$CLOUD_ADDR:$PROM_PORT" prometheus_ready
  check mlflow "http://$CLOUD_ADDR:$MLFLOW_PORT" mlflow_ready
  if [ $bad = 0 ]; then echo "topology: up (source $TP/env.sh)"; else echo "topology: DOWN (run: $0 up)"; fi
  return $bad
}

case "${1:-}" in
  up) do_up ;;
  down) do_down ;;
  status) do_status ;;
  purge) do_purge ;;
  *) echo "usage: $0 up|down|status|purge" >&2; exit 2 ;;
esac
