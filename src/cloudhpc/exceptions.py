"""The one exception hierarchy of cloudhpc.

Every error that crosses a module boundary is one of these, so callers (the CLI, porter's error
table, the agent's retry logic) can decide by type alone: retry, surface to the user, or stop.

    CloudHPCError
    ├── ConfigError
    │   └── BridgesNotConfigured
    ├── InvalidTransition
    ├── HttpProblem
    │   └── JobFileError
    ├── ChannelError
    ├── SSHError
    │   ├── SSHConnectError
    │   │   └── HostKeyError
    │   ├── CommandTimeout
    │   ├── OutputTooLarge
    │   └── RemoteFileError
    ├── SchedulerError
    │   ├── SchedulerCommandError
    │   │   ├── SubmitRejected
    │   │   │   └── QuotaExceeded
    │   │   └── AccountingUnavailable
    │   ├── JobNotFound
    │   └── ParseError
    ├── StagingError
    │   └── EnvironmentBuildError
    ├── StoreError
    │   ├── BridgePortsExhausted
    │   ├── IdempotencyConflict
    │   └── UnknownJob
    ├── StorageError
    │   └── ObjectNotFound
    ├── KubernetesError
    ├── PipelineError
    │   ├── JobFailed
    │   ├── QualityGateFailed
    │   └── StepTerminated
    ├── ExecutorError
    │   ├── PythonVersionMismatch
    │   ├── RemoteCallError
    │   └── NoResult
    └── RaySessionError
        ├── SessionNotActive
        └── RayJobsError

docs/exceptions.md says what each one means to a user, its HTTP status and what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AccountingUnavailable",
    "BridgePortsExhausted",
    "BridgesNotConfigured",
    "ChannelError",
    "CloudHPCError",
    "CommandTimeout",
    "ConfigError",
    "EnvironmentBuildError",
    "ExecutorError",
    "HostKeyError",
    "HttpProblem",
    "IdempotencyConflict",
    "InvalidTransition",
    "JobFailed",
    "JobFileError",
    "JobNotFound",
    "KubernetesError",
    "NoResult",
    "ObjectNotFound",
    "OutputTooLarge",
    "ParseError",
    "PipelineError",
    "PythonVersionMismatch",
    "QualityGateFailed",
    "QuotaExceeded",
    "RayJobsError",
    "RaySessionError",
    "RemoteCallError",
    "RemoteFileError",
    "SSHConnectError",
    "SSHError",
    "SchedulerCommandError",
    "SchedulerError",
    "SessionNotActive",
    "StagingError",
    "StepTerminated",
    "StorageError",
    "StoreError",
    "SubmitRejected",
    "UnknownJob",
]


class CloudHPCError(Exception):
    """Root of every error cloudhpc raises on purpose."""


class ConfigError(CloudHPCError):
    """The configuration is invalid; the message names the key and what is expected."""


class BridgesNotConfigured(ConfigError):
    """The job exposes or imports ports, and this porter has no bridge VM configured.

    A configuration gap of the server, but the caller's request is what cannot be served: porter
    answers 422 naming the `ray` field."""


class InvalidTransition(CloudHPCError):
    """A job state change that the state machine forbids (for example, leaving a terminal state)."""


class HttpProblem(CloudHPCError):
    """An answer porter decides to give, raised by its routes and dependencies (unknown job, bad
    token...). It carries its own status and code; the SDK sees it as `cloudhpc.client.ApiError`."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class JobFileError(HttpProblem):
    """A files query the cluster side refused or could not answer: a path that resolves outside the
    job directory (403), a missing file (404), not a file or directory (422). Raised by
    `hpc/job_files.py`; the agent sends status, code and message back, porter answers them."""


class ChannelError(CloudHPCError):
    """The agent could not reach porter (HTTP or its S3 mailbox), or porter refused the call; the
    agent retries later."""


class SSHError(CloudHPCError):
    """Anything that went wrong on the SSH transport, as opposed to the remote command itself."""


class SSHConnectError(SSHError):
    """The connection could not be opened or was lost; callers may retry."""


class HostKeyError(SSHConnectError):
    """The server's host key is unknown or changed. Never retried: a person must look."""


class CommandTimeout(SSHError):
    """A remote command did not finish within its time budget."""


class OutputTooLarge(SSHError):
    """A remote command printed more than the configured cap."""


