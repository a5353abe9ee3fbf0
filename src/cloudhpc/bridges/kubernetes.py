"""Publishing bridges in Kubernetes: per bridge, one selector-less Service and one EndpointSlice.

A pipeline pod then reaches a job's Ray dashboard at `<service>.<namespace>.svc.cluster.local:8265`,
and Kubernetes forwards to the bridge VM's port. The objects are applied with server-side apply
(field manager `cloudhpc-porter`, so re-applying after a restart changes nothing and never
duplicates), carry labels (managed-by, job id, owner, bridge name) and are deleted by label
selector when the job ends. porter never creates or deletes a namespace: the original system once
deleted one shared by every user.

The objects are rendered by pure functions; the calls go through `KubernetesApi`, a thin interface
with the real implementation over the official client (`pip install cloudhpc[kubernetes]`) and a
recording one for tests, since no API server runs where the tests do. The rendered objects are
checked against the Kubernetes schemas offline (`kubernetes-validate`) in the tests.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from cloudhpc.domain.jobs import Bridge
from cloudhpc.exceptions import ConfigError, KubernetesError

__all__ = [
    "FIELD_MANAGER",
    "LABEL_BRIDGE",
    "LABEL_JOB",
    "LABEL_MANAGED_BY",
    "LABEL_OWNER",
    "BridgePublisher",
    "KubernetesApi",
    "KubernetesError",
    "OfficialKubernetesApi",
    "RecordedCall",
    "RecordingKubernetesApi",
    "label_value",
    "render_endpoint_slice",
    "render_service",
    "service_dns",
    "service_name",
]

log = logging.getLogger(__name__)

FIELD_MANAGER = "cloudhpc-porter"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "cloudhpc.io/job-id"
LABEL_OWNER = "cloudhpc.io/owner"
LABEL_BRIDGE = "cloudhpc.io/bridge"
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={FIELD_MANAGER}"
KINDS = ("Service", "EndpointSlice")
PORT_NAME = "bridge"

_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _digest(value: str, length: int = 8) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:length]


def label_value(value: str) -> str:
    """`value` as a valid label value (<= 63 chars, alphanumeric at both ends). A value that had to
    change gets a short hash of the original, so two different values never share a label."""
    if _LABEL_VALUE.match(value):
        return value
    cleaned = re.sub(r"[^-A-Za-z0-9_.]", "-", value)[:50].strip("-_.")
    return f"{cleaned}-{_digest(value)}" if cleaned else _digest(value)


def _dns_label(value: str) -> str:
    cleaned = re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-")
    if cleaned != value:
        cleaned = f"{cleaned[:30].strip('-')}-{_digest(value, 6)}".strip("-")
    return cleaned


def service_name(job_id: UUID, bridge: str) -> str:
    """A DNS-1035 label, unique per (job, bridge): `chpc-<64 bits of the job id>-<bridge>`."""
    name = f"chpc-{job_id.hex[:16]}-{_dns_label(bridge)}"
    return name[:63].rstrip("-")


def service_dns(job_id: UUID, bridge: str, namespace: str) -> str:
    return f"{service_name(job_id, bridge)}.{namespace}.svc.cluster.local"


def labels(job_id: UUID, owner: str, bridge: str) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: FIELD_MANAGER,
        LABEL_JOB: str(job_id),
        LABEL_OWNER: label_value(owner),
        LABEL_BRIDGE: label_value(bridge),
    }


def _address_type(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "FQDN"
    return "IPv4" if ip.version == 4 else "IPv6"


def render_service(job_id: UUID, owner: str, bridge: Bridge, namespace: str) -> dict[str, Any]:
    """A Service without a selector: its endpoints are the EndpointSlice below, not pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(job_id, bridge.name),
            "namespace": namespace,
            "labels": labels(job_id, owner, bridge.name),
            "annotations": {"cloudhpc.io/owner": owner, "cloudhpc.io/bridge-url": bridge.url or ""},
        },
        "spec": {
            "type": "ClusterIP",
            "ports": [
                {
                    "name": PORT_NAME,
                    "protocol": "TCP",
                    "port": bridge.remote_port,
                    "targetPort": bridge.bridge_port,
                }
            ],
        },
    }


