"""The study's web app: a FastAPI application over :class:`tagfer.evaluation.study.db.StudyDB`.

Routes::

    GET  /                        the page (static/index.html: name form, image, A/B/tie buttons)
    POST /api/start   {name, token?}  start or resume a session → {token, ...the next item}
    GET  /api/next                the next unvoted pair: {done, pair_id, position, total, completed, responses{A,B}}
    POST /api/vote    {pair_id, choice}  record A / B / tie → the next item (409 on a second vote)
    GET  /api/image/{position}    the pair's image file (needs the token too)
    GET  /api/health              {"ok": true, "pairs": N}
    GET  /openapi.json            the API schema (no /docs page: it would load Swagger UI from a CDN)

Sessions: ``/api/start`` issues a random token for a new name; ``/api/next`` and ``/api/vote``
need it in the ``X-Study-Token`` header (401 without a valid one), and the name is taken from
the token, so nobody can vote as another evaluator. Starting a registered name again needs its
token (``403`` otherwise); names are compared by :func:`tagfer.evaluation.study.db.name_key`
(case, width, accents and look-alike letters do not make a new name; mixed alphabets are
refused). Names must be strings of 1 to 80 printable characters (``422`` otherwise). New
evaluators are limited: ``registrations_per_client`` new names per client address per
``registration_window_s`` (``429`` with ``Retry-After`` beyond) and ``max_evaluators`` per study
(``403``). ``GET /api/next`` writes nothing. The page keeps the name and the token in
``localStorage``, so a reload continues at the next pair. Only requests whose ``Host`` is
localhost, 127.0.0.1, [::1] or an allowed host are served (:mod:`tagfer.core.trusted_hosts`), and
POSTs sent by pages of other origins are refused (403); request bodies above 16 KiB get 413
without being read, and a body that stalls for ``BODY_TIMEOUT_S`` seconds gets 408 (connection closed).
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from tagfer.core.serving import BackgroundServer, ServerLimits
from tagfer.core.trusted_hosts import add_host_check, add_origin_check, allowed_hosts
from tagfer.evaluation.judge import Pair
from tagfer.evaluation.study.db import MAX_EVALUATORS, DuplicateVote, NameTaken, StudyDB, StudyFull, TooManyRegistrations

__all__ = ["create_app", "StudyServer", "static_dir"]


def static_dir() -> Path:
    return Path(str(resources.files("tagfer.evaluation.study") / "static"))


TOKEN_HEADER = "X-Study-Token"
MAX_BODY = 16 * 1024  # request bodies are tiny JSON objects; larger ones get 413 unread
BODY_TIMEOUT_S = 10.0  # longest wait for the next piece of a request body


class RateLimit:
    """At most ``n`` events per ``window_s`` seconds per client (sliding window; at most
    ``max_clients`` clients remembered, the least recently seen forgotten first). Thread-safe."""

    def __init__(self, n: int, window_s: float, max_clients: int = 10_000):
        if n < 1 or not window_s > 0:
            raise ValueError("a rate limit needs n >= 1 and a positive window")
        self.n, self.window_s, self.max_clients = n, float(window_s), max_clients
        self._seen: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._lock = threading.Lock()

    def hit(self, client: str, now: float | None = None) -> float:
        """Record one event of ``client``: 0.0 if allowed, else the seconds until one is (nothing recorded)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._seen.pop(client, None) or collections.deque()
            while q and q[0] <= now - self.window_s:
                q.popleft()
            wait = 0.0
            if len(q) >= self.n:
                wait = q[0] + self.window_s - now
            else:
                q.append(now)
            self._seen[client] = q
            while len(self._seen) > self.max_clients:
                self._seen.popitem(last=False)
            return wait


