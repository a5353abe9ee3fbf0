"""`cloudhpc bridge {list|authorized-key}` and `cloudhpc doctor bridge-host`.

`bridge list` asks porter (SDK); `authorized-key` and `doctor bridge-host` read `porter.bridge` from
the configuration, since they are run by whoever sets up the bridge VM, on porter's side.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cloudhpc.bridges.authorized_key import authorized_key_line
from cloudhpc.bridges.doctor import check_bridge_host, public_key_of
from cloudhpc.client import default_client
from cloudhpc.config import BridgeConfig, load_settings
from cloudhpc.domain.jobs import Bridge
from cloudhpc.exceptions import CloudHPCError, ConfigError

__all__ = ["bridge_app", "bridges_table", "doctor_app"]

bridge_app = typer.Typer(no_args_is_help=True, help="Bridges between jobs and the cloud (docs/bridge-vm.md).")
doctor_app = typer.Typer(no_args_is_help=True, help="Check a setup from this machine.")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="cloudhpc.yaml (default: $CLOUDHPC_CONFIG)")]


def bridges_table(bridges: list[Bridge]) -> Table:
    table = Table("BRIDGE", "JOB PORT", "REACH AT", "URL", "SERVICE", "READY")
    for b in bridges:
        table.add_row(
            b.name,
            str(b.remote_port),
            f"{b.bridge_host}:{b.bridge_port}",
            b.url or "-",
            f"{b.service_dns}:{b.remote_port}" if b.service_dns else "-",
            "yes" if b.ready else "no",
        )
    return table


def _bridge_config(config: Path | None) -> BridgeConfig:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        err.print(f"ConfigError: {exc}", highlight=False)
        raise typer.Exit(2) from exc
    if settings.porter.bridge is None:
        err.print("ConfigError: the configuration has no porter.bridge section (see docs/bridge-vm.md)")
        raise typer.Exit(2)
    return settings.porter.bridge


@bridge_app.command("list")
def bridge_list(
    job_id: str,
    url: Annotated[str | None, typer.Option("--url", envvar="CLOUDHPC_URL", help="porter URL")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
) -> None:
    """The bridges of a job: where each exposed port is reachable, and whether it answers."""
    with default_client(url) as client:
        bridges = client.bridges(job_id)
    if output == "json":
        sys.stdout.write(json.dumps([b.model_dump(mode="json") for b in bridges], indent=2) + "\n")
        return
    if not bridges:
        out.print("no bridges (the job exposes no ports, or it has ended)")
        return
    out.print(bridges_table(bridges))


@bridge_app.command("authorized-key")
def bridge_authorized_key(
    permit_open: Annotated[
        list[str] | None,
        typer.Option(
            "--permit-open",
            help="HOST:PORT (as seen from the bridge VM) that jobs may import, e.g. MLflow; repeat",
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Print the bridge key's line for the bridge VM's ~/.ssh/authorized_keys: port forwarding only,
    listening only on porter.bridge.port_range, opening only the --permit-open services."""
    bridge = _bridge_config(config)
    try:
        public = public_key_of(bridge.job_files()[0])
        line = authorized_key_line(public, bridge, permit_open or [])
    except (ValueError, ConfigError) as exc:
        err.print(f"error: {exc}", highlight=False)
        raise typer.Exit(2) from exc
    sys.stdout.write(line + "\n")


@doctor_app.command("bridge-host")
def doctor_bridge_host(
    config: ConfigOpt = None,
    output: Annotated[str, typer.Option("--output", "-o", help="table or json")] = "table",
) -> None:
    """Check the bridge VM as a job's tunnel uses it: key, host key, forwarding (AllowTcpForwarding,
    GatewayPorts), the key's restrictions and the port range. Exit 1 when a check fails."""
    bridge = _bridge_config(config)
    held = _held_ports(config)
    checks = asyncio.run(check_bridge_host(bridge, held=held))
    if output == "json":
        sys.stdout.write(json.dumps([c.__dict__ for c in checks], indent=2) + "\n")
    else:
        for c in checks:
            mark = "[green]ok[/green]    " if c.ok else "[red]FAILED[/red]"
            out.print(f"{mark} {c.name}: {c.detail}", highlight=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def _held_ports(config: Path | None) -> set[int]:
    """Ports held by live jobs' bridges, when porter's database is reachable from here."""
    from cloudhpc.store import Store

    settings = load_settings(config)
    database = settings.porter.database
    if database.startswith("sqlite:///") and not Path(database.removeprefix("sqlite:///")).exists():
        return set()
    try:
        store = Store(database)
        try:
            return {r.bridge.bridge_port for r in store.bridge_records()}
        finally:
            store.close()
    except CloudHPCError:
        return set()
