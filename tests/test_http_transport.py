"""tagfer.models.http_transport: proxy rules from the environment, a real (tiny) proxy in the
path, the sharded pool's bookkeeping, and no private httpx/httpcore API anywhere in src/."""

from __future__ import annotations

import ast
import asyncio
import functools
import json
import re
from pathlib import Path

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakeserver import Reply
from tagfer.models.http_transport import PooledTransport, environment_proxies, is_loopback, proxy_for
from tagfer.models.openai_client import ChatClient, ClientConfig, RequestFailed, user_message

SRC = Path(__file__).resolve().parents[1] / "src" / "tagfer"
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def clean_proxy_env(monkeypatch):
    for name in PROXY_VARS + ("REQUEST_METHOD",):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------- rules

def test_environment_proxies_reads_both_cases_lower_first():
    env = {"HTTP_PROXY": "http://upper:1", "http_proxy": "http://lower:2", "HTTPS_PROXY": "sq:3128", "NO_PROXY": "a.com"}
    assert environment_proxies(env) == {"http": "http://lower:2", "https": "http://sq:3128", "no": "a.com"}
    assert environment_proxies({}) == {}
    # CGI: HTTP_PROXY may be a request header ("httpoxy"); the lower-case variable still counts
    assert environment_proxies({"HTTP_PROXY": "http://evil:1", "REQUEST_METHOD": "GET"}) == {}
    assert environment_proxies({"http_proxy": "http://ok:1", "REQUEST_METHOD": "GET"}) == {"http": "http://ok:1"}


@pytest.mark.parametrize("url,no_proxy,expected", [
    ("http://gpu0.lab.org:8000/v1", "", "H"),
    ("https://api.example.com/v1", "", "S"),
    ("http://gpu0.lab.org:8000/v1", "lab.org", None),        # domain and its subdomains
    ("http://gpu0.lab.org:8000/v1", ".lab.org", None),
    ("http://lab.org/v1", ".lab.org", None),
    ("http://xlab.org/v1", "lab.org", "H"),                   # not a suffix at a dot
    ("http://gpu0.lab.org:8000/v1", "gpu0.lab.org:8000", None),  # host:port
    ("http://gpu0.lab.org:9000/v1", "gpu0.lab.org:8000", "H"),
    ("http://10.1.2.3:8000/v1", "10.0.0.0/8", None),          # CIDR
    ("http://11.1.2.3:8000/v1", "10.0.0.0/8", "H"),
    ("http://10.1.2.3:8000/v1", "10.1.2.3", None),
    ("http://[fd00::5]:8000/v1", "fd00::/8", None),
    ("http://anything.org/v1", " x.com , * ", None),         # * exempts everything
    ("http://127.0.0.1:8000/v1", "", None),                   # loopback: never proxied
    ("http://localhost:8000/v1", "", None),
    ("http://[::1]:8000/v1", "", None),
])
def test_proxy_for_follows_no_proxy_and_scheme(url, no_proxy, expected):
    proxies = {"http": "H", "https": "S", "no": no_proxy}
    assert proxy_for(url, proxies) == expected


def test_all_proxy_is_the_fallback():
    assert proxy_for("https://x.org", {"all": "A"}) == "A"
    assert proxy_for("https://x.org", {"http": "H", "all": "A"}) == "A"
    assert proxy_for("http://x.org", {"http": "H", "all": "A"}) == "H"
    assert proxy_for("http://x.org", {}) is None


_label = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True)  # a letter first: names, not IP addresses


@given(host=st.lists(_label, min_size=1, max_size=4).map(".".join), sub=_label, port=st.integers(1, 65535))
def test_a_no_proxy_domain_exempts_the_host_and_its_subdomains_only(host, sub, port):
    proxies = {"http": "http://p:1", "no": f"other.example,{host}"}
    assert proxy_for(f"http://{host}:{port}/v1", proxies) is None
    assert proxy_for(f"http://{sub}.{host}:{port}/v1", proxies) is None
    expected = None if is_loopback(f"{sub}{host}") else "http://p:1"
    assert proxy_for(f"http://{sub}{host}:{port}/v1", proxies) == expected  # glued, not a subdomain


@given(st.integers(0, 2**24 - 1))
def test_loopback_addresses_are_never_proxied(n):
    ip = f"127.{n >> 16}.{(n >> 8) & 255}.{n & 255}"
    assert proxy_for(f"http://{ip}:8000/v1", {"all": "http://p:1"}) is None


# ---------------------------------------------------------------------------- a real proxy in the path

