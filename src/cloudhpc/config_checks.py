"""The value rules of the settings that are plain functions: listen addresses, loopback and IP
hosts, pip's package locations, and where porter.bridge can publish bridges to Kubernetes pods.

`cloudhpc.config` applies them in its validators (a `ValueError` is reported by pydantic under the
key being loaded) and re-exports `parse_listen`, `is_loopback` and `is_ip_address`.
"""

from __future__ import annotations

import ipaddress

__all__ = ["is_ip_address", "is_loopback", "parse_listen", "pip_location", "publishable"]


def parse_listen(value: str) -> tuple[str, int]:
    """The one reading of a listen address (`porter.listen`, `submitter.listen`): HOST:PORT to the
    host and port a socket binds; an IPv6 host may be bracketed (`[::1]:5556`).

    A `ValueError`, so that pydantic reports a bad value under its key when the file is loaded.
    """
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} must look like HOST:PORT (e.g. 127.0.0.1:5555)")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`: an address only the host itself reaches."""
    if host.strip("[]").lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def pip_location(value: str, *, paths: bool) -> str:
    """One `clusters.<name>.pip` value: a URL (http, https, file) or, for find_links, a path on the
    cluster (absolute or `~/...`). Never a leading `-` (it cannot read as another pip option, even
    though each value is one quoted argument), control characters, or spaces in a URL."""
    if not value or value != value.strip() or not value.isprintable():
        raise ValueError(f"{value!r}: no leading or trailing spaces, no control characters")
    if value.startswith(("https://", "http://", "file://")):
        if any(ch.isspace() for ch in value):
            raise ValueError(f"{value!r}: a URL has no spaces (write %20)")
        return value
    if paths and value.startswith(("/", "~/")):
        return value
    raise ValueError(
        f"{value!r} must be an http(s):// or file:// URL"
        + (", or an absolute path (or ~/...) on the cluster" if paths else "")
    )


def publishable(bind_address: str, public_host: str) -> None:
    """With Kubernetes publishing, the EndpointSlice holds `public_host` (porter.bridge's): it must be
    an address that pods reach (not loopback: that is the pod itself) and an IP (kube-proxy does not
    route an `FQDN` EndpointSlice). A `ValueError` naming the key to change otherwise."""
    if is_loopback(bind_address):
        raise ValueError(
            f"porter.bridge.bind_address: {bind_address!r} is loopback, and with "
            "porter.bridge.kubernetes.enabled the EndpointSlice would point pods at it (their own "
            "loopback); set the bridge VM's private address, where sshd binds the jobs' -R ports "
            "(`GatewayPorts clientspecified`; docs/bridge-vm.md)"
        )
    if not is_ip_address(public_host):
        field = "bind_address" if public_host == bind_address else "host"
        raise ValueError(
            f"porter.bridge.{field}: {public_host!r} is a host name, and with "
            "porter.bridge.kubernetes.enabled it would become an `FQDN` EndpointSlice, which "
            "kube-proxy does not route; set porter.bridge.bind_address to the bridge VM's private "
            "IP address"
        )
