"""Is a bridge really usable? One probe from porter's side, through the tunnel, to the job.

A plain TCP connect is not enough: with `ssh -R`, the bridge VM's sshd accepts connections on the
forwarded port as soon as the tunnel is up, even while nothing listens on the job's side, and then
closes them. So:

- for a port that speaks HTTP (the dashboard, metrics), the probe asks for a page and accepts any
  HTTP answer;
- for any other port, the probe connects and waits a moment: a connection sshd closes at once has no
  service behind it; one that stays open (or sends a greeting) has.
"""

from __future__ import annotations

import asyncio
import contextlib

import httpx

__all__ = ["probe_bridge", "probe_http", "probe_tcp"]

CONNECT_TIMEOUT = 2.0
SETTLE = 0.5
"""Seconds a TCP probe waits for sshd to close a connection that has nothing behind it."""


async def probe_tcp(
    host: str, port: int, *, timeout: float = CONNECT_TIMEOUT, settle: float = SETTLE
) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        try:
            data = await asyncio.wait_for(reader.read(1), settle)
        except TimeoutError:
            return True  # still open, silent: a server waiting for its client to speak first
        except OSError:
            return False
        return bool(data)  # b"" is EOF: sshd found nobody behind the tunnel
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


async def probe_http(
    client: httpx.AsyncClient, host: str, port: int, *, path: str = "/", timeout: float = 3.0
) -> bool:
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"
    try:
        response = await client.get(url, timeout=timeout)
    except httpx.HTTPError:
        return False
    return response.status_code < 500


async def probe_bridge(client: httpx.AsyncClient, host: str, port: int, *, http: bool) -> bool:
    if http:
        return await probe_http(client, host, port)
    return await probe_tcp(host, port)
