"""porter's API under load: GET /api/v1/jobs/{id} and POST /api/v1/jobs with 50 concurrent clients.

A real `cloudhpc serve porter` process (uvicorn, as deployed) is started per job store: a fresh
SQLite file, and a fresh schema on the testbed's PostgreSQL. Its configuration names one `slurm`
cluster for which no agent runs, so posted jobs stay `pending` and the API alone is measured.

50 clients, each an asyncio task with its own keep-alive connection. Phases, each bounded by a
request budget and PHASE_SECONDS:

- GET paced: each client sends `GET /api/v1/jobs/{id}` (a random one of 200 jobs created
  beforehand) once every 50/PACED_RATE s, 250 requests/s offered in all. The latency target
  (p99 <= 25 ms) is judged here: the latency 50 clients see under a steady, busy load.
- GET saturated: each client sends its next request as soon as the last is answered (closed
  loop): the throughput. Its latency is queueing (p50 ~ 50 / throughput, Little's law), reported
  but not held to the 25 ms target.
- POST saturated: `POST /api/v1/jobs` with a small batch spec, closed loop; the target
  (>= 200 jobs/s) counts `201 Created` answers per second.

Two load generators run every phase. `raw`: a minimal HTTP/1.1 client on asyncio streams, so that
what is measured is porter; the targets are judged on it. `httpx`: the same phases through
`httpx.AsyncClient`, as a Python caller sees porter; httpx spends about 1 ms of CPU per request
and, with 50 connections in one event loop, adds tens of milliseconds of its own latency, on the
same 2 cores as porter and PostgreSQL. porter's own histogram (`/metrics`, time to first byte)
is read around each phase as a cross-check: the share of requests it answered within 25 ms; and
porter's CPU time per request (/proc), which other load on the machine hardly changes: at 250
GET/s the p99 is mostly queueing on porter's one GIL, so it follows this figure.
The load average before and after is printed, because other work on the machine inflates every
figure.

Replicas (its own section, `--replicas`, on by default): the same load (raw client) on PostgreSQL
against one porter and against two porter processes, each time behind `tests/balancer.py` run as a
process of its own (round-robin per connection), so that the only difference is the second replica.
It also measures how fast a change crosses replicas: a `GET /jobs/{id}?wait=` long-poll on one
replica, woken by an agent report posted to the other (LISTEN/NOTIFY), REPLICA_WAKES times.
porter's own histogram is summed over the replicas' `/metrics`.

A/B (`--ab SRC_A SRC_B`): POST throughput of two versions of porter's code, each a `src` directory
(e.g. `git archive <commit> src | tar -x -C /tmp/before`; `src` for this tree), on PostgreSQL
(`--store sqlite` for SQLite). Both porters run at the same time, each on its own database, and
their POST phases alternate (A B, then B A, ...) for `--rounds` rounds, so that load from other
work on the machine falls on both alike; the figure to compare is the ratio of the medians, not
the absolute rates. `--ab-phase get_paced` compares the paced GET phase's p99 instead (each porter
first gets its WARMUP_REQUESTS jobs, as in `measure`). Every round prints porter's CPU time per
request and the hypervisor's steal of each phase: the CPU ratio is the figure that other load
hardly moves; a p99 from a phase with steal of more than a few percent says little.

Run on the testbed machine:
`python bench/api.py [--store sqlite|postgres|both] [--client raw|httpx|both] [--replicas|--no-replicas]`,
or `python bench/api.py --ab /tmp/before/src /tmp/after/src [--rounds 6] [--store sqlite] [--ab-phase get_paced]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.*

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from tests.e2e.harness import free_port
from tests.integration.stores import postgres_url, sqlite_url

CLIENTS = 50
GET_REQUESTS = 6000
POST_REQUESTS = 4000
PHASE_SECONDS = 15.0
PACED_RATE = 250.0  # requests/s offered by all clients together in the paced GET phase
REPLICA_WAKES = 50
WARMUP_REQUESTS = 200
TARGET_GET_P99_MS = 25.0
TARGET_POST_PER_S = 200.0
JOB = {"name": "bench", "cluster": "bench", "script": "echo hello\n", "resources": {"time": "00:01:00"}}

Request = tuple[str, str, Any]  # method, path, JSON body or None


class Connection(Protocol):
    async def request(self, method: str, path: str, body: Any) -> int: ...

    async def close(self) -> None: ...


class RawConnection:
    """HTTP/1.1 keep-alive on asyncio streams: enough for porter's JSON answers (Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str) -> None:
        self._reader = reader
        self._writer = writer
        self._auth = f"Authorization: Bearer {token}\r\n"

    @classmethod
    async def open(cls, url: str, token: str) -> RawConnection:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer, token)

    async def request(self, method: str, path: str, body: Any) -> int:
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: porter\r\n{self._auth}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self._writer.write(head.encode() + b"\r\n" + payload)
        status_line, *headers = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        length = 0
        for header in headers:
            name, _, value = header.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self._reader.readexactly(length)
        return int(status_line.split()[1])

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class HttpxConnection:
    def __init__(self, url: str, token: str) -> None:
        self._http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    @classmethod
    async def open(cls, url: str, token: str) -> HttpxConnection:
        return cls(url, token)

    async def request(self, method: str, path: str, body: Any) -> int:
        return (await self._http.request(method, path, json=body)).status_code

    async def close(self) -> None:
        await self._http.aclose()