def render_endpoint_slice(job_id: UUID, owner: str, bridge: Bridge, namespace: str) -> dict[str, Any]:
    """The one endpoint of the Service: the bridge VM's address and port."""
    name = service_name(job_id, bridge.name)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                **labels(job_id, owner, bridge.name),
                "kubernetes.io/service-name": name,
                "endpointslice.kubernetes.io/managed-by": FIELD_MANAGER,
            },
        },
        "addressType": _address_type(bridge.bridge_host),
        "endpoints": [{"addresses": [bridge.bridge_host], "conditions": {"ready": True}}],
        "ports": [{"name": PORT_NAME, "protocol": "TCP", "port": bridge.bridge_port}],
    }


class KubernetesApi(Protocol):
    """The three calls the publisher makes. Implementations raise `KubernetesError` on failure."""

    def apply(self, obj: Mapping[str, Any], *, field_manager: str) -> None:
        """Server-side apply of one object (created or updated; `force` takes over conflicts)."""

    def delete(self, kind: str, namespace: str, *, label_selector: str) -> int:
        """Delete every object of `kind` matching the selector; returns how many were deleted."""

    def label_values(self, kind: str, namespace: str, *, label_selector: str, label: str) -> set[str]:
        """The values of `label` on the objects of `kind` matching the selector."""


@dataclass(frozen=True)
class RecordedCall:
    verb: str
    kind: str
    namespace: str
    name: str | None = None
    field_manager: str | None = None
    label_selector: str | None = None
    body: Mapping[str, Any] | None = None


