"""An httpx transport for hundreds of concurrent requests to a few servers, and proxy rules.

:class:`PooledTransport` is a public ``httpx.AsyncBaseTransport``. httpcore's connection pool
(inside ``httpx.AsyncHTTPTransport``) re-examines every connection of the pool (keep-alive
expiry, a socket poll, an O(n²) idle count) on each request and each response close, so one
pool at 512 requests in flight costs ~25 ms of CPU per request. This transport keeps that
work constant by *sharding*: each origin (scheme, host, port) gets ordinary
``httpx.AsyncHTTPTransport`` objects of at most ``shard_size`` connections each, and a
request takes the most recently used shard with a free slot from a stack (O(1); a shard is
added when none is free), so requests never queue inside httpcore. Measured at 512 in
flight (``benchmarks/bench_client.py``, client CPU per request): ``shard_size`` 1 → ~1.1 ms,
4 → ~1.3 ms, 16 → ~3.3 ms; one pool ~17 ms. Only public httpx API is used.

Proxies: with ``trust_env=True`` (the default) the environment's ``HTTP_PROXY``,
``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY`` (either case, lower case first, as curl
and urllib read them) decide per origin whether requests go through a proxy
(:func:`proxy_for`); ``SSL_CERT_FILE``/``SSL_CERT_DIR`` are honoured for ``verify=True``.
An explicit ``proxy`` overrides the environment for every origin except loopback ones.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

__all__ = ["PooledTransport", "environment_proxies", "proxy_for", "ssl_context"]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def _env(env: Mapping[str, str], name: str) -> str:
    """``name_proxy`` then ``NAME_PROXY`` (curl and urllib prefer the lower-case spelling)."""
    low = f"{name}_proxy"
    value = env.get(low)
    if value is None:
        if name == "http" and "REQUEST_METHOD" in env:  # CGI ("httpoxy"): HTTP_PROXY may come from a request header
            return ""
        value = env.get(low.upper(), "")
    return value.strip()


def environment_proxies(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The proxy settings of ``env`` (default ``os.environ``): keys ``http``, ``https``, ``all``
    (proxy URLs, ``http://`` added to a bare ``host:port``) and ``no`` (the raw ``NO_PROXY``)."""
    env = os.environ if env is None else env
    out: dict[str, str] = {}
    for name in ("http", "https", "all"):
        value = _env(env, name)
        if value:
            out[name] = value if "://" in value else f"http://{value}"
    no = _env(env, "no")
    if no:
        out["no"] = no
    return out


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): never sent to a proxy, which
    would reach its own loopback, not ours (Go's net/http does the same)."""
    host = host.lower().rstrip(".")
    ip = _ip(host)
    return ip.is_loopback if ip is not None else host in _LOOPBACK_NAMES or host.endswith(".localhost")


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` exempts ``host:port`` (curl's rules): ``*`` exempts everything; an
    entry ``example.com`` or ``.example.com`` exempts the host and its subdomains; an IP or
    CIDR network exempts addresses in it; ``entry:port`` only that port."""
    host = host.lower().rstrip(".")
    ip = _ip(host)
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port = None
        if entry.startswith("["):  # [v6]:port
            v6, _, rest = entry[1:].partition("]")
            entry, entry_port = v6, rest[1:] or None
        elif entry.count(":") == 1:  # host:port (a bare IPv6 address has several colons)
            entry, entry_port = entry.split(":")
        if entry_port is not None and entry_port != str(port):
            continue
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        entry = entry.lstrip("*").lstrip(".").rstrip(".")
        if entry and (host == entry or host.endswith("." + entry)):
            return True
    return False


def proxy_for(url: httpx.URL | str, proxies: Mapping[str, str]) -> str | None:
    """The proxy URL for a request to ``url`` under ``proxies`` (:func:`environment_proxies`),
    or None for a direct connection: loopback hosts and ``NO_PROXY`` matches go direct;
    otherwise the scheme's proxy (``http``/``https``), else ``all``."""
    url = httpx.URL(url) if isinstance(url, str) else url
    host = url.host
    if not host or is_loopback(host):
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    if proxies.get("no") and _bypassed(host, port, proxies["no"]):
        return None
    return proxies.get(url.scheme) or proxies.get("all") or None


def ssl_context(verify: bool | str | os.PathLike | ssl.SSLContext = True, trust_env: bool = True) -> ssl.SSLContext:
    """The TLS context for ``verify``: True (system CAs via certifi, or ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` with ``trust_env``), a CA bundle file or directory, False, or a context."""
    if isinstance(verify, ssl.SSLContext):
        return verify
    if isinstance(verify, (str, os.PathLike)):
        path = Path(verify)
        return ssl.create_default_context(capath=str(path)) if path.is_dir() else ssl.create_default_context(cafile=str(path))
    return httpx.create_ssl_context(verify=verify, trust_env=trust_env)


class _Shard:
    """One ``httpx.AsyncHTTPTransport`` and its requests in flight; ``free`` is its origin's
    stack of shards with a spare slot (the shard is on it iff ``busy < limit``)."""

    __slots__ = ("transport", "busy", "limit", "free")

    def __init__(self, transport: httpx.AsyncHTTPTransport, limit: int, free: list[_Shard]):
        self.transport = transport
        self.busy = 0  # requests whose response is not closed yet
        self.limit = limit
        self.free = free

    def take(self) -> None:
        self.busy += 1
        if self.busy == self.limit:
            self.free.pop()  # it is the top of the stack: taken from there just now

    def give_back(self) -> None:
        self.busy -= 1
        if self.busy == self.limit - 1:
            self.free.append(self)


class _ShardStream(httpx.AsyncByteStream):
    """A response body that frees its shard slot when closed (once)."""

    __slots__ = ("_stream", "_shard")

    def __init__(self, stream: Any, shard: _Shard):
        self._stream: Any = stream
        self._shard: _Shard | None = shard

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        shard, self._shard = self._shard, None
        try:
            await self._stream.aclose()
        finally:
            if shard is not None:
                shard.give_back()


class PooledTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 keep-alive transport made of per-origin shards of ``shard_size`` connections
    (default 1: a stack of single-connection pools, the cheapest per request).

    ``verify``: see :func:`ssl_context`. ``trust_env``: take proxies (and CA paths) from the
    environment. ``proxy``: one proxy URL for every non-loopback origin (overrides the
    environment). ``keepalive_expiry``: seconds an idle connection is kept.
    ``proxy_of(url)`` tells which proxy a request to ``url`` goes through (None: direct).
    """

    def __init__(self, *, verify: bool | str | os.PathLike | ssl.SSLContext = True, trust_env: bool = True,
                 proxy: str | None = None, shard_size: int = 1, keepalive_expiry: float = 30.0,
                 env: Mapping[str, str] | None = None):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self._ssl = ssl_context(verify, trust_env)
        self._proxies: dict[str, str] = {"all": proxy} if proxy else environment_proxies(env) if trust_env else {}
        self._limits = httpx.Limits(max_connections=shard_size, max_keepalive_connections=shard_size,
                                    keepalive_expiry=keepalive_expiry)
        self.shard_size = shard_size
        # origin -> (its proxy, all its shards, the stack of those with a spare slot)
        self._origins: dict[tuple[str, str, int | None], tuple[str | None, list[_Shard], list[_Shard]]] = {}
        self._closed = False

    def proxy_of(self, url: httpx.URL | str) -> str | None:
        return proxy_for(url, self._proxies)

    def _new_shard(self, proxy: str | None, free: list[_Shard]) -> _Shard:
        # trust_env=False: the proxy was chosen above (per origin); the CA context is built already
        transport = httpx.AsyncHTTPTransport(verify=self._ssl, trust_env=False, limits=self._limits,
                                             proxy=httpx.Proxy(proxy) if proxy else None)
        return _Shard(transport, self.shard_size, free)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        url = request.url
        key = (url.scheme, url.host, url.port)
        entry = self._origins.get(key)
        if entry is None:
            entry = self._origins[key] = (self.proxy_of(url), [], [])
        proxy, shards, free = entry
        if free:  # the most recently used shard with a spare slot: its connections are warm
            shard = free[-1]
        else:
            shard = self._new_shard(proxy, free)
            shards.append(shard)
            free.append(shard)
        shard.take()
        try:
            response = await shard.transport.handle_async_request(request)
        except BaseException:
            shard.give_back()
            raise
        return httpx.Response(response.status_code, headers=response.headers,
                              stream=_ShardStream(response.stream, shard), extensions=response.extensions)

    @property
    def in_flight(self) -> int:
        """Requests sent whose response is not closed yet."""
        return sum(sh.busy for _, shards, _free in self._origins.values() for sh in shards)

    @property
    def shards(self) -> int:
        """Shards opened so far, all origins together (each holds up to ``shard_size`` connections)."""
        return sum(len(shards) for _, shards, _free in self._origins.values())

    async def aclose(self) -> None:
        self._closed = True
        origins, self._origins = self._origins, {}
        for _, shards, _free in origins.values():
            for shard in shards:
                try:
                    await shard.transport.aclose()
                except Exception:  # noqa: BLE001 - closing anyway
                    pass
