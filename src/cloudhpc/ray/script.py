"""Renders a Ray cluster (`ray-cluster`) or a Ray job (`ray-job`) as the body of a SLURM batch script.

The layout follows what works on shared HPC nodes, and avoids what the original system got wrong:

- the head runs on the batch node, one worker per other node through `srun`;
- every port is picked free on the node at run time and the temporary directory is per job and short
  (`/tmp/chpc.XXXXXX`: Ray's unix sockets live under it and must stay below 108 characters), so two
  Ray clusters on one node never collide;
- the dashboard listens on the head's loopback only; on a single-node job everything does
  (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` and `--node-ip-address=127.0.0.1`, else Ray binds the
  default route's address). A multi-node job must bind an address the other nodes reach;
- `ray start --block` runs in its own session, and is stopped by signalling that session, never
  with `ray stop` (which stops every Ray process of the user on the machine, other jobs' too);
- readiness is "all requested nodes alive", read from the head's dashboard; the bridge tunnel starts
  with Ray, not after it (see `_bridges`);
- a `ray-job` runs its entrypoint against its own cluster and the SLURM job ends when the
  entrypoint does, with its exit status: no idle cluster billed until the time limit.

Pure functions: the agent calls `render_ray_job` and hands the result to the backend. The body is
its named sections in order (`SECTIONS`: header, teardown, environment, head, workers, bridges,
readiness, main), each rendered by one function from one `_Layout` and kept as a golden file in
tests/unit/golden/. Nothing a user sends reaches the shell: the entrypoint is a file run by bash,
names and hosts are quoted literals, and every number is checked.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from cloudhpc.bridges.tunnel import TunnelExport, TunnelImport, TunnelPlan, render_tunnel
from cloudhpc.domain.checkpoint import CheckpointSpec
from cloudhpc.domain.jobs import (
    Bridge,
    JobKind,
    JobSpec,
    RaySpec,
    Resources,
    import_variable,
)
from cloudhpc.hpc.backend import JobPaths
from cloudhpc.hpc.requeue import checkpoint_requeue_lines, checkpoint_run_lines, checkpoint_setup_lines
from cloudhpc.ray.jobs_api import SESSION_TOKEN_FILE

__all__ = [
    "ENTRYPOINT_END_MARKER",
    "HELPERS_FILE",
    "READY_TIMEOUT",
    "SESSION_TOKEN_FILE",
    "RayJobScript",
    "TunnelAccess",
    "ray_node_count",
    "render_ray_job",
]

HELPERS_FILE = ".cloudhpc/ray_helpers.py"
WORKER_FILE = ".cloudhpc/ray_worker.sh"
ENTRYPOINT_FILE = ".cloudhpc/entrypoint"
KEY_FILE = ".cloudhpc/bridge_key"
CERTIFICATE_FILE = ".cloudhpc/bridge_key-cert.pub"
KNOWN_HOSTS_FILE = ".cloudhpc/bridge_known_hosts"
READY_TIMEOUT = 300
"""Seconds for all Ray nodes to join before the job gives up (a node that never joins is broken)."""
ENTRYPOINT_END_MARKER = "cloudhpc: the entrypoint exited with status"
"""The last line of a ray-job's output: the agent, reading the output, polls SLURM at once."""
IMPORT_WAIT = 60
"""Seconds a ray-job waits for its imported services to be reachable before starting anyway."""
OBJECT_STORE_SHARE = 0.3
"""Of a Ray node's `mem`, the share given to the object store (Ray's own default split)."""

_RAY_PORTS = {"dashboard": '"$chpc_dashboard"', "client": '"$chpc_client"', "metrics": '"$chpc_metrics"'}
"""Exposed names that mean Ray's own ports, picked at run time; other names are the user's ports."""


def ray_node_count(spec: JobSpec) -> int:
    """Ray nodes of the job: 1 + `ray.workers.nodes`, else `resources.nodes` (one Ray node per node)."""
    assert spec.ray is not None
    if spec.ray.workers.nodes is not None:
        return spec.ray.workers.nodes + 1
    return spec.resources.nodes or 1


@dataclass(frozen=True)
class TunnelAccess:
    """How this job reaches the bridge VM (the submitter's copy of `porter.bridge`), with the files."""

    host: str
    ssh_port: int
    ssh_user: str
    bind_address: str
    key: bytes = field(repr=False)
    """The private key (never in a repr, so never in a log line)."""
    known_hosts: bytes
    certificate: bytes | None = None
    """The job's own certificate for `key` (`bridges/certificates.py`); None with the shared key."""


