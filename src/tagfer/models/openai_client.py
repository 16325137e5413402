"""Async client for OpenAI-compatible chat servers (vLLM, SGLang, hosted APIs).

One :class:`ChatClient` (one httpx transport, one keep-alive connection pool) serves any
number of concurrent requests spread over one or more endpoints. It is built for the
paper's teacher set-up (Qwen2.5-VL-32B on 4 GPUs: 128 concurrent requests per GPU,
512 in total) and for evaluating models behind an API.

HTTP
    Requests go straight to a :class:`tagfer.models.http_transport.PooledTransport` (a public
    ``httpx.AsyncBaseTransport``: per-origin shards of 16 keep-alive HTTP/1.1 connections,
    each shard an ordinary ``httpx.AsyncHTTPTransport``). ``httpx.AsyncClient``'s
    per-request layers (cookies, auth, redirects, URL merging) are skipped: they cost ~30% of
    the client's CPU and a chat API needs none of them. One httpcore pool for all 512
    connections re-examines every connection per request (~25 ms CPU per request at 512 in
    flight); with small shards the client spends ~1 ms per request
    (``benchmarks/bench_client.py``). Proxies come from the environment (``HTTP_PROXY``,
    ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) unless ``trust_env=False``; loopback
    endpoints always go direct. Any ``httpx.AsyncBaseTransport`` (e.g.
    ``httpx.MockTransport``) can be injected instead. ``timeout_s`` bounds a whole attempt
    (connect, send, wait, read), not each read.

Concurrency
    A request holds one slot of ``total_concurrency`` and one slot of its endpoint's
    ``per_endpoint_concurrency`` *while an attempt is on the wire*; slots are released
    during back-off sleeps. The endpoint of each attempt is the one with the fewest
    requests in flight (ties rotate); a retry prefers a different endpoint than the one
    that just failed.

Retries
    Retried: HTTP 408/409/425/429 and 5xx, connect errors, read/write timeouts, dropped
    connections (``RemoteProtocolError``) and 200 responses whose body is not a valid chat
    completion. Not retried: other 4xx (400, 401, 403, 404, 422, ...). At most
    ``1 + max_retries`` attempts; the wait before retry ``n`` (1-based) is
    ``min(backoff_max_s, backoff_base_s * 2**(n-1)) * U(0.5, 1)`` ("equal jitter"), or the
    server's ``Retry-After`` (seconds or HTTP date, capped at ``backoff_max_s``) when
    larger. An optional per-request ``deadline_s`` bounds attempts plus waits. When the
    budget is spent :class:`RequestFailed` is raised with the kind of the last failure:
    ``timeout``, ``connection``, ``bad_response``, ``response_too_large``,
    ``response_budget`` or ``http_<status>``.

Response size
    Bodies are streamed and never read past ``max_response_bytes`` (default 4 MiB; a
    1,024-token reply is a few KB): a declared ``Content-Length`` above it fails before
    reading, an undeclared (chunked, endless) body stops at the cap, and gzip/deflate bodies
    are inflated in bounded steps (a compression bomb is cut at the cap too). Such an
    attempt fails with kind ``response_too_large`` and is *not* retried within the request
    (the same prompt would most likely get the same runaway reply; each attempt would
    download the cap again); the item is recorded as failed, and a re-run asks again. All
    bodies being read at once share ``max_buffered_bytes`` (default 256 MiB), so memory
    stays bounded whatever the concurrency: an attempt that would exceed it fails with
    ``response_budget``, which *is* retried after a back-off (others have finished by then).
    Error bodies (non-200) are read only up to 64 KiB, for the message.

Layout
    Messages and images: :mod:`tagfer.models.chat_messages` (re-exported here); retry policy
    and endpoint scheduling: :mod:`tagfer.models.chat_retries`; HTTP and proxies:
    :mod:`tagfer.models.http_transport`; running from sync code: :mod:`tagfer.core.aio`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image

from tagfer.core.aio import run_sync
from tagfer.core.errors import ItemError
from tagfer.models.chat_messages import chat_messages, encode_image, image_part, system_message, user_message
from tagfer.models.chat_retries import RETRYABLE_STATUS, AttemptError, Slots, backoff_s, retry_after_s
from tagfer.models.http_transport import PooledTransport

__all__ = [
    "ClientConfig",
    "ChatResult",
    "RequestFailed",
    "ChatClient",
    "image_part",
    "encode_image",
    "user_message",
    "system_message",
    "chat_messages",
    "chat_many",
    "normalize_endpoint",
    "RETRYABLE_STATUS",
]

ERROR_BODY_BYTES = 64 * 1024  # most bytes read from a non-200 body (it only feeds the message)


def normalize_endpoint(url: str) -> str:
    """``host:8000`` → ``http://host:8000/v1``; an explicit path is kept; no trailing slash."""
    url = url.strip()
    if not url:
        raise ValueError("empty endpoint URL")
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    scheme, rest = url.split("://", 1)
    if "/" not in rest:  # no path given: the OpenAI-compatible servers live under /v1
        url += "/v1"
    return url


