"""Trusted-host check of tagfer's local web servers (``tagfer serve``, ``tagfer study serve``).

A page on any web site can make the visitor's browser send requests to ``127.0.0.1`` through
a name it controls (DNS rebinding: ``evil.example`` first resolves to the attacker, then to
127.0.0.1). Such requests carry ``Host: evil.example``; serving only requests whose ``Host``
header names an allowed host (port ignored) defeats it. Allowed by default: ``localhost``,
``127.0.0.1``, ``[::1]`` and the host the server is bound to (unless it is a wildcard such as
``0.0.0.0``); other names are added explicitly (``--allowed-host``). Other hosts get
``400 Invalid host header`` (starlette's ``TrustedHostMiddleware`` does the check).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["LOCAL_HOSTS", "allowed_hosts", "add_host_check", "bind_note", "normalize_host"]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_WILDCARD_BINDS = {"", "0.0.0.0", "[::]"}
_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def normalize_host(host: str) -> str:
    """``"::1"`` → ``"[::1]"``, ``"Example.COM"`` → ``"example.com"``; ``"*"`` and
    ``"*.example.com"`` are kept; anything else that is not a host name or IP raises ValueError."""
    h = host.strip().lower()
    if h == "*":
        return h
    bare = h[1:-1] if h.startswith("[") and h.endswith("]") else h
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        ip = None
    if ip is not None:
        return f"[{ip.compressed}]" if ip.version == 6 else str(ip)
    if not _NAME.fullmatch(h) or ".." in h:
        raise ValueError(f"not a host name or IP address: {host!r} (no scheme, port or path)")
    return h


def allowed_hosts(bind: str | None = None, extra: Iterable[str] = ()) -> list[str]:
    """The allow-list: :data:`LOCAL_HOSTS`, the bound host (if not a wildcard) and ``extra``
    (``"*"`` in ``extra`` turns the check off)."""
    hosts = list(LOCAL_HOSTS)
    candidates = [bind] if bind is not None else []
    for i, h in enumerate([*candidates, *extra]):
        is_bind = i < len(candidates)
        if is_bind and not h.strip():
            continue
        n = normalize_host(h)
        if is_bind and n in _WILDCARD_BINDS:
            continue
        if n not in hosts:
            hosts.append(n)
    return hosts


def bind_note(bind: str, extra: Iterable[str] = ()) -> str | None:
    """A hint for a server bound to every interface without ``--allowed-host`` (clients that use
    its LAN name or address would get 400), else None."""
    if extra or bind.strip() == "" or normalize_host(bind) not in _WILDCARD_BINDS:
        return None
    return (f"bound to {bind}: only requests addressed to localhost/127.0.0.1/[::1] are served; "
            "add --allowed-host NAME for each name or address clients use")


def add_host_check(app: Any, hosts: Iterable[str] | None = None) -> list[str]:
    """Serve ``app`` only to requests whose Host is in ``hosts`` (default: :data:`LOCAL_HOSTS`).
    Returns the list in force (also kept as ``app.state.allowed_hosts``)."""
    from starlette.middleware.trustedhost import TrustedHostMiddleware  # lazy (start-up time): starlette

    hs = allowed_hosts(None, hosts) if hosts is not None else list(LOCAL_HOSTS)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hs, www_redirect=False)
    app.state.allowed_hosts = hs
    return hs
