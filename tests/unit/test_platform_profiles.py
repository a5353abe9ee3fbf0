"""`cloudhpc platform profile add`, offline: no API server runs here.

The rendered objects are validated: the Secrets against the schemas of the Kubernetes version kind runs
(kubernetes-validate, strict); `Profile` (kubeflow.org/v1) and `PodDefault` (kubeflow.org/v1alpha1)
are CRDs that kubernetes-validate does not know, so against minimal schemas of our own below, written
from the CRDs' fields (owner; selector, desc, env with values or secretKeyRef) with no other field allowed: they catch a
misspelt or misplaced field, not every rule of the real CRDs. `--apply` runs against a stand-in
`kubectl` executable, the command's only interface to the cluster, which records each call's argv and
stdin, so the test sees where secret values travel.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from cloudhpc.cli import platform_profiles as profiles
from cloudhpc.cli.main import app
from cloudhpc.exceptions import ConfigError
from cloudhpc.pipelines.fmnist import pipeline
from cloudhpc.storage.inputs import InputScope
from tests.unit.test_deploy import K8S_VERSION, _one, _render

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_SECRET_KEY_REF = {
    "type": "object",
    "required": ["secretKeyRef"],
    "additionalProperties": False,
    "properties": {
        "secretKeyRef": {
            "type": "object",
            "required": ["name", "key"],
            "additionalProperties": False,
            "properties": {"name": _NAME, "key": {"type": "string"}},
        }
    },
}
_ENV = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name"],
        "oneOf": [{"required": ["value"]}, {"required": ["valueFrom"]}],
        "additionalProperties": False,
        "properties": {"name": {"type": "string"}, "value": {"type": "string"}, "valueFrom": _SECRET_KEY_REF},
    },
}
PROFILE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1"},
        "kind": {"const": "Profile"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {"name": _NAME},  # cluster-scoped: no namespace
        },
        "spec": {
            "type": "object",
            "required": ["owner"],
            "additionalProperties": False,
            "properties": {
                "owner": {
                    "type": "object",
                    "required": ["kind", "name"],
                    "additionalProperties": False,
                    "properties": {"kind": {"enum": ["User", "Group"]}, "name": {"type": "string"}},
                }
            },
        },
    },
}
PODDEFAULT_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "kubeflow.org/v1alpha1"},
        "kind": {"const": "PodDefault"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "additionalProperties": False,
            "properties": {"name": _NAME, "namespace": _NAME},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "desc"],
            "additionalProperties": False,
            "properties": {
                "desc": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}
                    },
                },
                "env": _ENV,
            },
        },
    },
}

REQUEST = profiles.ProfileRequest("alice@example.org", "kubeflow-alice-example-org")
TOKEN = "chpc_" + "t0k3n" * 8
S3_KEYS = {"AWS_ACCESS_KEY_ID": "CLOUDHPCKEYID", "AWS_SECRET_ACCESS_KEY": "s3-secret-value-" + "x" * 20}
PORTER_S3_KEYS = {"accessKey": "PORTERKEYID", "secretKey": "porter-s3-secret-" + "y" * 20}
"""porter's own identity in the store's s3.json: a profile never gets these."""
S3_CONFIG = {
    "identities": [
        {"name": "mlflow", "credentials": [{"accessKey": "MLFLOWKEY", "secretKey": "mlflow-secret-" + "z" * 20}],
         "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        {"name": "cloudhpc", "credentials": [PORTER_S3_KEYS],
         "actions": ["Read:cloudhpc", "List:cloudhpc", "Tagging:cloudhpc", "Write:cloudhpc"]},
    ]
}  # fmt: skip


def _validate(obj: dict[str, Any]) -> None:
    if obj["kind"] == "Profile":
        jsonschema.validate(obj, PROFILE_SCHEMA)
    elif obj["kind"] == "PodDefault":
        jsonschema.validate(obj, PODDEFAULT_SCHEMA)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_rendered_objects_validate_and_fit_each_other() -> None:
    objs = profiles.render(REQUEST, token=TOKEN, s3_keys=S3_KEYS)
    for obj in objs:
        _validate(obj)
    kinds = {o["kind"] + "/" + o["metadata"]["name"]: o for o in objs}
    assert set(kinds) == {
        "Profile/kubeflow-alice-example-org",
        "PodDefault/access-cloudhpc",
        "Secret/cloudhpc-porter",
        "Secret/cloudhpc-s3",
    }
    poddefault = kinds["PodDefault/access-cloudhpc"]
    # every key of both Secrets, each from the Secret that holds it
    refs = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in poddefault["spec"]["env"]
        if "valueFrom" in e
    }
    assert refs == {
        (o["metadata"]["name"], key) for o in objs if o["kind"] == "Secret" for key in o["stringData"]
    }
    # the names the example pipelines read (kfp-kubernetes use_secret_as_env), with their keys
    assert (pipeline.TOKEN_SECRET, pipeline.S3_SECRET) == (profiles.PORTER_SECRET, profiles.S3_SECRET)
    assert set(pipeline.TOKEN_ENV) <= set(kinds["Secret/cloudhpc-porter"]["stringData"])
    assert set(pipeline.S3_ENV) == set(kinds["Secret/cloudhpc-s3"]["stringData"])
    assert kinds["Secret/cloudhpc-porter"]["stringData"]["CLOUDHPC_TOKEN"] == TOKEN
    for obj in objs[1:]:
        assert obj["metadata"]["namespace"] == REQUEST.namespace


def test_the_addresses_are_the_platforms_services() -> None:
    """porter, MLflow and the S3 store where deploy/kustomize puts them, the same as the pipelines'."""
    objs = _render("dev")
    for url, (namespace, service) in (
        (profiles.PORTER_URL, ("monitoring", "porter-service")),
        (profiles.MLFLOW_URL, ("mlflow", "mlflow")),
        (profiles.S3_ENDPOINT_URL, ("mlflow", "mlflow-s3")),
    ):
        host, port = url.removeprefix("http://").split(":")
        assert host == f"{service}.{namespace}.svc.cluster.local"
        svc = _one(objs, "Service", service)
        assert svc["metadata"]["namespace"] == namespace
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert (profiles.PORTER_URL, profiles.MLFLOW_URL, profiles.S3_ENDPOINT_URL) == (
        pipeline.PORTER_URL,
        pipeline.MLFLOW_URL,
        pipeline.S3_ENDPOINT,
    )