@dataclass
class ClientConfig:
    """Settings of a :class:`ChatClient`.

    ``endpoints``: base URLs ending in the API root, e.g. ``http://gpu0:8000/v1`` (a bare
    ``host:port`` gets ``http://`` and ``/v1``). ``model``: the ``model`` field sent; None
    asks ``GET {endpoint}/models`` once and takes the first entry. ``api_key``: sent as a
    Bearer token when non-empty (default ``$OPENAI_API_KEY``). Concurrency defaults follow
    the paper (128 per GPU server, 512 total). ``timeout_s`` bounds one attempt (connect +
    send + wait + read); ``deadline_s`` (optional) bounds a whole request with retries.
    ``image_side``/``image_format``: how :meth:`ChatClient.image_part` encodes images.
    ``verify``: TLS certificate check for https endpoints — True (system/certifi CAs), a CA
    bundle path, or False. ``trust_env``: honour ``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``/
    ``NO_PROXY`` and ``SSL_CERT_FILE``/``SSL_CERT_DIR`` (False: always connect directly);
    ``proxy``: one proxy URL for all endpoints, overriding the environment (loopback endpoints
    are never proxied). ``eject_after``: consecutive connection/timeout/5xx failures after
    which an endpoint is avoided for a back-off period while others are healthy (0: never).
    ``max_response_bytes``: largest response body read (decoded size; above it the attempt
    fails with ``response_too_large``, not retried); ``max_buffered_bytes``: all bodies being
    read at once together (above it ``response_budget``, retried) — see the module docstring.
    """

    endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    model: str | None = None
    api_key: str = field(default_factory=lambda: os.environ.get("OPENAI_API_KEY", ""))
    per_endpoint_concurrency: int = 128
    total_concurrency: int = 512
    timeout_s: float = 120.0
    connect_timeout_s: float = 10.0
    max_retries: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    deadline_s: float | None = None
    image_side: int = 224
    image_format: str = "png"
    extra_headers: dict[str, str] = field(default_factory=dict)
    verify: bool | str = True
    trust_env: bool = True
    proxy: str | None = None
    eject_after: int = 3
    max_response_bytes: int = 4 * 1024 * 1024
    max_buffered_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, str):
            self.endpoints = [e for e in self.endpoints.split(",") if e.strip()]
        self.endpoints = [normalize_endpoint(e) for e in self.endpoints]
        if not self.endpoints:
            raise ValueError("ClientConfig needs at least one endpoint")
        if self.per_endpoint_concurrency < 1 or self.total_concurrency < 1:
            raise ValueError("concurrency limits must be >= 1")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.max_response_bytes < 1 or self.max_buffered_bytes < self.max_response_bytes:
            raise ValueError("max_response_bytes must be >= 1 and max_buffered_bytes >= max_response_bytes")
        fmt = self.image_format.lower()
        if fmt == "jpg":
            fmt = "jpeg"
        if fmt not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', not {self.image_format!r}")
        self.image_format = fmt

    @property
    def max_in_flight(self) -> int:
        """Requests that can be on the wire at once: min(total, endpoints × per-endpoint)."""
        return min(self.total_concurrency, len(self.endpoints) * self.per_endpoint_concurrency)


@dataclass
class ChatResult:
    """One successful chat completion.

    ``text``: the first choice's message content ("" if the server sent null);
    ``finish_reason``: "stop", "length", ...; ``usage``: the server's token counts (may be
    empty); ``endpoint``: base URL of the endpoint that answered; ``attempts``: attempts
    made (1 = no retry); ``latency_s``: wall time from call to return, waits included.
    """

    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    endpoint: str
    attempts: int
    latency_s: float
    raw: dict[str, Any] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "endpoint": self.endpoint,
            "attempts": self.attempts,
            "latency_s": round(self.latency_s, 4),
        }


