"""The platform's NetworkPolicies, evaluated offline (no API server or CNI runs here).

`admits` is a small pure evaluator of `networking.k8s.io/v1` ingress rules (pod and namespace
selectors with matchLabels and matchExpressions, ports, ipBlock peers as "anywhere"): enough for the
policies deploy/kustomize ships, and strict about what it does not model (named ports, egress), so a
policy using those fails here rather than being read wrongly. The pods are the rendered workloads
with the labels Kubernetes gives them (a Job's pods carry `batch.kubernetes.io/job-name`), so a
selector that matches no real pod shows up as a denied pair. Schemas: tests/unit/test_deploy.py
validates every rendered object, these policies included, against the schemas of the Kubernetes version kind runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.unit.test_deploy import _render

Labels = Mapping[str, str]
PLATFORM_NAMESPACES = ("mlflow", "monitoring")


@dataclass(frozen=True)
class Pod:
    """A pod as the policies see it: its namespace, the namespace's labels and its own labels."""

    namespace: str
    labels: Labels
    namespace_labels: Labels = field(default_factory=dict)

    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace, **self.namespace_labels}


def _selects(selector: Mapping[str, Any], labels: Labels) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _peer_admits(peer: Mapping[str, Any], policy_ns: str, source: Pod | None) -> bool:
    """`source` None: a client outside the cluster (NodePort traffic arrives from the node)."""
    if "ipBlock" in peer:
        return source is None and peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0")
    if source is None:
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], source.ns_labels()):
            return False
    elif source.namespace != policy_ns:
        return False
    return _selects(peer.get("podSelector", {}), source.labels)


def _rule_admits(rule: Mapping[str, Any], policy_ns: str, source: Pod | None, port: int) -> bool:
    ports = rule.get("ports")
    if ports:
        for p in ports:
            assert isinstance(p["port"], int), f"named port {p['port']!r}: not modelled here, use the number"
            assert "endPort" not in p, "port ranges: not modelled here"
        if not any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            return False
    peers = rule.get("from")
    if not peers:
        return True
    return any(_peer_admits(peer, policy_ns, source) for peer in peers)


def admits(policies: list[Mapping[str, Any]], source: Pod | None, target: Pod, port: int) -> bool:
    """Whether a TCP connection from `source` to `target:port` is allowed by the ingress rules."""
    selecting = []
    for policy in policies:
        spec = policy["spec"]
        assert spec.get("policyTypes"), f"{policy['metadata']['name']}: say policyTypes"
        assert set(spec["policyTypes"]) == {"Ingress"}, "egress: not modelled here"
        if policy["metadata"]["namespace"] == target.namespace and _selects(
            spec["podSelector"], target.labels
        ):
            selecting.append(policy)
    if not selecting:
        return True  # a pod no policy selects is not isolated
    return any(
        _rule_admits(rule, policy["metadata"]["namespace"], source, port)
        for policy in selecting
        for rule in policy["spec"].get("ingress", [])
    )


def _pods(objs: tuple[dict[str, Any], ...]) -> dict[str, Pod]:
    """The platform's pods by workload name, with the labels Kubernetes gives them."""
    pods = {}
    for obj in objs:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        name = obj["metadata"]["name"]
        labels = dict(obj["spec"]["template"].get("metadata", {}).get("labels", {}))
        if obj["kind"] == "Job":
            labels |= {"batch.kubernetes.io/job-name": name, "job-name": name}
        pods[name] = Pod(obj["metadata"]["namespace"], labels)
    return pods


# Clients outside the platform's namespaces.
PIPELINE_STEP = Pod("kubeflow", {"pipelines.kubeflow.org/v2_component": "true", "app": "x"})
KUBEFLOW_OTHER = Pod("kubeflow", {"app": "ml-pipeline"})
PROFILE_POD = Pod(
    "kubeflow-user-example-com", {"notebook-name": "nb"}, {"app.kubernetes.io/part-of": "kubeflow-profile"}
)
STRANGER = Pod("default", {"app": "anything"})
GATEWAY = Pod("istio-system", {"app": "istio-ingressgateway", "istio": "ingressgateway"})
OUTSIDE = None  # a client beyond the node (the laptop's submitter through the NodePort)

BUILDS = ["dev", "kubeflow-monitoring/local", "standalone-kfp-monitoring/local"]


