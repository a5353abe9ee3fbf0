#!/usr/bin/env python3
"""A TCP relay that delays every byte by a fixed time in each direction (the testbed's link latency).

The machine's kernel has no `netem` qdisc, so the multi-host testbed (scripts/topology.sh) puts
latency on the paths that matter with this relay instead: it runs in the router namespace, nftables
there redirects the laptop's connections to login:22 and to porter on cloud:5555 to it, and it
connects onwards from the address given with --source. Standard library only.

    delay_relay.py --delay-ms 10 --source 198.18.1.1 \
        --route 198.18.1.1:40022=198.18.3.10:22 --route 198.18.1.1:45555=198.18.2.10:5555

Each chunk read from one side is written to the other side `delay` after it was read, in order;
EOF (a half-close) is passed on after the last chunk, also delayed. A new connection reaches the
server 3 x delay after the client connected (the TCP handshake over the delayed link), so the first
answer takes 4 x delay, as it would; when the server refuses, the client's connection is reset.
With --delay-ms 0 it is a plain relay. SIGTERM stops it (open connections are closed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

CHUNK = 65536


@dataclass(frozen=True)
class Route:
    listen_host: str
    listen_port: int
    target_host: str
    target_port: int


def parse_route(text: str) -> Route:
    """`LISTEN_HOST:PORT=TARGET_HOST:PORT`."""
    try:
        listen, target = text.split("=", 1)
        lh, lp = listen.rsplit(":", 1)
        th, tp = target.rsplit(":", 1)
        return Route(lh, int(lp), th, int(tp))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not LISTEN_HOST:PORT=TARGET_HOST:PORT") from exc


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Pipe:
    """One direction: chunks stamped when they were read, written `delay` later, in order."""

    def __init__(self, reader: asyncio.StreamReader, delay: float) -> None:
        self.delay = delay
        # bounded: a slow receiver slows the sender down (TCP backpressure) instead of filling memory
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=256)
        self.reading = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                await self.queue.put((time.monotonic() + self.delay, data))
                if not data:
                    return
        except OSError:
            await self.queue.put((time.monotonic() + self.delay, b""))

    async def write_to(self, writer: asyncio.StreamWriter) -> None:
        """Deliver to `writer` (EOF passed on as a half-close) until the reading side ends."""
        try:
            while True:
                due, data = await self.queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            self.reading.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset: what a client sees of a refused connection once it has been accepted."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _serve(
    route: Route,
    source: str | None,
    delay: float,
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
) -> None:
    _nodelay(client_w)
    # what the client sends is stamped from now on, while the onward connection is being made
    upstream = _Pipe(client_r, delay)
    try:
        # the onward connection reaches the server when it would have over the delayed link: after the
        # SYN, SYN-ACK and ACK (3 x delay), so a server's first bytes arrive 4 x delay after the
        # client's connect, as they would. (The client's own connect() returns at once.)
        await asyncio.sleep(3 * delay)
        local = (source, 0) if source else None
        up_r, up_w = await asyncio.wait_for(
            asyncio.open_connection(route.target_host, route.target_port, local_addr=local), 10
        )
    except (OSError, TimeoutError) as exc:
        peer = client_w.get_extra_info("peername")
        print(f"delay_relay: {peer} -> {route.target_host}:{route.target_port}: {exc!r}", file=sys.stderr)
        upstream.reading.cancel()
        _reset(client_w)
        return
    _nodelay(up_w)
    downstream = _Pipe(up_r, delay)
    pumps = [asyncio.create_task(upstream.write_to(up_w)), asyncio.create_task(downstream.write_to(client_w))]
    try:
        await asyncio.gather(*pumps)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for task in pumps:
            task.cancel()
        for w in (client_w, up_w):
            w.close()


async def main_async(routes: list[Route], source: str | None, delay_ms: float) -> None:
    delay = delay_ms / 1000.0
    servers = []
    for route in routes:

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, route: Route = route) -> None:
            await _serve(route, source, delay, r, w)

        servers.append(
            await asyncio.start_server(handle, route.listen_host, route.listen_port, reuse_address=True)
        )
        print(
            f"delay_relay: {route.listen_host}:{route.listen_port} -> {route.target_host}:{route.target_port}"
            f" delay {delay_ms:g} ms each way",
            file=sys.stderr,
            flush=True,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--delay-ms", type=float, default=10.0, help="delay in each direction (0: none)")
    parser.add_argument("--source", default=None, help="local address for the onward connections")
    parser.add_argument(
        "--route",
        type=parse_route,
        action="append",
        required=True,
        help="LISTEN_HOST:PORT=TARGET_HOST:PORT (repeat)",
    )
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    asyncio.run(main_async(args.route, args.source, args.delay_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