class RequestFailed(ItemError):
    """A chat request that failed for good. ``kind``: ``timeout``, ``connection``,
    ``bad_response``, ``response_too_large``, ``response_budget``, ``http_<status>``
    (e.g. ``http_429``, ``http_500``, ``http_400``), or ``no_model``; ``attempts``: attempts made; ``status``: last HTTP status if any."""

    def __init__(self, kind: str, message: str, attempts: int = 1, status: int | None = None, endpoint: str | None = None):
        super().__init__(kind, message)
        self.attempts = attempts
        self.status = status
        self.endpoint = endpoint

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "attempts": self.attempts}

    def __reduce__(self):  # picklable across processes
        return (RequestFailed, (self.kind, self.message, self.attempts, self.status, self.endpoint))


def _inflater(encoding: str) -> Any:
    """A zlib decompressor for a ``Content-Encoding`` (None: identity); others are refused."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return None
    if enc in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)  # zlib or gzip header, detected
    raise AttemptError("bad_response", f"unsupported Content-Encoding {encoding!r} (identity, gzip, deflate)", True)


def _inflate(d: Any, data: bytes, room: int) -> bytes:
    """Inflate ``data`` with ``d`` but produce at most ``room + 1`` bytes (enough to tell "over")."""
    out = bytearray()
    while data and len(out) <= room:
        try:
            out += d.decompress(data, room - len(out) + 1)
        except zlib.error as e:
            raise AttemptError("bad_response", f"corrupt compressed body: {e}", True) from None
        data = d.unconsumed_tail
    return bytes(out)


async def _aiter_one(data: bytes):
    yield data


def _parse_completion(body: bytes) -> tuple[str, str | None, dict[str, Any], dict[str, Any]]:
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        msg = choice.get("message") or {}
        text = msg.get("content")
        if text is None:
            text = ""
        if isinstance(text, list):  # some servers return content parts
            text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
        if not isinstance(text, str):
            raise TypeError(f"content is {type(text).__name__}")
        usage = data.get("usage") or {}
        return text, choice.get("finish_reason"), usage if isinstance(usage, dict) else {}, data
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:  # RecursionError: JSON nested too deep
        snippet = body[:200].decode("utf-8", "replace")
        raise AttemptError("bad_response", f"not a chat completion ({type(e).__name__}: {e}): {snippet!r}", True) from None


# ---------------------------------------------------------------------------- client

class ChatClient:
    """Async chat client; use as ``async with ChatClient(cfg) as c: r = await c.chat(msgs)``.

    ``sleep`` (for tests) replaces ``asyncio.sleep`` for back-off waits.
    """

    def __init__(self, config: ClientConfig, *, sleep: Callable[[float], Awaitable[Any]] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self._sleep = sleep or asyncio.sleep
        self._given_transport = transport
        self._tr: httpx.AsyncBaseTransport | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._urls: dict[tuple[int, str], httpx.URL] = {}
        self._slots: Slots | None = None
        self._model: str | None = config.model
        self._model_lock: asyncio.Lock | None = None
        self._model_error: tuple[float, RequestFailed] | None = None
        self._buffered = 0  # bytes of response bodies being read by all attempts (one event loop)

    # -- lifecycle
    async def __aenter__(self) -> ChatClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def open(self) -> None:
        if self._tr is not None:
            return
        cfg = self.config
        headers = {"content-type": "application/json", "accept": "application/json", "accept-encoding": "identity",
                   **cfg.extra_headers}
        if cfg.api_key:
            headers["authorization"] = f"Bearer {cfg.api_key}"
        self._headers = [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in headers.items()]
        self._tr = self._given_transport or PooledTransport(verify=cfg.verify, trust_env=cfg.trust_env, proxy=cfg.proxy)
        self._urls = {}
        self._slots = Slots(len(cfg.endpoints), cfg.per_endpoint_concurrency, cfg.total_concurrency,
                             cfg.eject_after, cfg.backoff_base_s, cfg.backoff_max_s)
        self._model_lock = asyncio.Lock()

    async def aclose(self) -> None:
        if self._tr is not None:
            tr, self._tr = self._tr, None
            await tr.aclose()

    @property
    def served(self) -> dict[str, int]:
        """Completed attempts per endpoint (successful or not)."""
        if self._slots is None:
            return {e: 0 for e in self.config.endpoints}
        return dict(zip(self.config.endpoints, self._slots.served))

    @property
    def in_flight(self) -> int:
        return 0 if self._slots is None else self._slots.sum

    # -- helpers bound to the config
    def image_part(self, image: Image.Image | str | os.PathLike | bytes) -> dict[str, Any]:
        return image_part(image, self.config.image_side, self.config.image_format)

    def user_message(self, text: str, images: Sequence[Any] = ()) -> dict[str, Any]:
        return user_message(text, images, self.config.image_side, self.config.image_format)

    # -- core
    async def _attempt(self, method: str, path: str, payload: bytes | None, timeout: float, avoid: int | None,
                       parse: Callable[[bytes], Any]) -> tuple[Any, int]:
        assert self._tr is not None and self._slots is not None, "use `async with ChatClient(...)` first"
        idx = await self._slots.acquire(avoid)
        held = [0]  # bytes of this attempt's body counted in the shared budget (released below)
        url = self._urls.get((idx, path))
        if url is None:
            url = self._urls[(idx, path)] = httpx.URL(self.config.endpoints[idx] + path)
        try:
            conn_t = min(self.config.connect_timeout_s, timeout)
            request = httpx.Request(method, url, headers=self._headers, content=payload,
                                    extensions={"timeout": {"connect": conn_t, "read": timeout, "write": timeout, "pool": timeout}})
            resp = None
            try:
                async with asyncio.timeout(timeout):  # the whole attempt, not just each read
                    resp = await self._tr.handle_async_request(request)
                    body = await self._read_body(resp, url, held)
            except (httpx.TimeoutException, TimeoutError) as e:
                raise AttemptError("timeout", f"{type(e).__name__} after {timeout:.3g}s from {url}", True) from None
            except (httpx.TransportError, OSError) as e:  # connect/read/write errors, dropped connections
                if "CERTIFICATE_VERIFY_FAILED" in str(e) or "WRONG_VERSION_NUMBER" in str(e):
                    raise AttemptError("tls", f"TLS failure with {url}: {e}", False) from None
                raise AttemptError("connection", f"{type(e).__name__}: {e or 'connection failed'} ({url})", True) from None
            finally:
                if resp is not None:
                    await resp.aclose()
            status = resp.status_code
            if status != 200:
                retryable = status in RETRYABLE_STATUS or status >= 500
                snippet = body[:300].decode("utf-8", "replace")
                ra = retry_after_s(resp.headers.get("retry-after")) if retryable else None
                raise AttemptError(f"http_{status}", f"HTTP {status} from {url}: {snippet}", retryable, status, ra)
            result = parse(body)
            self._slots.record(idx, True)
            return result, idx
        except AttemptError as e:
            e.endpoint = idx
            unhealthy = e.kind in ("connection", "timeout") or (e.status is not None and e.status >= 500)
            self._slots.record(idx, not unhealthy)
            raise
        finally:
            self._buffered -= held[0]
            await self._slots.release(idx)

    async def _read_body(self, resp: httpx.Response, url: httpx.URL, held: list[int]) -> bytes:
        """Stream ``resp``'s body, never past the configured caps (module docstring, "Response
        size"). ``held[0]`` tracks the bytes counted in the client-wide buffer budget."""
        cfg = self.config
        ok = resp.status_code == 200
        cap = cfg.max_response_bytes if ok else min(cfg.max_response_bytes, ERROR_BODY_BYTES)
        declared = resp.headers.get("content-length", "").strip()
        if ok and declared.isdigit() and int(declared) > cap:
            raise AttemptError("response_too_large", f"{url} announced a body of {int(declared):,} bytes, "
                                f"above max_response_bytes={cap:,}", False)
        buf = bytearray()
        try:  # a response built in memory (e.g. by httpx.MockTransport) is already read and decoded
            chunks: Any = _aiter_one(resp.content)
            inflater = None
        except httpx.ResponseNotRead:
            chunks = resp.aiter_raw()
            try:
                inflater = _inflater(resp.headers.get("content-encoding", ""))
            except AttemptError:
                if ok:
                    raise
                return buf  # an error status keeps its kind; its body only fed the message
        async for raw in chunks:
            try:
                data = raw if inflater is None else _inflate(inflater, raw, cap - len(buf))
            except AttemptError:
                if ok:
                    raise
                break
            if len(buf) + len(data) > cap:
                if not ok:  # an error body only feeds the message: keep its head
                    buf += data[: cap - len(buf)]
                    break
                raise AttemptError("response_too_large", f"the body from {url} exceeded max_response_bytes={cap:,} "
                                    "(reading stopped there)", False)
            if self._buffered + len(data) > cfg.max_buffered_bytes:
                raise AttemptError("response_budget", f"response bodies being read at once exceed max_buffered_bytes="
                                    f"{cfg.max_buffered_bytes:,}", True)
            self._buffered += len(data)
            held[0] += len(data)
            buf += data
        return buf  # type: ignore[return-value]  # bytearray: parsed as is, no copy

    async def _with_retries(self, method: str, path: str, payload: bytes | None, parse: Callable[[bytes], Any],
                            deadline_s: float | None) -> tuple[Any, int, int]:
        cfg = self.config
        start = time.monotonic()
        deadline = start + deadline_s if deadline_s else None
        last: AttemptError | None = None
        avoid: int | None = None
        attempts = 0
        for attempt in range(cfg.max_retries + 1):
            timeout = cfg.timeout_s
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                timeout = min(timeout, remaining)
            attempts += 1
            try:
                result, idx = await self._attempt(method, path, payload, timeout, avoid, parse)
                return result, idx, attempts
            except AttemptError as e:
                e.__traceback__ = None  # its frames hold the body read; keep only the message while waiting
                last = e
                avoid = e.endpoint
                if not e.retryable or attempt == cfg.max_retries:
                    break
                wait = backoff_s(attempt + 1, cfg.backoff_base_s, cfg.backoff_max_s, e.retry_after)
                if deadline is not None and time.monotonic() + wait >= deadline:
                    break
                await self._sleep(wait)
        if last is None:
            raise RequestFailed("timeout", f"deadline of {deadline_s}s spent before any attempt", attempts)
        ep = cfg.endpoints[last.endpoint] if last.endpoint is not None else None
        note = "" if not last.retryable else f" (gave up after {attempts} attempt{'s' * (attempts != 1)})"
        raise RequestFailed(last.kind, last.message + note, attempts, last.status, ep)

    async def model(self) -> str:
        """The model name: the configured one, else the first entry of ``GET /models``."""
        if self._model is not None:
            return self._model
        assert self._model_lock is not None, "use `async with ChatClient(...)` first"
        async with self._model_lock:
            failed = self._model_error
            if self._model is None and failed is not None and time.monotonic() - failed[0] < max(1.0, self.config.backoff_max_s):
                # a discovery that just failed is not repeated by every queued request
                e = failed[1]
                raise RequestFailed(e.kind, e.message, 0, e.status, e.endpoint)
            if self._model is None:
                def parse(body: bytes) -> str:
                    try:
                        return str(json.loads(body)["data"][0]["id"])
                    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
                        raise AttemptError("bad_response", f"GET /models: unexpected body ({e}): {body[:200]!r}", True) from None

                try:
                    self._model, _, _ = await self._with_retries("GET", "/models", None, parse, self.config.deadline_s)
                except RequestFailed as e:
                    err = RequestFailed(e.kind, f"cannot discover the model name: {e.message}", e.attempts, e.status, e.endpoint)
                    self._model_error = (time.monotonic(), err)
                    raise err from None
        return self._model

    async def chat(self, messages: list[dict[str, Any]], *, deadline_s: float | None = None, **params: Any) -> ChatResult:
        """POST ``/chat/completions`` with ``messages`` and extra ``params`` (temperature,
        top_p, max_tokens, seed, ...; None values are dropped). Retries as described in the
        module docstring; raises :class:`RequestFailed` when the budget is spent."""
        t0 = time.monotonic()
        body: dict[str, Any] = {"model": params.pop("model", None) or await self.model(), "messages": messages}
        body.update({k: v for k, v in params.items() if v is not None})
        payload = json.dumps(body, ensure_ascii=False).encode("utf-8")
        (text, finish, usage, raw), idx, attempts = await self._with_retries(
            "POST", "/chat/completions", payload, _parse_completion,
            deadline_s if deadline_s is not None else self.config.deadline_s)
        return ChatResult(text, finish, usage, self.config.endpoints[idx], attempts, time.monotonic() - t0, raw)


def chat_many(config: ClientConfig, messages_list: Iterable[list[dict[str, Any]]], params: dict[str, Any] | None = None,
              on_result: Callable[[int, ChatResult | RequestFailed], None] | None = None) -> list[ChatResult | RequestFailed]:
    """Send every conversation of ``messages_list`` concurrently; return, in input order, a
    :class:`ChatResult` or the :class:`RequestFailed` of each. ``on_result(index, result)``
    is called as each finishes (completion order), e.g. for a progress bar."""
    items = list(messages_list)
    params = dict(params or {})

    async def run() -> list[ChatResult | RequestFailed]:
        out: list[ChatResult | RequestFailed | None] = [None] * len(items)
        async with ChatClient(config) as client:
            async def one(i: int, msgs: list[dict[str, Any]]) -> None:
                try:
                    r: ChatResult | RequestFailed = await client.chat(msgs, **params)
                except RequestFailed as e:
                    r = e
                out[i] = r
                if on_result is not None:
                    on_result(i, r)

            await asyncio.gather(*(one(i, m) for i, m in enumerate(items)))
        return out  # type: ignore[return-value]

    return run_sync(run())
