"""A small TCP balancer for tests: what a load balancer in front of porter replicas does, and no more.

Each accepted connection goes to the next backend in turn (round-robin per connection); a backend
that refuses the connection (a replica killed or restarting) is skipped for that connection, so
clients only notice a replica's death through the connections that were open to it. Bytes are
copied both ways until either side closes; when a backend dies mid-request the client's connection
is closed too, as a real balancer would do.

`Balancer` runs on its own event loop in a background thread, so synchronous tests can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Iterator, Sequence

__all__ = ["Balancer", "balancing"]

_CHUNK = 64 << 10


class Balancer:
    """Listens on `host`:`port` (0: any free port, see `port` once started) for `backends`."""

    def __init__(self, backends: Sequence[tuple[str, int]], host: str = "127.0.0.1", port: int = 0) -> None:
        if not backends:
            raise ValueError("a balancer needs at least one backend")
        self.backends = list(backends)
        self.host = host
        self.port = port
        self.connections: dict[tuple[str, int], int] = {b: 0 for b in self.backends}
        """How many client connections each backend was given."""
        self.refused = 0
        """How many times a backend refused a connection and the next one was tried."""
        self._turn = itertools.cycle(range(len(self.backends)))
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting and drop every open connection."""
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The next backend that accepts, starting at the next in turn; None when all refuse."""
        first = next(self._turn)
        for step in range(len(self.backends)):
            backend = self.backends[(first + step) % len(self.backends)]
            try:
                streams = await asyncio.open_connection(*backend)
            except OSError:
                self.refused += 1
                continue
            self.connections[backend] += 1
            return streams
        return None

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        backend = await self._connect()
        if backend is None:
            client_writer.close()
            return
        backend_reader, backend_writer = backend
        pipes = [
            asyncio.create_task(_pipe(client_reader, backend_writer)),
            asyncio.create_task(_pipe(backend_reader, client_writer)),
        ]
        # Either direction ending (EOF or a reset) ends the pair: the other side is closed too.
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        for writer in (backend_writer, client_writer):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()


@contextlib.contextmanager
def balancing(backends: Sequence[tuple[str, int]], port: int = 0) -> Iterator[Balancer]:
    """A started `Balancer` for the block, served from a background thread, stopped afterwards."""
    balancer = Balancer(backends, port=port)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="balancer", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(balancer.start(), loop).result(timeout=10)
        yield balancer
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(balancer.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _serve_forever(listen: tuple[str, int], backends: Sequence[tuple[str, int]]) -> None:
    balancer = Balancer(backends, host=listen[0], port=listen[1])
    await balancer.start()
    await asyncio.Event().wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    """`python -m tests.balancer HOST:PORT BACKEND...`: the balancer as a process of its own (the
    benchmark runs it so, off its load generator's event loop and GIL)."""
    import argparse

    parser = argparse.ArgumentParser(description="round-robin TCP balancer for tests")
    parser.add_argument("listen", type=_address)
    parser.add_argument("backends", type=_address, nargs="+")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args.listen, args.backends))


if __name__ == "__main__":
    main()
