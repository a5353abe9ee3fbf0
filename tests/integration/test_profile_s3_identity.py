"""A Kubeflow profile's own S3 identity (`cloudhpc platform profile add`), against the real S3 server.

The platform's store is SeaweedFS (deploy/kustomize/mlflow/s3.yaml), the testbed's too: this test
starts a `weed mini` of its own (the testbed's binary, the same release as the platform's image),
on free loopback ports and a temporary directory, with the identities document the platform would
hold: the store's admin, porter's identity and two profiles' identities as `platform_profiles`
renders them. Then each profile's keys do what pipeline steps and notebooks do (through cloudhpc's
own `S3ObjectStore`, and boto3 for the rest) and must be refused everything outside their prefixes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from cloudhpc.cli import platform_profiles as profiles
from cloudhpc.storage.s3 import S3ObjectStore
from tests.testbed import ROOT

WEED = ROOT / ".testbed" / "venv" / "bin" / "weed"
BUCKET = profiles.STORE_BUCKET
ADMIN = {"AWS_ACCESS_KEY_ID": "ADMINKEYFORTHETEST", "AWS_SECRET_ACCESS_KEY": "admin-secret-" + "a" * 24}
PORTER = {"AWS_ACCESS_KEY_ID": "PORTERKEYFORTHETEST", "AWS_SECRET_ACCESS_KEY": "porter-secret-" + "p" * 24}
ALICE, BOB = "kubeflow-alice-example-org", "kubeflow-bob-example-org"


@dataclass(frozen=True)
class Store:
    endpoint: str
    keys: dict[str, dict[str, str]]
    """Each profile's keys, by namespace (made as `apply` makes them)."""

    def client(self, keys: dict[str, str]) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}),
        )


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _identities(keys: dict[str, dict[str, str]]) -> str:
    """The store's s3.json as platform-up.sh writes it and `profile add` extends it."""
    own = {
        "identities": [
            {
                "name": "mlflow",
                "credentials": [
                    {"accessKey": ADMIN["AWS_ACCESS_KEY_ID"], "secretKey": ADMIN["AWS_SECRET_ACCESS_KEY"]}
                ],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "cloudhpc",
                "credentials": [
                    {"accessKey": PORTER["AWS_ACCESS_KEY_ID"], "secretKey": PORTER["AWS_SECRET_ACCESS_KEY"]}
                ],
                "actions": [f"Read:{BUCKET}", f"List:{BUCKET}", f"Tagging:{BUCKET}", f"Write:{BUCKET}"],
            },
        ]
    }
    profiled = {"identities": [profiles.profile_identity(ns, k) for ns, k in keys.items()]}
    return profiles.merged_s3_config(profiles.s3_config_text(own), profiles.s3_config_text(profiled))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    if not WEED.exists():
        pytest.fail(
            f"{WEED} is missing: the testbed's venv provides SeaweedFS (`make testbed-up`)", pytrace=False
        )
    tmp = tmp_path_factory.mktemp("weed")
    keys = {ns: profiles.new_s3_keys() for ns in (ALICE, BOB)}
    config = tmp / "s3.json"
    config.write_text(_identities(keys))
    config.chmod(0o600)
    (tmp / "data").mkdir()
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc, metrics = (
        _free_ports(11)
    )
    argv = [
        str(WEED), "mini", f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-webdav=false", "-admin.ui=false", f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
        f"-metricsPort={metrics}", "-metricsIp=127.0.0.1", "-master.telemetry=false", f"-s3.config={config}",
    ]  # fmt: skip
    with (tmp / "weed.log").open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HOME": str(tmp)}
        )
    the_store = Store(f"http://127.0.0.1:{s3}", keys)
    try:
        admin_client = the_store.client(ADMIN)
        deadline = time.monotonic() + 90
        while True:
            try:
                admin_client.create_bucket(Bucket=BUCKET)
                admin_client.create_bucket(Bucket="mlflow")
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"weed mini did not serve S3 (exit {proc.poll()}): {(tmp / 'weed.log').read_text()[-2000:]}"
                    ) from None
                time.sleep(0.5)
        yield the_store
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _denied(call: Any) -> str:
    with pytest.raises(ClientError) as refused:
        call()
    return str(refused.value.response["Error"]["Code"])


