"""Bounded request bodies: porter never holds more of a request than it is willing to store.

Two layers. `RequestSizeLimit` is plain ASGI around the whole app: a declared `Content-Length`
over the limit is answered 413 before a byte of the body is read, and a body sent without one
(chunked) is counted as it streams in and cut off at the limit, so a 100 MiB POST never reaches
memory. `read_capped` is the same rule inside a route, for the agent routes whose own caps are
tighter than the app-wide one (an output chunk, an accounting document). `UserSlots` bounds how
many requests of one costly kind (an upload being spooled, a question to an agent) each user has in
progress at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter.errors import error_body

__all__ = ["RequestSizeLimit", "UserSlots", "read_capped", "spool_capped", "too_large"]

log = logging.getLogger(__name__)

_CODE: Final = "too_large"


def _limit_message(limit: int, what: str) -> str:
    return f"{what} is over the limit of {limit} bytes"


def too_large(limit: int, what: str, setting: str | None = None) -> HttpProblem:
    """The 413 for a body over `limit` bytes; `setting` names the configuration key that sets it."""
    message = _limit_message(limit, what)
    if setting:
        message += f" ({setting})"
    return HttpProblem(413, _CODE, message, {"limit": limit})


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None when it sent none. A malformed one counts as none:
    the server's parser (httptools, `runtime.servers`) answers 400 before the app sees the request."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestSizeLimit:
    """Answers 413 to every HTTP request whose body is over `limit` bytes, reading at most that much.

    When the body turns out too large while the app is reading it, the app's own answer to the
    interrupted read (whatever it makes of the exception) is dropped and the 413 sent instead.

    `own_limits` are `(method, path regex, limit, what)` of routes whose bodies have a cap of their
    own instead (an artifact upload: larger than the app-wide one, and spooled to disk, never held).
    """

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        setting: str = "porter.max_request_bytes",
        own_limits: Sequence[tuple[str, str, int, str]] = (),
    ) -> None:
        self.app = app
        self.limit = limit
        self.setting = setting
        self.own_limits = [(m, re.compile(p), n, what) for m, p, n, what in own_limits]

    def _limit(self, scope: Scope | None) -> tuple[int, str, str | None]:
        """The cap of this request's body: (bytes, what it is, the setting that sets it)."""
        if scope is not None:
            for method, pattern, limit, what in self.own_limits:
                if scope.get("method") == method and pattern.match(scope.get("path", "")):
                    return limit, what, None
        return self.limit, "the request body", self.setting

    def _problem(self, scope: Scope | None = None) -> HttpProblem:
        return too_large(*self._limit(scope))

    async def _refuse(self, send: Send, scope: Scope | None = None) -> None:
        problem = self._problem(scope)
        body = json.dumps(error_body(problem.code, problem.message, problem.details)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)[0]
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(send, scope)
            return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise self._problem(scope)  # into the app's read; never leaves this middleware
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a read it could not finish; the 413 follows
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            log.info("refused a request body over %d bytes: %s %s", limit, scope["method"], scope["path"])
            if not started:
                await self._refuse(send, scope)


async def read_capped(request: Request, limit: int, what: str) -> bytes:
    """The request's body, refused with 413 as soon as it passes `limit` bytes (the declared
    Content-Length is checked first), so a route never holds more than its own cap."""
    declared = _declared_length(request.scope)
    if declared is not None and declared > limit:
        raise too_large(limit, what)
    parts: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit, what)
        parts.append(chunk)
    return b"".join(parts)


async def spool_capped(request: Request, path: Path, limit: int, what: str) -> int:
    """Write the request's body to a new 0600 file `path` as it arrives, refused with 413 as soon as
    it passes `limit` bytes (the declared Content-Length is checked first), so a large body is never
    held in memory. Returns its size."""
    declared = _declared_length(request.scope)
    if declared is not None and declared > limit:
        raise too_large(limit, what)
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(limit, what)
            handle.write(chunk)
    return size


class UserSlots:
    """Requests of each costly kind each user has in progress on this replica, capped per kind: one
    over its cap is answered 429 at once, so one user cannot take a resource that every user shares
    (porter's temporary disk for spooled uploads, a cluster agent's one SFTP channel). Per replica:
    the event loop is the only writer, so no lock."""

    def __init__(self) -> None:
        self._taken: Counter[tuple[str, str]] = Counter()

    @contextlib.contextmanager
    def take(self, kind: str, user: str, limit: int, what: str) -> Iterator[None]:
        """Hold one of `user`'s `limit` slots of `kind` for the block; `what` names the requests in
        the 429 (`uploads`)."""
        key = (kind, user)
        if self._taken[key] >= limit:
            raise HttpProblem(
                429,
                "too_many_requests",
                f"{self._taken[key]} of your {what} are already in progress (at most {limit} at once): "
                "wait for them to end, then try again",
            )
        self._taken[key] += 1
        try:
            yield
        finally:
            self._taken[key] -= 1
            if not self._taken[key]:
                del self._taken[key]