OPENERS = {"raw": RawConnection.open, "httpx": HttpxConnection.open}


@dataclass
class Phase:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0
    server_buckets: dict[float, float] = field(default_factory=dict)
    """porter's own latency histogram for this phase's route: cumulative count per upper bound."""

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def server_share_within(self, bound: float) -> float:
        """Percentage of the phase's requests porter itself answered (first byte) within `bound` s."""
        total = self.server_buckets.get(float("inf"), 0.0)
        return round(100 * self.server_buckets.get(bound, 0.0) / total, 2) if total else 0.0

    def summary(self, ok_status: int) -> dict[str, float]:
        ok = self.statuses.get(ok_status, 0)
        return {
            "requests": len(self.latencies),
            "errors": self.errors + sum(n for s, n in self.statuses.items() if s != ok_status),
            "p50_ms": round(self.percentile(0.50), 2),
            "p99_ms": round(self.percentile(0.99), 2),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 2),
            "per_s": round(ok / self.elapsed, 1),
            "server_within_25ms_pct": self.server_share_within(0.025),
        }


async def run_phase(
    client_kind: str,
    url: str,
    token: str,
    budget: int,
    make_request: Callable[[], Request],
    *,
    clients: int = CLIENTS,
    period: float | None = None,
) -> Phase:
    """`clients` tasks share `budget` requests and PHASE_SECONDS. Without `period` each sends its
    next request as soon as the last one is answered (closed loop: saturation); with it, each
    sends one request every `period` seconds (a fixed offered load)."""
    phase = Phase()
    remaining = budget
    connections = [await OPENERS[client_kind](url, token) for _ in range(clients)]
    deadline = time.monotonic() + PHASE_SECONDS

    async def client(conn: Connection) -> None:
        nonlocal remaining
        next_at = time.monotonic() + random.uniform(0, period or 0)
        while remaining > 0 and time.monotonic() < deadline:
            if period is not None:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                # a late client does not catch up with a burst: the offered load stays fixed
                next_at = max(next_at + period, time.monotonic())
            remaining -= 1
            method, path, body = make_request()
            started = time.perf_counter()
            try:
                status = await conn.request(method, path, body)
            except (OSError, asyncio.IncompleteReadError, httpx.HTTPError):
                phase.errors += 1
                return
            phase.latencies.append(time.perf_counter() - started)
            phase.statuses[status] = phase.statuses.get(status, 0) + 1

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client(conn) for conn in connections))
    finally:
        phase.elapsed = time.perf_counter() - started
        for conn in connections:
            await conn.close()
    return phase