@dataclass
class RecordingKubernetesApi:
    """Keeps the objects it is given and every call, as an API server's store would (by kind and name).

    For tests and dry runs: what it records is what the real implementation sends.
    """

    calls: list[RecordedCall] = field(default_factory=list)
    objects: dict[tuple[str, str, str], Mapping[str, Any]] = field(default_factory=dict)
    fail: bool = False
    """Make every call fail, as an unreachable API server does."""

    def _check(self) -> None:
        if self.fail:
            raise KubernetesError("recording API set to fail")

    def apply(self, obj: Mapping[str, Any], *, field_manager: str) -> None:
        self._check()
        meta = obj["metadata"]
        self.calls.append(
            RecordedCall(
                "apply", obj["kind"], meta["namespace"], meta["name"], field_manager=field_manager, body=obj
            )
        )
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj

    def _matching(self, kind: str, namespace: str, label_selector: str) -> list[tuple[str, str, str]]:
        wanted = dict(term.split("=", 1) for term in label_selector.split(","))
        return [
            key
            for key, obj in self.objects.items()
            if key[0] == kind
            and key[1] == namespace
            and all(obj["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())
        ]

    def delete(self, kind: str, namespace: str, *, label_selector: str) -> int:
        self._check()
        self.calls.append(RecordedCall("delete", kind, namespace, label_selector=label_selector))
        keys = self._matching(kind, namespace, label_selector)
        for key in keys:
            del self.objects[key]
        return len(keys)

    def label_values(self, kind: str, namespace: str, *, label_selector: str, label: str) -> set[str]:
        self._check()
        self.calls.append(RecordedCall("list", kind, namespace, label_selector=label_selector))
        return {
            self.objects[key]["metadata"]["labels"][label]
            for key in self._matching(kind, namespace, label_selector)
        }


_PATHS = {
    "Service": "/api/v1/namespaces/{namespace}/services/{name}",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices/{name}",
}


class OfficialKubernetesApi:
    """`KubernetesApi` over the official client: in-cluster credentials, else the kubeconfig."""

    def __init__(self, api_client: Any | None = None) -> None:
        try:
            from kubernetes import client, config
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ConfigError(
                "porter.bridge.kubernetes.enabled needs the Kubernetes client: pip install 'cloudhpc[kubernetes]'"
            ) from exc
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    config.load_kube_config()
                except (config.ConfigException, OSError) as exc:
                    raise ConfigError(
                        f"porter.bridge.kubernetes.enabled: no in-cluster credentials and no kubeconfig ({exc})"
                    ) from exc
            api_client = client.ApiClient()
        self._client = client
        self._api_client = api_client
        self._core = client.CoreV1Api(api_client)
        self._discovery = client.DiscoveryV1Api(api_client)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._client.ApiException as exc:
            raise KubernetesError(f"{what}: HTTP {exc.status} {exc.reason}") from exc
        except Exception as exc:  # urllib3 and socket errors: the API server is unreachable
            raise KubernetesError(f"{what}: {type(exc).__name__}: {exc}") from exc

    def apply(self, obj: Mapping[str, Any], *, field_manager: str) -> None:
        """A PATCH with content type `application/apply-patch+yaml` (JSON is YAML): the generated
        `patch_namespaced_*` methods cannot choose that content type, so the call is made here."""
        meta = obj["metadata"]
        path = _PATHS[obj["kind"]]
        self._call(
            f"apply {obj['kind']} {meta['namespace']}/{meta['name']}",
            self._api_client.call_api,
            path,
            "PATCH",
            {"namespace": meta["namespace"], "name": meta["name"]},
            [("fieldManager", field_manager), ("force", "true")],
            {"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
            body=dict(obj),
            auth_settings=["BearerToken"],
            response_type="object",
            _return_http_data_only=True,
        )

    def _list(self, kind: str, namespace: str, label_selector: str) -> list[Any]:
        lister = {
            "Service": self._core.list_namespaced_service,
            "EndpointSlice": self._discovery.list_namespaced_endpoint_slice,
        }[kind]
        result = self._call(f"list {kind} in {namespace}", lister, namespace, label_selector=label_selector)
        return list(result.items)

    def delete(self, kind: str, namespace: str, *, label_selector: str) -> int:
        deleter = {
            "Service": self._core.delete_namespaced_service,
            "EndpointSlice": self._discovery.delete_namespaced_endpoint_slice,
        }[kind]
        count = 0
        for item in self._list(kind, namespace, label_selector):
            name = item.metadata.name
            try:
                self._call(f"delete {kind} {namespace}/{name}", deleter, name, namespace)
            except KubernetesError as exc:
                if "HTTP 404" not in str(exc):
                    raise
            count += 1
        return count

    def label_values(self, kind: str, namespace: str, *, label_selector: str, label: str) -> set[str]:
        return {
            (item.metadata.labels or {}).get(label, "")
            for item in self._list(kind, namespace, label_selector)
        } - {""}


class BridgePublisher:
    """Publishes and withdraws bridges in one namespace through a `KubernetesApi` (blocking calls)."""

    def __init__(self, api: KubernetesApi, namespace: str) -> None:
        self.api = api
        self.namespace = namespace

    def publish(self, job_id: UUID, owner: str, bridge: Bridge) -> str:
        """Apply the Service and its EndpointSlice; returns the Service's DNS name."""
        for obj in (
            render_service(job_id, owner, bridge, self.namespace),
            render_endpoint_slice(job_id, owner, bridge, self.namespace),
        ):
            self.api.apply(obj, field_manager=FIELD_MANAGER)
        return service_dns(job_id, bridge.name, self.namespace)

    def withdraw(self, job_id: UUID) -> int:
        """Delete every object of the job (by label): its Services first, then their slices."""
        selector = f"{MANAGED_SELECTOR},{LABEL_JOB}={job_id}"
        return sum(self.api.delete(kind, self.namespace, label_selector=selector) for kind in KINDS)

    def published_jobs(self) -> set[UUID]:
        """Jobs that have objects in the namespace (after a restart: what may be orphaned)."""
        found: set[UUID] = set()
        for kind in KINDS:
            for value in self.api.label_values(
                kind, self.namespace, label_selector=MANAGED_SELECTOR, label=LABEL_JOB
            ):
                try:
                    found.add(UUID(value))
                except ValueError:
                    log.warning("ignoring %s labelled %s=%r in %s", kind, LABEL_JOB, value, self.namespace)
        return found