class RemoteFileError(SSHError):
    """An SFTP operation failed (missing file, permission denied, path outside the job directory)."""


class SchedulerError(CloudHPCError):
    """The scheduler (SLURM or the local backend) refused or failed an operation."""


class SchedulerCommandError(SchedulerError):
    """A scheduler command exited non-zero; carries the evidence so the message can show it."""

    def __init__(self, message: str, *, argv: Sequence[str], exit_status: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.exit_status = exit_status
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "(no stderr)"
        super().__init__(f"{message}: `{' '.join(self.argv[:2])} ...` exited {exit_status}: {detail}")


class SubmitRejected(SchedulerCommandError):
    """sbatch refused the job (bad partition, account, resources...)."""


class QuotaExceeded(SubmitRejected):
    """sbatch refused the job because of a QOS or association limit."""


class AccountingUnavailable(SchedulerCommandError):
    """sacct could not answer. This means "unknown, retry later", never "the job failed"."""


class JobNotFound(SchedulerError):
    """The scheduler has no job with this id."""


class ParseError(SchedulerError):
    """Scheduler output did not have the expected shape; the message quotes what was seen."""


class StagingError(CloudHPCError):
    """The agent could not prepare a job for the cluster (its files, its script, the bridge key):
    the job fails with the message as its reason, since trying again would fail the same way."""


class EnvironmentBuildError(StagingError):
    """Building a cached Python environment on the cluster failed; the message holds the log tail."""


class StoreError(CloudHPCError):
    """The job store could not complete an operation."""


class BridgePortsExhausted(StoreError):
    """Every port of `porter.bridge.port_range` is held by a live job: try again when one ends."""


class IdempotencyConflict(StoreError):
    """An idempotency key was reused by the same owner with a different job spec."""


class UnknownJob(StoreError):
    """The store has no job with this id (it never existed, or retention removed it)."""


class StorageError(CloudHPCError):
    """The object store (S3 or a local directory) refused or failed an operation, or a key was unsafe."""


class ObjectNotFound(StorageError):
    """No object has this key (never written, deleted, or removed by retention)."""


class KubernetesError(CloudHPCError):
    """The Kubernetes API server refused a call or could not be reached (bridge publishing)."""


class PipelineError(CloudHPCError):
    """A pipeline step must fail: a Kubeflow step exits non-zero on it, so a run never passes silently."""


class JobFailed(PipelineError):
    """A job followed to its end did not complete; carries the job so the step can report its state."""

    def __init__(self, message: str, *, job_id: str = "", state: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.reason = reason


class QualityGateFailed(PipelineError):
    """A model's held-out test metrics are below the thresholds: it is not registered."""


class StepTerminated(PipelineError):
    """The step's process received SIGTERM (its Kubeflow run was terminated, its pod evicted); the
    job it followed has been cancelled (`pipelines.runner.stop_job_on_sigterm`)."""


class ExecutorError(CloudHPCError):
    """A Python function run on a cluster (`cloudhpc.Executor`) gave no usable result."""


class PythonVersionMismatch(ExecutorError):
    """The job's Python is not the caller's minor version: functions pickled by one minor version do
    not load in another, so the call is refused before anything is submitted."""


class RemoteCallError(ExecutorError):
    """The remote traceback of a function that raised on the cluster. Raised itself when the remote
    exception cannot be rebuilt here (its class is not importable, it could not be pickled); else it
    is the rebuilt exception's `__cause__`, so Python prints the remote traceback under it."""

    def __init__(self, message: str, *, type_name: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.args[0]}\n\n{self.remote_traceback}" if self.remote_traceback else str(self.args[0])


class NoResult(ExecutorError):
    """A function's job ended without an outcome: it failed before the function ran (the environment
    could not be built, the job was refused) or was killed (time limit, memory, node failure)."""

    def __init__(self, message: str, *, job_id: str = "", state: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.reason = reason


class RaySessionError(CloudHPCError):
    """A ray-job naming a warm session (`ray.session`) could not run on it: the agent fails the job
    with the message as its `reason` (`submitter/ray_sessions.py`)."""


class SessionNotActive(RaySessionError):
    """The session a ray-job names does not exist, is not its owner's, or has ended (also: ended
    while the job ran on it, or does not expose the dashboard the agent submits through)."""


class RayJobsError(RaySessionError):
    """The session's Ray answered the agent with an error (`status`, Ray's HTTP status), or could
    not be reached through its bridge (`status` 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