@dataclass
class Porter:
    """A running porter for the bench: where clients go (`url`, a balancer with several replicas),
    each replica's own URL (`replicas`, for `/metrics`), a user token and an admin token (`/metrics`
    needs one), the agent token of the bench cluster, and the replicas' process ids (their CPU time)."""

    url: str
    replicas: list[str]
    token: str
    admin: str
    agent: str
    pids: list[int] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) the porter processes used so far (Linux /proc)."""
        total = 0
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return total / os.sysconf("SC_CLK_TCK")


def server_histogram(server: Porter, route: str, method: str) -> dict[float, float]:
    """Cumulative bucket counts of `cloudhpc_api_request_duration_seconds` for one route (2xx),
    summed over every replica."""
    buckets: dict[float, float] = {}
    for url in server.replicas:
        text = httpx.get(f"{url}/metrics", headers=_bearer(server.admin), timeout=30).raise_for_status().text
        for family in text_string_to_metric_families(text):
            if family.name != "cloudhpc_api_request_duration_seconds":
                continue
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name.endswith("_bucket")
                    and labels.get("route") == route
                    and labels.get("method") == method
                    and labels.get("status", "").startswith("2")
                ):
                    le = float(labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def _process(
    args: list[str], root: Path, name: str, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """`python args...` in `root` (logging to `<name>.log`) for the block, then SIGTERM."""
    log = (root / f"{name}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, *args], cwd=root, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{log.stem} exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log.stem} did not become ready in 30 s")
        time.sleep(0.1)


_SETUP_STORE = """
import json, os
from cloudhpc.store import Store
store = Store(os.environ["BENCH_DATABASE"])
store.migrate()
tokens = [store.create_token("bench", "user"), store.create_token("bench-admin", "admin"),
          store.create_token("bench", "agent", ["bench"])]
