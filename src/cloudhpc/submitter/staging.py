"""Staging: what the agent hands to sbatch for one job.

`Stager.prepare` applies the cluster's defaults, builds or reuses the job's Python environment,
fetches the job's files given as object-store URLs, and renders the batch script (for a Ray job, the
Ray script, the bridge VM's known_hosts from this side's porter.bridge and the job's bridge
credentials: a key and certificate of its own signed with porter.bridge.ca_key_file, or the shared
porter.bridge.key_file where the site has no CA). Anything the job
cannot be staged for is a `StagingError`, which fails the job with its message.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

from cloudhpc.bridges.certificates import BridgeCA, job_lifetime
from cloudhpc.config import BridgeConfig, ClusterConfig
from cloudhpc.domain.jobs import Job, JobKind, Resources, is_object_url, parse_slurm_time
from cloudhpc.exceptions import ConfigError, StagingError, StorageError
from cloudhpc.hpc.backend import JobPaths, JobSubmission
from cloudhpc.hpc.envs import EnvironmentCache
from cloudhpc.hpc.jobscript import (
    environment_file,
    python_call_files,
    render_batch_script,
    run_python_call_lines,
)
from cloudhpc.ray.script import RayJobScript, TunnelAccess, render_ray_job

__all__ = ["Stager"]


@dataclasses.dataclass(frozen=True)
class Stager:
    config: ClusterConfig
    """The cluster's entry: its defaults and prelude."""
    _: dataclasses.KW_ONLY
    envs: EnvironmentCache | None
    workdir: str
    bridge: BridgeConfig | None
    """How jobs reach the bridge VM (this side's copy of porter.bridge: its key and known_hosts)."""
    fetch_file: Callable[[str, Job], bytes] | None
    """Reads a `files` value given as an object-store URL for a job (blocking; run in a thread):
    `FileFetcher.fetch_for` (the agent's own store) or `PorterFileFetcher.fetch_for` (through porter)."""

    async def prepare(self, job: Job) -> JobSubmission:
        """What sbatch receives for `job`: its batch script (the cluster's defaults applied, its Python
        environment built or reused), its files (object-store URLs fetched) and, for a Ray job, the Ray
        script and the bridge key."""
        spec = job.spec
        # The cluster's defaults are applied here and nowhere else: backends take complete resources.
        resources = self._resources(job)
        activation: list[str] = []
        if self.envs is not None and not spec.environment.is_empty:
            activation = await self.envs.ensure(spec.environment)
        paths = JobPaths(self.workdir, job.id)
        files = {path: await self._file_content(content, job) for path, content in spec.files.items()}
        secret_env = environment_file(spec.env)  # sourced by the script, never in it (hpc/jobscript.py)
        files |= secret_env
        private = dict.fromkeys(secret_env, 0o600)
        if spec.kind == JobKind.PYTHON:
            script = render_batch_script(
                job_id=job.id,
                spec=spec,
                paths=paths,
                prelude=self.config.prelude,
                activation=activation,
                body=run_python_call_lines(paths, spec),
            )
            return JobSubmission(
                job_id=job.id,
                spec=spec,
                resources=resources,
                batch_script=script,
                files=files | python_call_files(),
                modes=private,
            )
        if spec.kind != JobKind.BATCH:
            ray = self._render_ray(job, paths, resources)
            script = render_batch_script(
                job_id=job.id,
                spec=spec,
                paths=paths,
                prelude=self.config.prelude,
                activation=activation,
                body=ray.body,
            )
            return JobSubmission(
                job_id=job.id,
                spec=spec,
                resources=ray.resources,
                batch_script=script,
                files=files | ray.files,
                modes=ray.modes | private,
            )
        script = render_batch_script(
            job_id=job.id, spec=spec, paths=paths, prelude=self.config.prelude, activation=activation
        )
        files[".cloudhpc/script"] = (spec.script or "").encode()
        return JobSubmission(
            job_id=job.id, spec=spec, resources=resources, batch_script=script, files=files, modes=private
        )

    def _resources(self, job: Job) -> Resources:
        """The job's resources with the cluster's defaults applied, within the cluster's `limits`
        (porter refuses a job over them with a 422 when it has this cluster's configuration; a porter
        that has not leaves it to this check, which fails the job with the reason)."""
        resources = job.spec.resources.with_defaults(self.config.defaults.as_resources())
        problems = self.config.limits.problems(resources)
        if problems:
            raise StagingError("; ".join(f"{field}: {message}" for field, message in problems))
        return resources

    async def _file_content(self, value: str, job: Job) -> bytes:
        """Inline content as is; an object-store URL (`s3://`, `file://`) fetched from the store, when
        it names one of the job owner's own objects (`submitter/files.py`, `submitter/porter_objects.py`)."""
        if not is_object_url(value):
            return value.encode()
        if self.fetch_file is None:
            raise StagingError(f"{value}: this agent cannot fetch files from an object store")
        try:
            return await asyncio.to_thread(self.fetch_file, value, job)
        except StorageError as exc:
            raise StagingError(str(exc)) from exc

    def _render_ray(self, job: Job, paths: JobPaths, resources: Resources) -> RayJobScript:
        """A Ray job's script and files; the bridge key and known_hosts come from this side's config."""
        assert job.spec.ray is not None  # enforced by JobSpec for the Ray kinds
        tunnel = None
        if job.spec.ray.expose or job.spec.ray.import_:
            tunnel = self.tunnel_access(job)
        try:
            return render_ray_job(
                job_id=job.id,
                spec=job.spec,
                paths=paths,
                resources=resources,
                bridges=list(job.bridges),
                tunnel=tunnel,
            )
        except ValueError as exc:
            raise StagingError(str(exc)) from exc

    def tunnel_access(self, job: Job) -> TunnelAccess:
        """How `job` reaches the bridge VM: this side's porter.bridge, checked against porter's
        allocation, and the job's credentials (`_credentials`)."""
        bridge = self.bridge
        if bridge is None:
            raise StagingError(
                "this job has bridges (ray.expose/ray.import) but the submitter has no porter.bridge "
                "section: give it the bridge VM (host, ssh_user, key_file, known_hosts, bind_address) as "
                "porter has it (docs/bridge-vm.md)"
            )
        published = {b.bridge_host for b in job.bridges}
        if published and published != {bridge.public_host}:
            raise StagingError(
                f"porter.bridge.bind_address: porter publishes this job's bridges at "
                f"{', '.join(sorted(published))}, but this submitter's porter.bridge would bind them at "
                f"{bridge.public_host}; give both sides the same porter.bridge (docs/bridge-vm.md)"
            )
        low, high = bridge.port_range
        outside = sorted(b.bridge_port for b in job.bridges if not low <= b.bridge_port <= high)
        if outside:
            # the bridge key's permitlisten (`cloudhpc bridge authorized-key`, from this side's
            # configuration) would refuse the job's -R on them
            raise StagingError(
                f"porter.bridge.port_range: porter gave this job bridge port(s) {outside}, outside this "
                f"submitter's [{low}, {high}]; give both sides the same porter.bridge (docs/bridge-vm.md)"
            )
        try:
            credential_file, known_hosts_file = bridge.job_files()
        except ConfigError as exc:
            raise StagingError(str(exc)) from exc
        try:
            known_hosts = known_hosts_file.read_bytes()
        except OSError as exc:
            raise StagingError(
                f"cannot read porter.bridge.known_hosts: {exc.strerror or exc} ({exc.filename})"
            ) from exc
        key, certificate = self._credentials(job, bridge, credential_file)
        return TunnelAccess(
            host=bridge.host,
            ssh_port=bridge.ssh_port,
            ssh_user=bridge.ssh_user,
            bind_address=bridge.bind_address,
            key=key,
            known_hosts=known_hosts,
            certificate=certificate,
        )

    def _credentials(
        self, job: Job, bridge: BridgeConfig, credential_file: Path
    ) -> tuple[bytes, bytes | None]:
        """(private key, certificate): with a CA, a fresh key whose certificate allows the job's own
        bridge ports only, until its time limit (plus its wait in the queue) has passed; else the
        shared key and no certificate. The CA key is read for each job, so replacing the file takes
        effect without a restart."""
        if not bridge.uses_ca:
            try:
                return credential_file.read_bytes(), None
            except OSError as exc:
                raise StagingError(
                    f"cannot read porter.bridge.key_file: {exc.strerror or exc} ({exc.filename})"
                ) from exc
        try:
            ca = BridgeCA.from_file(credential_file)
        except ConfigError as exc:
            raise StagingError(str(exc)) from exc
        time_limit = self._resources(job).time
        lifetime = job_lifetime(
            parse_slurm_time(time_limit) if time_limit else None, bridge.certificate_queue_time
        )
        try:
            credentials = ca.issue(str(job.id), [b.bridge_port for b in job.bridges], lifetime)
        except ValueError as exc:  # a key id the bridge sshd could not read (too many ports)
            raise StagingError(f"ray.expose: no bridge certificate for this job: {exc}") from exc
        return credentials.private_key, credentials.certificate
