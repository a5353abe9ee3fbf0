"""`cloudhpc platform profile add USER`: a Kubeflow profile with what cloudhpc's users need in it.

A profile namespace gets, besides the `Profile` itself (the profile controller makes the namespace,
its RBAC and KFP's per-namespace parts):

- Secret `cloudhpc-porter` (CLOUDHPC_URL, CLOUDHPC_TOKEN): a porter token of role `user` whose user is
  the namespace, issued by porter's own token store (`cloudhpc tokens create` in porter's pod, as
  scripts/platform-up.sh does for the default profile). The pipelines' steps read it by name.
- Secret `cloudhpc-s3` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): the S3 identity `cloudhpc` of
  the platform's store (bucket `cloudhpc` only), copied from porter's Secret `porter-secrets`; the
  steps that read and write the object store read it by name.
- PodDefault `access-cloudhpc`: pods labelled `access-cloudhpc: "true"` (notebooks pick it in the
  spawner; a pipeline step with kfp-kubernetes' `add_pod_label`) get both Secrets as environment and
  the in-cluster addresses of MLflow (artifacts proxied: no S3 keys needed for it) and of the S3
  store (`AWS_ENDPOINT_URL_S3`, which boto3 reads).

Rendering is pure (`render`), so the objects are checked offline against schemas. `apply` drives the
cluster through `kubectl` only; secret values travel on kubectl's stdin and stdout, never on a
command line, and are never printed.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cloudhpc.exceptions import ConfigError, KubernetesError
from cloudhpc.port_forwards import Kubectl

__all__ = [
    "PODDEFAULT",
    "PORTER_SECRET",
    "S3_SECRET",
    "ProfileRequest",
    "apply",
    "default_namespace",
    "render",
]

PORTER_SECRET = "cloudhpc-porter"  # noqa: S105 -- a Secret's name
S3_SECRET = "cloudhpc-s3"  # noqa: S105 -- a Secret's name
PODDEFAULT = "access-cloudhpc"
# deploy/kustomize: porter-service in monitoring, MLflow and its S3 store in mlflow
# (tests/unit/test_platform_profiles.py checks them against the rendered Services).
PORTER_URL = "http://porter-service.monitoring.svc.cluster.local:5555"
MLFLOW_URL = "http://mlflow.mlflow.svc.cluster.local:5000"
S3_ENDPOINT_URL = "http://mlflow-s3.mlflow.svc.cluster.local:9000"
# Where porter runs, and the Secret with its S3 identity (deploy/kustomize/porter).
PORTER_NAMESPACE = "monitoring"
PORTER_S3_SECRET = "porter-secrets"  # noqa: S105 -- a Secret's name
PORTER_KEYS = ("CLOUDHPC_URL", "CLOUDHPC_TOKEN")
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_USER = re.compile(r"[A-Za-z0-9._%+@-]{1,253}")


def default_namespace(user: str) -> str:
    """Kubeflow's habit: `user@example.com` -> `kubeflow-user-example-com`."""
    slug = re.sub(r"[^a-z0-9]+", "-", user.lower()).strip("-")
    return f"kubeflow-{slug}"[:63].rstrip("-")


@dataclass(frozen=True)
class ProfileRequest:
    """One profile: its owner (the login name Kubeflow knows, usually an e-mail address) and its
    namespace, checked here so that a bad value is refused naming the option (`ConfigError`)."""

    user: str
    namespace: str

    def __post_init__(self) -> None:
        if not _USER.fullmatch(self.user):
            raise ConfigError(f"USER: {self.user!r} is not a login name (letters, digits, . _ % + @ -)")
        if not _DNS_LABEL.fullmatch(self.namespace):
            raise ConfigError(
                f"--namespace: {self.namespace!r} is not a Kubernetes namespace name "
                "(lowercase letters, digits and '-', at most 63)"
            )


def _secret(namespace: str, name: str, keys: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "cloudhpc"},
        },
        "type": "Opaque",
        "stringData": dict(keys),
    }