def _policies(build: str) -> list[dict[str, Any]]:
    return [o for o in _render(build) if o["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("build", BUILDS)
def test_who_may_connect_to_what(build: str) -> None:
    objs = _render(build)
    policies = _policies(build)
    pods = _pods(objs)
    porter, prometheus, grafana = pods["porter"], pods["prometheus"], pods["grafana"]
    mlflow, postgres, s3, buckets = (
        pods["mlflow"],
        pods["postgres"],
        pods["mlflow-s3"],
        pods["mlflow-s3-buckets"],
    )
    allowed = [
        ("prometheus", prometheus, porter, 5555),
        ("pipeline step", PIPELINE_STEP, porter, 5555),
        ("profile pod", PROFILE_POD, porter, 5555),
        ("the laptop, over TLS", OUTSIDE, porter, 8443),
        ("a stranger, over TLS (its token decides)", STRANGER, porter, 8443),
        ("mlflow", mlflow, postgres, 5432),
        ("porter", porter, postgres, 5432),
        ("mlflow", mlflow, s3, 9000),
        ("bucket job", buckets, s3, 9000),
        ("porter", porter, s3, 9000),
        ("pipeline step", PIPELINE_STEP, s3, 9000),
        ("profile pod", PROFILE_POD, s3, 9000),
        ("pipeline step", PIPELINE_STEP, mlflow, 5000),
        ("profile pod", PROFILE_POD, mlflow, 5000),
        ("grafana", grafana, prometheus, 9090),
    ]
    denied = [
        ("a stranger", STRANGER, porter, 5555),
        ("another kubeflow pod", KUBEFLOW_OTHER, porter, 5555),
        ("the laptop, plain HTTP", OUTSIDE, porter, 5555),
        ("grafana", grafana, porter, 5555),
        ("a profile pod", PROFILE_POD, postgres, 5432),
        ("a pipeline step", PIPELINE_STEP, postgres, 5432),
        ("prometheus", prometheus, postgres, 5432),
        ("grafana", grafana, postgres, 5432),
        ("a stranger", STRANGER, postgres, 5432),
        ("mlflow on another port", mlflow, postgres, 22),
        ("a stranger", STRANGER, s3, 9000),
        ("another kubeflow pod", KUBEFLOW_OTHER, s3, 9000),
        ("prometheus", prometheus, s3, 9000),
        ("the gateway", GATEWAY, s3, 9000),
        ("a stranger", STRANGER, mlflow, 5000),
        ("the laptop", OUTSIDE, mlflow, 5000),
        ("a profile pod", PROFILE_POD, prometheus, 9090),
        ("a stranger", STRANGER, grafana, 3000),
        ("porter", porter, grafana, 3000),
    ]
    names = {id(p): n for n, p in pods.items()}
    wrong = [
        f"{who} -> {names.get(id(t), t)}:{port} should be {'allowed' if want else 'denied'}"
        for want, pairs in ((True, allowed), (False, denied))
        for who, src, t, port in pairs
        if admits(policies, src, t, port) != want
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("build", BUILDS)
def test_every_platform_pod_is_isolated_and_every_policy_port_is_served(build: str) -> None:
    """Default-deny in each platform namespace (a pod added later is closed until a policy opens it),
    and each port a policy opens is a containerPort of the pods it selects (a renamed port would
    otherwise open nothing)."""
    objs = _render(build)
    policies = _policies(build)
    for ns in PLATFORM_NAMESPACES:
        assert any(
            p["metadata"]["namespace"] == ns
            and p["spec"]["podSelector"] == {}
            and not p["spec"].get("ingress")
            for p in policies
        ), f"{ns}: no default-deny ingress policy"
    container_ports: dict[str, set[int]] = {}
    for obj in objs:
        if obj["kind"] in ("Deployment", "Job"):
            spec = obj["spec"]["template"]["spec"]
            container_ports[obj["metadata"]["name"]] = {
                p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])
            }
    pods = _pods(objs)
    for policy in policies:
        selected = [
            n
            for n, pod in pods.items()
            if pod.namespace == policy["metadata"]["namespace"]
            and _selects(policy["spec"]["podSelector"], pod.labels)
        ]
        assert selected, f"{policy['metadata']['name']} selects no pod"
        for rule in policy["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                for name in selected:
                    assert p["port"] in container_ports[name], (
                        f"{policy['metadata']['name']}: {name} has no port {p['port']}"
                    )


def test_evaluator_follows_the_rules() -> None:
    """The evaluator itself on hand-made cases: no policy admits everything; an empty `from` admits
    every source; `podSelector` alone means the policy's namespace; namespace and pod selectors in one
    peer both apply; matchExpressions."""
    target = Pod("a", {"app": "db"})
    assert admits([], STRANGER, target, 1)
    deny = {
        "metadata": {"name": "d", "namespace": "a"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    assert not admits([deny], STRANGER, target, 1)
    same_ns = {
        "metadata": {"name": "s", "namespace": "a"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "db"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 5432}]},
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchExpressions": [{"key": "team", "operator": "In", "values": ["x"]}]
                            },
                            "podSelector": {"matchLabels": {"role": "job"}},
                        }
                    ]
                },
            ],
        },
    }
    assert admits([deny, same_ns], Pod("a", {"app": "web"}), target, 5432)
    assert not admits([deny, same_ns], Pod("a", {"app": "web"}), target, 22)
    assert not admits([deny, same_ns], Pod("b", {"app": "web"}), target, 5432), (
        "podSelector alone: own namespace"
    )
    assert admits([deny, same_ns], Pod("b", {"role": "job"}, {"team": "x"}), target, 22), "no ports: all"
    assert not admits([deny, same_ns], Pod("b", {"role": "other"}, {"team": "x"}), target, 22)
    assert not admits([deny, same_ns], Pod("b", {"role": "job"}, {"team": "y"}), target, 22)
    assert not admits([deny, same_ns], OUTSIDE, target, 5432)
    anyone = {
        "metadata": {"name": "o", "namespace": "a"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": [{"ports": [{"port": 443}]}]},
    }
    assert admits([anyone], OUTSIDE, target, 443)
    assert not admits([anyone], OUTSIDE, target, 80)