def test_a_profile_reads_and_writes_its_own_prefix(store: Store, tmp_path: Path) -> None:
    """What a pipeline step does with `store_url: s3://cloudhpc/users/<ns>` (cloudhpc's S3ObjectStore:
    a multipart upload, a listing, a read, a delete), and what a notebook does with its job's files."""
    keys = store.keys[ALICE]
    mine = S3ObjectStore(
        BUCKET,
        f"users/{ALICE}/pipelines/fmnist/run-1",
        endpoint_url=store.endpoint,
        access_key=keys["AWS_ACCESS_KEY_ID"],
        secret_key=keys["AWS_SECRET_ACCESS_KEY"],
        multipart_threshold=5 << 20,
        max_attempts=1,
    )
    data = tmp_path / "train.npz"
    data.write_bytes(os.urandom(6 << 20))  # above the threshold: a multipart upload
    mine.upload_file("train.npz", data)
    mine.put("meta.json", b"{}")
    assert mine.list() == ["meta.json", "train.npz"]
    assert b"".join(mine.iter_bytes("train.npz")) == data.read_bytes()
    mine.delete("meta.json")
    assert mine.list() == ["train.npz"]

    # its jobs' artifacts: read and listed, never written (the agent writes them)
    admin = store.client(ADMIN)
    admin.put_object(Bucket=BUCKET, Key=f"jobs/{ALICE}/j1/output.log", Body=b"log")
    alice = store.client(keys)
    assert alice.get_object(Bucket=BUCKET, Key=f"jobs/{ALICE}/j1/output.log")["Body"].read() == b"log"
    assert alice.list_objects_v2(Bucket=BUCKET, Prefix=f"jobs/{ALICE}/")["KeyCount"] == 1
    assert _denied(lambda: alice.put_object(Bucket=BUCKET, Key=f"jobs/{ALICE}/j1/output.log", Body=b"x")) == (
        "AccessDenied"
    )
    assert _denied(lambda: alice.delete_object(Bucket=BUCKET, Key=f"jobs/{ALICE}/j1/output.log")) == (
        "AccessDenied"
    )

    # the shared data sets (docs/pipelines.md's Fashion-MNIST): read and listed, never written
    admin.put_object(Bucket=BUCKET, Key="datasets/fashion-mnist/train-images-idx3-ubyte.gz", Body=b"images")
    shared = alice.get_object(Bucket=BUCKET, Key="datasets/fashion-mnist/train-images-idx3-ubyte.gz")
    assert shared["Body"].read() == b"images"
    assert alice.list_objects_v2(Bucket=BUCKET, Prefix="datasets/fashion-mnist/")["KeyCount"] == 1
    assert _denied(lambda: alice.put_object(Bucket=BUCKET, Key="datasets/fashion-mnist/x", Body=b"x")) == (
        "AccessDenied"
    )


def test_a_profile_reaches_nothing_outside_its_prefixes(store: Store) -> None:
    admin = store.client(ADMIN)
    for key in (
        f"users/{BOB}/data.npz",
        f"jobs/{BOB}/j2/output.log",
        f"users/{ALICE}x/data.npz",  # a user whose name only starts like alice's
        "porter/uploads/0000000000000000000000000000000a/users/x/uploads/a/b",  # porter's upload index
        "mailbox/cluster/to-agent/1.json",
    ):
        admin.put_object(Bucket=BUCKET, Key=key, Body=b"theirs")
    admin.put_object(Bucket="mlflow", Key="1/artifacts/model.pkl", Body=b"model")
    alice = store.client(store.keys[ALICE])
    for key in (
        f"users/{BOB}/data.npz",
        f"jobs/{BOB}/j2/output.log",
        f"users/{ALICE}x/data.npz",
        "porter/uploads/0000000000000000000000000000000a/users/x/uploads/a/b",
        "mailbox/cluster/to-agent/1.json",
    ):
        assert _denied(lambda key=key: alice.get_object(Bucket=BUCKET, Key=key)) == "AccessDenied", key
        assert (
            _denied(lambda key=key: alice.put_object(Bucket=BUCKET, Key=key, Body=b"x")) == "AccessDenied"
        ), key
        assert _denied(lambda key=key: alice.delete_object(Bucket=BUCKET, Key=key)) == "AccessDenied", key
    for prefix in (f"users/{BOB}/", "users/", "", "porter/"):
        assert _denied(lambda prefix=prefix: alice.list_objects_v2(Bucket=BUCKET, Prefix=prefix)) == (
            "AccessDenied"
        ), prefix
    assert _denied(lambda: alice.get_object(Bucket="mlflow", Key="1/artifacts/model.pkl")) == "AccessDenied"
    assert _denied(lambda: alice.create_bucket(Bucket="alices-own")) == "AccessDenied"
    # nothing of bob's was changed, and bob's own keys still reach his prefix
    bob = store.client(store.keys[BOB])
    assert bob.get_object(Bucket=BUCKET, Key=f"users/{BOB}/data.npz")["Body"].read() == b"theirs"
    assert _denied(lambda: bob.get_object(Bucket=BUCKET, Key=f"users/{ALICE}x/data.npz")) == "AccessDenied"
    # porter's identity is untouched by the profiles': it still reads everyone's objects
    porter = store.client(PORTER)
    assert porter.get_object(Bucket=BUCKET, Key=f"users/{BOB}/data.npz")["Body"].read() == b"theirs"
