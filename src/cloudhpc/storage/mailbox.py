"""The S3 mailbox between porter and an agent that cannot reach porter: key names and messages.

This replaces the original's shared pickled status objects, which porter and the submitter both
rewrote on timers (lost updates, arbitrary code on load). Here every key has exactly one writer,
objects are JSON and never rewritten, and readers keep a cursor instead of re-reading everything:

    mailbox/<cluster>/up/<20-digit ns>-<8 hex>.json   the agent's messages (reports, output, ...),
                                                      one object per batch; porter reads them in key
                                                      order and the agent deletes them once acked
    mailbox/<cluster>/down/<20-digit ns>.json         porter's snapshots of the cluster's desired
                                                      state, with `ack` = the last up key applied
    mailbox/<cluster>/porter-cursor.json              porter's own read position (porter-only)

Keys carry a zero-padded nanosecond stamp, so lexicographic order (what `list` returns within one
"directory", on every S3 server) is time order. Each writer stamps with a `KeyClock`, which never
goes back, and serialises its own writes, so a key is visible before any later key is written and
a reader's cursor never skips an object.

Every object is sealed with the cluster's mailbox key (`MailboxCodec`, `mailbox_seal.py`): signed
for its key, so that nobody without the key can add, alter, copy or move one, and with the jobs'
`env` values encrypted, so that they are not readable in the bucket.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
import time
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from cloudhpc.domain.jobs import NAME_PATTERN, Job
from cloudhpc.domain.reports import JobReport
from cloudhpc.storage.mailbox_seal import MailboxKey

__all__ = [
    "TIME_DIGITS",
    "AccountingMessage",
    "ArtifactsMessage",
    "HeartbeatMessage",
    "KeyClock",
    "MailboxCodec",
    "OutputMessage",
    "PorterCursor",
    "ReportMessage",
    "Snapshot",
    "UpBatch",
    "UpMessage",
    "cursor_key",
    "down_key",
    "down_prefix",
    "key_time_ns",
    "mailbox_prefix",
    "up_key",
    "up_prefix",
]

TIME_DIGITS = 20
"""Digits of the nanosecond stamp in a key: enough until the year 5138, so the width never changes."""

_NAME = re.compile(NAME_PATTERN)
_UP_NAME = re.compile(rf"^(\d{{{TIME_DIGITS}}})-([0-9a-f]{{8}})\.json$")
_DOWN_NAME = re.compile(rf"^(\d{{{TIME_DIGITS}}})\.json$")


def mailbox_prefix(cluster: str) -> str:
    if not _NAME.match(cluster) or cluster in (".", ".."):
        raise ValueError(f"cluster name {cluster!r} must match {NAME_PATTERN} and not be `.` or `..`")
    return f"mailbox/{cluster}/"


def up_prefix(cluster: str) -> str:
    return mailbox_prefix(cluster) + "up/"


def down_prefix(cluster: str) -> str:
    return mailbox_prefix(cluster) + "down/"


def cursor_key(cluster: str) -> str:
    return mailbox_prefix(cluster) + "porter-cursor.json"


def _stamp(ns: int) -> str:
    if not 0 < ns < 10**TIME_DIGITS:
        raise ValueError(f"key stamp {ns} is out of range")
    return f"{ns:0{TIME_DIGITS}d}"


def up_key(cluster: str, ns: int, nonce: str | None = None) -> str:
    """An agent message key. The nonce keeps two agents of one cluster (a misconfiguration, or an
    old process not yet dead) from overwriting each other in the same nanosecond."""
    nonce = nonce if nonce is not None else secrets.token_hex(4)
    if not re.fullmatch(r"[0-9a-f]{8}", nonce):
        raise ValueError(f"nonce {nonce!r} must be 8 lowercase hex digits")
    return f"{up_prefix(cluster)}{_stamp(ns)}-{nonce}.json"


def down_key(cluster: str, ns: int) -> str:
    return f"{down_prefix(cluster)}{_stamp(ns)}.json"


def key_time_ns(key: str) -> int | None:
    """The stamp of an up or down key; None for any other name (which readers skip)."""
    name = key.rpartition("/")[2]
    match = _UP_NAME.match(name) or _DOWN_NAME.match(name)
    return int(match.group(1)) if match else None


class KeyClock:
    """Nanosecond stamps that strictly increase, even when the wall clock steps back (NTP, a
    restart on another machine) or two calls fall in the same tick. `observe` raises the floor
    to stamps already in the bucket, so a restarted writer never writes behind its reader's
    cursor."""

    def __init__(self) -> None:
        self._last = 0

    @property
    def last(self) -> int:
        return self._last

    def observe(self, ns: int | None) -> None:
        if ns is not None:
            self._last = max(self._last, ns)

    def next(self) -> int:
        self._last = max(self._last + 1, time.time_ns())
        return self._last


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReportMessage(_Message):
    type: Literal["report"] = "report"
    report: JobReport


class OutputMessage(_Message):
    """Job output bytes at `offset`; porter stores them idempotently by offset."""

    type: Literal["output"] = "output"
    job_id: UUID
    offset: int = Field(ge=0)
    data_b64: str = Field(description="the bytes, base64 (standard alphabet, padded)")

    @field_validator("data_b64")
    @classmethod
    def _is_base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("data_b64 is not valid base64") from exc
        return value

    @classmethod
    def of(cls, job_id: UUID, offset: int, data: bytes) -> OutputMessage:
        return cls(job_id=job_id, offset=offset, data_b64=base64.b64encode(data).decode("ascii"))

    @property
    def data(self) -> bytes:
        return base64.b64decode(self.data_b64, validate=True)


class AccountingMessage(_Message):
    type: Literal["accounting"] = "accounting"
    job_id: UUID
    record: dict[str, Any]


class ArtifactsMessage(_Message):
    """Object-store keys the agent wrote for a job (porter records those under the job's prefix)."""

    type: Literal["artifacts"] = "artifacts"
    job_id: UUID
    keys: list[str] = Field(max_length=10_000)


class HeartbeatMessage(_Message):
    """The agent is alive. Mailbox agents make no other call that porter could notice."""

    type: Literal["heartbeat"] = "heartbeat"
    agent: str = Field(min_length=1, max_length=128)
    at: AwareDatetime


UpMessage = Annotated[
    ReportMessage | OutputMessage | AccountingMessage | ArtifactsMessage | HeartbeatMessage,
    Field(discriminator="type"),
]


class UpBatch(_Message):
    """One `up/` object: what the agent said, in order."""

    version: Literal[1] = 1
    agent: str = Field(min_length=1, max_length=128)
    messages: list[UpMessage] = Field(min_length=1, max_length=10_000)


class Snapshot(_Message):
    """One `down/` object: every active job of the cluster (pending and cancel requests included)
    and how far porter has read the agent's messages."""

    version: Literal[1] = 1
    cluster: str
    published_at: AwareDatetime
    jobs: list[Job]
    ack: str | None = Field(default=None, description="the last up key porter applied; older ones may go")
    unaccounted: list[Job] = Field(
        default_factory=list, description="recently ended jobs whose accounting never arrived"
    )
    seq_floor: int = Field(
        default=0, ge=0, description="the highest report seq porter applied, when published"
    )


class PorterCursor(_Message):
    """porter's private read position, so a restarted porter does not re-read the whole mailbox
    (re-reading would be harmless, only slow: reports carry seq numbers, output is by offset)."""

    version: Literal[1] = 1
    cursor: str | None = None
    claims: list[UUID] = Field(
        default_factory=list, description="pending jobs this mailbox has claimed for its agent"
    )


class MailboxCodec:
    """One cluster's mailbox objects as bytes and back: `dump_*` seals a model for the key it is
    stored at, `load_*` opens what was read at a key. A load raises `mailbox_seal.Refused` for an
    object nobody holding the key wrote for that key (not to be acted on), and `ValueError`
    (pydantic's `ValidationError` among them) for a signed one that does not parse (a bug or a
    version skew between porter and the agent).

    In a snapshot, each job's `env` values are encrypted (AES-GCM, bound to the cluster, the job
    and the variable's name); the names stay readable, as does the rest of the spec.
    """

    def __init__(self, cluster: str, key: MailboxKey) -> None:
        mailbox_prefix(cluster)  # validates the name
        self.cluster = cluster
        self.key = key

    def __repr__(self) -> str:
        return f"MailboxCodec({self.cluster!r}, {self.key!r})"

    def dump_batch(self, object_key: str, batch: UpBatch) -> bytes:
        return self.key.seal(object_key, batch.model_dump_json().encode())

    def load_batch(self, object_key: str, data: bytes) -> UpBatch:
        return UpBatch.model_validate_json(self.key.open(object_key, data))

    def dump_cursor(self, object_key: str, cursor: PorterCursor) -> bytes:
        return self.key.seal(object_key, cursor.model_dump_json().encode())

    def load_cursor(self, object_key: str, data: bytes) -> PorterCursor:
        return PorterCursor.model_validate_json(self.key.open(object_key, data))

    def dump_snapshot(self, object_key: str, snapshot: Snapshot) -> bytes:
        doc = snapshot.model_dump(mode="json", by_alias=True)
        for job in _job_docs(doc):
            env = job["spec"]["env"]
            job["spec"]["env"] = {
                name: self.key.encrypt(value, self._env_context(job, name)) for name, value in env.items()
            }
        return self.key.seal(object_key, json.dumps(doc, separators=(",", ":")).encode())

    def load_snapshot(self, object_key: str, data: bytes) -> Snapshot:
        doc = json.loads(self.key.open(object_key, data))
        for job in _job_docs(doc):
            env = job["spec"]["env"]
            if not isinstance(env, dict):
                raise ValueError(f"{object_key}: a job's env is not an object")
            job["spec"]["env"] = {
                name: self.key.decrypt(str(token), self._env_context(job, name), key=object_key)
                for name, token in env.items()
            }
        return Snapshot.model_validate(doc)

    def _env_context(self, job: dict[str, Any], name: str) -> str:
        return f"{self.cluster}/{job.get('id')}/env/{name}"


def _job_docs(doc: Any) -> list[dict[str, Any]]:
    """The jobs of a snapshot document that have an `env` to seal or open (others are left to
    validation, which refuses them)."""
    if not isinstance(doc, dict):
        raise ValueError("a snapshot is a JSON object")
    jobs = [*(doc.get("jobs") or []), *(doc.get("unaccounted") or [])]
    return [
        job
        for job in jobs
        if isinstance(job, dict) and isinstance(job.get("spec"), dict) and "env" in job["spec"]
    ]
