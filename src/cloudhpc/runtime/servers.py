"""The one way cloudhpc runs an HTTP server (uvicorn) next to other work in the same event loop:
porter's API and the submitter's `/healthz` + `/metrics` both start and stop through `serving`.

The socket is bound here, before uvicorn starts, so that a busy or wrong address is one
`ConfigError` naming the key (uvicorn itself would log and `sys.exit`). uvicorn installs no signal
handlers: `until_signalled` is the process's one handler and stops every role together.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cloudhpc.config import parse_listen
from cloudhpc.exceptions import ConfigError

__all__ = ["bind", "serving", "until_signalled"]

# Long-polls (the agent's work poll, `?wait=`) must not hold a shutdown for their full timeout.
_GRACE_SECONDS = 2

MAX_HEAD_BYTES = 16 * 1024
"""The most a request line and headers may take: h11's bound (its DEFAULT_MAX_INCOMPLETE_EVENT_SIZE),
which porter had while uvicorn parsed with h11; porter's requests need a few hundred bytes."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a bound on the request head.

    httptools (C, llhttp) costs porter less CPU per request than h11 (docs/benchmarks.md, "httptools
    vs h11"), but neither it nor uvicorn bounds a request head: a client sending an endless header
    or URL had porter buffer all of it (64 MiB: +117 MiB resident), before authentication. This
    counts the bytes received while a head is incomplete and answers 400 and closes over
    MAX_HEAD_BYTES, as h11 did. A read in which a message ends is not counted (the next head may
    start in it): the bound is exceeded by at most one read (asyncio reads at most 256 KiB).
    """

    _in_head = True
    _head_bytes = 0
    _message_ended = False

    def data_received(self, data: bytes) -> None:
        self._message_ended = False
        super().data_received(data)
        if not self._in_head or self._message_ended or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            message = f"Request line and headers over {MAX_HEAD_BYTES} bytes."
            self.logger.warning(message)
            self.send_400_response(message)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head, self._head_bytes, self._message_ended = True, 0, True
        super().on_message_complete()


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: `until_signalled` stops porter and agents together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(listen: str, *, key: str) -> socket.socket:
    """A listening socket on `listen` (HOST:PORT); `key` names the setting in the error."""
    host, port = parse_listen(listen)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"{key}: cannot listen on {listen}: {exc.strerror or exc} (choose a free port)"
        ) from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


@asynccontextmanager
async def serving(
    app: ASGIApp,
    sock: socket.socket,
    *,
    lifespan: bool,
    before_stop: Callable[[], None] | None = None,
) -> AsyncIterator[asyncio.Task[None]]:
    """Serve `app` on `sock` while the block runs; the block starts once the server accepts
    connections (after the app's lifespan startup). The yielded task ends if the server stops on
    its own. On exit `before_stop` runs first (porter answers its long-polls with it), then the
    server gets `_GRACE_SECONDS` for requests in flight; the socket is closed in any case."""
    config = uvicorn.Config(
        app,
        log_level="warning",
        http=BoundedHttpToolsProtocol,
        lifespan="on" if lifespan else "off",
        timeout_graceful_shutdown=_GRACE_SECONDS,
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task  # a failed lifespan startup raises here (uvicorn's SystemExit)
                raise ConfigError(f"the server on {sock.getsockname()} stopped while starting")
            await asyncio.sleep(0.05)
        yield task
    finally:
        if before_stop is not None:
            before_stop()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        sock.close()


async def until_signalled(*, or_ended: asyncio.Task[None] | None = None) -> None:
    """Returns on SIGINT or SIGTERM, or as soon as `or_ended` (a server that stopped) ends."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    signalled = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait(
            [signalled] if or_ended is None else [signalled, or_ended], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        signalled.cancel()