class _BodyLimit:
    """ASGI middleware: 413 for a request body above ``limit`` bytes, declared or as it streams."""

    def __init__(self, app: Any, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException  # lazy (start-up time): starlette
        from starlette.responses import JSONResponse  # lazy (start-up time): starlette

        detail = f"request body above {self.limit} bytes"
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            try:
                msg = await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
            except asyncio.TimeoutError:  # a stalled body: answer 408 and close the connection
                raise HTTPException(408, f"the request body stalled for {BODY_TIMEOUT_S:g} s",
                                    headers={"Connection": "close"}) from None
            seen += len(msg.get("body", b""))
            if seen > self.limit:  # an undeclared (chunked) body: stop reading, answer 413
                raise HTTPException(413, detail)
            return msg

        await self.app(scope, limited, send)


def create_app(pairs: Sequence[Pair], db_path: str | os.PathLike, seed: int = 0, *,
               allowed_hosts: Sequence[str] | None = None, allowed_origins: Sequence[str] = (),
               max_evaluators: int = MAX_EVALUATORS, registrations_per_client: int = 5,
               registration_window_s: float = 600.0):
    """The FastAPI application for ``pairs`` stored in ``db_path``; ``allowed_hosts``: the Host
    header values served (default localhost, 127.0.0.1, [::1]); ``allowed_origins``: other origins
    whose pages may post; new evaluators: at most ``registrations_per_client`` per client address
    per ``registration_window_s`` seconds and ``max_evaluators`` in all."""
    from fastapi import Body, FastAPI, Header, HTTPException, Request  # lazy (start-up time): fastapi, starlette
    from fastapi.responses import FileResponse, HTMLResponse  # lazy (start-up time): fastapi, starlette

    db = StudyDB(db_path, pairs, seed=seed, max_evaluators=max_evaluators)
    limiter = RateLimit(registrations_per_client, registration_window_s)
    app = FastAPI(title="tagfer A/B study", docs_url=None, redoc_url=None)  # no CDN-loaded docs page
    app.add_middleware(_BodyLimit)
    add_origin_check(app, allowed_origins, error=lambda message: {"detail": message})
    add_host_check(app, allowed_hosts)  # added last: runs first
    app.state.db = db
    page = (static_dir() / "index.html").read_text(encoding="utf-8")

    def bad(e: Exception, status: int = 400):
        raise HTTPException(status_code=status, detail=str(e))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "pairs": len(db.pairs)}

    def who(token: str | None) -> str:
        name = db.evaluator(token)
        if name is None:
            raise HTTPException(status_code=401, detail=f"no valid {TOKEN_HEADER} header: start a session first")
        return name

    def start(request, payload: Any = Body(...)) -> dict[str, Any]:
        if not isinstance(payload, dict):
            bad(ValueError("send a JSON object {\"name\": ...}"), 422)
        token = payload.get("token")
        if token is not None and not isinstance(token, str):
            bad(ValueError("token must be a string"), 422)
        client = request.client.host if request.client else "?"

        def allow_new() -> None:
            wait = limiter.hit(client)
            if wait > 0:
                raise TooManyRegistrations(f"too many new names from {client}: try again in {wait:.0f} s", wait)

        try:
            name, token = db.register(payload.get("name"), token, allow_new=allow_new)
        except TooManyRegistrations as e:
            raise HTTPException(status_code=429, detail=str(e), headers={"Retry-After": str(max(1, round(e.retry_after)))})
        except (NameTaken, StudyFull) as e:
            bad(e, 403)
        except ValueError as e:
            bad(e, 422)
        return {"token": token, **db.next_item(name)}  # a POST: the order shown is stored here

    start.__annotations__["request"] = Request  # the lazily imported class (annotations are strings here)
    app.post("/api/start")(start)

    @app.get("/api/next")
    def next_item(x_study_token: str | None = Header(None)) -> dict[str, Any]:
        return db.next_item(who(x_study_token), record=False)  # reads only

    @app.post("/api/vote")
    def vote(payload: Any = Body(...), x_study_token: str | None = Header(None)) -> dict[str, Any]:
        name = who(x_study_token)
        if not isinstance(payload, dict) or not all(isinstance(payload.get(k), str) for k in ("pair_id", "choice")):
            bad(ValueError("send a JSON object with string fields pair_id and choice"), 422)
        try:
            db.vote(name, payload["pair_id"], payload["choice"])
        except DuplicateVote as e:
            bad(e, 409)
        except KeyError as e:
            bad(e, 404)
        except ValueError as e:
            bad(e)
        return db.next_item(name)

    @app.get("/api/image/{position}")
    def image(position: int, x_study_token: str | None = Header(None)):
        who(x_study_token)
        if not 0 <= position < len(db.pairs):
            raise HTTPException(status_code=404, detail="no such pair")
        path = Path(db.pairs[position].image)
        if not path.is_file():
            raise HTTPException(status_code=404, detail="image file missing")
        return FileResponse(path)

    return app


class StudyServer:
    """Run the app with uvicorn in a background thread (tests, notebooks): ``with StudyServer(...) as s: s.url``;
    ``limits``: the connection limits (:class:`tagfer.core.serving.ServerLimits`, as ``tagfer study serve``)."""

    def __init__(self, pairs: Sequence[Pair], db_path: str | os.PathLike, seed: int = 0, host: str = "127.0.0.1", port: int = 0,
                 allowed: Sequence[str] = (), limits: ServerLimits | None = None, **options: Any):
        self.app = create_app(pairs, db_path, seed, allowed_hosts=allowed_hosts(host, allowed), **options)
        self._server = BackgroundServer(self.app, host, port, limits)

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> "StudyServer":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> "StudyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