class TinyProxy:
    """A forward proxy that answers chat completions itself: ``lines`` records each request
    line (``POST http://host:port/v1/chat/completions HTTP/1.1``, ``CONNECT host:443 HTTP/1.1``);
    CONNECT gets a 502."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.server: asyncio.AbstractServer | None = None
        self.url = ""

    async def __aenter__(self) -> TinyProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := (await reader.readline()).decode().strip():
                self.lines.append(line)
                length = 0
                while (h := (await reader.readline()).decode().strip()):
                    if h.lower().startswith("content-length:"):
                        length = int(h.split(":", 1)[1])
                await reader.readexactly(length)
                if line.startswith("CONNECT"):
                    writer.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                    await writer.drain()
                    break
                body = json.dumps({"choices": [{"message": {"content": "via proxy " + line.split()[1]}, "finish_reason": "stop"}]})
                writer.write(f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n{body}".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def _chat(url: str, env_proxy: tuple | None = None, **cfg):
    """One chat to ``url`` with a fresh client; returns (text or RequestFailed, the proxy's request lines).
    A config value ``"PROXY"`` is the tiny proxy's URL; ``env_proxy=(monkeypatch, no_proxy)`` points
    ``HTTP(S)_PROXY`` at it instead (its port is known only once it runs)."""

    async def go():
        async with TinyProxy() as proxy:
            if env_proxy is not None:
                _set_proxy(env_proxy[0], proxy.url, env_proxy[1])
            kw = {k: (proxy.url if v == "PROXY" else v) for k, v in cfg.items()}
            config = ClientConfig(endpoints=[url], model="m", api_key="", timeout_s=5, max_retries=0, **kw)
            async with ChatClient(config) as c:
                try:
                    out = (await c.chat([user_message("hi")])).text
                except RequestFailed as e:
                    out = e
            return out, proxy.lines

    return asyncio.run(go())


@pytest.fixture(scope="module")
def direct(fake_openai):
    """A fake server reached at 0.0.0.0 (a non-loopback name for this host on Linux), so proxy rules apply to it."""
    srv = fake_openai(lambda req, i: "direct")
    return srv.url.replace("127.0.0.1", "0.0.0.0")


def _set_proxy(monkeypatch, proxy_url: str, no_proxy: str | None = None):
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    monkeypatch.setenv("HTTPS_PROXY", proxy_url)
    if no_proxy is not None:
        monkeypatch.setenv("NO_PROXY", no_proxy)


def _run_with_env_proxy(monkeypatch, url: str, no_proxy: str | None = None, **cfg):
    """:func:`_chat` with ``HTTP(S)_PROXY`` pointing at the tiny proxy."""
    return _chat(url, env_proxy=(monkeypatch, no_proxy), **cfg)


def test_environment_proxy_carries_the_requests(monkeypatch, direct):
    text, lines = _run_with_env_proxy(monkeypatch, direct)
    assert text == f"via proxy {direct}/chat/completions"
    assert lines == [f"POST {direct}/chat/completions HTTP/1.1"]


def test_no_proxy_and_trust_env_false_go_direct(monkeypatch, direct):
    text, lines = _run_with_env_proxy(monkeypatch, direct, no_proxy="example.org,0.0.0.0")
    assert (text, lines) == ("direct", [])
    text, lines = _run_with_env_proxy(monkeypatch, direct, trust_env=False)
    assert (text, lines) == ("direct", [])


def test_loopback_endpoint_is_never_proxied(monkeypatch, fake_openai):
    srv = fake_openai(lambda req, i: "direct")
    text, lines = _run_with_env_proxy(monkeypatch, srv.url)
    assert (text, lines) == ("direct", [])


def test_explicit_proxy_overrides_the_environment(direct):
    text, lines = _chat(direct, proxy="PROXY", trust_env=False)
    assert text == f"via proxy {direct}/chat/completions" and len(lines) == 1


def test_https_goes_through_a_connect_tunnel(monkeypatch):
    err, lines = _run_with_env_proxy(monkeypatch, "https://gpu.example.org/v1")
    assert isinstance(err, RequestFailed) and err.kind == "connection"  # the proxy refused the tunnel (502)
    assert lines == ["CONNECT gpu.example.org:443 HTTP/1.1"]


# ---------------------------------------------------------------------------- the sharded pool

@pytest.mark.parametrize("shard_size", [1, 3])
def test_connections_are_reused_and_slots_given_back(fake_openai, shard_size):
    srv = fake_openai([Reply(text="x", delay_s=0.05)] * 40)

    async def go():
        tr = PooledTransport(shard_size=shard_size)
        async with httpx.AsyncClient(transport=tr) as client:
            async def one():
                r = await client.post(srv.url + "/chat/completions", json={"model": "m", "messages": []})
                return r.json()["choices"][0]["message"]["content"]

            first = await asyncio.gather(*(one() for _ in range(20)))
            opened = srv.connections
            second = await asyncio.gather(*(one() for _ in range(20)))
            return first + second, opened, tr.in_flight, tr.shards

    texts, opened, in_flight, shards = asyncio.run(go())
    assert texts == ["x"] * 40 and in_flight == 0
    assert opened <= 20 and srv.connections == opened  # the second round opened nothing new
    assert shards == -(-opened // shard_size)


def test_failed_requests_give_their_slot_back(fake_openai):
    srv = fake_openai([Reply(drop=True), Reply(drop=True), "ok"])

    async def go():
        tr = PooledTransport()
        async with httpx.AsyncClient(transport=tr) as client:
            kinds = []
            for _ in range(3):
                try:
                    kinds.append((await client.post(srv.url + "/chat/completions", json={})).status_code)
                except httpx.TransportError as e:
                    kinds.append(type(e).__name__)
            return kinds, tr.in_flight, tr.shards

    kinds, in_flight, shards = asyncio.run(go())
    assert kinds == ["RemoteProtocolError", "RemoteProtocolError", 200]
    assert in_flight == 0 and shards == 1


def test_closed_transport_refuses_requests():
    async def go():
        tr = PooledTransport()
        await tr.aclose()
        with pytest.raises(httpx.ConnectError):
            await tr.handle_async_request(httpx.Request("GET", "http://127.0.0.1:9/"))

    asyncio.run(go())


# ---------------------------------------------------------------------------- structure

# Private names of httpx/httpcore objects: underscore attributes set on ``self`` or methods defined.
def _private_in(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            name = node.attr
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = node.name
        else:
            continue
        if name.startswith("_") and not name.startswith("__"):
            names.add(name)
    return names


@functools.cache
def _sources(package: str) -> list[ast.Module]:
    root = Path(__import__(package).__file__).parent
    return [ast.parse(p.read_text(encoding="utf-8")) for p in root.rglob("*.py")]


@functools.cache
def _private_names(package: str) -> set[str]:
    return set().union(*(_private_in(tree) for tree in _sources(package)))


@functools.cache
def _class_privates(base: str) -> set[str]:
    """Private names of an httpx class named in a ``class X(httpx.Base)`` statement and its bases
    (found by class name in the httpx/httpcore sources: httpx sets ``__module__ = "httpx"``)."""
    cls = eval(base, {"httpx": httpx})  # noqa: S307 - a base-class expression from our own source
    names = {k.__name__ for k in cls.__mro__ if k.__module__.split(".")[0] in ("httpx", "httpcore")}
    defs = [node for pkg in ("httpx", "httpcore") for tree in _sources(pkg) for node in ast.walk(tree)
            if isinstance(node, ast.ClassDef) and node.name in names]
    assert {d.name for d in defs} == names, "every httpx base class is found in the sources"
    return set().union(*(_private_in(d) for d in defs))


def _violations(tree: ast.AST, private: set[str]) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [f"import {a.name}" for a in node.names if a.name.split(".")[0] == "httpcore" or a.name.startswith("httpx._")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] == "httpcore" or node.module.startswith("httpx._"):
                out.append(f"from {node.module} import ...")
            if node.module == "httpx":
                out += [f"from httpx import {a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.ClassDef):  # a subclass of an httpx class must not touch its parent's privates
            for base in (ast.unparse(b) for b in node.bases if ast.unparse(b).startswith("httpx.")):
                inherited = _class_privates(base)
                out += [f"{node.name}: self.{n.attr} (private in {base})" for n in ast.walk(node)
                        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self" and n.attr in inherited]
        elif isinstance(node, ast.Attribute):
            chain = ast.unparse(node)
            if re.match(r"(httpx|httpcore)\.", chain) and any(p.startswith("_") and not p.startswith("__") for p in chain.split(".")[1:]):
                out.append(chain)
            elif node.attr in private and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                out.append(f"{chain} (a private name of httpx/httpcore on another object)")
    return out


def test_no_private_httpx_or_httpcore_api_in_src():
    private = _private_names("httpx") | _private_names("httpcore")
    assert {"_pool", "_transport", "_mounts", "_connections"} <= private  # the scan sees what it guards against
    bad = {}
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if "httpx" not in text and "httpcore" not in text:
            continue
        found = _violations(ast.parse(text), private)
        if found:
            bad[str(path.relative_to(SRC))] = found
    assert bad == {}


def test_the_structure_check_catches_the_old_pool_override():
    private = _private_names("httpx") | _private_names("httpcore")
    old = '''
import httpx
import httpcore
class _FastTransport(httpx.AsyncHTTPTransport):
    def __init__(self):
        super().__init__(trust_env=False)
        self._pool = object()
def f(client):
    return client._transport, httpx._utils.get_environment_proxies()
'''
    found = _violations(ast.parse(old), private)
    assert "import httpcore" in found
    assert any("self._pool" in v for v in found)
    assert any(v.startswith("client._transport") for v in found)
    assert any(v.startswith("httpx._utils") for v in found)
