"""The `cloudhpc` command. A thin layer: parse arguments, call the SDK or the servers, print.

Exit codes (`cli.options.ExitCode`, docs/cli.md): 0 ok, 1 the job did not complete (or a local check
failed), 2 usage or configuration error, 3 porter answered with an error, 69 porter unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import sys
import time
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from cloudhpc import __version__
from cloudhpc.cli.bridges import bridge_app, bridges_table, doctor_app
from cloudhpc.cli.options import (
    ConfigOpt,
    ExitCode,
    Output,
    OutputOpt,
    TokenFileOpt,
    UrlOpt,
    client_for,
    config_path,
    exit_code_of_api_error,
    print_data,
)
from cloudhpc.cli.platform import platform_app
from cloudhpc.cli.testbed import run_testbed
from cloudhpc.client import ApiError, Client
from cloudhpc.config import Settings, load_settings
from cloudhpc.domain.api import Efficiency
from cloudhpc.domain.billing import Estimate
from cloudhpc.domain.directives import apply_directives
from cloudhpc.domain.job_files import EntryType
from cloudhpc.domain.jobs import Job, JobSpec, JobSummary
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import CloudHPCError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from cloudhpc.store import Store

out = Console()
err = Console(stderr=True, soft_wrap=True)  # messages and status lines stay whole in logs


class _ExitCodes(TyperGroup):
    """Turns the library's errors into one line on stderr and the documented exit code, inside the
    command itself, so `CliRunner` tests see the same codes as a shell does.

    `ApiError` with status 0 (porter unreachable or silent): 69, so that a script can retry it
    and tell it from a wrong option. Any answer from the API refusing the request (4xx) or failing
    it (5xx): 3. `ConfigError`: 2. Any other `CloudHPCError`: 1. A command whose extra is not
    installed (`serve` with the light install): 2, naming the extra to install.
    """

    def invoke(self, ctx: Any) -> Any:  # typer vendors click: its Context type is private
        try:
            return super().invoke(ctx)
        except ApiError as exc:
            err.print(f"ApiError: {exc}", highlight=False, soft_wrap=True)
            _print_details(exc.details)
            raise typer.Exit(exit_code_of_api_error(exc)) from exc
        except ConfigError as exc:
            err.print(f"ConfigError: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(ExitCode.USAGE) from exc
        except CloudHPCError as exc:
            err.print(f"{type(exc).__name__}: {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(ExitCode.FAILED) from exc
        except ModuleNotFoundError as exc:
            extra = _EXTRA_OF.get((exc.name or "").partition(".")[0])
            if extra is None:
                raise
            err.print(
                f"this command needs cloudhpc's {extra} extra (no module {exc.name!r} here): "
                f"pip install 'cloudhpc[{extra}]'",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(ExitCode.USAGE) from exc


# `pip install cloudhpc` is the SDK and this CLI; commands that run a server, open the job store or
# talk SSH import these lazily, and say which extra brings them when they are missing.
_EXTRA_OF = {
    **dict.fromkeys(
        (
            "fastapi",
            "starlette",
            "uvicorn",
            "sqlalchemy",
            "alembic",
            "asyncssh",
            "prometheus_client",
            "boto3",
        ),
        "server",
    ),
    **dict.fromkeys(("kfp", "mlflow", "torch", "ray", "sklearn"), "pipelines"),
}


def _print_details(details: Any) -> None:
    """The API's per-field details of a 422, one line each (`field: message`)."""
    if not isinstance(details, list) or len(details) < 2:
        return  # the message already names the one bad field
    for item in details:
        if isinstance(item, dict) and "field" in item:
            err.print(f"  {item['field']}: {item.get('message', '')}", highlight=False, soft_wrap=True)


