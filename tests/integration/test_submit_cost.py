"""What one `POST /jobs` costs the store: the job's own transaction and nothing else on the common
path (#12: POST on PostgreSQL fell from 270/s to 169/s; every extra read is a worker-thread hop
and, on PostgreSQL, a round trip)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import event

from cloudhpc.config import Settings
from cloudhpc.porter.app import create_app
from cloudhpc.store import Store

JOB = {"name": "cost", "cluster": "hpc", "script": "echo hello\n", "resources": {"time": "00:01:00"}}


def test_a_submission_to_a_cluster_the_rules_allow_reads_nothing_for_access(
    store: Store, tmp_path: Path
) -> None:
    """alice may use `hpc` by `porter.access`: her POSTs write the job and its first transition, and
    read neither the agents seen nor the clusters' owners. bob, neither listed nor an owner, still
    gets the 404 (the full check)."""
    alice = store.create_token("alice", "user")
    bob = store.create_token("bob", "user")
    settings = Settings.model_validate(
        {
            "porter": {
                "object_store": f"file://{tmp_path / 'objects'}",
                "access": {"clusters": {"hpc": {"users": ["alice"]}}},
            },
            "clusters": {
                "hpc": {
                    "backend": "slurm",
                    "ssh": {"host": "127.0.0.1", "user": "nobody", "key_file": "/none"},
                }
            },
        }
    )
    with TestClient(create_app(settings, store=store)) as client:
        headers = {"Authorization": f"Bearer {alice}"}
        assert client.post("/api/v1/jobs", json=JOB, headers=headers).status_code == 201  # token cached
        statements: list[str] = []
        event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        for _ in range(3):
            assert client.post("/api/v1/jobs", json=JOB, headers=headers).status_code == 201
        tables = [s.split()[2] for s in statements if s.lstrip().upper().startswith("INSERT")]
        reads = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "token" not in s]
        assert tables == ["jobs", "job_transitions"] * 3
        assert reads == []
        denied = client.post("/api/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {bob}"})
        assert denied.status_code == 404, denied.text