def test_print_shows_no_secret_and_bad_names_are_refused() -> None:
    result = CliRunner().invoke(app, ["platform", "profile", "add", "alice@example.org"])
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in docs] == ["Profile", "PodDefault"]
    for doc in docs:
        _validate(doc)
    assert docs[0]["metadata"]["name"] == "kubeflow-alice-example-org"
    bad = CliRunner().invoke(app, ["platform", "profile", "add", "alice", "--namespace", "Alice_NS"])
    assert bad.exit_code == 2
    assert "--namespace" in bad.output
    with pytest.raises(ConfigError, match="USER"):
        profiles.ProfileRequest("alice; rm -rf /", "ok")


FAKE_KUBECTL = textwrap.dedent(
    """\
    #!{python}
    # A stand-in for kubectl at the process boundary: records argv and stdin, and answers like the
    # cluster would. The namespace appears on the second `get namespace` (the profile controller).
    import base64, json, os, sys
    args = sys.argv[1:]
    stdin = sys.stdin.read() if "-f" in args and "-" in args else ""
    with open("{log}", "a") as log:
        log.write(json.dumps({{"argv": args, "stdin": stdin}}) + "\\n")
    state = "{state}"
    seen = set(open(state).read().split()) if os.path.exists(state) else set()
    def mark(word):
        with open(state, "a") as f:
            f.write(word + "\\n")
    if args[:1] == ["apply"]:
        for item in json.loads(stdin)["items"]:
            mark(item["kind"] + "/" + item["metadata"]["name"])
            if item["metadata"]["name"] == "mlflow-s3-config":
                with open("{s3_config}", "w") as f:
                    f.write(item["stringData"]["s3.json"])
        sys.exit(0)
    if args[:3] == ["-n", "mlflow", "rollout"]:
        sys.exit(0)
    if args[:2] == ["get", "namespace"]:
        if "asked-namespace" in seen:
            print("namespace/" + args[2]); sys.exit(0)
        mark("asked-namespace")
        print('Error from server (NotFound): namespaces "x" not found', file=sys.stderr); sys.exit(1)
    if args[2:4] == ["get", "secret"] and args[4] == "{porter_secret}":
        if "Secret/{porter_secret}" in seen:
            print("secret/x"); sys.exit(0)
        print("Error from server (NotFound)", file=sys.stderr); sys.exit(1)
    if args[:5] == ["-n", "mlflow", "get", "secret", "mlflow-s3-config"]:
        print(json.dumps({{"data": {{"s3.json": base64.b64encode(open("{s3_config}", "rb").read()).decode()}}}}))
        sys.exit(0)
    if args[2] == "exec":
        mark("token-issued")
        print("{token}"); sys.exit(0)
    print("unexpected: " + " ".join(args), file=sys.stderr); sys.exit(3)
    """
)


