"""Trusted-host check of tagfer's local web servers (``tagfer serve``, ``tagfer study serve``).

A page on any web site can make the visitor's browser send requests to ``127.0.0.1`` through
a name it controls (DNS rebinding: ``evil.example`` first resolves to the attacker, then to
127.0.0.1). Such requests carry ``Host: evil.example``; serving only requests whose ``Host``
header names an allowed host (port ignored) defeats it. Allowed by default: ``localhost``,
``127.0.0.1``, ``[::1]`` and the host the server is bound to (unless it is a wildcard such as
``0.0.0.0``); other names are added explicitly (``--allowed-host``). Other hosts get
``400 Invalid host header`` (starlette's ``TrustedHostMiddleware`` does the check).

Cross-origin requests (CSRF). A page on any site can also make the browser *post* to the
server under its real name (a form or ``fetch`` to ``http://127.0.0.1:8000/analyze``): the Host
is right, but the browser says where the request comes from. :func:`add_origin_check` refuses
(403) every request other than GET/HEAD/OPTIONS whose ``Origin`` is neither the server's own
(scheme, host and port of the request) nor in the configured origins, ``Origin: null`` included,
and, without an ``Origin``, one whose ``Sec-Fetch-Site`` is not ``same-origin`` or ``none``.
A request with neither header (curl, scripts: not a browser) is served.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["LOCAL_HOSTS", "allowed_hosts", "add_host_check", "add_origin_check", "bind_note", "normalize_host",
           "normalize_origin", "origin_allowed"]

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


# --------------------------------------------------------------------------- origins
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[^:/\[\]]+)(?::(\d{1,5}))?/?")


def normalize_origin(origin: str) -> str:
    """``"HTTP://Example.com:80/"`` → ``"http://example.com"``; ValueError unless it is
    ``http(s)://host[:port]`` (no path, query or user)."""
    m = _ORIGIN.fullmatch(origin.strip().lower())
    if not m:
        raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
    scheme, host, port = m.group(1), normalize_host(m.group(2)), m.group(3)
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"not an origin (bad port): {origin!r}")
    p = int(port) if port is not None else _DEFAULT_PORTS[scheme]
    return f"{scheme}://{host}" + ("" if p == _DEFAULT_PORTS[scheme] else f":{p}")


def _same_origin(origin: str, scheme: str, host_header: str) -> bool:
    """Whether ``origin`` names the server the request was sent to (``scheme`` + ``Host``)."""
    try:
        return normalize_origin(origin) == normalize_origin(f"{scheme}://{host_header}")
    except ValueError:
        return False


def origin_allowed(origin: str | None, sec_fetch_site: str | None, scheme: str, host_header: str,
                   allowed: Iterable[str] = ()) -> bool:
    """The rule of :func:`add_origin_check` for one state-changing request (pure)."""
    if origin is not None:
        o = origin.strip()
        if o.lower() == "null" or not o:
            return False
        if _same_origin(o, scheme, host_header):
            return True
        try:
            return normalize_origin(o) in set(allowed)
        except ValueError:
            return False
    if sec_fetch_site is not None:
        return sec_fetch_site.strip().lower() in ("same-origin", "none")
    return True


class _OriginCheck:
    """ASGI middleware: 403 for a cross-origin state-changing request (module docstring)."""

    def __init__(self, app: Any, origins: Iterable[str] = (), error: Any = None):
        self.app = app
        self.origins = frozenset(origins)
        self.error = error or (lambda message: {"error": {"kind": "cross_origin", "message": message}})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.lower(), v)
        get = lambda k: None if k not in headers else headers[k].decode("latin-1")  # noqa: E731
        origin, site = get(b"origin"), get(b"sec-fetch-site")
        if origin_allowed(origin, site, scope.get("scheme", "http"), get(b"host") or "", self.origins):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse  # lazy (start-up time): starlette

        who = f"origin {origin}" if origin is not None else f"Sec-Fetch-Site: {site}"
        message = (f"cross-origin request refused ({who}): only pages served by this server"
                   + (" or the allowed origins" if self.origins else "") + " may send it")
        resp = JSONResponse(self.error(message), status_code=403, headers={"Connection": "close"})
        await resp(scope, receive, send)


def add_origin_check(app: Any, origins: Iterable[str] = (), error: Any = None) -> list[str]:
    """Refuse cross-origin state-changing requests to ``app`` (module docstring); ``origins``:
    other origins allowed (``http://host:port``; ValueError for a malformed one). ``error``:
    ``message -> JSON body`` of the 403 (default ``{"error": {"kind": "cross_origin", ...}}``).
    Returns the normalised list (also ``app.state.allowed_origins``)."""
    norm = sorted({normalize_origin(o) for o in origins})
    app.add_middleware(_OriginCheck, origins=norm, error=error)
    app.state.allowed_origins = norm
    return norm
