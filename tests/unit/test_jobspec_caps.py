"""Every list and map of a job spec is capped (#12 item 3): at the cap a spec is accepted, one past
it is refused with the field named. `tests/integration/test_bounded_inputs.py` sends the same
over-cap specs through porter and expects 422 naming the same fields."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from cloudhpc.domain import jobs
from cloudhpc.domain.jobs import JobSpec

BATCH: dict[str, Any] = {"name": "hello", "cluster": "local", "script": "echo hi"}
RAY: dict[str, Any] = {"name": "r", "cluster": "local", "kind": "ray-cluster"}


def _files(n: int) -> dict[str, Any]:
    return {"files": {f"f{i}": "" for i in range(n)}}


def _files_bytes(n: int) -> dict[str, Any]:
    half = n // 2
    return {"files": {"a": "x" * half, "b": "é" * ((n - half) // 2) + "x" * ((n - half) % 2)}}


def _env(n: int) -> dict[str, Any]:
    return {"env": {f"V{i}": "" for i in range(n)}}


def _env_value(n: int) -> dict[str, Any]:
    return {"env": {"V": "x" * n}}


def _env_bytes(n: int) -> dict[str, Any]:
    """Variables named V000.. whose names and values add up to `n` bytes."""
    count = n // jobs.MAX_ENV_VALUE + 1
    values = {f"V{i:03d}": "" for i in range(count)}
    remaining = n - sum(len(k) for k in values)
    for name in values:
        take = min(remaining, jobs.MAX_ENV_VALUE)
        values[name] = "x" * take
        remaining -= take
    assert remaining == 0
    return {"env": values}


def _modules(n: int) -> dict[str, Any]:
    return {"environment": {"modules": [f"m{i}" for i in range(n)]}}


def _packages(n: int) -> dict[str, Any]:
    return {"environment": {"packages": [f"p{i}" for i in range(n)]}}


def _expose(n: int) -> dict[str, Any]:
    return {"ray": {"expose": [{"name": f"p{i}", "port": 9000 + i} for i in range(n)]}}


def _import(n: int) -> dict[str, Any]:
    return {"ray": {"import": [{"name": f"s{i}", "host": "h", "port": 80} for i in range(n)]}}


# (the field named in the error, base spec, builder, cap): builder(cap) is accepted, builder(cap + 1) not
CAPS: list[tuple[str, dict[str, Any], Any, int]] = [
    ("files", BATCH, _files, jobs.MAX_FILES),
    ("files", BATCH, _files_bytes, jobs.MAX_FILES_BYTES),
    ("env", BATCH, _env, jobs.MAX_ENV),
    ("env", BATCH, _env_value, jobs.MAX_ENV_VALUE),
    ("env", BATCH, _env_bytes, jobs.MAX_ENV_BYTES),
    ("environment.modules", BATCH, _modules, jobs.MAX_MODULES),
    ("environment.packages", BATCH, _packages, jobs.MAX_PACKAGES),
    ("ray.expose", RAY, _expose, jobs.MAX_PORTS),
    ("ray.import", RAY, _import, jobs.MAX_PORTS),
]
IDS = ["files", "files-bytes", "env", "env-value", "env-bytes", "modules", "packages", "expose", "import"]


def over_cap(base: dict[str, Any], build: Any, cap: int) -> dict[str, Any]:
    """The spec one past the cap (also used by the API test)."""
    return {**base, **build(cap + 1)}


@pytest.mark.parametrize(("field", "base", "build", "cap"), CAPS, ids=IDS)
def test_at_the_cap_accepted_past_it_refused(field: str, base: dict[str, Any], build: Any, cap: int) -> None:
    JobSpec.model_validate({**base, **build(cap)})
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(over_cap(base, build, cap))
    fields = [".".join(str(p) for p in e["loc"]) for e in caught.value.errors()]
    assert any(f.startswith(field) for f in fields), fields


def test_the_caps_are_sane() -> None:
    """The caps fit inside porter's default request limit, so the API answers 422, not 413."""
    assert jobs.MAX_FILES_BYTES + jobs.MAX_ENV_BYTES < 8 << 20
