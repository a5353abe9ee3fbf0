"""`cloudhpc platform`: commands for the cloud VM the platform runs on (docs/platform.md).

`cloudhpc platform forward` parses its options and prints; `cloudhpc.port_forwards` opens, watches
and restarts the `kubectl port-forward` children. `cloudhpc platform profile add` prints or applies
a Kubeflow profile with cloudhpc's Secrets and PodDefault (`cloudhpc.cli.platform_profiles`).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from cloudhpc.cli import platform_profiles as profiles
from cloudhpc.cli.options import Output, OutputOpt, print_data
from cloudhpc.exceptions import ConfigError, KubernetesError
from cloudhpc.port_forwards import FORWARDS, ForwardSupervisor, Kubectl, OpenedForward

__all__ = ["platform_app"]

platform_app = typer.Typer(no_args_is_help=True, help="The cloud platform's VM (docs/platform.md).")
profile_app = typer.Typer(
    no_args_is_help=True, help="Kubeflow profiles with cloudhpc access (docs/platform.md)."
)
platform_app.add_typer(profile_app, name="profile")

out = Console()
err = Console(stderr=True, soft_wrap=True)


def _report(opened: Sequence[OpenedForward], address: str) -> Table:
    table = Table("NAME", "LOCAL", "SERVICE", "STATUS")
    for item in opened:
        status = "[green]open[/green]" if item.ok else f"[red]FAILED[/red] {item.error}"
        table.add_row(
            item.forward.name,
            f"http://{address}:{item.local_port}",
            str(item.target) if item.target else "-",
            status,
        )
    return table


@platform_app.command("forward")
def forward(
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help=f"open only these (repeat): {', '.join(f.name for f in FORWARDS)}"),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="open, report and close again (exit 1 if any failed)")
    ] = False,
    address: Annotated[str, typer.Option(help="local address to listen on")] = "127.0.0.1",
    port_offset: Annotated[
        int, typer.Option(help="add this to every local port (when the usual ones are taken)")
    ] = 0,
    context: Annotated[str | None, typer.Option(help="kubectl context (default: the current one)")] = None,
    kubectl: Annotated[str, typer.Option(envvar="KUBECTL", help="the kubectl executable")] = "kubectl",
    timeout: Annotated[float, typer.Option(help="seconds each forward may take to open")] = 20.0,
    output: OutputOpt = Output.table,
) -> None:
    """Open the platform's port-forwards on this VM, say which failed, and keep them open."""
    known = {f.name: f for f in FORWARDS}
    unknown = [name for name in only or [] if name not in known]
    if unknown:
        err.print(f"--only: unknown forward(s) {', '.join(unknown)}; known: {', '.join(known)}")
        raise typer.Exit(2)
    chosen = [known[name] for name in only] if only else list(FORWARDS)
    supervisor = ForwardSupervisor(
        chosen,
        kubectl=Kubectl(kubectl, context),
        address=address,
        port_offset=port_offset,
        start_timeout=timeout,
        on_event=lambda message: err.print(message, highlight=False),
    )
    stop = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        opened = supervisor.open_all()
        if output.is_data:
            print_data([o.as_dict(address) for o in opened], output)
        else:
            # full error lines when piped or logged: Rich would squeeze the table into 80 columns
            (out if out.is_terminal else Console(width=240)).print(_report(opened, address))
        failed = [o for o in opened if not o.ok]
        if check or len(failed) == len(opened):
            if failed and not check:
                err.print("no port-forward could be opened; is kubectl pointed at the platform's cluster?")
            raise typer.Exit(1 if failed else 0)
        if failed:
            err.print(f"{len(failed)} of {len(opened)} failed: {', '.join(o.forward.name for o in failed)}")
        err.print("forwarding; Ctrl-C to stop", highlight=False)
        supervisor.supervise(lambda: stop)
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.close()
        signal.signal(signal.SIGTERM, previous)


@profile_app.command("add")
def profile_add(
    user: Annotated[
        str, typer.Argument(help="the profile's owner, as Kubeflow knows them (e.g. alice@example.org)")
    ],
    namespace: Annotated[
        str | None,
        typer.Option(help="the profile's namespace (default: kubeflow-<user as a name>, Kubeflow's habit)"),
    ] = None,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            help="make it in the cluster: the Profile, a porter token, the S3 keys and the PodDefault "
            "(default: print the Profile and PodDefault as YAML)",
        ),
    ] = False,
    context: Annotated[str | None, typer.Option(help="kubectl context (default: the current one)")] = None,
    kubectl: Annotated[str, typer.Option(envvar="KUBECTL", help="the kubectl executable")] = "kubectl",
    wait: Annotated[float, typer.Option(help="seconds to wait for the profile's namespace")] = 300.0,
    secrets_only: Annotated[
        bool,
        typer.Option(
            "--secrets-only",
            help="with --apply: only the two Secrets, in an existing namespace without a Profile "
            "(standalone Kubeflow Pipelines: --namespace kubeflow)",
        ),
    ] = False,
) -> None:
    """A Kubeflow profile whose pipeline steps and notebooks reach porter, MLflow and the S3 store."""
    try:
        request = profiles.ProfileRequest(user, namespace or profiles.default_namespace(user))
    except ConfigError as exc:
        err.print(str(exc), highlight=False)
        raise typer.Exit(2) from None
    if not apply:
        sys.stdout.write(
            f"# cloudhpc platform profile add {user} --namespace {request.namespace}: with --apply, also\n"
            f"# Secrets {profiles.PORTER_SECRET} (CLOUDHPC_URL, CLOUDHPC_TOKEN: a new porter token) and\n"
            f"# {profiles.S3_SECRET} ({', '.join(profiles.S3_KEYS)}) in {request.namespace}; their values\n"
            "# are never printed.\n"
        )
        sys.stdout.write(yaml.safe_dump_all(profiles.render(request), sort_keys=False))
        return
    try:
        for line in profiles.apply(
            request,
            Kubectl(kubectl, context),
            wait_seconds=wait,
            secrets_only=secrets_only,
            on_event=lambda message: err.print(message, highlight=False),
        ):
            out.print(line, highlight=False)
    except KubernetesError as exc:
        err.print(f"profile {request.namespace}: {exc}", highlight=False)
        raise typer.Exit(1) from None
