"""The one listen-address parser and the one uvicorn helper every `serve` role starts through."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from cloudhpc.config import parse_listen
from cloudhpc.exceptions import ConfigError
from cloudhpc.runtime.servers import bind, serving, until_signalled


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:5555", ("127.0.0.1", 5555)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:5556", ("::1", 5556)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["nonsense", ":5555", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:65536"])
def test_parse_listen_refuses(listen: str) -> None:
    with pytest.raises(ValueError, match="must look like HOST:PORT"):
        parse_listen(listen)


def test_a_busy_port_is_a_config_error_naming_the_key() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(
            ConfigError, match=rf"porter.listen: cannot listen on 127.0.0.1:{port}: .*free port"
        ):
            bind(f"127.0.0.1:{port}", key="porter.listen")
    finally:
        holder.close()


async def _hello(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


async def test_serving_answers_inside_the_block_and_closes_its_socket() -> None:
    sock = bind("127.0.0.1:0", key="test.listen")
    port = sock.getsockname()[1]
    stopped: list[bool] = []
    async with serving(_hello, sock, lifespan=False, before_stop=lambda: stopped.append(True)) as task:
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{port}/")
        assert response.text == "hello"
        assert not task.done()
        assert not stopped
    assert stopped == [True]
    assert task.done()
    assert sock.fileno() == -1


async def test_until_signalled_returns_when_the_server_ends() -> None:
    ended: asyncio.Task[None] = asyncio.create_task(asyncio.sleep(0))
    await asyncio.wait_for(until_signalled(or_ended=ended), timeout=5)