def render(
    request: ProfileRequest,
    *,
    token: str | None = None,
    s3_keys: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The profile's objects. The Secrets only when their values are given (`apply` gets them from
    porter and from the cluster); without them, what can be shown or reviewed."""
    ns = request.namespace
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "kubeflow.org/v1",
            "kind": "Profile",
            "metadata": {"name": ns},
            "spec": {"owner": {"kind": "User", "name": request.user}},
        },
        {
            "apiVersion": "kubeflow.org/v1alpha1",
            "kind": "PodDefault",
            "metadata": {"name": PODDEFAULT, "namespace": ns},
            "spec": {
                "desc": "cloudhpc: porter token, S3 keys, MLflow",
                "selector": {"matchLabels": {PODDEFAULT: "true"}},
                # env with secretKeyRef (what every PodDefault example uses), not envFrom
                "env": [
                    *(
                        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
                        for secret, keys in ((PORTER_SECRET, PORTER_KEYS), (S3_SECRET, S3_KEYS))
                        for key in keys
                    ),
                    {"name": "MLFLOW_TRACKING_URI", "value": MLFLOW_URL},
                    {"name": "AWS_ENDPOINT_URL_S3", "value": S3_ENDPOINT_URL},
                ],
            },
        },
    ]
    if token is not None:
        objs.append(_secret(ns, PORTER_SECRET, dict(zip(PORTER_KEYS, (PORTER_URL, token), strict=True))))
    if s3_keys is not None:
        objs.append(_secret(ns, S3_SECRET, {key: s3_keys[key] for key in S3_KEYS}))
    return objs


def _check(proc: subprocess.CompletedProcess[str], step: str) -> str:
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or "").splitlines() if line.strip()]
        raise KubernetesError(f"{step}: {lines[-1] if lines else f'kubectl exited {proc.returncode}'}")
    return str(proc.stdout)


def _apply(kubectl: Kubectl, objs: list[dict[str, Any]], step: str) -> None:
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objs})
    _check(kubectl.run("apply", "-f", "-", stdin=manifest), step)


def apply(
    request: ProfileRequest,
    kubectl: Kubectl,
    *,
    wait_seconds: float = 300.0,
    secrets_only: bool = False,
    on_event: Callable[[str], None] = lambda message: None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Make the profile in the cluster; returns what was done, one line each. Idempotent: an existing
    porter token Secret is kept (a new token is issued only when it is missing). `secrets_only`: only
    the two Secrets, in a namespace that exists without a Profile (standalone Kubeflow Pipelines runs
    its steps in `kubeflow`, and has neither the Profile nor the PodDefault CRD)."""
    done: list[str] = []
    ns = request.namespace
    profile, poddefault = render(request)
    if not secrets_only:
        _apply(kubectl, [profile], "kubectl apply Profile")
        done.append(f"profile {ns}: applied (owner {request.user})")
    waited = 0.0
    while kubectl.run("get", "namespace", ns, "-o", "name").returncode != 0:
        if waited >= wait_seconds:
            raise KubernetesError(
                f"namespace {ns}: not made by the profile controller within {wait_seconds:.0f}s"
            )
        on_event(f"waiting for the profile controller to make namespace {ns}")
        sleep(2.0)
        waited += 2.0
    secrets: list[dict[str, Any]] = []
    if kubectl.run("-n", ns, "get", "secret", PORTER_SECRET, "-o", "name").returncode == 0:
        done.append(f"secret {ns}/{PORTER_SECRET}: exists, kept")
    else:
        out = _check(
            kubectl.run(
                "-n",
                PORTER_NAMESPACE,
                "exec",
                "deploy/porter",
                "-c",
                "porter",
                "--",
                "cloudhpc",
                "tokens",
                "create",
                "--user",
                ns,
                "--role",
                "user",
            ),
            "porter token (kubectl exec deploy/porter -- cloudhpc tokens create)",
        )
        token = out.strip().splitlines()[-1].strip() if out.strip() else ""
        if not token:
            raise KubernetesError("porter token: `cloudhpc tokens create` printed no token")
        secrets += render(request, token=token)[2:]
        done.append(f"secret {ns}/{PORTER_SECRET}: porter token for user {ns} (role user)")
    raw = _check(
        kubectl.run("-n", PORTER_NAMESPACE, "get", "secret", PORTER_S3_SECRET, "-o", "json"),
        f"S3 keys (secret {PORTER_NAMESPACE}/{PORTER_S3_SECRET})",
    )
    data = json.loads(raw).get("data", {})
    missing = [key for key in S3_KEYS if key not in data]
    if missing:
        raise KubernetesError(f"secret {PORTER_NAMESPACE}/{PORTER_S3_SECRET} lacks {', '.join(missing)}")
    s3_keys = {key: base64.b64decode(data[key]).decode() for key in S3_KEYS}
    secrets += render(request, s3_keys=s3_keys)[2:]
    done.append(f"secret {ns}/{S3_SECRET}: the S3 identity of bucket cloudhpc")
    if secrets_only:
        _apply(kubectl, secrets, "kubectl apply Secrets")
        return done
    _apply(kubectl, [*secrets, poddefault], "kubectl apply Secrets and PodDefault")
    done.append(f"poddefault {ns}/{PODDEFAULT}: pods labelled {PODDEFAULT}=true get both")
    return done
