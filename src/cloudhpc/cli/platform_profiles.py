"""`cloudhpc platform profile add USER`: a Kubeflow profile with what cloudhpc's users need in it.

A profile namespace gets, besides the `Profile` itself (the profile controller makes the namespace,
its RBAC and KFP's per-namespace parts):

- Secret `cloudhpc-porter` (CLOUDHPC_URL, CLOUDHPC_TOKEN): a porter token of role `user` whose user is
  the namespace, issued by porter's own token store (`cloudhpc tokens create` in porter's pod, as
  scripts/platform-up.sh does for the default profile). The pipelines' steps read it by name.
- Secret `cloudhpc-s3` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): an S3 identity of the profile's
  own, `profile-<namespace>`, limited to the profile's prefixes of bucket `cloudhpc` (`profile_actions`:
  read and write `users/<namespace>/`, read `jobs/<namespace>/` and the shared `datasets/`; nothing
  else, no other user's). The
  steps that read and write the object store read it by name.
- PodDefault `access-cloudhpc`: pods labelled `access-cloudhpc: "true"` (notebooks pick it in the
  spawner; a pipeline step with kfp-kubernetes' `add_pod_label`) get both Secrets as environment and
  the in-cluster addresses of MLflow (artifacts proxied: no S3 keys needed for it) and of the S3
  store (`AWS_ENDPOINT_URL_S3`, which boto3 reads).

The platform's S3 store is SeaweedFS (deploy/kustomize/mlflow/s3.yaml), whose identities and their
permissions are one JSON document, `s3.json` of the Secret `mlflow/mlflow-s3-config` (no admin API
to call, so no admin Job): `apply` adds the profile's identity to it with new random keys (kept when
it exists: running `apply` again changes nothing), and restarts the store, which reads the file at
start. scripts/platform-up.sh rebuilds the document's own identities and keeps the profiles'
(`merged_s3_config`). An action `Read:cloudhpc/users/<ns>/*` lets the identity read keys starting
with that prefix; tests/integration/test_profile_s3_identity.py checks the rendered identities
against the real SeaweedFS binary.

Rendering is pure (`render`, `profile_identity`), so the objects are checked offline against schemas.
`apply` drives the cluster through `kubectl` only; secret values travel on kubectl's stdin and
stdout, never on a command line, and are never printed.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cloudhpc.exceptions import ConfigError, KubernetesError
from cloudhpc.port_forwards import Kubectl
from cloudhpc.storage.inputs import InputScope

__all__ = [
    "PODDEFAULT",
    "PORTER_SECRET",
    "S3_SECRET",
    "ProfileRequest",
    "apply",
    "default_namespace",
    "identity_name",
    "merged_s3_config",
    "new_s3_keys",
    "profile_actions",
    "profile_identity",
    "render",
    "s3_config_text",
]

PORTER_SECRET = "cloudhpc-porter"  # noqa: S105 -- a Secret's name
S3_SECRET = "cloudhpc-s3"  # noqa: S105 -- a Secret's name
PODDEFAULT = "access-cloudhpc"
# deploy/kustomize: porter-service in monitoring, MLflow and its S3 store in mlflow
# (tests/unit/test_platform_profiles.py checks them against the rendered Services).
PORTER_URL = "http://porter-service.monitoring.svc.cluster.local:5555"
MLFLOW_URL = "http://mlflow.mlflow.svc.cluster.local:5000"
S3_ENDPOINT_URL = "http://mlflow-s3.mlflow.svc.cluster.local:9000"
# Where porter runs (deploy/kustomize/porter).
PORTER_NAMESPACE = "monitoring"
PORTER_KEYS = ("CLOUDHPC_URL", "CLOUDHPC_TOKEN")
S3_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# The S3 store (deploy/kustomize/mlflow/s3.yaml): its Deployment, and the Secret with its identities.
S3_NAMESPACE = "mlflow"
S3_DEPLOYMENT = "mlflow-s3"
S3_CONFIG_SECRET = "mlflow-s3-config"  # noqa: S105 -- a Secret's name
S3_CONFIG_KEY = "s3.json"
STORE_BUCKET = "cloudhpc"
"""porter's bucket (`porter.object_store: s3://cloudhpc` in deploy/kustomize/porter)."""
SHARED_PREFIX = "datasets/"
"""Read by every profile, written by none (the operator puts shared data sets there with the store's
admin keys: docs/pipelines.md's Fashion-MNIST)."""
PROFILE_IDENTITY = "profile-"
"""The name of every profile's identity starts so (`identity_name`); platform-up.sh keeps these."""

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


def identity_name(namespace: str) -> str:
    """The S3 identity of a profile, in the store's `s3.json`."""
    return f"{PROFILE_IDENTITY}{namespace}"


def _prefixes(namespace: str) -> tuple[str, str]:
    """The profile's user's two prefixes in the bucket, `users/<user>/` and `jobs/<user>/`."""
    users, jobs = InputScope.from_store_url(f"s3://{STORE_BUCKET}").owner_prefixes(namespace)
    return users, jobs


