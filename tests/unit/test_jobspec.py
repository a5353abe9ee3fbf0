from __future__ import annotations

from typing import Any

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from pydantic import ValidationError

from cloudhpc.domain.jobs import (
    JobKind,
    JobSpec,
    Resources,
    is_object_url,
    parse_slurm_time,
)
from tests.conftest import HOSTILE_STRINGS


def spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {"name": "train", "cluster": "testbed", "script": "echo hi"}
    body.update(overrides)
    return JobSpec.model_validate(body)


def field_of(exc: pytest.ExceptionInfo[ValidationError]) -> list[str]:
    return [".".join(str(p) for p in e["loc"]) for e in exc.value.errors()]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10", 600),
        ("10:30", 630),
        ("01:00:00", 3600),
        ("2-0", 172800),
        ("1-02:03", 93780),
        ("1-00:00:05", 86405),
    ],
)
def test_slurm_time_formats(text: str, seconds: int) -> None:
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "1-", "10m", "$(id)"])
def test_bad_slurm_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="SLURM time limit"):
        parse_slurm_time(text)


def test_unknown_fields_are_named() -> None:
    with pytest.raises(ValidationError) as exc:
        spec(scirpt="oops")
    assert "scirpt" in field_of(exc)
    with pytest.raises(ValidationError) as exc:
        spec(resources={"nodes": 1, "gpu": 2})
    assert "resources.gpu" in field_of(exc)


@pytest.mark.parametrize("name", [*HOSTILE_STRINGS, "", "x" * 65, "a/b", "ä"])
def test_names_are_restricted(name: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(name=name)
    assert "name" in field_of(exc)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("nodes", 0),
        ("mem", "4 G"),
        ("mem", "$(id)"),
        ("time", "0"),
        ("time", "1h"),
        ("partition", "debug;id"),
        ("account", "--uid=0"),
        ("cpus_per_task", -1),
    ],
)
def test_bad_resources_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(resources={field: value})
    assert f"resources.{field}" in field_of(exc)


@pytest.mark.parametrize(
    "path",
    [
        "../x",
        "a/../../b",
        "/etc/passwd",
        "a//b",
        "./a",
        "",
        ".cloudhpc/job.sh",
        ".cloudhpc",
        "a\x00b",
        "a\\b",
    ],
)
def test_file_paths_cannot_escape_or_clash(path: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(files={path: "x"})
    assert "files" in field_of(exc)


def test_hostile_but_contained_file_names_are_accepted_literally() -> None:
    names = ["$(touch x)", "a b/`c`", "semi;colon", "new\nline", "..dots"]
    assert list(spec(files=dict.fromkeys(names, "x")).files) == names


def test_env_names_and_reserved_prefixes() -> None:
    assert spec(env={"X": "$(touch /tmp/pwned)"}).env["X"] == "$(touch /tmp/pwned)"
    for bad in ["1X", "A-B", "A B", "CLOUDHPC_TOKEN", "SLURM_JOB_ID", "X;id"]:
        with pytest.raises(ValidationError) as exc:
            spec(env={bad: "1"})
        assert "env" in field_of(exc)


REFUSED_PACKAGES = [
    "--index-url=http://evil",
    "-e .",
    "a\nb",
    " ",
    "-r x.txt",
    "git+https://github.com/evil/pkg",
    "pkg @ file:///home/other/pkg",
    "pkg @ https://evil.example/pkg-1.0.tar.gz",
    "https://evil.example/pkg-1.0-py3-none-any.whl",
    "./src",
    "/tmp/pkg",
    "pkg-1.0-py3-none-any.whl",
    "pkg.tar.gz",
    "pkg --index-url http://evil",  # an option after the name is an option all the same
    "pkg==1.0 --hash=sha256:00",
    "pkg; os_name == ' --index-url=http://evil'",
    "pkg #comment",
    "pkg; os_name == '${HOME}'",
    "pkg; import os",
    "pkg;",
    "pkg\\",
    "pkg[extra",
    "pkg==",
    "two words",
]
ACCEPTED_PACKAGES = [
    "six",
    "six==1.16.0",
    "numpy >= 1.26",
    "ray[default,Client]==2.9",
    "ray[client, default] == 2.9",
    "Foo_Bar.baz",
    "foo (>=1.0, <2)",
    "torch==2.1.0+cpu",
    "foo~=1.4.2",
    "foo==1.*",
    "foo; python_version < '3.12'",
    'foo>=1; sys_platform == "linux" and (python_version >= "3.8" or extra == "x")',
]


@pytest.mark.parametrize("pkg", REFUSED_PACKAGES)
def test_package_urls_paths_and_options_are_refused(pkg: str) -> None:
    with pytest.raises(ValidationError) as exc:
        spec(environment={"packages": [pkg]})
    assert "environment.packages" in field_of(exc)


@pytest.mark.parametrize("pkg", ACCEPTED_PACKAGES)
def test_plain_requirements_are_accepted_and_are_pep_508(pkg: str) -> None:
    assert spec(environment={"packages": [pkg]}).environment.packages == [pkg]
    parsed = Requirement(pkg)  # the reference grammar agrees, and sees no URL
    assert parsed.url is None


@pytest.mark.parametrize("pkg", REFUSED_PACKAGES)
def test_refused_packages_are_not_plain_requirements_for_packaging_either(pkg: str) -> None:
    """Each refusal is either outside PEP 508, a direct URL, or something pip reads from a
    requirements file as more than a requirement (an option, a comment, a file name)."""
    try:
        parsed = Requirement(pkg)
    except InvalidRequirement:
        return
    pip_specials = ("-", "#", "$", ".whl", ".tar.gz")
    assert parsed.url is not None or any(s in pkg for s in pip_specials), pkg


def test_kind_needs_matching_payload() -> None:
    with pytest.raises(ValidationError, match="non-empty `script`"):
        spec(script=None)
    with pytest.raises(ValidationError, match=r"ray-job needs `ray\.entrypoint`"):
        spec(kind="ray-job", script=None, ray={})
    with pytest.raises(ValidationError, match="needs a `ray` section"):
        spec(kind="ray-cluster", script=None)
    job = spec(kind="ray-job", script=None, ray={"entrypoint": "python train.py", "expose": ["dashboard"]})
    assert job.kind is JobKind.RAY_JOB
    assert job.ray is not None
    assert job.ray.expose[0].port == 8265


def test_unknown_exposed_port_name_lists_the_known_ones() -> None:
    with pytest.raises(ValidationError, match="client, dashboard, metrics"):
        spec(kind="ray-cluster", script=None, ray={"expose": ["jupyter"]})


def test_defaults_fill_only_unset_resources() -> None:
    merged = Resources(nodes=2).with_defaults(Resources(nodes=1, partition="debug", time="10"))
    assert merged == Resources(nodes=2, partition="debug", time="10")


def test_object_urls() -> None:
    assert is_object_url("s3://bucket/key")
    assert is_object_url("file://objects/x")
    assert not is_object_url("s3://bucket/key\nmore")
    assert not is_object_url("print('s3://x')")


def test_spec_round_trips_through_json() -> None:
    original = spec(
        kind="ray-cluster", script=None, ray={"import": [{"name": "mlflow", "host": "m", "port": 5000}]}
    )
    again = JobSpec.model_validate_json(original.model_dump_json(by_alias=True))
    assert again == original
