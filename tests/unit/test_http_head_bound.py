"""The request-head bound of every cloudhpc uvicorn server (`runtime.servers`, httptools parser).

httptools and uvicorn buffer a request line and headers of any length; `BoundedHttpToolsProtocol`
answers 400 and closes once an incomplete head passes MAX_HEAD_BYTES, as h11 did. These tests run
`serving` (the one way a server starts) on a loopback socket and speak raw HTTP to it: a head over
the bound is refused without the server waiting for its end; heads under it are served, one after
another on a keep-alive connection and pipelined behind a body (a count of whole reads would refuse
that one).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.types import Receive, Scope, Send

from cloudhpc.runtime.servers import MAX_HEAD_BYTES, bind, serving


async def _echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 200 with the length of the body it read."""
    assert scope["type"] == "http"
    length, more = 0, True
    while more:
        message = await receive()
        length += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", b"%d" % len(str(length)))],
        }
    )
    await send({"type": "http.response.body", "body": str(length).encode()})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    sock = bind("127.0.0.1:0", key="test.listen")
    async with serving(_echo_length, sock, lifespan=False):
        yield sock.getsockname()[1]


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status and body of one answer (Content-Length framed), within 5 s."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
    status_line, *headers = head.decode("latin-1").split("\r\n")
    length = next(int(h.split(":")[1]) for h in headers if h.lower().startswith("content-length:"))
    return int(status_line.split()[1]), await asyncio.wait_for(reader.readexactly(length), timeout=5)


def _head(filler: int, *, end: bool = True) -> bytes:
    """A GET whose head is `filler` bytes of one header's value and the request line around it."""
    head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Filler: " + b"a" * filler
    return head + b"\r\n\r\n" if end else head


async def test_an_unfinished_head_over_the_bound_is_400_at_once(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_head(MAX_HEAD_BYTES + 4096, end=False))  # never finished: no answer without a bound
    await writer.drain()
    status, body = await _answer(reader)
    assert (status, body) == (400, f"Request line and headers over {MAX_HEAD_BYTES} bytes.".encode())
    assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed
    writer.close()


async def test_only_a_head_over_the_bound_is_refused(port: int) -> None:
    """The count is of one head: on one connection, two heads of 3/4 of the bound are served; so is
    a head that arrives together with the 256 KiB body of the request before it; the next head
    over the bound is refused."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(_head(MAX_HEAD_BYTES * 3 // 4))
        assert await _answer(reader) == (200, b"0")
    body = b"x" * (256 << 10)
    writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    writer.write(_head(MAX_HEAD_BYTES * 3 // 4, end=False))
    await writer.drain()
    assert await _answer(reader) == (200, str(len(body)).encode())
    writer.write(b"\r\n\r\n")
    assert await _answer(reader) == (200, b"0")
    writer.write(_head(MAX_HEAD_BYTES + 4096, end=False))
    assert (await _answer(reader))[0] == 400
    writer.close()