@dataclass(frozen=True)
class RayJobScript:
    sections: dict[str, list[str]]
    """The body's sections by name (`SECTIONS`), in order."""
    files: dict[str, bytes]
    modes: dict[str, int] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    secret_files: tuple[str, ...] = ()
    """Job-relative files to delete when the job ends (the bridge key), whatever way it ends."""

    @property
    def body(self) -> list[str]:
        """The lines of the batch-script body: every section, in order."""
        return [line for lines in self.sections.values() for line in lines]


def _q(value: str) -> str:
    return shlex.quote(value)


def _start_flags(role: Resources) -> list[str]:
    """Ray's size flags for one node, from `ray.head` / `ray.workers`."""
    cpus = str(role.cpus_per_task) if role.cpus_per_task is not None else '"${SLURM_CPUS_ON_NODE:-1}"'
    flags = [f"--num-cpus={cpus}"]
    if role.gpus_per_node is not None:
        flags.append(f"--num-gpus={role.gpus_per_node}")
    total = role.mem_bytes
    if total is not None:
        store = max(int(total * OBJECT_STORE_SHARE), 80 * 1024 * 1024)
        flags += [f"--memory={max(total - store, 0)}", f"--object-store-memory={store}"]
    return flags


_STOP_SESSION = [
    "# stop one `ray start --block` and everything it started: TERM its process group, then KILL",
    "# whatever is left in its session (Ray's workers have their own process groups). Never `ray stop`:",
    "# it stops every Ray process of this user on the node, other jobs' clusters included.",
    "chpc_stop_session() {  # PID [TENTHS of a second of grace]",
    "  local sid=$1 grace=${2:-10} i",
    '  kill -TERM -- "-$sid" 2>/dev/null || return 0',
    "  for ((i = 0; i < grace; i++)); do",
    '    kill -0 -- "-$sid" 2>/dev/null || break',
    "    sleep 0.1",
    "  done",
    '  ps -o pid= --sid "$sid" 2>/dev/null | xargs -r kill -KILL 2>/dev/null',
    "  return 0",
    "}",
]

_COMMON_RAY_FLAGS = "--block --disable-usage-stats --log-style=record --log-color=false"


