"""A scripted OpenAI-compatible chat server for tests and benchmarks.

    from fakeserver import FakeOpenAIServer, Reply
    with FakeOpenAIServer([Reply(status=429, headers={"Retry-After": "1"}), "hello"]) as srv:
        ...  # srv.url == "http://127.0.0.1:<port>/v1"

Serves ``POST /v1/chat/completions`` and ``GET /v1/models`` (any path ending in
``/chat/completions`` or ``/models``, so one server can pose as several endpoints) with uvicorn in a background
thread on 127.0.0.1 (free port). The app is a raw ASGI callable rather than FastAPI: it
needs the socket to simulate dropped connections and must stay cheap so benchmarks
measure the client, not the server.

``script``: a list of replies consumed in arrival order (when exhausted the server answers
500 and records the fact in ``.script_errors``), or a callable
``(request_json, call_index) -> Reply | str``; None answers ``"ok"`` to everything.
A ``str`` is shorthand for ``Reply(text=...)``. ``ssl_certfile``/``ssl_keyfile`` serve https.

Faults (see :class:`Reply`): status codes with headers (429 + ``Retry-After``), a raw
``body`` (malformed JSON), ``delay_s`` (added to the server-wide ``latency_s``), ``hang``
(never answer; held until the client disconnects or the server stops), ``drop`` (close
the TCP connection without any response), ``size`` (a chat completion of exactly that many
bytes, streamed in 64 KiB pieces so the server itself stays small; with or without
``Content-Length``), ``endless`` (a chunked body that never ends; streamed until the client
goes away), ``gzip`` (the streamed body compressed on the fly: a compression bomb).

Run standalone (used by benchmarks/ to keep server CPU out of the client's process):
``python tests/fakeserver.py --latency 0.2 --port 0`` prints the base URL on stdout; ``--raw``
serves with a minimal asyncio responder instead of uvicorn (a few µs per request, no faults),
so a benchmark on a small machine measures the client rather than the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import zlib
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["Reply", "FakeOpenAIServer"]


@dataclass
class Reply:
    """One scripted answer. ``text``: the assistant content; ``status``: HTTP status
    (non-200 sends an OpenAI-style error body unless ``body`` is given); ``body``: raw
    response body (str/bytes/dict) replacing the normal one; ``headers``: extra headers;
    ``delay_s``: extra wait before answering; ``hang``: never answer; ``drop``: close the
    connection without a response; ``finish_reason``: as reported in the choice.
    Huge bodies: ``size`` (total bytes of a streamed chat completion whose content is padded),
    ``endless`` (stream forever), ``content_length`` (send ``Content-Length`` with ``size``;
    False = chunked), ``gzip`` (``Content-Encoding: gzip``, compressed on the fly)."""

    text: str = ""
    status: int = 200
    delay_s: float = 0.0
    hang: bool = False
    drop: bool = False
    body: str | bytes | dict | None = None
    headers: dict[str, str] | None = None
    finish_reason: str = "stop"
    size: int | None = None
    endless: bool = False
    content_length: bool = True
    gzip: bool = False


ScriptFn = Callable[[dict, int], "Reply | str"]


def _protocol_class(registry: dict[tuple, asyncio.Transport], server: "FakeOpenAIServer") -> type[H11Protocol]:
    """An h11 protocol that records each connection's transport by client address, so the
    app can abort the connection of a request (``Reply.drop``), and counts connections."""

    class _Proto(H11Protocol):
        def connection_made(self, transport):  # type: ignore[override]
            server.connections += 1
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            if peer:
                self._tagfer_peer = tuple(peer[:2])
                registry[self._tagfer_peer] = transport

        def connection_lost(self, exc):  # type: ignore[override]
            peer = getattr(self, "_tagfer_peer", None)
            if peer is not None and registry.get(peer) is self.transport:
                del registry[peer]
            super().connection_lost(exc)

    return _Proto


class FakeOpenAIServer:
    """Scripted OpenAI-compatible server (see module docstring).

    Attributes: ``url`` (base URL ending in ``/v1``), ``requests`` (every chat request
    body, arrival order), ``request_headers``, ``paths``, ``request_times`` (monotonic arrival times), ``in_flight`` /
    ``max_in_flight`` (concurrent chat requests being served), ``calls`` (chat requests
    received), ``connections`` (TCP connections accepted), ``script_errors``.
    """

    def __init__(self, script: list | ScriptFn | None = None, latency_s: float = 0.0, model: str = "fake-vlm",
                 record: bool = True, port: int = 0, ssl_certfile: str | None = None, ssl_keyfile: str | None = None):
        self._ssl = (str(ssl_certfile), str(ssl_keyfile)) if ssl_certfile else None
        self.script = script
        self.latency_s = latency_s
        self.model = model
        self.record = record
        self._port = port
        self._transports: dict[tuple, asyncio.Transport] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.url = ""
        self.reset()

    # -- state
    def reset(self, script: list | ScriptFn | None | type(...) = ...) -> None:  # type: ignore[valid-type]
        """Forget recorded requests and counters; optionally install a new ``script``."""
        if script is not ...:
            self.script = script
        self.requests: list[dict] = []
        self.request_headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.request_times: list[float] = []
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.completed = 0
        self.script_errors: list[str] = []
        self.connections = 0
        self.streamed_bytes = 0  # body bytes handed to the socket by size/endless replies
        self._pos = 0

    def _next_reply(self, req: dict, index: int) -> Reply:
        s = self.script
        if s is None:
            r: Reply | str = "ok"
        elif callable(s):
            r = s(req, index)
        else:
            if self._pos >= len(s):
                msg = f"script exhausted: request #{index} but only {len(s)} replies scripted"
                self.script_errors.append(msg)
                r = Reply(status=500, body={"error": {"message": msg, "type": "fake_server"}})
            else:
                r = s[self._pos]
                self._pos += 1
        return Reply(text=r) if isinstance(r, str) else r

    # -- ASGI app
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path.endswith("/models"):
            await self._send_json(send, 200, {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]})
            return
        if method == "POST" and path.endswith("/chat/completions"):
            await self._chat(scope, receive, send)
            return
        await self._send_json(send, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})

    async def _read_body(self, receive: Callable) -> bytes:
        chunks = []
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                break
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        return b"".join(chunks)

    async def _chat(self, scope: dict, receive: Callable, send: Callable) -> None:
        raw = await self._read_body(receive)
        index = self.calls
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            try:
                req = json.loads(raw)
            except ValueError:
                await self._send_json(send, 400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}})
                return
            if self.record:
                self.requests.append(req)
                self.request_times.append(time.monotonic())
                self.request_headers.append({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
                self.paths.append(scope["path"])
            try:
                reply = self._next_reply(req, index)
            except Exception as e:  # a broken script is reported, not hidden
                self.script_errors.append(f"script raised {type(e).__name__}: {e}")
                await self._send_json(send, 500, {"error": {"message": f"script error: {e}", "type": "fake_server"}})
                return
            wait = self.latency_s + reply.delay_s
            if reply.hang:
                await self._wait_disconnect(receive, timeout=3600.0)
                return
            if wait > 0:
                await asyncio.sleep(wait)
            if reply.drop:
                tr = self._transports.get(tuple(scope["client"][:2])) if scope.get("client") else None
                if tr is not None:
                    tr.abort()
                    await self._wait_disconnect(receive, timeout=5.0)
                    return
                raise RuntimeError("cannot find the connection to drop")
            headers = dict(reply.headers or {})
            if reply.size is not None or reply.endless:
                await self._stream(receive, send, reply, headers)
                return
            if reply.body is not None:
                body = reply.body
                if isinstance(body, dict):
                    await self._send_json(send, reply.status, body, headers)
                else:
                    data = body.encode() if isinstance(body, str) else body
                    await self._send(send, reply.status, data, headers, "application/json")
                return
            if reply.status != 200:
                err = {"error": {"message": reply.text or f"fake error {reply.status}", "type": "fake_error", "code": reply.status}}
                await self._send_json(send, reply.status, err, headers)
                return
            n_prompt = len(raw) // 4
            n_out = max(1, len(reply.text) // 4)
            await self._send_json(send, 200, {
                "id": f"chatcmpl-fake-{index}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": req.get("model", self.model) if isinstance(req, dict) else self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish_reason}],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
            }, headers)
        finally:
            self.in_flight -= 1
            self.completed += 1

    _PAD = b"a" * (64 * 1024)

    async def _stream(self, receive: Callable, send: Callable, reply: Reply, headers: dict[str, str]) -> None:
        """A huge (``size``) or endless body in 64 KiB pieces; stops when the client goes away."""
        head = b'{"choices": [{"finish_reason": "stop", "message": {"role": "assistant", "content": "'
        tail = b'"}}]}'
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.ensure_future(watch())
        hs = [(b"content-type", b"application/json")]
        if reply.gzip:
            hs.append((b"content-encoding", b"gzip"))
        elif reply.size is not None and not reply.endless and reply.content_length:
            hs.append((b"content-length", str(reply.size).encode()))
        hs += [(k.lower().encode(), str(v).encode()) for k, v in headers.items()]
        z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS) if reply.gzip else None
        try:
            await send({"type": "http.response.start", "status": reply.status, "headers": hs})
            left = None if reply.endless else max(0, reply.size - len(head) - len(tail))
            piece = head
            while not gone.is_set() and not (self._stop is not None and self._stop.is_set()):
                data = z.compress(piece) if z is not None else piece
                if data:
                    self.streamed_bytes += len(data)
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    await asyncio.sleep(0)  # let the disconnect watcher run
                if left == 0:
                    break
                n = len(self._PAD) if left is None else min(left, len(self._PAD))
                piece = self._PAD[:n]
                if left is not None:
                    left -= n
            end = tail if left == 0 else b""
            if z is not None:
                end = z.compress(end) + z.flush()
            if not gone.is_set():
                await send({"type": "http.response.body", "body": end, "more_body": False})
        finally:
            watcher.cancel()

    async def _wait_disconnect(self, receive: Callable, timeout: float) -> None:
        """Wait until the client goes away (or the server stops, or ``timeout``)."""
        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(disconnected())]
        if self._stop is not None:
            tasks.append(asyncio.ensure_future(self._stop.wait()))
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    @staticmethod
    async def _send(send: Callable, status: int, data: bytes, headers: dict[str, str] | None, ctype: str) -> None:
        hs = [(b"content-type", ctype.encode()), (b"content-length", str(len(data)).encode())]
        hs += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": hs})
        await send({"type": "http.response.body", "body": data})

    async def _send_json(self, send: Callable, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        await self._send(send, status, json.dumps(obj).encode(), headers, "application/json")

    # -- lifecycle
    def start(self) -> FakeOpenAIServer:
        if self._server is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        sock.listen(2048)
        port = sock.getsockname()[1]
        config = uvicorn.Config(self, http=_protocol_class(self._transports, self), lifespan="off", log_level="error",
                                access_log=False, backlog=2048, timeout_keep_alive=30, timeout_graceful_shutdown=1,
                                ws="none", **({"ssl_certfile": self._ssl[0], "ssl_keyfile": self._ssl[1]} if self._ssl else {}))
        self._server = uvicorn.Server(config)
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._stop = asyncio.Event()
            ready.set()
            try:
                loop.run_until_complete(self._server.serve(sockets=[sock]))
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-openai-{port}", daemon=True)
        self._thread.start()
        ready.wait(10)
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake OpenAI server failed to start")
            time.sleep(0.005)
        self._sock = sock
        self.port = port
        self.url = f"{'https' if self._ssl else 'http'}://127.0.0.1:{port}/v1"
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        try:
            self._sock.close()
        except OSError:
            pass
        self._server = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _RawBenchProtocol(asyncio.Protocol):
    """Minimal keep-alive HTTP/1.1 responder for benchmarks: every POST gets the same chat
    completion after ``latency`` seconds, GET gets the model list. Costs a few µs per request
    so that a benchmark measures the client, not the server. No faults, no recording."""

    stats = {"calls": 0, "in_flight": 0, "max_in_flight": 0}

    def __init__(self, latency: float, chat_body: bytes, models_body: bytes, jitter: float = 0.0):
        self.latency, self.chat_body, self.models_body, self.jitter = latency, chat_body, models_body, jitter
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            body = self.models_body if head.startswith("GET") else self.chat_body
            st = self.stats
            st["calls"] += 1
            st["in_flight"] += 1
            st["max_in_flight"] = max(st["max_in_flight"], st["in_flight"])
            resp = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            wait = self.latency * (1.0 + self.jitter * (2.0 * random.random() - 1.0)) if self.jitter else self.latency
            asyncio.get_running_loop().call_later(wait, self._reply, resp)

    def _reply(self, resp: bytes) -> None:
        self.stats["in_flight"] -= 1
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(resp)


def _serve_raw(latency: float, port: int, text: str, model: str = "fake-vlm", jitter: float = 0.0) -> None:
    chat = json.dumps({"id": "chatcmpl-raw", "object": "chat.completion", "created": 0, "model": model,
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
    models = json.dumps({"object": "list", "data": [{"id": model, "object": "model"}]}).encode()
    stats = _RawBenchProtocol.stats

    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _RawBenchProtocol(latency, chat, models, jitter), "127.0.0.1", port, backlog=4096)
        print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().strip():
            if line == "stop":
                break
            if line == "stats":
                print(json.dumps({**stats, "completed": stats["calls"] - stats["in_flight"], "cpu_s": time.process_time()}), flush=True)
            if line == "reset":
                stats.update(calls=0, max_in_flight=0)
                print("{}", flush=True)
        server.close()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Run the fake OpenAI-compatible server (answers 'ok').")
    ap.add_argument("--latency", type=float, default=0.0, help="seconds each chat request waits")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--text", default="ok")
    ap.add_argument("--raw", action="store_true", help="minimal asyncio responder (benchmarks), not uvicorn")
    ap.add_argument("--jitter", type=float, default=0.0, help="raw mode: latency uniform in L·[1-j, 1+j] (mean L)")
    a = ap.parse_args(argv)
    if a.raw:
        _serve_raw(a.latency, a.port, a.text, jitter=a.jitter)
        return
    reply = Reply(text=a.text)
    srv = FakeOpenAIServer(lambda req, i: reply, latency_s=a.latency, record=False, port=a.port).start()
    print(srv.url, flush=True)
    try:
        for line in sys.stdin:  # stop when stdin closes or says "stop"; "stats" prints counters
            cmd = line.strip()
            if cmd == "stop":
                break
            if cmd == "stats":
                print(json.dumps({"calls": srv.calls, "max_in_flight": srv.max_in_flight, "completed": srv.completed,
                                  "cpu_s": time.process_time()}), flush=True)
            if cmd == "reset":
                srv.reset()
                print("{}", flush=True)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
