"""Malformed HTTP to a real porter process (`cloudhpc serve porter`, uvicorn with httptools).

What porter answers to broken requests is decided by its HTTP parser before the app sees them.
With httptools (since h11 was dropped for its CPU cost, docs/benchmarks.md "httptools vs h11") some
answers differ from h11's; these are the ones kept, pinned here: never a 5xx, a 400 for what
cannot be parsed or could be read two ways (Content-Length with chunked, two lengths: request
smuggling), and the app's own answer where httptools accepts what h11 answered 400 (no `Host`,
HTTP/0.9, an empty line before the request line). An endless head is cut at
`cloudhpc.runtime.servers.MAX_HEAD_BYTES`: porter's memory stays flat (httptools alone buffered
all of it).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.e2e.harness import Deployment, porter_alone
from tests.integration.test_bounded_inputs import RSS_BOUND, PeakRss
from tests.testbed import Testbed

MiB = 1 << 20
JOBS = b"/api/v1/jobs"

CASES: dict[str, tuple[bytes, int]] = {
    "garbage": (b"GARBAGE\r\n\r\n", 400),
    "space in the method": (b"GE T /api/v1/jobs HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "unknown HTTP version": (b"GET /api/v1/jobs HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    "header without a colon": (b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nBadHeader\r\n\r\n", 400),
    "space before the colon": (b"GET /api/v1/jobs HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "NUL in a header": (b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "control byte in the path": (b"GET /api/v1/jo\x01bs HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "relative target": (b"GET api/v1/jobs HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "bare LF line ends": (b"GET /api/v1/jobs HTTP/1.1\nHost: x\n\n", 400),
    "folded header": (b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", 400),
    "length not a number": (b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
    "negative length": (b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400),
    "two lengths": (
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
        400,
    ),
    "length and chunked": (
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "bad chunk size": (
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "unknown transfer coding": (
        b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        400,
    ),
    # accepted by httptools (h11 answered 400): the app answers, as to any such request
    "HTTP/1.1 without Host": (b"GET /api/v1/jobs HTTP/1.1\r\n\r\n", 401),
    "HTTP/0.9 request line": (b"GET /\r\n\r\n", 404),
    "empty line before the request": (b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200),
}


@pytest.fixture(scope="module")
def porter(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One real porter process (no submitter) on SQLite for the module."""
    with porter_alone(tmp_path_factory.mktemp("malformed-http"), testbed) as dep:
        yield dep


def status_of(port: int, request: bytes) -> int:
    """The status porter answers to `request` written as is, within 10 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        status_line = sock.makefile("rb").readline()
    assert status_line.startswith(b"HTTP/1.1 "), f"no answer: {status_line!r}"
    return int(status_line.split()[1])


@pytest.mark.parametrize(("request_bytes", "status"), CASES.values(), ids=CASES.keys())
def test_malformed_requests_get_the_status_kept(
    porter: Deployment, request_bytes: bytes, status: int
) -> None:
    assert status_of(porter.port, request_bytes) == status


def test_an_endless_head_is_cut_and_porter_stays_small(porter: Deployment) -> None:
    """64 MiB of one header's value: porter answers 400 (or resets the connection while the client
    still writes) after 16 KiB, and its resident memory does not grow with what was sent."""
    answers: list[bytes] = []

    def read_status_line() -> None:
        try:
            answers.append(sock.makefile("rb").readline())
        except OSError:
            answers.append(b"reset")

    with socket.create_connection(("127.0.0.1", porter.port), timeout=10) as sock:
        reader = threading.Thread(target=read_status_line, daemon=True)
        with PeakRss(porter.processes["porter"].pid) as memory:
            sock.sendall(b"GET " + JOBS + b" HTTP/1.1\r\nHost: x\r\nX-Big: ")
            reader.start()
            sent = 0
            try:
                while sent < 64 * MiB:
                    sock.sendall(b"a" * (64 << 10))
                    sent += 64 << 10
            except OSError:
                pass  # porter closed the connection: what is being tested
            reader.join(timeout=10)
    print(
        f"endless head: {answers}, {sent / MiB:.1f} MiB written before porter closed; "
        f"porter RSS {memory.baseline / MiB:.0f} -> peak {memory.peak / MiB:.0f} MiB"
    )
    assert answers in ([b"HTTP/1.1 400 Bad Request\r\n"], [b""], [b"reset"]), answers
    assert sent < 64 * MiB, "porter read the whole 64 MiB head"
    assert memory.growth < RSS_BOUND, f"porter grew by {memory.growth / MiB:.0f} MiB"
    assert status_of(porter.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") == 200  # still serving
