"""What every `cloudhpc` command shares: the exit codes, the options that choose porter and the token,
and the default configuration file. In a module of its own so that `cli.main` and the command
groups it adds (`cli.bridges`) use one definition (main imports them, so they cannot import main).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import BaseModel

from cloudhpc.client import ApiError, Client, default_client

__all__ = [
    "ConfigOpt",
    "ExitCode",
    "Output",
    "OutputOpt",
    "TokenFileOpt",
    "UrlOpt",
    "client_for",
    "config_path",
    "default_config_path",
    "exit_code_of_api_error",
    "print_data",
]


class ExitCode(IntEnum):
    """The exit codes of every command (docs/cli.md): a script can tell "fix the command" (2) from
    "porter is not there, retry later" (69) from "porter said no" (3) from "the job failed" (1)."""

    OK = 0
    FAILED = 1
    """The job did not complete (or `--timeout` ran out), or a local check failed."""
    USAGE = 2
    """A usage or configuration error, found before anything was sent (click's own code too)."""
    API_ERROR = 3
    """porter answered, with an HTTP error: the request was refused (4xx) or failed there (5xx)."""
    UNAVAILABLE = 69
    """porter could not be reached or did not answer in time (sysexits.h EX_UNAVAILABLE)."""


def exit_code_of_api_error(exc: ApiError) -> ExitCode:
    """`ApiError` with status 0 is the SDK's "no answer" (connection refused, DNS, timeout)."""
    return ExitCode.UNAVAILABLE if exc.status == 0 else ExitCode.API_ERROR


class Output(StrEnum):
    """`-o`: a table for people, or the data itself for scripts (`json`, or `yaml` for reading and
    for tools such as yq): the same document in both, the API's JSON shapes."""

    table = "table"
    json = "json"
    yaml = "yaml"

    @property
    def is_data(self) -> bool:
        return self is not Output.table


OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table, json or yaml")]


def _plain(value: Any) -> Any:
    """Models, dataclasses and lists of them as the JSON document the API would give."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def print_data(value: Any, output: Output) -> None:
    """Every command's `-o json` and `-o yaml`, written once: models are dumped as the API's JSON,
    and YAML is made from that JSON (so both carry the same strings for times and UUIDs)."""
    document = json.loads(json.dumps(_plain(value), default=str))
    if output is Output.yaml:
        sys.stdout.write(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    else:
        sys.stdout.write(json.dumps(document, indent=2) + "\n")


def default_config_path() -> Path:
    """`$XDG_CONFIG_HOME/cloudhpc/config.yaml`, `~/.config/cloudhpc/config.yaml` without it (the XDG
    base directory rule), where docs/submitter.md puts the submitter's configuration."""
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"  # XDG: relative is invalid
    return root / "cloudhpc" / "config.yaml"


def config_path(given: Path | None) -> Path | None:
    """The configuration file a command reads: `--config`, else `CLOUDHPC_CONFIG`, else the default
    file when it exists, else none (the embedded defaults)."""
    if given is not None:
        return given
    if os.environ.get("CLOUDHPC_CONFIG"):
        return Path(os.environ["CLOUDHPC_CONFIG"])
    default = default_config_path()
    return default if default.is_file() else None


def _read_token_file(path: Path) -> str:
    """The token in `path` (`-`: standard input), one line; a usage error (2) naming the file if it
    cannot be read or is empty. The token itself is never printed."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise typer.BadParameter(f"{path}: {exc.strerror or exc}", param_hint="--token-file") from exc
    token = text.strip()
    if not token or "\n" in token:
        raise typer.BadParameter(f"{path}: must hold one token on one line", param_hint="--token-file")
    return token


def client_for(url: str | None, token_file: Path | None) -> Client:
    """The SDK client of a command: `--url`/`CLOUDHPC_URL`, and the token of `--token-file`/
    `CLOUDHPC_TOKEN_FILE`, else `CLOUDHPC_TOKEN`, else the admin token of a `serve all` started in
    the current directory. Its retries are silent (`cloudhpc.retries` logs only errors here): a
    command's stderr is one line, its error, whatever was retried before it."""
    logging.getLogger("cloudhpc.retries").setLevel(logging.ERROR)
    return default_client(url, None if token_file is None else _read_token_file(token_file))


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="cloudhpc.yaml (default: $CLOUDHPC_CONFIG, else ~/.config/cloudhpc/config.yaml if it exists)",
    ),
]
UrlOpt = Annotated[str | None, typer.Option("--url", envvar="CLOUDHPC_URL", help="porter URL")]
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        envvar="CLOUDHPC_TOKEN_FILE",
        help="a file holding the API token (`-`: standard input); default $CLOUDHPC_TOKEN. "
        "No --token: a command line is readable by every user of the machine",
    ),
]