store.close()
print(json.dumps(tokens))
"""


@contextlib.contextmanager
def porter(
    database: str, root: Path, *, replicas: int = 1, balanced: bool = False, source: Path | None = None
) -> Iterator[Porter]:
    """`cloudhpc serve porter` on `database`, as `replicas` processes; with `balanced` (implied by
    more than one) clients go through `tests/balancer.py`, a process of its own. With `source` (a
    `src` directory) the porters run that code instead of this tree's (`--ab`)."""
    ports = [free_port() for _ in range(replicas)]
    config = {
        "porter": {
            "listen": f"127.0.0.1:{ports[0]}",
            "database": database,
            "object_store": f"file://{root / 'objects'}",
            # the bench user may use the cluster (docs/security.md)
            "access": {"clusters": {"bench": {"users": ["bench"]}}},
        },
        "clusters": {
            # A SLURM cluster nobody serves: jobs are accepted and stay pending.
            "bench": {
                "backend": "slurm",
                "ssh": {"host": "127.0.0.1", "user": "nobody", "key_file": str(root / "no-key")},
            }
        },
    }
    (root / "cloudhpc.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDHPC_")}
    env["CLOUDHPC_LOG_LEVEL"] = "WARNING"
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve())  # ahead of the editable install's path
    # migrated and given its tokens by the same code as the porters (its migrations, with --ab);
    # the URL, which holds the database password, goes in the environment, not on a command line
    setup = subprocess.run(
        [sys.executable, "-c", _SETUP_STORE],
        env=env | {"BENCH_DATABASE": database},
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    token, admin, agent = json.loads(setup.stdout)
    serve = ["-m", "cloudhpc", "serve", "porter", "--config", str(root / "cloudhpc.yaml")]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    pids: list[int] = []
    with contextlib.ExitStack() as stack:
        for n, (port, url) in enumerate(zip(ports, urls, strict=True)):
            name = "porter" if replicas == 1 else f"porter-{n}"
            listen = {"CLOUDHPC_PORTER__LISTEN": f"127.0.0.1:{port}"}
            process = stack.enter_context(_process(serve, root, name, env | listen))
            _wait_ready(url, process, root / f"{name}.log")
            pids.append(process.pid)
        url = urls[0]
        if balanced or replicas > 1:
            front = free_port()
            backends = [f"127.0.0.1:{port}" for port in ports]
            balancer = ["-m", "tests.balancer", f"127.0.0.1:{front}", *backends]
            process = stack.enter_context(
                _process(balancer, root, "balancer", env | {"PYTHONPATH": str(REPO)})
            )
            url = f"http://127.0.0.1:{front}"
            _wait_ready(url, process, root / "balancer.log")
        yield Porter(url, urls, token, admin, agent, pids)


async def measure(server: Porter, client_kinds: list[str]) -> dict[str, dict[str, float]]:
    url, token = server.url, server.token
    post: Request = ("POST", "/api/v1/jobs", JOB)
    # Warm up (imports, connection pools, SQLite page cache) and create the jobs GET reads.
    warm = await run_phase("raw", url, token, WARMUP_REQUESTS, lambda: post, clients=10)
    assert warm.statuses == {201: WARMUP_REQUESTS}, warm.statuses
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        ids = [j["id"] for j in (await http.get("/api/v1/jobs", params={"limit": 500})).json()["jobs"]]

    def get() -> Request:
        return "GET", f"/api/v1/jobs/{random.choice(ids)}", None

    phases: list[tuple[str, str, int, Callable[[], Request], float | None]] = [
        ("get_paced", "/api/v1/jobs/{job_id}", GET_REQUESTS, get, CLIENTS / PACED_RATE),
        ("get", "/api/v1/jobs/{job_id}", GET_REQUESTS, get, None),
        ("post", "/api/v1/jobs", POST_REQUESTS, lambda: post, None),
    ]
    out: dict[str, dict[str, float]] = {}
    for kind in client_kinds:
        for name, route, budget, make, period in phases:
            method = make()[0]
            before = server_histogram(server, route, method)
            cpu, stolen, wall = server.cpu_seconds(), steal_seconds(), time.monotonic()
            phase = await run_phase(kind, url, token, budget, make, period=period)
            cpu = server.cpu_seconds() - cpu
            stolen, wall = steal_seconds() - stolen, time.monotonic() - wall
            after = server_histogram(server, route, method)
            phase.server_buckets = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in after}
            summary = phase.summary(201 if method == "POST" else 200)
            summary["porter_cpu_ms_per_request"] = round(cpu * 1000 / max(1, len(phase.latencies)), 3)
            summary["steal_pct"] = steal_pct(stolen, wall)
            out[f"{kind}_{name}"] = summary
    return out


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests, all CPUs summed (/proc/stat's steal column):
    on a virtual machine, stolen time stalls porter and the load generator alike, so a phase's tail
    is only comparable with another's at similar steal."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def steal_pct(stolen: float, wall: float) -> float:
    """`stolen` seconds of steal (`steal_seconds` differences) over `wall` seconds, as a percentage
    of all CPUs' time."""
    return round(100 * stolen / (wall * (os.cpu_count() or 1)), 2)


async def cross_replica_wakes(server: Porter, count: int = REPLICA_WAKES) -> dict[str, float]:
    """How long after an agent's report on replica 1 a `GET /jobs/{id}?wait=` on replica 0 answers
    (ms): the LISTEN/NOTIFY path. Each round is a fresh job, reported `preparing` once."""
    waiter_url, reporter_url = server.replicas[0], server.replicas[1]
    delays: list[float] = []
    async with (
        httpx.AsyncClient(base_url=waiter_url, headers=_bearer(server.token), timeout=60) as waiter,
        httpx.AsyncClient(base_url=reporter_url, headers=_bearer(server.agent), timeout=60) as agent,
    ):
        for _ in range(count):
            job = (await waiter.post("/api/v1/jobs", json=JOB)).raise_for_status().json()
            claimed = await agent.get("/api/v1/agent/work", params={"cluster": "bench", "agent": "bench"})
            assert job["id"] in {j["id"] for j in claimed.raise_for_status().json()["jobs"]}
            wait = asyncio.create_task(waiter.get(f"/api/v1/jobs/{job['id']}", params={"wait": 30}))
            await asyncio.sleep(0.2)  # the long-poll waits inside replica 0 now
            report = {"job_id": job["id"], "seq": 1, "state": "preparing"}
            sent = time.perf_counter()
            (await agent.post("/api/v1/agent/reports", json={"reports": [report]})).raise_for_status()
            answer = await wait
            delays.append(time.perf_counter() - sent)
            assert answer.json()["state"] == "preparing", answer.text
    ordered = sorted(delays)
    return {
        "wake_p50_ms": round(ordered[len(ordered) // 2] * 1000, 2),
        "wake_max_ms": round(ordered[-1] * 1000, 2),
    }


def replica_section(kinds: list[str], result: dict[str, Any], labels: dict[str, str]) -> bool:
    """One porter vs two behind the balancer, same load, PostgreSQL; True when no request failed."""
    clean = True
    for count in (1, 2):
        with (
            tempfile.TemporaryDirectory(prefix=f"bench-api-replicas{count}-") as tmp,
            postgres_url(Path(tmp)) as database,
            porter(database, Path(tmp), replicas=count, balanced=True) as server,
        ):
            # first, while the agent's work poll finds only these jobs (the POST phase leaves thousands)
            wakes = asyncio.run(cross_replica_wakes(server)) if count > 1 else {}
            figures = asyncio.run(measure(server, kinds))
        for key, f in figures.items():
            kind, _, phase = key.partition("_")
            print(
                f"replicas={count} {kind:5} {labels[phase]:19} {f['requests']:5.0f} requests, {f['errors']:.0f} "
                f"errors: p50 {f['p50_ms']:7.2f} ms, p99 {f['p99_ms']:7.2f} ms, {f['per_s']:6.1f}/s; "
                f"porter: {f['server_within_25ms_pct']:6.2f}% within 25 ms"
            )
            for name in ("p50_ms", "p99_ms", "per_s", "errors"):
                result[f"replicas{count}_{key}_{name}"] = f[name]
            clean = clean and f["errors"] == 0
        if wakes:
            print(
                f"replicas={count} a report on replica 1 wakes a wait on replica 0 ({REPLICA_WAKES} times): "
                f"p50 {wakes['wake_p50_ms']:.2f} ms, max {wakes['wake_max_ms']:.2f} ms"
            )
            result |= {f"replicas{count}_{name}": value for name, value in wakes.items()}
    return clean


async def _post_phase(server: Porter) -> tuple[float, float]:
    """One POST saturated phase (raw client): accepted jobs per second and porter's CPU time per
    request, in ms."""
    cpu = server.cpu_seconds()
    phase = await run_phase(
        "raw", server.url, server.token, POST_REQUESTS, lambda: ("POST", "/api/v1/jobs", JOB)
    )
    summary = phase.summary(201)
    return summary["per_s"], round((server.cpu_seconds() - cpu) * 1000 / summary["requests"], 3)


async def _job_ids(server: Porter) -> list[str]:
    """WARMUP_REQUESTS jobs posted (10 clients, as `measure` warms up) and their ids: what GET reads."""
    post: Request = ("POST", "/api/v1/jobs", JOB)
    warm = await run_phase("raw", server.url, server.token, WARMUP_REQUESTS, lambda: post, clients=10)
    assert warm.statuses == {201: WARMUP_REQUESTS}, warm.statuses
    async with httpx.AsyncClient(base_url=server.url, headers=_bearer(server.token)) as http:
        return [j["id"] for j in (await http.get("/api/v1/jobs", params={"limit": 500})).json()["jobs"]]


async def _get_paced_phase(server: Porter, ids: list[str]) -> tuple[float, float]:
    """One paced GET phase (raw client, PACED_RATE offered): the p99 and porter's CPU time per
    request, in ms. The CPU time hardly depends on other load on the machine; the p99 does."""
    cpu = server.cpu_seconds()
    phase = await run_phase(
        "raw",
        server.url,
        server.token,
        GET_REQUESTS,
        lambda: ("GET", f"/api/v1/jobs/{random.choice(ids)}", None),
        period=CLIENTS / PACED_RATE,
    )
    summary = phase.summary(200)
    return summary["p99_ms"], round((server.cpu_seconds() - cpu) * 1000 / summary["requests"], 3)


AB_PHASES = {"post": "POST saturated, jobs/s", "get_paced": f"GET p99 at {PACED_RATE:.0f}/s offered, ms"}


def ab_section(
    sources: tuple[Path, Path], rounds: int, *, store: str = "postgres", phase: str = "post"
) -> dict[str, Any]:
    """POST jobs/s (`phase` "post") or the paced GET p99 (`phase` "get_paced") of porter running
    `sources` A and B on `store`, alternating phases (see --ab)."""
    figures: dict[str, list[float]] = {"a": [], "b": []}
    cpu: dict[str, list[float]] = {"a": [], "b": []}
    steal: dict[str, list[float]] = {"a": [], "b": []}
    stores = {"sqlite": sqlite_url, "postgres": postgres_url}
    with contextlib.ExitStack() as stack:
        servers: dict[str, Porter] = {}
        ids: dict[str, list[str]] = {}
        for name, src in zip(("a", "b"), sources, strict=True):
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-api-ab-{name}-")))
            database = stack.enter_context(stores[store](root))
            servers[name] = stack.enter_context(porter(database, root, source=src))
            if phase == "post":
                asyncio.run(_post_phase(servers[name]))  # warm-up, not counted
            else:
                ids[name] = asyncio.run(_job_ids(servers[name]))
        for round_ in range(rounds):
            for name in ("a", "b") if round_ % 2 == 0 else ("b", "a"):
                stolen, wall = steal_seconds(), time.monotonic()
                if phase == "post":
                    figure, per_request = asyncio.run(_post_phase(servers[name]))
                else:
                    figure, per_request = asyncio.run(_get_paced_phase(servers[name], ids[name]))
                figures[name].append(figure)
                cpu[name].append(per_request)
                steal[name].append(steal_pct(steal_seconds() - stolen, time.monotonic() - wall))
            print(
                f"round {round_ + 1}: A {figures['a'][-1]:7.2f}, B {figures['b'][-1]:7.2f} (porter CPU per "
                f"request: A {cpu['a'][-1]:.3f} ms, B {cpu['b'][-1]:.3f} ms; steal A {steal['a'][-1]:.2f}%, "
                f"B {steal['b'][-1]:.2f}%)"
            )
    a, b = statistics.median(figures["a"]), statistics.median(figures["b"])
    print(
        f"{AB_PHASES[phase]}, {store}, raw client, medians of {rounds}: A ({sources[0]}) {a:.2f}, "
        f"B ({sources[1]}) {b:.2f}; B/A {b / a:.2f}"
    )
    print(f"steal per phase, max: A {max(steal['a']):.2f}%, B {max(steal['b']):.2f}%")
    cpu_medians = {f"ab_{n}_cpu_ms_per_request": statistics.median(cpu[n]) for n in ("a", "b")}
    ca, cb = cpu_medians["ab_a_cpu_ms_per_request"], cpu_medians["ab_b_cpu_ms_per_request"]
    print(f"porter CPU per request, medians: A {ca:.3f} ms, B {cb:.3f} ms; B/A {cb / ca:.2f}")
    return cpu_medians | {
        "ab_sources": [str(src) for src in sources],
        "ab_store": store,
        "ab_phase": phase,
        "ab_a": figures["a"],
        "ab_b": figures["b"],
        "ab_a_steal_pct": steal["a"],
        "ab_b_steal_pct": steal["b"],
        "ab_ratio_b_over_a": round(b / a, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--client", choices=["raw", "httpx", "both"], default="both")
    parser.add_argument(
        "--replicas",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run one vs two porter replicas on PostgreSQL behind a balancer (raw client)",
    )
    parser.add_argument(
        "--ab",
        type=Path,
        nargs=2,
        metavar=("SRC_A", "SRC_B"),
        help="compare two src trees: POST throughput (PostgreSQL unless --store) or, with "
        "--ab-phase get_paced, the paced GET p99",
    )
    parser.add_argument("--ab-phase", choices=sorted(AB_PHASES), default="post", help="what --ab compares")
    parser.add_argument("--rounds", type=int, default=6, help="A/B rounds (with --ab)")
    args = parser.parse_args()
    if args.ab is not None:
        load_before = os.getloadavg()[0]
        store = "postgres" if args.store == "both" else args.store
        ab = ab_section((args.ab[0], args.ab[1]), args.rounds, store=store, phase=args.ab_phase)
        print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
        print(json.dumps({"bench": "api-ab", "clients": CLIENTS} | ab))
        return
    stores = {"sqlite": sqlite_url, "postgres": postgres_url}
    chosen = list(stores) if args.store == "both" else [args.store]
    kinds = ["raw", "httpx"] if args.client == "both" else [args.client]
    labels = {
        "get_paced": f"GET  {PACED_RATE:.0f}/s offered",
        "get": "GET  saturated",
        "post": "POST saturated",
    }
    result: dict[str, Any] = {"bench": "api", "clients": CLIENTS, "paced_rate_per_s": PACED_RATE}
    load_before = os.getloadavg()[0]
    met = True
    for store in chosen:
        with tempfile.TemporaryDirectory(prefix=f"bench-api-{store}-") as tmp:
            root = Path(tmp)
            with stores[store](root) as database, porter(database, root) as server:
                figures = asyncio.run(measure(server, kinds))
        for key, f in figures.items():
            kind, _, phase = key.partition("_")
            print(
                f"{store:8} {kind:5} {labels[phase]:19} {f['requests']:5.0f} requests, {f['errors']:.0f} errors: "
                f"p50 {f['p50_ms']:7.2f} ms, p99 {f['p99_ms']:7.2f} ms, {f['per_s']:6.1f}/s; "
                f"porter: {f['server_within_25ms_pct']:6.2f}% within 25 ms, "
                f"{f['porter_cpu_ms_per_request']:.2f} ms CPU per request; steal {f['steal_pct']:.2f}%"
            )
            for name in (
                "p50_ms",
                "p99_ms",
                "per_s",
                "errors",
                "server_within_25ms_pct",
                "porter_cpu_ms_per_request",
                "steal_pct",
            ):
                result[f"{store}_{key}_{name}"] = f[name]
        judged = "raw" if "raw" in kinds else "httpx"
        met = (
            met
            and figures[f"{judged}_get_paced"]["p99_ms"] <= TARGET_GET_P99_MS
            and figures[f"{judged}_post"]["per_s"] >= TARGET_POST_PER_S
            and all(f["errors"] == 0 for f in figures.values())
        )
    if args.replicas:
        print("-- one porter vs two, PostgreSQL, both behind tests/balancer.py --")
        result["replicas_clean"] = replica_section(["raw"], result, labels)
    result["loadavg_before"], result["loadavg_after"] = round(load_before, 2), round(os.getloadavg()[0], 2)
    print(
        f"targets ({judged} client): GET p99 <= {TARGET_GET_P99_MS} ms with {CLIENTS} clients at "
        f"{PACED_RATE:.0f} requests/s offered; POST >= {TARGET_POST_PER_S} jobs/s accepted with "
        f"{CLIENTS} clients in a closed loop"
    )
    print(f"load average (1 min): {result['loadavg_before']} before, {result['loadavg_after']} after")
    result["target_get_p99_ms"] = TARGET_GET_P99_MS
    result["target_post_per_s"] = TARGET_POST_PER_S
    result["judged_on"] = judged
    result["met"] = met
    print(json.dumps(result))


if __name__ == "__main__":
    main()
