"""The `cloudhpc` command. A thin layer: parse arguments, call the SDK or the servers, print."""

from __future__ import annotations

import sys

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Run SLURM and Ray jobs from the cloud.")


@app.command()
def demo() -> None:
    """Run a small job on the embedded default (serve all + the local cluster)."""
    typer.echo(
        "cloudhpc demo: not available yet; the control plane (porter, agent, CLI) is still being built."
    )
    raise typer.Exit(code=1)


def main() -> None:
    sys.exit(app())