def _fake_kubectl(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "calls.jsonl"
    exe = tmp_path / "kubectl"
    s3_config = tmp_path / "s3.json"
    s3_config.write_text(json.dumps(S3_CONFIG))
    exe.write_text(
        FAKE_KUBECTL.format(
            python=sys.executable,
            log=log,
            state=tmp_path / "state",
            porter_secret=profiles.PORTER_SECRET,
            s3_config=s3_config,
            token=TOKEN,
        )
    )
    exe.chmod(0o755)
    return exe, log


def _calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_apply_makes_the_profile_with_its_token_and_keys_never_on_a_command_line(tmp_path: Path) -> None:
    exe, log = _fake_kubectl(tmp_path)
    argv = ["platform", "profile", "add", "alice@example.org", "--apply", "--kubectl", str(exe)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    calls = _calls(log)
    applied = [item for c in calls if c["argv"][:1] == ["apply"] for item in json.loads(c["stdin"])["items"]]
    by_name = {o["metadata"]["name"]: o for o in applied}
    profile_keys = by_name["cloudhpc-s3"]["stringData"]
    secrets = (TOKEN, *profile_keys.values(), *PORTER_S3_KEYS.values())
    for call in calls:
        for value in secrets:
            assert not any(value in arg for arg in call["argv"]), (
                f"a secret on kubectl's command line: {call['argv']}"
            )
    for value in secrets:
        assert value not in result.output, "a secret printed"
    # the porter token is issued in porter's own container, for the profile's namespace as its user
    (issue,) = [c["argv"] for c in calls if "exec" in c["argv"]]
    assert issue == [
        "-n",
        "monitoring",
        "exec",
        "deploy/porter",
        "-c",
        "porter",
        "--",
        "cloudhpc",
        "tokens",
        "create",
        "--user",
        REQUEST.namespace,
        "--role",
        "user",
    ]
    assert [(o["kind"], o["metadata"]["name"]) for o in applied] == [
        ("Profile", REQUEST.namespace),  # first: the profile controller makes the namespace
        ("Secret", profiles.S3_CONFIG_SECRET),
        ("Secret", profiles.PORTER_SECRET),
        ("Secret", profiles.S3_SECRET),
        ("PodDefault", profiles.PODDEFAULT),
    ]
    for obj in applied:
        _validate(obj)
    assert by_name["cloudhpc-porter"]["stringData"] == {
        "CLOUDHPC_URL": profiles.PORTER_URL,
        "CLOUDHPC_TOKEN": TOKEN,
    }
    # the profile's keys are an identity of its own in the store, not porter's, limited to its prefixes
    assert set(profile_keys) == set(profiles.S3_KEYS)
    assert profile_keys["AWS_ACCESS_KEY_ID"] != PORTER_S3_KEYS["accessKey"]
    store_config = by_name[profiles.S3_CONFIG_SECRET]
    assert store_config["metadata"]["namespace"] == profiles.S3_NAMESPACE
    identities = json.loads(store_config["stringData"]["s3.json"])["identities"]
    assert identities[:2] == S3_CONFIG["identities"], "the store's other identities are kept as they are"
    assert identities[2] == {
        "name": f"profile-{REQUEST.namespace}",
        "credentials": [
            {
                "accessKey": profile_keys["AWS_ACCESS_KEY_ID"],
                "secretKey": profile_keys["AWS_SECRET_ACCESS_KEY"],
            }
        ],
        "actions": profiles.profile_actions(REQUEST.namespace),
    }
    restarts = [c["argv"] for c in calls if "rollout" in c["argv"]]
    assert restarts == [["-n", "mlflow", "rollout", "restart", "deployment/mlflow-s3"]]

    # Again: the token Secret exists, so no second token is issued; the rest is re-applied.
    log.write_text("")
    again = CliRunner().invoke(app, argv)
    assert again.exit_code == 0, again.output
    calls = _calls(log)
    assert not [c for c in calls if "exec" in c["argv"]], "a token is issued once"
    assert not [c for c in calls if "rollout" in c["argv"]], (
        "an identity that exists: the store is not restarted"
    )
    reapplied = [
        item for c in calls if c["argv"][:1] == ["apply"] for item in json.loads(c["stdin"])["items"]
    ]
    assert profiles.S3_CONFIG_SECRET not in [o["metadata"]["name"] for o in reapplied]
    again_keys = next(o for o in reapplied if o["metadata"]["name"] == profiles.S3_SECRET)["stringData"]
    assert again_keys == profile_keys, "the same keys: pods that hold them keep working"
    assert "exists, kept" in again.output


def test_apply_says_which_step_failed(tmp_path: Path) -> None:
    exe = tmp_path / "kubectl"
    exe.write_text(
        f"#!{sys.executable}\nimport sys\nprint('error: You must be logged in', file=sys.stderr)\nsys.exit(1)\n"
    )
    exe.chmod(0o755)
    result = CliRunner().invoke(
        app, ["platform", "profile", "add", "bob@example.org", "--apply", "--kubectl", str(exe)]
    )
    assert result.exit_code == 1
    assert "kubectl apply Profile: error: You must be logged in" in result.output


def test_secrets_only_makes_just_the_secrets(tmp_path: Path) -> None:
    """Standalone Kubeflow Pipelines: steps run in `kubeflow`, which has no Profile or PodDefault CRD."""
    exe, log = _fake_kubectl(tmp_path)
    argv = ["platform", "profile", "add", "pipelines", "--namespace", "kubeflow", "--apply", "--secrets-only"]
    result = CliRunner().invoke(app, [*argv, "--kubectl", str(exe)])
    assert result.exit_code == 0, result.output
    applied = [
        item for c in _calls(log) if c["argv"][:1] == ["apply"] for item in json.loads(c["stdin"])["items"]
    ]
    assert [(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"]) for o in applied] == [
        ("Secret", profiles.S3_NAMESPACE, profiles.S3_CONFIG_SECRET),  # the S3 identity of `kubeflow`
        ("Secret", "kubeflow", profiles.PORTER_SECRET),
        ("Secret", "kubeflow", profiles.S3_SECRET),
    ]


def test_a_profiles_s3_actions_reach_only_its_own_prefixes() -> None:
    """Offline, the policy as data: every action names bucket `cloudhpc` and one of the profile's two
    prefixes (its `/` included), writes only under `users/<ns>/`. tests/integration/
    test_profile_s3_identity.py checks the same identities against the real SeaweedFS."""
    ns = REQUEST.namespace
    actions = profiles.profile_actions(ns)
    by_prefix: dict[str, set[str]] = {}
    for action in actions:
        verb, _, resource = action.partition(":")
        assert resource, f"{action}: an action without a resource reaches every bucket"
        assert resource.endswith("/*"), f"{action}: not a prefix ending at a segment"
        by_prefix.setdefault(resource.removesuffix("*"), set()).add(verb)
    assert by_prefix == {
        f"cloudhpc/users/{ns}/": {"Read", "Write", "List", "Tagging"},
        f"cloudhpc/jobs/{ns}/": {"Read", "List"},
        "cloudhpc/datasets/": {"Read", "List"},  # shared data sets, read only
    }
    assert "Admin" not in {a.partition(":")[0] for a in actions}
    # the same prefixes porter's input rule gives the profile's user (its token's user is the namespace)
    scope = InputScope.from_store_url("s3://cloudhpc")
    assert {p.removeprefix("cloudhpc/") for p in by_prefix} - {profiles.SHARED_PREFIX} == set(
        scope.owner_prefixes(ns)
    )


def test_platform_up_keeps_the_profiles_identities() -> None:
    """put_s3_config rebuilds the store's own identities and keeps every profile's, so a second
    platform-up.sh does not take the profiles' keys away; the text is stable (no needless restart)."""
    profile = profiles.profile_identity(
        "kubeflow-bob", {"AWS_ACCESS_KEY_ID": "B", "AWS_SECRET_ACCESS_KEY": "b"}
    )
    current = profiles.s3_config_text({"identities": [*S3_CONFIG["identities"], profile]})
    rotated = {
        "identities": [
            {**S3_CONFIG["identities"][0], "credentials": [{"accessKey": "NEW", "secretKey": "n"}]}
        ]
    }
    merged = profiles.merged_s3_config(json.dumps(rotated), current)
    assert json.loads(merged)["identities"] == [*rotated["identities"], profile], "porter's gone, bob's kept"
    assert profiles.merged_s3_config(merged, merged) == merged
    assert json.loads(profiles.merged_s3_config(json.dumps(rotated), "")) == rotated
    script = (Path(__file__).resolve().parents[2] / "scripts" / "platform-up.sh").read_text()
    assert "merged_s3_config" in script


def test_apply_updates_a_profiles_stale_actions_and_keeps_its_keys(tmp_path: Path) -> None:
    """An identity made with other actions (an older cloudhpc) is brought up to date in place: the
    pods holding its keys keep working, the store restarts to load the new actions."""
    exe, log = _fake_kubectl(tmp_path)
    keys = {"AWS_ACCESS_KEY_ID": "OLDPROFILEKEY", "AWS_SECRET_ACCESS_KEY": "old-profile-secret-" + "o" * 20}
    stale = {**profiles.profile_identity(REQUEST.namespace, keys), "actions": ["Read:cloudhpc"]}
    (tmp_path / "s3.json").write_text(json.dumps({"identities": [*S3_CONFIG["identities"], stale]}))
    argv = ["platform", "profile", "add", REQUEST.user, "--apply", "--kubectl", str(exe)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "actions updated, keys kept" in result.output
    calls = _calls(log)
    applied = {
        o["metadata"]["name"]: o
        for c in calls
        if c["argv"][:1] == ["apply"]
        for o in json.loads(c["stdin"])["items"]
    }
    assert applied[profiles.S3_SECRET]["stringData"] == keys
    identities = json.loads(applied[profiles.S3_CONFIG_SECRET]["stringData"]["s3.json"])["identities"]
    assert identities[-1] == profiles.profile_identity(REQUEST.namespace, keys)
    assert len(identities) == 3
    assert [c["argv"] for c in calls if "rollout" in c["argv"]] == [
        ["-n", "mlflow", "rollout", "restart", "deployment/mlflow-s3"]
    ]
