"""Settings: one typed model, loaded from `cloudhpc.yaml` and overridable by environment variables.

The file is named by `--config` or `CLOUDHPC_CONFIG`; every key can be overridden by an
environment variable spelled `CLOUDHPC_<SECTION>__<KEY>` (for example `CLOUDHPC_PORTER__LISTEN`).
With no file at all, the embedded default applies: SQLite, a local object store and one `local`
cluster, so that a new user can run a job before configuring anything.
"""

from __future__ import annotations

import os
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from cloudhpc.config_checks import is_ip_address, is_loopback, parse_listen, pip_location, publishable
from cloudhpc.domain.billing import BillingConfig
from cloudhpc.domain.jobs import ClusterLimits, Name, Resources
from cloudhpc.exceptions import ConfigError

__all__ = [
    "AccessConfig",
    "BridgeConfig",
    "BridgeKubernetesConfig",
    "ClusterAccess",
    "ClusterConfig",
    "ClusterDefaults",
    "MetricsConfig",
    "PipConfig",
    "PollConfig",
    "PorterConfig",
    "SSHConfig",
    "Settings",
    "SubmitterConfig",
    "check_job_bridge",
    "is_ip_address",
    "is_loopback",
    "load_settings",
    "parse_listen",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _host_port(value: str) -> str:
    """A listen address is checked at load time, so a typo is reported with its key, not at bind."""
    parse_listen(value)
    return value


class SSHConfig(_Section):
    host: str = Field(description="login node address")
    port: int = Field(default=22, ge=1, le=65535, description="sshd port")
    user: str = Field(description="account name on the cluster")
    key_file: Path | None = Field(
        default=None,
        description="private key used to log in; it never leaves this machine. Unset: sign with the "
        "keys of an ssh-agent (agent_socket)",
    )
    agent_socket: Path | None = Field(
        default=None,
        description="ssh-agent socket used when key_file is unset (default: $SSH_AUTH_SOCK)",
    )
    passphrase_file: Path | None = Field(
        default=None,
        description="file holding the key's passphrase (or set CLOUDHPC_SSH_PASSPHRASE); never logged",
    )
    passphrase: SecretStr | None = Field(
        default=None,
        description="the key's passphrase inline (prefer passphrase_file); never logged or shown",
    )
    known_hosts: Path | None = Field(
        default=None,
        description="known_hosts file the host key is checked against (default ~/.ssh/known_hosts)",
    )
    trust_on_first_use: bool = Field(
        default=False,
        description="accept and record an unknown host key once; off by default because it defeats pinning",
    )
    max_channels: int = Field(
        default=8,
        ge=1,
        le=64,
        description="concurrent channels on the one connection; keep below MaxSessions",
    )
    keepalive_interval: float = Field(default=15.0, gt=0, description="seconds between SSH keepalives")
    connect_timeout: float = Field(default=20.0, gt=0, description="seconds allowed for connect + auth")
    command_timeout: float = Field(
        default=120.0, gt=0, description="default seconds allowed per remote command"
    )

    @model_validator(mode="after")
    def _timeouts(self) -> Self:
        if self.keepalive_interval >= self.command_timeout:
            raise ValueError("ssh.keepalive_interval must be shorter than ssh.command_timeout")
        return self


class ClusterDefaults(_Section):
    partition: Name | None = Field(default=None, description="partition used when a job names none")
    account: Name | None = Field(default=None, description="billing account used when a job names none")
    time: str | None = Field(default="00:10:00", description="time limit used when a job names none")
    qos: Name | None = Field(default=None, description="quality of service used when a job names none")

    def as_resources(self) -> Resources:
        return Resources(partition=self.partition, account=self.account, time=self.time, qos=self.qos)


class PollConfig(_Section):
    fast_interval: float = Field(default=1.0, gt=0, description="seconds between polls while jobs change")
    slow_interval: float = Field(
        default=30.0, gt=0, description="longest pause between polls when nothing changes"
    )
    max_commands_per_minute: int = Field(
        default=60,
        ge=1,
        description="budget of the status polls' squeue/sacct calls per minute (sites rate-limit slurmctld RPCs); submissions, cancels and end-of-job accounting are outside it",
    )

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.fast_interval > self.slow_interval:
            raise ValueError("poll.fast_interval must not exceed poll.slow_interval")
        return self


class PipConfig(_Section):
    """Where pip takes the packages of a cluster's environments from: the operator's choice, per
    cluster. A job's spec names packages only; these become pip's options in the build, and are part
    of every environment's hash (a different source can give a different build)."""

    index_url: str | None = Field(
        default=None,
        description="pip's --index-url: the package index used instead of PyPI (a site mirror, e.g. "
        "https://pypi.example.org/simple); credentials in the URL are not part of the hash",
    )
    extra_index_urls: list[str] = Field(
        default=[], description="pip's --extra-index-url, one each: indexes searched besides index_url"
    )
    find_links: list[str] = Field(
        default=[],
        description="pip's --find-links, one each: a directory of wheels and sdists on the cluster "
        "(absolute path or ~/...) or a URL of a page linking to them",
    )
    no_index: bool = Field(
        default=False, description="pip's --no-index: no index at all, only find_links (an offline site)"
    )

    @field_validator("index_url")
    @classmethod
    def _index_url(cls, value: str | None) -> str | None:
        return None if value is None else pip_location(value, paths=False)

    @field_validator("extra_index_urls")
    @classmethod
    def _extra_index_urls(cls, values: list[str]) -> list[str]:
        return [pip_location(v, paths=False) for v in values]

    @field_validator("find_links")
    @classmethod
    def _find_links(cls, values: list[str]) -> list[str]:
        return [pip_location(v, paths=True) for v in values]

    @model_validator(mode="after")
    def _offline(self) -> Self:
        if self.no_index and (self.index_url or self.extra_index_urls):
            raise ValueError(
                "pip.no_index is set: index_url and extra_index_urls would be ignored; drop one or the other"
            )
        if self.no_index and not self.find_links:
            raise ValueError(
                "pip.no_index needs find_links: with neither an index nor find_links nothing can be installed"
            )
        return self

    @property
    def is_default(self) -> bool:
        """Nothing set: pip's own defaults (PyPI, or the login node's pip configuration)."""
        return self == PipConfig()


class OutputsConfig(_Section):
    max_bytes: int = Field(
        default=1 << 30,
        ge=0,
        description="bytes of a job's `outputs` files collected in all when it ends; the files over it are "
        "left out and named in its outputs.json artifact",
    )
    max_files: int = Field(
        default=1000,
        ge=0,
        le=100_000,
        description="how many `outputs` files of one job are collected at most",
    )


class ClusterConfig(_Section):
    backend: Literal["slurm", "local"] = Field(description="`slurm` over SSH, or `local` processes")
    ssh: SSHConfig | None = Field(default=None, description="how to reach the login node (slurm backend)")
    workdir: str = Field(default="~/.cloudhpc", description="cloudhpc's directory on the cluster")
    prelude: str = Field(
        default="",
        description="shell lines run before SLURM commands and in jobs, e.g. `source /appl/profile/x.sh`",
    )
    defaults: ClusterDefaults = Field(default_factory=ClusterDefaults)
    limits: ClusterLimits = Field(
        default_factory=ClusterLimits,
        description="what jobs may ask for (max_time, max_nodes, per partition, allowed partitions and "
        "qos), checked before submission: a job over them is refused (422), not sent to sbatch",
    )
    billing: BillingConfig | None = Field(
        default=None,
        description="the site's billing units and their rates per partition (docs/hpc-site.md, CSC's BU as "
        "the example): the cost in job estimates, and the units billed after a job's end",
    )
    poll: PollConfig = Field(default_factory=PollConfig)
    pip: PipConfig = Field(
        default_factory=PipConfig,
        description="where pip takes the packages of this cluster's environments from (docs/hpc-site.md)",
    )
    outputs: OutputsConfig = Field(
        default_factory=OutputsConfig,
        description="bounds on the files of a job's `outputs` collected into the object store at its end",
    )

    @model_validator(mode="after")
    def _ssh_for_slurm(self) -> Self:
        if self.backend == "slurm" and self.ssh is None:
            raise ValueError("a cluster with backend `slurm` needs an `ssh` section")
        return self

    @model_validator(mode="after")
    def _billed_partitions_allowed(self) -> Self:
        """Rates for a partition jobs may not use are a typo, not a setting."""
        if self.billing is not None and self.limits.partitions:
            stray = sorted(set(self.billing.partitions) - set(self.limits.partitions))
            if stray:
                raise ValueError(
                    f"billing.partitions: {', '.join(stray)} not among limits.partitions "
                    f"({', '.join(self.limits.partitions)}), the only partitions jobs may use"
                )
        return self


class BridgeKubernetesConfig(_Section):
    enabled: bool = Field(
        default=False,
        description="publish each ready bridge as a selector-less Service + EndpointSlice (needs the "
        "`kubernetes` extra and in-cluster or kubeconfig credentials)",
    )
    namespace: str = Field(
        default="cloudhpc",
        pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
        description="namespace of the Services; porter creates objects in it and never deletes it",
    )


class BridgeConfig(_Section):
    """The bridge VM: the sshd that jobs reach with `ssh -R`/`-L`. porter allocates its ports; the
    submitter stages `known_hosts` and the job's credentials into each job that has bridges: a key
    and certificate of its own signed with `ca_key_file` (allowed to listen on its own ports only),
    or, where the bridge sshd cannot be configured for that, the shared `key_file` (weaker: it may
    listen on every port of the range, other jobs' too; docs/security.md)."""

    host: str = Field(description="bridge VM address the jobs' ssh connects to (as seen from the HPC side)")
    ssh_user: str = Field(description="account on the bridge VM the jobs' tunnels log into")
    ssh_port: int = Field(default=22, ge=1, le=65535, description="sshd port of the bridge VM")
    ca_key_file: Path | None = Field(
        default=None,
        description="bridge CA private key (OpenSSH, no passphrase, mode 0600): signs each job's own key "
        "for its own bridge ports, valid until its time limit ends; the bridge sshd trusts it through the "
        "lines `cloudhpc bridge sshd-config` prints. Where jobs are staged (the submitter, `serve all`) "
        "this or key_file is required; with both, this one is used. Never staged into a job",
    )
    certificate_queue_time: int = Field(
        default=86400,
        ge=0,
        le=30 * 86400,
        description="seconds a job's certificate allows for the job's wait in the SLURM queue, on top of "
        "its time limit (a job that starts later finds its bridges refused)",
    )
    key_file: Path | None = Field(
        default=None,
        description="shared private key (no passphrase) for sites whose bridge sshd cannot trust "
        "ca_key_file: weaker, since every job holding it may listen on every port of the range; "
        "restricted by the line `cloudhpc bridge authorized-key` prints; staged 0600 into each job and "
        "deleted at its end. porter alone never reads it",
    )
    known_hosts: Path | None = Field(
        default=None,
        description="known_hosts file holding the bridge VM's host key (pinned: the job's ssh never "
        "accepts an unknown key); required where ca_key_file or key_file is",
    )
    bind_address: str = Field(
        default="127.0.0.1",
        description="address sshd binds each forwarded port to (needs `GatewayPorts clientspecified` "
        "unless loopback); also where porter and cloud clients reach the bridges, unless it is a "
        "wildcard (0.0.0.0, ::), then `host` is used",
    )
    port_range: tuple[int, int] = Field(
        default=(19500, 19599),
        description="first and last port on the bridge VM handed out to bridges (both included)",
    )
    kubernetes: BridgeKubernetesConfig = Field(default_factory=BridgeKubernetesConfig)

    @model_validator(mode="after")
    def _range(self) -> Self:
        low, high = self.port_range
        if not 1024 <= low <= high <= 65535:
            raise ValueError("porter.bridge.port_range must be [low, high] with 1024 <= low <= high <= 65535")
        return self

    @model_validator(mode="after")
    def _publishable(self) -> Self:
        """With Kubernetes publishing, `public_host` must be an IP address pods reach (`publishable`)."""
        if not self.kubernetes.enabled:
            return self
        publishable(self.bind_address, self.public_host)
        return self

    def missing_for_jobs(self) -> list[str]:
        """The keys a side that stages jobs (the submitter) needs and this section lacks."""
        missing = [] if self.ca_key_file or self.key_file else ["porter.bridge.ca_key_file (or key_file)"]
        return missing + (["porter.bridge.known_hosts"] if self.known_hosts is None else [])

    def job_files(self) -> tuple[Path, Path]:
        """(ca_key_file, or else key_file; known_hosts), `~` expanded, for the sides that give jobs
        their credentials (the submitter, `cloudhpc bridge`, `cloudhpc doctor`); `ConfigError`
        naming the missing key(s). Which of the two the first is: `uses_ca`."""
        missing = self.missing_for_jobs()
        credential = self.ca_key_file or self.key_file
        if missing or credential is None or self.known_hosts is None:
            raise ConfigError(
                f"{' and '.join(missing)} not set: the side that stages jobs with bridges (the "
                "submitter) needs the bridge CA (or shared key) and the bridge VM's pinned host key "
                "(docs/bridge-vm.md)"
            )
        return credential.expanduser(), self.known_hosts.expanduser()

    @property
    def uses_ca(self) -> bool:
        """Jobs get certificates of their own (`ca_key_file`), not the shared `key_file`."""
        return self.ca_key_file is not None

    @property
    def public_host(self) -> str:
        """Where cloud-side clients (and porter's probes) reach a bridge port."""
        if self.bind_address in ("", "*", "0.0.0.0", "::", "[::]"):  # noqa: S104 (a comparison)
            return self.host
        return self.bind_address


class ClusterAccess(_Section):
    """Who besides the cluster's owner may use one cluster (see AccessConfig)."""

    users: list[str] = Field(
        default=[], description='user names that may use the cluster; `"*"`: every user of porter'
    )
    groups: list[str] = Field(
        default=[], description="groups (porter.access.groups) whose members may use it"
    )


class AccessConfig(_Section):
    """Who may use which cluster. A cluster is one HPC identity (the key of the submitter serving it):
    its owners (the users of the agent tokens bound to it) and admins may always use it; others only
    when listed here. Everyone else gets 404 for the cluster (docs/security.md)."""

    groups: dict[str, list[str]] = Field(
        default={}, description="named groups of users: `{ml-team: [alice, bob]}`"
    )
    clusters: dict[Name, ClusterAccess] = Field(
        default={},
        description="per cluster, the users and groups that may use it besides its owners: "
        '`{mahti: {users: [carol], groups: [ml-team]}}`; `users: ["*"]` opens a cluster to everyone',
    )

    @model_validator(mode="after")
    def _groups_exist(self) -> Self:
        for name, rule in self.clusters.items():
            unknown = sorted(set(rule.groups) - set(self.groups))
            if unknown:
                raise ValueError(
                    f"porter.access.clusters.{name}.groups: {', '.join(unknown)} not defined in porter.access.groups"
                )
        return self


class MetricsConfig(_Section):
    """porter's `/metrics` (docs/monitoring.md): per-job series only for live jobs and the most
    recently ended ones, everything else as per-cluster and per-owner counts; a scrape token."""

    recent_window: float = Field(
        default=3600.0,
        gt=0,
        description="seconds after its end that a job keeps its per-job series on /metrics; live jobs "
        "always have them, older jobs are counted in cloudhpc_jobs and cloudhpc_jobs_by_owner only",
    )
    max_recent_jobs: int = Field(
        default=2000,
        ge=0,
        description="at most this many ended jobs (the latest ended) have per-job series, however many "
        "ended within recent_window, so a burst of short jobs cannot blow up a scrape",
    )
    token_file: Path | None = Field(
        default=None,
        description="file holding the bearer token Prometheus sends to scrape /metrics (a Kubernetes "
        "Secret; Prometheus reads the same file through `authorization.credentials_file`). Unset: only "
        "admin API tokens may scrape. /metrics without a valid token answers 401",
    )


class PorterConfig(_Section):
    listen: str = Field(default="127.0.0.1:5555", description="host:port of the HTTP API")
    database: str = Field(
        default="sqlite:///.cloudhpc/state.db", description="SQLAlchemy URL of the job store"
    )
    object_store: str = Field(
        default="file://.cloudhpc/objects", description="file:// directory or s3:// bucket"
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint for s3:// URLs when not AWS (e.g. https://a3s.fi for Allas); "
        "credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
    )
    s3_region: str | None = Field(
        default=None, description="S3 region for s3:// URLs (default: AWS_REGION, else us-east-1)"
    )
    mailbox: str | None = Field(
        default=None,
        description="s3:// URL of the mailbox shared with agents that cannot reach porter "
        "(default: the object_store)",
    )
    mailbox_clusters: list[Name] = Field(
        default=[],
        description="clusters whose agent uses the S3 mailbox (submitter.channel: s3); porter relays for them",
    )
    mailbox_key_dir: Path | None = Field(
        default=None,
        description="directory with the mailbox key of each of mailbox_clusters, as `<cluster>.key` (a "
        "Kubernetes Secret mounted as a volume); each file is the agent's submitter.mailbox_key_file. "
        "Required with mailbox_clusters; never put it in the bucket",
    )
    artifact_retention_days: float | None = Field(
        default=30.0,
        gt=0,
        description="days after a job ends before its artifacts (script, output, accounting) are deleted "
        "from the object store; null keeps them forever",
    )
    upload_retention_days: float | None = Field(
        default=7.0,
        gt=0,
        description="days after an upload (POST /api/v1/uploads) before porter deletes it if its owner did "
        "not (the SDK deletes a call's upload once its job ended; a process that died leaves it behind); "
        "a job not yet staged by then fails to fetch it. null keeps uploads until their owner deletes them",
    )
    artifact_sweep_interval: float = Field(
        default=3600.0,
        gt=0,
        description="seconds between two runs of the retention sweep (artifacts, uploads, finished agent "
        "queries)",
    )
    agent_query_wait: float = Field(
        default=15.0,
        gt=0,
        le=120,
        description="seconds a request that needs a cluster's agent (GET /jobs/{id}/files) waits for its "
        "answer before it answers 504",
    )
    artifact_url_expiry: int = Field(
        default=3600,
        ge=60,
        le=7 * 24 * 3600,
        description="seconds a presigned artifact download URL stays valid (S3 object stores)",
    )
    bridge: BridgeConfig | None = Field(
        default=None,
        description="the bridge VM for ray.expose/ray.import (see docs/bridge-vm.md); null: no bridges",
    )
    access: AccessConfig = Field(
        default_factory=AccessConfig,
        description="who may use which cluster besides its owners and admins (docs/security.md)",
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig,
        description="porter's /metrics: who may scrape it, and which jobs keep per-job series",
    )
    max_request_bytes: int = Field(
        default=8 << 20,
        ge=4 << 20,
        le=1 << 30,
        description="the largest request body porter reads (bytes); a larger one is answered 413 before "
        "it is read whole. At least 4 MiB, the size of the agent's output chunks",
    )

    _listen = field_validator("listen")(_host_port)

    @model_validator(mode="after")
    def _mailbox_url(self) -> Self:
        url = self.mailbox or self.object_store
        if self.mailbox_clusters and not url.startswith(("s3://", "file://")):
            raise ValueError("porter.mailbox must be an s3:// (or file://) URL")
        return self


class SubmitterConfig(_Section):
    porter_url: str = Field(default="http://127.0.0.1:5555", description="where the agent reaches porter")
    token_file: Path = Field(
        default=Path(".cloudhpc/agent-token"), description="file holding the agent token"
    )
    channel: Literal["http", "s3"] = Field(default="http", description="how the agent talks to porter")
    listen: str = Field(
        default="127.0.0.1:5556", description="host:port of the agent's health/metrics endpoint"
    )
    mailbox: str | None = Field(
        default=None,
        description="s3://BUCKET/PREFIX of the mailbox porter relays (channel `s3`); the same URL as "
        "porter.mailbox",
    )
    mailbox_key_file: Path | None = Field(
        default=None,
        description="file with the key that signs the mailbox's objects and encrypts job env values "
        "(base64, at least 32 random bytes: `openssl rand -base64 32`), beside the HPC key; porter has "
        "the same file as porter.mailbox_key_dir/<cluster>.key. Required with channel `s3`",
    )
    object_store: str | None = Field(
        default=None,
        description="file:// directory or s3:// bucket where the agent keeps job artifacts and reads job "
        "inputs; the same place as porter.object_store. Unset: `serve submitter` over http sends them "
        "through porter (docs/api.md); `serve all` and the s3 channel use porter.object_store with "
        "porter's S3 endpoint and region",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3 endpoint of the mailbox (and of submitter.object_store) when not AWS; credentials come from "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
    )
    s3_region: str | None = Field(
        default=None,
        description="S3 region of the mailbox and of submitter.object_store (default: AWS_REGION, else us-east-1)",
    )

    _listen = field_validator("listen")(_host_port)

    @model_validator(mode="after")
    def _mailbox_for_s3(self) -> Self:
        if self.channel == "s3" and not self.mailbox:
            raise ValueError("submitter.mailbox (an s3://BUCKET/PREFIX URL) is required with channel `s3`")
        if self.mailbox is not None and not self.mailbox.startswith(("s3://", "file://")):
            raise ValueError("submitter.mailbox must be an s3:// (or file://) URL")
        return self


def check_job_bridge(settings: Settings) -> str | None:
    """What a process that stages jobs (`serve submitter`, `serve all`) checks at startup.

    `porter.bridge` there but unusable (ca_key_file and key_file unset, known_hosts unset, or one
    of them not a readable file):
    `ConfigError` naming the key. No `porter.bridge` while a cluster is a real one (backend `slurm`):
    the warning to log, since porter may have one and its Ray jobs with ray.expose/ray.import would
    then fail at staging. Otherwise None."""
    bridge = settings.porter.bridge
    if bridge is None:
        if any(c.backend == "slurm" for c in settings.clusters.values()):
            return (
                "no porter.bridge section: this submitter cannot stage Ray jobs with ray.expose or "
                "ray.import (they fail at staging; a BRIDGE_PRIVATE_KEY_PATH from secrets.json is used "
                "only with one). Give it the bridge VM as porter has it: docs/bridge-vm.md"
            )
        return None
    credential, known_hosts = bridge.job_files()
    name = "porter.bridge.ca_key_file" if bridge.uses_ca else "porter.bridge.key_file"
    for key, path in ((name, credential), ("porter.bridge.known_hosts", known_hosts)):
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(f"{key}: {path} is not a readable file")
    return None


def _default_clusters() -> dict[str, ClusterConfig]:
    return {"local": ClusterConfig(backend="local", workdir=".cloudhpc/local")}


class _YamlFile(YamlConfigSettingsSource):
    """pydantic-settings' YAML source, refusing by name a file that holds a list or a scalar where
    the sections should be (the library would fail on it with a bare TypeError or ValueError)."""

    def _read_file(self, file_path: Path | Traversable) -> dict[str, Any]:
        data: Any = super()._read_file(file_path)
        if not isinstance(data, dict):
            raise ConfigError(f"configuration file {file_path} must hold a mapping at the top level")
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLOUDHPC_", env_nested_delimiter="__", extra="forbid")

    porter: PorterConfig = Field(default_factory=PorterConfig)
    submitter: SubmitterConfig = Field(default_factory=SubmitterConfig)
    clusters: dict[Name, ClusterConfig] = Field(default_factory=_default_clusters)

    _yaml_file: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest first: values given to the constructor (a command's flags), then the environment
        (`CLOUDHPC_<SECTION>__<KEY>`, merged key by key into the file's sections), then the file,
        read by pydantic-settings' own YAML source."""
        if cls._yaml_file is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, _YamlFile(settings_cls, yaml_file=cls._yaml_file))


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {key}: {err['msg']}")
    lines.append("Fix the key(s) above; docs/configuration.md lists every key with its meaning.")
    return "\n".join(lines)


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the configuration file (if any) and the environment; raise `ConfigError` naming bad keys."""
    if path is None:
        path = os.environ.get("CLOUDHPC_CONFIG") or None
    file = None if path is None else Path(path).expanduser()
    if file is not None and not file.is_file():
        raise ConfigError(f"configuration file {file} does not exist (from --config or CLOUDHPC_CONFIG)")
    # pydantic-settings reads sources at construction; a subclass names this call's file.
    bound = type("BoundSettings", (Settings,), {"_yaml_file": file})
    origin = "defaults and environment" if file is None else str(file)
    try:
        settings: Settings = bound()
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {file} is not valid YAML: {exc}") from exc
    return settings
