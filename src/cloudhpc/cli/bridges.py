"""`cloudhpc bridge {list|sshd-config|ca-public-key|principals|authorized-key}` and
`cloudhpc doctor bridge-host`.

`bridge list` asks porter (SDK); `sshd-config`, `ca-public-key`, `authorized-key` and `doctor
bridge-host` read `porter.bridge` from the configuration, since they are run by whoever sets up the
bridge VM, on the side that stages jobs. `principals` is run by the bridge VM's sshd itself
(`AuthorizedPrincipalsCommand`) and takes everything on its command line.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cloudhpc.bridges.authorized_key import authorized_key_line
from cloudhpc.bridges.certificates import BridgeCA
from cloudhpc.bridges.doctor import check_bridge_host, public_key_of
from cloudhpc.bridges.principals import parse_port_range, principals_line, sshd_config_lines
from cloudhpc.cli.options import (
    ConfigOpt,
    Output,
    OutputOpt,
    TokenFileOpt,
    UrlOpt,
    client_for,
    config_path,
    print_data,
)
from cloudhpc.config import BridgeConfig, load_settings
from cloudhpc.domain.jobs import Bridge
from cloudhpc.exceptions import CloudHPCError, ConfigError

__all__ = ["bridge_app", "bridges_table", "doctor_app"]

bridge_app = typer.Typer(no_args_is_help=True, help="Bridges between jobs and the cloud (docs/bridge-vm.md).")
doctor_app = typer.Typer(no_args_is_help=True, help="Check a setup from this machine.")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

PermitOpenOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--permit-open",
        help="HOST:PORT (as seen from the bridge VM) that jobs may import, e.g. MLflow; repeat",
    ),
]


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
        settings = load_settings(config_path(config))
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
    url: UrlOpt = None,
    token_file: TokenFileOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """The bridges of a job: where each exposed port is reachable, and whether it answers."""
    with client_for(url, token_file) as client:
        bridges = client.bridges(job_id)
    if output.is_data:
        print_data(bridges, output)
        return
    if not bridges:
        out.print("no bridges (the job exposes no ports, or it has ended)")
        return
    out.print(bridges_table(bridges))


def _bridge_ca(bridge: BridgeConfig) -> BridgeCA:
    if bridge.ca_key_file is None:
        err.print("ConfigError: porter.bridge.ca_key_file is not set (see docs/bridge-vm.md)")
        raise typer.Exit(2)
    try:
        return BridgeCA.from_file(bridge.ca_key_file)
    except ConfigError as exc:
        err.print(f"ConfigError: {exc}", highlight=False)
        raise typer.Exit(2) from exc


@bridge_app.command("sshd-config")
def bridge_sshd_config(
    permit_open: PermitOpenOpt = None,
    ca_public_key_file: Annotated[
        str,
        typer.Option(
            "--ca-public-key-file", help="where the bridge VM holds `cloudhpc bridge ca-public-key`"
        ),
    ] = "/etc/ssh/cloudhpc_bridge_ca.pub",
    cloudhpc: Annotated[
        str | None,
        typer.Option(
            "--cloudhpc", help="absolute path of the cloudhpc command on the bridge VM (default: this one)"
        ),
    ] = None,
    command_user: Annotated[
        str, typer.Option("--command-user", help="unprivileged account sshd runs the principals command as")
    ] = "nobody",
    config: ConfigOpt = None,
) -> None:
    """Print the sshd_config block for the bridge VM (append it at the end): trust the bridge CA for
    porter.bridge.ssh_user, each job's certificate listening on its own ports only."""
    bridge = _bridge_config(config)
    command = cloudhpc or shutil.which("cloudhpc") or str(Path(sys.argv[0]).resolve())
    try:
        lines = sshd_config_lines(
            ssh_user=bridge.ssh_user,
            ca_public_key_file=ca_public_key_file,
            cloudhpc=command,
            bind_address=bridge.bind_address,
            port_range=bridge.port_range,
            permit_open=permit_open or [],
            command_user=command_user,
        )
    except ValueError as exc:
        err.print(f"error: {exc}", highlight=False)
        raise typer.Exit(2) from exc
    sys.stdout.write("\n".join(lines) + "\n")


@bridge_app.command("ca-public-key")
def bridge_ca_public_key(config: ConfigOpt = None) -> None:
    """Print the bridge CA's public key, for the bridge VM's TrustedUserCAKeys file."""
    sys.stdout.write(_bridge_ca(_bridge_config(config)).public_key + "\n")


@bridge_app.command("principals", hidden=True)
def bridge_principals(
    key_id: Annotated[str, typer.Argument(help="the certificate's key id (sshd token %i)")],
    bind_address: Annotated[str, typer.Option("--bind-address", help="porter.bridge.bind_address")],
    port_range: Annotated[str, typer.Option("--port-range", help="porter.bridge.port_range as LOW-HIGH")],
    permit_open: PermitOpenOpt = None,
) -> None:
    """Run by the bridge VM's sshd (AuthorizedPrincipalsCommand, from `cloudhpc bridge sshd-config`):
    print the principals line that lets a job's certificate listen on its own ports only. A key id
    that is not a cloudhpc job's gets no line (sshd refuses the login) and exit status 1."""
    try:
        line = principals_line(
            key_id,
            bind_address=bind_address,
            port_range=parse_port_range(port_range),
            permit_open=permit_open or [],
        )
    except ValueError as exc:
        err.print(f"cloudhpc bridge principals: refused: {exc}", highlight=False)
        raise typer.Exit(1) from exc
    sys.stdout.write(line + "\n")


@bridge_app.command("authorized-key")
def bridge_authorized_key(permit_open: PermitOpenOpt = None, config: ConfigOpt = None) -> None:
    """Print the shared bridge key's line for the bridge VM's ~/.ssh/authorized_keys: port forwarding
    only, listening only on porter.bridge.port_range, opening only the --permit-open services. Only
    for sites that cannot use `sshd-config`: any job may then listen on any port of the range."""
    bridge = _bridge_config(config)
    try:
        if bridge.key_file is None:
            raise ConfigError("porter.bridge.key_file is not set (the shared key's line needs it)")
        public = public_key_of(bridge.key_file.expanduser())
        line = authorized_key_line(public, bridge, permit_open or [])
    except (ValueError, ConfigError) as exc:
        err.print(f"error: {exc}", highlight=False)
        raise typer.Exit(2) from exc
    sys.stdout.write(line + "\n")


@doctor_app.command("bridge-host")
def doctor_bridge_host(
    config: ConfigOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Check the bridge VM as a job's tunnel uses it: CA (a test certificate) or key, host key,
    forwarding (AllowTcpForwarding, GatewayPorts), the restrictions and the port range. Exit 1 when
    a check fails."""
    bridge = _bridge_config(config)
    held = _held_ports(config)
    checks = asyncio.run(check_bridge_host(bridge, held=held))
    if output.is_data:
        print_data(checks, output)
    else:
        for c in checks:
            mark = "[green]ok[/green]    " if c.ok else "[red]FAILED[/red]"
            out.print(f"{mark} {c.name}: {c.detail}", highlight=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)


def _held_ports(config: Path | None) -> set[int]:
    """Ports held by live jobs' bridges, when porter's database is reachable from here."""
    from cloudhpc.store import Store

    settings = load_settings(config_path(config))
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
