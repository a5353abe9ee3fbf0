"""The Kubernetes side of bridges, offline: rendered objects against the official schemas, names and
labels, the publisher's calls (through the recording API), and the authorized_keys line.

No API server can run here; `test_official_client_sends_server_side_apply` checks instead what the
official client puts on the wire, captured by a local HTTP endpoint that records requests and
answers 200 (it emulates nothing of Kubernetes' behaviour).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from cloudhpc.bridges.authorized_key import NO_DESTINATION, authorized_key_line, parse_permit_open
from cloudhpc.bridges.kubernetes import (
    FIELD_MANAGER,
    LABEL_BRIDGE,
    LABEL_JOB,
    LABEL_MANAGED_BY,
    LABEL_OWNER,
    BridgePublisher,
    OfficialKubernetesApi,
    RecordingKubernetesApi,
    label_value,
    render_endpoint_slice,
    render_service,
    service_dns,
    service_name,
)
from cloudhpc.config import BridgeConfig, Settings
from cloudhpc.domain.jobs import Bridge
from cloudhpc.secrets_json import apply_secrets_json

JOB = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def bridge(
    name: str = "dashboard", host: str = "192.0.2.10", port: int = 19500, remote: int = 8265
) -> Bridge:
    return Bridge(
        name=name, remote_port=remote, bridge_host=host, bridge_port=port, url=f"http://{host}:{port}"
    )


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("name", "host", "owner"),
    [
        ("dashboard", "192.0.2.10", "alice"),
        ("client", "2001:db8::10", "bob@example.org"),
        (
            "Weird.Name_-",
            "bridge.example.org",
            "ÄÖ user with spaces and a very long name that goes on and on and on",
        ),
        ("-x", "192.0.2.10", "-"),
    ],
)
def test_rendered_objects_pass_the_kubernetes_schemas(name: str, host: str, owner: str, version: str) -> None:
    b = bridge(name, host)
    for obj in (render_service(JOB, owner, b, "cloudhpc"), render_endpoint_slice(JOB, owner, b, "cloudhpc")):
        kubernetes_validate.validate(obj, version, strict=True)


def test_names_labels_and_the_service_endpoint_pairing() -> None:
    b = bridge()
    svc = render_service(JOB, "alice", b, "cloudhpc")
    eps = render_endpoint_slice(JOB, "alice", b, "cloudhpc")
    name = service_name(JOB, "dashboard")
    assert name == f"chpc-{JOB.hex[:16]}-dashboard"
    assert svc["metadata"]["name"] == eps["metadata"]["name"] == name
    assert "selector" not in svc["spec"], "selector-less: Kubernetes must not manage its endpoints"
    assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == name
    assert svc["spec"]["ports"][0]["name"] == eps["ports"][0]["name"]
    assert svc["spec"]["ports"][0]["port"] == 8265
    assert eps["ports"][0]["port"] == 19500
    assert eps["endpoints"][0]["addresses"] == ["192.0.2.10"]
    assert eps["addressType"] == "IPv4"
    assert render_endpoint_slice(JOB, "a", bridge(host="vm.example.org"), "n")["addressType"] == "FQDN"
    for obj in (svc, eps):
        labels = obj["metadata"]["labels"]
        assert labels[LABEL_MANAGED_BY] == FIELD_MANAGER
        assert labels[LABEL_JOB] == str(JOB)
        assert labels[LABEL_OWNER] == "alice"
        assert labels[LABEL_BRIDGE] == "dashboard"
    assert service_dns(JOB, "dashboard", "cloudhpc") == f"{name}.cloudhpc.svc.cluster.local"
    # names that needed cleaning stay distinct
    assert service_name(JOB, "a.b") != service_name(JOB, "a-b")
    assert label_value("a b") != label_value("a_b")
    assert label_value("alice") == "alice"


def test_publisher_applies_with_its_field_manager_and_deletes_by_label() -> None:
    api = RecordingKubernetesApi()
    publisher = BridgePublisher(api, "cloudhpc")
    other = uuid.uuid4()
    dns = publisher.publish(JOB, "alice", bridge())
    publisher.publish(JOB, "alice", bridge("client", port=19501, remote=10001))
    publisher.publish(other, "bob", bridge(port=19502))
    publisher.publish(JOB, "alice", bridge())  # again (a restart): same objects, no duplicates
    assert dns == service_dns(JOB, "dashboard", "cloudhpc")
    applies = [c for c in api.calls if c.verb == "apply"]
    assert {c.field_manager for c in applies} == {FIELD_MANAGER}
    assert {c.kind for c in applies} == {"Service", "EndpointSlice"}
    assert all(
        c.body is not None and c.body["metadata"]["labels"][LABEL_MANAGED_BY] == FIELD_MANAGER
        for c in applies
    )
    assert len(api.objects) == 6
    assert publisher.published_jobs() == {JOB, other}

    assert publisher.withdraw(JOB) == 4
    deletes = [c for c in api.calls if c.verb == "delete"]
    assert {c.kind for c in deletes} == {"Service", "EndpointSlice"}
    assert all(c.label_selector == f"{LABEL_MANAGED_BY}={FIELD_MANAGER},{LABEL_JOB}={JOB}" for c in deletes)
    assert all(c.namespace == "cloudhpc" for c in api.calls)
    assert publisher.published_jobs() == {other}
    assert not any("Namespace" in c.kind for c in api.calls), "a namespace is never created or deleted"


# ---- the official client on the wire ------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.requests.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body.decode()}
        )
        if self.command == "GET":
            item = {
                "metadata": {"name": "chpc-x", "labels": {LABEL_JOB: str(JOB)}},
                "addressType": "IPv4",
                "endpoints": [],
            }
            items = [item]
            payload = json.dumps({"kind": "List", "apiVersion": "v1", "items": items}).encode()
        else:
            payload = body or b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PATCH = do_DELETE = _answer  # noqa: N815 (http.server dispatches on these names)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (_Recorder,), {"requests": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_official_client_sends_server_side_apply(recorder: tuple[str, list[dict[str, Any]]]) -> None:
    from kubernetes import client

    url, seen = recorder
    configuration = client.Configuration()
    configuration.host = url
    api = OfficialKubernetesApi(client.ApiClient(configuration))
    publisher = BridgePublisher(api, "cloudhpc")
    publisher.publish(JOB, "alice", bridge())
    patches = [r for r in seen if r["method"] == "PATCH"]
    assert [r["path"].split("?")[0] for r in patches] == [
        f"/api/v1/namespaces/cloudhpc/services/{service_name(JOB, 'dashboard')}",
        f"/apis/discovery.k8s.io/v1/namespaces/cloudhpc/endpointslices/{service_name(JOB, 'dashboard')}",
    ]
    for r in patches:
        assert r["headers"]["Content-Type"] == "application/apply-patch+yaml"
        assert f"fieldManager={FIELD_MANAGER}" in r["path"]
        assert "force=true" in r["path"].lower()
        assert json.loads(r["body"])["metadata"]["labels"][LABEL_JOB] == str(JOB)
    seen.clear()
    assert publisher.withdraw(JOB) == 2
    gets = [r for r in seen if r["method"] == "GET"]
    assert all(
        "labelSelector=app.kubernetes.io%2Fmanaged-by%3Dcloudhpc-porter%2Ccloudhpc.io%2Fjob-id%3D"
        in r["path"]
        for r in gets
    )
    assert [r["method"] for r in seen if r["method"] == "DELETE"] == ["DELETE", "DELETE"]
    assert publisher.published_jobs() == {JOB}


# ---- authorized_keys ----------------------------------------------------------------------------


def config(**extra: Any) -> BridgeConfig:
    return BridgeConfig.model_validate(
        {
            "host": "vm.example.org",
            "ssh_user": "cloudhpc",
            "key_file": "/k",
            "known_hosts": "/kh",
            "port_range": [19500, 19502],
            **extra,
        }
    )


def test_authorized_key_line() -> None:
    line = authorized_key_line(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@laptop", config(), ["10.0.0.5:5000"]
    )
    options, key_type, blob, comment = line.split(" ")
    assert (key_type, blob, comment) == ("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIB", "cloudhpc-bridge")
    assert options.split(",") == [
        "restrict",
        "port-forwarding",
        'command="/bin/false"',
        'permitlisten="127.0.0.1:19500"',
        'permitlisten="127.0.0.1:19501"',
        'permitlisten="127.0.0.1:19502"',
        'permitopen="10.0.0.5:5000"',
    ]
    none = authorized_key_line("ssh-ed25519 AAAA", config(bind_address="0.0.0.0"))
    assert f'permitopen="{NO_DESTINATION}"' in none
    assert 'permitlisten="0.0.0.0:19500"' in none
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_permit_open("10.0.0.5")
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_permit_open('h:1",command="sh')
    with pytest.raises(ValueError, match="public key"):
        authorized_key_line("not a key", config())


def test_bridge_config_rules() -> None:
    assert config().public_host == "127.0.0.1"
    assert config(bind_address="0.0.0.0").public_host == "vm.example.org"
    assert config(bind_address="10.1.0.4").public_host == "10.1.0.4"
    with pytest.raises(ValueError, match="port_range"):
        config(port_range=[19600, 19500])
    with pytest.raises(ValueError, match="port_range"):
        config(port_range=[80, 90])
    with pytest.raises(ValueError, match="namespace"):
        config(kubernetes={"enabled": True, "namespace": "Bad_NS"})
    assert Path(config().key_file) == Path("/k")


def test_secrets_json_bridge_key_becomes_the_bridge_key_file(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.json"
    secrets.write_text(
        json.dumps(
            {
                "CSC_USER": "alice",
                "MAHTI_NODE_ADDRESS": "mahti.example.org",
                "MAHTI_PRIVATE_KEY_PATH": "/keys/mahti",
                "BRIDGE_PRIVATE_KEY_PATH": "/keys/bridge",
            }
        )
    )
    with_bridge = Settings.model_validate({"porter": {"bridge": config().model_dump(mode="json")}})
    bridge = apply_secrets_json(with_bridge, secrets).porter.bridge
    assert bridge is not None
    assert bridge.key_file == Path("/keys/bridge")
    assert bridge.host == "vm.example.org"
    assert apply_secrets_json(Settings(), secrets).porter.bridge is None
