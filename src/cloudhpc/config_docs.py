"""Renders the configuration reference (docs/configuration-reference.md) from the settings model,
so the documentation can never drift from the code: a test compares the file with this output."""

from __future__ import annotations

import types
import typing
from pathlib import PurePath
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cloudhpc.config import ClusterConfig, PorterConfig, SubmitterConfig

__all__ = ["render_reference"]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        return "(see below)"
    if info.is_required():
        return "required"
    if info.default is None:
        return "`null`"
    if isinstance(info.default, str | PurePath):
        return f'`"{info.default}"`'
    return f"`{info.default!r}`"


def _rows(model: type[BaseModel], prefix: str, env_prefix: str | None) -> list[str]:
    rows: list[str] = []
    nested: list[tuple[type[BaseModel], str, str | None]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        inner = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        candidate = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        sub = candidate or (inner[0] if inner else None)
        key = f"{prefix}.{name}"
        env = f"`{env_prefix}__{name.upper()}`" if env_prefix else "(see below)"
        if sub is not None:
            env_sub = f"{env_prefix}__{name.upper()}" if env_prefix else None
            if typing.get_origin(annotation) is dict:  # one section per name
                key, env_sub = f"{key}.<name>", (f"{env_sub}__<NAME>" if env_sub else None)
            nested.append((sub, key, env_sub))
            continue
        description = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(annotation)} | {_default(info)} | {env} | {description} |")
    for sub, key, env_sub in nested:
        rows += _rows(sub, key, env_sub)
    return rows


def render_reference() -> str:
    head = [
        "# Configuration reference",
        "",
        "Generated from `cloudhpc.config` by `python -m cloudhpc.config_docs > docs/configuration-reference.md`;",
        "a test keeps it in sync. See `configuration.md` for how the file is found and a worked example.",
        "",
        "| key | type | default | environment variable | meaning |",
        "|---|---|---|---|---|",
    ]
    rows = _rows(PorterConfig, "porter", "CLOUDHPC_PORTER")
    rows += _rows(SubmitterConfig, "submitter", "CLOUDHPC_SUBMITTER")
    rows += _rows(ClusterConfig, "clusters.<name>", None)
    tail = [
        "",
        "Cluster keys are overridden the same way, with the cluster name as one more level:",
        "`CLOUDHPC_CLUSTERS__TESTBED__SSH__PORT=2222` sets `clusters.testbed.ssh.port`. With no `clusters` at all,",
        "one cluster named `local` (backend `local`, workdir `.cloudhpc/local`) is used: the embedded default.",
        "",
    ]
    return "\n".join(head + rows + tail)


if __name__ == "__main__":
    print(render_reference(), end="")
