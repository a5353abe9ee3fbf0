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

TB_NAME=topology
# shellcheck source-path=SCRIPTDIR source=testbed-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/testbed-lib.sh"     # ROOT, TB, KEYS (reused), VENV and the shared functions
TP=$TB/topology
RUN=$TP/run
LOGD=$TP/log

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
BRIDGE_USER=${P}bridge   # the bridge account on cloud (docs/bridge-vm.md): trusts the bridge CA, and holds the shared bridge key's line
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

# ---------------------------------------------------------------- running things in a host
ns_path() { echo "$NETNS_DIR/$P-$1"; }
# host_cmd HOST [OPTION...]: the command prefix that runs a command with HOST's network and host name,
# one word a line (nsenter, not `ip netns exec`: that remounts /sys in a new mount namespace, which
# breaks slurmd's cgroup plugin); the router has no host name of its own. OPTIONs go to nsenter.
host_cmd() {
  if [ "$1" = router ]; then printf '%s\n' nsenter --net="$(ns_path router)" "${@:2}" --
  else printf '%s\n' nsenter --net="$(ns_path "$1")" --uts="$UTS_DIR/$1" "${@:2}" --; fi
}
in_host() { # in_host HOST CMD...
  local pre=()
  mapfile -t pre < <(host_cmd "$1"); shift
  "${pre[@]}" "$@"
}
slurm() { SLURM_CONF=$SLURM_CONF "$@"; }
# alive_in PIDFILE COMM HOST: alive, and in HOST's network namespace
alive_in() { alive_ns "$1" "$2" "$(ns_path "$3")"; }

