"""tagfer.core.serving: the connection limits of the web servers, on a real uvicorn on a free local port.

A tiny ASGI app stands in for tagfer's apps (tests/test_serve.py and tests/test_study.py run the
real ones under the same limits): what is tested here is the protocol, before any app runs.
"""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import given, strategies as st

from tagfer.core.serving import BackgroundServer, ServerLimits, head_end, protocol_class, uvicorn_options


async def tiny_app(scope, receive, send):
    """Answers ``ok`` once the whole body is read (``/slow``: after waiting for it as long as it takes)."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain"),
                                                                          (b"content-length", str(2 + len(body)).encode())]})
    await send({"type": "http.response.body", "body": b"ok" + body})


def connect(srv: BackgroundServer, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), timeout=timeout)
    return s


def read_all(s: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes the connection; ``(data, closed)``."""
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except socket.timeout:
        return got, False
    except ConnectionResetError:
        return got, True
    return got, True


def read_response(s: socket.socket) -> bytes:
    """One response of ``tiny_app`` (it always sends a Content-Length)."""
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(4096)
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(4096)
    return head + b"\r\n\r\n" + body


def get(srv: BackgroundServer, path: str = "/health", timeout: float = 10.0) -> bytes:
    with connect(srv, timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return read_all(s, timeout)[0]


# ----------------------------------------------------------------------------- settings
def test_limits_are_checked_and_mapped_onto_uvicorn():
    lim = ServerLimits(max_connections=7, header_timeout_s=2.5, keep_alive_s=3, max_header_bytes=4096, backlog=64)
    opts = uvicorn_options(lim)
    assert opts["limit_concurrency"] == 7 and opts["timeout_keep_alive"] == 3 and opts["backlog"] == 64
    assert opts["h11_max_incomplete_event_size"] == 4096 and opts["timeout_graceful_shutdown"] == 10.0
    proto = opts["http"]
    assert (proto.header_timeout_s, proto.max_header_bytes) == (2.5, 4096)
    assert protocol_class(2.5, 4096) is proto  # one class per pair of values
    assert uvicorn_options()["limit_concurrency"] == ServerLimits().max_connections
    for bad in ({"max_connections": 1}, {"header_timeout_s": 0}, {"header_timeout_s": float("nan")},
                {"keep_alive_s": -1}, {"keep_alive_s": float("inf")}, {"max_header_bytes": 100},
                {"max_header_bytes": 2 << 20}, {"backlog": 0}, {"shutdown_timeout_s": -1.0}):
        with pytest.raises(ValueError):
            ServerLimits(**bad)


def test_head_end_finds_the_blank_line_split_across_reads():
    assert head_end(b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody") == 27
    assert head_end(b"", b"GET / HTTP/1.1\r\nHost: x\r\n") == -1
    assert head_end(b"x\r\n", b"\r\nbody") == 2  # the terminator began in the previous read
    assert head_end(b"\r\n\r", b"\n") == 1
    assert head_end(b"a\n", b"\nb") == 1  # a bare LF LF ends a head too
    assert head_end(b"\n\n", b"GET") == -1  # one wholly in the previous read does not count again


@given(st.binary(max_size=60).filter(lambda b: b"\n\n" not in b and b"\r\n\r\n" not in b and not b.endswith((b"\n", b"\r"))),
       st.binary(max_size=40), st.lists(st.integers(1, 20), max_size=12))
def test_head_bytes_counted_over_any_split_equal_the_head(line, body, cuts):
    """However a request is cut into reads, the bytes counted as head (as the protocol counts them)
    add up to the head's length, never the body's."""
    head = b"GET /" + line.replace(b"\n", b"").replace(b"\r", b"") + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    data = head + body
    pos, counted, tail, pieces = 0, 0, b"", []
    for c in cuts:
        pieces.append(data[pos:pos + c])
        pos += c
    pieces.append(data[pos:])
    for piece in pieces:
        end = head_end(tail, piece)
        counted += len(piece) if end < 0 else end
        if end >= 0:
            break
        tail = (tail + piece)[-3:]
    assert counted == len(head)


# ----------------------------------------------------------------------------- a real uvicorn
def test_a_slowloris_client_is_cut_off_while_others_are_served():
    """A client that sends its headers a byte at a time gets 408 and is closed after
    ``header_timeout_s`` (uvicorn alone keeps it for ever: every byte stops its only timer);
    a connection that sends nothing is closed without an answer; others are served meanwhile."""
    with BackgroundServer(tiny_app, limits=ServerLimits(header_timeout_s=1.0)) as srv:
        idle = connect(srv)
        slow = connect(srv)
        slow.settimeout(0.05)
        t0 = time.monotonic()
        answer, sent = b"", 0
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 200
        while time.monotonic() - t0 < 6 and not answer:
            try:
                slow.send(request[sent % len(request):][:1])
                sent += 1
            except OSError:
                break
            try:
                answer = slow.recv(4096)
            except socket.timeout:
                pass
            if sent == 5:
                assert get(srv).startswith(b"HTTP/1.1 200")  # served while the slow one dribbles
        took = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in answer, answer
        assert 0.9 <= took < 3.0 and sent > 10, (took, sent)
        rest, closed = read_all(slow, 3)
        assert closed
        got, closed = read_all(idle, 3)  # opened at the same time, sent nothing
        assert closed and got == b""
        assert get(srv).startswith(b"HTTP/1.1 200")
        for s in (idle, slow):
            s.close()


def test_oversize_headers_are_refused_however_they_arrive():
    """A head above ``max_header_bytes`` gets 431, also when it arrives in one read (h11's own limit
    only measures a head that is still incomplete after a read: uvicorn alone answers this one 200)."""
    with BackgroundServer(tiny_app, limits=ServerLimits(max_header_bytes=8 * 1024)) as srv:
        for pad in (20_000, 9_000):
            with connect(srv) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * pad + b"\r\n\r\n")
                got, closed = read_all(s, 5)
            assert got.startswith(b"HTTP/1.1 431") and b"above 8192 bytes" in got and closed, got[:80]
        with connect(srv) as s:  # in many reads
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            for _ in range(10):
                s.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
                time.sleep(0.01)
            got, _ = read_all(s, 5)
            assert got.startswith(b"HTTP/1.1 431") or got.startswith(b"HTTP/1.1 400"), got[:80]  # 400: h11's own limit
        # a head just under the limit with a large body in the same read is served: the body is not head
        body = b"b" * 100_000
        with connect(srv) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 7000 + b"\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            got, _ = read_all(s, 10)
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok" + body)


def test_connections_over_the_limit_get_503_and_health_answers_afterwards():
    """With ``max_connections`` open, a request on one more is answered 503 and closed; once the
    idle ones are closed (``header_timeout_s``) the server answers again."""
    with BackgroundServer(tiny_app, limits=ServerLimits(max_connections=4, header_timeout_s=1.5)) as srv:
        held = [connect(srv) for _ in range(3)]
        time.sleep(0.2)
        t0 = time.monotonic()
        got = get(srv)
        assert got.startswith(b"HTTP/1.1 503") and b"connection: close" in got.lower(), got[:80]
        for s in held:
            got, closed = read_all(s, 5)
            assert closed and got == b""
        assert time.monotonic() - t0 < 3
        assert get(srv).startswith(b"HTTP/1.1 200")
        for s in held:
            s.close()


def test_keep_alive_pipelining_and_slow_bodies_still_work():
    """Requests on a kept-alive connection and pipelined ones are served; an idle kept-alive
    connection is closed after ``keep_alive_s``; a body slower than ``header_timeout_s`` is the
    application's to time out (its headers came in time), not the protocol's."""
    with BackgroundServer(tiny_app, limits=ServerLimits(header_timeout_s=0.8, keep_alive_s=2.0)) as srv:
        with connect(srv) as s:
            s.settimeout(5)
            for _ in range(3):  # spaced beyond the header timeout: the clock restarts at each response
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert read_response(s).startswith(b"HTTP/1.1 200")
                time.sleep(0.5)
            time.sleep(0.6)  # 1.1 s idle after the last answer: past the header timeout, so closed
            got, closed = read_all(s, 3)
            assert closed and got == b""
        with connect(srv) as s:
            s.sendall(b"GET /a HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            got, _ = read_all(s, 5)
            assert got.count(b"HTTP/1.1 200") == 2
        with connect(srv) as s:
            s.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab")
            time.sleep(1.5)
            s.sendall(b"cd")
            got, _ = read_all(s, 5)
            assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"okabcd")
    with BackgroundServer(tiny_app, limits=ServerLimits(header_timeout_s=30, keep_alive_s=0.5)) as srv:
        with connect(srv) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            t0 = time.monotonic()
            got, closed = read_all(s, 5)
            assert got.startswith(b"HTTP/1.1 200") and closed and time.monotonic() - t0 < 2
