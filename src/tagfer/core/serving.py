"""Connection limits of tagfer's web servers (``tagfer serve``, ``tagfer study serve``) and the one
way they are run under uvicorn.

What uvicorn (0.54, its pure-Python h11 protocol: ``httptools`` is not installed) does by itself:

* ``limit_concurrency``: when a request arrives on a connection while that many connections are
  open (idle ones included, the new one too) or that many requests are running, the request is
  answered ``503 Service Unavailable`` (plain text) and the connection closed.
* ``timeout_keep_alive``: a connection is closed when no byte arrives for that long *after a
  response*. No timer runs before the first request, and any byte stops the timer: a client that
  connects and sends nothing, or sends its headers a byte at a time (slowloris), holds its
  connection for ever.
* ``h11_max_incomplete_event_size`` (16 KiB): the largest *incomplete* request head h11 buffers
  (400 above it). A head that arrives whole in one read (up to 256 KiB) is never measured.
* ``backlog``: the listen queue of connections not yet accepted (the kernel caps it at
  ``somaxconn``); ``timeout_graceful_shutdown``: how long a stopping server waits for requests
  in progress. ``limit_max_requests`` stops the whole process after N requests: it is meant for
  a process manager that starts a fresh worker, so it is not used here.

:class:`ServerLimits` sets those and adds, through :func:`protocol_class` (a subclass of
uvicorn's ``H11Protocol``), what is missing: a request's line and headers must be complete within
``header_timeout_s`` of the connection opening (or of the previous response), else the client
gets ``408`` and the connection is closed (an idle connection is closed without an answer); and
a request head above ``max_header_bytes`` gets ``431`` however it arrives. These answers come
from the protocol, before any application runs, so they are plain text like uvicorn's own.

A server reachable from the internet still belongs behind a reverse proxy (nginx, Caddy): a
client that opens ``max_connections`` connections and renews them every ``header_timeout_s``
keeps other clients waiting; per-client limits need a proxy.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ServerLimits", "BackgroundServer", "protocol_class", "run", "uvicorn_options", "head_end"]


@dataclass(frozen=True)
class ServerLimits:
    """Connection limits of a tagfer web server (module docstring). ``max_connections``: open
    connections at once (uvicorn's ``limit_concurrency``); ``header_timeout_s``: time to send a
    request's line and headers; ``keep_alive_s``: an idle connection is closed after this long;
    ``max_header_bytes``: largest request line + headers; ``backlog``: the listen queue;
    ``shutdown_timeout_s``: wait for requests in progress when the server stops (None: for ever)."""

    max_connections: int = 100
    header_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    max_header_bytes: int = 16 * 1024
    backlog: int = 2048
    shutdown_timeout_s: float | None = 10.0

    def __post_init__(self) -> None:
        if self.max_connections < 2:
            raise ValueError(f"max_connections must be at least 2 (got {self.max_connections}): "
                             "the limit counts the connection that asks")
        for name in ("header_timeout_s", "keep_alive_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):  # also refuses NaN
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if not 1024 <= self.max_header_bytes <= 1024 * 1024:
            raise ValueError(f"max_header_bytes must be between 1 KiB and 1 MiB, got {self.max_header_bytes}")
        if self.backlog < 1:
            raise ValueError(f"backlog must be >= 1, got {self.backlog}")
        if self.shutdown_timeout_s is not None and not self.shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0 or None, got {self.shutdown_timeout_s!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def uvicorn_options(limits: ServerLimits | None = None) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.Config`` / ``uvicorn.run`` that apply ``limits``."""
    lim = limits or ServerLimits()
    return {
        "http": protocol_class(lim.header_timeout_s, lim.max_header_bytes),
        "limit_concurrency": lim.max_connections,
        "timeout_keep_alive": lim.keep_alive_s,
        "h11_max_incomplete_event_size": lim.max_header_bytes,
        "backlog": lim.backlog,
        "timeout_graceful_shutdown": lim.shutdown_timeout_s,
    }


def run(app: Any, host: str, port: int, limits: ServerLimits | None = None, *, log_level: str = "warning") -> None:
    """Serve ``app`` on ``host:port`` until interrupted (what ``tagfer serve`` and ``tagfer study
    serve`` run)."""
    import uvicorn  # lazy (start-up time): uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, **uvicorn_options(limits))


class BackgroundServer:
    """``app`` under uvicorn in a background thread, with ``limits`` (tests, notebooks):
    ``with BackgroundServer(app) as s: s.url``. ``port=0`` picks a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, limits: ServerLimits | None = None, *,
                 lifespan: str = "off", log_level: str = "warning"):
        self.app, self.host, self.port, self.limits = app, host, port, limits or ServerLimits()
        self.lifespan, self.log_level = lifespan, log_level
        self.server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "BackgroundServer":
        import uvicorn  # lazy (start-up time): uvicorn

        cfg = uvicorn.Config(self.app, host=self.host, port=self.port, log_level=self.log_level, lifespan=self.lifespan,
                             **uvicorn_options(self.limits))
        self.server = uvicorn.Server(cfg)
        self._thread = threading.Thread(target=self.server.run, name="tagfer-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def head_end(tail: bytes, data: bytes) -> int:
    """Where the request head ends in ``data`` (the index just after its blank line), ``-1`` if it
    does not end there; ``tail``: the last bytes received before ``data`` (a terminator may be split
    across reads). Both ``CRLF CRLF`` and a bare ``LF LF`` end a head, as h11 reads it."""
    joined = tail + data
    # only a terminator that ends inside ``data`` counts (one wholly in ``tail`` was seen before)
    ends = [i + len(t) for t in (b"\r\n\r\n", b"\n\n") if (i := joined.find(t, max(0, len(tail) - len(t) + 1))) >= 0]
    return min(ends) - len(tail) if ends else -1


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


@functools.lru_cache(maxsize=None)
def protocol_class(header_timeout_s: float = 10.0, max_header_bytes: int = 16 * 1024) -> type:
    """uvicorn's ``H11Protocol`` with a request-head deadline and size limit (module docstring).
    One class per pair of values (uvicorn builds the protocol from its class)."""
    import h11  # lazy (start-up time): uvicorn, h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        """Closes a connection whose request head is not complete within ``header_timeout_s``
        (408 when part of it came) or is larger than ``max_header_bytes`` (431)."""

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            self._head_timer: Any = None
            super().connection_made(transport)
            self._wait_for_head()

        def _wait_for_head(self) -> None:
            """A new request head is due: start its clock and its byte count."""
            self._stop_clock()
            self._head_bytes, self._head_tail = 0, b""
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _reading_head(self) -> bool:
            return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

        def data_received(self, data: bytes) -> None:
            if self._reading_head():
                end = head_end(self._head_tail, data)
                self._head_bytes += len(data) if end < 0 else end
                if self._head_bytes > max_header_bytes:
                    self._refuse(431, f"request line and headers above {max_header_bytes} bytes")
                    return
                self._head_tail = (self._head_tail + data)[-3:]
            super().data_received(data)

        def on_response_complete(self) -> None:
            if not self.transport.is_closing():
                self._wait_for_head()  # before super(): it may go on with a pipelined request
            super().on_response_complete()

        def _stop_clock(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def handle_websocket_upgrade(self, event: Any) -> None:
            self._stop_clock()  # the transport now belongs to the WebSocket protocol
            super().handle_websocket_upgrade(event)

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_clock()
            super().connection_lost(exc)

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not (self.cycle is None or self.cycle.response_complete):
                return  # the application has a request: its own body timeouts apply
            if self._head_bytes or self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]:
                self._refuse(408, f"the request was not received within {header_timeout_s:g} s")
            else:
                self.transport.close()  # an idle connection: closed without an answer

        def _refuse(self, status: int, message: str) -> None:
            body = message.encode()
            head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
            self.logger.warning("%s %s", status, message)
            self.transport.write(head + body)
            self.transport.close()

    GuardedH11Protocol.header_timeout_s = header_timeout_s  # type: ignore[attr-defined]
    GuardedH11Protocol.max_header_bytes = max_header_bytes  # type: ignore[attr-defined]
    return GuardedH11Protocol