# ---------------------------------------------------------------- packages
install_pkgs() {
  local missing=()
  mapfile -t missing < <(missing_pkgs "$PKGS")
  [ ${#missing[@]} -eq 0 ] && return 0
  # scripts/testbed.sh installs these with its own packages, before any daemon starts; this is the
  # fallback for a machine set up by an older testbed.sh (an install while daemons run is avoided)
  log "packages: installing ${missing[*]}"
  forbid_service_starts
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
# Namespaces outlive the run that made them: a CI run in a container that was thrown away leaves them
# behind with no process inside and an owner checkout that no longer exists. Those are taken over.
abandoned() {
  local h
  [ -d "$(cat "$OWNER")" ] && return 1
  for h in $NAMESPACES; do
    [ -e "$(ns_path "$h")" ] && [ -n "$(ip netns pids "$P-$h" 2>/dev/null)" ] && return 1
  done
  return 0
}
claim_net() {
  if foreign_owner && [ -e "$(ns_path router)" ]; then
    if abandoned; then
      log "the namespaces $P-* of $(cat "$OWNER") are abandoned (that checkout is gone, no process runs in them): taking them over"
      release_net
    else
      die "the topology of $(cat "$OWNER") is up on this machine (namespaces $P-*): run its scripts/topology.sh down first"
    fi
  fi
  echo "$ROOT" > "$OWNER"
}
release_net() { # deletes the namespaces, the root link, the host names and the UTS namespaces
  local h
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
  local changed=0 args=() pre=()
  # restarted when its arguments or its code change
  { relay_args; sha256sum "$RELAY"; } | write_if_changed "$RUN/relay.state" && changed=1
  if relay_alive && [ $changed = 0 ]; then log "relay: running, ${DELAY_MS} ms each way (pid $(pid_of "$RELAY_PID"))"; return 0; fi
  relay_alive && stop_pid "$(pid_of "$RELAY_PID")" relay
  rm -f "$RELAY_PID"
  mapfile -t args < <(relay_args)
  mapfile -t pre < <(host_cmd router)
  start_bg "$RELAY_PID" "$LOGD/relay.log" "${pre[@]}" "${args[@]}"
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
  if slurm_conf "# generated by cloudhpc scripts/topology.sh -- login node + two compute nodes, each its own network host" \
       "$CLUSTER" "login($LOGIN_ADDR)" "$SLURM_DIR/state" "$SLURM_DIR/spool/%n" "$CTLD_PID" "$SLURM_RUN/slurmd-%n.pid" \
       "$SLURM_LOG/slurmctld.log" "$SLURM_LOG/slurmd-%n.log" "$LOGIN_ADDR" \
       "FirstJobId=$(first_job_id "$SLURM_DIR/state")" \
       "NodeName=c1 NodeAddr=$C1_ADDR CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN" \
       "NodeName=c2 NodeAddr=$C2_ADDR CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN" \
       "PartitionName=$PARTITION Nodes=c1,c2 Default=YES MaxTime=INFINITE State=UP" |
     write_if_changed "$SLURM_CONF"
  then SLURM_CONF_CHANGED=1; log "slurm: wrote $SLURM_CONF"; fi
  chmod 644 "$SLURM_CONF"
  [ -s "$TP/slurmdbd-password" ] || (umask 077; randhex 12 > "$TP/slurmdbd-password")
  local pass; pass=$(cat "$TP/slurmdbd-password")
  # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
  if slurmdbd_conf "# generated by cloudhpc scripts/topology.sh -- on login; MariaDB is the single-host testbed's (unix socket)" \
       login "$LOGIN_ADDR" "$SLURM_LOG/slurmdbd.log" "$DBD_PID" "$DBD_USER" "$pass" "$DBD_DB" | write_if_changed "$DBD_CONF"
  then DBD_CONF_CHANGED=1; log "slurm: wrote $DBD_CONF"; fi
  chown slurm:slurm "$DBD_CONF"; chmod 600 "$DBD_CONF"
}
start_slurmdbd() {
  mariadb_grant "$DBD_USER" "$(cat "$TP/slurmdbd-password")" "$DBD_DB"
  [ "$DBD_CONF_CHANGED" = 1 ] && stop_pidfile "$DBD_PID" slurmdbd
  if alive_in "$DBD_PID" slurmdbd login; then log "slurmdbd: running on login (pid $(pid_of "$DBD_PID"))"; return 0; fi
  stop_pidfile "$DBD_PID" slurmdbd
  in_host login env SLURM_CONF="$SLURM_CONF" slurmdbd 8>&- 9>&-
  wait_for 60 "slurmdbd on $LOGIN_ADDR:6819" port_open "$LOGIN_ADDR" 6819
  log "slurmdbd: started on login (pid $(pid_of "$DBD_PID"))"
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
ensure_bridge_user() {
  id "$BRIDGE_USER" >/dev/null 2>&1 || { useradd -m -s /bin/bash "$BRIDGE_USER"; log "created user $BRIDGE_USER (the bridge account on cloud)"; }
}
authorize_bridge() {
  local h; h=$(home_of "$BRIDGE_USER")
  install -d -m 700 -o "$BRIDGE_USER" -g "$(id -gn "$BRIDGE_USER")" "$h/.ssh"
  # the line `cloudhpc bridge authorized-key --permit-open CLOUD:5000 --permit-open CLOUD:9000` prints
  # for porter.bridge = {bind_address: CLOUD, port_range: [19500, 19599]} (a test compares them)
  (umask 077; bridge_authorized_line "$CLOUD_ADDR" "$BRIDGE_PORT_LOW" "$BRIDGE_PORT_HIGH" "$KEYS/bridge_ed25519.pub" \
     "$CLOUD_ADDR:$MLFLOW_PORT" "$CLOUD_ADDR:$S3_PORT" | write_if_changed "$h/.ssh/authorized_keys") &&
    log "ssh: authorized the bridge key for $BRIDGE_USER on cloud (forwarding only, $CLOUD_ADDR:$BRIDGE_PORT_LOW-$BRIDGE_PORT_HIGH)" || true
  chown "$BRIDGE_USER:$(id -gn "$BRIDGE_USER")" "$h/.ssh/authorized_keys"; chmod 600 "$h/.ssh/authorized_keys"
}
start_sshd() { # start_sshd HOST ADDR DIR PIDFILE ALLOWUSER EXTRA
  local h=$1 a=$2 d=$3 pf=$4 changed=0
  install -d -m 700 "$d"
  [ -s "$d/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C "$h-host" -f "$d/ssh_host_ed25519_key"
  sshd_conf "# generated by cloudhpc scripts/topology.sh -- the sshd of $h" "$SSH_PORT" "$a" "$pf" \
    "$d/ssh_host_ed25519_key" "AllowUsers $5" "" "$6" | write_if_changed "$d/sshd_config" && changed=1
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
  # the bridge CA (the testbed's): cloud's sshd lets a job's certificate listen on its own ports only
  ensure_bridge_ca
  install -d -m 700 "$CLOUD_SSHD_DIR"
  install -m 644 "$KEYS/bridge_ca.pub" "$CLOUD_SSHD_DIR/bridge_ca.pub"
  start_sshd cloud "$CLOUD_ADDR" "$CLOUD_SSHD_DIR" "$CLOUD_SSHD_PID" "$BRIDGE_USER" \
    "$(printf 'GatewayPorts clientspecified\nClientAliveInterval 15\nClientAliveCountMax 2\n'
       bridge_sshd_block "$BRIDGE_USER" "$CLOUD_SSHD_DIR/bridge_ca.pub" "$(principals_wrapper)" "$CLOUD_ADDR" \
         "$BRIDGE_PORT_LOW" "$BRIDGE_PORT_HIGH" "$CLOUD_ADDR:$MLFLOW_PORT" "$CLOUD_ADDR:$S3_PORT")"
  # pinned host keys, from the keys themselves (not from the network)
  { printf '%s %s\n' "$LOGIN_ADDR" "$(cut -d' ' -f1,2 "$LOGIN_SSHD_DIR/ssh_host_ed25519_key.pub")"
    printf '%s %s\n' "$CLOUD_ADDR" "$(cut -d' ' -f1,2 "$CLOUD_SSHD_DIR/ssh_host_ed25519_key.pub")"
  } | write_if_changed "$KNOWN_HOSTS" && log "ssh: wrote $KNOWN_HOSTS" || true
  chmod 644 "$KNOWN_HOSTS"
}

# ---------------------------------------------------------------- PostgreSQL on cloud
pg_datadir() { if runuser -u postgres -- test -x "$TP" 2>/dev/null; then echo "$TP/pg"; else echo "$PG_FALLBACK_DATA"; fi; }
start_pg() {
  PGDATA_DIR=$(pg_datadir)
  PG_LOG=$LOGD/pg.log
  if [ "$PGDATA_DIR" = "$PG_FALLBACK_DATA" ]; then   # postgres cannot reach .testbed/: socket and log beside the data
    log "pg: $TP is not traversable by user postgres: data dir is $PGDATA_DIR"
    PG_SOCK=$PG_FALLBACK_DATA-run; PG_LOG=$PG_FALLBACK_DATA-run/pg.log
  fi
  install -d -o postgres -g postgres -m 755 "$PG_SOCK"
  pg_initdb "$PGDATA_DIR"
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
# ---------------------------------------------------------------- S3 (SeaweedFS) on cloud
start_s3() {
  s3_keys "$TP" TP
  if alive_in "$WEED_PID" weed cloud && port_open "$CLOUD_ADDR" "$S3_PORT"; then
    log "s3: running on cloud $CLOUD_ADDR:$S3_PORT (pid $(pid_of "$WEED_PID"))"
  else
    stop_pidfile "$WEED_PID" weed
    mkdir -p "$TP/s3"
    local pre=() args=()
    mapfile -t pre < <(host_cmd cloud --wd="$TP/s3")
    mapfile -t args < <(weed_mini_args "$TP/s3" "$CLOUD_ADDR" 9333 19333 8080 18080 8888 18888 "$S3_PORT" 19000 \
      23646 33646 9327 "$TP/s3-identities.json")
    start_bg "$WEED_PID" "$LOGD/weed.log" "${pre[@]}" "$VENV/bin/weed" "${args[@]}"
    sleep 0.2
    alive "$WEED_PID" weed || { tail -20 "$LOGD/weed.log" >&2; die "weed mini exited at once (see $LOGD/weed.log)"; }
    wait_ready 60 "S3 on $CLOUD_ADDR:$S3_PORT" "$WEED_PID" weed "$LOGD/weed.log" port_open "$CLOUD_ADDR" "$S3_PORT"
    log "s3: started on cloud $CLOUD_ADDR:$S3_PORT (pid $(pid_of "$WEED_PID"))"
  fi
}

# ---------------------------------------------------------------- Prometheus on cloud
prometheus_ready() { http_ok "http://$CLOUD_ADDR:$PROM_PORT/-/ready"; }
start_prometheus() {
  local changed=0
  write_prometheus_conf "$PROM_DIR" "porter-topology=$CLOUD_ADDR:$PORTER_PORT=topology" && changed=1
  check_prometheus_conf "$PROM_DIR"
  if alive_in "$PROM_PID" prometheus cloud && [ $changed = 0 ]; then
    log "prometheus: running on cloud $CLOUD_ADDR:$PROM_PORT (pid $(pid_of "$PROM_PID"))"; return 0
  fi
  stop_pidfile "$PROM_PID" prometheus
  local pre=() args=()
  mapfile -t pre < <(host_cmd cloud)
  mapfile -t args < <(prometheus_args "$PROM_DIR" "$CLOUD_ADDR:$PROM_PORT")
  start_bg "$PROM_PID" "$LOGD/prometheus.log" "${pre[@]}" "${args[@]}"
  PROM_STARTED=1
}

# ---------------------------------------------------------------- MLflow on cloud
mlflow_ready() { http_ok "http://$CLOUD_ADDR:$MLFLOW_PORT/health"; }
start_mlflow() {
  local pw; pw=$(cat "$TP/mlflow-db-password")
  local hosts="$CLOUD_ADDR,$CLOUD_ADDR:$MLFLOW_PORT,localhost,localhost:*,127.0.0.1,127.0.0.1:*"
  local args=() pre=()
  mapfile -t args < <(mlflow_args "$CLOUD_ADDR" "$MLFLOW_PORT" "$MLFLOW_BUCKET" --allowed-hosts "$hosts")
  local changed=0
  printf '%s\n' "${args[@]}" | write_if_changed "$RUN/mlflow.args" && changed=1
  if alive_in "$MLFLOW_PID" mlflow cloud && [ $changed = 0 ]; then
    log "mlflow: running on cloud $CLOUD_ADDR:$MLFLOW_PORT (pid $(pid_of "$MLFLOW_PID"))"; return 0
  fi
  stop_pidfile "$MLFLOW_PID" mlflow group
  mapfile -t pre < <(host_cmd cloud)
  start_mlflow_bg "$MLFLOW_PID" "$LOGD/mlflow.log" "http://$CLOUD_ADDR:$S3_PORT" \
    "postgresql+psycopg://$MLFLOW_DB:$pw@$CLOUD_ADDR:$PG_PORT/$MLFLOW_DB" "${pre[@]}" -- "${args[@]}"
  MLFLOW_STARTED=1
}

# ---------------------------------------------------------------- client files
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
export TOPOLOGY_BRIDGE_CA_KEY=$(q "$KEYS/bridge_ca")
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
  # (--quiet: while the nodes are busy srun says "queued and waiting" on stderr, which is not output)
  # shellcheck disable=SC2016 # expanded by the tasks on c1 and c2
  out=$(in_host laptop ssh -i "$KEYS/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o UserKnownHostsFile="$KNOWN_HOSTS" -o ConnectTimeout=10 -p "$SSH_PORT" "$TEST_USER@$LOGIN_ADDR" \
    'srun --quiet -N2 --ntasks-per-node=1 -t 1 --comment=cloudhpc:selfcheck bash -c "echo \$(hostname) \$(hostname -I)"' 2>&1) ||
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
# await_cloud NAME PORT SECONDS PIDFILE READY: NAME (its comm and log name), left starting on cloud by start_NAME
await_cloud() {
  wait_ready "$3" "$1 on $CLOUD_ADDR:$2" "$4" "$1" "$LOGD/$1.log" "$5"
  log "$1: started on cloud $CLOUD_ADDR:$2 (pid $(pid_of "$4"))"
}
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
  register_accounting "$CLUSTER" "$TEST_USER"
  start_slurm
  start_sshds
  start_relay
  start_pg
  start_s3
  s3_buckets "http://$CLOUD_ADDR:$S3_PORT" "$S3_BUCKET" "$MLFLOW_BUCKET" || die "S3 buckets could not be created (see $LOGD/weed.log)"
  start_prometheus
  start_mlflow
  write_env
  self_check
  if [ $PROM_STARTED = 1 ]; then await_cloud prometheus "$PROM_PORT" 60 "$PROM_PID" prometheus_ready; fi
  if [ $MLFLOW_STARTED = 1 ]; then await_cloud mlflow "$MLFLOW_PORT" 120 "$MLFLOW_PID" mlflow_ready; fi
  log "UP in $(elapsed) s: laptop $LAPTOP_ADDR, cloud $CLOUD_ADDR, login $LOGIN_ADDR, c1 $C1_ADDR, c2 $C2_ADDR; relay ${DELAY_MS} ms each way; source $TP/env.sh"
}
do_down() {
  need_root; lock
  stop_pidfile "$RELAY_PID" python3
  stop_pidfile "$MLFLOW_PID" mlflow group
  stop_pidfile "$PROM_PID" prometheus
  stop_pidfile "$WEED_PID" weed
  stop_pg "$TP/pg" "$PG_FALLBACK_DATA"
  stop_pidfile "$CLOUD_SSHD_PID" sshd
  stop_pidfile "$LOGIN_SSHD_PID" sshd
  stop_slurm
  local h
  if foreign_owner; then
    log "the namespaces $P-* belong to $(cat "$OWNER"): left alone"
    log "DOWN in $(elapsed) s"; return 0
  fi
  release_net
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

main "$@"