app = typer.Typer(
    cls=_ExitCodes,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    help="Run SLURM and Ray jobs from the cloud.",
)


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(f"cloudhpc {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """Run SLURM and Ray jobs from the cloud."""


jobs_app = typer.Typer(no_args_is_help=True, help="Submit and follow jobs.")
clusters_app = typer.Typer(no_args_is_help=True, help="Clusters known to porter.")
tokens_app = typer.Typer(no_args_is_help=True, help="API tokens (run where porter's database is).")
app.add_typer(jobs_app, name="jobs")
app.add_typer(clusters_app, name="clusters")
app.add_typer(tokens_app, name="tokens")
app.add_typer(platform_app, name="platform")
app.add_typer(bridge_app, name="bridge")
app.add_typer(doctor_app, name="doctor")
app.command("testbed")(run_testbed)


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config_path(config))
    except ConfigError as exc:
        err.print(f"[red]ConfigError[/red]: {exc}", markup=True, highlight=False)
        raise typer.Exit(ExitCode.USAGE) from exc


def _elapsed(job: JobSummary) -> str:
    if job.started_at is None:
        return "-"
    end = job.ended_at.timestamp() if job.ended_at else time.time()
    return f"{int(end - job.started_at.timestamp())}s"


def _print_table(table: Table) -> None:
    """Full ids and states when piped or logged: Rich would squeeze a table into 80 columns."""
    (out if out.is_terminal else Console(width=240)).print(table)


def _estimate_table(found: Estimate) -> Table:
    """One row per partition, the earliest marked: start (UTC), cost, nodes, or SLURM's refusal."""
    table = Table("PARTITION", "START (UTC)", f"COST ({found.unit or '-'})", "CPUS", "NODES", "")
    for e in found.partitions:
        table.add_row(
            e.partition or "(default)",
            e.start.strftime("%Y-%m-%d %H:%M:%S") if e.start else f"refused: {e.error}",
            "-" if e.cost is None else f"{e.cost:g}",
            "-" if e.processors is None else str(e.processors),
            e.nodes or "-",
            "earliest" if e.partition == found.earliest else "",
        )
    return table


def _jobs_table(jobs: Sequence[JobSummary]) -> Table:
    table = Table("ID", "NAME", "CLUSTER", "KIND", "STATE", "SLURM ID", "EXIT", "ELAPSED", "REASON")
    for job in jobs:
        table.add_row(
            str(job.id),
            job.name,
            job.cluster,
            job.kind.value,
            job.state.value,
            job.slurm_job_id or "-",
            "-" if job.exit_code is None else str(job.exit_code),
            _elapsed(job),
            (job.reason or "")[:60],
        )
    return table


# ---- serve -------------------------------------------------------------------------------------


class Role(StrEnum):
    porter = "porter"
    submitter = "submitter"
    all = "all"


@app.command()
def serve(
    role: Annotated[Role, typer.Argument(help="porter, submitter, or all (both in one process)")],
    config: ConfigOpt = None,
    secrets: Annotated[
        Path | None,
        typer.Option("--secrets", help="the original secrets.json (submitter): a cluster named mahti"),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", envvar="CLOUDHPC_LOG_LEVEL")] = "INFO",
) -> None:
    """Run porter, the submitter agent, or both."""
    from cloudhpc import runtime

    settings = _settings(config)
    if secrets is not None:
        from cloudhpc.secrets_json import apply_secrets_json

        try:
            settings = apply_secrets_json(settings, secrets)
        except ConfigError as exc:
            err.print(f"ConfigError: {exc}", highlight=False)
            raise typer.Exit(2) from exc
    # Only once the configuration is known to be valid: a refused one is one message, not a log.
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runner = {
        Role.porter: runtime.serve_porter,
        Role.submitter: runtime.serve_submitter,
        Role.all: runtime.serve_all,
    }
    try:
        asyncio.run(runner[role](settings))
    except ConfigError as exc:
        err.print(f"ConfigError: {exc}", highlight=False)
        raise typer.Exit(2) from exc


# ---- jobs --------------------------------------------------------------------------------------


def _resource_pairs(pairs: list[str]) -> dict[str, str]:
    """`--resource KEY=VALUE` options as a `resources` mapping (the spec's checks apply to them)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            err.print(f"--resource {pair!r}: write KEY=VALUE, e.g. --resource qos=normal", highlight=False)
            raise typer.Exit(2)
        out[key] = value
    return out


def _after_option(value: str) -> dict[str, str]:
    """`--after JOB_ID[:on]` as an `after` entry (the spec's checks apply to it)."""
    job, _, on = value.partition(":")
    return {"job": job, "on": on or "ok"}


def _load_spec(
    file: Path | None, overrides: dict[str, Any], sections: dict[str, dict[str, Any]] | None = None
) -> JobSpec:
    """The spec of a file and/or options, with the #SBATCH directives of its script merged in as
    porter merges them, so that a refused directive is reported before anything is sent.
    `sections` (`resources`, `checkpoint`) are merged field by field over the file's."""
    body: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            err.print(f"{file}: not valid YAML or JSON: {exc}", highlight=False)
            raise typer.Exit(2) from exc
        if not isinstance(loaded, dict):
            err.print(f"{file}: a job spec must be a mapping (YAML or JSON)")
            raise typer.Exit(2)
        body = loaded
    body.update({k: v for k, v in overrides.items() if v is not None})
    for section, fields in (sections or {}).items():
        if fields:
            given = body.get(section)
            body[section] = (given if isinstance(given, dict) else {}) | fields
    try:
        return apply_directives(JobSpec.model_validate(body))
    except ValidationError as exc:
        for e in exc.errors():
            err.print(
                f"invalid job spec: {'.'.join(map(str, e['loc'])) or '(spec)'}: {e['msg']}", highlight=False
            )
        raise typer.Exit(2) from exc
    except ValueError as exc:
        err.print(f"invalid job spec: script: {exc}", highlight=False)
        raise typer.Exit(2) from exc


def _status_line(job: Job, started: float) -> str:
    queued = "-"
    if job.submitted_at and job.started_at:
        queued = f"{int(job.started_at.timestamp() - job.submitted_at.timestamp())}s"
    return (
        f"{job.name} {job.id}  state={job.state.value}  slurm={job.slurm_job_id or '-'}  "
        f"queue={queued}  run={_elapsed(job)}  waited={int(time.monotonic() - started)}s"
    )


def _wait_and_report(client: Client, job: Job, output: Output, timeout: float | None) -> None:
    started = time.monotonic()
    if output.is_data or not sys.stderr.isatty():
        final = client.wait(
            job, timeout=timeout, on_change=lambda j: err.print(_status_line(j, started), highlight=False)
        )
    else:
        with err.status(_status_line(job, started)) as status:
            final = client.wait(
                job, timeout=timeout, on_change=lambda j: status.update(_status_line(j, started))
            )
    if output.is_data:
        print_data(final, output)
    else:
        err.print(_status_line(final, started), highlight=False)
    if not final.state.terminal:
        err.print(
            f"still {final.state.value} after {timeout}s; `cloudhpc jobs wait {final.id}` continues waiting"
        )
        raise typer.Exit(1)
    if final.state != JobState.COMPLETED:
        err.print(
            f"job {final.id} ended {final.state.value}: {final.reason or ''}  (see `cloudhpc jobs logs {final.id}`)"
        )
        raise typer.Exit(1)


@jobs_app.command("submit")
def jobs_submit(
    file: Annotated[
        Path | None, typer.Argument(help="job spec (YAML or JSON)", exists=True, dir_okay=False)
    ] = None,
    name: Annotated[str | None, typer.Option(help="job name")] = None,
    cluster: Annotated[str | None, typer.Option(help="cluster name")] = None,
    script: Annotated[
        Path | None, typer.Option(help="batch script file (kind batch)", exists=True, dir_okay=False)
    ] = None,
    resource: Annotated[
        list[str] | None,
        typer.Option(
            "--resource",
            "-r",
            help="a `resources` field as KEY=VALUE, over the spec file's (repeat): "
            "-r time=01:00:00 -r qos=normal -r gres=gpu:a100:4 -r exclusive=true",
        ),
    ] = None,
    array: Annotated[
        str | None, typer.Option(help="a job array, sbatch syntax: 0-99%10, 1,3,5-7, 0-20:5")
    ] = None,
    after: Annotated[
        list[str] | None,
        typer.Option(
            "--after",
            help="run after another job of yours, JOB_ID[:ok|any|notok] (repeat; default ok)",
        ),
    ] = None,
    qos: Annotated[str | None, typer.Option(help="SLURM QOS (resources.qos)")] = None,
    constraint: Annotated[
        str | None, typer.Option(help="node features, sbatch syntax: a100|v100 (resources.constraint)")
    ] = None,
    gres: Annotated[
        str | None, typer.Option(help="generic resources, e.g. gpu:a100:4 (resources.gres)")
    ] = None,
    checkpoint_warn_before: Annotated[
        str | None,
        typer.Option(
            help="warn the job this long before its time limit and requeue it: 90, 2m, 1m30s "
            "(checkpoint.warn_before; needs a time limit)"
        ),
    ] = None,
    checkpoint_signal: Annotated[
        str | None, typer.Option(help="the warning signal, default USR1 (checkpoint.signal)")
    ] = None,
    max_restarts: Annotated[
        int | None, typer.Option(help="runs after the first one, at most (checkpoint.max_restarts)")
    ] = None,
    outputs: Annotated[
        list[str] | None,
        typer.Option(
            "--outputs",
            help="files of the job directory to collect when it ends, a glob (repeat): "
            "--outputs 'results/*.csv' (spec `outputs`; `-o` is the output format)",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="resubmitting with the same key returns the same job")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job to its end")] = False,
    timeout: Annotated[
        float | None, typer.Option(help="with --wait: give up after this many seconds")
    ] = None,
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="submit nothing: when SLURM would start the job on each allowed partition "
            "(sbatch --test-only) and what it would cost there (-r partition=auto submits to the earliest)",
        ),
    ] = False,
    url: UrlOpt = None,
    token_file: TokenFileOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Submit a job from a spec file and/or options (or, with --estimate, only estimate it)."""
    overrides: dict[str, Any] = {"name": name, "cluster": cluster, "array": array, "outputs": outputs}
    if after:
        overrides["after"] = [_after_option(a) for a in after]
    if script is not None:
        overrides["script"] = script.read_text(encoding="utf-8")
    typed = {"qos": qos, "constraint": constraint, "gres": gres}
    checkpoint = {
        "warn_before": checkpoint_warn_before,
        "signal": checkpoint_signal,
        "max_restarts": max_restarts,
    }
    sections: dict[str, dict[str, Any]] = {
        "resources": _resource_pairs(resource or []) | {k: v for k, v in typed.items() if v is not None},
        "checkpoint": {k: v for k, v in checkpoint.items() if v is not None},
    }
    spec = _load_spec(file, overrides, sections)
    if estimate:
        with client_for(url, token_file) as client:
            found = client.estimate(spec)
        if output.is_data:
            print_data(found, output)
        else:
            _print_table(_estimate_table(found))
        return
    with client_for(url, token_file) as client:
        job = client.submit(spec, idempotency_key=idempotency_key)
        if wait:
            _wait_and_report(client, job, output, timeout)
            return
    if output.is_data:
        print_data(job, output)
    else:
        out.print(str(job.id))


@jobs_app.command("list")
def jobs_list(
    state: Annotated[JobState | None, typer.Option(help="only jobs in this state")] = None,
    cluster: Annotated[str | None, typer.Option()] = None,
    name: Annotated[str | None, typer.Option()] = None,
    url: UrlOpt = None,
    token_file: TokenFileOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List your jobs, newest first."""
    with client_for(url, token_file) as client:
        jobs = list(client.list(state=state, cluster=cluster, name=name))
    if output.is_data:
        print_data(jobs, output)
    else:
        _print_table(_jobs_table(jobs))


@jobs_app.command("get")
def jobs_get(
    job_id: str, url: UrlOpt = None, token_file: TokenFileOpt = None, output: OutputOpt = Output.table
) -> None:
    """Show one job."""
    with client_for(url, token_file) as client:
        job = client.get(job_id)
    if output.is_data:
        print_data(job, output)
    else:
        _print_table(_jobs_table([job]))
        if job.bridges:
            _print_table(bridges_table(list(job.bridges)))


@jobs_app.command("wait")
def jobs_wait(
    job_id: str,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds")] = None,
    url: UrlOpt = None,
    token_file: TokenFileOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Wait for a job to end, showing its state; exit 1 unless it completed."""
    with client_for(url, token_file) as client:
        _wait_and_report(client, client.get(job_id), output, timeout)


TaskOpt = Annotated[int | None, typer.Option("--task", help="one task of an array job, by index")]


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str,
    task: TaskOpt = None,
    url: UrlOpt = None,
    token_file: TokenFileOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Ask for a job (or, with --task, one task of an array) to be cancelled."""
    with client_for(url, token_file) as client:
        job = client.cancel(job_id) if task is None else client.cancel_task(job_id, task)
    if output.is_data:
        print_data(job, output)
    else:
        what = "cancel" if task is None else f"cancel of task {task}"
        out.print(f"{job.id}: {what} requested (state {job.state.value})")


@jobs_app.command("tasks")
def jobs_tasks(
    job_id: str, url: UrlOpt = None, token_file: TokenFileOpt = None, output: OutputOpt = Output.table
) -> None:
    """The tasks of an array job: state, SLURM state, exit code, times."""
    with client_for(url, token_file) as client:
        tasks = client.tasks(job_id)
    if output.is_data:
        print_data(tasks, output)
        return
    table = Table("TASK", "STATE", "SLURM STATE", "EXIT", "STARTED", "ENDED", "REASON")
    for t in tasks:
        table.add_row(
            str(t.index),
            t.state.value,
            t.native_state,
            "-" if t.exit_code is None else str(t.exit_code),
            t.started_at.isoformat() if t.started_at else "-",
            t.ended_at.isoformat() if t.ended_at else "-",
            t.reason or "",
        )
    _print_table(table)


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
    offset: Annotated[int, typer.Option(help="start at this byte")] = 0,
    task: TaskOpt = None,
    url: UrlOpt = None,
    token_file: TokenFileOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Print the job's output (stdout and stderr); with --task, one array task's (once the array
    has ended)."""
    with client_for(url, token_file) as client:
        if task is not None:
            sys.stdout.buffer.write(client.task_output(job_id, task)[offset:])
            return
        if follow:
            for data in client.follow_logs(job_id, offset=offset):
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            return
        chunk = client.logs(job_id, offset=offset)
    if output.is_data:
        print_data(
            {
                "data": chunk.data.decode(errors="replace"),
                "next_offset": chunk.next_offset,
                "complete": chunk.complete,
            },
            output,
        )
    else:
        sys.stdout.buffer.write(chunk.data)


@jobs_app.command("accounting")
def jobs_accounting(
    job_id: str, url: UrlOpt = None, token_file: TokenFileOpt = None, output: OutputOpt = Output.table
) -> None:
    """Show sacct records and efficiency (available once the job has ended)."""
    with client_for(url, token_file) as client:
        record = client.accounting(job_id)
    if output.is_data:
        print_data(record, output)
        return
    eff = record.efficiency or Efficiency()
    table = Table("STEP", "STATE", "EXIT", "ELAPSED", "CPU TIME", "CPUS", "MAX RSS", "NODES")
    for row in record.records:
        table.add_row(
            row.step or "(job)",
            str(row.state),
            str(row.exit_code),
            f"{row.elapsed_seconds}s",
            f"{row.total_cpu_seconds}s",
            str(row.alloc_cpus),
            str(row.max_rss_bytes),
            str(row.node_list),
        )
    _print_table(table)

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    out.print(
        f"CPU efficiency {pct(eff.cpu_efficiency)}, memory efficiency "
        f"{pct(eff.memory_efficiency)} (from {eff.source or '-'})"
    )
    if not record.final:
        out.print("provisional: SLURM has not recorded all of the job yet; ask again in a few seconds")


@jobs_app.command("files")
def jobs_files(
    job_id: str,
    path: Annotated[
        str, typer.Argument(help="relative to the job's directory (default: the directory)")
    ] = "",
    offset: Annotated[int, typer.Option(help="a file: start at this byte")] = 0,
    length: Annotated[
        int | None, typer.Option(help="a file: at most this many bytes (default: to its end)")
    ] = None,
    url: UrlOpt = None,
    token_file: TokenFileOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List a directory of the job's directory on its cluster, or print a file of it, while the job
    runs and after it ended (never outside it: a symlink that leads out is refused)."""
    with client_for(url, token_file) as client:
        if output.is_data:  # a file's bytes base64 in `content` (one read: --length, or 1 MiB)
            answer = client.files(job_id, path, offset=offset, length=length)
        else:
            answer = client.files(job_id, path, length=0)  # what it is, without its bytes
            if answer.type == EntryType.FILE:
                sys.stdout.buffer.write(client.read_file(job_id, path, offset=offset, length=length))
                return
    if output.is_data:
        print_data(answer.model_dump(mode="json", exclude_none=True), output)
        return
    table = Table("NAME", "TYPE", "SIZE", "MODIFIED")
    for entry in answer.entries or []:
        table.add_row(
            entry.name,
            entry.type.value,
            "-" if entry.size is None else str(entry.size),
            entry.mtime.isoformat(timespec="seconds") if entry.mtime else "-",
        )
    _print_table(table)
    if answer.truncated:
        err.print(f"(the first {len(answer.entries or [])} entries only)")


# ---- clusters ----------------------------------------------------------------------------------


@clusters_app.command("list")
def clusters_list(
    url: UrlOpt = None, token_file: TokenFileOpt = None, output: OutputOpt = Output.table
) -> None:
    """Clusters porter knows, with the liveness of their agents."""
    with client_for(url, token_file) as client:
        clusters = client.clusters()
    if output.is_data:
        print_data(clusters, output)
        return
    table = Table("NAME", "BACKEND", "AGENT ONLINE", "AGENT LAST SEEN")
    for c in clusters:
        table.add_row(
            c.name,
            c.backend or "-",
            "yes" if c.agent_online else "no",
            c.agent_last_seen.isoformat() if c.agent_last_seen else "None",
        )
    _print_table(table)


@clusters_app.command("check")
def clusters_check(
    name: Annotated[str | None, typer.Argument(help="one cluster (default: all configured)")] = None,
    config: ConfigOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Connect to each configured cluster from here and run a harmless SLURM query."""
    from cloudhpc.hpc.cluster_check import check_clusters

    settings = _settings(config)
    results = asyncio.run(check_clusters(settings, name))
    if output.is_data:
        print_data(results, output)
    else:
        for r in results:
            mark = "[green]ok[/green]" if r["ok"] else "[red]FAILED[/red]"
            out.print(f"{r['cluster']}: {mark} {r['detail']}")
    if not all(r["ok"] for r in results):
        raise typer.Exit(1)


# ---- tokens ------------------------------------------------------------------------------------


@tokens_app.command("create")
def tokens_create(
    user: Annotated[
        str, typer.Option(help="who the token is for; for an agent token, the owner of its clusters")
    ],
    role: Annotated[str, typer.Option(help="user, agent or admin")] = "user",
    cluster: Annotated[
        list[str] | None, typer.Option(help="agent tokens: a cluster it may serve (repeat)")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Create a token in porter's database and print it once (it is stored only as a hash)."""
    if role not in ("user", "agent", "admin"):
        err.print(f"--role: {role!r} is not one of user, agent, admin")
        raise typer.Exit(2)
    if role == "agent" and not cluster:
        err.print("--cluster: an agent token must name the cluster(s) it serves")
        raise typer.Exit(2)
    with _porter_store(config) as store:
        token = store.create_token(user, role, list(cluster or []))
    sys.stdout.write(token + "\n")


@contextlib.contextmanager
def _porter_store(config: Path | None) -> Iterator[Store]:
    """porter's database, migrated: token commands run where porter's database is reachable."""
    from cloudhpc.store import Store

    store = Store(_settings(config).porter.database)
    try:
        store.migrate()
        yield store
    finally:
        store.close()


@tokens_app.command("list")
def tokens_list(
    user: Annotated[str | None, typer.Option(help="only this user's tokens")] = None,
    config: ConfigOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List tokens (never their secrets): id, user, role, clusters, when created and revoked."""
    with _porter_store(config) as store:
        tokens = store.list_tokens(user)
    if output.is_data:
        print_data(tokens, output)
        return
    table = Table("ID", "USER", "ROLE", "CLUSTERS", "CREATED", "REVOKED")
    for t in tokens:
        revoked = t.revoked_at.isoformat(timespec="seconds") if t.revoked_at else "-"
        created = t.created_at.isoformat(timespec="seconds")
        table.add_row(str(t.id), t.user, t.role, ",".join(t.clusters) or "-", created, revoked)
    _print_table(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[int, typer.Argument(help="the ID `tokens list` shows")],
    config: ConfigOpt = None,
) -> None:
    """Revoke a token: every porter replica refuses it within 5 s (they cache verified tokens that long)."""
    with _porter_store(config) as store:
        revoked = store.revoke_token_id(token_id)
    if not revoked:
        err.print(f"token {token_id}: no such token, or already revoked (see `cloudhpc tokens list`)")
        raise typer.Exit(1)
    err.print(f"token {token_id}: revoked")


# ---- demo --------------------------------------------------------------------------------------


@app.command()
def demo(
    cluster: Annotated[
        str,
        typer.Option(
            help="`local` (the embedded default) or `testbed` (the SLURM testbed of scripts/testbed.sh)"
        ),
    ] = "local",
    epochs: Annotated[int, typer.Option(min=1, help="training epochs")] = 5,
    data_url: Annotated[
        str,
        typer.Option(
            help="Fashion-MNIST base URL (https://, s3://, file://); empty: the offline digits data"
        ),
    ] = "",
    batch: Annotated[bool, typer.Option("--batch", help="run the quick batch-job demo instead")] = False,
) -> None:
    """Run the cloud-HPC pipeline (preprocess, Ray Train on the cluster, evaluate, register in MLflow)
    against `serve all`, with a local MLflow; `--batch` runs one small batch job instead."""
    # `serve all` runs in a child process: without the server extra, say so here rather than in its log.
    importlib.import_module("cloudhpc.runtime")
    if batch:
        from cloudhpc.cli.demo import run_demo

        raise typer.Exit(run_demo())
    from cloudhpc.cli.pipeline_demo import run_pipeline_demo

    raise typer.Exit(run_pipeline_demo(cluster=cluster, epochs=epochs, data_url=data_url))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