def profile_actions(namespace: str) -> list[str]:
    """What a profile's S3 identity may do, as SeaweedFS actions (`Action:bucket/key-prefix*`).

    The profile's porter user is its namespace (`apply` issues the token so), and porter's input
    rule (`storage.inputs.InputScope`) gives each user two prefixes: `users/<user>/`, theirs to
    fill (data sets, uploads, a pipeline's `store_url` and its steps' outputs), read and written
    here; and `jobs/<user>/`, their jobs' artifacts, only read here (the agent writes them, and a
    user rewriting them would change what porter hands out as the job's files); and the shared
    data sets under `SHARED_PREFIX`, only read. Nothing else: not another user's prefixes (the `/`
    ends the user's segment, so `alice` does not reach `alice2`), not porter's upload index or the
    mailbox, not listing the bucket, not another bucket."""
    users, jobs = _prefixes(namespace)
    return [
        *(f"{action}:{STORE_BUCKET}/{users}*" for action in ("Read", "Write", "List", "Tagging")),
        *(
            f"{action}:{STORE_BUCKET}/{prefix}*"
            for prefix in (jobs, SHARED_PREFIX)
            for action in ("Read", "List")
        ),
    ]


def profile_identity(namespace: str, keys: Mapping[str, str]) -> dict[str, Any]:
    """The profile's entry of the store's `s3.json`, with its keys (`S3_KEYS`)."""
    return {
        "name": identity_name(namespace),
        "credentials": [{"accessKey": keys["AWS_ACCESS_KEY_ID"], "secretKey": keys["AWS_SECRET_ACCESS_KEY"]}],
        "actions": profile_actions(namespace),
    }


def _identity_keys(config: Mapping[str, Any], name: str) -> dict[str, str] | None:
    """The keys of identity `name` in `config`, or None when it has none."""
    for identity in config.get("identities", []):
        if identity.get("name") == name and identity.get("credentials"):
            first = identity["credentials"][0]
            return {"AWS_ACCESS_KEY_ID": first["accessKey"], "AWS_SECRET_ACCESS_KEY": first["secretKey"]}
    return None


def new_s3_keys() -> dict[str, str]:
    """Random keys for a new identity (20 and 40 characters, the shape of AWS's)."""
    return {
        "AWS_ACCESS_KEY_ID": "CHPC" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
    }


def _with_identity(config: Mapping[str, Any], identity: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with `identity` in place of the one of the same name (or added at the end)."""
    others = [i for i in config.get("identities", []) if i.get("name") != identity["name"]]
    return {**config, "identities": [*others, dict(identity)]}


def s3_config_text(config: Mapping[str, Any]) -> str:
    """The store's `s3.json` as written, one way, so that an unchanged document compares equal."""
    return json.dumps(config, indent=1, sort_keys=True) + "\n"


def merged_s3_config(base: str, current: str) -> str:
    """The document scripts/platform-up.sh writes: its own identities (`base`, rebuilt from the key
    Secrets) and the profiles' identities of the `current` document (empty: none yet)."""
    config = json.loads(base)
    kept = json.loads(current).get("identities", []) if current.strip() else []
    for identity in kept:
        if str(identity.get("name", "")).startswith(PROFILE_IDENTITY):
            config = _with_identity(config, identity)
    return s3_config_text(config)


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
    s3_keys, s3_done = _profile_s3_identity(kubectl, ns)
    secrets += render(request, s3_keys=s3_keys)[2:]
    done += [s3_done, f"secret {ns}/{S3_SECRET}: the keys of S3 identity {identity_name(ns)}"]
    if secrets_only:
        _apply(kubectl, secrets, "kubectl apply Secrets")
        return done
    _apply(kubectl, [*secrets, poddefault], "kubectl apply Secrets and PodDefault")
    done.append(f"poddefault {ns}/{PODDEFAULT}: pods labelled {PODDEFAULT}=true get both")
    return done


def _profile_s3_identity(kubectl: Kubectl, namespace: str) -> tuple[dict[str, str], str]:
    """The keys of the profile's S3 identity, made (and the store restarted to load it) unless the
    store's `s3.json` has it with today's actions already; and what was done."""
    step = f"S3 identities (secret {S3_NAMESPACE}/{S3_CONFIG_SECRET})"
    raw = _check(kubectl.run("-n", S3_NAMESPACE, "get", "secret", S3_CONFIG_SECRET, "-o", "json"), step)
    data = json.loads(raw).get("data", {})
    if S3_CONFIG_KEY not in data:
        raise KubernetesError(f"{step}: no key {S3_CONFIG_KEY}")
    config = json.loads(base64.b64decode(data[S3_CONFIG_KEY]))
    name = identity_name(namespace)
    known = _identity_keys(config, name)
    keys = known or new_s3_keys()
    identity = profile_identity(namespace, keys)
    if identity in config.get("identities", []):
        return keys, f"S3 identity {name}: exists, kept"
    text = s3_config_text(_with_identity(config, identity))
    _apply(kubectl, [_secret(S3_NAMESPACE, S3_CONFIG_SECRET, {S3_CONFIG_KEY: text})], f"kubectl apply {step}")
    # SeaweedFS reads s3.json when it starts (a SIGHUP would do too, but the kubelet updates the
    # mounted file only up to a minute later): a restart of a few seconds, porter and MLflow retry
    _check(
        kubectl.run("-n", S3_NAMESPACE, "rollout", "restart", f"deployment/{S3_DEPLOYMENT}"),
        f"kubectl rollout restart deployment/{S3_DEPLOYMENT}",
    )
    users, jobs = _prefixes(namespace)
    what = "its actions updated, keys kept" if known else "new keys"
    return keys, (
        f"S3 identity {name}: {what}, limited to {STORE_BUCKET}/{users} (read, write), "
        f"{STORE_BUCKET}/{jobs} and {STORE_BUCKET}/{SHARED_PREFIX} (read); {S3_DEPLOYMENT} restarted to load it"
    )
