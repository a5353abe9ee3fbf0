"""The submitter trusts porter's certificate through `SSL_CERT_FILE` (docs/submitter.md, docs/platform.md
section 8 step 4), with no setting of its own: its HTTP client is httpx, which reads the variable.

No nginx runs here, so porter's TLS endpoint is stood in for by a small TLS server on loopback with a
certificate for 127.0.0.1 signed by a CA made for the test (as scripts/platform-up.sh makes one);
the client side is the submitter's real `HttpChannel`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cloudhpc.exceptions import ChannelError
from cloudhpc.submitter.channel import HttpChannel

TOKEN = "agent-token-for-the-tls-test"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for 127.0.0.1, made with the same openssl steps as platform-up.sh."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(d / "ca.key"))
    _openssl(
        "req", "-x509", "-new", "-key", str(d / "ca.key"), "-days", "2", "-subj", "/CN=test platform CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(d / "ca.pem"),
    )  # fmt: skip
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(d / "tls.key"))
    _openssl("req", "-new", "-key", str(d / "tls.key"), "-subj", "/CN=127.0.0.1", "-out", str(d / "tls.csr"))
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "x509", "-req", "-in", str(d / "tls.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
        "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext"), "-out", str(d / "tls.crt"),
    )  # fmt: skip
    return d


@pytest.fixture
def tls_porter(pki: Path) -> Iterator[tuple[str, list[str]]]:
    """A stand-in for porter's TLS endpoint answering the agent's work poll; records Authorization."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            body = json.dumps({"jobs": []}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "tls.crt", pki / "tls.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


async def _poll(url: str) -> list[object]:
    channel = HttpChannel(url, TOKEN, attempts=1)
    try:
        return list(await channel.claim_work("mahti", wait=0))
    finally:
        await channel.close()


def test_the_platform_ca_in_ssl_cert_file_is_trusted(
    pki: Path, tls_porter: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = tls_porter
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    assert asyncio.run(_poll(url)) == []
    assert seen == [f"Bearer {TOKEN}"], "the token went over TLS"


def test_without_it_the_certificate_is_refused(
    tls_porter: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, seen = tls_porter
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(ChannelError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        asyncio.run(_poll(url))
    assert seen == [], "no request (and no token) reached a server it does not trust"
