"""The two rules that keep users apart, without servers: which object URLs a job of an owner may
name (`storage.inputs.InputScope`) and who may use a cluster (`porter.access.may_use`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudhpc.config import AccessConfig, load_settings
from cloudhpc.exceptions import ConfigError, StorageError
from cloudhpc.porter.access import may_use
from cloudhpc.storage.inputs import InputScope
from cloudhpc.store import Principal

S3 = InputScope.from_store_url("s3://bucket/some/prefix")


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("s3://bucket/some/prefix/users/alice/data.npz", "users/alice/data.npz"),
        ("s3://bucket/some/prefix/jobs/alice/1234/output.log", "jobs/alice/1234/output.log"),
        ("s3://bucket/some/prefix/users/alice/a%20b", "users/alice/a b"),
    ],
)
def test_an_owner_may_name_its_own_s3_objects(url: str, key: str) -> None:
    assert S3.key_for(url, "alice") == key


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/some/prefix/users/bob/data.npz",  # another user's
        "s3://bucket/some/prefix/users/alice2/x",  # a name that only starts like alice's
        "s3://bucket/some/prefix/users/alice/",  # the prefix itself, no object
        "s3://bucket/some/prefix/users/alice/../bob/x",  # `..` is refused, not resolved
        "s3://bucket/some/prefix/mailbox/up/x",  # the rest of the store
        "s3://bucket/other/users/alice/x",  # outside the store's prefix
        "s3://other-bucket/some/prefix/users/alice/x",  # another bucket
        "s3://bucket/some/prefix/users/alice/x?versionId=1",
        "file:///etc/hostname",  # a file:// URL against an S3 store
    ],
)
def test_anything_else_is_refused_naming_the_owners_prefixes(url: str) -> None:
    with pytest.raises(StorageError) as refused:
        S3.key_for(url, "alice")
    assert "s3://bucket/some/prefix/users/alice/... or s3://bucket/some/prefix/jobs/alice/..." in str(
        refused.value
    )


def test_local_store_urls_are_resolved_before_they_are_judged(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    (root / "users" / "mallory").mkdir(parents=True)
    (root / "jobs" / "alice").mkdir(parents=True)
    (root / "users" / "mallory" / "link").symlink_to(root / "jobs" / "alice")
    scope = InputScope.from_store_url(f"file://{root}")
    assert scope.key_for(f"file://{root}/users/mallory/x.txt", "mallory") == "users/mallory/x.txt"
    for url in [
        f"file://{root}/users/mallory/link/spec.json",  # a symlink into alice's prefix
        f"file://{root}/users/mallory/../../jobs/alice/spec.json",
        "file:///etc/hostname",
        "file://users/mallory/x.txt",  # relative: to whose directory?
        "s3://bucket/users/mallory/x.txt",
    ]:
        with pytest.raises(StorageError):
            scope.key_for(url, "mallory")


def test_owner_names_are_one_segment() -> None:
    """A user name with `/` or `..` cannot reach into another prefix."""
    assert S3.owner_prefixes("a/b") == ("users/a%2Fb/", "jobs/a%2Fb/")
    assert S3.owner_prefixes("..") == ("users/%2E%2E/", "jobs/%2E%2E/")
    with pytest.raises(StorageError):
        S3.key_for("s3://bucket/some/prefix/users/a/b/x", "a/b")


def _principal(user: str, role: str = "user") -> Principal:
    return Principal(user=user, role=role, clusters=(), token_id=1)


def test_who_may_use_a_cluster() -> None:
    access = AccessConfig.model_validate(
        {
            "groups": {"ml": ["bob"]},
            "clusters": {"mahti": {"users": ["carol"], "groups": ["ml"]}, "open": {"users": ["*"]}},
        }
    )
    owners = {"mahti": frozenset({"alice"})}
    allowed = {
        (user, cluster)
        for user in ("alice", "bob", "carol", "mallory")
        for cluster in ("mahti", "open", "local")
        if may_use(_principal(user), cluster, owners, access)
    }
    assert allowed == {
        ("alice", "mahti"), ("bob", "mahti"), ("carol", "mahti"),
        ("alice", "open"), ("bob", "open"), ("carol", "open"), ("mallory", "open"),
    }  # fmt: skip
    assert may_use(_principal("root", "admin"), "local", owners, access)


def test_an_unknown_group_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "cloudhpc.yaml"
    config.write_text("porter: {access: {clusters: {mahti: {groups: [ml]}}}}\n")
    with pytest.raises(ConfigError, match=r"porter\.access\.clusters\.mahti\.groups: ml not defined"):
        load_settings(config)