def _worker_script(job_id: UUID, paths: JobPaths, workers: Resources, multi_node: bool) -> str:
    q = _q
    ip = '"$(python3 "$chpc_control/ray_helpers.py" node-ip)"' if multi_node else "127.0.0.1"
    flags = " ".join(_start_flags(workers))
    lines = [
        "#!/bin/bash",
        f"# cloudhpc job {job_id}: one Ray worker node, started by srun from the job script; do not edit",
        "set -u",
        f"chpc_control={q(paths.control)}",
        *_STOP_SESSION,
        'chpc_tmp=$(mktemp -d /tmp/chpc.XXXXXX) || { echo "cloudhpc: cannot create a directory in /tmp" >&2; exit 97; }',
        'read -r chpc_agent chpc_metrics chpc_rtenv <<<"$(python3 "$chpc_control/ray_helpers.py" ports 3)"',
        f"chpc_ip={ip}",
        'export RAY_TMPDIR="$chpc_tmp" RAY_USAGE_STATS_ENABLED=0',
        'echo "cloudhpc: Ray worker on $(hostname -s) ($chpc_ip) joining $CLOUDHPC_RAY_HEAD"',
        f'setsid ray start --address="$CLOUDHPC_RAY_HEAD" {_COMMON_RAY_FLAGS} \\',
        '  --node-ip-address="$chpc_ip" --dashboard-agent-listen-port="$chpc_agent" \\',
        '  --metrics-export-port="$chpc_metrics" --runtime-env-agent-port="$chpc_rtenv" \\',
        f'  --temp-dir="$chpc_tmp" {flags} </dev/null &',
        "chpc_pid=$!",
        'chpc_done() { chpc_stop_session "$chpc_pid"; rm -rf "$chpc_tmp"; }',
        "trap 'chpc_done; exit 143' TERM INT",
        'wait "$chpc_pid"; chpc_rc=$?',
        "chpc_done",
        'exit "$chpc_rc"',
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Layout:
    """What every section of the script is rendered from: decided once, before any line is written."""

    kind: JobKind
    ray: RaySpec
    paths: JobPaths
    nodes: int
    workers: int
    multi_node: bool
    colocate_workers: bool
    plan: TunnelPlan | None
    secrets: tuple[str, ...]
    checkpoint: CheckpointSpec | None = None
    """A ray-job's `checkpoint`: its warning trap is set in `teardown`, used in `main`."""


def _header(layout: _Layout) -> list[str]:
    """The job's control directory, the `ray` check and the shell functions every later section uses."""
    return [
        f"# ---- cloudhpc: {layout.kind.value} with {layout.nodes} Ray node(s); rendered by cloudhpc, do not edit",
        "set -u",
        f"chpc_control={_q(layout.paths.control)}",
        'chpc_state="$chpc_control/ray"',
        'mkdir -p "$chpc_state" || exit 97',
        "command -v ray >/dev/null 2>&1 || {",
        "  echo \"cloudhpc: 'ray' is not in this job's environment: add \\\"ray[default]\\\" to "
        'environment.packages" >&2',
        "  exit 98",
        "}",
        'chpc_helpers() { python3 "$chpc_control/ray_helpers.py" "$@"; }',
        *_STOP_SESSION,
    ]


def _teardown(layout: _Layout) -> list[str]:
    """The cleanup, set up before anything starts: whatever way the job ends (its end, a cancel, the
    time limit), the tunnel, the entrypoint, the workers and the head stop and the secrets go."""
    return [
        "chpc_head_pid= chpc_workers_pid= chpc_tunnel_pid= chpc_main_pid= chpc_cleaned=",
        'chpc_tmp=$(mktemp -d /tmp/chpc.XXXXXX) || { echo "cloudhpc: cannot create a directory in /tmp" >&2; exit 97; }',
        "chpc_cleanup() {  # [TENTHS of a second Ray gets to stop]",
        '  [ -n "$chpc_cleaned" ] && return 0',
        "  chpc_cleaned=1",
        '  [ -n "$chpc_tunnel_pid" ] && kill "$chpc_tunnel_pid" 2>/dev/null',
        '  [ -s "$chpc_state/tunnel.pid" ] && kill "$(cat "$chpc_state/tunnel.pid")" 2>/dev/null',
        '  [ -n "$chpc_main_pid" ] && kill "$chpc_main_pid" 2>/dev/null',
        '  [ -n "$chpc_workers_pid" ] && kill "$chpc_workers_pid" 2>/dev/null',
        '  [ -n "$chpc_head_pid" ] && chpc_stop_session "$chpc_head_pid" "${1:-10}"',
        '  rm -rf "$chpc_tmp"',
        *[f"  rm -f {_q(layout.paths.file(s))}" for s in layout.secrets],
        "  return 0",
        "}",
        "trap 'chpc_cleanup; exit 143' TERM",
        "trap 'chpc_cleanup; exit 130' INT",
        "trap chpc_cleanup EXIT",
        *(checkpoint_setup_lines(layout.paths, layout.checkpoint) if layout.checkpoint else []),
    ]


def _environment(layout: _Layout) -> list[str]:
    """Free ports and the address Ray binds on this node, recorded in `ports.env` for the agent."""
    lines = [
        'read -r chpc_gcs chpc_dashboard chpc_client chpc_agent chpc_metrics chpc_rtenv <<<"$(chpc_helpers ports 6)"',
        '[ -n "$chpc_rtenv" ] || { echo "cloudhpc: could not pick free ports on $(hostname -s)" >&2; exit 97; }',
    ]
    if layout.multi_node:
        lines.append("chpc_ip=$(chpc_helpers node-ip)")
    else:
        lines += ["chpc_ip=127.0.0.1", "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"]
        if layout.colocate_workers and layout.workers:
            lines.append("unset RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER  # workers refuse to join when it is 0")
    return [
        *lines,
        'export RAY_TMPDIR="$chpc_tmp" RAY_USAGE_STATS_ENABLED=0',
        'cat > "$chpc_state/ports.env" <<CHPC_PORTS',
        "RAY_NODE_IP=$chpc_ip",
        "RAY_GCS_PORT=$chpc_gcs",
        "RAY_DASHBOARD_PORT=$chpc_dashboard",
        "RAY_CLIENT_PORT=$chpc_client",
        "RAY_METRICS_PORT=$chpc_metrics",
        "RAY_TMPDIR=$chpc_tmp",
        "CHPC_PORTS",
    ]


def _head(layout: _Layout) -> list[str]:
    """The Ray head on the batch node, in its own session; the dashboard on loopback only."""
    flags = " ".join(_start_flags(layout.ray.head))
    return [
        'echo "cloudhpc: starting the Ray head on $(hostname -s): GCS $chpc_ip:$chpc_gcs, '
        'dashboard 127.0.0.1:$chpc_dashboard, temp dir $chpc_tmp"',
        f"setsid ray start --head {_COMMON_RAY_FLAGS} \\",
        '  --node-ip-address="$chpc_ip" --port="$chpc_gcs" --include-dashboard=true \\',
        '  --dashboard-host=127.0.0.1 --dashboard-port="$chpc_dashboard" --ray-client-server-port="$chpc_client" \\',
        '  --dashboard-agent-listen-port="$chpc_agent" --metrics-export-port="$chpc_metrics" \\',
        f'  --runtime-env-agent-port="$chpc_rtenv" --temp-dir="$chpc_tmp" {flags} </dev/null &',
        "chpc_head_pid=$!",
    ]


def _workers(layout: _Layout) -> list[str]:
    """One worker per other node through `srun` (or beside the head, for one-node tests)."""
    workers = layout.workers
    if not workers:
        return []
    if layout.colocate_workers:
        placement = f"--nodes=1 --ntasks={workers} --overlap"
    else:
        placement = f'--nodes={workers} --ntasks={workers} --ntasks-per-node=1 --exclude="$SLURMD_NODENAME"'
    return [
        'export CLOUDHPC_RAY_HEAD="$chpc_ip:$chpc_gcs"',
        f"srun {placement} --kill-on-bad-exit=0 "
        '${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \\',
        f'  /bin/bash "$chpc_control/{Path(WORKER_FILE).name}" </dev/null &',
        "chpc_workers_pid=$!",
    ]


def _bridges(layout: _Layout) -> list[str]:
    """The supervised tunnel, started with Ray rather than after it: Ray takes seconds to start, the
    ssh handshake overlaps with that, and porter marks a bridge ready only once the far end answers
    through it (the dashboard may answer before every worker has joined)."""
    plan = layout.plan
    if plan is None:
        return []
    lines: list[str] = []
    if plan.imports:
        names = " ".join(f"chpc_import_{i}" for i in range(len(plan.imports)))
        lines.append(f'read -r {names} <<<"$(chpc_helpers ports {len(plan.imports)})"')
        lines += [f"export {import_variable(imp.name)}=127.0.0.1:{imp.local}" for imp in plan.imports]
    lines += render_tunnel(plan)
    lines.append("echo " + _q(f"cloudhpc: bridge tunnel started ({_describe(plan)})"))
    return lines


def _readiness(layout: _Layout) -> list[str]:
    """Ready means every requested node alive, read from the head's dashboard."""
    nodes = layout.nodes
    return [
        f'chpc_helpers wait-ready --dashboard "$chpc_dashboard" --nodes {nodes} --pid "$chpc_head_pid" '
        f"--timeout {READY_TIMEOUT} || {{",
        '  echo "cloudhpc: the Ray cluster did not come up (see above)" >&2',
        "  exit 96",
        "}",
        'touch "$chpc_state/ready"',
        f'echo "cloudhpc: Ray cluster ready: {nodes} node(s)"',
    ]


def _main(layout: _Layout) -> list[str]:
    """A ray-cluster serves until its end; a ray-job runs its entrypoint and ends with it."""
    if layout.kind == JobKind.RAY_CLUSTER and layout.ray.idle_timeout is not None:
        return _session_main(layout.ray.idle_timeout)
    if layout.kind == JobKind.RAY_CLUSTER:
        return [
            "# a ray-cluster serves until its time limit or a cancel (SIGTERM runs chpc_cleanup)",
            'wait "$chpc_head_pid"; chpc_rc=$?',
            'echo "cloudhpc: the Ray head exited (status $chpc_rc) before the job ended" >&2',
            'if [ "$chpc_rc" -eq 0 ]; then chpc_rc=1; fi',
            'exit "$chpc_rc"',
        ]
    lines: list[str] = []
    plan = layout.plan
    if plan is not None and plan.imports:
        ports = " ".join(imp.local for imp in plan.imports)
        lines.append(
            f'chpc_helpers wait-ports {ports} --pid "$chpc_tunnel_pid" --timeout {IMPORT_WAIT} || true'
        )
    return [
        *lines,
        "# a ray-job ends with its entrypoint, with the entrypoint's exit status",
        'export RAY_ADDRESS="$chpc_ip:$chpc_gcs"',
        'export CLOUDHPC_RAY_DASHBOARD_URL="http://127.0.0.1:$chpc_dashboard"',
        "# Ray >= 2.5x turns on token auth for every cluster a user starts once ~/.ray/auth_token",
        "# exists; a driver joining such a cluster must then ask for it too",
        'if [ -z "${RAY_AUTH_MODE:-}" ] && [ -s "$HOME/.ray/auth_token" ]; then export RAY_AUTH_MODE=token; fi',
        'echo "cloudhpc: running the entrypoint"',
        *_run_entrypoint(layout),
        "chpc_main_pid=",
        "# the entrypoint is done: nothing of Ray is worth waiting for",
        "chpc_cleanup 3",
        *(checkpoint_requeue_lines(layout.checkpoint) if layout.checkpoint else []),
        f'echo "{ENTRYPOINT_END_MARKER} $chpc_rc"',
        'exit "$chpc_rc"',
    ]


def _run_entrypoint(layout: _Layout) -> list[str]:
    """Start the entrypoint (the driver) and wait for it; its status in `$chpc_rc`. With a
    `checkpoint` it runs in its own session, which the warning trap signals (hpc/requeue.py)."""
    command = f'/bin/bash "$chpc_control/{Path(ENTRYPOINT_FILE).name}" </dev/null'
    if layout.checkpoint is None:
        return [f"{command} &", "chpc_main_pid=$!", 'wait "$chpc_main_pid"; chpc_rc=$?']
    return [
        *checkpoint_run_lines(command, on_start=['chpc_main_pid="$_chpc_child"']),
        'chpc_rc="$_chpc_status"',
    ]


def _session_main(idle_timeout: int) -> list[str]:
    """A session (a ray-cluster with `ray.idle_timeout`) serves ray-jobs until no Ray job has been
    pending or running for `idle_timeout` seconds, then ends itself, completed: no idle allocation
    is billed until the time limit. Ray's token, when Ray set one up for this account, is copied
    into the job's private control directory for the agent, which submits the ray-jobs naming the
    session (`submitter/ray_sessions.py`); it is deleted with the job's other secrets."""
    return [
        f"# a session: ends itself after {idle_timeout} s without a Ray job (ray.idle_timeout)",
        'if [ -s "$HOME/.ray/auth_token" ]; then',
        '  (umask 077 && cp "$HOME/.ray/auth_token" "$chpc_state/auth_token")',
        "fi",
        f'chpc_helpers watch-idle --dashboard "$chpc_dashboard" --idle {int(idle_timeout)} --pid "$chpc_head_pid"',
        "chpc_rc=$?",
        'if [ "$chpc_rc" -eq 0 ]; then',
        "  chpc_cleanup 3",
        '  echo "cloudhpc: the Ray session ended after its idle timeout"',
        "  exit 0",
        "fi",
        'wait "$chpc_head_pid"; chpc_rc=$?',
        'echo "cloudhpc: the Ray head exited (status $chpc_rc) before the job ended" >&2',
        'if [ "$chpc_rc" -eq 0 ]; then chpc_rc=1; fi',
        'exit "$chpc_rc"',
    ]


SECTIONS: dict[str, Callable[[_Layout], list[str]]] = {
    "header": _header,
    "teardown": _teardown,
    "environment": _environment,
    "head": _head,
    "workers": _workers,
    "bridges": _bridges,
    "readiness": _readiness,
    "main": _main,
}
"""The script's sections in order; each has its golden file under tests/unit/golden/."""


def _tunnel_plan(
    ray: RaySpec, paths: JobPaths, bridges: list[Bridge], tunnel: TunnelAccess | None
) -> TunnelPlan | None:
    """The tunnel for `ray.expose` (on porter's allocated bridge ports) and `ray.import`, if any."""
    if not (ray.expose or ray.import_):
        return None
    if tunnel is None:
        raise ValueError("this job exposes or imports ports: a bridge VM (porter.bridge) is needed")
    by_name = {b.name: b for b in bridges}
    exports = []
    for exposed in ray.expose:
        bridge = by_name.get(exposed.name)
        if bridge is None:
            raise ValueError(f"porter allocated no bridge port for ray.expose {exposed.name!r}")
        local = _RAY_PORTS.get(exposed.name, str(exposed.port))
        exports.append(TunnelExport(exposed.name, bridge.bridge_port, local))
    imports = [
        TunnelImport(imp.name, imp.host, imp.port, f'"$chpc_import_{i}"') for i, imp in enumerate(ray.import_)
    ]
    return TunnelPlan(
        host=tunnel.host,
        ssh_port=tunnel.ssh_port,
        ssh_user=tunnel.ssh_user,
        bind_address=tunnel.bind_address,
        key_path=paths.file(KEY_FILE),
        known_hosts_path=paths.file(KNOWN_HOSTS_FILE),
        pid_file=f"{paths.control}/ray/tunnel.pid",
        certificate_path=paths.file(CERTIFICATE_FILE) if tunnel.certificate is not None else None,
        exports=exports,
        imports=imports,
    )


def render_ray_job(
    *,
    job_id: UUID,
    spec: JobSpec,
    paths: JobPaths,
    resources: Resources,
    bridges: list[Bridge],
    tunnel: TunnelAccess | None,
    colocate_workers: bool = False,
) -> RayJobScript:
    """The batch-script body and the files of a `ray-cluster` or `ray-job`.

    `bridges` are porter's allocations for `ray.expose` (one per name); `tunnel` says how to reach
    the bridge VM and is required when the job exposes or imports anything. `colocate_workers`
    starts the workers on the head's node (tests on a one-node cluster only). `resources` are
    complete (the cluster's defaults applied); only `nodes` is changed, to the Ray node count.
    """
    if spec.kind == JobKind.BATCH or spec.ray is None:
        raise ValueError("render_ray_job is for kinds ray-cluster and ray-job")
    ray: RaySpec = spec.ray
    nodes = ray_node_count(spec)
    workers = nodes - 1
    multi_node = workers > 0 and not colocate_workers
    plan = _tunnel_plan(ray, paths, bridges, tunnel)

    files: dict[str, bytes] = {HELPERS_FILE: Path(__file__).with_name("node_script.py").read_bytes()}
    modes: dict[str, int] = {}
    secrets: list[str] = []
    if workers:
        files[WORKER_FILE] = _worker_script(
            job_id, paths, ray.workers, multi_node or colocate_workers
        ).encode()
        modes[WORKER_FILE] = 0o700
    if spec.kind == JobKind.RAY_JOB:
        files[ENTRYPOINT_FILE] = (ray.entrypoint or "").encode()
    if spec.kind == JobKind.RAY_CLUSTER and ray.idle_timeout is not None:
        secrets.append(SESSION_TOKEN_FILE)
    if plan is not None:
        assert tunnel is not None  # _tunnel_plan requires it
        files[KEY_FILE] = tunnel.key
        modes[KEY_FILE] = 0o600
        files[KNOWN_HOSTS_FILE] = tunnel.known_hosts
        secrets.append(KEY_FILE)
        if tunnel.certificate is not None:
            files[CERTIFICATE_FILE] = tunnel.certificate
            modes[CERTIFICATE_FILE] = 0o600
            secrets.append(CERTIFICATE_FILE)

    layout = _Layout(
        kind=spec.kind,
        ray=ray,
        paths=paths,
        nodes=nodes,
        workers=workers,
        multi_node=multi_node,
        colocate_workers=colocate_workers,
        plan=plan,
        secrets=tuple(secrets),
        checkpoint=spec.checkpoint if spec.kind == JobKind.RAY_JOB else None,
    )
    return RayJobScript(
        sections={name: render(layout) for name, render in SECTIONS.items()},
        files=files,
        modes=modes,
        resources=resources.model_copy(update={"nodes": 1 if colocate_workers else nodes}),
        secret_files=tuple(secrets),
    )


def _describe(plan: TunnelPlan) -> str:
    parts = [f"{e.name} -> {plan.bind_address}:{e.bridge_port}" for e in plan.exports]
    parts += [f"{i.name} <- {i.host}:{i.port}" for i in plan.imports]
    return ", ".join(parts)
